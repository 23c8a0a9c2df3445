"""Requantization schemes: int32 accumulator -> output integer codes, one formula each.

Every integer layer (linear, conv) ends the same way: an exact int32 accumulator
``acc = Σ (x - zp_x)(w - zp_w)`` has to become output codes of scale ``s_out`` and zero
point ``zp_out``, with the float bias ``b`` added and a fused clamp ``[lo, hi]`` (the
output range, raised to ``zp_out`` by a fused ReLU). The real value is
``(s_x·s_w·acc + b) / s_out``; the schemes differ only in *how* they round on the way.

Notation as in ``shared/NUMERICS.md``: ``f32(e)`` rounds to float32 (nearest even),
``rint`` rounds half to even, ``inv(s) = f32(1/s)``; ``clamp`` is to ``[lo, hi]``.

=============================  ==========================================================
scheme                         output code
=============================  ==========================================================
``"fbgemm"`` (rule 11)         ``ats = f32(s_x·s_w)``; ``M = f32(ats/s_out)``;
                               ``y = f32(acc) + f32(b·inv(ats))`` per-tensor weights,
                               ``y = f32(acc) + f32(b/ats)`` per-channel;
                               ``clamp(rint(f32(y·M)) + zp_out)``
``"qnnpack"`` (rule 12)        ``b_q = rint(f32(b·inv(f32(s_w·s_x))))`` (int32);
                               ``rs = f32(f32(s_w·s_x)·inv(s_out))``;
                               ``clamp(rint(f32(f32(acc + b_q)·rs)) + zp_out)``
``"onednn"`` (rule 13)         ``s' = inv(inv(s))`` for ``s_x, s_w``;
                               ``y = f32(f32(f32(f32(acc)·s_x')·s_w') + b)``;
                               ``clamp(rint(f32(f32(y·inv(s_out)) + zp_out)))``
``"tflite"`` (rule 19)         ``b_q = round_half_away(f32(b·inv(f32(s_x·s_w))))``;
                               ``(qm, shift) = QuantizeMultiplier(s_x·s_w/s_out)`` in
                               float64; ``clamp(MultiplyByQuantizedMultiplier(acc + b_q,
                               qm, shift) + zp_out)``, integer-only
``"tflite_single_rounding"``   the same with TFLite's single-rounding
                               ``(x·qm + 2^(30-shift)) >> (31-shift)``; both
                               ``"tflite"`` schemes are gemmlowp's/TFLite's source
                               formulas, which LiteRT's binaries do not run on ties
``"litert_ref"``               LiteRT's reference kernels (``BUILTIN_REF``): the same
                               ``b_q`` and ``(qm, shift)``, one rounding, ties away from
                               zero: ``round_half_away((acc + b_q)·qm·2^(shift-31))``
``"litert"``                   LiteRT's optimized x86 kernels (ruy): two roundings, ties
                               upward: ``t = ((x << left)·qm + 2^30) >> 31``,
                               ``(t + 2^(right-1)) >> right`` (``x = acc + b_q``,
                               ``left = max(shift, 0)``, ``right = max(-shift, 0)``)
``"exact"``                    ``clamp(rint((s_x·s_w·acc + b)/s_out) + zp_out)`` with
                               every value an exact rational (host callback; tests only)
=============================  ==========================================================

Dtypes: ``acc`` int32; ``bias`` float32 (or ``None`` = no bias, the same codes as a zero
bias in every scheme); scales float32; ``zero_point_out``, ``lo``, ``hi`` int32. Every
scheme function returns int32 codes in ``[lo, hi]``; :func:`~qjax.kernels.requantize`
(:mod:`qjax.kernels._requant`, the entry point that checks the operands and picks the
scheme by name) casts them to the output spec's dtype. Per-channel weight scales (and
the bias) must broadcast against ``acc`` — :func:`~qjax.kernels.requantize` reshapes
``(C,)`` vectors along ``channel_axis``; a
per-tensor ``scale_w`` is 0-d (that is what tells ``"fbgemm"`` which bias formula to use).

Notes on exactness. In ``"qnnpack"`` torch forms ``f64(s_w)·f64(s_x)`` before the
reciprocal; the exact product of two float32 numbers fits in float64's 53 bits, so
rounding it once to float32 equals the float32 product, which is what is computed here.
In ``"tflite"`` the bias reciprocal is ``f32(1.0/f64(f32(s_x·s_w)))`` in TFLite's
converter; double rounding of a quotient is innocuous from 53 to 24 bits, so it equals
the float32 division.

These roundings must survive compilation, and XLA would otherwise change them: its CPU (and GPU)
backends contract ``a·b + c`` into a fused multiply-add (skipping the rounding of
``a·b``; about 10 codes per million differ for ``"onednn"``), and its algebraic
simplifier turns ``x / broadcast(s)`` into ``x · (1/s)``, ``1/(1/s)`` into ``s`` and
``(x·c1)·c2`` into ``x·(c1·c2)``. Every step is defended (:func:`_m`, :func:`_div`,
:func:`_exact_addend`), so the codes are the separately rounded IEEE float32 operations
written above whether the scales are arguments or compile-time constants (tested both
ways). Assumed: scales and products of scales are normal float32 numbers above
``2^-100`` (no flush-to-zero territory).

Lowering. Each scheme is written as coefficients (every formula above that involves only
the scales, bias and output qparams: per channel or per tensor) and a per-element apply
on ``acc``; the coefficients are computed once per call in their own small pass
(:func:`_coefficients`), so the epilogue over ``acc`` fused after the int8 dot only
runs the per-element steps. The operations and their order are unchanged, and so are
the codes (``tests/test_int8_lowering.py``).

The ``"tflite"`` and ``"litert"`` schemes compute the multiplier in float64
(``jax.enable_x64`` locally, works under ``jit``) and everything after it in 32-bit
integer operations (the 64-bit products are built from 16-bit limbs), so the codes are
identical on every device. The two ``"litert"`` schemes were established bit for bit
against ``ai-edge-litert`` 2.3.0 on x86-64 (int8 FULLY_CONNECTED,
``tests/test_int8_litert.py``); multipliers ``M >= 2^30`` were not exercised there.
"""

