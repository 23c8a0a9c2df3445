"""Histogram observer: PyTorch's ``HistogramObserver`` as pure functions over a pytree.

The state is a fixed-size float32 histogram over the running range ``[min_val, max_val]``
of every finite value seen (:class:`HistogramState`). :func:`histogram` returns an
:class:`~qjax.observers.Observer` whose three functions follow torch 2.13's
``torch.ao.quantization.HistogramObserver`` step by step:

**update** (``forward``), for a batch with finite range ``[a, b]``:

1. ``lo = min(min_val, a)``, ``hi = max(max_val, b)``; the batch is binned on
   ``[lo, hi]`` as ``torch.histc`` does: ``bin = trunc((x - lo) * bins / (hi - lo))``
   in float32, the last edge folded into the last bin, and ``lo - 1 .. hi + 1`` when
   ``lo == hi``.
2. The old histogram is brought onto the new range: added as is when the range did
   not change (always the case for the first batch, whose old histogram is empty);
   put in the bin of ``min_val`` when it is a single point; otherwise each old bin is
   split into ``upsample_rate`` equal parts whose mid-points are bucketed into the new
   bins (``_combine_histograms`` / ``_upscale_histogram``).

**qparams** (``calculate_qparams``): the L2 range search of
``_non_linear_param_search``. With ``c = cumsum(histogram)``, ``T = sum(histogram)``
and quantile bounds ``alpha = 0``, ``beta = 1`` moved by ``1e-5`` per step, the
candidate start bin ``l`` is the first bin with ``c[l] >= (alpha + 1e-5) T`` and the
candidate end bin ``r`` the last with ``c[r] <= (beta - 1e-5) T``; whichever end would
move further moves. Each candidate ``[s, e]`` is scored by the L2 error of quantizing
the histogram (density uniform within a bin) onto ``2**bits`` bins of width
``w' = w (e - s + 1) / 2**bits``, ``w = (max_val - min_val) / bins``::

    err = sum_i d_i [ (w'/2)^3 - db_i^3 ] / 3          # part of the first dst bin
        + (n_i - 1) d_i [ (w'/2)^3 + (w'/2)^3 ] / 3   # dst bins covered entirely
        + d_i [ de_i^3 + (w'/2)^3 ] / 3               # part of the last dst bin

with ``d_i = hist_i / w``, ``db_i``/``de_i`` the offsets of source bin ``i``'s begin
and end from the centres of the destination bins they fall in, and ``n_i`` the
number of destination bins it spans. The search stops at the first candidate whose
error exceeds the best so far; the range is ``min_val + w s .. min_val + w (e + 1)``
and goes through :func:`qjax.qparams_from_minmax` with the observer's ``compat``.

torch's loop takes one ``1e-5`` step per Python iteration (up to 10^5 of them); here
a ``lax.while_loop`` runs only the steps that change the candidate, jumping over the
steps that leave it unchanged with a binary search, so the result is the same and
the loop runs at most ``bins + 1`` times (usually a handful).

Precision, as torch's CPU kernels: the histogram, thresholds and errors are float32;
the quantile bounds are the same float64 running sums, the cumulative sum is
accumulated in float64 and rounded to float32 (``torch.cumsum``), and the bin widths
of the error are float64 before rounding (Python floats in torch);
``jax.enable_x64`` is switched on inside the functions for those, so no global x64
is needed. Two XLA:CPU rewrites that torch's eager kernels do not make are undone:
a division by a scalar becoming a multiply by its reciprocal (``qjax._float.div_ieee``) and
``a * b + c`` fused into one FMA (``qjax._float.mul_f32``); torch's own ``linspace`` kernel *is*
FMA-contracted, which ``_torch_linspace`` reproduces. What remains different:
an error sum is rounded once from float64 where torch sums float32 in its own order,
which can change the result only when two consecutive candidates' errors agree to
within an ulp. In the tests (and 300+ further random cases) histogram, range and
qparams equal torch's bit for bit; the guarantee is a range within one bin.

Differences from torch: NaN is ignored and counted (torch's min/max would become
NaN), as is ``±inf`` (torch drops it with a warning); ``upsample_rate`` defaults to
torch 2.13's value, 16.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from .._float import div_ieee, mul_f32, opaque_one
from .._qparams import COMPATS, Compat, qparams_from_minmax
from .._spec import QParams, QuantSpec
from ._base import Observer, check_float_input, finite_minmax

__all__ = ["HistogramState", "histogram"]

_STEP = 1e-5  # torch's quantile step ("stepsize")
_TABLE = 100_005  # alpha/beta steps: alpha < beta allows at most ~1e5 of them


class HistogramState(NamedTuple):
    """State of :func:`histogram`; every field keeps its shape and dtype across updates.

    ``histogram``: float32[bins], counts of finite values over ``[min_val, max_val]``
    (fractional after a range change re-bins old counts). ``min_val``/``max_val``:
    float32 scalars, ``+inf``/``-inf`` until a finite value is seen. ``nonfinite``:
    int32, NaN/inf values ignored so far. ``count``: int32, number of updates applied.
    """

    histogram: jax.Array
    min_val: jax.Array
    max_val: jax.Array
    nonfinite: jax.Array
    count: jax.Array


def histogram(
    spec: QuantSpec,
    *,
    bins: int = 2048,
    upsample_rate: int = 16,
    compat: Compat = "qjax",
    axis_name: str | None = None,
) -> Observer:
    """Histogram observer with torch's L2 range search (``HistogramObserver``).

    The algorithm and its precision are described in this module's docstring.

    Args:
      spec: a per-tensor :class:`~qjax.QuantSpec`; its ``bits`` set the ``2**bits``
        destination bins of the error search (torch: the dtype's bits, even under
        ``reduce_range``), its range and symmetry the final qparams.
      bins: histogram bins (torch's ``bins``).
      upsample_rate: parts each old bin is split into when the range grows (torch
        2.13 uses 16).
      compat: qparams formula for the searched range, see
        :func:`qjax.qparams_from_minmax`; ``"torch"`` reproduces
        ``HistogramObserver.calculate_qparams``.
      axis_name: inside ``shard_map``, the mesh axis the batch is sharded over; each
        update then reduces min/max (``pmin``/``pmax``) and counts (``psum``) across it.

    Returns:
      An :class:`~qjax.observers.Observer`: ``init(example) -> HistogramState``,
      ``update(state, x) -> HistogramState`` (``x`` any floating dtype, binned in
      float32; jit-able, fixed shapes), ``qparams(state) -> QParams`` (float32 scale,
      int32 zero point, shape ``()``).

    >>> import jax.numpy as jnp, qjax
    >>> obs = qjax.observers.histogram(qjax.QuantSpec(bits=8, signed=False), compat="torch")
    >>> x = jnp.linspace(-1.0, 3.0, 1001)
    >>> state = obs.update(obs.init(x), x)
    >>> float(state.histogram.sum()), float(state.min_val), float(state.max_val)
    (1001.0, -1.0, 3.0)
    >>> qp = obs.qparams(state)  # as torch's HistogramObserver.calculate_qparams()
    >>> round(float(qp.scale) * 255, 3), int(qp.zero_point)  # searched range: 3.998 wide
    (3.998, 64)
    """
    if not isinstance(spec, QuantSpec):
        raise TypeError(f"spec must be a QuantSpec, got {type(spec).__name__}")
    if spec.granularity != "tensor":
        raise ValueError(
            f"histogram observer is per-tensor only (as torch's HistogramObserver); got "
            f"a per-{spec.granularity} spec {spec!r}"
        )
    for name, v, lo in (("bins", bins, 1), ("upsample_rate", upsample_rate, 1)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < lo:
            raise ValueError(f"histogram: {name} must be a positive int, got {v!r}")
    if bins * upsample_rate >= 2**24:
        raise ValueError(
            f"histogram: bins * upsample_rate = {bins * upsample_rate} must stay below "
            "2**24 so bin positions are exact in float32"
        )
    if compat not in COMPATS:
        raise ValueError(f"compat must be one of {COMPATS}, got {compat!r}")
    bins, upsample_rate = int(bins), int(upsample_rate)
    dst_nbins = 2**spec.bits

    def init(example) -> HistogramState:
        check_float_input(example, "histogram observer init")
        return HistogramState(
            histogram=jnp.zeros((bins,), jnp.float32),
            min_val=jnp.full((), jnp.inf, jnp.float32),
            max_val=jnp.full((), -jnp.inf, jnp.float32),
            nonfinite=jnp.zeros((), jnp.int32),
            count=jnp.zeros((), jnp.int32),
        )

    def update(state: HistogramState, x) -> HistogramState:
        x = check_float_input(x, "histogram observer update")
        _check_state(state, bins)
        if x.size == 0:  # torch returns early; nothing to bin
            return state._replace(count=state.count + 1)
        return _update(state, x, bins=bins, upsample_rate=upsample_rate, axis_name=axis_name)

    def qparams(state: HistogramState) -> QParams:
        _check_state(state, bins)
        new_min, new_max = _search_range(
            state.histogram, state.min_val, state.max_val, dst_nbins=dst_nbins
        )
        return qparams_from_minmax(new_min, new_max, spec, compat=compat)

    return Observer(init=init, update=update, qparams=qparams)


def _check_state(state, bins: int) -> None:
    if not isinstance(state, HistogramState):
        raise TypeError(f"expected a HistogramState, got {type(state).__name__}")
    h = state.histogram
    if jnp.shape(h) != (bins,) or jnp.result_type(h) != jnp.float32:
        raise ValueError(
            f"HistogramState.histogram must be float32[{bins}], got "
            f"{jnp.result_type(h)}{list(jnp.shape(h))}"
        )


# ----------------------------------------------------------------------------- update


@functools.partial(jax.jit, static_argnames=("bins", "upsample_rate", "axis_name"))
def _update(state: HistogramState, x, *, bins: int, upsample_rate: int, axis_name):
    x = x.astype(jnp.float32).reshape(-1)
    mn, mx, bad = _batch_minmax(x)
    if axis_name is not None:
        mn = lax.pmin(mn, axis_name)
        mx = lax.pmax(mx, axis_name)
        bad = lax.psum(bad, axis_name)
    old_min, old_max = state.min_val, state.max_val
    lo = jnp.minimum(old_min, mn)
    hi = jnp.maximum(old_max, mx)
    new = _histc(x, lo, hi, bins)
    if axis_name is not None:
        new = lax.psum(new, axis_name)
    # torch sums the batch's counts first, then adds them to the histogram; keep XLA
    # from scattering straight into the (possibly fractional) old histogram.
    new = lax.optimization_barrier(new)
    initialized = old_min <= old_max
    unchanged = (lo == old_min) & (hi == old_max)
    branch = jnp.where(~initialized | unchanged, 0, jnp.where(old_min == old_max, 1, 2))

    def same_range(h):
        return h + new

    def from_point(h):
        # torch: histc(min_val, range=[lo, hi]) * sum(hist); all old mass is one point.
        pos = _bin_index(old_min, lo, hi, bins)
        return jnp.zeros_like(h).at[pos].set(jnp.sum(h)) + new

    def upscale(h):
        return new + _upscale(h, old_min, old_max, lo, hi, bins, upsample_rate)

    hist = lax.switch(branch, (same_range, from_point, upscale), state.histogram)
    return HistogramState(
        histogram=hist,
        min_val=lo,
        max_val=hi,
        nonfinite=state.nonfinite + bad,
        count=state.count + 1,
    )


def _batch_minmax(x):
    """Finite min/max and non-finite count; a plain min/max pass when all is finite."""
    # One pass for both (a variadic reduce); NaN propagates, so finite results prove
    # the batch clean and the masked pass of finite_minmax is skipped.
    mn, mx = lax.reduce(
        (x, x),
        (jnp.float32(jnp.inf), jnp.float32(-jnp.inf)),
        lambda a, b: (lax.min(a[0], b[0]), lax.max(a[1], b[1])),
        (0,),
    )
    clean = jnp.isfinite(mn) & jnp.isfinite(mx)
    return lax.cond(
        clean,
        lambda v: (mn, mx, jnp.zeros_like(mn, dtype=jnp.int32)),
        lambda v: finite_minmax(v, QuantSpec()),
        x,
    )


def _bin_index(v, lo, hi, bins: int):
    """``torch.histc``'s bin of ``v`` in ``[lo, hi]`` (float32, edges ±1 if lo == hi)."""
    point = lo == hi
    left = jnp.where(point, lo - 1, lo)
    right = jnp.where(point, hi + 1, hi)
    pos = div_ieee((v - left) * jnp.float32(bins), right - left)
    # Callers mask non-finite v; a NaN position (only from a range overflowing float32,
    # undefined in torch too) converts to bin 0: XLA's float->int conversion saturates.
    return jnp.clip(pos, 0, bins - 1).astype(jnp.int32)


def _histc(x, lo, hi, bins: int):
    """Counts of the finite values of ``x`` in ``bins`` bins over ``[lo, hi]``."""
    idx = jnp.where(jnp.isfinite(x), _bin_index(x, lo, hi, bins), bins)  # bins: dropped
    return jnp.zeros((bins,), jnp.float32).at[idx].add(1.0, mode="drop")


def _torch_linspace(start, end, steps: int):
    """``torch.linspace`` in float32, as torch's CPU kernel computes it.

    The first half is ``fma(step, i, start)``, the second ``fma(-step, steps-1-i, end)``
    (the C++ is contracted to fused multiply-adds). The product is exact in float64,
    so the one float64 rounding of the sum stands in for the fused one.
    """
    f64 = jnp.float64
    step = div_ieee(end - start, jnp.float32(steps - 1))
    i = jnp.arange(steps, dtype=jnp.int32)
    with jax.enable_x64(True):
        st, s0, s1 = step.astype(f64), start.astype(f64), end.astype(f64)
        up = s0 + st * i.astype(f64)
        down = s1 - st * (steps - 1 - i).astype(f64)
        out = jnp.where(i < steps // 2, up, down).astype(jnp.float32)
    return out


def _upscale(h, old_min, old_max, lo, hi, bins: int, rate: int):
    """Old histogram on ``[old_min, old_max]`` re-binned onto ``[lo, hi]`` (torch's way).

    Each old bin is split into ``rate`` parts of ``h / rate`` whose mid-points are
    bucketed (right-closed, as ``torch.bucketize(right=True) - 1``) into the new bins.
    """
    n = bins * rate
    fine = div_ieee(jnp.repeat(h, rate), jnp.float32(rate))
    size = div_ieee(old_max - old_min, jnp.float32(n))
    mids = _torch_linspace(old_min, old_max, n + 1)[:-1] + jnp.float32(0.5) * size
    edges = _torch_linspace(lo, hi, bins + 1)
    # Number of edges <= mid, from an arithmetic guess corrected against the edges.
    guess = (mids - lo) * jnp.float32(bins) / (hi - lo)
    guess = jnp.clip(jnp.where(jnp.isfinite(guess), guess, 0.0), 0, bins)
    k = guess.astype(jnp.int32) + 1
    padded = jnp.concatenate(
        [jnp.full((1,), -jnp.inf, jnp.float32), edges, jnp.full((1,), jnp.inf, jnp.float32)]
    )
    for _ in range(2):
        k = k - (padded[k] > mids).astype(jnp.int32)
        k = k + (padded[k + 1] <= mids).astype(jnp.int32)
    b = jnp.clip(k - 1, 0, bins - 1)
    out = jnp.zeros((bins,), jnp.float32).at[b].add(fine, mode="promise_in_bounds")
    # torch adds the new counts after this sum; keep XLA from starting the scatter there.
    return lax.optimization_barrier(out)


# ----------------------------------------------------------------------------- search


@functools.cache
def _quantile_tables() -> tuple[np.ndarray, np.ndarray]:
    """torch's ``alpha``/``beta`` after k steps: running float64 sums of ``1e-5``."""
    steps = np.full(_TABLE - 1, _STEP)
    alpha = np.add.accumulate(np.concatenate([[0.0], steps]))
    beta = np.subtract.accumulate(np.concatenate([[1.0], steps]))
    return alpha, beta


def _search_range(hist, min_val, max_val, *, dst_nbins: int):
    """The L2-optimal ``[new_min, new_max]`` (float32 scalars); the input range if unset."""
    return _search_jit(hist, min_val, max_val, dst_nbins=dst_nbins)


@functools.partial(jax.jit, static_argnames=("dst_nbins",))
def _search_jit(hist, min_val, max_val, *, dst_nbins: int):
    f32 = jnp.float32
    bins = hist.shape[0]
    observed = min_val <= max_val
    mn = jnp.where(observed, min_val, f32(0.0))
    mx = jnp.where(observed, max_val, f32(0.0))
    h = jnp.where(observed, hist, f32(0.0))
    with jax.enable_x64(True):
        start, end = _search_bins(h, mn, mx, dst_nbins)
    width = div_ieee(mx - mn, f32(bins))
    one = opaque_one(mn)
    new_min = mn + mul_f32(width, start.astype(f32), one)
    new_max = mn + mul_f32(width, (end + 1).astype(f32), one)
    # Never observed: hand the empty range on, qparams_from_minmax gives its default.
    return jnp.where(observed, new_min, min_val), jnp.where(observed, new_max, max_val)


def _search_bins(h, mn, mx, dst_nbins: int):
    """torch's ``_non_linear_param_search`` loop -> (start_bin, end_bin), int32.

    Runs under ``jax.enable_x64``. Loop state: ``ka``/``kb`` = steps taken by
    alpha/beta, ``[s, e]`` = current bins, ``best`` = smallest error so far.
    """
    f32, f64, i32 = jnp.float32, jnp.float64, jnp.int32
    bins = h.shape[0]
    alpha, beta = (jnp.asarray(t, f64) for t in _quantile_tables())  # f64 constants
    n_tab = alpha.shape[0]
    total = jnp.sum(h.astype(f64)).astype(f32).astype(f64)  # torch.sum(hist).item()
    csum = jnp.cumsum(h.astype(f64)).astype(f32)  # torch.cumsum: float64 accumulator
    width = div_ieee(mx.astype(f64) - mn.astype(f64), f64(bins))  # Python float in torch
    one = opaque_one(mn)
    density = div_ieee(h, width.astype(f32))  # loop-invariant part of the error

    def thr(table, k):  # f32(step_k * total): the Python float meets a float32 tensor
        return (table[k] * total).astype(f32)

    def jump_end(kb, e):
        """Smallest kb' >= kb whose end threshold falls below csum[e] (n_tab-1 if none).

        A binary search over the (non-increasing) thresholds, unrolled: 17 steps cover
        the table, and scalar steps are cheaper inline than as loop iterations.
        """
        c = csum[e]
        lo, hi = kb, i32(n_tab - 1)
        for _ in range(int(np.ceil(np.log2(n_tab)))):
            mid = (lo + hi) // 2
            hit = thr(beta, jnp.minimum(mid + 1, n_tab - 1)) < c
            lo, hi = jnp.where(hit, lo, mid + 1), jnp.where(hit, mid, hi)
        return lo

    def cond(carry):
        return ~carry[-1]

    def body(carry):
        ka, kb, s, e, best, _ = carry
        # torch's l: the first bin with c[l] >= thr, searched within [s, e]
        left = jnp.clip(jnp.sum(csum < thr(alpha, ka + 1), dtype=i32), s, e)
        # Steps with l == s and r == e change nothing (torch just moves beta on);
        # jump to the first one where r < e.
        kb = jnp.where((left == s) & (e > s), jump_end(kb, e), kb)
        stop = (alpha[ka] >= beta[jnp.minimum(kb, n_tab - 1)]) | (e == s)
        kb = jnp.minimum(kb, n_tab - 2)
        # torch's r: the last bin with c[r] <= thr, searched within [s, e]
        right = jnp.clip(jnp.sum(csum <= thr(beta, kb + 1), dtype=i32) - 1, s, e)
        move_start = (left - s) > (e - right)
        s2 = jnp.where(move_start, left, s)
        e2 = jnp.where(move_start, e, right)
        err = _quantization_error(density, s2, e2, width, dst_nbins, one)
        stop = stop | (err > best)
        keep = ~stop
        return (
            jnp.where(keep & move_start, ka + 1, ka),
            jnp.where(keep & ~move_start, kb + 1, kb),
            jnp.where(keep, s2, s),
            jnp.where(keep, e2, e),
            jnp.where(keep, err, best),
            stop,
        )

    init = (i32(0), i32(0), i32(0), i32(bins - 1), f32(jnp.inf), jnp.array(False))
    _, _, s, e, _, _ = lax.while_loop(cond, body, init)
    return s, e


def _floor_div(a, b):
    """``torch.div(a, b, rounding_mode="floor")`` for float32 ``a`` and ``b > 0``.

    torch's ``div_floor_floating`` (fmod, then a corrected quotient) yields the floor
    of the exact quotient; so does flooring the rounded quotient and stepping down
    where it rounded up across an integer (``q * b > a``, exact in float64). Runs
    under ``jax.enable_x64``.
    """
    f64 = jnp.float64
    q = jnp.floor(div_ieee(a, b))
    over = q.astype(f64) * b.astype(f64) > a.astype(f64)
    return jnp.where(over, q - 1, q)


def _quantization_error(density, s, e, width, dst_nbins: int, one):
    """torch's ``_compute_quantization_error(s, e)``, float32 (widths rounded from f64).

    Every product that an addition consumes goes through ``mul_f32`` (no FMA contraction).
    """
    f32, f64 = jnp.float32, jnp.float64
    bins = density.shape[0]
    dst_width = width * (e - s + 1).astype(f64) / f64(dst_nbins)
    w = width.astype(f32)
    dw = dst_width.astype(f32)
    half = (dst_width / 2).astype(f32)
    neg_half = (-dst_width / 2).astype(f32)
    begin = mul_f32((jnp.arange(bins, dtype=jnp.int32) - s).astype(f32), w, one)
    end = begin + w
    top = f32(dst_nbins - 1)
    dst_begin = jnp.clip(_floor_div(begin, dw), 0, top)
    dst_end = jnp.clip(_floor_div(end, dw), 0, top)
    half3 = mul_f32(half * half, half, one)
    neg3 = mul_f32(neg_half * neg_half, neg_half, one)
    d_begin = begin - mul_f32(dst_begin + f32(0.5), dw, one)
    norm = mul_f32(density, div_ieee(half3 - mul_f32(d_begin * d_begin, d_begin, one), f32(3)), one)
    full = density * div_ieee(half3 - neg3, f32(3))
    norm = norm + mul_f32(dst_end - dst_begin - f32(1), full, one)
    d_end = end - (mul_f32(dst_end, dw, one) + half)
    norm = norm + mul_f32(density, div_ieee(mul_f32(d_end * d_end, d_end, one) - neg3, f32(3)), one)
    err = jnp.sum(norm.astype(f64)).astype(f32)
    return jnp.where(dst_width == 0, f32(0.0), err)
