"""Running min/max observers: plain and exponential moving average (EMA).

============================  =================================================================
observer                      update of the running range ``m`` with a batch's finite range
                              ``cur`` (per qparams entry)
============================  =================================================================
:func:`minmax`                ``min = min(min, cur_min)``, ``max = max(max, cur_max)``
                              (torch ``MinMaxObserver`` / ``PerChannelMinMaxObserver``)
:func:`ema_minmax`            first batch seen: ``m = cur``; afterwards
                              ``m = f32(m + f32(c · f32(cur - m)))``,
                              ``c = f32(averaging_constant)``
                              (torch ``MovingAverage[PerChannel]MinMaxObserver`` and the fused
                              ``FusedMovingAvgObsFakeQuantize``, NUMERICS.md rules 8 and 9)
============================  =================================================================

Per-axis (per-channel) and per-group observers are the same functions with a
:class:`~qjax.QuantSpec` that has ``axis`` (or ``group_size``/``group_axis``) set;
:func:`per_channel_minmax` and :func:`per_channel_ema_minmax` are aliases that insist on
an axis. ``qparams(state)`` is ``qjax.qparams_from_minmax(min_val, max_val, spec,
compat=compat)``: ``compat="torch"`` reproduces the observers' ``calculate_qparams``
(rule 6), ``compat="torch_fused"`` the scale/zero point the fused QAT module recomputes
every forward (rule 9).

NaN and ±inf never enter the range (torch would propagate them): they are counted in
``state.nonfinite``. A batch, or a channel of a batch, without finite values leaves the
range as it was. An observer that never saw a finite value gives ``scale = 1.0``.
XLA flushes float32 subnormals to zero in these reductions on CPU, so a subnormal input
counts as 0 (torch keeps it); a range whose width exceeds the float32 maximum can give
an infinite scale, as in torch.
Per-tensor observers accept batches of any shape (as torch); per-axis ones raise
``ValueError`` when a batch implies other qparams shapes than ``init`` allocated.
"""

from __future__ import annotations

import numbers
from typing import NamedTuple

import jax
import jax.numpy as jnp

from .._qparams import COMPATS, Compat, qparams_from_minmax
from .._spec import QuantSpec
from ._base import Observer, check_float_input, finite_minmax


class MinMaxState(NamedTuple):
    """State of :func:`minmax` and :func:`ema_minmax` (a pytree of arrays).

    ``min_val``, ``max_val``: float32 of the spec's qparams shape, ``+inf``/``-inf``
    until a finite value is seen; ``nonfinite``: int32 scalar, NaN/inf values ignored;
    ``count``: int32 scalar, updates that contained at least one finite value.
    """

    min_val: jax.Array
    max_val: jax.Array
    nonfinite: jax.Array
    count: jax.Array


def _check_spec(spec, compat) -> None:
    if not isinstance(spec, QuantSpec):
        raise TypeError(f"observer spec must be a QuantSpec, got {type(spec).__name__}")
    if compat not in COMPATS:
        raise ValueError(f"observer compat must be one of {COMPATS}, got {compat!r}")


def _prepare(x, spec: QuantSpec, state_shape: tuple[int, ...], name: str) -> jax.Array:
    """Validate an update batch: floating dtype and qparams shape matching the state."""
    x = check_float_input(x, f"{name} update")
    want = spec.qparams_shape(x.shape)
    if want != tuple(state_shape):
        raise ValueError(
            f"{name}: the state was initialised for qparams shape {tuple(state_shape)} but "
            f"update got x of shape {tuple(x.shape)}, which needs qparams shape {want} "
            f"under {spec}; call init with an example of the batch shape"
        )
    return x


def _init_minmax(example, spec: QuantSpec, name: str) -> MinMaxState:
    example = check_float_input(example, f"{name} init")
    shape = spec.qparams_shape(example.shape)
    return MinMaxState(
        min_val=jnp.full(shape, jnp.inf, jnp.float32),
        max_val=jnp.full(shape, -jnp.inf, jnp.float32),
        nonfinite=jnp.zeros((), jnp.int32),
        count=jnp.zeros((), jnp.int32),
    )


