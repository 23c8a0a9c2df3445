"""qjax's helper threads (``threads.h``): how long they spin between calls.

A ``kernel="onednn"`` call of at least 2^22 multiply-adds, a ``"sat16"`` one of 2^24
(either from 2^18 while helpers spin) shares its items with qjax's helper threads (one
per further core, at most 3; each native library has its own). After a
call a helper spins ``QJAX_SPIN_US`` microseconds (read once, when the kernel library
loads; default 100, 0 sleeps at once) for the next call's items before it sleeps: the
next layer of a forward, or the next forward, then needs no thread wake-up (the int8 MLP
784-1024-1024-10 on the 2-core AMD EPYC host, Zen 5: batch 32 124 against 93 µs, batch 1
44 against 33 µs with the lower threshold). It is the trade torch's OpenMP makes by
default (its threads spin after each op unless ``OMP_WAIT_POLICY=PASSIVE``), for a tenth
of a millisecond of one core at most after a forward.
"""

from __future__ import annotations

import os

__all__ = ["SPIN_US_DEFAULT", "spin_us"]

SPIN_US_DEFAULT = 100


def spin_us(environ=None) -> int:
    """How long (µs) a helper thread spins for the next call before it sleeps:
    ``QJAX_SPIN_US``, an integer from 0 to 1,000,000, default 100 (module docstring).

    >>> spin_us({}), spin_us({"QJAX_SPIN_US": "0"}), spin_us({"QJAX_SPIN_US": "250"})
    (100, 0, 250)
    """
    env = os.environ if environ is None else environ
    raw = env.get("QJAX_SPIN_US", "").strip()
    if not raw:
        return SPIN_US_DEFAULT
    try:
        us = int(raw)
    except ValueError:
        us = -1
    if not 0 <= us <= 1_000_000:
        raise ValueError(
            f"QJAX_SPIN_US={raw!r}: want an integer number of microseconds from 0 to "
            f"1000000 (default {SPIN_US_DEFAULT}; 0: helper threads sleep after each call)"
        )
    return us
