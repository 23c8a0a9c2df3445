"""Shared benchmark helpers: interleaved timing in one process, medians, machine line."""

from __future__ import annotations

import json
import os
import platform

import jax

# one implementation of interleaved timing, shared with `qjax demo`
from qjax.demo._data import interleaved as interleaved


def machine_line() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return (
        f"{cpu}, {os.cpu_count()} cores, jax {jax.__version__} "
        f"({jax.devices()[0].platform}), python {platform.python_version()}"
    )


def load_line() -> str:
    """The 1/5/15-minute load averages (other work on the machine skews absolute times)."""
    try:
        one, five, fifteen = os.getloadavg()
    except OSError:
        return "load average: unavailable"
    return f"load average {one:.2f} {five:.2f} {fifteen:.2f} ({os.cpu_count()} cores)"


def table(header: list[str], rows: list[list[object]]) -> str:
    """A plain fixed-width text table (right-aligned columns)."""
    cells = [[str(c) for c in header]] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)) for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def quick() -> bool:
    """True when ``QJAX_BENCH_QUICK=1`` (``qjax bench --quick``): fewer repeats and shapes."""
    return os.environ.get("QJAX_BENCH_QUICK", "") not in ("", "0")


def bench_line(
    benchmark: str, case: str, ratio: float, baseline: str, goal: str | None = None
) -> str:
    """Print (and return) one ``BENCH {json}`` line, the record ``qjax bench`` collects.

    ``ratio`` is baseline time / qjax time (> 1: qjax faster), except step-time overhead
    benchmarks, where it is qjax / float time and ``goal`` reads ``<= 1.15x``.
    """
    rec = {
        "benchmark": benchmark,
        "case": case,
        "ratio": round(float(ratio), 4),
        "baseline": baseline,
        "goal": goal,
    }
    line = "BENCH " + json.dumps(rec)
    print(line, flush=True)
    return line
