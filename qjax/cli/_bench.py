"""``qjax bench``: run the scripts in ``benchmarks/`` and print one ratio table.

Each script runs in its own subprocess (``sys.executable``, so the same environment),
prints its own human table and, at the end, one line per headline ratio::

    BENCH {"benchmark": "int8_dense", "case": "M=32", "ratio": 2.8, "baseline": "jax f32",
           "goal": ">= 10x"}

``ratio`` is baseline time / qjax time (> 1: qjax faster), except step-time overhead
benchmarks, where it is qjax / baseline time and the goal reads ``<= 1.15x``. This module
collects those lines, checks each ratio against its goal and renders the table. A
script that exits non-zero (or prints a malformed BENCH line) is reported with the tail of
its stderr; the others still run, and the exit status is 1 at the end.
"""

from __future__ import annotations

import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

from .._render import text_table

__all__ = [
    "BenchRecord",
    "ScriptResult",
    "discover",
    "find_benchmarks_dir",
    "goal_met",
    "parse_bench_lines",
    "ratio_table",
    "run_bench",
]

PREFIX = "BENCH "
KEYS = ("benchmark", "case", "ratio", "baseline", "goal")
_GOAL = re.compile(r"^\s*(>=|<=|>|<)\s*([0-9]*\.?[0-9]+)\s*x?\s*$")
STDERR_TAIL_LINES = 15


@dataclass(frozen=True)
class BenchRecord:
    """One headline ratio a script reported (the JSON of one ``BENCH`` line)."""

    benchmark: str
    case: str
    ratio: float
    baseline: str
    goal: str | None

    @property
    def met(self) -> bool | None:
        return goal_met(self.ratio, self.goal)


@dataclass
class ScriptResult:
    """What one script run produced: its records, or why it failed."""

    name: str
    returncode: int
    seconds: float
    records: list[BenchRecord] = field(default_factory=list)
    error: str | None = None  # set when the run counts as failed
    stderr_tail: str = ""

    @property
    def ok(self) -> bool:
        return self.error is None


def parse_bench_lines(text: str) -> list[BenchRecord]:
    """The ``BENCH {json}`` records in a script's stdout, in order; other lines are ignored.

    Each JSON object needs exactly the keys benchmark, case, ratio (a finite number),
    baseline and goal (a string or null). str -> list[BenchRecord].

    >>> out = 'table...\\nBENCH {"benchmark": "b", "case": "c", "ratio": 2.5, '
    >>> out += '"baseline": "jax f32", "goal": ">= 2x"}'
    >>> [(r.benchmark, r.ratio, r.met) for r in parse_bench_lines(out)]
    [('b', 2.5, True)]
    >>> parse_bench_lines('BENCH {"benchmark": "b"}')
    Traceback (most recent call last):
    ...
    ValueError: BENCH line 1: missing key(s) ['baseline', 'case', 'goal', 'ratio']
    """
    records = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.startswith(PREFIX):
            continue
        try:
            obj = json.loads(line[len(PREFIX) :])
        except json.JSONDecodeError as e:
            raise ValueError(f"BENCH line {n}: not JSON ({e.msg}): {line[:120]!r}") from None
        if not isinstance(obj, dict):
            raise ValueError(f"BENCH line {n}: expected a JSON object, got {type(obj).__name__}")
        missing = sorted(set(KEYS) - set(obj))
        extra = sorted(set(obj) - set(KEYS))
        if missing or extra:
            what = f"missing key(s) {missing}" if missing else f"unknown key(s) {extra}"
            raise ValueError(f"BENCH line {n}: {what}")
        ratio = obj["ratio"]
        if isinstance(ratio, bool) or not isinstance(ratio, int | float) or ratio != ratio:
            raise ValueError(f"BENCH line {n}: ratio must be a number, got {ratio!r}")
        if obj["goal"] is not None and not isinstance(obj["goal"], str):
            raise ValueError(f"BENCH line {n}: goal must be a string or null")
        records.append(
            BenchRecord(
                str(obj["benchmark"]),
                str(obj["case"]),
                float(ratio),
                str(obj["baseline"]),
                obj["goal"],
            )
        )
    return records


