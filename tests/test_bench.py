"""``qjax bench``: BENCH-line parsing, goals, the ratio table, failure reporting, and one
real quick benchmark run."""

from __future__ import annotations

import io
import json
import re
import textwrap
from pathlib import Path

import pytest

from qjax.cli import _bench, main
from qjax.cli._bench import BenchRecord, goal_met, parse_bench_lines, run_bench

GOOD = textwrap.dedent(
    """
    import os
    print("name      ms")
    print("qjax     1.0")
    case = "quick" if os.environ.get("QJAX_BENCH_QUICK") == "1" else "full"
    for ratio, goal in ((2.5, ">= 2x"), (0.5, ">= 2x"), (1.08, "<= 1.15x")):
        rec = {"benchmark": "good", "case": case, "ratio": ratio, "baseline": "jax f32",
               "goal": goal}
        print("BENCH " + __import__("json").dumps(rec))
    """
)
BAD = textwrap.dedent(
    """
    import sys
    print("partial table")
    print("line one of the traceback", file=sys.stderr)
    print("ZeroDivisionError: the last stderr line", file=sys.stderr)
    sys.exit(3)
    """
)
NOLINE = 'print("a table without BENCH lines")\n'
MALFORMED = 'print("BENCH {\\"benchmark\\": \\"m\\", \\"ratio\\": 1.0}")\n'


def rec(**kw) -> str:
    base = {"benchmark": "b", "case": "c", "ratio": 2.0, "baseline": "f32", "goal": None}
    return "BENCH " + json.dumps({**base, **kw})


def test_parse_ignores_other_lines_and_keeps_order():
    text = "\n".join(["header", rec(case="one"), "BENCHMARK not a record", rec(case="two")])
    records = parse_bench_lines(text)
    assert [r.case for r in records] == ["one", "two"]
    assert records[0] == BenchRecord("b", "one", 2.0, "f32", None)


@pytest.mark.parametrize(
    ("line", "msg"),
    [
        ("BENCH {not json", "not JSON"),
        ("BENCH [1, 2]", "expected a JSON object"),
        ('BENCH {"benchmark": "b", "case": "c"}', "missing key(s) ['baseline', 'goal', 'ratio']"),
        (rec(extra=1), "unknown key(s) ['extra']"),
        (rec(ratio="2.0"), "ratio must be a number"),
        (rec(ratio=True), "ratio must be a number"),
        (rec(goal=10), "goal must be a string or null"),
    ],
)
def test_parse_rejects_malformed_lines(line, msg):
    with pytest.raises(ValueError, match="BENCH line 2") as e:
        parse_bench_lines("header\n" + line)
    assert msg in str(e.value)


@pytest.mark.parametrize(
    ("ratio", "goal", "met"),
    [
        (10.0, ">= 10x", True),
        (9.99, ">= 10x", False),
        (1.15, "<= 1.15x", True),
        (1.16, "<= 1.15x", False),
        (2.0, "> 1", True),
        (1.0, "> 1", False),
        (0.5, "< 1x", True),
        (3.0, None, None),
        (3.0, "cheap", None),
    ],
)
def test_goal_met(ratio, goal, met):
    assert goal_met(ratio, goal) is met


@pytest.fixture
def fake_dir(tmp_path: Path) -> Path:
    d = tmp_path / "benchmarks"
    d.mkdir()
    (d / "a_good.py").write_text(GOOD)
    (d / "b_bad.py").write_text(BAD)
    (d / "c_noline.py").write_text(NOLINE)
    (d / "_helper.py").write_text("raise SystemExit('helpers are never run')\n")
    return d


def test_discover_skips_private_and_honours_only(fake_dir):
    assert [p.stem for p in _bench.discover(fake_dir)] == ["a_good", "b_bad", "c_noline"]
    assert [p.stem for p in _bench.discover(fake_dir, ["c_noline", "a_good"])] == [
        "c_noline",
        "a_good",
    ]
    with pytest.raises(ValueError, match=r"unknown benchmark\(s\) \['nope'\].*available"):
        _bench.discover(fake_dir, ["nope"])


