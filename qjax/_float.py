"""Exact float arithmetic under XLA: the guards every bit-exact formula in qjax uses.

XLA changes float arithmetic on its way to machine code, and each change moves codes
at rounding ties (measured on XLA:CPU, jax 0.10.2):

==========================================  =========================================
what XLA does                               guard
==========================================  =========================================
``x / broadcast(s)`` and ``x / constant``   :func:`div_f32` (float64 quotient) or
become ``x · (1/s)`` (one more rounding)    :func:`div_ieee` (divisor made data-dependent)
``a·b + c`` contracted into one fma         :func:`fma_f32` when an fma is *wanted*;
(skips rounding ``a·b``)                    :func:`exact_addend` / :func:`mul_f32`
                                            when it is not
``(x·c1)·c2 -> x·(c1·c2)``, ``1/(1/s)->s``  :func:`materialize`
==========================================  =========================================

One implementation of each guard, imported by the numerics, observers and kernels.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax


def div_f32(a, b) -> jax.Array:
    """Correctly rounded float32 quotient ``f32(a / b)``, also under ``jit``.

    The quotient is formed in float64 and rounded once to float32: even if XLA turns
    the division into a multiplication by the float64 reciprocal, its relative error
    (< 2^-52) is below the distance (> 2^-49) from a quotient of two float32 numbers to
    any float32 rounding boundary, so the result is the IEEE float32 quotient.

    >>> div_f32(jnp.float32(1.0), jnp.float32(3.0))
    Array(0.33333334, dtype=float32)
    """
    with jax.enable_x64(True):
        q = jnp.asarray(a, jnp.float32).astype(jnp.float64) / jnp.asarray(b, jnp.float32).astype(
            jnp.float64
        )
        return q.astype(jnp.float32)


def div_ieee(a, b) -> jax.Array:
    """IEEE ``a / b`` in the operands' dtype (float32 or float64) for finite ``a``.

    ``b + (a - a)`` equals ``b`` for finite ``a`` but is an ordinary array to XLA, so
    the division is not rewritten into a reciprocal multiply. NaN where ``a`` is not
    finite.

    >>> div_ieee(jnp.float32(1.0), 3.0)
    Array(0.33333334, dtype=float32)
    """
    a = jnp.asarray(a)
    a, b = jnp.broadcast_arrays(a, jnp.asarray(b, a.dtype))
    return a / (b + (a - a))


def fma_f32(a, b, c) -> jax.Array:
    """``fma(a, b, c)`` of float32 operands: ``a·b + c`` rounded to float32 once.

    ``a·b`` is exact in float64 (24 + 24 significand bits), but ``f32(f64(a·b + c))``
    rounds twice. The float64 sum is therefore rounded to odd (TwoSum error term, then a
    step to the odd neighbour when inexact), after which the float32 conversion is
    correctly rounded (53 >= 24 + 2 bits).

    >>> fma_f32(jnp.float32(0.1), jnp.float32(10.0), jnp.float32(-1.0))
    Array(1.4901161e-08, dtype=float32)
    """
    with jax.enable_x64(True):
        f64 = jnp.float64
        p = jnp.asarray(a, jnp.float32).astype(f64) * jnp.asarray(b, jnp.float32).astype(f64)
        c = jnp.asarray(c, jnp.float32).astype(f64)
        s = p + c
        bb = s - p
        err = (p - (s - bb)) + (c - bb)
        even = (lax.bitcast_convert_type(s, jnp.int64) & 1) == 0
        fix = (err != 0) & even & jnp.isfinite(s)
        odd = jnp.nextafter(s, jnp.where(err > 0, f64(jnp.inf), f64(-jnp.inf)))
        return jnp.where(fix, odd, s).astype(jnp.float32)


def materialize(p: jax.Array) -> jax.Array:
    """``p``, with no HLO algebra across this point.

    ``where(isnan(p), nan, p)`` is ``p`` bit for bit (up to the NaN payload), and stops
    XLA's reassociation of constant products and ``1/(1/s)`` folding. It also stops
    LLVM from contracting ``p`` into a following add, but only while LLVM cannot prove
    ``p`` is never NaN; where it can, use :func:`exact_addend`.

    >>> materialize(jnp.float32(2.5))
    Array(2.5, dtype=float32)
    """
    return jnp.where(jnp.isnan(p), jnp.asarray(jnp.nan, p.dtype), p)


def pow2(k) -> jax.Array:
    """Exact float32 ``2^k`` for int32 ``k`` in ``[-126, 127]``, built from its bits.

    >>> pow2(jnp.int32(-3))
    Array(0.125, dtype=float32)
    """
    return lax.bitcast_convert_type(((jnp.asarray(k, jnp.int32) + 127) << 23), jnp.float32)


def exact_addend(v: jax.Array, k) -> jax.Array:
    """``v`` (a float32 product about to be added to something), safe from FMA fusion.

    ``v`` is rewritten as ``rint(v·2^k)·2^-k``: equal to ``v`` whenever ``v`` is a
    multiple of ``2^-k`` (and ``|v·2^k| < 2^127``); the multiply that now feeds the add
    is by a power of two, which is exact, so contracting it changes nothing.

    >>> exact_addend(jnp.float32(0.75), 4)
    Array(0.75, dtype=float32)
    """
    return jnp.round(v * pow2(k)) * pow2(-jnp.asarray(k, jnp.int32))


def opaque_one(ref) -> jax.Array:
    """A float32 1.0 that XLA cannot fold (``ref`` must not be NaN where it is used).

    >>> opaque_one(jnp.float32(3.0))
    Array(1., dtype=float32)
    """
    return jnp.where(jnp.isnan(ref), jnp.float32(2.0), jnp.float32(1.0))


def mul_f32(a, b, one) -> jax.Array:
    """``a·b`` rounded to float32 even when an addition follows: ``(a·b)·one``.

    With ``one`` from :func:`opaque_one`, a contraction can only fuse the exact ``·one``.

    >>> mul_f32(jnp.float32(0.1), jnp.float32(3.0), jnp.float32(1.0))
    Array(0.3, dtype=float32)
    """
    return (a * b) * one
