"""TFLite / gemmlowp / LiteRT fixed-point multiplication, integer-only.

``QuantizeMultiplier`` turns a real multiplier into ``(qm, shift)`` once per layer
(float64 under ``jax.enable_x64``); everything after that is 32-bit integer arithmetic,
the 64-bit products built from 16-bit limbs, so the results are identical on every
device. Used by the ``"tflite"``, ``"tflite_single_rounding"``, ``"litert_ref"`` and
``"litert"`` requantization schemes (:mod:`qjax.kernels._requant`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from .._rounding import round_half_away

_I32_MIN = -(2**31)
_I32_MAX = 2**31 - 1


def _i32(v) -> jax.Array:
    return jnp.asarray(v, jnp.int32)


def quantize_multiplier(real_multiplier, *, single_rounding: bool = False):
    """TFLite's ``QuantizeMultiplier``: ``M ≈ qm·2^(shift-31)`` with ``qm`` in Q0.31.

    ``(q, shift) = frexp(M)`` (``q`` in [0.5, 1)); ``qm = round_half_away(q·2^31)``;
    ``qm == 2^31 -> (qm/2, shift+1)``; ``shift < -31 -> (0, 0)`` (flush to zero);
    ``M == 0 -> (0, 0)``. With ``single_rounding`` also ``shift > 30 -> (2^31-1, 30)``.
    Computed in float64 (locally enabled, also under ``jit``).

    Args:
      real_multiplier: non-negative real multiplier(s), any float dtype (made float64).

    Returns:
      ``(qm, shift)``: int32 arrays of the input's shape.

    >>> quantize_multiplier(0.75)
    (Array(1610612736, dtype=int32), Array(0, dtype=int32))
    >>> quantize_multiplier(2.0 ** -40)
    (Array(0, dtype=int32), Array(0, dtype=int32))
    """
    with jax.enable_x64(True):
        m = jnp.asarray(real_multiplier).astype(jnp.float64)
        q, shift = jnp.frexp(m)
        qf = round_half_away(q * jnp.float64(2.0**31))
        carry = qf == jnp.float64(2.0**31)
        qf = jnp.where(carry, qf / 2, qf)
        shift = shift.astype(jnp.int32) + carry.astype(jnp.int32)
        flush = (shift < -31) | (m == 0)
        qf = jnp.where(flush, 0.0, qf)
        shift = jnp.where(flush, 0, shift)
        if single_rounding:
            sat = shift > 30
            qf = jnp.where(sat, jnp.float64(_I32_MAX), qf)
            shift = jnp.where(sat, 30, shift)
        return qf.astype(jnp.int32), shift.astype(jnp.int32)


def _u32(v) -> jax.Array:
    return jnp.asarray(v, jnp.uint32)


def _mul_wide_u32(a: jax.Array, b: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Full 64-bit product of two uint32 arrays as (high, low) uint32 words."""
    m16 = _u32(0xFFFF)
    al, ah = a & m16, a >> 16
    bl, bh = b & m16, b >> 16
    ll, lh, hl, hh = al * bl, al * bh, ah * bl, ah * bh
    mid = (ll >> 16) + (lh & m16) + (hl & m16)  # < 3·2^16: no overflow
    lo = (mid << 16) | (ll & m16)
    hi = hh + (lh >> 16) + (hl >> 16) + (mid >> 16)
    return hi, lo


