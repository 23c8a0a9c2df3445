"""Quantization-aware training layers for ``flax.linen`` (a thin shell over the core).

Observer statistics live in the ``quant_stats`` collection, never in ``params``:
``model.init`` allocates them with their final shapes; a training step that observes
(``Mode.CALIBRATE``/``Mode.QAT``) runs ``model.apply(variables, x,
mutable=["quant_stats"])`` and keeps the returned collection, as with ``batch_stats``.
The init call itself does not update statistics (as ``nn.BatchNorm``). Mode and
per-layer switches (``observe``, ``fake_quant``) are module attributes; the layers also
take ``mode=`` at call time.

Hooks into stock layers: ``nn.Dense(..., dot_general_cls=functools.partial(
QuantDotGeneral, config=cfg))`` and ``nn.Conv(..., conv_general_dilated_cls=
functools.partial(QuantConvGeneralDilated, config=cfg))``; as in NNX they quantize the
input and the kernel only (not the output, which gets its bias after the hook). A
hook's mode is an attribute of the partial, so switching modes means rebuilding the
model with another partial (Linen has no way to reach ``nn.Dense``'s inner submodule).

Convenience layers: :class:`QuantDense`, :class:`QuantConv`, :class:`QuantConvBn`
(BN folded as torch's ``ConvBn2d``, running statistics in ``batch_stats``),
:class:`ActQuant`, :class:`QuantStub`, :class:`DeQuantStub`. Post-training
calibration: :func:`calibrate`; before ``Mode.FROZEN``: :func:`require_statistics`.

The modules by topic (NNX's package :mod:`qjax.flax.nnx` has the same files):

- :mod:`~qjax.flax.linen._layers`: the hooks and the QAT layers (``quant_stats``);
- :mod:`~qjax.flax.linen._rules`: :class:`QuantRules` (also ``nn.DenseGeneral``,
  ``nn.Einsum``, ``nn.Embed``, so ``nn.MultiHeadDotProductAttention``: fake-quant /
  QAT only, no int8 serving yet);
- :mod:`~qjax.flax.linen._transformer`: :class:`QuantEinsum`, :class:`QuantEmbed`;
- :mod:`~qjax.flax.linen._lifecycle`: :func:`calibrate`, :func:`require_statistics`,
  :func:`check_statistics`, :func:`init_qparams_from_stats`;
- :mod:`~qjax.flax.linen._ptq`: :class:`DynamicQuantDense`, :class:`WeightOnlyDense`
  and their ``quantized`` collection;
- :mod:`~qjax.flax.linen._learnable`: :class:`LearnableQuantDense` (LSQ / PACT);
- :mod:`~qjax.flax.linen._ops`: :class:`QuantAdd`, :class:`QuantCat`;
- pooling (:class:`MaxPool`, :class:`AvgPool`, :class:`Flatten`) from
  :mod:`qjax.flax._pooling`.
"""

from .._pooling import LinenAvgPool as AvgPool
from .._pooling import LinenFlatten as Flatten
from .._pooling import LinenMaxPool as MaxPool
from ._layers import COLLECTION as COLLECTION
from ._layers import ActQuant as ActQuant
from ._layers import DeQuantStub as DeQuantStub
from ._layers import QuantConv as QuantConv
from ._layers import QuantConvBn as QuantConvBn
from ._layers import QuantConvGeneralDilated as QuantConvGeneralDilated
from ._layers import QuantDense as QuantDense
from ._layers import QuantDotGeneral as QuantDotGeneral
from ._layers import QuantStub as QuantStub
from ._learnable import LearnableQuantDense as LearnableQuantDense
from ._lifecycle import calibrate as calibrate
from ._lifecycle import check_statistics as check_statistics
from ._lifecycle import init_qparams_from_stats as init_qparams_from_stats
from ._lifecycle import require_statistics as require_statistics
from ._ops import QuantAdd as QuantAdd
from ._ops import QuantCat as QuantCat
from ._ptq import QUANTIZED as QUANTIZED
from ._ptq import DynamicQuantDense as DynamicQuantDense
from ._ptq import WeightOnlyDense as WeightOnlyDense
from ._ptq import dynamic_variables as dynamic_variables
from ._ptq import weight_only_variables as weight_only_variables
from ._rules import QuantRules as QuantRules
from ._transformer import QuantEinsum as QuantEinsum
from ._transformer import QuantEmbed as QuantEmbed

__all__ = [
    "QUANTIZED",
    "ActQuant",
    "AvgPool",
    "DeQuantStub",
    "DynamicQuantDense",
    "Flatten",
    "LearnableQuantDense",
    "MaxPool",
    "QuantAdd",
    "QuantCat",
    "QuantConv",
    "QuantConvBn",
    "QuantConvGeneralDilated",
    "QuantDense",
    "QuantDotGeneral",
    "QuantEinsum",
    "QuantEmbed",
    "QuantRules",
    "QuantStub",
    "WeightOnlyDense",
    "calibrate",
    "check_statistics",
    "dynamic_variables",
    "init_qparams_from_stats",
    "require_statistics",
    "weight_only_variables",
]
