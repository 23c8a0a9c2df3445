"""oneDNN's int8 matmul as a qjax kernel (``kernel="onednn"``), an optional library.

Two builds of oneDNN can provide it; the first that loads and is exact here is used
(one per process, :func:`onednn_provider`):

* ``"ukernel"``: oneDNN's brgemm ukernel (``dnnl::ukernel::brgemm``) as built into
  PyTorch's CPU wheel, called through ``at::native::cpublas::brgemm`` (the entry point
  torch's generated C++ kernels use) from qjax's shim ``onednn_ukernel.cc``: the JIT
  brgemm kernel runs on the calling thread with raw pointers, no engine, stream or
  queue. The weight is packed once into 64-column VNNI blocks (:func:`pack_onednn_weight`)
  and, for the ``"fbgemm"``/``"qnnpack"`` schemes with zero weight zero points, the
  requantization runs in the same call on each block while it is in cache
  (:func:`onednn_linear_q8`, the AMX kernel's epilogue, same codes). torch runs the u8·s8
  kernel only at ``avx512_core_vnni`` or above (it refuses lower ISAs, which the probe
  turns into a reason), so it is exact wherever it runs. The PyPI ``onednn`` wheel below
  cannot provide this: it is built without ``DNNL_EXPERIMENTAL_UKERNEL`` (its headers
  declare the API, its library exports no ``dnnl_brgemm_*`` symbol).
* ``"matmul"``: the matmul primitive of the PyPI ``onednn`` wheel, described below;
  ~40 µs of SYCL queue per call, so it is the fallback (e.g. AVX-VNNI CPUs without
  AVX-512, where torch refuses the ukernel).

``QJAX_ONEDNN_PROVIDER=ukernel|matmul`` (read once) forces one of them.

Threads: a large ``"ukernel"`` call shares its items with qjax's helper threads, which
spin ``QJAX_SPIN_US`` after a call (:mod:`._threads`).

The ``"matmul"`` provider.

``prepare_linear(w, kernel="onednn")`` reorders the int8 ``(K, N)`` weight once into the
layout oneDNN's matmul prefers on this CPU (:func:`pack_onednn_weight`, oneDNN's
``format_tag::any``), and the linear layer's int32 accumulator then comes from one FFI
call ``qjax_onednn_u8s8_matmul`` (:func:`onednn_dot`): ``Σ_k x[..., k]·w[k, n]`` with
``x`` uint8 codes as they are. The zero points, the requantization and the activation
clamps stay qjax's own XLA epilogue (:mod:`qjax.kernels._linear`), so every scheme keeps
its integers. The primitive is created per ``(M, K, N)`` and cached in the library.

The library. PyPI's ``onednn`` + ``onednn-devel`` wheels (``pip install
'qjax[onednn]'``) hold ``libdnnl.so.3`` and its headers; qjax finds them through the
wheels' file lists (:func:`onednn_install`) and compiles its shim ``onednn_matmul.cc``
against them with the C++ compiler, cached like the other native kernels
(:mod:`._build`). The shim carries the library folder as ``DT_RPATH``, which the dynamic
loader also uses for ``libdnnl``'s own dependencies (TBB, Intel's math and SYCL runtimes
from the same wheels); the Intel compiler runtimes that the OpenCL loader needs (it is
opened later, by libsycl, and has no search path of its own) are loaded by path first.
Nothing has to be in ``LD_LIBRARY_PATH`` before the process starts. The wheel is a SYCL
build: its CPU engine is a SYCL device on Intel's OpenCL CPU runtime
(``libintelocl.so``, also a dependency of the wheel), whose ICD file points at a build
machine's path. So while the engine is created (once per process) ``OCL_ICD_FILENAMES``
names the wheel's ``libintelocl.so`` and ``ONEAPI_DEVICE_SELECTOR`` is ``opencl:cpu``;
both are restored afterwards (the runtime reads them once, at device discovery).

Exactness. On CPUs with VNNI (AVX-512-VNNI, AVX-VNNI) or AMX oneDNN multiplies with
``vpdpbusd`` / ``tdpbusd``: every u8·s8 product added into int32 exactly. Below VNNI it
uses ``vpmaddubsw``, whose pair sums saturate int16 (NUMERICS.md rule 14). qjax asks
oneDNN which ISA it dispatches to (``dnnl_get_effective_cpu_isa``, lowered by
``ONEDNN_MAX_CPU_ISA``): :func:`onednn_exact` is true only with VNNI or AMX, and only
then does :mod:`qjax.kernels._choice` give a layer ``"onednn"``; elsewhere it stays on
XLA and the layer's record says ``"xla"``. The shim refuses, with an error, any
primitive whose implementation is not oneDNN's brgemm matmul at a VNNI/AMX ISA.

``jax.export`` refuses the custom call; it sits in a named scope that says to build the
model with ``kernel='xla'``. Off CPU the program runs ``lax.dot_general`` (the same
integers).
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import importlib.metadata
import os
import re
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from . import _build, _threads

__all__ = [
    "ONEDNN_TARGET",
    "UKERNEL_CONV_TARGET",
    "UKERNEL_Q8_CONV_TARGET",
    "UKERNEL_Q8_TARGET",
    "UKERNEL_TARGET",
    "onednn_dot",
    "onednn_exact",
    "onednn_fused",
    "onednn_impl",
    "onednn_install",
    "onednn_linear_q8",
    "onednn_provider",
    "onednn_status",
    "pack_onednn_weight",
    "require_onednn",
    "ukernel_install",
]

ONEDNN_TARGET = "qjax_onednn_u8s8_matmul"
UKERNEL_TARGET = "qjax_onednn_uk_matmul"
UKERNEL_Q8_TARGET = "qjax_onednn_uk_q8_linear"
UKERNEL_CONV_TARGET = "qjax_onednn_uk_conv2d"  # the conv of :mod:`._onednn_conv`
UKERNEL_Q8_CONV_TARGET = "qjax_onednn_uk_q8_conv2d"
EXPORT_HINT = "qjax_native_onednn_kernel: for jax.export build the model with kernel='xla'"
INSTALL_HINT = "pip install 'qjax[onednn]' (PyPI onednn + onednn-devel)"

# dnnl_cpu_isa_t bits: 0x8 is avx2_vnni's, 0x40 avx512_core_vnni's; every ISA above
# them (bf16, avx10, amx) keeps the bit.
_VNNI_BITS = 0x8 | 0x40
_ISA_NAMES = {
    0x7: "avx2",
    0xF: "avx2_vnni",
    0x1F: "avx2_vnni_2",
    0x27: "avx512_core",
    0x67: "avx512_core_vnni",
    0xE7: "avx512_core_bf16",
    0x1EF: "avx10_1_512",
    0xFEF: "avx10_1_512_amx",
    0x1FEF: "avx10_1_512_amx_fp16",
    0x201FF: "avx10_2",
    0x22FFF: "avx10_2_amx_2",
}
# Intel's compiler runtimes that the wheel's OpenCL loader (libOpenCL.so.1, which libsycl
# dlopens) needs but has no RUNPATH for: loaded first, so the loader finds them loaded.
_PRELOAD = ("libintlc.so.5", "libimf.so", "libsvml.so", "libirng.so")
# Shim flags: the epilogue is not here (integers only), so plain -O2.
_FLAGS = ("-O2", "-std=c++17", "-fPIC", "-shared", "-w")
# The ukernel shim holds the fused epilogue's float32 steps, which must round as XLA's:
# no fast math, no multiply contracted into an add.
_UK_FLAGS = ("-O2", "-std=c++17", "-fPIC", "-shared", "-ffp-contract=off", "-fno-fast-math")
_UK_FLAGS += ("-w",)  # the FFI headers warn (unreachable returns); not ours to fix
_ERR = 1024

_LIB = None  # the loaded shim of the provider in use
_PROVIDER = None  # "ukernel" or "matmul" once _probe succeeded


def onednn_install() -> tuple[Path, Path, str] | str:
    """``(library folder, include folder, version)`` of the installed oneDNN wheels, or a
    sentence saying what is missing.

    >>> found = onednn_install()
    >>> isinstance(found, str) or (found[0] / "libdnnl.so.3").is_file()
    True
    """
    try:
        lib_dist = importlib.metadata.distribution("onednn")
        dev_dist = importlib.metadata.distribution("onednn-devel")
    except importlib.metadata.PackageNotFoundError as e:
        return f"{e.name} is not installed: {INSTALL_HINT}"
    lib = _locate(lib_dist, "libdnnl.so.3")
    hpp = _locate(dev_dist, "oneapi/dnnl/dnnl.hpp")
    if lib is None or hpp is None:
        missing = "libdnnl.so.3" if lib is None else "oneapi/dnnl/dnnl.hpp"
        return f"the oneDNN wheels lack {missing} ({INSTALL_HINT})"
    return lib.parent, hpp.parents[2], lib_dist.version


def ukernel_install() -> tuple[Path, str, str] | str:
    """``(torch's library folder, torch version, oneDNN version)`` where PyTorch's CPU
    wheel (whose bundled oneDNN has the brgemm ukernel) is installed, else a sentence
    saying what is missing. Found through the wheel's file list; torch is not imported.

    >>> found = ukernel_install()
    >>> isinstance(found, str) or (found[0] / "libtorch_cpu.so").is_file()
    True
    """
    try:
        dist = importlib.metadata.distribution("torch")
    except importlib.metadata.PackageNotFoundError:
        return "torch is not installed (its CPU wheel carries oneDNN's brgemm ukernel)"
    lib = hdr = None
    for f in dist.files or ():
        name = str(f)
        if name.endswith("torch/lib/libtorch_cpu.so"):
            lib = Path(dist.locate_file(f)).resolve()
        elif name.endswith("oneapi/dnnl/dnnl_version.h"):
            hdr = Path(dist.locate_file(f))
    if lib is None or not lib.is_file():
        return f"torch {dist.version} has no lib/libtorch_cpu.so"
    version = "3.x"
    if hdr is not None and hdr.is_file():
        text = hdr.read_text()
        parts = [
            re.search(rf"#define DNNL_VERSION_{p} (\d+)", text) for p in ("MAJOR", "MINOR", "PATCH")
        ]
        if all(parts):
            version = ".".join(m.group(1) for m in parts)
    return lib.parent, dist.version, version


def _locate(dist, suffix: str) -> Path | None:
    for f in dist.files or ():
        if str(f).endswith(suffix):
            path = Path(dist.locate_file(f)).resolve()
            if path.is_file():
                return path
    return None


@contextlib.contextmanager
def _sycl_cpu_env(lib_dir: Path):
    """The SYCL CPU device of the wheel's runtime, for the duration of engine creation."""
    ocl = lib_dir / "libintelocl.so"
    want = {"OCL_ICD_FILENAMES": str(ocl), "ONEAPI_DEVICE_SELECTOR": "opencl:cpu"}
    if not ocl.is_file():  # a build without SYCL needs neither
        want = {}
    old = {k: os.environ.get(k) for k in want}
    os.environ.update(want)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _err() -> ctypes.Array:
    return ctypes.create_string_buffer(_ERR)


def _probe_ukernel() -> tuple[bool, str]:
    found = ukernel_install()
    if isinstance(found, str):
        return False, found
    lib_dir, torch_version, version = found
    library = _build.Library(
        Path(__file__).with_name("onednn_ukernel.cc"),
        _UK_FLAGS + (f'-DQJAX_TORCH="{torch_version}"',),
        "libqjax_onednn_uk.so",
        # DT_RPATH: the loader searches it for libtorch_cpu's own dependencies too; -z now:
        # a torch without the brgemm symbol fails at load (a reason), not at first call
        ("-L", str(lib_dir), "-ltorch_cpu", "-lc10", f"-Wl,-rpath,{lib_dir}")
        + ("-Wl,--disable-new-dtags", "-Wl,-z,now"),
    )
    lib, reason = _build.load(library, ())
    if lib is None:
        return False, reason
    lib.qjax_onednn_uk_packed_size.restype = ctypes.c_int64
    lib.qjax_onednn_uk_packed_size.argtypes = [ctypes.c_int64] * 2
    lib.qjax_onednn_uk_pack.argtypes = [ctypes.c_int64] * 2 + [ctypes.c_void_p] * 2
    lib.qjax_onednn_uk_pack.restype = None
    lib.qjax_onednn_uk_parallel_macs.restype = ctypes.c_int64
    lib.qjax_onednn_uk_parallel_macs.argtypes = [ctypes.c_int64]
    lib.qjax_onednn_uk_parallel_calls.restype = ctypes.c_int64
    lib.qjax_onednn_uk_use_helpers.argtypes = [ctypes.c_int]
    lib.qjax_onednn_uk_spin_us.restype = ctypes.c_int64
    lib.qjax_onednn_uk_spin_us.argtypes = [ctypes.c_int64]
    lib.qjax_onednn_uk_spin_us(_threads.spin_us())
    err = _err()
    if lib.qjax_onednn_uk_init(err, _ERR):
        return False, err.value.decode()
    for target, handler in (
        (UKERNEL_TARGET, lib.QjaxOnednnUkMatmul),
        (UKERNEL_Q8_TARGET, lib.QjaxOnednnUkQ8Linear),
        (UKERNEL_CONV_TARGET, lib.QjaxOnednnUkConv2d),
        (UKERNEL_Q8_CONV_TARGET, lib.QjaxOnednnUkQ8Conv2d),
    ):
        jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(handler), platform="cpu")
    global _LIB, _PROVIDER
    _LIB, _PROVIDER = lib, "ukernel"
    return True, f"oneDNN {version} brgemm ukernel (torch {torch_version}, {lib._name})"


