"""Rounding rules: half-to-even, half-away-from-zero, and cheap stochastic rounding.

=================  ===================================================  ================
rule               formula                                              used by
=================  ===================================================  ================
``half_even``      ``rint(v)`` (ties to the even integer)               torch, XLA, qjax
``half_away``      ``sign(v) * floor(|v| + 1/2)``                       TFLite, C ``round``
``stochastic``     ``floor(v + u)``, ``u ~ U[0, 1)`` per element        QAT of low bits
=================  ===================================================  ================

Stochastic rounding draws ``u`` from a counter-based integer hash of the element index
and a 32-bit seed taken from the key, fused by XLA into the surrounding elementwise
loop: no per-element threefry (``benchmarks/stochastic_rounding.py`` measures both).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax


def round_half_even(v: jax.Array) -> jax.Array:
    """Round to nearest, ties to even (``jnp.round``).

    >>> round_half_even(jnp.array([0.5, 1.5, -2.5]))
    Array([ 0.,  2., -2.], dtype=float32)
    """
    return jnp.round(v)


def round_half_away(v: jax.Array) -> jax.Array:
    """Round to nearest, ties away from zero (C ``std::round``; TFLite).

    >>> round_half_away(jnp.array([0.5, 1.5, -2.5]))
    Array([ 1.,  2., -3.], dtype=float32)
    """
    # floor(|v| + 0.5) is wrong for 0.49999997 (the add rounds up); the trunc form is exact.
    t = jnp.trunc(v)
    return jnp.where(jnp.abs(v - t) >= 0.5, t + jnp.sign(v), t)


def _hash32(x: jax.Array) -> jax.Array:
    # "lowbias32" integer hash (Wellons): full avalanche, 5 integer ops per element.
    x = x ^ (x >> 16)
    x = x * jnp.uint32(0x7FEB352D)
    x = x ^ (x >> 15)
    x = x * jnp.uint32(0x846CA68B)
    return x ^ (x >> 16)


def uniform_from_key(key: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    """Uniform float32 in [0, 1) of ``shape`` from a counter hash seeded by ``key``.

    One small threefry call derives a 32-bit seed; each element then costs a few integer
    ops, which XLA fuses into the consumer.

    >>> u = uniform_from_key(jax.random.key(0), (4,))
    >>> bool(((u >= 0) & (u < 1)).all())
    True
    """
    if key is None:
        raise ValueError("stochastic rounding needs a PRNG key: pass key=jax.random.key(...)")
    if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
        seed = jax.random.bits(key, (), jnp.uint32)
    else:  # raw uint32[2] keys
        seed = jax.random.bits(jax.random.wrap_key_data(key), (), jnp.uint32)
    n = 1
    for d in shape:
        n *= d
    idx = lax.iota(jnp.uint32, n).reshape(shape)
    bits = _hash32(idx * jnp.uint32(0x9E3779B9) + _hash32(seed))
    return (bits >> 8).astype(jnp.float32) * jnp.float32(2.0**-24)


def round_stochastic(v: jax.Array, key: jax.Array) -> jax.Array:
    """Round down or up with probability equal to the distance: ``floor(v + u)``.

    Unbiased: ``E[round_stochastic(v)] = v`` (up to 2^-24).

    >>> r = round_stochastic(jnp.full((10000,), 0.25), jax.random.key(1))
    >>> bool(abs(float(r.mean()) - 0.25) < 0.02)
    True
    """
    return jnp.floor(v + uniform_from_key(key, v.shape))


def apply_rounding(v: jax.Array, rounding: str, key: jax.Array | None = None) -> jax.Array:
    """Round ``v`` by the named rule (``"half_even"``, ``"half_away"``, ``"stochastic"``)."""
    if rounding == "half_even":
        return round_half_even(v)
    if rounding == "half_away":
        return round_half_away(v)
    if rounding == "stochastic":
        return round_stochastic(v, key)
    raise ValueError(f"unknown rounding {rounding!r}")
