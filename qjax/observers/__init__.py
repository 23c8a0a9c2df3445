"""Observers: pure functions over pytree state that turn data into qparams.

See :mod:`qjax.observers._base` for the protocol.
"""

from ._base import Health as Health
from ._base import Observer as Observer
from ._base import finite_minmax as finite_minmax
from ._base import health as health
from ._base import report as report
from ._histogram import HistogramState as HistogramState
from ._histogram import histogram as histogram
from ._minmax import MinMaxState as MinMaxState
from ._minmax import ema_minmax as ema_minmax
from ._minmax import minmax as minmax
from ._minmax import per_channel_ema_minmax as per_channel_ema_minmax
from ._minmax import per_channel_minmax as per_channel_minmax
from ._search import SearchState as SearchState
from ._search import mse as mse
from ._search import percentile as percentile

__all__ = [
    "Health",
    "HistogramState",
    "MinMaxState",
    "Observer",
    "SearchState",
    "ema_minmax",
    "finite_minmax",
    "health",
    "histogram",
    "minmax",
    "mse",
    "per_channel_ema_minmax",
    "per_channel_minmax",
    "percentile",
    "report",
]