from __future__ import annotations

import fractions
import math
from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np

from .._float import div_f32, div_ieee, exact_addend, materialize, pow2
from .._rounding import round_half_away
from ._fixed_point import (
    multiply_by_quantized_multiplier,
    multiply_by_quantized_multiplier_litert,
    multiply_by_quantized_multiplier_litert_ref,
    multiply_by_quantized_multiplier_single_rounding,
    quantize_multiplier,
)

__all__ = [
    "SCHEMES",
    "Scheme",
    "requant_exact",
    "requant_fbgemm",
    "requant_litert",
    "requant_litert_ref",
    "requant_onednn",
    "requant_qnnpack",
    "requant_tflite",
    "requant_tflite_single_rounding",
]

Scheme = Literal[
    "fbgemm",
    "qnnpack",
    "onednn",
    "tflite",
    "tflite_single_rounding",
    "litert_ref",
    "litert",
    "exact",
]

_I32_MIN = -(2**31)
_I32_MAX = 2**31 - 1
_F32_BELOW_2_31 = 2147483520.0  # largest float32 below 2^31


# --------------------------------------------------------------------------------------
# small exact helpers


def _f32(v) -> jax.Array:
    return jnp.asarray(v, jnp.float32)


def _i32(v) -> jax.Array:
    return jnp.asarray(v, jnp.int32)


# The exactness guards live in qjax._float (one implementation for all of qjax).
_m = materialize
_pow2 = pow2
_exact_addend = exact_addend
_div = div_f32
_div64_exact = div_ieee


def _per_channel(scale_w: jax.Array) -> bool:
    return jnp.ndim(scale_w) > 0


def _clamp_coefficients(zero_point, lo, hi):
    """``(zp, lo - zp, hi - zp)``, the clamp bounds as float32 (exact small integers)."""
    zp = _i32(zero_point)
    return zp, (_i32(lo) - zp).astype(jnp.float32), (_i32(hi) - zp).astype(jnp.float32)


