"""The code in README.md and docs/**/*.md runs, as written, in order.

Every ```python block of a file runs in one namespace shared by that file's blocks (in
order), in a fresh temporary directory (files a block writes stay there). A block is
skipped only when the line just before its fence is ``<!-- no-test: REASON -->``.
```bash blocks whose every command line starts with ``qjax `` run through the command
line's entry point (``qjax.cli:main``, what the ``qjax`` script calls) in the same
directory; an ``<!-- exit: N -->`` line before the fence states the expected exit status
(default 0). Other shell blocks (``./run.sh ...``) are shown, not run. Relative links in
the docs must point at files that exist.
"""

from __future__ import annotations

import contextlib
import io
import pathlib
import re
import shlex
import sys
import time
import warnings

import jax
import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
FILES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
FENCE = re.compile(r"^```(\w*)\s*$")
NO_TEST = re.compile(r"^<!--\s*no-test:\s*(\S.*?)\s*-->$")
EXIT = re.compile(r"^<!--\s*exit:\s*(\d+)\s*-->$")
LINK = re.compile(r"\]\(([^)#\s]+)(?:#[^)]*)?\)")
MAX_OPT_OUTS = 3  # "almost none": a block that cannot run must say why


def blocks(path: pathlib.Path) -> list[dict]:
    """Fenced blocks of ``path``: language, first line number, source, markers before."""
    lines = path.read_text().splitlines()
    out, i = [], 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        prev = lines[i - 1].strip() if i else ""
        j = i + 1
        while j < len(lines) and lines[j].rstrip() != "```":
            j += 1
        if j == len(lines):
            raise ValueError(f"{path.name}:{i + 1}: unclosed code fence")
        skip, code = NO_TEST.match(prev), EXIT.match(prev)
        out.append(
            {
                "lang": m.group(1),
                "line": i + 1,
                "src": "\n".join(lines[i + 1 : j]) + "\n",
                "skip": skip.group(1) if skip else None,
                "exit": int(code.group(1)) if code else 0,
            }
        )
        i = j + 1
    return out


def _cli_lines(src: str) -> list[str] | None:
    """The ``qjax ...`` commands of a shell block, or None when it is not all of them."""
    cmds = [ln.strip() for ln in src.splitlines() if ln.strip() and not ln.startswith("#")]
    if not cmds or not all(c.startswith("qjax ") for c in cmds):
        return None
    return cmds


def _run_cli(cmd: str) -> tuple[int, str]:
    from qjax.cli import main

    argv = shlex.split(cmd.split(" #")[0])[1:]
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main(argv)
    return rc, out.getvalue() + err.getvalue()


@pytest.fixture
def _no_temp_modules(tmp_path_factory):
    """Forget modules imported from pytest's temp dir, before and after: a `defs.py` that
    another test wrote (test_cli) must not shadow the one a doc block writes, and back."""
    base = str(tmp_path_factory.getbasetemp())

    def forget():
        for name, mod in list(sys.modules.items()):
            if (getattr(mod, "__file__", None) or "").startswith(base):
                del sys.modules[name]

    forget()
    yield
    forget()


@pytest.mark.parametrize("path", FILES, ids=[str(f.relative_to(ROOT)) for f in FILES])
def test_markdown_code_runs(path, tmp_path, _no_temp_modules, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(ROOT / "examples"))
    monkeypatch.syspath_prepend(str(tmp_path))  # as `python script.py` run in that directory
    ns: dict = {"__name__": f"docs_{path.stem}"}
    ran = 0
    t0 = time.perf_counter()
    for b in blocks(path):
        where = f"{path.relative_to(ROOT)}:{b['line']}"
        if b["skip"]:
            continue
        if b["lang"] == "python":
            # user code runs as a user runs it: with JAX's default dtype promotion (the
            # suite's strict mode is for the library; optax's adam is not strict-clean)
            with warnings.catch_warnings(), jax.numpy_dtype_promotion("standard"):
                warnings.simplefilter("ignore", DeprecationWarning)
                try:
                    exec(compile(b["src"], where, "exec"), ns)
                except Exception as e:
                    raise AssertionError(f"code block at {where} failed: {e!r}") from e
            ran += 1
        elif b["lang"] in ("bash", "sh", "console") and (cmds := _cli_lines(b["src"])):
            for cmd in cmds:
                rc, text = _run_cli(cmd)
                assert rc == b["exit"], f"{where}: `{cmd}` exited {rc}:\n{text}"
            ran += 1
    assert ran or path.name == "README.md" or not blocks(path), f"{path.name}: nothing ran"
    with capsys.disabled():
        print(f"\n  {path.relative_to(ROOT)}: {ran} blocks in {time.perf_counter() - t0:.1f} s")


def test_opt_outs_are_few_and_say_why():
    skipped = [
        f"{f.relative_to(ROOT)}:{b['line']} ({b['skip']})"
        for f in FILES
        for b in blocks(f)
        if b["skip"]
    ]
    assert len(skipped) <= MAX_OPT_OUTS, f"too many untested blocks: {skipped}"


def test_guides_and_numerics_exist_and_links_resolve():
    names = {f.relative_to(ROOT).as_posix() for f in FILES}
    for want in (
        "docs/numerics.md",
        "docs/guides/qat.md",
        "docs/guides/ptq.md",
        "docs/guides/serving.md",
        "docs/guides/import_pytorch.md",
        "docs/guides/parity_debugging.md",
    ):
        assert want in names, f"missing {want}"
    broken = []
    for f in FILES:
        for target in LINK.findall(f.read_text()):
            if "://" in target or target.startswith("mailto:"):
                continue
            if not (f.parent / target).exists():
                broken.append(f"{f.relative_to(ROOT)} -> {target}")
    assert not broken, f"broken links: {broken}"


def test_block_parser_sees_markers(tmp_path):
    p = tmp_path / "probe.md"
    p.write_text(
        "x\n<!-- no-test: needs a GPU -->\n```python\n1/0\n```\n"
        "<!-- exit: 1 -->\n```bash\nqjax parity m.pt\n```\n"
    )
    got = blocks(p)
    assert [(b["lang"], b["skip"], b["exit"]) for b in got] == [
        ("python", "needs a GPU", 0),
        ("bash", None, 1),
    ]
    assert _cli_lines("qjax parity m.pt\n# c\nqjax inspect m.pt\n") == [
        "qjax parity m.pt",
        "qjax inspect m.pt",
    ]
    assert _cli_lines("./run.sh demo\n") is None