def _probe_matmul() -> tuple[bool, str]:
    found = onednn_install()
    if isinstance(found, str):
        return False, found
    lib_dir, inc_dir, version = found
    library = _build.Library(
        Path(__file__).with_name("onednn_matmul.cc"),
        _FLAGS + ("-I", str(inc_dir), f'-DQJAX_ONEDNN_WHEEL="{version}"'),
        "libqjax_onednn.so",
        # DT_RPATH (not RUNPATH): the loader searches it for libdnnl's dependencies too
        ("-L", str(lib_dir), "-ldnnl", f"-Wl,-rpath,{lib_dir}", "-Wl,--disable-new-dtags"),
    )
    lib, reason = _build.load(library, ())
    if lib is None:
        return False, reason
    lib.qjax_onednn_isa.restype = ctypes.c_int64
    lib.qjax_onednn_version.restype = ctypes.c_int64
    lib.qjax_onednn_packed_size.restype = ctypes.c_int64
    lib.qjax_onednn_packed_size.argtypes = [ctypes.c_int64] * 2 + [ctypes.c_char_p, ctypes.c_int64]
    lib.qjax_onednn_pack.argtypes = [ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p]
    lib.qjax_onednn_pack.argtypes += [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_int64]
    lib.qjax_onednn_impl.argtypes = [ctypes.c_int64] * 3 + [ctypes.c_char_p, ctypes.c_int64]
    for name in _PRELOAD:
        if (lib_dir / name).is_file():
            ctypes.CDLL(os.fspath(lib_dir / name))
    err = _err()
    with _sycl_cpu_env(lib_dir):
        failed = lib.qjax_onednn_init(err, _ERR)
    if failed:
        return False, err.value.decode()
    jax.ffi.register_ffi_target(
        ONEDNN_TARGET, jax.ffi.pycapsule(lib.QjaxOnednnMatmul), platform="cpu"
    )
    global _LIB, _PROVIDER
    _LIB, _PROVIDER = lib, "matmul"
    v = lib.qjax_onednn_version()
    return True, f"oneDNN {v // 10000}.{v // 100 % 100}.{v % 100} (wheel {version}, {lib._name})"


