"""The lifecycle of an NNX model's quantized modules: modes, switches, calibration,
statistics checks.

:func:`set_mode` moves modules between :class:`~qjax.flax.Mode` values (entering
``FROZEN`` checks every observer saw finite data); the per-module switches
(:func:`disable_observer`, :func:`enable_fake_quant`, :func:`freeze_bn_stats`, ...)
all go through one helper; :func:`calibrate` runs post-training calibration;
:func:`check_statistics` and :func:`init_qparams_from_stats` read the statistics back.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable

import jax
import jax.numpy as jnp
from flax import nnx

from .. import _core, _health
from .._calibrate import run_batches as _run_batches
from .._config import Mode, as_mode
from .._walk import QuantLayer, nnx_quantized
from ._layers import QuantStat


def _quant_modules(model, where: str | None = None, fn: str = "set_mode") -> list[QuantLayer]:
    out = []
    for q in nnx_quantized(model):
        if q.holder.name != q.holder_path:
            q.holder.name = q.holder_path
        if where is None or re.fullmatch(where, q.holder_path):
            out.append(q)
    if not out:
        what = "quantized modules" if where is None else f"quantized modules matching {where!r}"
        raise ValueError(
            f"{fn}: the model has no {what}; "
            "use QuantLinear/QuantConv/ActQuant or quantize_model(model, rules) first"
        )
    return out


def set_mode(model: nnx.Module, mode: Mode | str, *, where: str | None = None) -> None:
    """Put every quantized module of ``model`` (or those whose path fully matches the
    regex ``where``) into ``mode``. Entering ``FROZEN`` checks that every observer has
    seen data and raises ``ValueError`` naming the module paths that have not.

    >>> from flax import nnx
    >>> from qjax.flax import Mode, qjax_recommended
    >>> from qjax.flax.nnx import QuantLinear
    >>> layer = QuantLinear(2, 2, config=qjax_recommended(), rngs=nnx.Rngs(0))
    >>> set_mode(layer, Mode.CALIBRATE); layer.mode
    <Mode.CALIBRATE: 'calibrate'>
    """
    mode = as_mode(mode)
    mods = [(q.holder_path, q.holder) for q in _quant_modules(model, where, "set_mode")]
    if mode is Mode.FROZEN:
        missing = [p for p, m in mods if _never_observed(m.quant_stats.get_value())]
        if missing:
            raise ValueError(
                f"set_mode(FROZEN): no statistics in {missing}: these observers never saw "
                "data; run the model in Mode.CALIBRATE or Mode.QAT first"
            )
        # non-finite ranges, named by path
        trees = {p: m.quant_stats.get_value() for p, m in mods}
        _health.check_stats_trees(trees, where="set_mode(FROZEN)")
    for _, m in mods:
        m.mode = mode


def _never_observed(stats) -> bool:
    leaves = stats if isinstance(stats, _core.LayerStats) else (stats,)
    for st in leaves:
        count = getattr(st, "count", None)
        if count is not None and int(count) == 0:
            return True
    return False


# public switch function -> (module attribute, value); _switch does the work for all
_SWITCHES = {
    "disable_observer": ("observe", False),
    "enable_observer": ("observe", True),
    "disable_fake_quant": ("fake_quant", False),
    "enable_fake_quant": ("fake_quant", True),
    "freeze_bn_stats": ("freeze_bn", True),
    "unfreeze_bn_stats": ("freeze_bn", False),
}


def _switch(fn: str, model, where: str | None) -> None:
    attr, value = _SWITCHES[fn]
    qs = _quant_modules(model, where, fn)
    mods = [q.holder for q in qs]
    if attr == "freeze_bn":  # only QuantConvBn has a BN to freeze
        mods = [q.holder for q in qs if q.kind == "conv_bn"]
        if not mods:
            raise ValueError(f"{fn}: the model has no QuantConvBn modules (where={where!r})")
    for m in mods:
        setattr(m, attr, value)


def disable_observer(model: nnx.Module, *, where: str | None = None) -> None:
    """Stop observers updating (torch ``disable_observer``), in all quantized modules or
    those whose path fully matches the regex ``where``. Fake-quant then uses the
    statistics as they are.

    >>> from flax import nnx
    >>> from qjax.flax import qjax_recommended
    >>> from qjax.flax.nnx import QuantLinear
    >>> layer = QuantLinear(2, 2, config=qjax_recommended(), rngs=nnx.Rngs(0))
    >>> disable_observer(layer); layer.observe
    False
    """
    _switch("disable_observer", model, where)


def enable_observer(model: nnx.Module, *, where: str | None = None) -> None:
    """Undo :func:`disable_observer` (torch ``enable_observer``); the mode still decides.

    >>> from flax import nnx
    >>> from qjax.flax import qjax_recommended
    >>> from qjax.flax.nnx import QuantLinear
    >>> layer = QuantLinear(2, 2, config=qjax_recommended(), rngs=nnx.Rngs(0))
    >>> disable_observer(layer); enable_observer(layer); layer.observe
    True
    """
    _switch("enable_observer", model, where)


def disable_fake_quant(model: nnx.Module, *, where: str | None = None) -> None:
    """Stop fake-quantizing (torch ``disable_fake_quant``): tensors pass through as float.

    >>> from flax import nnx
    >>> from qjax.flax import qjax_recommended
    >>> from qjax.flax.nnx import QuantLinear
    >>> layer = QuantLinear(2, 2, config=qjax_recommended(), rngs=nnx.Rngs(0))
    >>> disable_fake_quant(layer, where="<root>"); layer.fake_quant
    False
    """
    _switch("disable_fake_quant", model, where)


def enable_fake_quant(model: nnx.Module, *, where: str | None = None) -> None:
    """Undo :func:`disable_fake_quant` (torch ``enable_fake_quant``).

    >>> from flax import nnx
    >>> from qjax.flax import qjax_recommended
    >>> from qjax.flax.nnx import QuantLinear
    >>> layer = QuantLinear(2, 2, config=qjax_recommended(), rngs=nnx.Rngs(0))
    >>> disable_fake_quant(layer); enable_fake_quant(layer); layer.fake_quant
    True
    """
    _switch("enable_fake_quant", model, where)


def freeze_bn_stats(model: nnx.Module, *, where: str | None = None) -> None:
    """Normalise with the running BN statistics and stop updating them (torch
    ``freeze_bn_stats``), in every :class:`~qjax.flax.nnx.QuantConvBn` (or those
    matching ``where``).

    >>> from flax import nnx
    >>> from qjax.flax import qjax_recommended
    >>> from qjax.flax.nnx import QuantConvBn
    >>> cb = QuantConvBn(1, 2, (1, 1), config=qjax_recommended(), rngs=nnx.Rngs(0))
    >>> freeze_bn_stats(cb); _ = cb(jnp.ones((1, 2, 2, 1))); cb.bn_mean[...]
    Array([0., 0.], dtype=float32)
    """
    _switch("freeze_bn_stats", model, where)


def unfreeze_bn_stats(model: nnx.Module, *, where: str | None = None) -> None:
    """Undo :func:`freeze_bn_stats`.

    >>> from flax import nnx
    >>> from qjax.flax import qjax_recommended
    >>> from qjax.flax.nnx import QuantConvBn
    >>> cb = QuantConvBn(1, 2, (1, 1), config=qjax_recommended(), rngs=nnx.Rngs(0))
    >>> freeze_bn_stats(cb); unfreeze_bn_stats(cb); cb.freeze_bn
    False
    """
    _switch("unfreeze_bn_stats", model, where)


def calibrate(
    model: nnx.Module,
    batches: Iterable,
    *,
    forward: Callable | None = None,
    max_batches: int | None = None,
    progress: bool = True,
    then: Mode = Mode.FROZEN,
) -> int:
    """Post-training calibration: run ``model`` in ``Mode.CALIBRATE`` over ``batches``.

    Each batch goes through a jitted ``forward(model, batch)`` (default ``model(batch)``;
    a tuple batch is passed as ``model(*batch)``), with a tqdm progress bar when tqdm is
    installed. Afterwards the model is put in mode ``then`` (``FROZEN`` by default,
    which checks that every observer saw data). Returns the number of batches.

    >>> from flax import nnx
    >>> from qjax.flax import qjax_recommended
    >>> from qjax.flax.nnx import QuantLinear
    >>> layer = QuantLinear(3, 2, config=qjax_recommended(), rngs=nnx.Rngs(0))
    >>> calibrate(layer, [jnp.ones((4, 3)), -jnp.ones((4, 3))], progress=False)
    2
    >>> layer.mode, round(float(layer.quant_stats.get_value().input.min_val), 4)  # EMA
    (<Mode.FROZEN: 'frozen'>, 0.98)
    """
    if forward is None:

        def forward(m, batch):
            return m(*batch) if isinstance(batch, tuple) else m(batch)

    set_mode(model, Mode.CALIBRATE)
    step = nnx.jit(forward)
    n = _run_batches(lambda b: step(model, b), batches, max_batches=max_batches, progress=progress)
    set_mode(model, then)
    return n


def init_qparams_from_stats(model: nnx.Module) -> list[str]:
    """Copy the observers' qparams into the learnable ``qparams`` of every
    :class:`~qjax.flax.nnx.LearnableQuantLinear` of ``model`` (after calibration);
    returns their paths.

    Checks first (:func:`check_statistics`): observers that never saw data, or hold
    non-finite ranges, raise ``ValueError`` naming the module path.

    >>> from qjax.flax import qjax_recommended
    >>> from qjax.flax.nnx import LearnableQuantLinear
    >>> layer = LearnableQuantLinear(
    ...     2, 2, config=qjax_recommended().replace(grad="pact"), rngs=nnx.Rngs(0))
    >>> init_qparams_from_stats(layer)  # doctest: +ELLIPSIS
    Traceback (most recent call last):
      ...
    ValueError: init_qparams_from_stats: <root>: observers ['input', 'weight'] never saw data; ...
    """
    done = []
    for q in nnx_quantized(model):
        if q.kind == "learnable_linear":
            p, m = q.holder_path, q.holder
            st = m.quant_stats.get_value()
            never = [k for k, v in st.layer._asdict().items() if v is not None and not int(v.count)]
            if never:
                raise ValueError(
                    f"init_qparams_from_stats: {p}: observers {never} never saw data; run the "
                    "model in Mode.CALIBRATE first"
                )
            _health.check_stats_tree(st.layer, where="init_qparams_from_stats", prefix=p)
            m.qparams.set_value(jax.tree.map(jnp.asarray, st.init))
            done.append(p)
    if not done:
        raise ValueError("init_qparams_from_stats: the model has no LearnableQuantLinear")
    return done


def check_statistics(model: nnx.Module, *, where: str = "check_statistics") -> None:
    """Raise ``ValueError`` naming the module paths whose observer ranges are not finite
    (with the fix); warn about NaN/inf inputs the observers ignored.

    >>> from qjax.flax import nnx as qn, qjax_recommended
    >>> layer = qn.QuantLinear(2, 2, config=qjax_recommended(), rngs=nnx.Rngs(0))
    >>> check_statistics(layer)  # fresh statistics are empty, not broken
    """
    _health.check_stats_tree(nnx.state(model, QuantStat), where=where)
