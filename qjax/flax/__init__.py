"""Flax layers for quantization-aware training: one functional core, two thin shells.

``qjax.flax.nnx`` (``flax.nnx``) and ``qjax.flax.linen`` (``flax.linen``) compute the
same numbers through :mod:`qjax.flax._core`; configs and the lifecycle are shared:

>>> from qjax.flax import Mode, default_qat_qconfig, qjax_recommended
>>> default_qat_qconfig("x86").compat, Mode.QAT.value
('torch_fused', 'qat')
"""

from . import linen as linen
from . import nnx as nnx
from ._config import EMAMinMax as EMAMinMax
from ._config import Histogram as Histogram
from ._config import MinMax as MinMax
from ._config import Mode as Mode
from ._config import QuantConfig as QuantConfig
from ._config import default_qat_qconfig as default_qat_qconfig
from ._config import default_qconfig as default_qconfig
from ._config import qjax_recommended as qjax_recommended
from ._core import LayerStats as LayerStats
from ._core import Switches as Switches

__all__ = [
    "EMAMinMax",
    "Histogram",
    "LayerStats",
    "MinMax",
    "Mode",
    "QuantConfig",
    "Switches",
    "default_qat_qconfig",
    "default_qconfig",
    "linen",
    "nnx",
    "qjax_recommended",
]
