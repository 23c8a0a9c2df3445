"""Tables of the debugging views (:mod:`qjax.debug`): text, markdown or rich.

Rendering only: the numbers come from the view functions; cells go through
:mod:`qjax._render` like every other qjax report.
"""

from __future__ import annotations

import io

import numpy as np

from .._render import markdown_table, print_table, text_table

__all__ = [
    "render_health",
    "render_histograms",
    "render_layer_errors",
    "render_qparams",
    "render_sensitivity",
]


def _table(title: str, header, rows, fmt: str) -> str:
    if fmt == "text":
        return text_table(title, header, rows)
    if fmt == "markdown":
        return markdown_table(title, header, rows)
    if fmt == "rich":
        buf = io.StringIO()
        print_table(title, header, rows, file=buf)
        return buf.getvalue().rstrip("\n")
    raise ValueError(f"format must be 'text', 'markdown' or 'rich', got {fmt!r}")


def _span(a) -> object:
    """A per-tensor value as a float; per-channel as ``min..max (n=C)``."""
    a = np.asarray(a)
    if a.size == 1:
        v = a.reshape(()).item()
        return float(v) if a.dtype.kind == "f" else int(v)
    lo, hi = a.min().item(), a.max().item()
    f = (lambda v: f"{v:.6g}") if a.dtype.kind == "f" else str
    if lo == hi:
        return f"{f(lo)} (all {a.size})"
    return f"{f(lo)}..{f(hi)} (n={a.size})"


def render_qparams(rows, fmt: str = "text") -> str:
    """The :func:`qjax.debug.qparams_table` rows as a table (``fmt``: ``"text"``,
    ``"markdown"`` or ``"rich"``).

    >>> from qjax.debug import _doc_model, qparams_table
    >>> print(render_qparams(qparams_table(_doc_model()[0]), "markdown").splitlines()[4])
    | layers/0 | input | int8 | tensor | 0.0242054 | 0 | -3.10634 | 3.06604 | 1 |
    """
    header = ["layer", "role", "dtype", "granularity", "scale", "zero point"]
    header += ["observed min", "observed max", "count"]
    body = [
        [r.path, r.role, r.dtype, r.granularity, _span(r.scale), _span(r.zero_point),
         r.observed_min, r.observed_max, r.count]
        for r in rows
    ]  # fmt: skip
    return _table("qparams per quantized tensor", header, body, fmt)


def render_health(rows, fmt: str = "text") -> str:
    """The :func:`qjax.debug.observer_health` rows as a table (problems first).

    >>> from qjax.debug import _doc_model, observer_health
    >>> print(render_health(observer_health(_doc_model()[0])).splitlines()[0])
    observer health: 4 observers, 0 with problems
    """
    bad = [r for r in rows if r.problems]
    header = ["layer", "role", "count", "entries", "status"]
    body = [
        [r.path, r.role, r.count, r.entries, "; ".join(r.problems) or "ok"]
        for r in bad + [r for r in rows if not r.problems]
    ]
    title = f"observer health: {len(rows)} observers, {len(bad)} with problems"
    return _table(title, header, body, fmt)


def render_histograms(hists, fmt: str = "text") -> str:
    """A summary of :func:`qjax.debug.activation_histograms`: range and clipping.

    >>> from qjax.debug import _doc_model, activation_histograms
    >>> model, x, _ = _doc_model()
    >>> print(render_histograms(activation_histograms(model, x)).splitlines()[2])
    layer     role    values  representable lo  hi       clipped below %  clipped above %
    """
    header = ["layer", "role", "values", "representable lo", "hi"]
    header += ["clipped below %", "clipped above %"]
    body = [
        [h.path, h.role, h.n_values, h.lo, h.hi, 100 * h.clipped_below, 100 * h.clipped_above]
        for h in hists
    ]
    return _table("values at each quantizer (float model)", header, body, fmt)


def render_layer_errors(errors, fmt: str = "text") -> str:
    """The :func:`qjax.debug.layer_errors` rows as a table.

    >>> from qjax.debug import _doc_model, layer_errors
    >>> model, x, _ = _doc_model()
    >>> print(render_layer_errors(layer_errors(model, x)).splitlines()[0])
    per-layer error, float vs quantized (FROZEN)
    """
    header = ["layer", "kind", "SQNR dB", "max |err|", "max err LSB"]
    header += ["isolated SQNR dB", "isolated max |err|", "isolated LSB"]
    body = [
        [e.path, e.kind, e.sqnr_db, e.max_abs_error, e.max_error_lsb, e.isolated_sqnr_db,
         e.isolated_max_abs_error, e.isolated_max_error_lsb]
        for e in errors
    ]  # fmt: skip
    return _table("per-layer error, float vs quantized (FROZEN)", header, body, fmt)


def render_sensitivity(rows, fmt: str = "text") -> str:
    """The :func:`qjax.debug.sensitivity` rows as a table, most sensitive first.

    >>> from qjax.debug import _doc_model, sensitivity
    >>> print(render_sensitivity(sensitivity(*_doc_model())).splitlines()[0][:40])
    sensitivity: metric float 1, all quantiz
    """
    header = ["layer", "kind", "metric with this layer float", "recovered", "output SQNR dB"]
    body = [[r.path, r.kind, r.metric, r.recovered, r.output_sqnr_db] for r in rows]
    title = "sensitivity"
    if rows:
        title += f": metric float {rows[0].float_metric:.6g}, all quantized "
        title += f"{rows[0].all_quantized:.6g}"
    return _table(title, header, body, fmt)
