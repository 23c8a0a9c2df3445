"""Plots of the debugging views (:mod:`qjax.debug`), matplotlib with the Agg backend.

Each function writes one PNG and returns its path; matplotlib is imported only here,
when a plot is asked for (``pip install matplotlib``, in the ``demo``/``dev`` extras).
"""

from __future__ import annotations

import math
import pathlib

import numpy as np

__all__ = ["plot_histograms", "plot_layer_errors", "plot_sensitivity"]


def _plt():
    try:
        import matplotlib
    except ImportError as e:
        raise ImportError("qjax.debug plots need matplotlib: pip install matplotlib") from e
    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path) -> pathlib.Path:
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    _plt().close(fig)
    return path


def _finite(v: float, default: float) -> float:
    return v if math.isfinite(v) else default


def plot_histograms(hists, path) -> pathlib.Path:
    """One panel per :class:`qjax.debug.ActHist`: the value histogram (log counts), the
    representable range ``[lo, hi]`` as dashed lines, the clipped tails shaded and their
    fractions in the title. Writes a PNG at ``path`` and returns it.

    >>> import tempfile
    >>> from qjax.debug import _doc_model, activation_histograms
    >>> model, x, _ = _doc_model()
    >>> p = plot_histograms(activation_histograms(model, x), tempfile.mkdtemp() + "/h.png")
    >>> p.read_bytes()[:4]
    b'\\x89PNG'
    """
    hists = list(hists)
    if not hists:
        raise ValueError("plot_histograms: no histograms to plot")
    plt = _plt()
    cols = min(3, len(hists))
    rows = math.ceil(len(hists) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 2.8 * rows), squeeze=False)
    for ax, h in zip(axes.ravel(), hists, strict=False):
        ax.stairs(h.counts, h.edges, fill=True, alpha=0.7)
        ax.set_yscale("symlog", linthresh=1)
        ax.axvline(h.lo, color="red", linestyle="--", linewidth=1)
        ax.axvline(h.hi, color="red", linestyle="--", linewidth=1)
        left, right = h.edges[0], h.edges[-1]
        if h.clipped_below:
            ax.axvspan(left, h.lo, color="red", alpha=0.15)
        if h.clipped_above:
            ax.axvspan(h.hi, right, color="red", alpha=0.15)
        ax.set_title(
            f"{h.path} {h.role}\nclipped {100 * h.clipped_below:.2g}% / "
            f"{100 * h.clipped_above:.2g}%",
            fontsize=8,
        )
        ax.tick_params(labelsize=7)
    for ax in axes.ravel()[len(hists) :]:
        ax.axis("off")
    return _save(fig, path)


def plot_layer_errors(errors, path) -> pathlib.Path:
    """SQNR (dB) per layer, propagated and isolated side by side (infinite SQNR, an
    exact layer, drawn at the top of the axis). Writes a PNG and returns its path.

    >>> import tempfile
    >>> from qjax.debug import _doc_model, layer_errors
    >>> model, x, _ = _doc_model()
    >>> plot_layer_errors(layer_errors(model, x), tempfile.mkdtemp() + "/e.png").stat().st_size > 0
    True
    """
    errors = list(errors)
    if not errors:
        raise ValueError("plot_layer_errors: no layer errors to plot")
    plt = _plt()
    finite = [v for e in errors for v in (e.sqnr_db, e.isolated_sqnr_db) if math.isfinite(v)]
    top = (max(finite) if finite else 60.0) + 10.0
    prop = [_finite(e.sqnr_db, top) for e in errors]
    iso = [_finite(e.isolated_sqnr_db, top) for e in errors]
    idx = np.arange(len(errors))
    fig, ax = plt.subplots(figsize=(max(4.0, 0.9 * len(errors) + 2), 3.2))
    ax.bar(idx - 0.2, prop, width=0.4, label="propagated")
    ax.bar(idx + 0.2, iso, width=0.4, label="isolated")
    ax.set_xticks(idx, [f"{e.path}\n{e.kind}" for e in errors], fontsize=7)
    ax.set_ylabel("SQNR (dB), higher is better")
    ax.set_title("float vs quantized, per layer", fontsize=9)
    ax.legend(fontsize=7)
    return _save(fig, path)


def plot_sensitivity(rows, path) -> pathlib.Path:
    """Horizontal bars: how much the metric recovers when quantization is off at one
    layer (most sensitive on top). Writes a PNG and returns its path.

    >>> import tempfile
    >>> from qjax.debug import _doc_model, sensitivity
    >>> plot_sensitivity(sensitivity(*_doc_model()), tempfile.mkdtemp() + "/s.png").suffix
    '.png'
    """
    rows = list(rows)
    if not rows:
        raise ValueError("plot_sensitivity: no sensitivity rows to plot")
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.0, 0.45 * len(rows) + 1.4))
    idx = np.arange(len(rows))[::-1]
    ax.barh(idx, [r.recovered for r in rows])
    ax.set_yticks(idx, [f"{r.path} ({r.kind})" for r in rows], fontsize=7)
    ax.axvline(0.0, color="black", linewidth=0.8)
    r0 = rows[0]
    ax.set_xlabel("metric recovered by leaving this layer float")
    ax.set_title(f"all quantized {r0.all_quantized:.4g}, float {r0.float_metric:.4g}", fontsize=9)
    return _save(fig, path)
