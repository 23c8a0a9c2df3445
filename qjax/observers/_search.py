"""Range-search observers over a streaming histogram: percentile and MSE-optimal clipping.

Both observers keep one fixed-shape state, :class:`SearchState`: the exact running
min/max and a histogram of ``n = num_bins`` equal bins over ``[-bound, bound)``, where
``bound`` is the smallest power of two above every ``|x|`` seen (0 until a non-zero
value arrives); ``x`` goes to bin ``n/2 + floor(x·(n/2)/bound)``. When a batch exceeds
the bound it grows by ``2^k`` and old bin ``i`` is merged into bin
``n/2 + floor((i - n/2)/2^k)``, which contains it exactly (``n`` is even), so streaming
equals binning all the data at once. Only ``qparams`` differs:

=================  ===========================================================================
observer           range handed to ``qparams_from_minmax``
=================  ===========================================================================
:func:`percentile`  affine: ``[P_(100-p)(x), P_p(x)]``; symmetric: ``[-P_p(|x|), P_p(|x|)]``;
                   percentiles read from the histogram's CDF, linear inside a bin, then
                   clamped to the exact ``[min, max]`` seen (so ``p=100`` gives min/max)
:func:`mse`        the candidate ``[a·min⁻, a·max⁺]`` (symmetric: ``a·[-amax, amax]``),
                   ``a = k/N, k = 1..N``, minimising the expected squared error of
                   fake-quantizing the histogram (values uniform within a bin): outside the
                   candidate's representable range ``[s(qmin-z), s(qmax-z)]`` the clipping
                   error ``∫(x - clip(x))²``, inside the rounding error
                   ``∫(x - s·round(x/s))²`` integrated exactly (``s²/12`` per value for bins
                   much wider than ``s``; ``s, z`` = the candidate's qparams under ``compat``)
=================  ===========================================================================

Both are per-tensor only (a per-axis or per-group spec raises ``ValueError``): a
histogram per channel would multiply the state by the channel count. Counts are
float32 (exact up to 2^24 values per bin; beyond, relative error ~1e-7). NaN/inf values
are ignored and counted in ``state.nonfinite``; an observer that saw nothing gives
``scale = 1.0``.
"""

from __future__ import annotations

import numbers
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from .._float import pow2
from .._qparams import Compat, qparams_from_minmax
from .._spec import QuantSpec
from ._base import Observer, check_float_input, finite_minmax
from ._minmax import _check_spec, _prepare


class SearchState(NamedTuple):
    """State of :func:`percentile` and :func:`mse` (a pytree of arrays).

    ``min_val``, ``max_val``: float32 scalars, the exact running range (``+inf``/``-inf``
    until a finite value is seen); ``hist``: float32 ``(num_bins,)`` counts of equal bins
    over ``[-bound, bound)``; ``bound``: float32 scalar, a power of two above every
    ``|x|`` seen (0 until a non-zero value is seen); ``nonfinite``: int32 scalar;
    ``count``: int32 scalar, updates with a finite value.
    """

    min_val: jax.Array
    max_val: jax.Array
    hist: jax.Array
    bound: jax.Array
    nonfinite: jax.Array
    count: jax.Array


def _check_per_tensor(spec: QuantSpec, fn: str) -> None:
    if spec.granularity != "tensor":
        raise ValueError(
            f"{fn} is per-tensor only (one histogram per tensor), got {spec}; use "
            "minmax/ema_minmax for per-axis or per-group qparams"
        )


def _check_int(v, name: str, lo: int) -> int:
    if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < lo:
        raise ValueError(f"{name} must be an int >= {lo}, got {v!r}")
    return int(v)


