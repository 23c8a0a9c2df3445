"""qjax: integer quantization for JAX, bit-exact with PyTorch where it claims to be.

Layers (each imports only from those before it): specs and qparams (``QuantSpec``,
``QParams``, ``qparams_from_minmax``) -> primitives (``quantize``, ``dequantize``,
``fake_quant``) -> ``qjax.observers`` -> ``qjax.kernels`` (``QArray``, the int8
engine's integer kernels and named requantization schemes) -> ``qjax.program`` (the
int8 ``Program`` of imported models) -> ``qjax.flax`` -> ``qjax.converters`` ->
``qjax.parity`` and ``qjax.debug`` (reports) -> ``qjax.cli`` and ``qjax.demo``.

``qjax.debug``, ``qjax.parity`` and ``qjax.converters`` load on first use (``import qjax``
does not import torch, matplotlib or the report code):

>>> import qjax
>>> qjax.parity.__name__
'qjax.parity'
"""

import importlib as _importlib

from . import kernels as kernels
from . import observers as observers
from ._primitives import dequantize as dequantize
from ._primitives import fake_quant as fake_quant
from ._primitives import quantize as quantize
from ._qarray import QArray as QArray
from ._qparams import qparams_from_minmax as qparams_from_minmax
from ._rounding import round_half_away as round_half_away
from ._rounding import round_half_even as round_half_even
from ._rounding import round_stochastic as round_stochastic
from ._spec import QParams as QParams
from ._spec import QuantSpec as QuantSpec
from .flax._convert import convert as convert
from .flax._served_io import load_served as load_served
from .flax._served_io import save_served as save_served
from .program import Program as Program

__version__ = "0.1.0"

# the report packages sit above the Flax stack and the converters: load them on first use
_LAZY = ("converters", "debug", "parity")


def __getattr__(name: str):
    if name in _LAZY:
        return _importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_LAZY))


__all__ = [
    "Program",
    "QArray",
    "QParams",
    "QuantSpec",
    "convert",
    "debug",
    "dequantize",
    "fake_quant",
    "kernels",
    "load_served",
    "observers",
    "parity",
    "qparams_from_minmax",
    "quantize",
    "round_half_away",
    "round_half_even",
    "round_stochastic",
    "save_served",
]
