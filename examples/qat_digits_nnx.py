"""PTQ vs QAT on sklearn's bundled digits with qjax.flax.nnx layers.

Run: ``.venv/bin/python examples/qat_digits_nnx.py``. Trains a 64-128-10 MLP in float
(``Mode.FLOAT``), then (1) post-training calibration (``calibrate`` -> ``Mode.FROZEN``)
and (2) quantization-aware fine-tuning (``Mode.QAT``, then ``FROZEN``), and prints the
test accuracy of each (the frozen models run fake-quant with the observers' qparams:
int8 weights per channel, int8 activations).
"""

import copy

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from sklearn.datasets import load_digits

from qjax.flax import Mode, qjax_recommended
from qjax.flax.nnx import QuantLinear, QuantStub, calibrate, set_mode


class MLP(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        cfg = qjax_recommended()
        self.stub = QuantStub(cfg)
        self.fc1 = QuantLinear(64, 128, config=cfg, rngs=rngs)
        self.fc2 = QuantLinear(128, 10, config=cfg, rngs=rngs)

    def __call__(self, x):
        return self.fc2(jax.nn.relu(self.fc1(self.stub(x))))


def data(seed=0):
    d = load_digits()
    x = (d.data / 16.0).astype(np.float32)
    y = d.target.astype(np.int32)
    idx = np.random.default_rng(seed).permutation(len(x))
    split = int(0.8 * len(x))
    return (x[idx[:split]], y[idx[:split]]), (x[idx[split:]], y[idx[split:]])


def train(model, x, y, epochs, lr, seed=0):
    opt = nnx.Optimizer(model, optax.adam(lr), wrt=nnx.Param)

    @nnx.jit
    def step(model, opt, xb, yb):
        def loss_fn(m):
            logits = m(xb)
            return optax.softmax_cross_entropy_with_integer_labels(logits, yb).mean()

        loss, grads = nnx.value_and_grad(loss_fn)(model)
        opt.update(model, grads)
        return loss

    rng = np.random.default_rng(seed)
    for _ in range(epochs):
        order = rng.permutation(len(x))
        for i in range(0, len(x) - 63, 64):
            b = order[i : i + 64]
            step(model, opt, jnp.asarray(x[b]), jnp.asarray(y[b]))


def accuracy(model, x, y):
    return float((np.asarray(jnp.argmax(model(jnp.asarray(x)), -1)) == y).mean())


def main(epochs: int = 15, qat_epochs: int = 3) -> dict:
    (xtr, ytr), (xte, yte) = data()
    model = MLP(nnx.Rngs(0))
    set_mode(model, Mode.FLOAT)
    train(model, xtr, ytr, epochs, 1e-2)
    acc = {"float": accuracy(model, xte, yte)}

    ptq = copy.deepcopy(model)
    batches = (jnp.asarray(xtr[i : i + 128]) for i in range(0, len(xtr), 128))
    calibrate(ptq, batches, progress=False)  # ends in Mode.FROZEN
    acc["PTQ int8 (fake-quant)"] = accuracy(ptq, xte, yte)

    qat = copy.deepcopy(ptq)
    set_mode(qat, Mode.QAT)
    train(qat, xtr, ytr, qat_epochs, 1e-3, seed=1)
    set_mode(qat, Mode.FROZEN)
    acc["QAT int8 (fake-quant)"] = accuracy(qat, xte, yte)

    width = max(len(k) for k in acc)
    print("test accuracy on sklearn digits (360 images)")
    for k, v in acc.items():
        print(f"  {k:{width}s}  {100 * v:5.1f}%")
    return acc


if __name__ == "__main__":
    main()