@functools.cache
def _probe() -> tuple[bool, str]:
    want = os.environ.get("QJAX_ONEDNN_PROVIDER", "")
    if want not in ("", "ukernel", "matmul"):
        return False, f"QJAX_ONEDNN_PROVIDER={want!r}: use 'ukernel' or 'matmul'"
    if want == "matmul":
        return _probe_matmul()
    ok, reason = _probe_ukernel()
    if ok or want == "ukernel":
        return ok, reason
    ok, fallback = _probe_matmul()
    if ok:
        return ok, f"{fallback} (brgemm ukernel unavailable: {reason})"
    return ok, f"{fallback}; brgemm ukernel: {reason}"


def onednn_provider() -> str | None:
    """Which oneDNN build runs ``kernel="onednn"`` here: ``"ukernel"`` (the brgemm ukernel
    in PyTorch's wheel, preferred: no per-call queue), ``"matmul"`` (the PyPI ``onednn``
    wheel's matmul primitive) or ``None`` when neither loads (:func:`onednn_status`).

    >>> onednn_provider() in ("ukernel", "matmul", None)
    True
    """
    return _PROVIDER if onednn_status()[0] else None


def onednn_status() -> tuple[bool, str]:
    """Whether the optional oneDNN library is installed and its kernel loads, and why (not).

    The first call finds the wheels (:func:`onednn_install`), builds (or finds cached)
    the shim, creates oneDNN's CPU engine and registers the FFI target; later calls return
    the cached answer. Whether its integers are exact on this CPU is
    :func:`onednn_exact`.

    Returns:
      ``(available, reason)``.

    >>> ok, reason = onednn_status()
    >>> isinstance(ok, bool) and reason != ""
    True
    """
    return _probe()


