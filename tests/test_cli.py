"""``qjax parity`` / ``qjax inspect`` on models saved by a separate script, as a user would:
state_dict + definition, TorchScript + definition, torch.export ``.pt2``, pickled whole
model (only with ``--trusted``; a malicious pickle is never run without it)."""

import contextlib
import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from qjax.cli import main

pytest.importorskip("torch")
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::DeprecationWarning")

DEFS = textwrap.dedent('''
    import torch
    from torch import nn
    from torch.ao import quantization as tq


    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.quant = tq.QuantStub()
            self.conv = nn.Conv2d(3, 4, 3, padding=1)
            self.relu = nn.ReLU()
            self.fc = nn.Linear(4 * 6 * 6, 5)
            self.dequant = tq.DeQuantStub()

        def forward(self, x):
            x = self.relu(self.conv(self.quant(x)))
            return self.dequant(self.fc(torch.flatten(x, 1)))


    class MLP(nn.Module):
        def __init__(self):
            super().__init__()
            self.quant, self.dequant = tq.QuantStub(), tq.DeQuantStub()
            self.fc1, self.relu, self.fc2 = nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3)

        def forward(self, x):
            return self.dequant(self.fc2(self.relu(self.fc1(self.quant(x)))))


    def converted(calibrate=None, cls=Net, shape=(1, 3, 6, 6)):
        """The converted model's structure (weights come from the saved file)."""
        torch.backends.quantized.engine = "fbgemm"
        m = cls().eval()
        m.qconfig = tq.get_default_qconfig("fbgemm")
        if cls is Net:
            tq.fuse_modules(m, [["conv", "relu"]], inplace=True)
        p = tq.prepare(m)
        p(calibrate if calibrate is not None else torch.zeros(shape))
        return tq.convert(p)


    class Evil:
        def __reduce__(self):
            import pathlib
            return (pathlib.Path.write_text, (pathlib.Path(__file__).parent / "PWNED", "x"))
''')

