"""Flax models written as classes, served int8 by ``qjax.convert`` vs JAX float32 (issue 15).

Run: ``.venv/bin/python benchmarks/served_flax.py``. Two models, each timed four ways in
one process (interleaved medians): the float32 model (``Mode.FLOAT``, jitted), the
frozen fake-quant model (``Mode.FROZEN`` with ``QuantConfig(scheme="fbgemm")``, the
integer formula in the forward, jitted) and two int8 programs ``qjax.convert`` traces
from it (int8 x int8 -> int32 dots/convs; the rest float, exactly as the frozen model):
``kernel="xla"`` (the default, pure XLA) and ``kernel="auto"`` (the native kernel where
it runs exactly here: oneDNN's brgemm ukernel or AMX, requantization folded into the
layer, :mod:`qjax.flax._fold`; the kernel each layer got is printed):

- CNN class: QuantStub, Conv-BN-ReLU 1->32 and 32->32 (3x3), a residual QuantConv block,
  max pool 2, BatchNorm, GELU, global mean, QuantLinear 32->10; batch 256 of 16x16x1.
- transformer block (ViT-like): LayerNorm, ``nnx.MultiHeadAttention`` (4 heads, d=128;
  its four projections hooked), LayerNorm, MLP 128->512->128 with GELU (hooked); batch
  32 of 16 tokens. The attention matmuls, softmax, LayerNorm and GELU stay float.

The frozen model is timed in a separate round against float32 (interleaved with the
programs, its long calls slowed the program timed after it); its time is scaled by the
two rounds' float32 medians. Both programs' outputs are checked equal to the frozen
model's before timing. ``BENCH`` lines: float32 / int8 and frozen / int8 (> 1: the int8
program is faster) for each kernel; the goal, ``>= 2.0x`` against float32, is on the
``auto`` program (the XLA lines have none). ``QJAX_BENCH_QUICK=1``: 5 repeats, not 20.
"""

# qjax's helper threads sleep between calls (QJAX_SPIN_US=0) unless QJAX_BENCH_SPIN=1:
# with one call per turn they would spin into the float32 contender's time
import _timing

_timing.wait_policy()

import jax  # noqa: E402
import numpy as np  # noqa: E402
from _timing import bench_line, interleaved, load_line, machine_line, quick, table  # noqa: E402
from flax import nnx  # noqa: E402

import qjax  # noqa: E402
from qjax.flax import Mode, default_qat_qconfig, qjax_recommended  # noqa: E402
from qjax.flax import nnx as qnnx  # noqa: E402

CFG = default_qat_qconfig("x86").replace(quantize_input=True, scheme="fbgemm")


class CNN(nnx.Module):
    def __init__(self, rngs, c=32):
        self.stub = qnnx.QuantStub(CFG)
        self.c1 = qnnx.QuantConvBn(1, c, (3, 3), config=CFG, relu=True, rngs=rngs)
        self.c2 = qnnx.QuantConvBn(c, c, (3, 3), config=CFG, relu=True, rngs=rngs)
        self.c3 = qnnx.QuantConv(c, c, (3, 3), config=CFG, rngs=rngs)
        self.bn = nnx.BatchNorm(c, rngs=rngs)
        self.fc = qnnx.QuantLinear(c, 10, config=CFG, rngs=rngs)

    def __call__(self, x):
        h = self.c2(self.c1(self.stub(x)))
        h = h + nnx.relu(self.c3(h))
        h = nnx.max_pool(h, (2, 2), (2, 2))
        return self.fc(jax.nn.gelu(self.bn(h)).mean(axis=(1, 2)))


class Block(nnx.Module):
    def __init__(self, rngs, d=128):
        self.ln1 = nnx.LayerNorm(d, rngs=rngs)
        self.attn = nnx.MultiHeadAttention(4, d, decode=False, rngs=rngs)
        self.ln2 = nnx.LayerNorm(d, rngs=rngs)
        self.fc1 = nnx.Linear(d, 4 * d, rngs=rngs)
        self.fc2 = nnx.Linear(4 * d, d, rngs=rngs)

    def __call__(self, x):
        x = x + self.attn(self.ln1(x))
        return x + self.fc2(jax.nn.gelu(self.fc1(self.ln2(x))))


def _block():
    model = Block(nnx.Rngs(0))
    qnnx.quantize_model(model, [("attn|fc1|fc2", qjax_recommended().replace(scheme="fbgemm"))])
    return model


def run(name, make, x, reps):
    model = make()
    qnnx.calibrate(model, [x], progress=False)
    qnnx.set_mode(model, Mode.FROZEN)
    model.eval()
    programs = {"xla": qjax.convert(model, x), "auto": qjax.convert(model, x, kernel="auto")}
    frozen = nnx.jit(lambda m, v: m(v))
    float_model = nnx.clone(model)
    qnnx.set_mode(float_model, Mode.FLOAT)
    yf = np.asarray(frozen(model, x))
    for kernel, program in programs.items():
        y = np.asarray(program(x))
        differ = int((y != yf).sum())
        print(f"{name}: served kernel={kernel!r} vs frozen: {differ} of {y.size} outputs differ")
        assert differ == 0
    auto = programs["auto"]
    folded = [k for k, v in auto.params.items() if getattr(_weight(v), "folded", None)]
    print(f"{name}: kernel='auto' layers: {auto.kernels}; requantization folded: {folded}")
    f32 = {"f32": lambda: frozen(float_model, x)}
    t = interleaved({**f32, **{k: (lambda p=p: p(x)) for k, p in programs.items()}}, repeats=reps)
    # the frozen model (5-10x the f32 time) in its own round against f32: interleaved with
    # the programs it slowed the one timed after it (CNN auto 5.4 -> 6.9-7.7 ms, load 1.3)
    tf = interleaved({**f32, "frozen": lambda: frozen(model, x)}, repeats=max(3, reps // 4))
    t["frozen"] = tf["frozen"] / tf["f32"] * t["f32"]  # on the first round's f32 scale
    for k, goal in (("auto", ">= 2.0x"), ("xla", None)):
        bench_line("served_flax", f"{name} {k} (vs f32)", t["f32"] / t[k], "jax f32", goal)
        ratio = t["frozen"] / t[k]
        bench_line("served_flax", f"{name} {k} (vs frozen)", ratio, "frozen fake-quant")
    ms = [f"{t[k] * 1e3:.2f}" for k in ("f32", "frozen", "xla", "auto")]
    return [name, *ms, f"{t['f32'] / t['xla']:.2f}x", f"{t['f32'] / t['auto']:.2f}x"]


def _weight(params):
    """The prepared weight of a layer step's params ``(weight, bias, out qparams)``."""
    return params[0] if isinstance(params, tuple) and params else None


def main():
    print(machine_line())
    print(load_line())
    reps = 5 if quick() else 20
    key = jax.random.key(0)
    rows = [
        run(
            "cnn class b256",
            lambda: CNN(nnx.Rngs(0)),
            jax.random.normal(key, (256, 16, 16, 1)),
            reps,
        ),  # fmt: skip
        run("transformer block b32x16", _block, jax.random.normal(key, (32, 16, 128)), reps),
    ]
    header = ["model", "f32 ms", "frozen ms", "xla ms", "auto ms", "f32/xla", "f32/auto"]
    print(table(header, rows))
    print(load_line())


if __name__ == "__main__":
    main()
