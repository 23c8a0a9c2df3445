"""Health of observer statistics: non-finite ranges found, named by module path.

Observers never let NaN/inf *inputs* into their ranges (they count them in
``state.nonfinite``), but a range can still be unusable: statistics loaded from a file
or written by hand may hold NaN, a per-channel observer may have channels that never
saw a finite value (``min = +inf``) while others did, and a range wider than the
float32 maximum has an infinite width. qparams from such a range are meaningless.

* :func:`stats_health` is pure and jit-able: ``{path: Health}`` plus a ``bad_range``
  count per observer state, to return from a jitted training or calibration step
  (a data-dependent condition inside ``jit`` cannot raise there);
* :func:`check_stats_tree` (host side, on a statistics tree) raises ``ValueError``
  naming every module path with a non-finite range and the fix, and warns
  (``UserWarning``) about NaN/inf inputs the observers ignored. The Flax shells call
  it when entering ``Mode.FROZEN`` (:func:`qjax.flax.nnx.set_mode`,
  :func:`qjax.flax.linen.require_statistics`) and before reading qparams into
  learnable parameters;
* :func:`raise_if_unhealthy` does the same for the arrays :func:`stats_health` returned
  from a jitted function.
"""

from __future__ import annotations

import warnings
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from ..observers import health as _observer_health
from ._paths import join_path

__all__ = ["StatsHealth", "check_stats_tree", "raise_if_unhealthy", "stats_health"]

_FIX = (
    "re-initialise these statistics (init the model again or load finite ranges) and run "
    "Mode.CALIBRATE on finite data; NaN/inf inputs are ignored by the observers, so a "
    "non-finite range comes from loaded/edited statistics or an overflowing range"
)


class StatsHealth(NamedTuple):
    """Health of one observer state (arrays, jit-friendly): the observer's
    :class:`qjax.observers.Health` fields and ``bad_range``, the number of qparams
    entries whose range is not finite although the observer has seen data (or that
    hold NaN, or whose width ``max - min`` overflows float32)."""

    nonfinite: jax.Array
    observed: jax.Array
    zero_range: jax.Array
    bad_range: jax.Array


def _is_state(x) -> bool:
    return all(hasattr(x, f) for f in ("min_val", "max_val", "nonfinite"))


def _key_name(k) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(k, attr):
            return str(getattr(k, attr))
    return str(k)


def _path(prefix: str, keys) -> str:
    names = [_key_name(k) for k in keys]
    names = [n for n in names if n not in ("value", "raw_value", "stats", "layer")]
    return join_path([prefix] * bool(prefix) + names)


def _one(state) -> StatsHealth:
    h = _observer_health(state)
    mn = jnp.asarray(state.min_val, jnp.float32)
    mx = jnp.asarray(state.max_val, jnp.float32)
    seen = jnp.asarray(getattr(state, "count", 1)) > 0
    width = mx - mn
    bad = jnp.isnan(mn) | jnp.isnan(mx) | (seen & ~(jnp.isfinite(mn) & jnp.isfinite(mx)))
    bad = bad | (jnp.isfinite(mn) & jnp.isfinite(mx) & ~jnp.isfinite(width))
    return StatsHealth(h.nonfinite, h.observed, h.zero_range, jnp.sum(bad, dtype=jnp.int32))


def stats_health(tree: Any, prefix: str = "") -> dict[str, StatsHealth]:
    """``{module path: StatsHealth}`` for every observer state in ``tree`` (NNX
    ``nnx.state(model, QuantStat)``, a Linen ``variables["quant_stats"]``, or one
    layer's statistics). Pure; works under ``jit``.

    >>> import qjax
    >>> obs = qjax.observers.minmax(qjax.QuantSpec(axis=0))
    >>> st = obs.update(obs.init(jnp.zeros(2)), jnp.array([1.0, jnp.nan]))
    >>> h = stats_health({"fc1": st})["fc1"]
    >>> int(h.nonfinite), int(h.bad_range)  # channel 1 saw only NaN: range [inf, -inf]
    (1, 1)
    """
    leaves = jax.tree_util.tree_flatten_with_path(tree, is_leaf=_is_state)[0]
    return {_path(prefix, keys): _one(st) for keys, st in leaves if _is_state(st)}


def raise_if_unhealthy(health: dict[str, StatsHealth], *, where: str = "statistics") -> None:
    """Host side: ``ValueError`` naming every path whose ``bad_range`` is nonzero (with
    the fix); ``UserWarning`` for paths whose observers ignored NaN/inf inputs.

    >>> raise_if_unhealthy({"fc1": StatsHealth(*map(jnp.asarray, (0, True, 0, 2)))})
    Traceback (most recent call last):
      ...
    ValueError: statistics: non-finite ranges in ['fc1 (2 entries)']; re-initialise ...
    """
    bad, ignored = [], []
    for p, h in health.items():
        n = int(np.asarray(h.bad_range))
        if n:
            bad.append(f"{p} ({n} entr{'y' if n == 1 else 'ies'})")
        k = int(np.asarray(h.nonfinite))
        if k:
            ignored.append(f"{p} ({k})")
    if ignored:
        warnings.warn(
            f"{where}: observers ignored NaN/inf inputs in {ignored}; the ranges hold the "
            "finite values only (check the data or the layer before them)",
            UserWarning,
            stacklevel=3,
        )
    if bad:
        raise ValueError(f"{where}: non-finite ranges in {bad}; {_FIX}")


def check_stats_tree(tree: Any, *, where: str = "statistics", prefix: str = "") -> None:
    """Host side: :func:`stats_health` of ``tree`` then :func:`raise_if_unhealthy`.

    >>> import qjax
    >>> obs = qjax.observers.minmax(qjax.QuantSpec())
    >>> st = obs.update(obs.init(jnp.zeros(2)), jnp.array([1.0, 2.0]))
    >>> check_stats_tree({"fc1": st._replace(max_val=jnp.float32(jnp.nan))}, where="FROZEN")
    Traceback (most recent call last):
      ...
    ValueError: FROZEN: non-finite ranges in ['fc1 (1 entry)']; re-initialise ...
    """
    check_stats_trees({prefix: tree}, where=where)


def check_stats_trees(trees: dict[str, Any], *, where: str = "statistics") -> None:
    """:func:`check_stats_tree` of several trees, ``{prefix: tree}``, in one compiled
    call (:func:`qjax.flax.nnx.set_mode` checks every layer of a model at once).

    >>> import qjax
    >>> obs = qjax.observers.minmax(qjax.QuantSpec())
    >>> st = obs.update(obs.init(jnp.zeros(2)), jnp.array([1.0, 2.0]))
    >>> bad = st._replace(min_val=jnp.float32(jnp.nan))
    >>> check_stats_trees({"fc1": st, "fc2": bad}, where="FROZEN")
    Traceback (most recent call last):
      ...
    ValueError: FROZEN: non-finite ranges in ['fc2 (1 entry)']; re-initialise ...
    """
    raise_if_unhealthy(health_by_prefix(trees), where=where)


@jax.jit
def health_by_prefix(trees: dict[str, Any]) -> dict[str, StatsHealth]:
    """``{path: StatsHealth}`` of ``{prefix: tree}``, jitted: the host-side checks run
    between calls, where the ops one by one would compile (or dispatch) a few hundred tiny
    programs per model; this compiles one per statistics layout."""
    out = {}
    for prefix, tree in trees.items():
        out.update(stats_health(tree, prefix))
    return out