def _isa() -> int:
    return int(_LIB.qjax_onednn_isa())


def onednn_exact() -> tuple[bool, str]:
    """Whether oneDNN's int8 matmul adds every u8·s8 product into int32 exactly here.

    True when the library is available (:func:`onednn_status`) and the ISA oneDNN
    dispatches to has VNNI or AMX (``dnnl_get_effective_cpu_isa``, which
    ``ONEDNN_MAX_CPU_ISA`` lowers); ``reason`` names the ISA, or why not.

    >>> ok, reason = onednn_exact()
    >>> ok <= onednn_status()[0] and reason != ""
    True
    """
    ok, reason = onednn_status()
    if not ok:
        return False, reason
    if _PROVIDER == "ukernel":  # the probe ran it: torch refuses it below VNNI
        return True, (
            f"{reason}: u8·s8 brgemm at avx512_core_vnni or above (torch runs it only "
            "there), VNNI int32 accumulation (exact)"
        )
    isa = _isa()
    name = _ISA_NAMES.get(isa, hex(isa))
    if isa & _VNNI_BITS:
        return True, f"{reason}: ISA {name}, VNNI int32 accumulation (exact)"
    return False, (
        f"{reason}: ISA {name} has no VNNI, its u8·s8 pair sums saturate int16 (vpmaddubsw); "
        "layers stay on XLA"
    )


