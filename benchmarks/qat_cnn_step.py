"""QAT training step vs float training step of the digits CNN (examples/cnn_digits.py).

Run: ``.venv/bin/python benchmarks/qat_cnn_step.py``. The model is the example's
``nnx.Sequential`` (QuantStub, Conv-BN-ReLU 1->16 and 16->32 with BN folded, max pool,
flatten, dense 512->10), batch 64 of 8x8 images, adam. Three steps, timed interleaved
in one process (medians): ``Mode.FLOAT`` (the folded conv-BN arithmetic, no
fake-quant), ``Mode.QAT`` with the float simulation (``scheme=None``), and ``Mode.QAT``
with ``QuantConfig(scheme="fbgemm")`` (forward value from the int8 server's integer
formula, float straight-through gradient). Prints the ratios to the float step.
``QJAX_BENCH_QUICK=1``: 5 repeats instead of 30.
"""

import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
from _timing import bench_line, interleaved, load_line, machine_line, quick
from flax import nnx

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "examples"))
from cnn_digits import make_model  # noqa: E402

from qjax.flax import Mode  # noqa: E402
from qjax.flax import nnx as qnnx  # noqa: E402

BATCH = 64


def make_step(scheme, mode, x):
    model = make_model(nnx.Rngs(0), scheme=scheme)
    qnnx.calibrate(model, [x], progress=False, then=mode)
    qnnx.freeze_bn_stats(model)
    opt = nnx.Optimizer(model, optax.adam(1e-3), wrt=nnx.Param)

    @nnx.jit
    def step(model, opt, xb, yb):
        def loss_fn(m):
            return optax.softmax_cross_entropy_with_integer_labels(m(xb), yb).mean()

        loss, grads = nnx.value_and_grad(loss_fn)(model)
        opt.update(model, grads)
        return loss

    return lambda xb, yb: step(model, opt, xb, yb)


def main(repeats: int | None = None):
    if repeats is None:
        repeats = 5 if quick() else 30
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.uniform(0, 1, (BATCH, 8, 8, 1)).astype(np.float32))
    y = jnp.asarray(rng.integers(0, 10, BATCH).astype(np.int32))
    steps = {
        "float step": make_step(None, Mode.FLOAT, x),
        "QAT step (float sim)": make_step(None, Mode.QAT, x),
        "QAT step (scheme=fbgemm)": make_step("fbgemm", Mode.QAT, x),
    }
    t = interleaved({k: (lambda f=f: f(x, y)) for k, f in steps.items()}, repeats=repeats)
    print(machine_line())
    print(load_line())
    for k, v in t.items():
        print(f"{k:26s} {v * 1e3:8.3f} ms   {v / t['float step']:.2f}x float")
    for k in ("QAT step (float sim)", "QAT step (scheme=fbgemm)"):
        case = f"digits CNN batch {BATCH}, {k[len('QAT step (') : -1]}"
        bench_line("qat_cnn_step", case, t[k] / t["float step"], "float step", "<= 1.15x")


if __name__ == "__main__":
    with jax.numpy_dtype_promotion("standard"):
        main()