def goal_met(ratio: float, goal: str | None) -> bool | None:
    """Whether ``ratio`` meets ``goal`` (``">= 10x"``, ``"<= 1.15x"``, ``"> 1"``, ...).

    float, str | None -> bool | None; ``None`` when there is no goal or it is not a
    comparison (free text such as ``"cheap"``).

    >>> goal_met(2.8, ">= 10x"), goal_met(1.08, "<= 1.15x"), goal_met(3.0, None)
    (False, True, None)
    """
    if goal is None:
        return None
    m = _GOAL.match(goal)
    if m is None:
        return None
    op, bound = m.group(1), float(m.group(2))
    return {
        ">=": ratio >= bound,
        "<=": ratio <= bound,
        ">": ratio > bound,
        "<": ratio < bound,
    }[op]


def find_benchmarks_dir(path: str | os.PathLike | None = None) -> Path:
    """The benchmarks folder: ``path`` if given, else ``benchmarks/`` next to the package
    source (a checkout), else ``./benchmarks``. Raises ``ValueError`` naming where it looked.
    """
    if path is not None:
        p = Path(path)
        if not p.is_dir():
            raise ValueError(f"benchmarks folder {str(p)!r} does not exist")
        return p
    candidates = [Path(__file__).resolve().parents[1] / "benchmarks", Path.cwd() / "benchmarks"]
    for c in candidates:
        if c.is_dir():
            return c
    looked = ", ".join(str(c) for c in candidates)
    raise ValueError(f"no benchmarks folder found (looked in {looked}); pass --dir")


def discover(directory: Path, only: list[str] | None = None) -> list[Path]:
    """The scripts to run: ``directory/*.py`` except ``_*.py``, sorted; ``only`` picks by
    name (without ``.py``), in the order given. Unknown names raise ``ValueError``.
    """
    scripts = {p.stem: p for p in sorted(directory.glob("*.py")) if not p.name.startswith("_")}
    if not only:
        return list(scripts.values())
    unknown = [n for n in only if n not in scripts]
    if unknown:
        raise ValueError(f"unknown benchmark(s) {unknown}; available: {sorted(scripts)}")
    return [scripts[n] for n in only]


def run_script(
    script: Path, *, quick: bool, verbose: bool, timeout: float | None, out: TextIO
) -> ScriptResult:
    """Run one script with ``sys.executable``; stdout is parsed (and echoed if verbose)."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    if quick:
        env["QJAX_BENCH_QUICK"] = "1"
    else:
        env.pop("QJAX_BENCH_QUICK", None)
    t0 = time.perf_counter()
    lines: list[str] = []
    # stderr to a file, not a pipe: a full stderr pipe would block the script while we
    # read stdout line by line
    with tempfile.TemporaryFile(mode="w+", encoding="utf-8", errors="replace") as err:
        proc = subprocess.Popen(
            [sys.executable, str(script)],
            cwd=script.parent.parent,
            env=env,
            stdout=subprocess.PIPE,
            stderr=err,
            text=True,
            errors="replace",
        )
        # a watchdog, not a check between lines: a hung script may print nothing at all
        timed_out = threading.Event()

        def kill() -> None:
            timed_out.set()
            proc.kill()

        timer = None if timeout is None else threading.Timer(timeout, kill)
        if timer is not None:
            timer.start()
        try:
            for line in proc.stdout:
                lines.append(line)
                if verbose:
                    out.write(f"  {script.stem}| {line}")
                    out.flush()
            rc = proc.wait()
        finally:
            if timer is not None:
                timer.cancel()
            proc.stdout.close()
        err.seek(0)
        tail = "".join(err.read().splitlines(keepends=True)[-STDERR_TAIL_LINES:])
    res = ScriptResult(script.stem, rc, time.perf_counter() - t0, stderr_tail=tail)
    if timed_out.is_set():
        res.error = f"timed out after {timeout:g} s"
    elif rc != 0:
        res.error = f"exit status {rc}"
    try:
        res.records = parse_bench_lines("".join(lines))
    except ValueError as e:
        res.error = res.error or str(e)
    return res


def ratio_table(results: list[ScriptResult]) -> str:
    """The table: benchmark, case, ratio, baseline, goal, met? (one row per BENCH line;
    a script without lines gets one row saying so, a failed one a FAILED row).
    """
    rows: list[list[object]] = []
    for r in results:
        for rec in r.records:
            met = {True: "yes", False: "no", None: "-"}[rec.met]
            rows.append([rec.benchmark, rec.case, f"{rec.ratio:.3g}x", rec.baseline, rec.goal, met])
        if not r.ok:
            rows.append([r.name, f"FAILED ({r.error})", "-", "-", "-", "-"])
        elif not r.records:
            rows.append([r.name, "(no BENCH line)", "-", "-", "-", "-"])
    header = ["benchmark", "case", "ratio", "baseline", "goal", "met?"]
    title = "qjax bench: ratio = baseline time / qjax time (goal <= ...: qjax / baseline overhead)"
    return text_table(title, header, rows)


def _machine_lines(directory: Path) -> tuple[str, str]:
    """The benchmarks' own machine and load lines (``_timing.py``), when that file exists."""
    timing = directory / "_timing.py"
    if timing.is_file():
        import importlib.util

        spec = importlib.util.spec_from_file_location("_qjax_bench_timing", timing)
        if spec is not None and spec.loader is not None:
            mod = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(mod)
            return mod.machine_line(), mod.load_line()
    try:
        one, five, fifteen = os.getloadavg()
        load = f"load average {one:.2f} {five:.2f} {fifteen:.2f} ({os.cpu_count()} cores)"
    except OSError:
        load = "load average: unavailable"
    machine = f"{platform.machine()}, {os.cpu_count()} cores, python {platform.python_version()}"
    return machine, load


