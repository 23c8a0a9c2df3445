"""The CNN class of ``cnn_class_digits.py`` in ``flax.linen``: float -> QAT -> one int8
``qjax.Program``.

Run: ``.venv/bin/python examples/cnn_class_digits_linen.py`` (``--quick`` for a few
steps). Same data, layers and phases as the NNX example, written as a Linen class with a
``mode`` field that it passes down to the qjax layers and a ``train`` call argument for
BatchNorm (folded into ``QuantConvBn``) and Dropout::

    QuantStub -> QuantConvBn(32, ReLU) -> h + QuantConvBn(32, ReLU)(h)
              -> Dropout -> mean over H, W -> QuantDense(10)

State lives in Linen collections: ``params`` (optax), ``batch_stats`` (BN running
statistics) and ``quant_stats`` (observers); the module is stateless, so each phase
builds it with its own ``mode`` / ``freeze_bn`` and the variables carry over. After
float training BN is frozen (``freeze_bn=True``: normalise with, and stop updating, the
running statistics), the model is calibrated, fine-tuned in ``Mode.QAT`` and converted
with ``qjax.convert((module, variables), x, scheme="fbgemm")``, which traces
``module.apply(variables, x)`` (``train=False``: dropout is the identity) in
``Mode.FROZEN`` whatever mode the module was built with; a function works too:
``qjax.convert(lambda v: module.apply(variables, v), x)``. The residual add and the
mean stay float (``program.float_ops``); dropout, the identity at ``train=False``,
leaves no step. With ``QuantConfig(scheme="fbgemm")``
the served program equals the frozen QAT model's outputs bit for bit (asserted).

Measured (default run: 12 float + 3 QAT epochs; AMD EPYC, 2 cores shared with other
jobs: 56 s wall, 34 s CPU, of which ~14 s is ``qjax.convert``)::

    float                          96.4%
    PTQ int8 (frozen fake-quant)   96.7%
    QAT int8 (frozen fake-quant)   98.6%
    QAT int8 (served)              98.6%
    served int8 == frozen QAT: 3600 outputs, 0 mismatches
"""

import argparse
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from _digits import accuracy, data, finish, minibatches  # examples/_digits.py

import qjax
from qjax.flax import Mode, QuantConfig, default_qat_qconfig
from qjax.flax import linen as ql

# torch's x86 QAT qconfig with an input quantizer on each layer (see cnn_class_digits.py)
CFG = default_qat_qconfig("x86").replace(quantize_input=True, scheme="fbgemm")


class DigitsCNN(nn.Module):
    """``(N, 8, 8, 1)`` float32 images -> ``(N, 10)`` float32 logits."""

    mode: Mode = Mode.QAT
    freeze_bn: bool = False  # BN: use (and stop updating) the running statistics
    config: QuantConfig = CFG
    c: int = 32

    @nn.compact
    def __call__(self, x, train: bool = False):
        q = dict(config=self.config, mode=self.mode)
        bn = dict(relu=True, use_running_average=not train, freeze_bn_stats=self.freeze_bn)
        h = ql.QuantStub(self.config, mode=self.mode, name="stub")(x)
        h = ql.QuantConvBn(self.c, (3, 3), **q, **bn, name="block1")(h)
        h = h + ql.QuantConvBn(self.c, (3, 3), **q, **bn, name="block2")(h)  # residual add: float
        h = nn.Dropout(0.1, deterministic=not train)(h)
        return ql.QuantDense(10, **q, name="head")(h.mean(axis=(1, 2)))  # global average pooling


def train(model, variables, x, y, epochs, lr, seed=0):
    """Adam on ``params`` with ``train=True`` (dropout on); ``batch_stats`` and
    ``quant_stats`` are updated by the forward."""
    tx = optax.adam(lr)
    params, state = variables["params"], {k: v for k, v in variables.items() if k != "params"}

    @jax.jit
    def step(params, state, opt_state, xb, yb, key):
        def loss_fn(p):
            logits, new = model.apply(
                {"params": p, **state}, xb, train=True, mutable=list(state), rngs={"dropout": key}
            )
            return optax.softmax_cross_entropy_with_integer_labels(logits, yb).mean(), new

        grads, new = jax.grad(loss_fn, has_aux=True)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), {**state, **new}, opt_state

    opt_state = tx.init(params)
    key = jax.random.key(seed)
    for b in minibatches(len(x), epochs, seed):
        key, sub = jax.random.split(key)
        params, state, opt_state = step(params, state, opt_state, x[b], y[b], sub)
    return {"params": params, **state}


def main(epochs: int | None = None, qat_epochs: int | None = None) -> dict:
    epochs = int(os.environ.get("QJAX_EXAMPLE_EPOCHS", 12)) if epochs is None else epochs
    qat_epochs = 3 if qat_epochs is None else qat_epochs
    (xtr, ytr), (xte, yte) = data()
    xte = jnp.asarray(xte)

    float_model = DigitsCNN(Mode.FLOAT)  # BN on batch statistics while training
    variables = float_model.init(jax.random.key(0), xtr[:1])
    variables = train(float_model, variables, xtr, ytr, epochs, 1e-2)
    acc = {"float": accuracy(jax.jit(float_model.apply)(variables, xte), yte)}

    batches = [xtr[i : i + 256] for i in range(0, len(xtr), 256)]
    variables, _ = ql.calibrate(DigitsCNN(Mode.CALIBRATE), variables, batches, progress=False)
    frozen_model = DigitsCNN(Mode.FROZEN, freeze_bn=True)
    acc["PTQ int8 (frozen fake-quant)"] = accuracy(jax.jit(frozen_model.apply)(variables, xte), yte)

    qat_model = DigitsCNN(Mode.QAT, freeze_bn=True)  # dropout on, BN frozen
    variables = train(qat_model, variables, xtr, ytr, qat_epochs, 1e-3, seed=1)
    frozen = jax.jit(frozen_model.apply)(variables, xte)
    acc["QAT int8 (frozen fake-quant)"] = accuracy(frozen, yte)

    program = qjax.convert((frozen_model, variables), xte, scheme="fbgemm")
    print("int8 layers:", program.kernels)  # {layer path: kernel}
    print("float ops:", list(program.float_ops.values()))  # the add and the mean
    acc = finish(acc, frozen, program(xte), yte)  # prints the table and the differ count
    assert acc["mismatches"] == 0  # served int8 == frozen QAT, bit for bit
    return acc


if __name__ == "__main__":
    p = argparse.ArgumentParser(description="Linen CNN class: float -> QAT -> int8 Program")
    p.add_argument("--epochs", type=int, default=None, help="float epochs (default 12)")
    p.add_argument("--qat-epochs", type=int, default=None, help="QAT epochs (default 3)")
    p.add_argument("--quick", action="store_true", help="smoke test: 1 float + 1 QAT epoch")
    a = p.parse_args()
    if a.quick:
        a.epochs, a.qat_epochs = 1, 1
    main(a.epochs, a.qat_epochs)
