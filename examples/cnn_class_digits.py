"""A CNN written as an NNX class, trained float -> QAT, served as one int8 ``qjax.Program``.

Run: ``.venv/bin/python examples/cnn_class_digits.py`` (``--quick`` for a few steps).
sklearn's bundled 8x8 digits and a model written the way Flax users write one, as a
class with its own ``__call__`` (not a ``Sequential``)::

    QuantStub -> QuantConvBn(1->32, ReLU) -> h + QuantConvBn(32->32, ReLU)(h)
              -> Dropout -> mean over H, W -> QuantLinear(32->10)

1. float training (``Mode.FLOAT``, BN on batch statistics, dropout on);
2. ``freeze_bn_stats`` (BN folds its running statistics from now on), ``calibrate``;
3. QAT: fine-tune in ``Mode.QAT`` with optax (dropout on, BN frozen);
4. ``Mode.FROZEN`` + ``model.eval()`` -> ``qjax.convert(model, x, scheme="fbgemm")``.

``qjax.convert`` traces ``__call__`` and lowers it: the stub and the three quantized
layers become integer steps (uint8 activations x int8 weights -> int32, fbgemm's
requantization), ReLU runs on the codes, and what is not quantized -- the residual add
and the mean -- stays float and is listed in ``program.float_ops`` (dropout, the
identity after ``model.eval()``, leaves no step). The layers use
``QuantConfig(scheme="fbgemm")``, so the served program returns *exactly* the frozen QAT
model's outputs: the example counts the outputs that differ on the whole test split and
asserts 0.

Measured (default run: 12 float + 3 QAT epochs; AMD EPYC, 2 cores shared with other
jobs: 33 s wall, 28 s CPU, of which ~14 s is ``qjax.convert``)::

    float                          97.2%
    PTQ int8 (frozen fake-quant)   97.2%
    QAT int8 (frozen fake-quant)   98.3%
    QAT int8 (served)              98.3%
    served int8 == frozen QAT: 3600 outputs, 0 mismatches
"""

import argparse
import os

import jax.numpy as jnp
import numpy as np
from _digits import accuracy, data, finish  # examples/_digits.py
from flax import nnx

import qjax
from qjax.demo._data import train as train_loop  # adam on cross-entropy, minibatches of 64
from qjax.flax import Mode, default_qat_qconfig
from qjax.flax import nnx as qnnx


class DigitsCNN(nnx.Module):
    """``(N, 8, 8, 1)`` float32 images -> ``(N, 10)`` float32 logits."""

    def __init__(self, rngs: nnx.Rngs, scheme: str = "fbgemm", c: int = 32):
        # torch's x86 QAT qconfig (uint8 activations with reduce_range, per-channel int8
        # weights) with an input quantizer on each layer, as the integer formula needs.
        cfg = default_qat_qconfig("x86").replace(quantize_input=True, scheme=scheme)
        self.stub = qnnx.QuantStub(cfg)
        self.block1 = qnnx.QuantConvBn(1, c, (3, 3), config=cfg, relu=True, rngs=rngs)
        self.block2 = qnnx.QuantConvBn(c, c, (3, 3), config=cfg, relu=True, rngs=rngs)
        self.drop = nnx.Dropout(0.1, rngs=rngs)
        self.head = qnnx.QuantLinear(c, 10, config=cfg, rngs=rngs)

    def __call__(self, x):
        h = self.block1(self.stub(x))
        h = h + self.block2(h)  # residual add: float
        h = self.drop(h).mean(axis=(1, 2))  # global average pooling: float
        return self.head(h)


def main(epochs: int | None = None, qat_epochs: int | None = None) -> dict:
    epochs = int(os.environ.get("QJAX_EXAMPLE_EPOCHS", 12)) if epochs is None else epochs
    qat_epochs = 3 if qat_epochs is None else qat_epochs
    (xtr, ytr), (xte, yte) = data()
    xte = jnp.asarray(xte)
    forward = nnx.jit(lambda m, x: m(x))

    model = DigitsCNN(nnx.Rngs(0))
    qnnx.set_mode(model, Mode.FLOAT)
    model.train()  # dropout on, BN on batch statistics
    train_loop(model, xtr, ytr, epochs, 1e-2, bar=False)
    qnnx.freeze_bn_stats(model)  # evaluate (and from now on train) with running BN stats
    model.eval()
    acc = {"float": accuracy(forward(model, xte), yte)}

    batches = [jnp.asarray(xtr[i : i + 256]) for i in range(0, len(xtr), 256)]
    qnnx.calibrate(model, batches, progress=False)  # observe in eval (no dropout), FROZEN
    acc["PTQ int8 (frozen fake-quant)"] = accuracy(forward(model, xte), yte)

    qnnx.set_mode(model, Mode.QAT)
    model.train()  # dropout on; BN stays frozen (freeze_bn_stats)
    train_loop(model, xtr, ytr, qat_epochs, 1e-3, seed=1, bar=False)
    qnnx.set_mode(model, Mode.FROZEN)
    model.eval()
    frozen = np.asarray(forward(model, xte))
    acc["QAT int8 (frozen fake-quant)"] = accuracy(frozen, yte)

    program = qjax.convert(model, xte, scheme="fbgemm")  # lowered for this shape
    served = program(xte)
    print("int8 layers:", program.kernels)  # {layer path: kernel}
    print("float ops:", list(program.float_ops.values()))  # the add and the mean
    acc = finish(acc, frozen, served, yte)  # prints the table and the differ count
    assert acc["mismatches"] == 0  # served int8 == frozen QAT, bit for bit
    return acc


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--epochs", type=int, default=None, help="float epochs (default 12)")
    p.add_argument("--qat-epochs", type=int, default=None, help="QAT epochs (default 3)")
    p.add_argument("--quick", action="store_true", help="smoke test: 1 float + 1 QAT epoch")
    a = p.parse_args()
    if a.quick:
        a.epochs, a.qat_epochs = 1, 1
    main(a.epochs, a.qat_epochs)