def _update(state: SearchState, x, spec: QuantSpec, axis_name, name: str) -> SearchState:
    x = _prepare(x, spec, (), name)
    if x.size == 0:
        return state
    n = state.hist.shape[0]
    half = n // 2
    mn, mx, bad = finite_minmax(x, spec, axis_name)
    new_min = jnp.minimum(state.min_val, mn)
    new_max = jnp.maximum(state.max_val, mx)
    observed = jnp.isfinite(new_min)
    amax = jnp.where(observed, jnp.maximum(jnp.abs(new_min), jnp.abs(new_max)), 0.0)

    # The bound is 0 (nothing non-zero seen) or the smallest power of two above amax,
    # so every value is strictly inside; growing by 2^k merges old bins exactly.
    bound = state.bound
    target = jnp.clip(jnp.frexp(amax)[1], -125, 127)  # amax < 2^target
    grow = (amax > 0) & (amax >= bound)
    old_exp = jnp.frexp(bound)[1] - 1  # bound == 2^old_exp when bound > 0
    k = jnp.where(grow & (bound > 0), jnp.clip(target - old_exp, 0, 64), 0)
    new_bound = jnp.where(grow, pow2(target), bound)
    i = jnp.arange(n, dtype=jnp.int32)
    dest = half + jnp.floor((i - half).astype(jnp.float32) * pow2(-k)).astype(jnp.int32)
    hist = jnp.zeros_like(state.hist).at[dest].add(state.hist)

    # Bin the batch: x in [-B, B) -> half + floor(x·half/B), clipped to the bins.
    xf = x.astype(jnp.float32).ravel()
    fin = jnp.isfinite(xf)
    per_unit = jnp.float32(half) / jnp.where(new_bound > 0, new_bound, jnp.float32(1.0))
    pos = jnp.floor(jnp.where(fin, xf, 0.0) * per_unit)
    idx = (jnp.clip(pos, -half, half - 1) + half).astype(jnp.int32)
    batch = jnp.zeros_like(state.hist).at[idx].add(fin.astype(jnp.float32))
    if axis_name is not None:
        batch = lax.psum(batch, axis_name)
    return SearchState(
        min_val=new_min,
        max_val=new_max,
        hist=hist + batch,
        bound=new_bound,
        nonfinite=state.nonfinite + bad,
        count=state.count + jnp.isfinite(mn).astype(jnp.int32),
    )


def _init(example, spec: QuantSpec, num_bins: int, name: str) -> SearchState:
    example = check_float_input(example, f"{name} init")
    spec.qparams_shape(example.shape)  # validates the spec against the rank
    return SearchState(
        min_val=jnp.full((), jnp.inf, jnp.float32),
        max_val=jnp.full((), -jnp.inf, jnp.float32),
        hist=jnp.zeros((num_bins,), jnp.float32),
        bound=jnp.zeros((), jnp.float32),
        nonfinite=jnp.zeros((), jnp.int32),
        count=jnp.zeros((), jnp.int32),
    )


def _bins(state: SearchState, symmetric: bool):
    """(counts, lower edges, width): signed bins, or |x| bins folded around 0."""
    n = state.hist.shape[0]
    half = n // 2
    w = state.bound / jnp.float32(half)
    if symmetric:
        counts = state.hist[half:] + state.hist[:half][::-1]
        lo = jnp.arange(half, dtype=jnp.float32) * w
    else:
        counts = state.hist
        lo = (jnp.arange(n, dtype=jnp.float32) - jnp.float32(half)) * w
    return counts, lo, w


def _quantile(counts, lo, w, q: float) -> jax.Array:
    """Value below which a fraction ``q`` of the histogram lies (linear within a bin)."""
    cdf = jnp.cumsum(counts)
    target = jnp.float32(q) * cdf[-1]
    b = jnp.clip(jnp.searchsorted(cdf, target, side="left"), 0, counts.shape[0] - 1)
    prev = cdf[b] - counts[b]
    frac = jnp.clip((target - prev) / jnp.maximum(counts[b], jnp.float32(1.0)), 0.0, 1.0)
    return lo[b] + frac * w


def _empty_if_unobserved(state: SearchState, lo, hi):
    observed = jnp.isfinite(state.min_val) & jnp.isfinite(state.max_val)
    return (
        jnp.where(observed, lo, jnp.float32(jnp.inf)),
        jnp.where(observed, hi, jnp.float32(-jnp.inf)),
    )


def _percentile_range(state: SearchState, spec: QuantSpec, p: float):
    mn, mx = state.min_val, state.max_val
    if spec.symmetric:
        amax = jnp.maximum(jnp.abs(mn), jnp.abs(mx))
        u = jnp.minimum(_quantile(*_bins(state, True), p / 100.0), amax)
        lo, hi = -u, u
    else:
        counts, edges, w = _bins(state, False)
        lo = jnp.clip(_quantile(counts, edges, w, 1.0 - p / 100.0), mn, mx)
        hi = jnp.clip(_quantile(counts, edges, w, p / 100.0), mn, mx)
    return _empty_if_unobserved(state, lo, hi)


