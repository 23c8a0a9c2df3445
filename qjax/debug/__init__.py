"""Debugging views of a quantized Flax NNX model: where does the accuracy go?

Library functions return plain dataclasses (numpy numbers), never print; rendering
(:func:`render_qparams`, ...) and plots (:func:`plot_histograms`, ...) are separate, and
``qjax debug FILE.py:FUNCTION`` runs them all from the command line.

- :func:`qparams_table`: scale(s), zero point(s), dtype and observed range per quantized
  tensor (any model).
- :func:`observer_health`: per observer, never updated (count 0), NaN/inf inputs ignored,
  non-finite ranges, zero-width ranges (any model).
- :func:`activation_histograms`: the float values at each quantizer, the range its
  qparams can represent and the fraction clipped below/above.
- :func:`layer_errors`: per layer, float (``Mode.FLOAT``) vs quantized (``Mode.FROZEN``,
  what serving computes): SQNR, max error, max error in output steps; propagated and
  isolated.
- :func:`sensitivity`: the metric with every layer quantized, and with quantization
  turned off at one layer at a time, sorted by how much that recovers.

The per-layer views run an ``nnx.Sequential`` one element at a time (other models raise
``TypeError`` saying so) on clones of the model: the user's model is never changed.

>>> model, x, y = _doc_model()
>>> [r.role for r in qparams_table(model)]
['input', 'weight', 'input', 'weight']
>>> errs = layer_errors(model, x)
>>> [e.path for e in errs], all(e.sqnr_db > 20 for e in errs)
(['layers/0', 'layers/2'], True)
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

import jax.numpy as jnp
import numpy as np

from ..flax._config import Mode
from ..flax._health import health_by_prefix
from . import _walk
from ._plots import plot_histograms as plot_histograms
from ._plots import plot_layer_errors as plot_layer_errors
from ._plots import plot_sensitivity as plot_sensitivity
from ._render import render_health as render_health
from ._render import render_histograms as render_histograms
from ._render import render_layer_errors as render_layer_errors
from ._render import render_qparams as render_qparams
from ._render import render_sensitivity as render_sensitivity

__all__ = [
    "ActHist",
    "HealthRow",
    "LayerError",
    "QParamsRow",
    "SensitivityRow",
    "accuracy",
    "activation_histograms",
    "layer_errors",
    "observer_health",
    "plot_histograms",
    "plot_layer_errors",
    "plot_sensitivity",
    "qparams_table",
    "render_health",
    "render_histograms",
    "render_layer_errors",
    "render_qparams",
    "render_sensitivity",
    "sensitivity",
    "sqnr_db",
]


@dataclasses.dataclass
class QParamsRow:
    """One quantized tensor's qparams. ``scale``/``zero_point`` have the spec's qparams
    shape (``()`` per-tensor, ``(C,)`` per-channel); ``observed_min``/``max`` are the
    extremes of the observer's range (NaN when it holds none), ``count`` its updates."""

    path: str
    role: str
    dtype: str
    bits: int
    granularity: str
    scale: np.ndarray
    zero_point: np.ndarray
    observed_min: float
    observed_max: float
    count: int | None


@dataclasses.dataclass
class ActHist:
    """Histogram of the float values at one quantizer. ``lo``/``hi``: the representable
    range ``dequantize(qmin)``/``dequantize(qmax)`` (extremes over channels);
    ``clipped_below``/``above``: fraction of the finite values the clamp changes, more
    than half a step below/above their channel's range (closer ones only round to
    ``qmin``/``qmax``). ``counts.sum() == n_values`` (finite values); ``n_nonfinite``
    are left out."""

    path: str
    role: str
    counts: np.ndarray
    edges: np.ndarray
    lo: float
    hi: float
    clipped_below: float
    clipped_above: float
    n_values: int
    n_nonfinite: int


@dataclasses.dataclass
class LayerError:
    """Float vs quantized output of one layer. ``*_lsb`` is the max error over the output
    quantizer's step (``None`` when the output has no per-tensor qparams); the
    ``isolated_*`` fields feed the quantized layer the float layer's input."""

    path: str
    kind: str
    sqnr_db: float
    max_abs_error: float
    max_error_lsb: float | None
    isolated_sqnr_db: float
    isolated_max_abs_error: float
    isolated_max_error_lsb: float | None
    output_scale: float | None