def _clamp_apply(v: jax.Array, zp, flo, fhi) -> jax.Array:
    """``clamp(v + zp, lo, hi)`` for a float ``v`` holding an integer, as int32.

    The clamp happens in float against ``lo - zp`` and ``hi - zp``, so huge or infinite
    ``v`` saturate instead of wrapping.
    """
    return jnp.clip(v, flo, fhi).astype(jnp.int32) + zp


def _coefficients(coef_fn, bias, scale_x, scale_w, scale_out, zero_point_out, lo, hi, **kw):
    """Per-channel (or per-tensor) coefficients of a scheme, computed once, not per element.

    Every scheme is split into ``coef_fn`` (the float formulas on the scales and bias,
    sized like ``scale_w``/``bias``) and a per-element apply on ``acc``. Left alone, XLA
    fuses the cheap coefficient steps (casts, NaN guards, products) into the elementwise
    epilogue and recomputes them for every output element (2.5-6x the epilogue's time at
    256x1024, measured). ``lax.optimization_barrier`` does not stop that on XLA:CPU (it
    is expanded away before fusion); :func:`_hoist` does.
    """
    c = coef_fn(bias, scale_x, scale_w, scale_out, zero_point_out, lo, hi, **kw)
    return jax.tree.map(_hoist, c)


def _hoist(c: jax.Array) -> jax.Array:
    """``c`` unchanged, but computed in its own pass: ``c / one`` with an opaque ``one``.

    XLA does not fuse an expensive producer (a division) into a consumer that reads each
    of its elements many times (the broadcast over ``acc``), so the coefficient is
    materialized once. Floats: ``one = where(isnan(c), 2, 1)`` is 1 wherever it matters,
    so the IEEE quotient is ``c`` exactly (also ``±inf``, ``-0.0``, NaN). Integers:
    ``one = sign(c) | 1 = ±1`` and ``(c·one)/one = c`` (XLA defines ``INT_MIN/-1`` as
    ``INT_MIN``, and ``INT_MIN·-1`` wraps to ``INT_MIN``).
    """
    if c.size <= 1:
        return c  # a scalar is loop-invariant: the compiler computes it once anyway
    if jnp.issubdtype(c.dtype, jnp.floating):
        return c / jnp.where(jnp.isnan(c), jnp.asarray(2, c.dtype), jnp.asarray(1, c.dtype))
    one = (c >> (8 * c.dtype.itemsize - 1)) | jnp.asarray(1, c.dtype)
    return jax.lax.div(c * one, one)


def _f32_to_i32_saturate(v: jax.Array) -> jax.Array:
    """float32 holding an integer -> int32, saturating at the int32 range (C++ SafeCast)."""
    c = jnp.clip(v, jnp.float32(_I32_MIN), jnp.float32(_F32_BELOW_2_31)).astype(jnp.int32)
    return jnp.where(v >= jnp.float32(2.0**31), _i32(_I32_MAX), c)


# --------------------------------------------------------------------------------------
# float schemes (PyTorch engines)


def requant_fbgemm(acc, bias, scale_x, scale_w, scale_out, zero_point_out, lo, hi):
    """FBGEMM's requantization (rule 11): float bias, float32 multiplier.

    ``ats = f32(s_x·s_w)``, ``M = f32(ats/s_out)``; ``y = f32(acc) + f32(b·f32(1/ats))``
    for a per-tensor ``scale_w`` (0-d), ``y = f32(acc) + f32(b/ats)`` per-channel;
    ``out = clamp(rint(f32(y·M)) + zp_out, lo, hi)``. Bit-exact with torch's x86-engine
    linear and fbgemm-engine linear/conv.

    Args: ``acc`` int32; ``bias`` float32 broadcastable to ``acc`` or ``None``; scales
    float32; ``zero_point_out``, ``lo``, ``hi`` int32. Returns int32 codes in
    ``[lo, hi]``.

    >>> acc = jnp.array([-300, 0, 7, 10_000], jnp.int32)
    >>> requant_fbgemm(acc, None, jnp.float32(0.02), jnp.float32(0.01),
    ...                jnp.float32(0.05), 128, 0, 255)
    Array([127, 128, 128, 168], dtype=int32)
    """
    c = _coefficients(_coef_fbgemm, bias, scale_x, scale_w, scale_out, zero_point_out, lo, hi)
    return _apply_fbgemm(acc, *c)


