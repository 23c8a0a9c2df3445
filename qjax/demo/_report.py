"""The summary of ``qjax demo``: tables (text, markdown), ``summary.json`` and the
accuracy figure. The summary is a plain dict (JSON-ready); rendering never computes."""

from __future__ import annotations

import json
import pathlib

from .._render import markdown_table, text_table

__all__ = ["plot_accuracy", "tables", "write_summary"]


def _pct(v) -> str:
    return "-" if v is None else f"{100 * v:.1f}%"


def tables(s: dict) -> list[tuple[str, list[str], list[list[object]]]]:
    """``[(title, header, rows)]`` of the summary ``s`` (see :func:`qjax.demo.run_demo`).

    >>> s = {"n_test": 2, "accuracy": {"float": 1.0}, "speed": None, "engines": {},
    ...      "checks": []}
    >>> [t[0] for t in tables(s)]
    ['test accuracy, sklearn digits (2 images)']
    """
    out = []
    acc = [[k, _pct(v)] for k, v in s["accuracy"].items()]
    out.append((f"test accuracy, sklearn digits ({s['n_test']} images)", ["model", "accuracy"],
                acc))  # fmt: skip
    sp = s.get("speed")
    if sp:
        header = ["float32 (ms)", "int8 served (ms)", "int8 / float time"]
        row = [f"{sp['float_ms']:.3f}", f"{sp['int8_ms']:.3f}", f"{sp['ratio']:.2f}x"]
        amx = sp.get("amx")
        if amx is not None:  # the same served model on the native AMX kernel
            header = ["float32 (ms)", "int8 XLA (ms)", "XLA / float time", "int8 AMX (ms)",
                      "AMX / float time", "AMX / XLA time"]  # fmt: skip
            if sp.get("amx_ms") is not None:
                row += [f"{sp['amx_ms']:.3f}", f"{sp['amx_ratio']:.2f}x",
                        f"{sp['amx_vs_int8']:.2f}x"]  # fmt: skip
            else:
                row += [f"unavailable: {amx['reason']}", "-", "-"]
        # no AMX: oneDNN's ukernel where it is exact, else (below VNNI) the sat16 kernel
        for k, label in (("onednn", "oneDNN"), ("sat16", "sat16")):
            if sp.get(f"{k}_ms") is not None:
                header += [f"int8 {label} (ms)", f"{label} / float time", f"{label} / XLA time"]
                row += [f"{sp[f'{k}_ms']:.3f}", f"{sp[f'{k}_ratio']:.2f}x",
                        f"{sp[f'{k}_vs_int8']:.2f}x"]  # fmt: skip
        out.append(
            (
                f"speed: jitted forward on {sp['batch']} test images (median of {sp['repeats']}"
                ", interleaved)",
                header,
                [row],
            )
        )
    rows = []
    for eng, e in s["engines"].items():
        p, d = e["parity"], e.get("direct")
        direct = "-" if d is None else f"{d['mismatches']} / {d['values']}"
        qp = "-" if d is None else f"{d['qparams_equal']} of {d['layers']}"
        rows.append([eng, e.get("level", "-"), _pct(e["accuracy"]),
                     f"{p['mismatches']} / {p['values']}", p["max_lsb"], p["promise"], direct,
                     qp])  # fmt: skip
    if rows:
        out.append(
            (
                "torch int8 per engine: qjax import vs torch (parity) and qjax's own PTQ vs torch",
                ["engine", "CPU level", "torch int8 acc", "parity mismatches", "max LSB",
                 "promised", "qjax PTQ vs torch codes", "same qparams"],
                rows,
            )
        )  # fmt: skip
    rows = []
    for eng, e in s["engines"].items():
        d = e.get("direct")
        if d is None:
            continue
        w = {r["layer"]: r for r in d.get("weights", [])}
        for la in d["per_layer"]:
            r = w.get(la["layer"])
            ws = "-" if r is None else f"{r['scale_mismatches']} / {r['scales']}"
            wc = "-" if r is None else f"{r['code_mismatches']} / {r['codes']}"
            codes = f"{la['mismatches']} / {la['values']}"
            rows.append([eng, la["layer"], codes, la["max_lsb"], la["torch_outside_qjax_range"],
                         la["same_qparams"], ws, wc])  # fmt: skip
    if rows:
        out.append(
            (
                "qjax PTQ (torch's preset, same batches) vs torch PTQ, per layer",
                ["engine", "layer", "code mismatches", "max LSB",
                 "torch codes outside qjax's range", "same act. qparams",
                 "weight scales differing", "weight codes differing"],
                rows,
            )
        )  # fmt: skip
    if s["checks"]:
        rows = [[c["name"], c["result"], c["ok"]] for c in s["checks"]]
        out.append(("checks", ["check", "result", "ok"], rows))
    return out


def write_summary(s: dict, out: pathlib.Path) -> str:
    """Write ``summary.md`` and ``summary.json`` under ``out``; return the text tables."""
    out.mkdir(parents=True, exist_ok=True)
    ts = tables(s)
    md = "# qjax demo\n\n" + "\n\n".join(markdown_table(*t) for t in ts) + "\n"
    stages = s.get("stage_seconds", {})
    if stages:
        md += "\nstage times (s): " + ", ".join(f"{k} {v:.1f}" for k, v in stages.items()) + "\n"
    (out / "summary.md").write_text(md)
    (out / "summary.json").write_text(json.dumps(s, indent=2, default=float) + "\n")
    return "\n\n".join(text_table(*t) for t in ts)


def plot_accuracy(s: dict, path: pathlib.Path) -> pathlib.Path:
    """The accuracy table as a bar figure (PNG at ``path``): qjax's float / PTQ / QAT /
    served rows and torch int8 per engine."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    names = list(s["accuracy"]) + [f"torch int8 {e}" for e in s["engines"]]
    vals = list(s["accuracy"].values()) + [e["accuracy"] for e in s["engines"].values()]
    fig, ax = plt.subplots(figsize=(7.5, 0.45 * len(names) + 1.2))
    bars = ax.barh(range(len(names)), [100 * v for v in vals], color="tab:blue")
    for b, v in zip(bars, vals, strict=True):
        ax.text(b.get_width() - 1, b.get_y() + b.get_height() / 2, f"{100 * v:.1f}%",
                ha="right", va="center", color="white", fontsize=8)  # fmt: skip
    ax.set_yticks(range(len(names)), names, fontsize=8)
    ax.invert_yaxis()
    lo = min(vals) if vals else 0.0
    ax.set_xlim(max(0.0, 100 * lo - 10), 100)
    ax.set_xlabel("test accuracy (%)")
    ax.set_title(f"sklearn digits, {s['n_test']} test images", fontsize=9)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path
