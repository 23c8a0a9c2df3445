"""The lifecycle of a Linen model's statistics: calibration and the checks before
``Mode.FROZEN``, and seeding learnable qparams from them.

Linen modules are immutable, so these work on the variables: :func:`calibrate` returns
new ``quant_stats``, :func:`require_statistics` / :func:`check_statistics` check them,
:func:`init_qparams_from_stats` returns new ``params``. Modes and switches are module
attributes (or ``mode=`` at call time), not functions here.
"""

from __future__ import annotations

from collections.abc import Iterable

import flax.linen as nn
import jax
import jax.numpy as jnp

from .. import _core, _health, _learnable
from .._calibrate import run_batches as _run_batches
from .._paths import join_path
from ._layers import COLLECTION


def require_statistics(quant_stats) -> None:
    """Raise ``ValueError`` naming every module whose observers never saw data.

    Run it on ``variables["quant_stats"]`` before applying a model in ``Mode.FROZEN``.

    >>> import jax
    >>> from qjax.flax import qjax_recommended
    >>> from qjax.flax.linen import QuantDense
    >>> v = QuantDense(2, config=qjax_recommended()).init(jax.random.key(0), jnp.ones((1, 3)))
    >>> require_statistics(v["quant_stats"])  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    ValueError: no statistics in ['quant_stats/stats']: these observers never saw data; ...
    """
    missing = []

    def walk(node, path):
        if isinstance(node, dict) or hasattr(node, "items") and not hasattr(node, "_fields"):
            for k, v in node.items():
                walk(v, path + (str(k),))
            return
        leaves = node if isinstance(node, _core.LayerStats) else (node,)
        for st in leaves:
            count = getattr(st, "count", None)
            if count is not None and int(count) == 0:
                missing.append(join_path((COLLECTION,) + path))
                return

    walk(quant_stats, ())
    if missing:
        raise ValueError(
            f"no statistics in {missing}: these observers never saw data; run the model in "
            f"Mode.CALIBRATE or Mode.QAT (apply with mutable=[{COLLECTION!r}]) first"
        )
    # non-finite ranges, named by path
    _health.check_stats_tree(quant_stats, where="require_statistics", prefix=COLLECTION)


def calibrate(
    model: nn.Module,
    variables,
    batches: Iterable,
    *,
    max_batches: int | None = None,
    progress: bool = True,
    **apply_kwargs,
):
    """Post-training calibration: ``model.apply(variables, batch, mutable=["quant_stats"],
    **apply_kwargs)`` (jitted) over ``batches``; returns ``(variables, num_batches)``
    with the new statistics.

    The model must observe: build it with ``mode=Mode.CALIBRATE`` or pass
    ``mode=Mode.CALIBRATE`` in ``apply_kwargs``. A tuple batch is passed as
    ``*batch``. Ends with :func:`require_statistics`, so a module that saw no data is
    an error naming its path. tqdm progress bar as in :func:`qjax.flax.nnx.calibrate`.

    >>> import jax
    >>> from qjax.flax import Mode, qjax_recommended
    >>> from qjax.flax.linen import QuantDense
    >>> layer = QuantDense(2, config=qjax_recommended())
    >>> v = layer.init(jax.random.key(0), jnp.ones((4, 3)))
    >>> batches = [jnp.ones((4, 3)), -jnp.ones((4, 3))]
    >>> v, n = calibrate(layer, v, batches, progress=False, mode=Mode.CALIBRATE)
    >>> n, round(float(v["quant_stats"]["stats"].input.min_val), 4)  # EMA: 1 + 0.01·(-1 - 1)
    (2, 0.98)
    """
    variables = dict(variables)
    if COLLECTION not in variables:
        raise ValueError(
            f"calibrate: variables have no {COLLECTION!r} collection (got {sorted(variables)}); "
            "the model has no quantized modules, or variables come from another model"
        )

    @jax.jit
    def step(variables, batch):
        args = batch if isinstance(batch, tuple) else (batch,)
        _, upd = model.apply(variables, *args, mutable=[COLLECTION], **apply_kwargs)
        return upd[COLLECTION]

    def run(batch):
        variables[COLLECTION] = step(variables, batch)

    n = _run_batches(run, batches, max_batches=max_batches, progress=progress)
    require_statistics(variables[COLLECTION])
    return variables, n


def init_qparams_from_stats(variables) -> dict:
    """New variables whose learnable ``params/.../qparams`` are the observers' qparams
    (stored in ``quant_stats``; after calibration). Raises ``ValueError`` naming the
    module path of observers that never saw data or hold non-finite ranges.

    >>> import jax
    >>> from qjax.flax import Mode, qjax_recommended
    >>> from qjax.flax.linen import LearnableQuantDense
    >>> layer = LearnableQuantDense(2, config=qjax_recommended().replace(grad="lsq"))
    >>> v = layer.init(jax.random.key(0), jnp.ones((1, 3)))
    >>> _, upd = layer.apply(v, jnp.ones((1, 3)), mode=Mode.CALIBRATE, mutable=["quant_stats"])
    >>> v = init_qparams_from_stats({**v, **upd})
    >>> float(v["params"]["qparams"]["input"]["scale"])
    0.003921568859368563
    """
    variables = dict(variables)
    if COLLECTION not in variables or "params" not in variables:
        raise ValueError(
            f"init_qparams_from_stats: need 'params' and {COLLECTION!r}, got {sorted(variables)}"
        )
    found = []

    def walk(stats, params, path):
        if isinstance(stats, _learnable.LearnableStats):
            p = join_path(path[:-1])
            never = [k for k, v in stats.layer._asdict().items() if v is not None and not v.count]
            if never:
                raise ValueError(
                    f"init_qparams_from_stats: {p}: observers {never} never saw data; apply "
                    "the model in Mode.CALIBRATE (mutable=['quant_stats']) first"
                )
            _health.check_stats_tree(stats.layer, where="init_qparams_from_stats", prefix=p)
            if "qparams" not in params:
                raise ValueError(f"init_qparams_from_stats: {p}: no params/qparams next to it")
            found.append(p)
            return {**params, "qparams": jax.tree.map(jnp.asarray, stats.init)}
        if hasattr(stats, "items") and not hasattr(stats, "_fields"):
            out = dict(params)
            for k, v in stats.items():
                if k == "stats" and isinstance(v, _learnable.LearnableStats):
                    out = walk(v, out, path + (k,))
                elif k in params:
                    out[k] = walk(v, params[k], path + (k,))
            return out
        return params

    new_params = walk(variables[COLLECTION], variables["params"], ())
    if not found:
        raise ValueError("init_qparams_from_stats: no LearnableQuantDense statistics found")
    variables["params"] = new_params
    return variables


def check_statistics(quant_stats, *, where: str = "check_statistics") -> None:
    """Raise ``ValueError`` naming every module path whose observer ranges are not
    finite (and the fix); warn about NaN/inf inputs the observers ignored. For arrays
    returned from ``jit``, use :func:`qjax.flax._health.stats_health` inside and
    :func:`qjax.flax._health.raise_if_unhealthy` outside.

    >>> import jax
    >>> from qjax.flax import linen as ql, qjax_recommended
    >>> v = ql.QuantDense(2, config=qjax_recommended()).init(jax.random.key(0), jnp.ones((1, 3)))
    >>> check_statistics(v["quant_stats"])
    """
    _health.check_stats_tree(quant_stats, where=where, prefix=COLLECTION)
