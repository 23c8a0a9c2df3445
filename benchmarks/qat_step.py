"""QAT training step vs float training step: MLP 784-1024-1024-10, batch 256, adam.

Run: ``.venv/bin/python benchmarks/qat_step.py``. The QAT step fake-quantizes every
weight per output channel (int8 symmetric, qparams from the weight's current min/max)
and every layer input per tensor (uint8 affine, EMA min/max observers whose state is
carried through the step), with straight-through gradients. Goal: <= 1.15x float.
``QJAX_BENCH_QUICK=1``: 5 repeats instead of 30.
"""

import jax
import jax.numpy as jnp
import optax
from _timing import bench_line, interleaved, load_line, machine_line, quick

import qjax
from qjax import observers

SIZES = (784, 1024, 1024, 10)
BATCH = 256
W_SPEC = qjax.QuantSpec(bits=8, signed=True, symmetric=True, axis=1)  # w: [in, out]
A_SPEC = qjax.QuantSpec(bits=8, signed=False)
act_obs = observers.ema_minmax(A_SPEC, averaging_constant=0.01)


def init_params(key):
    params = []
    for i, (n_in, n_out) in enumerate(zip(SIZES[:-1], SIZES[1:], strict=True)):
        k = jax.random.fold_in(key, i)
        params.append({"w": jax.random.normal(k, (n_in, n_out)) / n_in**0.5, "b": jnp.zeros(n_out)})
    return params


def float_loss(params, x, y):
    h = x
    for i, p in enumerate(params):
        h = h @ p["w"] + p["b"]
        if i < len(params) - 1:
            h = jax.nn.relu(h)
    return optax.softmax_cross_entropy_with_integer_labels(h, y).mean()


def qat_loss(params, stats, x, y):
    h = x
    new_stats = []
    for i, p in enumerate(params):
        st = act_obs.update(stats[i], jax.lax.stop_gradient(h))
        new_stats.append(st)
        h = qjax.fake_quant(h, act_obs.qparams(st))
        w = p["w"]
        wd = jax.lax.stop_gradient(w)
        qw = qjax.qparams_from_minmax(wd.min(axis=0), wd.max(axis=0), W_SPEC)
        h = h @ qjax.fake_quant(w, qw) + p["b"]
        if i < len(params) - 1:
            h = jax.nn.relu(h)
    return optax.softmax_cross_entropy_with_integer_labels(h, y).mean(), new_stats


opt = optax.adam(1e-3)


@jax.jit
def float_step(params, opt_state, x, y):
    loss, g = jax.value_and_grad(float_loss)(params, x, y)
    upd, opt_state = opt.update(g, opt_state, params)
    return optax.apply_updates(params, upd), opt_state, loss


@jax.jit
def qat_step(params, stats, opt_state, x, y):
    (loss, stats), g = jax.value_and_grad(qat_loss, has_aux=True)(params, stats, x, y)
    upd, opt_state = opt.update(g, opt_state, params)
    return optax.apply_updates(params, upd), stats, opt_state, loss


def main():
    key = jax.random.key(0)
    params = init_params(key)
    x = jax.random.normal(jax.random.fold_in(key, 100), (BATCH, SIZES[0]))
    y = jax.random.randint(jax.random.fold_in(key, 101), (BATCH,), 0, SIZES[-1])
    opt_state = opt.init(params)
    h, stats = x, []
    for p in params:  # observer states sized by each layer's input
        stats.append(act_obs.init(h))
        h = h @ p["w"]
    t = interleaved(
        {
            "float step": lambda: float_step(params, opt_state, x, y),
            "QAT step": lambda: qat_step(params, stats, opt_state, x, y),
        },
        repeats=5 if quick() else 30,
        warmup=1 if quick() else 3,
    )
    print(machine_line())
    print(load_line())
    for k, v in t.items():
        print(f"{k:12s} {v * 1e3:8.2f} ms")
    ratio = t["QAT step"] / t["float step"]
    print(f"QAT / float: {ratio:.3f}x  (goal <= 1.15x)")
    bench_line("qat_step", "MLP 784-1024-1024-10 batch 256 adam", ratio, "float step", "<= 1.15x")


if __name__ == "__main__":
    main()