def minmax(spec: QuantSpec, *, compat: Compat = "qjax", axis_name: str | None = None) -> Observer:
    """Running min/max observer (torch ``MinMaxObserver`` / ``PerChannelMinMaxObserver``).

    ``min_val = min(min_val, min(x))``, ``max_val = max(max_val, max(x))`` over the finite
    values of each batch, per qparams entry of ``spec`` (per-tensor, per-axis or
    per-group). Inputs: any floating dtype (computed in float32); integer inputs raise
    ``TypeError``. State: :class:`MinMaxState` (float32 range, int32 counters).
    ``qparams(state)``: :class:`~qjax.QParams` with float32 scale, int32 zero point, from
    ``qparams_from_minmax(min_val, max_val, spec, compat=compat)``.

    Args:
      spec: the :class:`~qjax.QuantSpec` the qparams are for.
      compat: qparams formula, ``"qjax"``, ``"torch"``, ``"torch_fused"`` or ``"tflite"``.
      axis_name: inside ``shard_map``, the mesh axis the batch is split over; each update
        then reduces across it (``pmin``/``pmax``/``psum``).

    >>> import jax.numpy as jnp, qjax
    >>> obs = minmax(qjax.QuantSpec(signed=False), compat="torch")
    >>> st = obs.update(obs.init(jnp.zeros(3)), jnp.array([-1.0, 0.5, 2.0]))
    >>> st = obs.update(st, jnp.array([3.0, jnp.nan, 0.0]))
    >>> float(st.min_val), float(st.max_val), int(st.nonfinite), int(st.count)
    (-1.0, 3.0, 1, 2)
    >>> qp = obs.qparams(st)
    >>> float(qp.scale), int(qp.zero_point)      # 4 / 255, 0 - rint(-1 / s)
    (0.01568627543747425, 64)
    """
    _check_spec(spec, compat)

    def init(example) -> MinMaxState:
        return _init_minmax(example, spec, "minmax")

    def update(state: MinMaxState, x) -> MinMaxState:
        x = _prepare(x, spec, jnp.shape(state.min_val), "minmax")
        if x.size == 0:  # as torch: an empty batch changes nothing
            return state
        mn, mx, bad = finite_minmax(x, spec, axis_name)
        seen = jnp.any(jnp.isfinite(mn)).astype(jnp.int32)
        return MinMaxState(
            min_val=jnp.minimum(state.min_val, mn),
            max_val=jnp.maximum(state.max_val, mx),
            nonfinite=state.nonfinite + bad,
            count=state.count + seen,
        )

    def qparams(state: MinMaxState):
        return qparams_from_minmax(state.min_val, state.max_val, spec, compat=compat)

    return Observer(init, update, qparams)


def _check_averaging_constant(c) -> float:
    if isinstance(c, bool) or not isinstance(c, numbers.Real) or not 0.0 < float(c) <= 1.0:
        raise ValueError(f"averaging_constant must be a number in (0, 1], got {c!r}")
    return float(c)