@dataclasses.dataclass
class SensitivityRow:
    """The metric with quantization off at ``path`` only (``metric``), how much that
    recovers over everything quantized (``recovered``), both baselines, and the SQNR of
    the model's output vs the float model's."""

    path: str
    kind: str
    metric: float
    recovered: float
    all_quantized: float
    float_metric: float
    output_sqnr_db: float


@dataclasses.dataclass
class HealthRow:
    """One observer's health; ``problems`` lists what is wrong (empty when healthy)."""

    path: str
    role: str
    count: int | None
    nonfinite_inputs: int
    bad_range: int
    zero_range: int
    entries: int
    problems: list[str]

    @property
    def ok(self) -> bool:
        return not self.problems


@functools.cache
def _doc_model():
    """A calibrated 2-layer MLP, inputs and labels for the doctests (built once: the
    views never change a model)."""
    from flax import nnx

    from ..flax import nnx as qnnx
    from ..flax import qjax_recommended

    cfg = qjax_recommended()
    rngs = nnx.Rngs(0)
    model = nnx.Sequential(
        qnnx.QuantLinear(4, 8, config=cfg, rngs=rngs),
        nnx.relu,
        qnnx.QuantLinear(8, 3, config=cfg, rngs=rngs),
    )
    x = jnp.asarray(np.random.default_rng(0).normal(size=(64, 4)), jnp.float32)
    qnnx.calibrate(model, [x], progress=False)
    qnnx.set_mode(model, Mode.FLOAT)
    y = np.asarray(model(x)).argmax(-1)
    qnnx.set_mode(model, Mode.QAT)
    return model, x, y


def sqnr_db(reference, test) -> float:
    """Signal-to-quantization-noise ratio ``10·log10(Σ f² / Σ (f − q)²)`` in dB, in
    float64 (``inf`` when ``test == reference``). Float arrays of one shape in; float out.

    >>> sqnr_db(np.array([3.0, 4.0]), np.array([3.0, 4.5]))  # 25 / 0.25
    20.0
    >>> sqnr_db(np.ones(3), np.ones(3))
    inf
    """
    f = np.asarray(reference, np.float64)
    q = np.asarray(test, np.float64)
    if f.shape != q.shape:
        raise ValueError(f"sqnr_db: shapes differ: reference {f.shape}, test {q.shape}")
    noise = float(np.sum((f - q) ** 2))
    signal = float(np.sum(f**2))
    if noise == 0.0:
        return float("inf")
    if signal == 0.0:
        return float("-inf")
    return float(10.0 * np.log10(signal / noise))


def accuracy(outputs, labels) -> float:
    """``mean(argmax(outputs, -1) == labels)``: the default :func:`sensitivity` metric.

    >>> accuracy(np.array([[0.1, 0.9], [0.8, 0.2]]), np.array([1, 1]))
    0.5
    """
    out = np.asarray(outputs)
    lab = np.asarray(labels)
    if out.shape[:-1] != lab.shape:
        raise ValueError(
            f"accuracy: outputs {out.shape} need labels of shape {out.shape[:-1]}, got {lab.shape}"
        )
    return float(np.mean(out.argmax(-1) == lab))


def qparams_table(model) -> list[QParamsRow]:
    """Per quantized tensor of ``model`` (any NNX module with qjax quantizers): the
    qparams its fake-quant uses, ``factory(spec, compat).qparams(state)``.

    >>> model, x, y = _doc_model()
    >>> r = qparams_table(model)[1]
    >>> r.path, r.role, r.dtype, r.granularity, r.scale.shape
    ('layers/0', 'weight', 'int8', 'axis -1', (8,))
    """
    rows = []
    for q in _walk.all_quantizers(model):
        qp = q.qparams()
        spec = q.spec
        gran = spec.granularity
        gran = "tensor" if gran == "tensor" else f"{gran} {spec.axis}"
        mn = np.asarray(q.state.min_val, np.float64)
        mx = np.asarray(q.state.max_val, np.float64)
        with np.errstate(invalid="ignore"):
            omin = float(np.nanmin(mn)) if np.isfinite(mn).any() else float("nan")
            omax = float(np.nanmax(mx)) if np.isfinite(mx).any() else float("nan")
        count = getattr(q.state, "count", None)
        rows.append(
            QParamsRow(
                q.path, q.role, str(np.dtype(spec.dtype)), spec.bits, gran,
                np.asarray(qp.scale), np.asarray(qp.zero_point), omin, omax,
                None if count is None else int(np.asarray(count)),
            )
        )  # fmt: skip
    return rows


