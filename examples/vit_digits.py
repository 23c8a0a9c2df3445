"""A small Vision Transformer, trained float -> QAT, served as one int8 ``qjax.Program``.

Run: ``.venv/bin/python examples/vit_digits.py`` (``--quick`` for a few steps).
sklearn's bundled 8x8 digits (no download) and a ViT written as an NNX class::

    (N, 8, 8, 1) -> 2x2 patches -> 16 tokens of 4 pixels -> Linear(4->d) + position
    -> 2 x [x + MHA(LN(x)), x + fc2(GELU(fc1(LN(x))))] -> LN -> mean over tokens
    -> Linear(d->10)

1. float training (adam, batches of 64, dropout on);
2. ``quantize_model`` installs int8 hooks into the stock ``nnx.Linear`` layers and the
   four ``LinearGeneral`` projections of each ``nnx.MultiHeadAttention``
   (``qjax_recommended()``: int8 input per tensor, int8 weights per output channel),
   ``calibrate``;
3. QAT: fine-tune in ``Mode.QAT``;
4. ``Mode.FROZEN`` + ``model.eval()`` -> ``qjax.convert(model, x)``.

``qjax.convert`` traces ``__call__``: the patch embedding, the q/k/v/out projections,
the MLP layers and the head become int8 linear steps (int8 input x int8 weight -> int32,
float output ``f32(acc)·f32(s_x·s_w) + b``); LayerNorm, softmax, the attention matmuls
q·kᵀ and p·v, GELU, the residual adds, the position embedding and the mean over tokens
stay float and are listed in ``program.float_ops``. The config has ``scheme="fbgemm"``,
so in QAT and FROZEN the hooked layers already compute the int8 server's integer
formula: the served program returns *exactly* the frozen model's outputs under
``nnx.jit`` (counted on the whole test split and asserted 0).

The frozen model run *eagerly* may differ in a few outputs: XLA rounds the float
LayerNorm (and softmax, GELU) op by op differently from the compiled, fused program by
1-2 ulp, and where a LayerNorm output sits on a rounding boundary of the next layer's
input quantizer, one int8 code flips (the hooked layers themselves give identical
results eager and jitted on identical inputs). The example prints that count too.

Measured (default run: 1000 float + 200 QAT steps, d=32; AMD EPYC, 2 cores shared with
other jobs: ~45 s wall, ~1.6 s of it ``qjax.convert`` + serving)::

    float                          97.5%
    QAT int8 (frozen fake-quant)   98.3%
    served int8 (qjax.Program)     98.3%
    served != frozen (nnx.jit): 0 of 3600 outputs
    served != frozen (eager): 10 of 3600 outputs
"""

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from _digits import accuracy, data  # examples/_digits.py
from flax import nnx

import qjax
from qjax.flax import Mode, qjax_recommended
from qjax.flax import nnx as qnnx


class Block(nnx.Module):
    """Pre-LN encoder block: ``x + MHA(LN(x))``, then ``x + MLP(LN(x))``."""

    def __init__(self, d: int, rngs: nnx.Rngs, dropout: float = 0.1):
        self.ln1 = nnx.LayerNorm(d, rngs=rngs)
        self.attn = nnx.MultiHeadAttention(num_heads=4, in_features=d, decode=False, rngs=rngs)
        self.ln2 = nnx.LayerNorm(d, rngs=rngs)
        self.fc1 = nnx.Linear(d, 2 * d, rngs=rngs)
        self.fc2 = nnx.Linear(2 * d, d, rngs=rngs)
        self.drop = nnx.Dropout(dropout, rngs=rngs)

    def __call__(self, x):
        x = x + self.drop(self.attn(self.ln1(x)))
        return x + self.drop(self.fc2(jax.nn.gelu(self.fc1(self.ln2(x)))))


class DigitsViT(nnx.Module):
    """``(N, 8, 8, 1)`` float32 images -> ``(N, 10)`` float32 logits."""

    def __init__(self, rngs: nnx.Rngs, d: int = 32, depth: int = 2):
        self.embed = nnx.Linear(4, d, rngs=rngs)  # one 2x2 patch -> one token
        self.pos = nnx.Param(0.02 * jax.random.normal(rngs.params(), (1, 16, d)))
        self.blocks = nnx.List([Block(d, rngs) for _ in range(depth)])
        self.norm = nnx.LayerNorm(d, rngs=rngs)
        self.head = nnx.Linear(d, 10, rngs=rngs)

    def __call__(self, x):
        n = x.shape[0]
        # (N, 8, 8, 1) -> (N, 4, 2, 4, 2) -> (N, 4, 4, 2, 2) -> 16 tokens of 4 pixels
        p = x.reshape(n, 4, 2, 4, 2).transpose(0, 1, 3, 2, 4).reshape(n, 16, 4)
        h = self.embed(p) + self.pos[...]
        for block in self.blocks:
            h = block(h)
        return self.head(self.norm(h).mean(axis=1))


