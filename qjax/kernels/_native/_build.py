"""Build ``amx_gemm.cc`` into a shared library once, cached on disk, safe under xdist.

The cache key is the SHA-256 of the source, the compiler (path and ``--version``), the
flags and the jaxlib version (the FFI headers come from jaxlib), so an edit to any of
them builds a new library. Location: ``$QJAX_CACHE_DIR/native/<key>/`` or
``~/.cache/qjax/native/<key>/``. Several processes may build at once: each compiles
into its own temporary file in that folder and ``os.replace``-s it into place, an atomic
rename, so a reader sees either no library or a whole one.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import jax
import jaxlib

SOURCE = Path(__file__).with_name("amx_gemm.cc")
LIB_NAME = "libqjax_amx.so"
# The fused epilogue does float32 arithmetic that must round exactly as XLA's: no fast
# math, and no contraction of a multiply into an add (-ffp-contract=off).
FLAGS = (
    "-O3",
    "-std=c++17",
    "-fPIC",
    "-shared",
    "-mamx-tile",
    "-mamx-int8",
    "-mavx512f",
    "-mavx512bw",
    "-ffp-contract=off",
    "-fno-fast-math",
    "-w",  # the FFI headers warn under -O3 (unreachable returns); not ours to fix
)


class BuildError(RuntimeError):
    """The compiler is missing or failed; the message carries the reason."""


def compiler() -> str | None:
    """``$CXX``, else ``c++``, else ``g++`` on ``PATH``; ``None`` when none is found.

    >>> compiler() is None or os.path.isabs(compiler()) or compiler() == os.environ["CXX"]
    True
    """
    env = os.environ.get("CXX")
    if env:
        return env
    return shutil.which("c++") or shutil.which("g++")


def cache_root() -> Path:
    """``$QJAX_CACHE_DIR/native`` or ``~/.cache/qjax/native``.

    >>> cache_root().name
    'native'
    """
    base = os.environ.get("QJAX_CACHE_DIR")
    root = Path(base) if base else Path.home() / ".cache" / "qjax"
    return root / "native"


def _key(cxx: str) -> str:
    try:
        version = subprocess.run(
            [cxx, "--version"], capture_output=True, text=True, timeout=60
        ).stdout
    except (OSError, subprocess.SubprocessError) as e:
        raise BuildError(f"C++ compiler {cxx!r} does not run: {e}") from None
    h = hashlib.sha256()
    for part in (SOURCE.read_bytes(), cxx.encode(), version.encode(), " ".join(FLAGS).encode()):
        h.update(part)
        h.update(b"\0")
    h.update(jaxlib.__version__.encode())
    return h.hexdigest()[:32]


def build() -> Path:
    """Return the path of the compiled library, compiling it first if not cached.

    Raises :class:`BuildError` naming the missing compiler or with the tail of the
    compiler's error output.
    """
    cxx = compiler()
    if cxx is None:
        raise BuildError("no C++ compiler found ($CXX, c++ or g++ on PATH)")
    folder = cache_root() / _key(cxx)
    lib = folder / LIB_NAME
    if lib.is_file():
        return lib
    folder.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".build-", suffix=".so", dir=folder)
    os.close(fd)
    cmd = [cxx, *FLAGS, "-I", jax.ffi.include_dir(), str(SOURCE), "-o", tmp]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        if proc.returncode != 0:
            tail = (proc.stderr or proc.stdout).strip()[-2000:]
            raise BuildError(
                f"compiling {SOURCE.name} failed ({cxx}, exit {proc.returncode}): {tail}"
            )
        os.replace(tmp, lib)
    except (OSError, subprocess.SubprocessError) as e:
        raise BuildError(f"compiling {SOURCE.name} with {cxx!r} failed: {e}") from None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return lib
