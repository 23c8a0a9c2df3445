"""The host-side calibration loop shared by the NNX and Linen shells (PTQ).

``run_batches(step, batches, ...)`` calls ``step(batch)`` for each batch, shows a tqdm
progress bar when tqdm is installed and ``progress=True`` (tqdm is optional: without
it there is no bar, and the numbers are the same), and returns how many batches ran.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable
from typing import Any


def run_batches(
    step: Callable[[Any], None],
    batches: Iterable,
    *,
    max_batches: int | None = None,
    progress: bool = True,
    desc: str = "calibrate",
) -> int:
    """Call ``step`` on each batch (at most ``max_batches``); return the count.

    Raises ``ValueError`` when there is no batch at all (a model that saw no data has no
    statistics).

    >>> seen = []
    >>> run_batches(seen.append, range(5), max_batches=3, progress=False), seen
    (3, [0, 1, 2])
    """
    if max_batches is not None and (not isinstance(max_batches, int) or max_batches < 1):
        raise ValueError(f"max_batches must be a positive int or None, got {max_batches!r}")
    it = iter(batches)
    if max_batches is not None:
        it = itertools.islice(it, max_batches)
    total = max_batches
    if total is None and hasattr(batches, "__len__"):
        total = len(batches)
    if progress:
        try:
            from tqdm.auto import tqdm
        except ImportError:  # optional dependency: no bar, same results
            pass
        else:
            it = tqdm(it, total=total, desc=desc, unit="batch", leave=False)
    n = 0
    for batch in it:
        step(batch)
        n += 1
    if n == 0:
        raise ValueError(f"{desc}: got no batches; the observers need data")
    return n
