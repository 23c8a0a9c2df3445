"""Stochastic rounding: qjax's fused counter hash vs a full-tensor threefry draw.

Run: ``.venv/bin/python benchmarks/stochastic_rounding.py``. Prints medians and the
speed ratio of a jitted stochastic fake-quant over 4M float32 values, with the key
split every call as in a training step. ``QJAX_BENCH_QUICK=1``: 1M values, 5 repeats.
"""

import jax
import jax.numpy as jnp
from _timing import bench_line, interleaved, load_line, machine_line, quick

import qjax

N = (1 if quick() else 4) * 1024 * 1024
spec = qjax.QuantSpec(bits=8, rounding="stochastic")
qp = qjax.QParams(scale=0.01, zero_point=0, spec=spec)
x = jax.random.normal(jax.random.key(0), (N,))


@jax.jit
def qjax_sr(x, key):
    return qjax.fake_quant(x, qp, key=key)


@jax.jit
def threefry_sr(x, key):
    u = jax.random.uniform(key, x.shape)
    return (jnp.clip(jnp.floor(x / 0.01 + u), -128, 127)) * 0.01


@jax.jit
def nearest(x):
    return qjax.fake_quant(x, qjax.QParams(scale=0.01, zero_point=0, spec=qjax.QuantSpec()))


key = jax.random.key(1)
t = interleaved(
    {
        "qjax stochastic (hash)": lambda: qjax_sr(x, key),
        "threefry uniform + floor": lambda: threefry_sr(x, key),
        "round to nearest": lambda: nearest(x),
    },
    repeats=5 if quick() else 30,
    warmup=1 if quick() else 3,
)
print(machine_line())
print(load_line())
for k, v in t.items():
    print(f"{k:28s} {v * 1e3:8.2f} ms")
speedup = t["threefry uniform + floor"] / t["qjax stochastic (hash)"]
overhead = t["qjax stochastic (hash)"] / t["round to nearest"]
print(f"threefry / qjax hash: {speedup:.2f}x")
print(f"qjax hash / nearest:  {overhead:.2f}x")
case = f"{N >> 20}M float32"
bench_line("stochastic_rounding", case, speedup, "threefry uniform + floor")
# an overhead ratio (qjax stochastic / qjax nearest), like the QAT step benchmarks
bench_line("stochastic_rounding", case + ", cost vs nearest", overhead, "round to nearest")
