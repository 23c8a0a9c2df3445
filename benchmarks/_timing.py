"""Shared benchmark helpers: interleaved timing in one process, medians, machine line, the
onnxruntime session every ORT contender uses."""

from __future__ import annotations

import json
import os
import platform
import re

import jax
import numpy as np

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
        f"{cpu}, {isa_line()}, {os.cpu_count()} cores, jax {jax.__version__} "
        f"({jax.devices()[0].platform}), python {platform.python_version()}"
    )


def isa_line() -> str:
    """The int8 instruction sets this CPU has (``/proc/cpuinfo``) and qjax's CPU level."""
    from qjax.kernels import host_level
    from qjax.kernels._levels import cpu_flags

    names = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8")
    have = [f for f in names if f in cpu_flags()]
    line = f"ISA {'+'.join(have) or 'none of ' + '/'.join(names)} (level {host_level()})"
    caps = cap_switches()
    if caps:
        # a run capped by the libraries' own switches is a CPU level on this core, not a
        # CPU of that class: say so on every line that names the machine
        line += f", capped by {' '.join(caps)} (onnxruntime has no switch: not capped)"
    return line


_CAP_VARS = (
    "FBGEMM_ENABLE_INSTRUCTIONS",
    "ONEDNN_MAX_CPU_ISA",
    "DNNL_MAX_CPU_ISA",
    "ATEN_CPU_CAPABILITY",
    "QJAX_SAT16_ISA",
)


def cap_switches(environ=None) -> list[str]:
    """The instruction-set caps set in the environment: torch's and qjax's switches and
    XLA's ``--xla_cpu_max_isa`` (as ``NAME=value``).

    >>> cap_switches({"ONEDNN_MAX_CPU_ISA": "AVX2", "XLA_FLAGS": "--xla_cpu_max_isa=AVX2"})
    ['ONEDNN_MAX_CPU_ISA=AVX2', 'xla_cpu_max_isa=AVX2']
    """
    env = os.environ if environ is None else environ
    caps = [f"{k}={env[k]}" for k in _CAP_VARS if env.get(k)]
    caps += re.findall(r"(xla_cpu_max_isa=\S+)", env.get("XLA_FLAGS", ""))
    return caps


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


def spinning() -> bool:
    """``QJAX_BENCH_SPIN=1``: torch, ONNX Runtime and qjax run with their threads'
    default spinning (torch's OpenMP without ``OMP_WAIT_POLICY=PASSIVE``, ORT's intra-op
    spin on, qjax's helper threads spinning ``QJAX_SPIN_US``), as a user runs them, and
    contenders are timed in blocks of consecutive calls (:func:`blocks`); unset, nobody
    spins and each call is interleaved."""
    return os.environ.get("QJAX_BENCH_SPIN", "") not in ("", "0")


def wait_policy() -> None:
    """Unless :func:`spinning`, nobody's threads spin after a call: ``OMP_WAIT_POLICY=
    PASSIVE`` for torch's OpenMP (read once when torch is imported: call this before)
    and ``QJAX_SPIN_US=0`` for qjax's helper threads (unless set)."""
    if not spinning():
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
        os.environ.setdefault("QJAX_SPIN_US", "0")


def blocks() -> int:
    """``interleaved``'s ``block``: under :func:`spinning` each contender's turn is 20
    calls (only the first pay for the previous contender's spinning threads), else
    one call."""
    return 20 if spinning() else 1


def settle() -> float:
    """``interleaved``'s ``settle``: under :func:`spinning` 15 ms of untimed calls start
    each turn (the previous contender's threads spin on: torch's OpenMP worker ~6 ms
    after a call, measured with the int8 MLP at batch 32 after torch fbgemm: 157 µs for
    ~40 calls, then 109; 95-110 alone), else none."""
    return 0.015 if spinning() else 0.0


def torch_threads_line(torch) -> str:
    """torch's version, intra-op threads and OpenMP wait policy, and qjax's helper spin,
    as this process runs them."""
    policy = os.environ.get("OMP_WAIT_POLICY") or "unset (OpenMP threads spin after a call)"
    spin = os.environ.get("QJAX_SPIN_US") or "unset (default 100)"
    return (
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"OMP_WAIT_POLICY={policy}; qjax QJAX_SPIN_US={spin}"
    )


def quick() -> bool:
    """True when ``QJAX_BENCH_QUICK=1`` (``qjax bench --quick``): fewer repeats and shapes."""
    return os.environ.get("QJAX_BENCH_QUICK", "") not in ("", "0")


def bench_line(
    benchmark: str, case: str, ratio: float, baseline: str, goal: str | None = None
) -> str:
    """Print (and return) one ``BENCH {json}`` line, the record ``qjax bench`` collects.

    ``ratio`` is baseline time / qjax time (> 1: qjax faster), except step-time overhead
    benchmarks, where it is qjax / float time and ``goal`` reads ``<= 1.15x``. Under
    :func:`spinning` the case says so (`` [spinning]``).
    """
    rec = {
        "benchmark": benchmark,
        "case": case + (" [spinning]" if spinning() else ""),
        "ratio": round(float(ratio), 4),
        "baseline": baseline,
        "goal": goal,
    }
    line = "BENCH " + json.dumps(rec)
    print(line, flush=True)
    return line


def ort_session(model, threads: int = 2):
    """An onnxruntime CPU session for timing against qjax: ``threads`` intra-op threads,
    graph optimizations ON (QDQ fused into QGemm / QLinearConv integer kernels),
    sequential execution. ``model``: an ``onnx.ModelProto`` (e.g. from ``export_onnx``).
    """
    import onnxruntime as ort  # here, not at the top: only the ORT contenders pay for it

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # ORT's workers spin after each run by default; interleaved with XLA and torch on the
    # same cores, that spin is charged to the next contenders (measured on 2 cores: torch
    # qnnpack ~2x slower, qjax slower too), so it is off, as torch runs with
    # OMP_WAIT_POLICY=PASSIVE. It costs ORT itself: timed alone, spinning ran the int8 MLP
    # 1.6-1.75x faster at batch 1, 32 and 256; QJAX_BENCH_SPIN=1 keeps it (spinning()).
    if not spinning():
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    so.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


def ort_version() -> str:
    import onnxruntime as ort

    return f"onnxruntime {ort.__version__}"


def lsb_diff(got, want, scale: float) -> tuple[int, int, int]:
    """Dequantized outputs compared in units of the output scale: (outputs that differ,
    outputs, max |difference| in LSB)."""
    d = np.rint(np.abs(np.asarray(got, np.float64) - np.asarray(want, np.float64)) / scale)
    return int((d > 0).sum()), int(d.size), int(d.max()) if d.size else 0