def _mul_wide_s32(a: jax.Array, b: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Signed 64-bit product of two int32 arrays, two's complement (high, low) uint32."""
    ua = lax.bitcast_convert_type(_i32(a), jnp.uint32)
    ub = lax.bitcast_convert_type(_i32(b), jnp.uint32)
    hi, lo = _mul_wide_u32(ua, ub)
    zero = _u32(0)
    hi = hi - jnp.where(_i32(a) < 0, ub, zero) - jnp.where(_i32(b) < 0, ua, zero)
    return hi, lo


def _add_wide(hi, lo, c_hi, c_lo):
    """(hi, lo) + (c_hi, c_lo) modulo 2^64."""
    lo2 = lo + c_lo
    carry = (lo2 < lo).astype(jnp.uint32)
    return hi + c_hi + carry, lo2


def _sar_wide_to_i32(hi, lo, t):
    """``floor((hi:lo) / 2^t)`` as int32 for ``t`` in [1, 62] (the result must fit)."""
    t = _i32(t)
    ts = jnp.clip(t, 1, 31).astype(jnp.uint32)
    small = (lo >> ts) | (hi << (_u32(32) - ts))
    small = lax.bitcast_convert_type(small, jnp.int32)
    big = lax.bitcast_convert_type(hi, jnp.int32) >> jnp.clip(t - 32, 0, 31)
    return jnp.where(t < 32, small, big)


def saturating_rounding_doubling_high_mul(a, b):
    """gemmlowp ``SaturatingRoundingDoublingHighMul``: ``(a·b + nudge) / 2^31`` truncated.

    ``nudge = 2^30`` if ``a·b >= 0`` else ``1 - 2^30`` (round half up, in effect);
    ``a == b == -2^31 -> 2^31 - 1``. int32 in and out; the 64-bit product is formed
    from 16-bit limbs, so no int64 is needed.

    >>> saturating_rounding_doubling_high_mul(jnp.int32(3), jnp.int32(2**30))
    Array(2, dtype=int32)
    >>> saturating_rounding_doubling_high_mul(jnp.int32(-3), jnp.int32(2**30))
    Array(-1, dtype=int32)
    """
    a, b = _i32(a), _i32(b)
    hi, lo = _mul_wide_s32(a, b)
    neg = lax.bitcast_convert_type(hi, jnp.int32) < 0
    # nudge as a 64-bit two's complement value: 2^30 or 1 - 2^30.
    n_hi = jnp.where(neg, _u32(0xFFFFFFFF), _u32(0))
    n_lo = jnp.where(neg, _u32((1 - 2**30) % 2**32), _u32(2**30))
    hi, lo = _add_wide(hi, lo, n_hi, n_lo)
    floor = _sar_wide_to_i32(hi, lo, 31)
    n_neg = lax.bitcast_convert_type(hi, jnp.int32) < 0
    inexact = (lo & _u32(0x7FFFFFFF)) != 0
    trunc = floor + (n_neg & inexact).astype(jnp.int32)  # C++ division rounds to zero
    overflow = (a == _I32_MIN) & (b == _I32_MIN)
    return jnp.where(overflow, _i32(_I32_MAX), trunc)


def rounding_divide_by_pot(x, exponent):
    """gemmlowp ``RoundingDivideByPOT``: ``x / 2^exponent`` rounded half away from zero.

    ``exponent`` in [0, 31]; int32 in and out.

    >>> rounding_divide_by_pot(jnp.array([5, -5, 6, -6], jnp.int32), 1)
    Array([ 3, -3,  3, -3], dtype=int32)
    """
    x = _i32(x)
    e = _i32(exponent).astype(jnp.uint32)
    mask = (_u32(1) << e) - _u32(1)
    remainder = lax.bitcast_convert_type(x, jnp.uint32) & mask
    threshold = (mask >> 1) + (x < 0).astype(jnp.uint32)
    return (x >> _i32(exponent)) + (remainder > threshold).astype(jnp.int32)


def multiply_by_quantized_multiplier(x, quantized_multiplier, shift):
    """TFLite ``MultiplyByQuantizedMultiplier`` (double rounding, the reference kernels).

    ``RoundingDivideByPOT(SaturatingRoundingDoublingHighMul(x·2^max(shift,0), qm),
    max(-shift, 0))``; ``x·2^left`` wraps in int32 as in C. int32 in and out.

    Ties: ``-6·0.25 = -1.5 -> -2`` (half away); two roundings: ``5·0.25 = 1.25 -> 2``.

    >>> qm, sh = quantize_multiplier(0.25)
    >>> multiply_by_quantized_multiplier(jnp.array([6, -6, 5], jnp.int32), qm, sh)
    Array([ 2, -2,  2], dtype=int32)
    """
    shift = _i32(shift)
    left = jnp.maximum(shift, 0)
    right = jnp.maximum(-shift, 0)
    x_up = _i32(x) * (_i32(1) << left)
    return rounding_divide_by_pot(
        saturating_rounding_doubling_high_mul(x_up, quantized_multiplier), right
    )


def multiply_by_quantized_multiplier_single_rounding(x, quantized_multiplier, shift):
    """TFLite's single-rounding ``MultiplyByQuantizedMultiplier`` (TFLITE_SINGLE_ROUNDING).

    ``T = 31 - shift`` (``shift`` in [-31, 30]); ``(x·qm + 2^(T-1)) >> T`` with the
    product in 64 bits (16-bit limbs) and an arithmetic shift: round half up.
    Use with ``quantize_multiplier(..., single_rounding=True)``.

    >>> qm, sh = quantize_multiplier(0.25, single_rounding=True)
    >>> multiply_by_quantized_multiplier_single_rounding(
    ...     jnp.array([6, -6, 5], jnp.int32), qm, sh)
    Array([ 2, -1,  1], dtype=int32)
    """
    return _single_rounding(x, quantized_multiplier, shift, ties_away=False)


def multiply_by_quantized_multiplier_litert_ref(x, quantized_multiplier, shift):
    """LiteRT reference kernels' requantizing multiply: one rounding, ties away from zero.

    ``T = 31 - shift`` (``shift`` in [-31, 30]);
    ``round_half_away(x·qm / 2^T) = (x·qm + 2^(T-1) - [x·qm < 0]) >> T`` with the
    product in 64 bits (16-bit limbs) and an arithmetic shift. int32 in and out; use
    with ``quantize_multiplier(..., single_rounding=True)``.

    >>> qm, sh = quantize_multiplier(0.25, single_rounding=True)
    >>> multiply_by_quantized_multiplier_litert_ref(
    ...     jnp.array([6, -6, 5, -5], jnp.int32), qm, sh)
    Array([ 2, -2,  1, -1], dtype=int32)
    """
    return _single_rounding(x, quantized_multiplier, shift, ties_away=True)


def _single_rounding(x, quantized_multiplier, shift, *, ties_away: bool):
    """``(x·qm + 2^(T-1) - [ties_away and x·qm < 0]) >> T``, ``T = 31 - shift``."""
    t = _i32(31) - _i32(shift)
    hi, lo = _mul_wide_s32(x, quantized_multiplier)
    r = t - 1  # rounding bit position, 0..61
    rc = jnp.clip(r, 0, 31).astype(jnp.uint32)
    rb = jnp.clip(r - 32, 0, 31).astype(jnp.uint32)
    r_lo = jnp.where(r < 32, _u32(1) << rc, _u32(0))
    r_hi = jnp.where(r < 32, _u32(0), _u32(1) << rb)
    if ties_away:
        # nudge 2^(T-1) - 1 for a negative product (a 64-bit subtraction of one)
        neg = (lax.bitcast_convert_type(hi, jnp.int32) < 0).astype(jnp.uint32)
        r_hi = r_hi - (neg & (r_lo == 0).astype(jnp.uint32))
        r_lo = r_lo - neg
    hi, lo = _add_wide(hi, lo, r_hi, r_lo)
    return _sar_wide_to_i32(hi, lo, t)


def multiply_by_quantized_multiplier_litert(x, quantized_multiplier, shift):
    """LiteRT's optimized x86 kernels (ruy): two roundings, both ties upward.

    ``left = max(shift, 0)``, ``right = max(-shift, 0)``;
    ``t = ((x·2^left)·qm + 2^30) >> 31`` (``x·2^left`` wraps in int32; the 64-bit
    product from 16-bit limbs), then ``(t + 2^(right-1)) >> right`` formed without
    int32 overflow (as ruy's overflow fix-up gives). int32 in and out; use with
    :func:`quantize_multiplier`.

    Ties: ``-6·0.25 = -1.5 -> -1`` (upward); two roundings: ``5·0.25 = 1.25 -> 2``.

    >>> qm, sh = quantize_multiplier(0.25)
    >>> multiply_by_quantized_multiplier_litert(jnp.array([6, -6, 5], jnp.int32), qm, sh)
    Array([ 2, -1,  2], dtype=int32)
    """
    shift = _i32(shift)
    left = jnp.maximum(shift, 0)
    right = jnp.maximum(-shift, 0)
    x_up = _i32(x) * (_i32(1) << left)
    # qm >= 0, so the product's high word rounded half up cannot overflow: ties upward
    # is the shared single rounding with T = 31.
    t = _single_rounding(x_up, quantized_multiplier, 0, ties_away=False)
    # (t + 2^(right-1)) >> right == (t >> right) + [t mod 2^right >= 2^(right-1)]
    e = right.astype(jnp.uint32)
    mask = (_u32(1) << e) - _u32(1)
    rem = lax.bitcast_convert_type(t, jnp.uint32) & mask
    half = (_u32(1) << e) >> 1
    return (t >> right) + ((right > 0) & (rem >= half)).astype(jnp.int32)