def train(model, x, y, steps: int, lr: float, seed: int) -> float:
    """Adam on softmax cross-entropy, ``steps`` random minibatches of 64."""
    sched = optax.cosine_decay_schedule(lr, max(steps, 1), alpha=0.05)
    opt = nnx.Optimizer(model, optax.adam(sched), wrt=nnx.Param)

    @nnx.jit
    def step(model, opt, xb, yb):
        def loss_fn(m):
            return optax.softmax_cross_entropy_with_integer_labels(m(xb), yb).mean()

        loss, grads = nnx.value_and_grad(loss_fn)(model)
        opt.update(model, grads)
        return loss

    rng = np.random.default_rng(seed)
    loss = float("nan")
    for _ in range(steps):
        b = rng.choice(len(x), 64, replace=False)
        loss = step(model, opt, jnp.asarray(x[b]), jnp.asarray(y[b]))
    return float(loss)


def main(steps: int = 1000, qat_steps: int = 200, d: int = 32) -> dict:
    t0 = time.perf_counter()
    (xtr, ytr), (xte, yte) = data()
    xte = jnp.asarray(xte)
    forward = nnx.jit(lambda m, x: m(x))

    model = DigitsViT(nnx.Rngs(0), d=d)
    model.train()  # dropout on
    train(model, xtr, ytr, steps, 3e-3, seed=0)
    model.eval()
    acc = {"float": accuracy(forward(model, xte), yte)}
    t_float = time.perf_counter() - t0

    # int8 hooks on the patch embedding, every attention projection (a rule matching the
    # MultiHeadAttention covers its query/key/value/out), the MLP layers and the head.
    cfg = qjax_recommended().replace(scheme="fbgemm")
    hooked = qnnx.quantize_model(model, [(r"embed|blocks/\d+/(attn|fc1|fc2)|head", cfg)])
    batches = [jnp.asarray(b) for b in np.array_split(xtr, 3)]  # 3 x 479: one compile
    qnnx.calibrate(model, batches, progress=False)  # observes in eval mode, ends FROZEN

    qnnx.set_mode(model, Mode.QAT)
    model.train()
    train(model, xtr, ytr, qat_steps, 5e-4, seed=1)
    qnnx.set_mode(model, Mode.FROZEN)
    model.eval()
    frozen = np.asarray(model(xte))
    frozen_jit = np.asarray(forward(model, xte))
    acc["QAT int8 (frozen fake-quant)"] = accuracy(frozen_jit, yte)
    t_qat = time.perf_counter() - t0 - t_float

    t1 = time.perf_counter()
    program = qjax.convert(model, xte)  # the layers' scheme (fbgemm)
    served = np.asarray(program(xte))
    t_convert = time.perf_counter() - t1
    assert isinstance(program, qjax.Program)
    acc["served int8 (qjax.Program)"] = accuracy(served, yte)
    differ_jit = int((served != frozen_jit).sum())
    differ = int((served != frozen).sum())

    linear = [k for k, layer in program.layers.items() if layer.op == "linear"]
    width = max(len(k) for k in acc)
    print(f"hooked layers: {len(hooked)}")
    print("int8 layers:", linear)
    print("float ops:", sorted(set(program.float_ops.values())))
    print(f"test accuracy on sklearn digits ({len(yte)} images), ViT d={d}, 2 blocks")
    for k, v in acc.items():
        print(f"  {k:{width}s}  {100 * v:5.1f}%")
    print(f"served != frozen (nnx.jit): {differ_jit} of {served.size} outputs")
    print(f"served != frozen (eager): {differ} of {served.size} outputs")
    print(f"time: float {t_float:.1f} s, calibrate + QAT + frozen {t_qat:.1f} s, "
          f"convert + serve {t_convert:.1f} s")  # fmt: skip
    assert differ_jit == 0, differ_jit  # bit for bit (eager: see the module docstring)
    return dict(acc, differ=differ, differ_jit=differ_jit, compared=served.size,
                int8_layers=linear)  # fmt: skip


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=1000, help="float steps (default 1000)")
    p.add_argument("--qat-steps", type=int, default=200, help="QAT steps (default 200)")
    p.add_argument("--d", type=int, default=32, choices=(32, 48), help="model width")
    p.add_argument("--quick", action="store_true", help="smoke test: 20 float + 5 QAT steps")
    a = p.parse_args()
    if a.quick:
        a.steps, a.qat_steps = 20, 5
    main(a.steps, a.qat_steps, a.d)
