"""PTQ vs QAT on the digits CNN at 8, 4 and 2 bits: where fine-tuning with fake-quant pays.

Run: ``.venv/bin/python examples/ptq_vs_qat_digits.py`` (about 65 s of CPU time: three bit
widths, each calibrated and fine-tuned).

The model is the digits CNN of ``examples/cnn_digits.py`` (QuantStub, Conv-BN-ReLU x2
with BN folded as torch's ``ConvBnReLU2d``, max pool, dense), trained once in float on
sklearn's 8x8 digits. Then, for each bit width ``b`` in (8, 4, 2), a copy with the same
float weights and one quantization recipe, only ``bits`` changing:

* weights: ``b``-bit symmetric per output channel, narrow range (int8: -127..127,
  int4: -7..7, int2: -1..1, i.e. ternary), observed from the current weights;
* activations: ``b``-bit affine per tensor on each layer's input (the input image
  included), moving-average min/max (0.01); ``compat="qjax"``, STE gradients;

is (1) **PTQ**: calibrated on the training set (BN frozen) and evaluated with
fake-quant (``Mode.FROZEN``), and (2) **QAT**: the PTQ model fine-tuned ``qat_epochs``
in ``Mode.QAT`` (lr 1e-3), then frozen and evaluated. Digits is an easy task: at 8 bits
PTQ matches float, at 4 bits it loses little; at 2 bits (ternary weights, 4 activation
levels) PTQ collapses and QAT recovers most of the accuracy. The accuracies are
fake-quant ones (the integers the layers compute, dequantized);
``examples/cnn_digits.py`` serves the int8 model as an int8 program.
"""

from __future__ import annotations

import copy
import os
import time

import jax.numpy as jnp
from _digits import accuracy, data  # examples/_digits.py
from cnn_digits import train  # examples/cnn_digits.py
from flax import nnx

from qjax import QuantSpec
from qjax.demo import _data as _demo_data
from qjax.flax import Mode, qjax_recommended
from qjax.flax import nnx as qnnx


def config(bits: int):
    """qjax_recommended with ``bits``-bit weights and unsigned activations."""
    return qjax_recommended().replace(
        weight=QuantSpec(bits=bits, signed=True, symmetric=True, narrow_range=True, axis=-1),
        activation=QuantSpec(bits=bits, signed=False),
    )


def make_model(cfg, rngs: nnx.Rngs) -> nnx.Sequential:
    # the digits CNN of examples/cnn_digits.py and the demo, with the recipe as an argument
    return _demo_data.make_model(rngs, cfg)


def main(epochs: int | None = None, qat_epochs: int = 2, bits: tuple[int, ...] = (8, 4, 2)) -> dict:
    """Returns ``{"float": acc, "PTQ int8": acc, "QAT int8": acc, "PTQ int4": ..., ...}``
    (test accuracies) plus ``"seconds"``."""
    epochs = int(os.environ.get("QJAX_EXAMPLE_EPOCHS", 6)) if epochs is None else epochs
    t0 = time.perf_counter()
    (xtr, ytr), (xte, yte) = data()
    xte_j = jnp.asarray(xte)
    forward = nnx.jit(lambda m, x: m(x))

    float_model = make_model(config(8), nnx.Rngs(0))
    qnnx.set_mode(float_model, Mode.FLOAT)
    train(float_model, xtr, ytr, epochs, 1e-2)
    qnnx.freeze_bn_stats(float_model)  # from now on: running BN statistics
    acc = {"float": accuracy(forward(float_model, xte_j), yte)}
    trained = nnx.state(float_model, nnx.Param, nnx.BatchStat)

    batches = [jnp.asarray(xtr[i : i + 256]) for i in range(0, len(xtr), 256)]
    for b in bits:
        ptq = make_model(config(b), nnx.Rngs(0))
        nnx.update(ptq, *trained)  # the same float weights and BN statistics
        qnnx.freeze_bn_stats(ptq)
        qnnx.calibrate(ptq, batches, progress=False)  # ends in Mode.FROZEN
        acc[f"PTQ int{b}"] = accuracy(forward(ptq, xte_j), yte)

        qat = copy.deepcopy(ptq)
        qnnx.set_mode(qat, Mode.QAT)
        train(qat, xtr, ytr, qat_epochs, 1e-3, seed=1)
        qnnx.set_mode(qat, Mode.FROZEN)
        acc[f"QAT int{b}"] = accuracy(forward(qat, xte_j), yte)
    acc["seconds"] = time.perf_counter() - t0

    print(
        f"test accuracy on sklearn digits ({len(yte)} images), CNN conv-BN-ReLU x2, "
        f"{epochs} float epochs + {qat_epochs} QAT epochs (fake-quant, Mode.FROZEN)"
    )
    print(f"  {'':8s} {'PTQ':>7s} {'QAT':>7s}   (float {100 * acc['float']:.1f}%)")
    for b in bits:
        ptq, qat = acc[f"PTQ int{b}"], acc[f"QAT int{b}"]
        print(
            f"  W{b}A{b}     {100 * ptq:6.1f}% {100 * qat:6.1f}%   QAT - PTQ: "
            f"{100 * (qat - ptq):+.1f} points"
        )
    print(f"({acc['seconds']:.0f} s)")
    return acc


if __name__ == "__main__":
    main()
