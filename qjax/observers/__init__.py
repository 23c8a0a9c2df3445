"""Observers: pure functions over pytree state that turn data into qparams.

See :mod:`qjax.observers._base` for the protocol.
"""

from ._base import Health as Health
from ._base import Observer as Observer
from ._base import finite_minmax as finite_minmax
from ._base import health as health
from ._base import report as report

__all__ = ["Health", "Observer", "finite_minmax", "health", "report"]