SAVE = textwrap.dedent("""
    import sys, warnings
    warnings.filterwarnings("ignore")
    import numpy as np, torch
    out = sys.argv[1]
    sys.path.insert(0, out)
    import defs
    torch.manual_seed(0)
    m = defs.converted(torch.randn(16, 3, 6, 6))
    torch.save(m.state_dict(), f"{out}/net_state.pt")
    torch.jit.save(torch.jit.script(m), f"{out}/net_script.pt")
    torch.save(defs.converted(torch.randn(32, 8), defs.MLP), f"{out}/mlp_whole.pt")
    torch.save({"w": defs.Evil()}, f"{out}/evil.pt")
    x = np.random.default_rng(1).standard_normal((2, 3, 6, 6))
    np.save(f"{out}/x.npy", x.astype(np.float32))
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
    from torchao.testing.pt2e._xnnpack_quantizer import (
        XNNPACKQuantizer, get_symmetric_quantization_config)
    f = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU(), torch.nn.Flatten(),
                            torch.nn.Linear(64, 5)).eval()
    x = (torch.randn(2, 3, 6, 6),)
    q = XNNPACKQuantizer().set_global(get_symmetric_quantization_config())
    gm = prepare_pt2e(torch.export.export(f, x).module(), q)
    gm(*x)
    torch.export.save(torch.export.export(convert_pt2e(gm), x), f"{out}/net.pt2")
    print("saved")
""")


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    d = tmp_path_factory.mktemp("models")
    (d / "defs.py").write_text(DEFS)
    (d / "save.py").write_text(SAVE)
    proc = subprocess.run(
        [sys.executable, str(d / "save.py"), str(d)], capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0 and "saved" in proc.stdout, proc.stdout + proc.stderr
    return d


def _run(capsys, *argv):
    rc = main(list(map(str, argv)))
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_parity_state_dict_with_definition(saved, capsys):
    rc, out, err = _run(
        capsys,
        "parity",
        saved / "net_state.pt",
        "--definition",
        f"{saved / 'defs.py'}:converted",
        "--inputs",
        saved / "x.npy",
        "--engine",
        "fbgemm",
        "--format",
        "json",
    )
    assert rc == 0, err
    d = json.loads(out)
    names = [la["name"] for la in d["layers"]]
    assert names[:2] == ["quant", "conv"] and "fc" in names
    assert d["ok"] and d["mismatches"] == 0
    assert d["values"] == 2 * (3 * 36 + 3 * 4 * 36 + 5)  # quant, conv, relu, flatten, fc
    # a different requantization than torch's: mismatches, exit status 1, rich table
    rc, out, _ = _run(
        capsys,
        "parity",
        saved / "net_state.pt",
        "--definition",
        f"{saved / 'defs.py'}:converted",
        "--input-shape",
        "4,3,6,6",
        "--engine",
        "tflite",
    )
    assert rc == 1 and "qjax parity vs torch, engine tflite" in out and "linear/tflite" in out


def test_inspect_torchscript_matches_torch_code_ranges(saved, capsys):
    defn = f"{saved / 'defs.py'}:converted"
    common = ("--definition", defn, "--inputs", saved / "x.npy", "--engine", "fbgemm")
    rc, out, err = _run(
        capsys, "inspect", saved / "net_script.pt", "--trusted", *common, "--format", "json"
    )
    assert rc == 0, err
    info = {la["name"]: la for la in json.loads(out)["layers"]}
    rc, out, _ = _run(capsys, "parity", saved / "net_state.pt", *common, "--format", "json")
    torch_side = {la["name"]: la for la in json.loads(out)["layers"]}
    assert rc == 0 and set(info) == set(torch_side)
    for name, la in info.items():  # the TorchScript weights are the state_dict's
        assert la["code_range"] == torch_side[name]["ref_range"], name
    assert info["fc"]["weight"].startswith("5 ch") and info["conv"]["op"] == "conv2d"


def test_parity_pt2_program(saved, capsys):
    rc, out, err = _run(capsys, "parity", saved / "net.pt2", "--trusted", "--format", "markdown")
    assert rc == 0, err  # example inputs saved in the .pt2
    assert out.startswith("**qjax parity vs torch") and "0 of 482 integers differ" in out
    assert "| quantize_per_tensor_1 | conv2d/fbgemm | 128 | 0 |" in out


def test_pickles_need_trusted_and_never_run_otherwise(saved, capsys, monkeypatch):
    rc, _, err = _run(capsys, "parity", saved / "evil.pt", "--input-shape", "1,8")
    assert rc == 2 and "--trusted" in err and not (saved / "PWNED").exists()
    rc, _, err = _run(capsys, "parity", saved / "mlp_whole.pt", "--input-shape", "4,8")
    assert rc == 2 and "pickled" in err
    monkeypatch.syspath_prepend(str(saved))  # the pickle's classes must be importable
    rc, out, err = _run(
        capsys,
        "parity",
        saved / "mlp_whole.pt",
        "--trusted",
        "--input-shape",
        "4,8",
        "--engine",
        "fbgemm",
        "--format",
        "text",
    )
    assert rc == 0, err
    assert "0 of 172 integers differ" in out  # 4 rows: quant 8, fc1 16, relu 16, fc2 3
    assert all(w in out for w in ("fc1", "fc2", "linear/fbgemm"))


def test_cli_errors_name_what_to_pass(saved, capsys):
    rc, _, err = _run(capsys, "parity", saved / "net_state.pt", "--input-shape", "1,3,6,6")
    assert rc == 2 and "state_dict: pass --definition" in err
    rc, _, err = _run(
        capsys, "inspect", saved / "net_script.pt", "--trusted", "--input-shape", "1,3,6,6"
    )
    assert rc == 2 and "TorchScript" in err and "--definition" in err
    rc, _, err = _run(capsys, "parity", saved / "nope.pt", "--input-shape", "1,3,6,6")
    assert rc == 2 and "does not exist" in err
    rc, _, err = _run(
        capsys,
        "parity",
        saved / "net_state.pt",
        "--definition",
        f"{saved / 'defs.py'}:missing",
        "--input-shape",
        "1,3,6,6",
    )
    assert rc == 2 and "no function 'missing'" in err
    rc, _, err = _run(
        capsys, "parity", saved / "net_state.pt", "--definition", f"{saved / 'defs.py'}:converted"
    )
    assert rc == 2 and "--input-shape" in err


# --- .pt2 and TorchScript run code from the file on load: both need --trusted ------------
# The malicious files are built here, at test time, in tmp_path (nothing malicious is
# committed). Each writes a marker file when loaded; without --trusted it must not exist.


class Evil:
    """A pickled object that writes ``marker`` when unpickled (shared with
    test_fuzz_loaders)."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        import pathlib

        return (pathlib.Path.write_text, (pathlib.Path(self.marker), "x"))


def _evil_pt2(tmp_path):
    """A real torch.export .pt2 whose sample inputs are a pickle that writes MARKER:
    torch.export.load retries a failed weights_only load of that part with
    weights_only=False, which runs it."""
    import io
    import zipfile

    import torch

    marker = tmp_path / "PWNED_PT2"
    good = tmp_path / "good.pt2"
    ep = torch.export.export(torch.nn.Linear(2, 2), (torch.randn(1, 2),))
    torch.export.save(ep, str(good))
    buf = io.BytesIO()
    torch.save((Evil(marker),), buf)
    evil = tmp_path / "evil.pt2"
    with zipfile.ZipFile(good) as zin, zipfile.ZipFile(evil, "w") as zout:
        names = zin.namelist()
        assert any(n.endswith("sample_inputs/model.pt") for n in names), names
        for info in zin.infolist():
            data = zin.read(info.filename)
            if info.filename.endswith("sample_inputs/model.pt"):
                data = buf.getvalue()
            zout.writestr(info, data)
    return evil, marker


_EVIL_SCRIPT = textwrap.dedent('''
    import sys
    import torch


    class Evil(torch.nn.Module):
        """torch.jit.load runs the archive's compiled __setstate__: it creates MARKER."""

        def __init__(self, marker: str):
            super().__init__()
            self.p = marker
            self.t = torch.zeros(1, dtype=torch.uint8)

        def forward(self, x):
            return x

        @torch.jit.export
        def __getstate__(self):
            return (self.p, self.training)

        @torch.jit.export
        def __setstate__(self, state: tuple[str, bool]):
            self.p = state[0]
            self.training = state[1]
            self.t = torch.from_file(self.p, shared=True, size=1, dtype=torch.uint8)


    torch.jit.save(torch.jit.script(Evil(sys.argv[2])), sys.argv[1])
    print("saved")
''')


def _evil_torchscript(tmp_path):
    marker = tmp_path / "PWNED_TS"
    (tmp_path / "make_evil_ts.py").write_text(_EVIL_SCRIPT)
    path = tmp_path / "evil_script.pt"
    proc = subprocess.run(
        [sys.executable, str(tmp_path / "make_evil_ts.py"), str(path), str(marker)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0 and "saved" in proc.stdout, proc.stdout + proc.stderr
    assert not marker.exists()
    return path, marker


@pytest.mark.parametrize("command", ["parity", "inspect"])
def test_pt2_needs_trusted_and_never_runs_otherwise(tmp_path, capsys, command):
    evil, marker = _evil_pt2(tmp_path)
    for extra in ((), ("--input-shape", "1,2"), ("--definition", "x.py:f")):
        rc, out, err = _run(capsys, command, evil, *extra)
        assert rc == 2 and not marker.exists(), (out, err)
        assert err.startswith(f"qjax {command}: error: ") and str(evil) in err
        assert "torch.export" in err and "--trusted" in err and "runs code" in err
    # a .pt2 without the .pt2 suffix is still recognised by its content and refused
    renamed = tmp_path / "evil_renamed.bin"
    renamed.write_bytes(evil.read_bytes())
    rc, _, err = _run(capsys, command, renamed)
    assert rc == 2 and "--trusted" in err and not marker.exists(), err
    # the file is really malicious: a trusted load runs it (what --trusted is for)
    from qjax.cli._model import load_model

    with pytest.raises(ValueError, match=r"--trusted"):
        load_model(str(evil))
    assert not marker.exists()
    # torch 2.13's fallback warning has a bad format string, which pytest's log capture
    # raises as a TypeError (a ValueError here): the code has run by then either way
    with contextlib.suppress(ValueError):
        load_model(str(evil), trusted=True)
    assert marker.exists()


@pytest.mark.parametrize("command", ["parity", "inspect"])
def test_torchscript_needs_trusted_and_never_runs_otherwise(tmp_path, capsys, command):
    evil, marker = _evil_torchscript(tmp_path)
    for extra in ((), ("--input-shape", "1,2"), ("--definition", "x.py:f")):
        rc, out, err = _run(capsys, command, evil, *extra)
        assert rc == 2 and not marker.exists(), (out, err)
        assert err.startswith(f"qjax {command}: error: ") and str(evil) in err
        assert "TorchScript" in err and "--trusted" in err and "runs code" in err
    from qjax.cli._model import load_model

    with pytest.raises(ValueError, match=r"--trusted"):
        load_model(str(evil))
    assert not marker.exists()
    with pytest.raises(ValueError, match=r"--definition"):  # asked before loading
        load_model(str(evil), trusted=True)
    assert not marker.exists()
    (tmp_path / "defs.py").write_text("import torch\n\ndef f():\n    return torch.nn.Identity()\n")
    load_model(str(evil), definition=f"{tmp_path / 'defs.py'}:f", trusted=True)
    assert marker.exists()  # the file is really malicious: a trusted load runs it


def test_damaged_files_and_wrong_shapes_are_errors_not_tracebacks(saved, tmp_path, capsys):
    """Exit status 2 and one ``qjax X: error:`` line; 1 is kept for "integers differ"."""
    raw = (saved / "net.pt2").read_bytes()
    cases = {}
    for name, data in {
        "truncated.pt2": raw[: len(raw) // 2],
        "cut_tail.pt2": raw[:-10],
        "garbage.pt2": b"PK\x03\x04" + b"\x00" * 64,
        "garbage.pt": bytes(range(256)) * 4,
        "empty.pt": b"",
    }.items():
        (tmp_path / name).write_bytes(data)
        cases[name] = (tmp_path / name, "--trusted", "--input-shape", "2,3,6,6")
    defn = ("--definition", f"{saved / 'defs.py'}:converted")
    cases["state_dict, wrong --input-shape"] = (
        saved / "net_state.pt",
        *defn,
        "--input-shape",
        "1,5",
    )
    cases["state_dict, wrong H, W"] = (saved / "net_state.pt", *defn, "--input-shape", "1,3,5,5")
    cases["state_dict, wrong C"] = (saved / "net_state.pt", *defn, "--input-shape", "1,4,6,6")
    cases[".pt2, wrong H, W"] = (saved / "net.pt2", "--trusted", "--input-shape", "2,3,5,5")
    cases[".pt2, wrong C"] = (saved / "net.pt2", "--trusted", "--input-shape", "2,4,6,6")
    cases["state_dict, wrong rank"] = (saved / "net_state.pt", *defn, "--input-shape", "3,6,6")
    cases[".pt2, wrong --input-shape"] = (saved / "net.pt2", "--trusted", "--input-shape", "1,5")
    cases["TorchScript, wrong --input-shape"] = (
        saved / "net_script.pt", "--trusted", *defn, "--input-shape", "1,5",
    )  # fmt: skip
    np.save(tmp_path / "ints.npy", np.zeros((1, 3, 6, 6), np.int32))
    cases["--inputs of ints"] = (saved / "net_state.pt", *defn, "--inputs", tmp_path / "ints.npy")
    cases["--inputs missing"] = (saved / "net_state.pt", *defn, "--inputs", tmp_path / "no.npy")
    for command in ("parity", "inspect"):
        for label, argv in cases.items():
            try:
                rc, out, err = _run(capsys, command, *argv)
            except Exception as e:  # a raw traceback is what this test forbids
                pytest.fail(f"{command} {label}: raised {type(e).__name__}: {e}")
            assert rc == 2, (command, label, rc, out, err)
            # the model's own warnings (torch's observers, run during the import) may come
            # first: the first run in a process prints them (the test failed alone)
            lines = err.splitlines()
            assert any(ln.startswith(f"qjax {command}: error: ") for ln in lines), (label, err)
            assert "Traceback" not in err, (label, err)


def _rewrite_zip(src, dst, edit):
    """Copy the zip archive ``src`` to ``dst`` with ``edit(name, bytes)`` applied to each
    member (None drops it)."""
    import zipfile

    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        for info in zin.infolist():
            data = edit(info.filename, zin.read(info.filename))
            if data is not None:
                zout.writestr(info, data)


def _break_pt2_signature(name, data):
    """The first user output renamed to the first user input: torch.export.load's verifier
    raises SpecViolationError ('User output ... is not in the correct order ...')."""
    if not name.endswith("models/model.json"):
        return data
    model = json.loads(data)
    sig = model["graph_module"]["signature"]
    first_in = next(s["user_input"]["arg"] for s in sig["input_specs"] if "user_input" in s)
    out = next(s["user_output"] for s in sig["output_specs"] if "user_output" in s)
    out["arg"] = first_in
    return json.dumps(model).encode()


def _break_torchscript_code(name, data):
    """TorchScript's Python source in the archive made unparsable (torch.jit.load's
    RuntimeError), the rest of the archive intact."""
    return b"def forward(self, (:\n" if name.endswith(".py") and "/code/" in name else data


@pytest.mark.parametrize("command", ["parity", "inspect"])
def test_broken_trusted_archives_are_errors_not_tracebacks(saved, tmp_path, capsys, command):
    """Trusted .pt2 failing torch's checks (SpecViolationError) and a TorchScript archive
    whose code does not parse: exit 2 with one ``qjax X: error:`` line naming the file."""
    import torch
    from torch._export.verifier import SpecViolationError

    from qjax.cli._model import _register_quantized_decomposed

    _register_quantized_decomposed()  # the ops the quantized program uses
    bad_pt2 = tmp_path / "spec_violation.pt2"
    _rewrite_zip(saved / "net.pt2", bad_pt2, _break_pt2_signature)
    with pytest.raises(SpecViolationError):  # the case is what it says
        torch.export.load(str(bad_pt2))
    bad_ts = tmp_path / "broken_script.pt"
    _rewrite_zip(saved / "net_script.pt", bad_ts, _break_torchscript_code)
    with pytest.raises(RuntimeError):
        torch.jit.load(str(bad_ts))
    defn = ("--definition", f"{saved / 'defs.py'}:converted")
    cases = {
        "SpecViolationError": (bad_pt2, "torch.export.load failed (SpecViolationError"),
        "TorchScript": (bad_ts, "torch.jit.load failed ("),
    }
    for label, (path, why) in cases.items():
        try:
            rc, out, err = _run(
                capsys, command, path, "--trusted", *defn, "--input-shape", "1,3,6,6"
            )
        except Exception as e:  # a raw traceback is what this test forbids
            pytest.fail(f"{command} {label}: raised {type(e).__name__}: {e}")
        assert rc == 2, (label, rc, out, err)
        assert err.startswith(f"qjax {command}: error: {str(path)!r}: {why}"), (label, err)
        assert "Traceback" not in err and len(err.strip().splitlines()) == 1, (label, err)
