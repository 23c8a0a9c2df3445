"""Integer kernels: exact int32 accumulation and named requantization schemes.

* :func:`requantize` and :data:`SCHEMES` (``"fbgemm"``, ``"qnnpack"``, ``"onednn"``,
  ``"tflite"``, ``"tflite_single_rounding"``, ``"litert_ref"``, ``"litert"``, ``"exact"``):
  int32 accumulator -> codes;
* :func:`prepare_linear` / :func:`quantized_linear`: int8 x int8 -> int32 linear layer
  (``kernel="amx"``: an opt-in native Intel AMX GEMM, see :func:`native_status`;
  ``kernel="sat16"``: the native AVX2/AVX-512 kernel for the int16-saturating accumulations,
  see :func:`sat16_status`; ``kernel="onednn"``: oneDNN's int8 matmul, an optional
  library, see :func:`onednn_status` and :func:`onednn_exact`);
* :func:`prepare_conv` / :func:`quantized_conv`: int8 x int8 -> int32 1-D/2-D convolution
  (``kernel="onednn"`` on oneDNN's brgemm ukernel too);
* :func:`fold_requant`: a native layer's requantization coefficients of static qparams
  computed once, at prepare time (one native call per layer and call);
* :func:`quantized_add` (engines fbgemm/x86/onednn/qnnpack), :func:`quantized_mul`,
  :func:`quantized_mul_scalar`, :func:`quantized_cat`, :func:`relu`/:func:`relu6`/
  :func:`hardtanh` on codes, :func:`max_pool2d`/:func:`avg_pool2d`/
  :func:`adaptive_avg_pool2d`, :func:`flatten`/:func:`reshape`,
  :func:`quantize_input`/:func:`dequantize_output`, :func:`quantized_batch_norm`
  (bit-exact with torch's quantized ops);
* :func:`host_level`, :func:`engine`, :data:`LEVELS`: the CPU levels torch's int8
  kernels run at and, per engine and level, which scheme and accumulation reproduce
  them (the one table, :mod:`qjax.kernels._levels`);
* the TFLite fixed-point building blocks (:func:`quantize_multiplier`,
  :func:`multiply_by_quantized_multiplier`, ...), integer-only.

Inputs and outputs are :class:`qjax.QArray` (``qjax._qarray``).
"""

from .._qarray import QArray as QArray
from ._accumulate import Accumulate as Accumulate
from ._conv import ConvActivation as ConvActivation
from ._conv import PreparedConv as PreparedConv
from ._conv import prepare_conv as prepare_conv
from ._conv import quantized_conv as quantized_conv
from ._elementwise import AddScheme as AddScheme
from ._elementwise import dequantize_output as dequantize_output
from ._elementwise import flatten as flatten
from ._elementwise import hardtanh as hardtanh
from ._elementwise import quantize_input as quantize_input
from ._elementwise import quantized_add as quantized_add
from ._elementwise import quantized_cat as quantized_cat
from ._elementwise import quantized_mul as quantized_mul
from ._elementwise import quantized_mul_scalar as quantized_mul_scalar
from ._elementwise import relu as relu
from ._elementwise import relu6 as relu6
from ._elementwise import reshape as reshape
from ._fixed_point import multiply_by_quantized_multiplier as multiply_by_quantized_multiplier
from ._fixed_point import (
    multiply_by_quantized_multiplier_litert as multiply_by_quantized_multiplier_litert,
)
from ._fixed_point import (
    multiply_by_quantized_multiplier_litert_ref as multiply_by_quantized_multiplier_litert_ref,
)
from ._fixed_point import (
    multiply_by_quantized_multiplier_single_rounding as multiply_by_quantized_multiplier_single_rounding,  # noqa: E501
)
from ._fixed_point import quantize_multiplier as quantize_multiplier
from ._fixed_point import rounding_divide_by_pot as rounding_divide_by_pot
from ._fixed_point import (
    saturating_rounding_doubling_high_mul as saturating_rounding_doubling_high_mul,
)
from ._fold import fold_requant as fold_requant
from ._levels import LEVELS as LEVELS
from ._levels import Engine as Engine
from ._levels import engine as engine
from ._levels import host_level as host_level
from ._levels import level_env as level_env
from ._linear import PreparedLinear as PreparedLinear
from ._linear import prepare_linear as prepare_linear
from ._linear import quantized_linear as quantized_linear
from ._native import native_status as native_status
from ._native import onednn_exact as onednn_exact
from ._native import onednn_provider as onednn_provider
from ._native import onednn_status as onednn_status
from ._native import sat16_status as sat16_status
from ._norm import quantized_batch_norm as quantized_batch_norm
from ._pool import PoolScheme as PoolScheme
from ._pool import adaptive_avg_pool2d as adaptive_avg_pool2d
from ._pool import avg_pool2d as avg_pool2d
from ._pool import max_pool2d as max_pool2d
from ._prepared import Kernel as Kernel
from ._requant import Activation as Activation
from ._requant import activation_bounds as activation_bounds
from ._requant import dequantize_accumulator as dequantize_accumulator
from ._requant import requantize as requantize
from ._schemes import SCHEMES as SCHEMES
from ._schemes import Scheme as Scheme
from ._schemes import requant_exact as requant_exact
from ._schemes import requant_fbgemm as requant_fbgemm
from ._schemes import requant_litert as requant_litert
from ._schemes import requant_litert_ref as requant_litert_ref
from ._schemes import requant_onednn as requant_onednn
from ._schemes import requant_qnnpack as requant_qnnpack
from ._schemes import requant_tflite as requant_tflite
from ._schemes import requant_tflite_single_rounding as requant_tflite_single_rounding

__all__ = [
    "LEVELS",
    "SCHEMES",
    "Accumulate",
    "Activation",
    "AddScheme",
    "ConvActivation",
    "Engine",
    "Kernel",
    "PoolScheme",
    "PreparedConv",
    "PreparedLinear",
    "QArray",
    "Scheme",
    "activation_bounds",
    "adaptive_avg_pool2d",
    "avg_pool2d",
    "dequantize_output",
    "engine",
    "flatten",
    "hardtanh",
    "host_level",
    "level_env",
    "max_pool2d",
    "multiply_by_quantized_multiplier",
    "multiply_by_quantized_multiplier_litert",
    "multiply_by_quantized_multiplier_litert_ref",
    "multiply_by_quantized_multiplier_single_rounding",
    "native_status",
    "onednn_exact",
    "onednn_provider",
    "onednn_status",
    "prepare_conv",
    "prepare_linear",
    "fold_requant",
    "quantize_input",
    "quantize_multiplier",
    "quantized_add",
    "quantized_batch_norm",
    "quantized_cat",
    "quantized_conv",
    "quantized_linear",
    "quantized_mul",
    "quantized_mul_scalar",
    "relu",
    "relu6",
    "sat16_status",
    "requant_exact",
    "requant_fbgemm",
    "requant_litert",
    "requant_litert_ref",
    "requant_onednn",
    "requant_qnnpack",
    "requant_tflite",
    "requant_tflite_single_rounding",
    "dequantize_accumulator",
    "requantize",
    "reshape",
    "rounding_divide_by_pot",
    "saturating_rounding_doubling_high_mul",
]