def observer_health(model) -> list[HealthRow]:
    """Per observer of ``model`` (any NNX module): :func:`qjax.flax._health.stats_health`
    plus the update count. Problems: ``never updated (count 0)``, NaN/inf inputs the
    observer ignored, non-finite ranges (NaN, or a channel that saw no finite value),
    zero-width ranges (``min == max``).

    >>> model, x, y = _doc_model()
    >>> [(h.path, h.role, h.ok) for h in observer_health(model)][:2]
    [('layers/0', 'input', True), ('layers/0', 'weight', True)]
    """
    rows = []
    for q in _walk.all_quantizers(model):
        h = next(iter(health_by_prefix({"": q.state}).values()))
        count = getattr(q.state, "count", None)
        count = None if count is None else int(np.asarray(count))
        nonfinite = int(np.asarray(h.nonfinite))
        bad, zero = int(np.asarray(h.bad_range)), int(np.asarray(h.zero_range))
        problems = []
        if count == 0:
            problems.append("never updated (count 0)")
        if bad:
            problems.append(f"{bad} non-finite range entr{'y' if bad == 1 else 'ies'}")
        if zero:
            problems.append(f"{zero} zero-width range{'s' * (zero != 1)} (min == max)")
        if nonfinite:
            problems.append(f"{nonfinite} NaN/inf inputs ignored")
        n = int(np.size(np.asarray(q.state.min_val)))
        rows.append(HealthRow(q.path, q.role, count, nonfinite, bad, zero, n, problems))
    return rows


def _hist(path, role, values, qp, bins) -> ActHist:
    v = np.asarray(values, np.float32)
    lo_full, hi_full = (np.asarray(b) for b in _walk.bounds(qp, v.shape))
    fin = np.isfinite(v)
    n = int(fin.sum())
    half = (hi_full.astype(np.float64) - lo_full) / (2 * (qp.spec.qmax - qp.spec.qmin))
    below = int(np.sum(fin & (v < lo_full - half)))
    above = int(np.sum(fin & (v > hi_full + half)))
    lo, hi = float(np.min(lo_full)), float(np.max(hi_full))
    vf = v[fin].astype(np.float64)
    rng = (min(lo, vf.min()), max(hi, vf.max())) if n else (lo, hi)
    counts, edges = np.histogram(vf, bins=bins, range=rng)
    frac = (lambda k: k / n) if n else (lambda k: 0.0)
    return ActHist(path, role, counts, edges, lo, hi, frac(below), frac(above), n, v.size - n)


def activation_histograms(model, x, bins: int = 64) -> list[ActHist]:
    """Histograms of the float values at every quantizer of an ``nnx.Sequential`` on
    input ``x``: activations as the float model (``Mode.FLOAT``) produces them (what
    calibration observes; an output quantizer sees the layer output before it), weights
    as the weight quantizer sees them (``QuantConvBn``: BN folded with the running
    statistics). ``lo``/``hi`` from the current statistics.

    >>> model, x, y = _doc_model()
    >>> h = activation_histograms(model, x, bins=8)[0]
    >>> h.path, h.role, int(h.counts.sum()) == h.n_values == x.size
    ('layers/0', 'input', True)
    >>> h.lo > float(x.min()), h.clipped_below  # below lo, by less than half a step
    (True, 0.0)
    """
    if not isinstance(bins, int) or bins < 1:
        raise ValueError(f"activation_histograms: bins must be a positive int, got {bins!r}")
    us = _walk.units(model, "activation_histograms")
    _walk.quant_modules(model)
    fm = _walk.clone_in(model, Mode.FLOAT)
    ins, outs = _walk.run_layers(fm, x)
    out = []
    for u in us:
        for path, m in u.quant:
            for q in _walk.quantizers(path, m):
                if q.role == "weight":
                    vals = _walk.weight_values(q, u.layer)
                elif q.role == "input":
                    vals = ins[u.index]
                elif hasattr(m, "kernel"):  # a layer's output quantizer: its float output
                    vals = outs[u.index]
                else:  # an ActQuant: its input is what it quantizes
                    vals = ins[u.index]
                out.append(_hist(path, q.role, vals, q.qparams(), bins))
    return out