def _coef_fbgemm(bias, scale_x, scale_w, scale_out, zero_point_out, lo, hi):
    ats = _m(_f32(scale_x) * _f32(scale_w))
    mult = _m(_div(ats, scale_out))
    if bias is None:
        b = None
    elif _per_channel(scale_w):
        b = _m(_div(bias, ats))
    else:
        b = _m(_f32(bias) * _m(_div(1.0, ats)))
    return (b, mult) + _clamp_coefficients(zero_point_out, lo, hi)


def _apply_fbgemm(acc, b, mult, zp, flo, fhi):
    y = _i32(acc).astype(jnp.float32)
    if b is not None:
        y = y + b
    return _clamp_apply(jnp.round(y * mult), zp, flo, fhi)


def requant_qnnpack(acc, bias, scale_x, scale_w, scale_out, zero_point_out, lo, hi):
    """QNNPACK's requantization (rule 12): int32 bias, float32 scale from reciprocals.

    ``b_q = rint(f32(b·f32(1/f32(s_w·s_x))))`` (saturated to int32);
    ``rs = f32(f32(s_w·s_x)·f32(1/s_out))``;
    ``out = clamp(rint(f32(f32(acc + b_q)·rs)) + zp_out, lo, hi)`` (``acc + b_q`` in int32).

    Args and result as :func:`requant_fbgemm`.

    >>> acc = jnp.array([-300, 0, 7, 10_000], jnp.int32)
    >>> requant_qnnpack(acc, jnp.float32(0.001), jnp.float32(0.02), jnp.float32(0.01),
    ...                 jnp.float32(0.05), 128, 0, 255)
    Array([127, 128, 128, 168], dtype=int32)
    """
    c = _coefficients(_coef_qnnpack, bias, scale_x, scale_w, scale_out, zero_point_out, lo, hi)
    return _apply_qnnpack(acc, *c)


def _coef_qnnpack(bias, scale_x, scale_w, scale_out, zero_point_out, lo, hi):
    prod = _m(_f32(scale_w) * _f32(scale_x))
    b_q = None
    if bias is not None:
        b_q = _f32_to_i32_saturate(jnp.round(_m(_f32(bias) * _m(_div(1.0, prod)))))
    rs = _m(prod * _m(_div(1.0, scale_out)))
    return (b_q, rs) + _clamp_coefficients(zero_point_out, lo, hi)


def _apply_qnnpack(acc, b_q, rs, zp, flo, fhi):
    a = _i32(acc)
    if b_q is not None:
        a = a + b_q
    return _clamp_apply(jnp.round(a.astype(jnp.float32) * rs), zp, flo, fhi)


def requant_onednn(acc, bias, scale_x, scale_w, scale_out, zero_point_out, lo, hi):
    """oneDNN's requantization as torch's onednn engine runs it (rule 13, emulation).

    ``s' = f32(1/f32(1/s))`` for ``s_x`` and ``s_w`` (torch hands oneDNN reciprocals);
    ``y = f32(f32(f32(acc)·s_x')·s_w')``, ``y = f32(y + b)``;
    ``out = clamp(rint(f32(f32(y·f32(1/s_out)) + zp_out)), lo, hi)`` (zero point added
    *before* rounding). oneDNN's kernels may order the float steps differently for some
    shapes: about 1-2 outputs per million differ by one code.

    Args and result as :func:`requant_fbgemm`.

    >>> acc = jnp.array([-300, 0, 7, 10_000], jnp.int32)
    >>> requant_onednn(acc, None, jnp.float32(0.02), jnp.float32(0.01),
    ...                jnp.float32(0.05), 128, 0, 255)
    Array([127, 128, 128, 168], dtype=int32)
    """
    c = _coefficients(_coef_onednn, bias, scale_x, scale_w, scale_out, zero_point_out, lo, hi)
    return _apply_onednn(acc, *c)