def require_onednn(layer: str) -> None:
    """Raise ``RuntimeError`` naming the layer and the reason unless oneDNN's kernel is
    available and exact here (:func:`onednn_exact`)."""
    _build.require(onednn_exact(), layer, "onednn", "oneDNN int8 matmul")


def onednn_impl(m: int, k: int, n: int) -> str:
    """The implementation oneDNN runs an ``(M, K) x (K, N)`` u8·s8 matmul with: with the
    ``"matmul"`` provider the primitive's name, e.g. ``"brg_matmul:avx512_core_vnni"``
    (``RuntimeError`` when it is not an exact one, its name in the message: the shim
    refuses to run it); with ``"ukernel"`` qjax's fixed blocking of the brgemm ukernel
    (exact wherever the probe ran it, :func:`onednn_exact`). ``RuntimeError`` too where
    the library is unavailable.

    >>> if onednn_exact()[0]:
    ...     print(onednn_impl(4, 64, 16).startswith(("brg_matmul:", "brgemm_ukernel:")))
    ... else:
    ...     print(True)
    True
    """
    _build.require(onednn_status(), "onednn_impl", "onednn", "oneDNN int8 matmul")
    if _PROVIDER == "ukernel":
        return "brgemm_ukernel:u8s8s32 (64-column VNNI blocks, 64-row calls)"
    buf = _err()
    rc = _LIB.qjax_onednn_impl(int(m), int(k), int(n), buf, _ERR)
    if rc != 0:
        raise RuntimeError(buf.value.decode())
    return buf.value.decode()


def _packed_size(k: int, n: int) -> int:
    _build.require(onednn_status(), "pack_onednn_weight", "onednn", "oneDNN int8 matmul")
    if _PROVIDER == "ukernel":
        return int(_LIB.qjax_onednn_uk_packed_size(k, n))
    err = _err()
    size = _LIB.qjax_onednn_packed_size(k, n, err, _ERR)
    if size < 0:
        raise RuntimeError(err.value.decode())
    return int(size)


def _pack_host(w: np.ndarray) -> np.ndarray:
    k, n = w.shape
    w = np.ascontiguousarray(w, np.int8)
    size = _packed_size(k, n)
    if _PROVIDER == "ukernel":
        out = np.empty(size, np.uint8)
        _LIB.qjax_onednn_uk_pack(k, n, w.ctypes.data, out.ctypes.data)
        return out
    err = _err()
    out = np.zeros(size, np.uint8)
    if _LIB.qjax_onednn_pack(k, n, w.ctypes.data, out.ctypes.data, err, _ERR):
        raise RuntimeError(err.value.decode())
    return out


