"""Shared by the digits CNN examples (``cnn_digits.py`` for NNX, ``cnn_digits_linen.py``
for Linen): the data split, the minibatch order and the accuracy table, so that both
front-ends train on the same batches and report the same way."""

import numpy as np

# one implementation, shared with ``qjax demo``
from qjax.demo._data import accuracy, data, minibatches

__all__ = ["accuracy", "data", "finish", "minibatches"]


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
