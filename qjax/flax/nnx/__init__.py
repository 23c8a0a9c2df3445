"""Quantization-aware training layers for ``flax.nnx`` (a thin shell over the core).

Observer statistics live in :class:`QuantStat` variables, so
``nnx.state(model, QuantStat)`` selects them and ``nnx.Optimizer(model, tx,
wrt=nnx.Param)`` never sees them. The mode (:class:`~qjax.flax.Mode`) and the per-layer
switches are static attributes: changing them with :func:`set_mode`,
:func:`disable_observer`, ... retraces ``nnx.jit`` instead of reusing a stale program.

Two ways in, same numbers:

- **Hooks into stock layers.** ``nnx.Linear(..., dot_general=QuantDotGeneral(cfg,
  kernel_shape=(i, o)))`` and ``nnx.Conv(..., conv_general_dilated=QuantConvGeneral
  Dilated(cfg, kernel_shape=...))``: the hook is itself an ``nnx.Module`` holding the
  statistics, so it becomes a child of the Linear/Conv. Or :func:`quantize_model` sets
  the hooks on an existing model from path rules, also into the layers transformers
  use: ``nnx.LinearGeneral`` (so ``nnx.MultiHeadAttention``'s projections),
  ``nnx.Einsum`` (:class:`QuantEinsum`) and ``nnx.Embed`` (:class:`QuantEmbed`,
  weight-only), all served in int8 by ``qjax.convert`` (an Einsum whose equation is
  not a contraction with the kernel stays float, listed). A hook sees
  ``(inputs, kernel)`` only, before the bias: it quantizes the input activation and the
  weight, not the output (configs with ``quantize_output=True`` are refused; use the
  layers below). One hook instance per layer (a shared hook shares statistics).
- **Convenience layers**: :class:`QuantLinear`, :class:`QuantConv`,
  :class:`QuantConvBn` (BN folded as torch's ``ConvBn2d``, :func:`freeze_bn_stats`),
  :class:`ActQuant`, :class:`QuantStub`, :class:`DeQuantStub`, which also quantize
  outputs (PyTorch's eager convention, ``default_qat_qconfig``).

Post-training calibration: :func:`calibrate` (jitted, tqdm progress bar, batch count).
The hook path's limits: no output quantization, and ``nnx.Linear`` must be built with
(or given, via :func:`quantize_model`) one hook instance of its own.

The modules by topic (Linen's package :mod:`qjax.flax.linen` has the same files):

- :mod:`~qjax.flax.nnx._layers`: :class:`QuantStat`, the hooks and the QAT layers;
- :mod:`~qjax.flax.nnx._rules`: :func:`quantize_model`;
- :mod:`~qjax.flax.nnx._transformer`: :class:`QuantEinsum`, :class:`QuantEmbed`;
- :mod:`~qjax.flax.nnx._lifecycle`: :func:`set_mode`, the switches, :func:`calibrate`,
  :func:`check_statistics`, :func:`init_qparams_from_stats`;
- :mod:`~qjax.flax.nnx._ptq`: :class:`DynamicQuantLinear`, :class:`WeightOnlyLinear`;
- :mod:`~qjax.flax.nnx._learnable`: :class:`LearnableQuantLinear` (LSQ / PACT);
- :mod:`~qjax.flax.nnx._ops`: :class:`QuantAdd`, :class:`QuantCat`;
- pooling (:class:`MaxPool`, :class:`AvgPool`, :class:`Flatten`) from
  :mod:`qjax.flax._pooling`.
"""

from .._pooling import AvgPool as AvgPool
from .._pooling import Flatten as Flatten
from .._pooling import MaxPool as MaxPool
from ._layers import ActQuant as ActQuant
from ._layers import DeQuantStub as DeQuantStub
from ._layers import QuantConv as QuantConv
from ._layers import QuantConvBn as QuantConvBn
from ._layers import QuantConvGeneralDilated as QuantConvGeneralDilated
from ._layers import QuantDotGeneral as QuantDotGeneral
from ._layers import QuantLinear as QuantLinear
from ._layers import QuantStat as QuantStat
from ._layers import QuantStub as QuantStub
from ._layers import _QuantModule as _QuantModule
from ._learnable import LearnableQuantLinear as LearnableQuantLinear
from ._lifecycle import calibrate as calibrate
from ._lifecycle import check_statistics as check_statistics
from ._lifecycle import disable_fake_quant as disable_fake_quant
from ._lifecycle import disable_observer as disable_observer
from ._lifecycle import enable_fake_quant as enable_fake_quant
from ._lifecycle import enable_observer as enable_observer
from ._lifecycle import freeze_bn_stats as freeze_bn_stats
from ._lifecycle import init_qparams_from_stats as init_qparams_from_stats
from ._lifecycle import set_mode as set_mode
from ._lifecycle import unfreeze_bn_stats as unfreeze_bn_stats
from ._ops import QuantAdd as QuantAdd
from ._ops import QuantCat as QuantCat
from ._ptq import DynamicQuantLinear as DynamicQuantLinear
from ._ptq import QuantWeight as QuantWeight
from ._ptq import WeightOnlyLinear as WeightOnlyLinear
from ._rules import quantize_model as quantize_model
from ._transformer import QuantEinsum as QuantEinsum
from ._transformer import QuantEmbed as QuantEmbed

__all__ = [
    "ActQuant",
    "AvgPool",
    "DeQuantStub",
    "DynamicQuantLinear",
    "Flatten",
    "LearnableQuantLinear",
    "MaxPool",
    "QuantAdd",
    "QuantCat",
    "QuantConv",
    "QuantConvBn",
    "QuantConvGeneralDilated",
    "QuantDotGeneral",
    "QuantEinsum",
    "QuantEmbed",
    "QuantLinear",
    "QuantStat",
    "QuantStub",
    "QuantWeight",
    "WeightOnlyLinear",
    "calibrate",
    "check_statistics",
    "disable_fake_quant",
    "disable_observer",
    "enable_fake_quant",
    "enable_observer",
    "freeze_bn_stats",
    "init_qparams_from_stats",
    "quantize_model",
    "set_mode",
    "unfreeze_bn_stats",
]
