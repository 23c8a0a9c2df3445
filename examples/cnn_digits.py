"""Train a small CNN, quantize it (PTQ and QAT) and serve it as an int8 program.

Run: ``.venv/bin/python examples/cnn_digits.py``. sklearn's bundled 8x8 digits, a
``nnx.Sequential`` CNN (QuantStub, Conv-BN-ReLU x2 with BN folded as torch's
``ConvBnReLU2d``, max pool, flatten, dense, DeQuantStub):

1. float training (``Mode.FLOAT``, BN on batch statistics);
2. PTQ: ``calibrate`` (BN frozen) -> ``Mode.FROZEN`` -> ``qjax.convert`` -> int8;
3. QAT: fine-tune the PTQ model in ``Mode.QAT`` -> ``FROZEN`` -> int8.

The layers use ``QuantConfig(scheme="fbgemm")``: their fake-quant forward value is the
int8 server's integer formula, so the served int8 program returns *exactly* the frozen
QAT model's outputs (asserted below on the whole test set).
"""

import copy
import os

import jax.numpy as jnp
import numpy as np
from _digits import accuracy, data, finish  # examples/_digits.py
from flax import nnx

import qjax
from qjax.demo._data import make_model as digits_cnn
from qjax.demo._data import train as train_loop
from qjax.flax import Mode, default_qat_qconfig
from qjax.flax import nnx as qnnx


def make_model(rngs: nnx.Rngs, scheme: str = "fbgemm") -> nnx.Sequential:
    # torch's x86 QAT qconfig (uint8 activations with reduce_range, per-channel int8
    # weights) with an input quantizer on each layer, as the integer formula needs.
    cfg = default_qat_qconfig("x86").replace(quantize_input=True, scheme=scheme)
    return digits_cnn(rngs, cfg)  # the network of ``qjax demo``


def train(model, x, y, epochs, lr, seed=0):
    train_loop(model, x, y, epochs, lr, seed=seed, bar=False)


def main(epochs: int | None = None, qat_epochs: int | None = None) -> dict:
    epochs = int(os.environ.get("QJAX_EXAMPLE_EPOCHS", 12)) if epochs is None else epochs
    qat_epochs = 3 if qat_epochs is None else qat_epochs
    (xtr, ytr), (xte, yte) = data()
    forward = nnx.jit(lambda m, x: m(x))

    model = make_model(nnx.Rngs(0))
    qnnx.set_mode(model, Mode.FLOAT)
    train(model, xtr, ytr, epochs, 1e-2)
    qnnx.freeze_bn_stats(model)  # evaluate (and from now on train) with running BN stats
    acc = {"float": accuracy(forward(model, jnp.asarray(xte)), yte)}

    ptq = copy.deepcopy(model)
    batches = [jnp.asarray(xtr[i : i + 256]) for i in range(0, len(xtr), 256)]
    qnnx.calibrate(ptq, batches, progress=False)  # ends in Mode.FROZEN
    ptq_served = qjax.convert(ptq, xte[:1])
    acc["PTQ int8 (served)"] = accuracy(ptq_served(jnp.asarray(xte)), yte)

    qat = copy.deepcopy(ptq)
    qnnx.set_mode(qat, Mode.QAT)
    train(qat, xtr, ytr, qat_epochs, 1e-3, seed=1)
    qnnx.set_mode(qat, Mode.FROZEN)
    frozen = np.asarray(forward(qat, jnp.asarray(xte)))
    acc["QAT int8 (frozen fake-quant)"] = accuracy(frozen, yte)

    served = qjax.convert(qat, xte[:1], scheme="fbgemm")
    return finish(acc, frozen, served(jnp.asarray(xte)), yte)


if __name__ == "__main__":
    main()