def pack_onednn_weight(w: jax.Array) -> jax.Array:
    """Reorder an int8 ``(K, N)`` weight into the layout of the oneDNN provider in use
    (:func:`onednn_provider`): uint8 bytes ``(S,)``. ``"ukernel"``: 64-column VNNI
    blocks, ``packed[((b·Kp/4 + k//4)·64 + j)·4 + k%4] = w[k, 64·b + j]`` with ``K``
    rounded up to ``Kp`` (a multiple of 4) and ``N`` to 64 by zeros, ``S = ⌈N/64⌉·64·Kp``;
    ``"matmul"``: the layout oneDNN's matmul prefers on this CPU (``format_tag::any``,
    e.g. ``BA16a64b4a``), ``S`` as oneDNN sizes it. Concrete weights are reordered
    here; traced ones (inside ``jit``) through a host callback. Call
    :func:`require_onednn` first.

    >>> if onednn_exact()[0]:
    ...     p = pack_onednn_weight(jnp.ones((3, 5), jnp.int8))
    ...     print(p.dtype, p.size >= 15)
    ... else:
    ...     print("uint8 True")
    uint8 True
    """
    if w.ndim != 2 or w.dtype != jnp.int8:
        raise TypeError(f"pack_onednn_weight needs an int8 (K, N) array, got {w.dtype} {w.shape}")
    if not isinstance(w, jax.core.Tracer):
        return jnp.asarray(_pack_host(np.asarray(w)))
    k, n = w.shape
    out = jax.ShapeDtypeStruct((_packed_size(k, n),), jnp.uint8)
    return jax.pure_callback(lambda v: _pack_host(np.asarray(v)), out, w)


def onednn_dot(x: jax.Array, packed: jax.Array, w: jax.Array) -> jax.Array:
    """``acc[..., n] = Σ_k x[..., k]·w[k, n]``: uint8 x int8 -> int32, on oneDNN.

    ``x`` uint8 ``(..., K)`` codes as they are (signed activations are shifted by the
    caller, ``x + 128``); ``packed = pack_onednn_weight(w)``; ``w`` the int8 ``(K, N)``
    weight itself, used only where the program runs off CPU (``lax.dot_general`` in
    int32 computes the same integers). Exact where :func:`onednn_exact` is true, as long
    as the true sums fit int32. One FFI call; under ``vmap`` extra leading dims fold into
    the rows.

    >>> if onednn_exact()[0]:
    ...     x = jnp.array([[255, 0, 3]], jnp.uint8)
    ...     w = jnp.array([[127, 0], [2, 1], [-1, -128]], jnp.int8)
    ...     print(onednn_dot(x, pack_onednn_weight(w), w))
    ... else:
    ...     print("[[32382  -384]]")
    [[32382  -384]]
    """
    n = w.shape[1]
    out = jax.ShapeDtypeStruct(x.shape[:-1] + (n,), jnp.int32)

    onednn_status()  # which provider's target: the probe picks it once

    def native(x, packed, w):
        del w
        target = UKERNEL_TARGET if _PROVIDER == "ukernel" else ONEDNN_TARGET
        call = jax.ffi.ffi_call(target, out, vmap_method="expand_dims")
        with jax.named_scope(EXPORT_HINT):
            return call(x, packed)

    def portable(x, packed, w):
        del packed
        dims = (((x.ndim - 1,), (0,)), ((), ()))
        xi, wi = x.astype(jnp.int32), w.astype(jnp.int32)
        return lax.dot_general(xi, wi, dims, preferred_element_type=jnp.int32)

    return lax.platform_dependent(x, packed, w, cpu=native, default=portable)


def onednn_fused() -> bool:
    """Whether ``kernel="onednn"`` layers can requantize inside the oneDNN call
    (:func:`onednn_linear_q8`): only the ``"ukernel"`` provider has that epilogue.

    >>> onednn_fused() == (onednn_provider() == "ukernel")
    True
    """
    return onednn_provider() == "ukernel"