def _errors(f, q, scale):
    f = np.asarray(f, np.float64)
    q = np.asarray(q, np.float64)
    err = float(np.max(np.abs(f - q))) if f.size else 0.0
    lsb = None if scale is None else err / scale
    return sqnr_db(f, q), err, lsb


def layer_errors(model, x) -> list[LayerError]:
    """Per quantized element of an ``nnx.Sequential``: its output in the float model
    (``Mode.FLOAT``) ``f`` vs in the quantized model (``Mode.FROZEN``) ``q``, as
    ``SQNR = 10·log10(Σf²/Σ(f−q)²)`` dB, ``max|f−q|`` and that over the output step
    (the layer's output quantizer, else the next quantizer after ReLU/MaxPool/Flatten;
    per-tensor only). Propagated: each model on its own inputs; isolated: the quantized
    element on the float model's input to it. Raises ``ValueError`` (from
    ``set_mode(FROZEN)``) naming observers without statistics.

    >>> model, x, y = _doc_model()
    >>> e = layer_errors(model, x)[0]
    >>> e.sqnr_db == e.isolated_sqnr_db, e.max_error_lsb < 2
    (True, True)
    """
    us = _walk.units(model, "layer_errors")
    _walk.quant_modules(model)
    fm = _walk.clone_in(model, Mode.FLOAT)
    qm = _walk.clone_in(model, Mode.FROZEN)
    f_in, f_out = _walk.run_layers(fm, x)
    _, q_out = _walk.run_layers(qm, x)
    rows = []
    for u in us:
        if not u.quant:
            continue
        qp = _walk.output_qparams(us, u.index)
        scale = None
        if qp is not None and np.size(np.asarray(qp.scale)) == 1:
            scale = float(np.asarray(qp.scale))
        iso = _walk.call_layer(qm.layers[u.index], f_in[u.index])
        prop = _errors(f_out[u.index], q_out[u.index], scale)
        isol = _errors(f_out[u.index], iso, scale)
        rows.append(LayerError(u.path, type(u.layer).__name__, *prop, *isol, scale))
    return rows


def sensitivity(model, x, y, metric: Callable | None = None) -> list[SensitivityRow]:
    """The metric (default :func:`accuracy`, ``metric(outputs, y) -> float``) of the
    quantized model (``Mode.FROZEN``) with quantization turned off (``Mode.FLOAT``) at
    one element of the ``nnx.Sequential`` at a time; sorted by ``recovered`` (metric
    minus the all-quantized metric), largest first, ties by output SQNR vs float.

    >>> model, x, y = _doc_model()
    >>> rows = sensitivity(model, x, y)
    >>> sorted(r.path for r in rows), rows[0].float_metric
    (['layers/0', 'layers/2'], 1.0)
    """
    metric = accuracy if metric is None else metric
    if not callable(metric):
        raise TypeError(f"sensitivity: metric must be callable, got {type(metric).__name__}")
    us = _walk.units(model, "sensitivity")
    _walk.quant_modules(model)

    def run(m):
        return np.asarray(_walk.run_layers(m, x)[1][-1])

    f_out = run(_walk.clone_in(model, Mode.FLOAT))
    q_out = run(_walk.clone_in(model, Mode.FROZEN))
    float_metric, all_q = float(metric(f_out, y)), float(metric(q_out, y))
    rows = []
    for u in us:
        if not u.quant:
            continue
        out = run(_walk.clone_in(model, Mode.FROZEN, float_at=[p for p, _ in u.quant]))
        m = float(metric(out, y))
        kind, snr = type(u.layer).__name__, sqnr_db(f_out, out)
        rows.append(SensitivityRow(u.path, kind, m, m - all_q, all_q, float_metric, snr))
    rows.sort(key=lambda r: (-r.recovered, -r.output_sqnr_db))
    return rows