def _coef_onednn(bias, scale_x, scale_w, scale_out, zero_point_out, lo, hi):
    sx = _m(_div(1.0, _m(_div(1.0, scale_x))))
    sw = _m(_div(1.0, _m(_div(1.0, scale_w))))
    k = b = None
    if bias is not None:
        # Every nonzero y is at least f32(s_x'·s_w') = m·2^e (m in [1/2, 1)), so a
        # multiple of 2^(e-24): with k = 24 - e, y·2^k is an integer below 2^56.
        _, e = jnp.frexp(_m(sx * sw))
        k = jnp.clip(24 - e.astype(jnp.int32), -126, 126)
        k, b = (_pow2(k), _pow2(-k)), _f32(bias)
    inv_so = _m(_div(1.0, scale_out))
    zp = _i32(zero_point_out).astype(jnp.float32)
    return sx, sw, k, b, inv_so, zp, _i32(lo).astype(jnp.float32), _i32(hi).astype(jnp.float32)


def _apply_onednn(acc, sx, sw, k, b, inv_so, zp, flo, fhi):
    y = _m(_m(_i32(acc).astype(jnp.float32) * sx) * sw)
    if b is not None:
        # exact_addend(y, k) with the powers of two precomputed: y·2^k·2^-k, both exact
        y = jnp.round(y * k[0]) * k[1] + b
    p = _m(y * inv_so)
    # p is only rounded to a multiple of 2^-40 where |p| < 2^-17, which cannot change
    # rint(f32(p + zp)) for an integer zp (it stays within 2^-17 of zp).
    p = _exact_addend(p, 40)
    return jnp.clip(jnp.round(p + zp), flo, fhi).astype(jnp.int32)


def _tflite_bias(bias, scale_x, scale_w):
    """TFLite converter's int32 bias: ``round_half_away(f32(b·f32(1/f32(s_x·s_w))))``,
    saturated to ``±(2^31 - 1)``."""
    sf = _m(_f32(scale_x) * _f32(scale_w))
    inv = _m(jnp.where(sf == 0, jnp.float32(0.0), _div(1.0, sf)))
    b_q = _f32_to_i32_saturate(round_half_away(_m(_f32(bias) * inv)))
    return jnp.maximum(b_q, _i32(-_I32_MAX))


def _tflite_multiplier(scale_x, scale_w, scale_out, single_rounding):
    with jax.enable_x64(True):
        # s_x·s_w is exact in float64 (48 significant bits); the quotient is IEEE.
        p = _m(_f32(scale_x).astype(jnp.float64) * _f32(scale_w).astype(jnp.float64))
        so = jnp.broadcast_to(_f32(scale_out).astype(jnp.float64), p.shape)
        return quantize_multiplier(_div64_exact(p, so), single_rounding=single_rounding)


def requant_tflite(acc, bias, scale_x, scale_w, scale_out, zero_point_out, lo, hi):
    """TFLite/gemmlowp fixed point (rule 19): integer-only, identical on every device.

    ``b_q = round_half_away(f32(b·f32(1/f32(s_x·s_w))))`` (TFLite's bias quantization);
    ``(qm, shift) = quantize_multiplier(f64(s_x)·f64(s_w)/f64(s_out))``;
    ``out = clamp(multiply_by_quantized_multiplier(acc + b_q, qm, shift) + zp_out, lo, hi)``.

    Args and result as :func:`requant_fbgemm`.

    >>> acc = jnp.array([-300, 0, 7, 10_000], jnp.int32)
    >>> requant_tflite(acc, None, jnp.float32(0.02), jnp.float32(0.01),
    ...                jnp.float32(0.05), 128, 0, 255)
    Array([127, 128, 128, 168], dtype=int32)
    """
    return _tflite(acc, bias, scale_x, scale_w, scale_out, zero_point_out, lo, hi, False)


def requant_tflite_single_rounding(acc, bias, scale_x, scale_w, scale_out, zero_point_out, lo, hi):
    """TFLite with ``TFLITE_SINGLE_ROUNDING``: as :func:`requant_tflite`, but one rounding.

    ``out = clamp(((acc + b_q)·qm + 2^(30-shift)) >> (31-shift)) + zp_out, lo, hi)`` with
    ``quantize_multiplier(..., single_rounding=True)``.

    >>> acc = jnp.array([-300, 0, 7, 10_000], jnp.int32)
    >>> requant_tflite_single_rounding(acc, None, jnp.float32(0.02), jnp.float32(0.01),
    ...                                jnp.float32(0.05), 128, 0, 255)
    Array([127, 128, 128, 168], dtype=int32)
    """
    return _tflite(acc, bias, scale_x, scale_w, scale_out, zero_point_out, lo, hi, True)