def _sawtooth_integral(t: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``∫_{-1/2}^{t} (u - round(u))² du`` as (whole periods, remainder): the sum is
    ``n/12 + ((r - 1/2)³ + 1/8)/3`` with ``n = floor(t + 1/2)``, ``r = t + 1/2 - n``.
    Kept apart so that differences of nearby ``t`` stay accurate in float32."""
    v = t + jnp.float32(0.5)
    n = jnp.floor(v)
    r = v - n
    return n, (jnp.power(r - jnp.float32(0.5), 3) + jnp.float32(0.125)) / jnp.float32(3.0)


def _mse_range(state: SearchState, spec: QuantSpec, compat: Compat, num_candidates: int):
    mn = jnp.where(jnp.isfinite(state.min_val), state.min_val, 0.0)
    mx = jnp.where(jnp.isfinite(state.max_val), state.max_val, 0.0)
    a = jnp.arange(1, num_candidates + 1, dtype=jnp.float32) / jnp.float32(num_candidates)
    if spec.symmetric:
        amax = jnp.maximum(jnp.abs(mn), jnp.abs(mx))
        lo, hi = -amax * a, amax * a
    else:
        lo, hi = jnp.minimum(mn, 0.0) * a, jnp.maximum(mx, 0.0) * a
    qp = qparams_from_minmax(lo, hi, spec, compat=compat)
    # Work in units of the bound (a power of two: exact), so cubes cannot overflow.
    unit = jnp.where(state.bound > 0, state.bound, jnp.float32(1.0))
    s = (qp.scale / unit)[:, None]
    z = qp.zero_point.astype(jnp.float32)[:, None]
    rep_lo = s * (jnp.float32(spec.qmin) - z)
    rep_hi = s * (jnp.float32(spec.qmax) - z)
    counts, edges, w = _bins(state, False)
    w = jnp.where(w > 0, w / unit, jnp.float32(1.0))  # w == 0: only zeros were seen
    b0 = (edges / unit)[None, :]
    b1 = b0 + w
    # Values spread uniformly over each bin: integrate the squared error over the part
    # of the bin inside the representable range (rounding, a sawtooth of period s) and
    # over the parts beyond it (distance to the clip point).
    in0 = jnp.clip(b0, rep_lo, rep_hi)
    in1 = jnp.clip(b1, rep_lo, rep_hi)
    n0, p0 = _sawtooth_integral(in0 / s)
    n1, p1 = _sawtooth_integral(in1 / s)
    rounding = jnp.power(s, 3) * ((n1 - n0) / jnp.float32(12.0) + (p1 - p0))
    above = jnp.power(jnp.maximum(b1 - rep_hi, 0.0), 3) - jnp.power(
        jnp.maximum(b0 - rep_hi, 0.0), 3
    )
    below = jnp.power(jnp.maximum(rep_lo - b0, 0.0), 3) - jnp.power(
        jnp.maximum(rep_lo - b1, 0.0), 3
    )
    per_bin = rounding + (above + below) / jnp.float32(3.0)
    err = jnp.sum(per_bin * counts[None, :], axis=1) / w
    best = jnp.argmin(err)
    return _empty_if_unobserved(state, lo[best], hi[best])


def percentile(
    spec: QuantSpec,
    *,
    percentile: float = 99.99,
    compat: Compat = "qjax",
    num_bins: int = 2048,
    axis_name: str | None = None,
) -> Observer:
    """Percentile-clipping observer over a streaming histogram (per-tensor only).

    Range: affine specs ``[P_(100-p)(x), P_p(x)]``, symmetric specs
    ``[-P_p(|x|), P_p(|x|)]``, with ``P`` read from the histogram (bin width
    ``2·bound/num_bins``, linear inside a bin) and clamped to the exact min/max seen.
    Inputs: any floating dtype (float32 inside), any shape; integer inputs raise
    ``TypeError``. State: :class:`SearchState` (float32 statistics, int32 counters).
    ``qparams(state)``: float32 scale, int32 zero point from ``qparams_from_minmax``.

    Args:
      spec: a per-tensor :class:`~qjax.QuantSpec` (per-axis/per-group: ``ValueError``).
      percentile: ``p`` in ``(50, 100]``; 100 is the plain min/max.
      compat: qparams formula, ``"qjax"``, ``"torch"``, ``"torch_fused"`` or ``"tflite"``.
      num_bins: an even number of histogram bins (resolution ``2·bound/num_bins``;
        a power of two keeps the binning exact).
      axis_name: inside ``shard_map``, the mesh axis the batch is split over.

    >>> import jax.numpy as jnp, qjax
    >>> obs = percentile(qjax.QuantSpec(symmetric=True), percentile=99.0)
    >>> x = jnp.concatenate([jnp.linspace(-1.0, 1.0, 999), jnp.array([50.0])])
    >>> st = obs.update(obs.init(x), x)
    >>> round(float(obs.qparams(st).scale) * 127, 1)   # |x| <= 1 for 99.9%: 50 is clipped
    1.0
    """
    _check_spec(spec, compat)
    _check_per_tensor(spec, "percentile")
    if isinstance(percentile, bool) or not isinstance(percentile, numbers.Real):
        raise ValueError(f"percentile must be a number in (50, 100], got {percentile!r}")
    if not 50.0 < float(percentile) <= 100.0:
        raise ValueError(f"percentile must be in (50, 100], got {percentile}")
    p = float(percentile)
    n = _check_int(num_bins, "num_bins", 2)
    if n % 2:
        raise ValueError(f"num_bins must be even (bins mirror around 0), got {num_bins}")

    def init(example) -> SearchState:
        return _init(example, spec, n, "percentile")

    def update(state: SearchState, x) -> SearchState:
        return _update(state, x, spec, axis_name, "percentile")

    def qparams(state: SearchState):
        lo, hi = _percentile_range(state, spec, p)
        return qparams_from_minmax(lo, hi, spec, compat=compat)

    return Observer(init, update, qparams)


def mse(
    spec: QuantSpec,
    *,
    compat: Compat = "qjax",
    num_candidates: int = 100,
    num_bins: int = 2048,
    axis_name: str | None = None,
) -> Observer:
    """MSE-optimal clipping observer over a streaming histogram (per-tensor only).

    Among ``[a·min⁻, a·max⁺]`` (symmetric: ``a·[-amax, amax]``), ``a = k/N`` for
    ``k = 1..N``, picks the range whose qparams ``s, z`` (under ``compat``) minimise the
    expected squared error over the histogram, values spread uniformly in each bin:
    ``Σ_bins (h/w)·∫_bin e(x) dx`` with ``e(x) = (x - clip(x))²`` outside the
    representable range ``[s(qmin-z), s(qmax-z)]`` and ``(x - s·round(x/s))²`` inside
    (about ``s²/12`` per value where bins are wider than ``s``). Ties go to the smallest
    ``a``. Inputs: any floating dtype
    (float32 inside), any shape; integer inputs raise ``TypeError``. State:
    :class:`SearchState`. ``qparams(state)``: float32 scale, int32 zero point.

    Args:
      spec: a per-tensor :class:`~qjax.QuantSpec` (per-axis/per-group: ``ValueError``).
      compat: qparams formula, ``"qjax"``, ``"torch"``, ``"torch_fused"`` or ``"tflite"``.
      num_candidates: ``N``, the number of shrink factors tried.
      num_bins: an even number of histogram bins.
      axis_name: inside ``shard_map``, the mesh axis the batch is split over.

    >>> import jax.numpy as jnp, qjax
    >>> obs = mse(qjax.QuantSpec(bits=4, symmetric=True))
    >>> x = jnp.concatenate([jnp.linspace(-1.0, 1.0, 999), jnp.array([50.0])])
    >>> st = obs.update(obs.init(x), x)
    >>> float(obs.qparams(st).scale) < 50.0 / 7    # the outlier is clipped
    True
    """
    _check_spec(spec, compat)
    _check_per_tensor(spec, "mse")
    nc = _check_int(num_candidates, "num_candidates", 1)
    n = _check_int(num_bins, "num_bins", 2)
    if n % 2:
        raise ValueError(f"num_bins must be even (bins mirror around 0), got {num_bins}")

    def init(example) -> SearchState:
        return _init(example, spec, n, "mse")

    def update(state: SearchState, x) -> SearchState:
        return _update(state, x, spec, axis_name, "mse")

    def qparams(state: SearchState):
        lo, hi = _mse_range(state, spec, compat, nc)
        return qparams_from_minmax(lo, hi, spec, compat=compat)

    return Observer(init, update, qparams)
