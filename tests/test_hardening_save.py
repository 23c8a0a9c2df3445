"""Saving and reading a served model (issue 13): the saved file's mode follows the umask,
a symlink is written through (the link stays), an interrupted write leaves no temporary
file, and unreadable / unwritable paths are named errors ("permission denied" on load,
not safetensors' "No such file or directory"; the path on save)."""

import functools
import os
import shutil
import subprocess
import sys
import tempfile

import jax.numpy as jnp
import numpy as np
import pytest

from qjax import convert, load_served, save_served


@functools.lru_cache(maxsize=1)
def _model():
    """A converted program (quantize, dequantize): the smallest thing save_served takes."""
    from flax import nnx

    from qjax.flax import default_qat_qconfig
    from qjax.flax import nnx as qnnx

    cfg = default_qat_qconfig("x86")
    model = nnx.Sequential(qnnx.QuantStub(cfg), qnnx.DeQuantStub())
    qnnx.calibrate(model, [X], progress=False)
    return convert(model, X)


X = jnp.array([[0.3, 1.0, -9.0]])


@pytest.mark.parametrize("umask", [0o022, 0o002, 0o077])
def test_saved_file_mode_follows_the_umask(tmp_path, umask):
    old = os.umask(umask)
    try:
        save_served(tmp_path / "m.safetensors", _model())
    finally:
        os.umask(old)
    mode = os.stat(tmp_path / "m.safetensors").st_mode & 0o777
    assert mode == 0o666 & ~umask, oct(mode)


def test_saving_through_a_symlink_writes_its_target(tmp_path):
    (tmp_path / "real").mkdir()
    target = tmp_path / "real" / "m.safetensors"
    target.write_bytes(b"old")
    link = tmp_path / "link.safetensors"
    link.symlink_to(target)
    save_served(link, _model())
    assert link.is_symlink() and os.readlink(link) == str(target)
    assert np.array_equal(load_served(target)(X), _model()(X))
    assert sorted(os.listdir(tmp_path / "real")) == ["m.safetensors"]


def test_an_interrupted_save_leaves_no_temporary_file(tmp_path, monkeypatch):
    target = tmp_path / "m.safetensors"
    save_served(target, _model())
    before = target.read_bytes()

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "replace", interrupted)
    with pytest.raises(KeyboardInterrupt):
        save_served(target, _model())
    monkeypatch.undo()
    assert os.listdir(tmp_path) == ["m.safetensors"]  # no hidden temporary file
    assert target.read_bytes() == before  # the old file is untouched


_AS_NOBODY = """
import sys
from qjax import load_served, save_served
public = load_served(sys.argv[3])  # a readable copy: no convert in the subprocess
for call in (lambda: load_served(sys.argv[1]), lambda: save_served(sys.argv[2], public)):
    try:
        call()
        print("no error")
    except Exception as e:
        print(type(e).__name__, e)
"""


def test_permission_errors_say_so_and_name_the_path():
    """Run as an unprivileged user (root reads and writes everything)."""
    if os.geteuid() == 0 and shutil.which("setpriv") is None:
        pytest.skip("running as root without setpriv")
    d = tempfile.mkdtemp()
    try:
        os.chmod(d, 0o755)
        secret = os.path.join(d, "secret.safetensors")
        save_served(secret, _model())
        public = os.path.join(d, "public.safetensors")
        save_served(public, _model())
        os.chmod(public, 0o644)
        os.chmod(secret, 0o600)
        ro = os.path.join(d, "ro")
        os.mkdir(ro, 0o555)
        out_path = os.path.join(ro, "out.safetensors")
        cmd = [sys.executable, "-c", _AS_NOBODY, secret, out_path, public]
        if os.geteuid() == 0:
            cmd = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", *cmd]
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        env = dict(os.environ, PYTHONPATH=root, HOME=d, JAX_PLATFORMS="cpu")
        r = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=root, timeout=120)
        lines = r.stdout.strip().splitlines()
        assert len(lines) == 2, (r.stdout, r.stderr)
        assert lines[0] == f"ValueError load_served: cannot read {secret!r} (permission denied)"
        assert lines[1].startswith("PermissionError "), lines[1]
        assert f"save_served: cannot write {out_path!r}" in lines[1], lines[1]
    finally:
        os.chmod(os.path.join(d, "ro"), 0o755) if os.path.isdir(os.path.join(d, "ro")) else None
        shutil.rmtree(d)


def test_corrupt_files_are_value_errors_naming_the_file(tmp_path):
    """safetensors' own SafetensorError never escapes load_served."""
    good = tmp_path / "m.safetensors"
    save_served(good, _model())
    raw = good.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    cases = {
        "empty": b"",
        "truncated": raw[: len(raw) // 2],
        "header_len_huge": (2**40).to_bytes(8, "little") + raw[8:],
        "header_not_json": raw[:8] + b"{" * n + raw[8 + n :],
        "data_cut": raw[:-3],
    }
    for name, data in cases.items():
        p = tmp_path / f"{name}.safetensors"
        p.write_bytes(data)
        with pytest.raises(ValueError, match=rf"load_served: '{p}' is not a qjax") as e:
            load_served(p)
        assert "SafetensorError" not in type(e.value).__name__, name