def portable_codes(acc, ivec, fvec, mult, clamp, zp) -> jax.Array:
    """The fused epilogue in XLA (the ukernel calls' off-CPU path): ``clamp`` ``(2,)``:
    the ``"fbgemm"``/``"qnnpack"`` steps (``_apply_fbgemm``); ``(5,)`` = ``(lo, hi, s_x',
    f32(1/s_out), zp)``: the ``"onednn"`` steps (``_apply_onednn``, ``mult = s_w'``,
    ``fvec`` the bias or 0). int32 codes.

    >>> z, one = jnp.zeros(1, jnp.int32), jnp.ones(1)
    >>> portable_codes(jnp.array([[7]]), z, one * 0, one / 2, jnp.array([0.0, 255.0]), z)
    Array([[4]], dtype=int32)
    """
    from .._schemes import _apply_fbgemm, _apply_onednn, _m, _pow2

    a = acc + ivec
    if clamp.shape[0] == 2:
        return _apply_fbgemm(a, fvec, mult, zp[0], clamp[0], clamp[1])
    sx, inv_so, zpf = clamp[2], clamp[3], clamp[4]
    _, e = jnp.frexp(_m(sx * mult))
    k = jnp.clip(24 - e.astype(jnp.int32), -126, 126)
    return _apply_onednn(a, sx, mult, (_pow2(k), _pow2(-k)), fvec, inv_so, zpf, *clamp[:2])


def onednn_linear_q8(x, packed, w, ivec, fvec, mult, clamp, zp, out_dtype) -> jax.Array:
    """8-bit codes ``(..., N)`` of a linear layer in one oneDNN ukernel call:

    ``acc = Σ_k x[..., k]·w[k, n]`` (uint8 x int8 -> int32, exact), then per column
    ``a = acc + ivec[n]`` (int32, wrapping), ``y = f32(a) + fvec[n]``,
    ``code = clamp(rint(f32(y·mult[n])), clamp[0], clamp[1]) + zp`` (NaN -> ``zp``), the
    AMX kernel's epilogue (:mod:`._fused`, the vectors from its ``epilogue_vectors``;
    ``clamp`` ``(5,)``: the ``"onednn"`` scheme's steps instead,
    :func:`portable_codes`).

    ``x`` uint8 ``(..., K)``; ``packed = pack_onednn_weight(w)`` with the ``"ukernel"``
    provider (:func:`onednn_fused`); ``w`` int8 ``(K, N)``, used only off CPU, where
    ``lax.dot_general`` and the scheme's own ``_apply_fbgemm`` compute the same codes;
    ``ivec`` int32 ``(N,)``, ``fvec``/``mult`` float32 ``(N,)``, ``clamp`` float32 ``(2,)``,
    ``zp`` int32 ``(1,)``; ``out_dtype`` int8 or uint8.

    >>> x = jnp.array([[200, 3]], jnp.uint8)
    >>> w = jnp.array([[1, -1], [2, 1]], jnp.int8)
    >>> one, z = jnp.ones(2, jnp.float32), jnp.zeros(2, jnp.float32)
    >>> if onednn_fused():  # rint(206 / 2) = 103, rint(-197 / 2) = -98 (ties to even)
    ...     print(onednn_linear_q8(x, pack_onednn_weight(w), w, jnp.zeros(2, jnp.int32), z,
    ...           one / 2, jnp.array([-128.0, 127.0]), jnp.array([0], jnp.int32), jnp.int8))
    ... else:
    ...     print("[[103 -98]]")
    [[103 -98]]
    """
    n = w.shape[1]
    shape = jax.ShapeDtypeStruct(x.shape[:-1] + (n,), out_dtype)

    def native(x, packed, w, *vecs):
        del w
        call = jax.ffi.ffi_call(UKERNEL_Q8_TARGET, shape, vmap_method="expand_dims")
        with jax.named_scope(EXPORT_HINT):
            return call(x, packed, *vecs)

    def portable(x, packed, w, ivec, fvec, mult, clamp, zp):
        del packed
        dims = (((x.ndim - 1,), (0,)), ((), ()))
        acc = lax.dot_general(x.astype(jnp.int32), w.astype(jnp.int32), dims)
        return portable_codes(acc, ivec, fvec, mult, clamp, zp).astype(out_dtype)

    vecs = (ivec, fvec, mult, clamp, zp)
    return lax.platform_dependent(x, packed, w, *vecs, cpu=native, default=portable)