def test_run_reports_table_failures_and_json(fake_dir, tmp_path):
    out = io.StringIO()
    jpath = tmp_path / "bench.json"
    rc = run_bench(fake_dir, quick=True, json_path=jpath, out=out)
    text = out.getvalue()
    assert rc == 1  # b_bad failed; the other two still ran
    lines = text.splitlines()
    rows = [ln.split() for ln in lines if ln.startswith("good ")]
    # benchmark, case, ratio, baseline (2 words), goal (2 words), met?
    assert [(r[1], r[2], r[-1]) for r in rows] == [
        ("quick", "2.5x", "yes"),
        ("quick", "0.5x", "no"),
        ("quick", "1.08x", "yes"),
    ]
    assert any(ln.startswith("b_bad") and "FAILED (exit status 3)" in ln for ln in lines)
    assert any(ln.startswith("c_noline") and "(no BENCH line)" in ln for ln in lines)
    assert "b_bad FAILED (exit status 3); stderr tail:" in text
    assert "ZeroDivisionError: the last stderr line" in text
    assert "partial table" not in text  # not verbose: the scripts' own output is not echoed
    assert text.count("machine: ") == 1 and "load average" in text
    doc = json.loads(jpath.read_text())
    assert doc["quick"] is True
    assert [(r["ratio"], r["met"]) for r in doc["results"]] == [
        (2.5, True),
        (0.5, False),
        (1.08, True),
    ]
    assert [(f["name"], f["returncode"]) for f in doc["failures"]] == [("b_bad", 3)]
    assert "ZeroDivisionError" in doc["failures"][0]["stderr_tail"]
    assert [s["name"] for s in doc["scripts"]] == ["a_good", "b_bad", "c_noline"]


def test_run_verbose_full_mode_and_malformed_line(fake_dir):
    (fake_dir / "d_malformed.py").write_text(MALFORMED)
    out = io.StringIO()
    rc = run_bench(fake_dir, ["a_good", "d_malformed"], verbose=True, out=out)
    text = out.getvalue()
    assert rc == 1
    assert "  a_good| qjax     1.0" in text  # streamed
    # QJAX_BENCH_QUICK is not set without quick
    assert [ln.split()[1] for ln in text.splitlines() if ln.startswith("good ")] == ["full"] * 3
    assert "FAILED (BENCH line 1: missing key(s) ['baseline', 'case', 'goal'])" in text


def test_run_all_ok_exit_zero(fake_dir):
    assert run_bench(fake_dir, ["a_good", "c_noline"], out=io.StringIO()) == 0


def test_timeout_kills_a_hung_script(fake_dir):
    (fake_dir / "e_hang.py").write_text("import time\ntime.sleep(60)\n")
    out = io.StringIO()
    assert run_bench(fake_dir, ["e_hang"], timeout=1.0, out=out) == 1
    assert "FAILED (timed out after 1 s)" in out.getvalue()


def test_cli_errors_exit_2(fake_dir, tmp_path, capsys):
    assert main(["bench", "--dir", str(fake_dir), "--only", "nope"]) == 2
    assert "qjax bench: error: unknown benchmark(s) ['nope']" in capsys.readouterr().err
    assert main(["bench", "--dir", str(tmp_path / "missing")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_real_quick_run(tmp_path, capsys):
    """The real stochastic_rounding script, quick: two BENCH lines, parsed, in the JSON."""
    jpath = tmp_path / "bench.json"
    rc = main(["bench", "--quick", "--only", "stochastic_rounding", "--json", str(jpath)])
    text = capsys.readouterr().out
    assert rc == 0, text
    doc = json.loads(jpath.read_text())
    cases = {r["case"]: r for r in doc["results"]}
    assert set(cases) == {"1M float32", "1M float32, cost vs nearest"}
    assert all(r["benchmark"] == "stochastic_rounding" and r["ratio"] > 0 for r in cases.values())
    # the fused hash draws no random tensor: faster than threefry even on a busy machine
    assert cases["1M float32"]["ratio"] > 1
    assert "stochastic_rounding  1M float32" in text


@pytest.mark.slow  # a real benchmark run; the table and JSON checks above use fakes
def test_real_quick_run_times_onnxruntime(tmp_path, capsys):
    """int8_cnn, quick: ONNX Runtime (qjax's own export of the model qjax runs) is timed
    and reported as a baseline with issue 16's goal, and its outputs are compared."""
    jpath = tmp_path / "bench.json"
    rc = main(["bench", "--quick", "--verbose", "--only", "int8_cnn", "--json", str(jpath)])
    text = capsys.readouterr().out
    assert rc == 0, text
    results = json.loads(jpath.read_text())["results"]
    ort = [r for r in results if r["baseline"] == "onnxruntime"]
    # the headline's row carries the goal (its case names the kernel where it is native)
    goals = [r["case"] for r in ort if r["goal"] == ">= 1.0x"]
    assert len(goals) == 1 and goals[0].startswith("batch 64 28x28"), ort
    assert all(r["benchmark"] == "int8_cnn" and r["ratio"] > 0 for r in ort)
    # the exported program is the timed qjax model; ORT's codes are counted against it
    line = next(ln for ln in text.splitlines() if "ORT vs qjax:" in ln)
    m = re.search(r"ORT vs qjax: (\d+) of (\d+) codes differ \(max (\d+) LSB\)", line)
    assert m and int(m[1]) <= int(m[2]) == 64 * 10, line
    assert "imported program vs qjax: 0 of 640 outputs differ" in line
    assert "host level " in text and "onnxruntime " in text