def requant_litert_ref(acc, bias, scale_x, scale_w, scale_out, zero_point_out, lo, hi):
    """LiteRT's reference kernels (``BUILTIN_REF``): one rounding, ties away from zero.

    ``b_q`` and ``(qm, shift)`` as :func:`requant_tflite` (the multiplier saturated at
    ``shift = 30`` as ``quantize_multiplier(..., single_rounding=True)``);
    ``out = clamp(round_half_away((acc + b_q)·qm·2^(shift-31)) + zp_out, lo, hi)``,
    integer-only (:func:`multiply_by_quantized_multiplier_litert_ref`). Bit-exact with
    ``ai-edge-litert`` 2.3.0's int8 FULLY_CONNECTED reference kernel.

    Args and result as :func:`requant_fbgemm`.

    >>> acc = jnp.array([-300, 0, 7, 10_000], jnp.int32)
    >>> requant_litert_ref(acc, None, jnp.float32(0.02), jnp.float32(0.01),
    ...                    jnp.float32(0.05), 128, 0, 255)
    Array([127, 128, 128, 168], dtype=int32)
    """
    return _tflite(acc, bias, scale_x, scale_w, scale_out, zero_point_out, lo, hi, "litert_ref")


def requant_litert(acc, bias, scale_x, scale_w, scale_out, zero_point_out, lo, hi):
    """LiteRT's optimized x86 kernels (ruy): two roundings, both ties upward.

    ``b_q`` and ``(qm, shift)`` as :func:`requant_tflite`; with ``x = acc + b_q``,
    ``left = max(shift, 0)``, ``right = max(-shift, 0)``:
    ``t = ((x·2^left)·qm + 2^30) >> 31``, ``out = clamp(((t + 2^(right-1)) >> right) +
    zp_out, lo, hi)``, integer-only (:func:`multiply_by_quantized_multiplier_litert`).
    Bit-exact with ``ai-edge-litert`` 2.3.0's int8 FULLY_CONNECTED optimized kernel on
    x86-64 (other architectures run other code).

    Args and result as :func:`requant_fbgemm`.

    >>> acc = jnp.array([-300, 0, 7, 10_000], jnp.int32)
    >>> requant_litert(acc, None, jnp.float32(0.02), jnp.float32(0.01),
    ...                jnp.float32(0.05), 128, 0, 255)
    Array([127, 128, 128, 168], dtype=int32)
    """
    return _tflite(acc, bias, scale_x, scale_w, scale_out, zero_point_out, lo, hi, "litert")


# kind -> (multiply, quantize_multiplier's single_rounding)
_FIXED_POINT = {
    False: (multiply_by_quantized_multiplier, False),
    True: (multiply_by_quantized_multiplier_single_rounding, True),
    "litert_ref": (multiply_by_quantized_multiplier_litert_ref, True),
    "litert": (multiply_by_quantized_multiplier_litert, False),
}


def _tflite(acc, bias, scale_x, scale_w, scale_out, zero_point_out, lo, hi, single):
    c = _coefficients(
        _coef_tflite, bias, scale_x, scale_w, scale_out, zero_point_out, lo, hi, single=single
    )
    return _apply_tflite(acc, *c, single=single)


def _coef_tflite(bias, scale_x, scale_w, scale_out, zero_point_out, lo, hi, *, single):
    b_q = None if bias is None else _tflite_bias(bias, scale_x, scale_w)
    qm, shift = _tflite_multiplier(scale_x, scale_w, scale_out, _FIXED_POINT[single][1])
    zp = _i32(zero_point_out)
    return b_q, qm, shift, zp, _i32(lo) - zp, _i32(hi) - zp


