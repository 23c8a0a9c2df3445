"""The digits CNN of ``cnn_digits.py`` with ``flax.linen`` layers: float -> PTQ -> QAT -> int8.

Run: ``.venv/bin/python examples/cnn_digits_linen.py``. Same network, data and batches as
the NNX example; state in Linen collections: ``params`` (optax), ``batch_stats`` (BN) and
``quant_stats`` (observers). ``nn.Sequential`` passes call arguments to its first layer
only, so mode and BN switch are attributes: :func:`make_model` rebuilds the stateless
module per phase and the variables carry over. ``qjax.convert((module, variables), ...)``
serves exactly the frozen QAT outputs (``QuantConfig(scheme="fbgemm")``; asserted).
"""

import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from _digits import accuracy, data, finish, minibatches  # examples/_digits.py

import qjax
from qjax.flax import Mode, default_qat_qconfig
from qjax.flax import linen as ql


def make_model(mode: Mode, frozen_bn: bool = True, scheme: str = "fbgemm") -> nn.Sequential:
    # torch's x86 QAT qconfig with an input quantizer on each layer (see cnn_digits.py).
    cfg = default_qat_qconfig("x86").replace(quantize_input=True, scheme=scheme)
    bn = dict(relu=True, use_running_average=frozen_bn, mode=mode)
    return nn.Sequential(
        [
            ql.QuantStub(cfg, mode=mode),
            ql.QuantConvBn(16, (3, 3), config=cfg, **bn),
            ql.QuantConvBn(32, (3, 3), config=cfg, **bn),
            ql.MaxPool((2, 2)),
            ql.Flatten(),
            ql.QuantDense(10, config=cfg, mode=mode),
            ql.DeQuantStub(),
        ]
    )


def train(model, variables, x, y, epochs, lr, seed=0):
    """Adam on ``params``; ``batch_stats``/``quant_stats`` are updated by the forward."""
    tx = optax.adam(lr)
    params, state = variables["params"], {k: v for k, v in variables.items() if k != "params"}

    @jax.jit
    def step(params, state, opt_state, xb, yb):
        def loss_fn(p):
            logits, new = model.apply({"params": p, **state}, xb, mutable=list(state))
            return optax.softmax_cross_entropy_with_integer_labels(logits, yb).mean(), new

        grads, new = jax.grad(loss_fn, has_aux=True)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), {**state, **new}, opt_state

    opt_state = tx.init(params)
    for b in minibatches(len(x), epochs, seed):
        params, state, opt_state = step(params, state, opt_state, x[b], y[b])
    return {"params": params, **state}


def main(epochs: int | None = None, qat_epochs: int | None = None) -> dict:
    epochs = int(os.environ.get("QJAX_EXAMPLE_EPOCHS", 12)) if epochs is None else epochs
    qat_epochs = 3 if qat_epochs is None else qat_epochs
    (xtr, ytr), (xte, yte) = data()
    xte = jnp.asarray(xte)

    float_model = make_model(Mode.FLOAT, frozen_bn=False)  # BN on batch statistics
    variables = float_model.init(jax.random.key(0), xtr[:1])
    variables = train(float_model, variables, xtr, ytr, epochs, 1e-2)
    # From now on BN uses (and no longer updates) its running statistics.
    acc = {"float": accuracy(make_model(Mode.FLOAT).apply(variables, xte), yte)}

    batches = [xtr[i : i + 256] for i in range(0, len(xtr), 256)]
    ptq, _ = ql.calibrate(make_model(Mode.CALIBRATE), variables, batches, progress=False)
    frozen_model = make_model(Mode.FROZEN)
    acc["PTQ int8 (served)"] = accuracy(qjax.convert((frozen_model, ptq), xte[:1])(xte), yte)

    qat = train(make_model(Mode.QAT), ptq, xtr, ytr, qat_epochs, 1e-3, seed=1)
    frozen = jax.jit(frozen_model.apply)(qat, xte)
    acc["QAT int8 (frozen fake-quant)"] = accuracy(frozen, yte)

    served = qjax.convert((frozen_model, qat), xte[:1], scheme="fbgemm")
    return finish(acc, frozen, served(xte), yte)


if __name__ == "__main__":
    main()
