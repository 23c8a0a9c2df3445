"""Shared by the digits CNN examples (``cnn_digits.py`` for NNX, ``cnn_digits_linen.py``
for Linen): the data split, the minibatch order and the accuracy table, so that both
front-ends train on the same batches and report the same way."""

import numpy as np
from sklearn.datasets import load_digits


def data(seed=0):
    """sklearn's 8x8 digits as float32 ``(N, 8, 8, 1)`` images in [0, 1] and int32 labels,
    split 80/20 after a seeded shuffle: ``((x_train, y_train), (x_test, y_test))``."""
    d = load_digits()
    x = (d.images / 16.0).astype(np.float32)[..., None]
    y = d.target.astype(np.int32)
    idx = np.random.default_rng(seed).permutation(len(x))
    split = int(0.8 * len(x))
    return (x[idx[:split]], y[idx[:split]]), (x[idx[split:]], y[idx[split:]])


def minibatches(n, epochs, seed=0, size=64):
    """Index arrays of ``size`` (last partial batch dropped), reshuffled every epoch."""
    rng = np.random.default_rng(seed)
    for _ in range(epochs):
        order = rng.permutation(n)
        for i in range(0, n - size + 1, size):
            yield order[i : i + size]


def accuracy(logits, y):
    """Fraction of rows whose argmax over the last axis equals the label."""
    return float((np.asarray(logits).argmax(-1) == y).mean())


def finish(acc, frozen, served, y):
    """Add the served QAT accuracy to ``acc``, assert served == frozen QAT exactly, print
    the table; returns ``acc`` with ``compared`` and ``mismatches``."""
    frozen, served = np.asarray(frozen), np.asarray(served)
    acc["QAT int8 (served)"] = accuracy(served, y)
    mismatches = int((served != frozen).sum())
    assert mismatches == 0, f"served != frozen QAT in {mismatches} of {served.size} outputs"
    width = max(len(k) for k in acc)
    print(f"test accuracy on sklearn digits ({len(y)} images), CNN conv-BN-ReLU x2")
    for k, v in acc.items():
        print(f"  {k:{width}s}  {100 * v:5.1f}%")
    print(f"served int8 == frozen QAT: {served.size} outputs, {mismatches} mismatches")
    acc["compared"], acc["mismatches"] = served.size, mismatches
    return acc