def ema_minmax(
    spec: QuantSpec,
    *,
    averaging_constant: float = 0.01,
    compat: Compat = "qjax",
    axis_name: str | None = None,
) -> Observer:
    """Moving-average min/max observer (torch ``MovingAverage[PerChannel]MinMaxObserver``).

    The first batch with finite values sets ``min_val``/``max_val``; each later batch
    moves them towards its own finite range ``cur``:
    ``m = m + c · (cur - m)`` in float32 (each operation rounded to float32, as torch;
    ``c = float32(averaging_constant)``). The rule applies per qparams entry, so a
    channel whose slice had no finite values keeps its value. Inputs: any floating
    dtype (computed in float32); integer inputs raise ``TypeError``. State:
    :class:`MinMaxState`. ``qparams(state)``: float32 scale, int32 zero point from
    ``qparams_from_minmax(min_val, max_val, spec, compat=compat)``; use
    ``compat="torch_fused"`` for ``FusedMovingAvgObsFakeQuantize`` (the default QAT
    fake-quant), ``"torch"`` for the unfused observers and ``convert()``.

    Args:
      spec: the :class:`~qjax.QuantSpec` the qparams are for.
      averaging_constant: ``c`` in ``(0, 1]``; 1 keeps only the last batch.
      compat: qparams formula, ``"qjax"``, ``"torch"``, ``"torch_fused"`` or ``"tflite"``.
      axis_name: inside ``shard_map``, the mesh axis the batch is split over.

    >>> import jax.numpy as jnp, qjax
    >>> obs = ema_minmax(qjax.QuantSpec(), averaging_constant=0.5)
    >>> st = obs.update(obs.init(jnp.zeros(2)), jnp.array([-2.0, 2.0]))
    >>> st = obs.update(st, jnp.array([0.0, 4.0]))
    >>> float(st.min_val), float(st.max_val)   # -2 + 0.5·(0 + 2), 2 + 0.5·(4 - 2)
    (-1.0, 3.0)
    """
    _check_spec(spec, compat)
    c = jnp.float32(_check_averaging_constant(averaging_constant))

    def init(example) -> MinMaxState:
        return _init_minmax(example, spec, "ema_minmax")

    def update(state: MinMaxState, x) -> MinMaxState:
        x = _prepare(x, spec, jnp.shape(state.min_val), "ema_minmax")
        if x.size == 0:
            return state
        mn, mx, bad = finite_minmax(x, spec, axis_name)
        has = jnp.isfinite(mn)  # the slice had a finite value (then mx is finite too)
        fresh = jnp.isinf(state.min_val) | jnp.isinf(state.max_val)  # nothing seen yet

        def move(m, cur):
            # XLA:CPU lets LLVM contract ``m + c*d`` into one fma (a different rounding
            # from torch's). A select between the product and the add blocks that;
            # +0.0 (not -0.0) keeps LLVM from folding the add into the select.
            step = jnp.where(has & ~fresh, c * (cur - m), jnp.float32(0.0))
            return jnp.where(has, jnp.where(fresh, cur, m + step), m)

        return MinMaxState(
            min_val=move(state.min_val, mn),
            max_val=move(state.max_val, mx),
            nonfinite=state.nonfinite + bad,
            count=state.count + jnp.any(has).astype(jnp.int32),
        )

    def qparams(state: MinMaxState):
        return qparams_from_minmax(state.min_val, state.max_val, spec, compat=compat)

    return Observer(init, update, qparams)


def _require_axis(spec, fn: str) -> None:
    if not isinstance(spec, QuantSpec):
        raise TypeError(f"{fn}: spec must be a QuantSpec, got {type(spec).__name__}")
    if not spec.axes:
        raise ValueError(
            f"{fn} needs a per-axis spec (QuantSpec(axis=...)), got {spec}; "
            f"use {fn.removeprefix('per_channel_')} for per-tensor statistics"
        )


def per_channel_minmax(
    spec: QuantSpec, *, compat: Compat = "qjax", axis_name: str | None = None
) -> Observer:
    """:func:`minmax` for a per-axis spec (torch ``PerChannelMinMaxObserver``).

    Same formula, dtypes and state as :func:`minmax`; raises ``ValueError`` if
    ``spec.axis`` is not set.

    >>> import jax.numpy as jnp, qjax
    >>> obs = per_channel_minmax(qjax.QuantSpec(symmetric=True, axis=0))
    >>> st = obs.update(obs.init(jnp.zeros((2, 3))), jnp.array([[1.0, -2, 0], [0, 0, 5]]))
    >>> st.min_val, st.max_val
    (Array([-2.,  0.], dtype=float32), Array([1., 5.], dtype=float32))
    """
    _require_axis(spec, "per_channel_minmax")
    return minmax(spec, compat=compat, axis_name=axis_name)


def per_channel_ema_minmax(
    spec: QuantSpec,
    *,
    averaging_constant: float = 0.01,
    compat: Compat = "qjax",
    axis_name: str | None = None,
) -> Observer:
    """:func:`ema_minmax` for a per-axis spec (``MovingAveragePerChannelMinMaxObserver``).

    Same formula, dtypes and state as :func:`ema_minmax`; raises ``ValueError`` if
    ``spec.axis`` is not set.

    >>> import jax.numpy as jnp, qjax
    >>> obs = per_channel_ema_minmax(qjax.QuantSpec(axis=1), averaging_constant=0.5)
    >>> st = obs.update(obs.init(jnp.zeros((1, 2))), jnp.array([[1.0, -1.0]]))
    >>> obs.update(st, jnp.array([[3.0, -3.0]])).max_val
    Array([ 2., -2.], dtype=float32)
    """
    _require_axis(spec, "per_channel_ema_minmax")
    return ema_minmax(
        spec, averaging_constant=averaging_constant, compat=compat, axis_name=axis_name
    )
