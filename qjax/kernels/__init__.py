"""Integer kernels: exact int32 accumulation and named requantization schemes.

* :func:`requantize` and :data:`SCHEMES` (``"fbgemm"``, ``"qnnpack"``, ``"onednn"``,
  ``"tflite"``, ``"tflite_single_rounding"``, ``"exact"``): int32 accumulator -> codes;
* :func:`prepare_linear` / :func:`quantized_linear`: int8 x int8 -> int32 linear layer;
* the TFLite fixed-point building blocks (:func:`quantize_multiplier`,
  :func:`multiply_by_quantized_multiplier`, ...), integer-only.

Inputs and outputs are :class:`qjax.QArray` (``qjax._qarray``).
"""

from .._qarray import QArray as QArray
from ._linear import Accumulate as Accumulate
from ._linear import PreparedLinear as PreparedLinear
from ._linear import prepare_linear as prepare_linear
from ._linear import quantized_linear as quantized_linear
from ._requant import SCHEMES as SCHEMES
from ._requant import Activation as Activation
from ._requant import Scheme as Scheme
from ._requant import activation_bounds as activation_bounds
from ._requant import multiply_by_quantized_multiplier as multiply_by_quantized_multiplier
from ._requant import (
    multiply_by_quantized_multiplier_single_rounding as multiply_by_quantized_multiplier_single_rounding,  # noqa: E501
)
from ._requant import quantize_multiplier as quantize_multiplier
from ._requant import requant_exact as requant_exact
from ._requant import requant_fbgemm as requant_fbgemm
from ._requant import requant_onednn as requant_onednn
from ._requant import requant_qnnpack as requant_qnnpack
from ._requant import requant_tflite as requant_tflite
from ._requant import requant_tflite_single_rounding as requant_tflite_single_rounding
from ._requant import requantize as requantize
from ._requant import rounding_divide_by_pot as rounding_divide_by_pot
from ._requant import (
    saturating_rounding_doubling_high_mul as saturating_rounding_doubling_high_mul,
)

__all__ = [
    "SCHEMES",
    "Accumulate",
    "Activation",
    "PreparedLinear",
    "QArray",
    "Scheme",
    "activation_bounds",
    "multiply_by_quantized_multiplier",
    "multiply_by_quantized_multiplier_single_rounding",
    "prepare_linear",
    "quantize_multiplier",
    "quantized_linear",
    "requant_exact",
    "requant_fbgemm",
    "requant_onednn",
    "requant_qnnpack",
    "requant_tflite",
    "requant_tflite_single_rounding",
    "requantize",
    "rounding_divide_by_pot",
    "saturating_rounding_doubling_high_mul",
]