def run_bench(
    directory: str | os.PathLike | None = None,
    only: list[str] | None = None,
    *,
    quick: bool = False,
    verbose: bool = False,
    json_path: str | os.PathLike | None = None,
    timeout: float | None = None,
    out: TextIO | None = None,
) -> int:
    """Run the benchmark scripts, print the ratio table, machine and load lines.

    Returns the exit status: 0 when every script ran and reported well-formed lines,
    1 when any failed (goals missed do not fail the run: they are measurements).
    ``json_path`` also writes ``{"machine", "load", "quick", "results", "failures"}``.
    """
    out = out or sys.stdout
    bdir = find_benchmarks_dir(directory)
    scripts = discover(bdir, only)
    if not scripts:
        raise ValueError(f"no benchmark scripts in {str(bdir)!r}")
    results = []
    for s in scripts:
        out.write(f"== {s.stem}{' (quick)' if quick else ''} ...\n")
        out.flush()
        r = run_script(s, quick=quick, verbose=verbose, timeout=timeout, out=out)
        status = "ok" if r.ok else f"FAILED: {r.error}"
        out.write(f"   {r.seconds:.1f} s, {len(r.records)} BENCH line(s), {status}\n")
        out.flush()
        results.append(r)
    machine, load = _machine_lines(bdir)
    out.write("\n" + ratio_table(results) + "\n")
    out.write(f"machine: {machine}\n{load}\n")
    failed = [r for r in results if not r.ok]
    for r in failed:
        out.write(f"\n{r.name} FAILED ({r.error}); stderr tail:\n{r.stderr_tail or '(empty)'}")
        if not r.stderr_tail.endswith("\n"):
            out.write("\n")
    if json_path is not None:
        doc = {
            "machine": machine,
            "load": load,
            "quick": quick,
            "results": [
                {**{k: getattr(rec, k) for k in KEYS}, "met": rec.met}
                for r in results
                for rec in r.records
            ],
            "scripts": [
                {"name": r.name, "seconds": round(r.seconds, 3), "ok": r.ok} for r in results
            ],
            "failures": [
                {
                    "name": r.name,
                    "returncode": r.returncode,
                    "error": r.error,
                    "stderr_tail": r.stderr_tail,
                }
                for r in failed
            ],
        }
        Path(json_path).write_text(json.dumps(doc, indent=2) + "\n")
    return 1 if failed else 0