def _apply_tflite(acc, b_q, qm, shift, zp, ilo, ihi, *, single):
    a = _i32(acc)
    if b_q is not None:
        a = a + b_q
    # The TFLite kernels clamp the int32 sum in 32 bits; saturate the zero-point add
    # so a huge value cannot wrap past the clamp.
    y = _FIXED_POINT[single][0](a, qm, shift)
    return jnp.clip(y, ilo, ihi) + zp


# --------------------------------------------------------------------------------------
# exact rational reference


def _fraction(v) -> fractions.Fraction:
    return fractions.Fraction(float(v))


def _exact_host(acc, bias, scale_x, scale_w, scale_out, zero_point_out, lo, hi):
    acc = np.asarray(acc, np.int64)
    sx = _fraction(np.float32(scale_x))
    so = _fraction(np.float32(scale_out))
    sw = np.asarray(scale_w, np.float32)
    b = np.zeros((), np.float32) if bias is None else np.asarray(bias, np.float32)
    shape = np.broadcast_shapes(sw.shape, b.shape)
    sw, b = np.broadcast_to(sw, shape), np.broadcast_to(b, shape)
    # y = (acc·u + v) / d per channel, u, v, d integers, d > 0.
    u = np.empty(shape, object)
    v = np.empty(shape, object)
    d = np.empty(shape, object)
    for idx in np.ndindex(shape):
        a = sx * _fraction(sw[idx]) / so
        c = _fraction(b[idx]) / so
        den = math.lcm(a.denominator, c.denominator)
        u[idx] = a.numerator * (den // a.denominator)
        v[idx] = c.numerator * (den // c.denominator)
        d[idx] = den
    num = acc.astype(object) * u + v
    q = num // d
    r2 = 2 * (num - q * d)
    q = q + ((r2 > d) | ((r2 == d) & (q % 2 == 1))).astype(object)  # half to even
    out = np.clip(
        q.astype(np.float64), float(lo) - float(zero_point_out), float(hi) - float(zero_point_out)
    )
    return (out.astype(np.int64) + int(zero_point_out)).astype(np.int32)


def requant_exact(acc, bias, scale_x, scale_w, scale_out, zero_point_out, lo, hi):
    """Correctly rounded reference: ``clamp(rint((s_x·s_w·acc + b)/s_out) + zp_out)``.

    Every input is taken as the exact rational it represents (float32 scales and bias),
    the real value is formed exactly and rounded once, half to even. Runs on the host
    (``jax.pure_callback``, works under ``jit``/``vmap``); meant for tests and reports.

    Args and result as :func:`requant_fbgemm`.

    >>> acc = jnp.array([-300, 0, 7, 10_000], jnp.int32)
    >>> requant_exact(acc, None, jnp.float32(0.02), jnp.float32(0.01),
    ...               jnp.float32(0.05), 128, 0, 255)
    Array([127, 128, 128, 168], dtype=int32)
    """
    acc = _i32(acc)
    args = [acc, _f32(scale_x), _f32(scale_w), _f32(scale_out), _i32(zero_point_out)]
    args += [_i32(lo), _i32(hi)]
    has_bias = bias is not None
    if has_bias:
        args.append(_f32(bias))

    def host(acc, sx, sw, so, zp, lo, hi, *b):
        return _exact_host(acc, b[0] if b else None, sx, sw, so, zp, lo, hi)

    out = jax.ShapeDtypeStruct(acc.shape, jnp.int32)
    return jax.pure_callback(host, out, *args, vmap_method="sequential")


# --------------------------------------------------------------------------------------
# registry

RequantFn = Callable[..., jax.Array]

SCHEMES: Mapping[str, RequantFn] = MappingProxyType(
    {
        "fbgemm": requant_fbgemm,
        "qnnpack": requant_qnnpack,
        "onednn": requant_onednn,
        "tflite": requant_tflite,
        "tflite_single_rounding": requant_tflite_single_rounding,
        "litert_ref": requant_litert_ref,
        "litert": requant_litert,
        "exact": requant_exact,
    }
)
"""Requantization schemes by name: ``fn(acc, bias, scale_x, scale_w, scale_out,
zero_point_out, lo, hi) -> int32 codes``."""
