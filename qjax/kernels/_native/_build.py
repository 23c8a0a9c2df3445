"""Build a native source into a shared library once, cached on disk, safe under xdist.

One implementation for every native library: a :class:`Library` names the source, the
compiler flags and the library's file name (:data:`AMX`: ``amx_gemm.cc``; :data:`SAT16`:
``sat16_gemm.cc``, AVX2 with AVX-512 functions dispatched at run time; the oneDNN
shim's, made at run time from where the optional library is installed, :mod:`._onednn`),
and :func:`build` compiles it. The cache key is the
SHA-256 of the source, the compiler (path and ``--version``), the
flags and the jaxlib version (the FFI headers come from jaxlib), so an edit to any of
them builds a new library. Location: ``$QJAX_CACHE_DIR/native/<key>/`` or
``~/.cache/qjax/native/<key>/``. Several processes may build at once: each compiles
into its own temporary file in that folder and ``os.replace``-s it into place, an atomic
rename, so a reader sees either no library or a whole one.
"""

from __future__ import annotations

import ctypes
import dataclasses
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import jax
import jaxlib

from .._levels import cpu_flags

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


# The saturating GEMM runs on every x86-64 class with AVX2: compiled for AVX2, its AVX-512
# functions carry target attributes and run only where the CPU has AVX-512BW.
SAT16_FLAGS = (
    "-O3",
    "-std=c++17",
    "-fPIC",
    "-shared",
    "-mavx2",
    "-mfma",
    "-w",
)


@dataclasses.dataclass(frozen=True)
class Library:
    """What to build: ``source`` (a ``.cc`` file), compiler ``flags``, the ``.so`` name and
    the ``link`` arguments that follow the source (libraries it links against)."""

    source: Path
    flags: tuple[str, ...]
    lib_name: str
    link: tuple[str, ...] = ()


AMX = Library(SOURCE, FLAGS, LIB_NAME)
# Float arithmetic that must round as written: the requantize epilogue (epilogue.h) of the
# saturating GEMM, the boundary quantize (quantize.cc, its one fma the explicit intrinsic).
_AS_WRITTEN = ("-ffp-contract=off", "-fno-fast-math")
SAT16 = Library(
    Path(__file__).with_name("sat16_gemm.cc"), SAT16_FLAGS + _AS_WRITTEN, "libqjax_sat16.so"
)
QUANTIZE = Library(
    Path(__file__).with_name("quantize.cc"), SAT16_FLAGS + _AS_WRITTEN, "libqjax_quantize.so"
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


def _key(cxx: str, lib: Library = AMX) -> str:
    try:
        version = subprocess.run(
            [cxx, "--version"], capture_output=True, text=True, timeout=60
        ).stdout
    except (OSError, subprocess.SubprocessError) as e:
        raise BuildError(f"C++ compiler {cxx!r} does not run: {e}") from None
    h = hashlib.sha256()
    flags = " ".join(lib.flags + lib.link).encode()
    headers = sorted(lib.source.parent.glob("*.h"))  # what the sources include (epilogue.h)
    parts = (lib.source.read_bytes(), *(p.read_bytes() for p in headers))
    parts += (cxx.encode(), version.encode(), flags)
    for part in parts:
        h.update(part)
        h.update(b"\0")
    h.update(jaxlib.__version__.encode())
    return h.hexdigest()[:32]


def build(lib: Library = AMX) -> Path:
    """Return the path of ``lib`` compiled (default :data:`AMX`), compiling it first if not
    cached.

    Raises :class:`BuildError` naming the missing compiler or with the tail of the
    compiler's error output.
    """
    cxx = compiler()
    if cxx is None:
        raise BuildError("no C++ compiler found ($CXX, c++ or g++ on PATH)")
    folder = cache_root() / _key(cxx, lib)
    out = folder / lib.lib_name
    if out.is_file():
        return out
    folder.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".build-", suffix=".so", dir=folder)
    os.close(fd)
    src = lib.source
    cmd = [cxx, *lib.flags, "-I", jax.ffi.include_dir(), str(src), *lib.link, "-o", tmp]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        if proc.returncode != 0:
            tail = (proc.stderr or proc.stdout).strip()[-2000:]
            raise BuildError(f"compiling {src.name} failed ({cxx}, exit {proc.returncode}): {tail}")
        os.replace(tmp, out)
    except (OSError, subprocess.SubprocessError) as e:
        raise BuildError(f"compiling {src.name} with {cxx!r} failed: {e}") from None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return out


def load(lib: Library, cpu_needs: tuple[str, ...]) -> tuple[ctypes.CDLL | None, str]:
    """``(library, "")`` when this is x86-64 Linux, the CPU has every flag in
    ``cpu_needs`` and ``lib`` builds and loads; else ``(None, reason)`` naming the first
    failed condition. The probes of every native kernel share this one sequence."""
    if platform.machine().lower() not in ("x86_64", "amd64") or platform.system() != "Linux":
        return None, f"not x86-64 Linux ({platform.system()} {platform.machine()})"
    missing = [f for f in cpu_needs if f not in cpu_flags()]
    if missing:
        return None, f"CPU lacks {' and '.join(missing)} (/proc/cpuinfo flags)"
    try:
        path = build(lib)
    except BuildError as e:
        return None, str(e)
    try:
        return ctypes.CDLL(os.fspath(path)), ""
    except OSError as e:
        return None, f"loading {path} failed: {e}"


def require(status: tuple[bool, str], layer: str, kernel: str, what: str) -> None:
    """Raise ``RuntimeError`` naming the layer, ``kernel='...'`` and the reason when
    ``status`` (a ``*_status()`` answer) says the native kernel cannot run."""
    ok, reason = status
    if not ok:
        raise RuntimeError(
            f"layer {layer!r}: kernel={kernel!r} was requested but the native {what} is "
            f"unavailable: {reason}; use kernel='xla'"
        )
