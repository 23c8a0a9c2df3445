"""The observer protocol and the statistics every observer shares.

An observer is a NamedTuple of pure functions over a NamedTuple state (a pytree), in
the style of an optax ``GradientTransformation``::

    obs = qjax.observers.minmax(spec)
    state = obs.init(x)             # final shapes; works under jax.eval_shape
    state = obs.update(state, x)    # pure; jit/scan friendly
    qp = obs.qparams(state)         # -> qjax.QParams

Non-finite inputs (NaN, ±inf) never enter the statistics: they are ignored and counted
in ``state.nonfinite``; :func:`health` reads the count (and other conditions) back.
Reductions over a batch sharded with ``jax.sharding`` are global by construction (they
are ordinary ``jnp`` reductions); inside ``shard_map`` pass ``axis_name`` so each update
also reduces across devices (``lax.pmin``/``pmax``/``psum``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from .._spec import QParams, QuantSpec, group_view, reduction_axes


class Observer(NamedTuple):
    """``init(example) -> state``, ``update(state, x) -> state``, ``qparams(state)``."""

    init: Callable[[jax.Array], Any]
    update: Callable[[Any, jax.Array], Any]
    qparams: Callable[[Any], QParams]


class Health(NamedTuple):
    """Conditions an observer state can be in (arrays, so it works under jit).

    ``nonfinite``: how many NaN/inf values were ignored; ``observed``: whether any
    finite value was seen; ``zero_range``: how many qparams entries have ``min == max``.
    """

    nonfinite: jax.Array
    observed: jax.Array
    zero_range: jax.Array


def check_float_input(x, name: str = "observer update") -> jax.Array:
    x = jnp.asarray(x)
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(f"{name} expects a floating array, got dtype {x.dtype}")
    return x


def qparams_shape_of(example: jax.Array, spec: QuantSpec) -> tuple[int, ...]:
    return spec.qparams_shape(jnp.shape(example))


def finite_minmax(
    x: jax.Array, spec: QuantSpec, axis_name: str | None = None
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Per-qparam min and max over finite values, and the count of non-finite values.

    Shapes: ``spec.qparams_shape(x.shape)`` for min/max (``+inf``/``-inf`` where a slice
    has no finite value), int32 scalar for the count. Under ``shard_map`` with
    ``axis_name`` the results are reduced across that mesh axis.

    >>> from qjax import QuantSpec
    >>> x = jnp.array([[1.0, -2.0], [jnp.nan, 5.0]])
    >>> mn, mx, bad = finite_minmax(x, QuantSpec(axis=1))
    >>> mn, mx, int(bad)
    (Array([ 1., -2.], dtype=float32), Array([1., 5.], dtype=float32), 1)
    """
    x = check_float_input(x).astype(jnp.float32)
    shape = spec.qparams_shape(x.shape)
    xg = group_view(x, spec)
    red = reduction_axes(spec, x.ndim)
    fin = jnp.isfinite(xg)
    mn = jnp.min(jnp.where(fin, xg, jnp.inf), axis=red).reshape(shape)
    mx = jnp.max(jnp.where(fin, xg, -jnp.inf), axis=red).reshape(shape)
    bad = jnp.sum(~fin, dtype=jnp.int32)
    if axis_name is not None:
        mn = lax.pmin(mn, axis_name)
        mx = lax.pmax(mx, axis_name)
        bad = lax.psum(bad, axis_name)
    return mn, mx, bad


def health(state) -> Health:
    """Read the conditions of any observer state that has ``min_val``/``max_val``/``nonfinite``.

    >>> import qjax
    >>> obs = qjax.observers.minmax(qjax.QuantSpec())
    >>> st = obs.update(obs.init(jnp.zeros(3)), jnp.array([1.0, jnp.nan, 2.0]))
    >>> h = qjax.observers.health(st)
    >>> int(h.nonfinite), bool(h.observed), int(h.zero_range)
    (1, True, 0)
    """
    mn, mx = state.min_val, state.max_val
    observed = jnp.any(jnp.isfinite(mn) & jnp.isfinite(mx))
    zero = jnp.sum((mn == mx) & jnp.isfinite(mn), dtype=jnp.int32)
    return Health(nonfinite=jnp.asarray(state.nonfinite), observed=observed, zero_range=zero)


def report(state, name: str = "observer") -> str:
    """Human-readable summary of :func:`health` (host side; not for use under jit).

    >>> import qjax
    >>> obs = qjax.observers.minmax(qjax.QuantSpec())
    >>> print(report(obs.init(jnp.zeros(3)), "fc1.act"))
    fc1.act: never observed (qparams fall back to scale=1.0)
    """
    h = health(state)
    parts = []
    if not bool(h.observed):
        parts.append("never observed (qparams fall back to scale=1.0)")
    if int(h.nonfinite):
        parts.append(f"{int(h.nonfinite)} non-finite values ignored")
    if int(h.zero_range):
        parts.append(f"{int(h.zero_range)} zero-width ranges (constant input)")
    return f"{name}: " + ("; ".join(parts) if parts else "ok")
