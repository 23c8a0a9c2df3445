"""The digits CNN of ``qjax demo`` and the examples: data split, model, training, timing.

sklearn's bundled 8x8 digits (no download), an ``nnx.Sequential`` CNN (QuantStub,
Conv-BN-ReLU x2 with BN folded as torch's ``ConvBnReLU2d``, 2x2 max pool, flatten,
dense, DeQuantStub), the minibatch order and an Adam training loop with a progress bar.
``examples/_digits.py`` re-exports these so the demo and the examples train alike.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ..flax import QuantConfig
from ..flax import nnx as qnnx

__all__ = [
    "accuracy",
    "copy_float_weights",
    "data",
    "interleaved",
    "make_model",
    "minibatches",
    "progress",
    "train",
]


def data(seed: int = 0):
    """sklearn's 8x8 digits as float32 ``(N, 8, 8, 1)`` images in [0, 1] and int32 labels,
    split 80/20 after a seeded shuffle: ``((x_train, y_train), (x_test, y_test))``.

    >>> (xtr, ytr), (xte, yte) = data()
    >>> xtr.shape, xte.shape, xtr.dtype, ytr.dtype, float(xtr.max())
    ((1437, 8, 8, 1), (360, 8, 8, 1), dtype('float32'), dtype('int32'), 1.0)
    """
    from sklearn.datasets import load_digits

    d = load_digits()
    x = (d.images / 16.0).astype(np.float32)[..., None]
    y = d.target.astype(np.int32)
    idx = np.random.default_rng(seed).permutation(len(x))
    split = int(0.8 * len(x))
    return (x[idx[:split]], y[idx[:split]]), (x[idx[split:]], y[idx[split:]])


def minibatches(n: int, epochs: int, seed: int = 0, size: int = 64):
    """Index arrays of ``size`` (last partial batch dropped), reshuffled every epoch.

    >>> [b.tolist() for b in minibatches(5, 1, size=2)]
    [[2, 4], [3, 0]]
    """
    rng = np.random.default_rng(seed)
    for _ in range(epochs):
        order = rng.permutation(n)
        for i in range(0, n - size + 1, size):
            yield order[i : i + size]


def accuracy(logits, y) -> float:
    """Fraction of rows whose argmax over the last axis equals the label.

    >>> accuracy(np.array([[0.1, 0.9], [0.8, 0.2]]), np.array([1, 1]))
    0.5
    """
    return float((np.asarray(logits).argmax(-1) == np.asarray(y)).mean())


def make_model(rngs: nnx.Rngs, config: QuantConfig) -> nnx.Sequential:
    """The digits CNN: ``(N, 8, 8, 1)`` float32 -> ``(N, 10)`` float32 logits.

    QuantStub, QuantConvBn(1->16, 3x3, ReLU), QuantConvBn(16->32, 3x3, ReLU), MaxPool
    2x2, Flatten (H, W, C order), QuantLinear(512->10), DeQuantStub; every quantized
    layer uses ``config``.

    >>> from qjax.flax import default_qconfig
    >>> m = make_model(nnx.Rngs(0), default_qconfig("x86"))
    >>> qnnx.set_mode(m, "float")
    >>> m(jnp.zeros((2, 8, 8, 1))).shape
    (2, 10)
    """
    return nnx.Sequential(
        qnnx.QuantStub(config),
        qnnx.QuantConvBn(1, 16, (3, 3), config=config, relu=True, rngs=rngs),
        qnnx.QuantConvBn(16, 32, (3, 3), config=config, relu=True, rngs=rngs),
        qnnx.MaxPool((2, 2)),
        qnnx.Flatten(),
        qnnx.QuantLinear(4 * 4 * 32, 10, config=config, rngs=rngs),
        qnnx.DeQuantStub(),
    )


def copy_float_weights(src: nnx.Module, dst: nnx.Module) -> None:
    """Copy the parameters and BN running statistics of ``src`` into ``dst`` (same layers,
    possibly another ``QuantConfig``); observer statistics are left alone.

    >>> from qjax.flax import default_qconfig, default_qat_qconfig
    >>> a = make_model(nnx.Rngs(0), default_qconfig("x86"))
    >>> b = make_model(nnx.Rngs(1), default_qat_qconfig("x86"))
    >>> copy_float_weights(a, b)
    >>> bool((a.layers[5].kernel[...] == b.layers[5].kernel[...]).all())
    True
    """
    nnx.update(dst, nnx.state(src, nnx.Any(nnx.Param, nnx.BatchStat)))


def progress(it, total: int | None, desc: str, enabled: bool = True):
    """``it`` wrapped in a tqdm bar (as ``calibrate`` shows one) when tqdm is installed.

    >>> list(progress(range(3), 3, "x", enabled=False))
    [0, 1, 2]
    """
    if not enabled:
        return it
    try:
        from tqdm.auto import tqdm
    except ImportError:  # optional: no bar, same work
        return it
    return tqdm(it, total=total, desc=desc, leave=False)


def train(model, x, y, epochs: int, lr: float, *, seed: int = 0, desc="train", bar=True):
    """Adam on softmax cross-entropy over :func:`minibatches` of 64; returns the last loss.

    The model trains in whatever mode it is in (``Mode.FLOAT`` for float training,
    ``Mode.QAT`` for fine-tuning).
    """
    import optax

    opt = nnx.Optimizer(model, optax.adam(lr), wrt=nnx.Param)

    @nnx.jit
    def step(model, opt, xb, yb):
        def loss_fn(m):
            return optax.softmax_cross_entropy_with_integer_labels(m(xb), yb).mean()

        loss, grads = nnx.value_and_grad(loss_fn)(model)
        opt.update(model, grads)
        return loss

    total = epochs * (len(x) // 64)
    loss = float("nan")
    for b in progress(minibatches(len(x), epochs, seed), total, desc, bar):
        loss = step(model, opt, jnp.asarray(x[b]), jnp.asarray(y[b]))
    return float(loss)


def _block(out):
    return jax.tree.map(lambda a: a.block_until_ready() if hasattr(a, "block_until_ready") else a,
                        out)  # fmt: skip


def interleaved(
    fns: dict[str, Callable[[], object]],
    repeats: int = 20,
    warmup: int = 3,
    block: int = 1,
    settle: float = 0.0,
):
    """Median seconds of each zero-argument callable, timed alternately ``repeats`` times
    (interleaving spreads machine noise evenly, so ratios are stable), ``block``
    consecutive timed calls per turn, after untimed calls for ``settle`` seconds
    (contenders whose threads spin after a call, torch's OpenMP, ORT's or qjax's helpers
    by default, hold the cores for a while: torch's OpenMP worker ~6 ms on the 2-core
    AMD EPYC host, during which the next contender runs on one core; ``settle`` lets it
    pass, so each contender is timed in its steady state, as in a serving loop).

    >>> sorted(interleaved({"a": lambda: 1, "b": lambda: 2}, repeats=2, warmup=1, block=2))
    ['a', 'b']
    """
    for _ in range(warmup):
        for fn in fns.values():
            _block(fn())
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            while time.perf_counter() - start < settle:
                _block(fn())
            for _ in range(block):
                t0 = time.perf_counter()
                _block(fn())
                times[name].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}
