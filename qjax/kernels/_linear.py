"""Integer linear layer: int8 x int8 -> int32 ``dot_general``, then a named requant.

Accumulator rule (one for every path): ``acc[..., n] = Σ_k (x[..., k] - zp_x)·(w[k, n] -
zp_w[n])``, exact in int32, then :func:`~qjax.kernels.requantize` with the chosen scheme.

Layout: ``x`` is ``(..., K)``, the weight ``(K, N)`` (``(in, out)``, as Flax's ``Dense``
kernel; torch's ``(out, in)`` is its transpose), per-tensor or per-output-channel
(``axis=1``) qparams; the output is ``(..., N)``.

How ``acc`` is computed (``accumulate="exact"``, the default):

* signed int8 activations go to ``lax.dot_general`` as they are;
* unsigned (uint8) activations are shifted to int8 first, exactly:
  ``x' = x - 128`` (a bit flip, ``x ^ 0x80``) and ``zp_x' = zp_x - 128``. XLA's CPU dot
  for uint8 operands is 33-65x slower than for int8, so uint8 never reaches it;
* a one-row dot (batch 1) gets a zero row appended and sliced off again
  (``_accumulate._MIN_DOT_ROWS``): XLA:CPU's one-row int8 dot is about 2x slower than a
  two-row one;
* the zero points are folded in afterwards with precomputed sums:
  ``acc = Σ x'w - zp_x'·Σ_k w - zp_w·Σ_k x' + K·zp_x'·zp_w``, where ``Σ_k w`` per output
  channel is computed once by :func:`prepare_linear` and the ``zp_w`` terms are dropped
  when the weight zero points are known to be 0 (symmetric int8 weights).

``accumulate="fbgemm_sat16"`` reproduces FBGEMM on CPUs without AVX512-VNNI (rule 14):
raw uint8 codes times int8 weights in adjacent pairs along K, each pair sum saturated to
int16: ``acc = Σ_j sat16(x[2j]·w[2j] + x[2j+1]·w[2j+1]) - zp_x·Σw`` (plus the ``zp_w``
terms above). It differs from the exact sum only when a pair exceeds the int16 range,
which needs activation codes above 127. ``accumulate="onednn_sat16"`` is oneDNN's
``vpmaddubsw`` path on the same CPUs (torch's ``onednn`` engine): for a linear layer the
same pairs along K, so the same integers (measured: 0 of 5,120 differ from FBGEMM's at
``ONEDNN_MAX_CPU_ISA=AVX2``); the two names differ for convolutions
(:mod:`qjax.kernels._conv`). Which engine saturates at which CPU level is one table,
:mod:`qjax.kernels._levels`.

Overflow. The int32 accumulator is exact as long as ``K·max|x - zp_x|·max|w - zp_w|``
and ``K·128·max|w|`` (the shifted dot) stay below ``2^31``; :func:`prepare_linear`
checks this when the layer is built (with the actual weight codes when they are
concrete, the spec's bounds otherwise) and raises with the layer's name.

Kernel. ``prepare_linear(w, kernel="amx")`` (opt-in, x86-64 CPUs with AMX-INT8) packs
the weight once into AMX tiles and ``accumulate="exact"`` then computes ``Σ x'w`` with
the native FFI kernel (:mod:`qjax.kernels._native`) instead of ``lax.dot_general``;
every other step above is unchanged, so the codes are the same. With ``scheme``
``"fbgemm"``/``"qnnpack"`` and weight zero points known to be 0, one fused native call
(``qjax_amx_q8_gemm``) also does the zero-point correction and the requantize epilogue
on each accumulator tile, uint8 codes taken as they are (:mod:`qjax.kernels._native._fused`:
the same operations in the same order, so again the same codes). Off CPU the program
uses ``lax.dot_general`` (same integers). A ``jax.export`` of such a program contains
the custom call ``qjax_amx_s8_gemm`` (``qjax_amx_q8_gemm`` when fused): export refuses
it unless the caller disables that check
(``jax.export.DisabledSafetyCheck.custom_call(name)``), and
the result runs only in a process where qjax has registered the target on an AMX CPU.
``prepare_linear(w, kernel="sat16")`` packs the weight for the native AVX2/AVX-512
kernel (:mod:`qjax.kernels._native._sat16`) and the saturating accumulations then
compute ``Σ_j sat16(...)`` with ``vpmaddubsw`` itself, one FFI call ``qjax_sat16_gemm``:
the same integers as :func:`~qjax.kernels._accumulate._sat16_pair_dot`, 100x and more
faster. It also records the largest uint8 code for which no pair sum of the weight
saturates (``sat16_max_x``, :func:`~qjax.kernels._accumulate.sat16_exact_max_x`, at
least 128 for any int8 weight): exact accumulation runs on the same kernel, uint8 codes
(signed ones shifted up by 128, as for oneDNN) giving the exact ``Σ x'w``, whenever the
activation spec's codes stay within it (7-bit activations, torch's ``reduce_range``,
always do), and on XLA otherwise. Export refuses it likewise (its location names
``kernel='xla'``). ``prepare_linear(w, kernel="onednn")`` (the optional oneDNN library,
CPUs with VNNI or AMX) reorders the weight once into oneDNN's preferred layout and
``accumulate="exact"`` then takes ``Σ x'w`` from oneDNN's matmul, one FFI call
``qjax_onednn_u8s8_matmul`` (:mod:`qjax.kernels._native._onednn`) on uint8 codes:
unsigned activations as they are, signed ones shifted up, ``x' = x + 128`` (a bit flip)
and ``zp_x' = zp_x + 128``; the zero-point terms above and the requantization are the
same XLA code, so the codes are the same. Export refuses it likewise.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from .._qarray import QArray
from .._spec import QParams
from . import _native
from ._accumulate import (
    _I32_MAX,
    Accumulate,
    _int8_dot,
    _sat16_pair_dot,
    _u8_dot,
    check_accumulator,
    check_operands,
    sat16_exact_max_x,
    sat16_widened,
)
from ._prepared import _KERNELS, SAT16_SAFE_X, Kernel, register_prepared
from ._requant import Scheme, clamp_activation, dequantize_accumulator, requantize

__all__ = ["Accumulate", "Kernel", "PreparedLinear", "prepare_linear", "quantized_linear"]


@register_prepared(
    leaves=("weight", "col_sum"),
    static=("name", "max_abs_x", "zero_point_is_zero"),
    packed_when=lambda kernel: kernel != "xla",  # amx, sat16 and onednn pack
    serialized_name="qjax.kernels.PreparedLinear",
)
@dataclasses.dataclass(frozen=True)
class PreparedLinear:
    """Weights of an integer linear layer, prepared once by :func:`prepare_linear`.

    Leaves: ``weight`` (a :class:`~qjax.QArray`, int8 ``(K, N)``) and ``col_sum``
    (int32 ``(N,)``, ``Σ_k w[k, n]`` of the raw codes). Static: ``name`` (used in error
    messages), ``max_abs_x`` (the largest ``|x - zp_x|`` the overflow check allowed for)
    and ``zero_point_is_zero`` (the weight zero points are known to be 0, so the
    ``zp_w`` correction terms are left out of the program). With ``kernel="amx"`` a
    third leaf ``packed`` holds the weight codes in AMX tile order
    (:func:`qjax.kernels._native.pack_weight`), with ``kernel="sat16"`` in the order of
    the saturating kernel (:func:`qjax.kernels._native.pack_sat16_weight`), with
    ``kernel="onednn"`` as oneDNN's bytes (:func:`qjax.kernels._native.pack_onednn_weight`);
    ``kernel="xla"`` has none. ``sat16_max_x`` (static, with ``kernel="sat16"``): the
    largest uint8 activation code for which no int16 pair sum of this weight saturates
    (:func:`~qjax.kernels._accumulate.sat16_exact_max_x`), so the exact accumulation may
    run on the saturating kernel for activations up to it.
    """

    weight: QArray
    col_sum: jax.Array
    name: str = "linear"
    max_abs_x: int = 255
    zero_point_is_zero: bool = False
    packed: jax.Array | None = None
    kernel: str = "xla"
    epilogue: tuple | None = None  # folded requantization (fold_requant), with its key
    folded: tuple | None = None
    sat16_max_x: int = 128  # kernel "sat16": its pair sums are exact for codes up to this

    @property
    def in_features(self) -> int:
        return self.weight.shape[0]

    @property
    def out_features(self) -> int:
        return self.weight.shape[1]


def prepare_linear(
    w: QArray, *, name: str = "linear", max_abs_x: int = 255, kernel: Kernel = "xla"
) -> PreparedLinear:
    """Check an int8 ``(K, N)`` weight once and precompute its per-channel sums.

    Checks: int8 codes (signed 8-bit spec), rank 2, qparams per-tensor or along the
    output axis 1, the :class:`~qjax.QArray` invariants, and that the int32 accumulator
    cannot overflow: ``K·max_abs_x·max|w - zp_w| <= 2^31 - 1`` and ``K·128·max|w| <=
    2^31 - 1``, with the actual codes when ``w`` is concrete. Traced weights (inside
    ``jit``) are checked against the spec's bounds instead, and their zero points are
    not assumed to be 0 (the correction terms are kept).

    Args:
      w: the weight, ``(in, out)``.
      name: layer name for error messages.
      max_abs_x: the largest ``|x - zp_x|`` inputs may have (255 covers any 8-bit
        activation with any zero point; 128 covers symmetric int8).
      kernel: ``"xla"`` (default, ``lax.dot_general``), ``"amx"`` (native AMX int8
        GEMM on the packed weight, same integers; raises ``RuntimeError`` with the
        reason when unavailable, see :func:`qjax.kernels.native_status`) or ``"sat16"``
        (the native saturating kernel for ``accumulate="fbgemm_sat16"``/``"onednn_sat16"``,
        same integers as the XLA formulation; exact accumulation runs on its saturating
        instructions where no pair sum can saturate, see ``sat16_max_x``, else on its
        exact mode, the codes widened to int16 pairs; raises
        ``RuntimeError`` when unavailable, see :func:`qjax.kernels.sat16_status`) or
        ``"onednn"`` (oneDNN's int8 matmul on the reordered weight, same integers;
        ``RuntimeError`` unless :func:`qjax.kernels.onednn_exact` says it is exact
        here; ``K <= 65793``, so that the uint8 sum ``K·255·128`` fits int32).

    Returns:
      a :class:`PreparedLinear` (a pytree).

    >>> from qjax import QuantSpec, QParams
    >>> spec = QuantSpec(signed=True, symmetric=True, axis=1)
    >>> w = QArray(jnp.array([[1, -2], [3, 4]], jnp.int8),
    ...            QParams(jnp.array([0.1, 0.2]), jnp.array([0, 0]), spec))
    >>> prepare_linear(w).col_sum
    Array([4, 2], dtype=int32)
    >>> big = QArray(jnp.full((70_000, 2), 127, jnp.int8), w.qparams)
    >>> prepare_linear(big, name="fc1")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
      ...
    ValueError: layer 'fc1': the int32 accumulator could overflow: K=70000 ...
    """
    if kernel not in _KERNELS:
        raise ValueError(f"layer {name!r}: kernel must be one of {_KERNELS}, got {kernel!r}")
    if isinstance(w, PreparedLinear):
        if kernel != "xla" and w.kernel != kernel:
            return prepare_linear(w.weight, name=w.name, max_abs_x=w.max_abs_x, kernel=kernel)
        return w
    if not isinstance(w, QArray):
        raise TypeError(f"layer {name!r}: weight must be a QArray, got {type(w).__name__}")
    if kernel == "amx":
        _native.require_amx(name)
    elif kernel == "sat16":
        _native.require_sat16(name)
    elif kernel == "onednn":
        _native.require_onednn(name)
    spec = w.spec
    if spec.dtype != np.int8:
        raise TypeError(
            f"layer {name!r}: integer linear needs int8 weights, got {spec.dtype} "
            f"({spec.bits}-bit {'signed' if spec.signed else 'unsigned'} spec)"
        )
    if w.ndim != 2:
        raise ValueError(f"layer {name!r}: weight must be (in, out), got shape {w.shape}")
    if spec.granularity == "group" or (
        spec.granularity == "axis" and spec.normalized_axes(2) != (1,)
    ):
        raise ValueError(
            f"layer {name!r}: weight qparams must be per-tensor or per output channel "
            f"(axis=1 of the (in, out) weight), got axis={spec.axis}, "
            f"group_size={spec.group_size}"
        )
    w.validate()
    k = w.shape[0]
    vals = w.values
    zp_zero = check_accumulator(
        w, k, max_abs_x, name, hint="split K or narrow the ranges", what=f"K={k}"
    )
    if kernel == "onednn" and k * 255 * 128 > _I32_MAX:
        raise ValueError(
            f"layer {name!r}: kernel='onednn' sums uint8 codes up to 255, K={k} · 255 · 128 > "
            "2^31 - 1 could overflow the int32 accumulator; use kernel='xla'"
        )
    col_sum = jnp.sum(vals.astype(jnp.int32), axis=0)
    packed = None
    if kernel == "amx":
        packed = _native.pack_weight(vals)
    elif kernel == "sat16":
        packed = _native.pack_sat16_weight(vals)
    elif kernel == "onednn":
        packed = _native.pack_onednn_weight(vals)
    sat_x = sat16_exact_max_x(vals) if kernel == "sat16" else SAT16_SAFE_X
    return PreparedLinear(
        w, col_sum, name, int(max_abs_x), zp_zero, packed, kernel, sat16_max_x=sat_x
    )


def quantized_linear(
    x: QArray,
    w: PreparedLinear | QArray,
    bias: jax.Array | None,
    out_qparams: QParams,
    *,
    scheme: Scheme = "fbgemm",
    activation: Literal["relu", "relu6", "hardtanh"] | None = None,
    bounds: tuple[float, float] | None = None,
    accumulate: Accumulate = "exact",
    name: str | None = None,
) -> QArray:
    """Integer ``y = requant(x @ w + b)``: int8 x int8 -> int32 dot, then ``scheme``.

    The accumulator is the exact ``Σ_k (x - zp_x)(w - zp_w)`` (module docstring), bias
    and rounding follow the requantization ``scheme`` (:data:`~qjax.kernels.SCHEMES`),
    ``activation="relu"`` clamps the output codes below at the output zero point;
    ``"relu6"`` and ``"hardtanh"`` (``bounds=(min, max)``, real values) clamp them as
    torch's quantized ``relu6`` / ``hardtanh`` on the output do
    (:func:`~qjax.kernels.clamp_activation`).

    Args:
      x: ``(..., K)`` activations, int8 or uint8, per-tensor qparams.
      w: a :class:`PreparedLinear` (preferred: prepared once) or an int8 ``(K, N)``
        :class:`~qjax.QArray` (prepared on each call).
      bias: float32 ``(N,)`` or ``None``.
      out_qparams: per-tensor output qparams; their spec sets the output dtype.
        ``None``: no output quantizer, the float32 output
        :func:`~qjax.kernels.dequantize_accumulator` ``f32(acc)·f32(s_x·s_w) + b``.
      scheme: ``"fbgemm"`` (PyTorch x86/fbgemm), ``"qnnpack"``, ``"onednn"``,
        ``"tflite"``, ``"tflite_single_rounding"``, ``"litert_ref"``, ``"litert"`` or
        ``"exact"``.
      activation: ``None``, ``"relu"``, ``"relu6"`` or ``"hardtanh"``.
      bounds: ``(min, max)`` for ``"hardtanh"``.
      accumulate: ``"exact"``, ``"fbgemm_sat16"`` or ``"onednn_sat16"`` (both uint8
        activations only; the same pairs in a linear layer).
      name: layer name for errors (defaults to the prepared weight's).

    Returns:
      a :class:`~qjax.QArray` ``(..., N)`` with ``out_qparams``.

    >>> from qjax import QuantSpec, QParams
    >>> x = QArray(jnp.array([[130, 120, 128]], jnp.uint8),
    ...            QParams(0.1, 128, QuantSpec(signed=False)))
    >>> w = QArray(jnp.array([[10, -5], [20, 5], [7, 7]], jnp.int8),
    ...            QParams(0.05, 0, QuantSpec(signed=True, symmetric=True)))
    >>> out = QParams(0.02, 128, QuantSpec(signed=False))
    >>> y = quantized_linear(x, prepare_linear(w), jnp.array([0.0, 0.13]), out)
    >>> y.values  # 0.2·0.5 - 0.8·1.0 = -0.7 and 0.2·-0.25 - 0.8·0.25 + 0.13 = -0.12
    Array([[ 93, 122]], dtype=uint8)
    """
    layer = name if name is not None else getattr(w, "name", "linear")
    pw = prepare_linear(w, name=layer)
    if name is not None and name != pw.name:
        pw = dataclasses.replace(pw, name=name)
    if not isinstance(x, QArray):
        raise TypeError(f"layer {layer!r}: x must be a QArray, got {type(x).__name__}")
    unsigned = check_operands(x, out_qparams, pw.max_abs_x, accumulate, activation, layer)
    k, n = pw.in_features, pw.out_features
    if x.ndim < 1 or x.shape[-1] != k:
        raise ValueError(
            f"layer {layer!r}: x of shape {x.shape} does not fit a ({k}, {n}) weight "
            f"(last dimension must be {k})"
        )
    _native.check_folded(pw, x, bias, out_qparams, scheme, activation, accumulate, layer)
    # sat16, exact: the saturating instructions where no pair sum can saturate (prepare
    # time proof), else the kernel's widened exact products (8-bit codes)
    wide = pw.kernel == "sat16" and sat16_widened(x.spec, pw.sat16_max_x, accumulate)
    sums = _u8_dot if wide else _sat16_pair_dot  # the kernel's sums in XLA, off CPU
    if _native.fusable(pw, x, bias, out_qparams, scheme, accumulate):
        # one native call: dot + zero-point correction + requantize (same codes)
        relu = activation == "relu"
        codes = _native.fused_linear_codes(x, pw, bias, out_qparams, scheme, relu, sums, wide)
        try:
            return QArray(clamp_activation(codes, out_qparams, activation, bounds), out_qparams)
        except (TypeError, ValueError) as e:
            raise type(e)(f"layer {layer!r}: {e}") from None
    wq = pw.weight
    zx = jnp.asarray(x.zero_point).astype(jnp.int32).reshape(())
    zw = jnp.asarray(wq.zero_point).astype(jnp.int32)  # () or (N,)
    if accumulate == "exact" and pw.kernel in ("onednn", "sat16"):
        # oneDNN and sat16 take uint8 codes: signed ones shifted up, x + 128, by a bit flip
        if unsigned:
            xv = x.values
        else:
            xv = lax.bitcast_convert_type(x.values ^ jnp.int8(-128), jnp.uint8)
            zx = zx + jnp.int32(128)
        if pw.kernel == "sat16":  # the exact Σ x·w
            acc = _native.sat16_dot(xv, pw.packed, wq.values, sums, exact=wide)
        else:
            acc = _native.onednn_dot(xv, pw.packed, wq.values)
    elif accumulate == "exact":
        if unsigned:  # x - 128 as int8: flip the top bit, reinterpret
            xv = lax.bitcast_convert_type(x.values ^ jnp.uint8(0x80), jnp.int8)
            zx = zx - jnp.int32(128)
        else:
            xv = x.values
        if pw.kernel == "amx":
            acc = _native.amx_dot(xv, pw.packed, wq.values)
        else:
            acc = _int8_dot(xv, wq.values)
    else:
        xv = x.values
        if pw.kernel == "sat16":
            acc = _native.sat16_dot(xv, pw.packed, wq.values, _sat16_pair_dot)
        else:
            acc = _sat16_pair_dot(xv, wq.values)
    acc = acc - zx * pw.col_sum
    if not pw.zero_point_is_zero:
        row_sum = jnp.sum(xv.astype(jnp.int32), axis=-1, keepdims=True)
        acc = acc - zw * row_sum + jnp.int32(k) * zx * zw
    scale_w = wq.scale if wq.spec.granularity == "axis" else jnp.reshape(wq.scale, ())
    if out_qparams is None:  # no output quantizer: the float layer output
        y = dequantize_accumulator(
            acc, scale_x=jnp.reshape(x.scale, ()), scale_w=scale_w, bias=bias
        )
        return jnp.moveaxis(y, -1, 1) if False else y
    try:
        codes = requantize(
            acc,
            scale_x=jnp.reshape(x.scale, ()),
            scale_w=scale_w,
            out=out_qparams,
            bias=bias,
            activation="relu" if activation == "relu" else None,
            scheme=scheme,
        )
        codes = clamp_activation(codes, out_qparams, activation, bounds)
    except (TypeError, ValueError) as e:
        raise type(e)(f"layer {layer!r}: {e}") from None
    return QArray(codes, out_qparams)
