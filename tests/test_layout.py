"""The house by concern (DESIGN.md "Layers"): imports go downward only, with no cycles.

Every ``import`` in ``qjax/`` and ``converters/`` is read with :mod:`ast`, function-level
(lazy) imports included, and resolved to the module it loads. Two checks:

* the module graph has no cycle (a lazy import that closes a loop still counts: it is a
  loop a reader has to untangle, and one refactor away from an import-time failure);
* each area imports only from its own area or those listed below it in ``LAYERS``.

Implicit parent-package edges (importing ``qjax.kernels._conv`` first runs
``qjax/kernels/__init__``) are not drawn: every module would otherwise depend on the
``qjax`` facade. ``from qjax import X`` is drawn, to the facade itself.
"""

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]

# area -> rank; a module may import from areas of lower or equal rank (equal: its own
# area, or a sibling report package, still without cycles)
LAYERS = {
    "numerics": 0,  # qjax/_spec, _qparams, _rounding, _float, _primitives, _qarray, _render
    "observers": 1,
    "kernels": 2,
    "program": 3,
    "flax": 4,
    "facade": 5,  # qjax/__init__: the public names, up to qjax.flax
    "converters": 6,
    "parity": 7,
    "debug": 7,
    "cli": 8,
    "demo": 8,
}

MAX_LINES = 600
# modules allowed over MAX_LINES, each with the reason (one formula table kept whole)
LONG_MODULES: dict[str, str] = {}


def _module_files() -> dict[str, pathlib.Path]:
    out = {}
    for base, prefix in ((ROOT / "qjax", "qjax"), (ROOT / "converters", "qjax.converters")):
        for p in base.rglob("*.py"):
            if "__pycache__" in p.parts:
                continue
            parts = list(p.relative_to(base).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join([prefix, *parts])] = p
    return out


MODULES = _module_files()


def _area(mod: str) -> str:
    parts = mod.split(".")
    if mod == "qjax":
        return "facade"
    if parts[1] == "program":
        return "program"
    if parts[1] in LAYERS:
        return parts[1]
    return "numerics"


def _is_package(mod: str) -> bool:
    return MODULES[mod].name == "__init__.py"


def _imports(mod: str) -> set[str]:
    """The qjax modules that ``mod`` imports, anywhere in its body."""
    tree = ast.parse(MODULES[mod].read_text())
    pkg = mod if _is_package(mod) else mod.rpartition(".")[0]
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.split(".")[0] == "qjax"}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                anchor = pkg.split(".")[: len(pkg.split(".")) - (node.level - 1)]
                base = ".".join(anchor + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            if base.split(".")[0] != "qjax":
                continue
            for a in node.names:
                sub = f"{base}.{a.name}"
                out.add(sub if sub in MODULES else base)
    return {m for m in out if m in MODULES and m != mod}


GRAPH = {m: _imports(m) for m in MODULES}


def test_every_module_is_read():
    assert {"qjax", "qjax.kernels._levels", "qjax.converters.torch", "qjax.parity"} <= set(GRAPH)
    assert "qjax.kernels._levels" in GRAPH["qjax.converters.torch"]


def _cycle() -> list[str] | None:
    state: dict[str, int] = {}  # 1 on the stack, 2 done
    stack: list[str] = []

    def visit(m):
        state[m] = 1
        stack.append(m)
        for n in sorted(GRAPH[m]):
            if state.get(n) == 1:
                return stack[stack.index(n) :] + [n]
            if n not in state and (found := visit(n)):
                return found
        stack.pop()
        state[m] = 2
        return None

    for m in sorted(GRAPH):
        if m not in state and (found := visit(m)):
            return found
    return None


def test_no_import_cycle():
    cycle = _cycle()
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_cycle_check_finds_a_cycle():
    # the check itself can fail: a synthetic back edge is reported
    GRAPH["qjax._spec"].add("qjax.parity")
    try:
        assert _cycle() is not None
    finally:
        GRAPH["qjax._spec"].discard("qjax.parity")


@pytest.mark.parametrize("mod", sorted(GRAPH))
def test_imports_go_downward(mod):
    up = {n: _area(n) for n in GRAPH[mod] if LAYERS[_area(n)] > LAYERS[_area(mod)]}
    assert not up, f"{mod} ({_area(mod)}) imports from a higher layer: {up}"


def test_importing_qjax_loads_no_report_or_converter():
    # the facade loads debug, parity and converters on first use only
    import subprocess
    import sys

    code = (
        "import sys, qjax; "
        "print(sorted(m for m in sys.modules if m.startswith(('qjax.debug', 'qjax.parity', "
        "'qjax.converters', 'qjax.cli', 'qjax.demo', 'torch', 'matplotlib'))))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout


def test_modules_under_the_line_limit():
    long = {
        m: n
        for m, p in MODULES.items()
        if (n := len(p.read_text().splitlines())) > MAX_LINES and m not in LONG_MODULES
    }
    assert not long, f"modules over {MAX_LINES} lines: {long}"


def _readme_tree() -> list[str]:
    """The paths named in README.md's Layout tree (indentation gives the folders)."""
    text = (ROOT / "README.md").read_text()
    block = text.split("## Layout", 1)[1].split("```text\n", 1)[1].split("```", 1)[0]
    paths, stack = [], []  # stack: (indent, folder)
    for line in block.splitlines():
        indent = len(line) - len(line.lstrip())
        head = line.strip().split("  ")[0]  # names before the two-space description
        if not head or indent >= 20:  # a continued description
            continue
        while stack and stack[-1][0] >= indent:
            stack.pop()
        parent = "".join(f for _, f in stack)
        for name in head.split():
            paths.append(parent + name)
        if head.endswith("/") and len(head.split()) == 1:
            stack.append((indent, head))
    return paths


def test_readme_layout_tree_matches_the_folders():
    named = _readme_tree()
    assert "qjax/kernels/" in named and "qjax/flax/nnx/" in named
    missing = [p for p in named if not (ROOT / p).exists()]
    assert not missing, f"README's layout names paths that do not exist: {missing}"
    packages = {
        str(p.parent.relative_to(ROOT)) + "/"
        for p in (ROOT / "qjax").rglob("__init__.py")
        if "__pycache__" not in p.parts
    }
    unnamed = sorted(packages - set(named))
    assert not unnamed, f"packages missing from README's layout tree: {unnamed}"
