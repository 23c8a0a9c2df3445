"""Native kernels for XLA:CPU through ``jax.ffi``: Intel AMX int8 GEMM and conv (opt-in),
the AVX2 int16-saturating GEMM (:mod:`._sat16`, :func:`sat16_status`, its own
library ``sat16_gemm.cc`` built by the same :mod:`._build`), and oneDNN's int8 matmul
when the optional library is installed (:mod:`._onednn`, :func:`onednn_status`).

``prepare_linear(w, kernel="amx")`` packs the weight once (:func:`pack_weight`) and
``quantized_linear`` then computes its int32 dot with :func:`amx_dot` instead of XLA's
``dot_general``; everything around the dot (uint8 -> int8 shift, zero-point sums,
requantization) is the same XLA code, so the codes are identical whenever the int32 dot
is, and it is exact (no rounding anywhere; the overflow check bounds the sum). For the
``"fbgemm"``/``"qnnpack"`` schemes with weight zero points 0, :mod:`._fused` does all of
it in one call (``qjax_amx_q8_gemm`` / ``qjax_amx_q8_conv2d``), same codes.
``prepare_conv(w, kernel="amx")`` does the same for 2-D convolutions (groups 1,
dilation 1) with :func:`pack_conv_weight` and :func:`amx_conv2d`, an implicit GEMM that
reads the zero-point-padded NHWC input in place.

Availability (:func:`native_status`), checked once per process, in this order:

1. the machine is x86-64 running Linux;
2. ``/proc/cpuinfo`` lists ``amx_tile`` and ``amx_int8``;
3. a C++ compiler is found (``$CXX``, ``c++``, ``g++``) and builds ``amx_gemm.cc``
   (g++ >= 11 or clang >= 12 know ``-mamx-int8``); the library is cached
   (:mod:`._build`);
4. Linux grants the AMX tile state (``arch_prctl(ARCH_REQ_XCOMP_PERM,
   XFEATURE_XTILEDATA)``, kernel >= 5.16).

Then the FFI targets ``qjax_amx_s8_gemm``, ``qjax_amx_q8_gemm`` (the dot fused with
the requantize epilogue, :mod:`._fused`), ``qjax_amx_s8_conv2d`` and
``qjax_amx_q8_conv2d`` (the conv fused likewise) are registered for the ``"cpu"``
platform.
"""

from __future__ import annotations

import ctypes
import functools
import os

import jax
import jax.numpy as jnp
from jax import lax

from . import _build
from ._fused import (
    FUSED_SCHEMES,
    QCONV_TARGET,
    QTARGET,
    amx_conv2d_q8,
    amx_linear_q8,
    check_folded,
    epilogue_vectors,
    fold_key,
    fusable,
    fused_conv_codes,
    fused_linear_codes,
    fused_sat16_conv_codes,
    fused_sat16_patches_codes,
)
from ._onednn import (
    ONEDNN_TARGET,
    onednn_dot,
    onednn_exact,
    onednn_fused,
    onednn_impl,
    onednn_linear_q8,
    onednn_provider,
    onednn_status,
    pack_onednn_weight,
    require_onednn,
)
from ._onednn_conv import (
    onednn_conv2d,
    onednn_conv2d_q8,
    onednn_conv_feed,
    pack_onednn_conv_weight,
)
from ._sat16 import (
    SAT16_TARGET,
    pack_sat16_weight,
    require_sat16,
    sat16_dot,
    sat16_status,
)

__all__ = [
    "CONV_TARGET",
    "ONEDNN_TARGET",
    "FUSED_SCHEMES",
    "QCONV_TARGET",
    "QTARGET",
    "SAT16_TARGET",
    "TARGET",
    "amx_conv2d",
    "amx_conv2d_q8",
    "amx_dot",
    "amx_linear_q8",
    "check_folded",
    "epilogue_vectors",
    "fold_key",
    "fusable",
    "fused_conv_codes",
    "fused_linear_codes",
    "fused_sat16_conv_codes",
    "fused_sat16_patches_codes",
    "native_status",
    "onednn_conv2d",
    "onednn_conv2d_q8",
    "onednn_conv_feed",
    "onednn_dot",
    "onednn_exact",
    "onednn_fused",
    "onednn_impl",
    "onednn_linear_q8",
    "onednn_provider",
    "onednn_status",
    "pack_conv_weight",
    "pack_onednn_conv_weight",
    "pack_onednn_weight",
    "pack_weight",
    "conv_supported",
    "pack_sat16_weight",
    "require_amx",
    "require_onednn",
    "require_sat16",
    "sat16_dot",
    "sat16_status",
]

TARGET = "qjax_amx_s8_gemm"
CONV_TARGET = "qjax_amx_s8_conv2d"
TILE_K = 64  # int8 values of K per AMX tile row
TILE_N = 16  # int32 output columns per AMX tile


_LIB = None  # the loaded library once the probe succeeded


def parallel_calls() -> int:
    """How many native calls so far split their work over two threads (0 if not loaded).

    >>> parallel_calls() >= 0
    True
    """
    return int(_LIB.qjax_amx_parallel_calls()) if _LIB is not None else 0


@functools.cache
def _probe() -> tuple[bool, str]:
    lib, reason = _build.load(_build.AMX, ("amx_tile", "amx_int8"))
    if lib is None:
        return False, reason
    global _LIB
    err = lib.qjax_amx_init()
    if err != 0:
        return False, (
            f"arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) refused: "
            f"{os.strerror(err)} (errno {err}); Linux >= 5.16 grants AMX state"
        )
    jax.ffi.register_ffi_target(TARGET, jax.ffi.pycapsule(lib.QjaxAmxS8Gemm), platform="cpu")
    jax.ffi.register_ffi_target(QTARGET, jax.ffi.pycapsule(lib.QjaxAmxQ8Gemm), platform="cpu")
    jax.ffi.register_ffi_target(
        QCONV_TARGET, jax.ffi.pycapsule(lib.QjaxAmxQ8Conv2d), platform="cpu"
    )
    jax.ffi.register_ffi_target(CONV_TARGET, jax.ffi.pycapsule(lib.QjaxAmxS8Conv2d), platform="cpu")
    lib.qjax_amx_parallel_calls.restype = ctypes.c_int64
    _LIB = lib
    return True, f"AMX int8 GEMM ready ({lib._name})"


def native_status() -> tuple[bool, str]:
    """Whether the native AMX int8 GEMM can run here, and why (not).

    The first call probes the CPU, builds (or finds cached) the library and registers
    the FFI target; later calls return the cached answer. ``reason`` names the first
    failed condition (module docstring): not x86-64 Linux, the CPU lacks
    ``amx_int8``/``amx_tile``, no C++ compiler, the compile failed (with the tail of the
    compiler's output), loading failed, or ``arch_prctl`` refused the AMX state.

    Returns:
      ``(available, reason)``.

    >>> ok, reason = native_status()
    >>> isinstance(ok, bool) and isinstance(reason, str) and reason != ""
    True
    """
    return _probe()


def conv_supported(nsp: int, groups: int = 1, dilation=1) -> bool:
    """Whether the AMX conv kernel runs a convolution: 2-D (``nsp == 2``), ``groups=1``,
    dilation 1 (an int or one per spatial dim); the one statement of what it covers.

    >>> conv_supported(2), conv_supported(2, groups=8), conv_supported(1)
    (True, False, False)
    >>> conv_supported(2, dilation=(2, 2)), conv_supported(2, dilation=(1, 1))
    (False, True)
    """
    dil = (dilation,) * nsp if isinstance(dilation, int) else tuple(dilation)
    return nsp == 2 and groups == 1 and all(d == 1 for d in dil)


def require_amx(layer: str) -> None:
    """Raise ``RuntimeError`` naming the layer and the reason if AMX is unavailable.

    >>> ok, _ = native_status()
    >>> try:
    ...     require_amx("fc1")
    ...     raised = False
    ... except RuntimeError as e:
    ...     raised = "layer 'fc1'" in str(e)
    >>> raised != ok  # returns None with AMX, raises naming the layer without it
    True
    """
    _build.require(native_status(), layer, "amx", "AMX kernel")


def pack_weight(w: jax.Array) -> jax.Array:
    """Pack an int8 ``(K, N)`` weight into AMX tiles: int8 ``(Nt, Kt, 16, 64)``.

    ``packed[nt, kt, r, 4c + q] = w[64kt + 4r + q, 16nt + c]`` with ``Kt = ceil(K/64)``,
    ``Nt = ceil(N/16)`` and zeros where the index runs past ``K`` or ``N``: each
    ``(nt, kt)`` block is one 16x64 B tile of ``tdpbssd`` (four consecutive K values of
    one column side by side, VNNI order). Pure ``jnp``; works on traced weights.

    >>> w = jnp.arange(8, dtype=jnp.int8).reshape(4, 2)  # K=4, N=2
    >>> p = pack_weight(w)
    >>> p.shape, p.dtype
    ((1, 1, 16, 64), dtype('int8'))
    >>> p[0, 0, 0, :8]  # row 0: w[0:4, 0] then w[0:4, 1]
    Array([0, 2, 4, 6, 1, 3, 5, 7], dtype=int8)
    """
    if w.ndim != 2 or w.dtype != jnp.int8:
        raise TypeError(f"pack_weight needs an int8 (K, N) array, got {w.dtype} {w.shape}")
    k, n = w.shape
    kt, nt = -(-k // TILE_K), -(-n // TILE_N)
    wp = jnp.pad(w, ((0, kt * TILE_K - k), (0, nt * TILE_N - n)))
    wp = wp.reshape(kt, 16, 4, nt, TILE_N).transpose(3, 0, 1, 4, 2)
    return wp.reshape(nt, kt, 16, TILE_K)


def amx_dot(x: jax.Array, packed: jax.Array, w: jax.Array) -> jax.Array:
    """``acc[..., n] = Σ_k x[..., k]·w[k, n]``: int8 x int8 -> int32, exact, on AMX.

    ``x`` int8 ``(..., K)``; ``packed = pack_weight(w)``; ``w`` the int8 ``(K, N)``
    weight itself, used only where the program runs off CPU (there the custom call is
    not emitted and ``lax.dot_general`` computes the same integers). On CPU one FFI call
    ``qjax_amx_s8_gemm`` does the whole dot; under ``vmap`` extra leading dims of ``x``
    fold into its rows. Call :func:`require_amx` first (prepare time).

    >>> if native_status()[0]:
    ...     x = jnp.array([[1, -2, 3]], jnp.int8)
    ...     w = jnp.array([[1, 0], [2, 1], [-1, 5]], jnp.int8)
    ...     print(amx_dot(x, pack_weight(w), w))
    ... else:
    ...     print("[[-6 13]]")
    [[-6 13]]
    """
    n = w.shape[1]
    out = jax.ShapeDtypeStruct(x.shape[:-1] + (n,), jnp.int32)

    def native(x, packed, w):
        del w
        return jax.ffi.ffi_call(TARGET, out, vmap_method="expand_dims")(x, packed)

    def portable(x, packed, w):
        del packed
        dims = (((x.ndim - 1,), (0,)), ((), ()))
        return lax.dot_general(x, w, dims, preferred_element_type=jnp.int32)

    return lax.platform_dependent(x, packed, w, cpu=native, default=portable)


def pack_conv_weight(w: jax.Array) -> jax.Array:
    """Pack an int8 ``HWIO`` conv weight for :func:`amx_conv2d`.

    The reduction index runs over ``(kh, kw, c)``; each kernel row's ``kw·C`` values are
    padded with zeros to a multiple of 64 (so an A tile reading past them multiplies by
    0), then the ``(KH·Kseg, O)`` matrix is packed by :func:`pack_weight`.

    >>> p = pack_conv_weight(jnp.ones((3, 3, 32, 64), jnp.int8))  # Kseg = 128
    >>> p.shape  # (64/16, 3·128/64, 16, 64)
    (4, 6, 16, 64)
    """
    if w.ndim != 4 or w.dtype != jnp.int8:
        raise TypeError(f"pack_conv_weight needs an int8 HWIO array, got {w.dtype} {w.shape}")
    kh, kw, c, o = w.shape
    seg = -(-kw * c // TILE_K) * TILE_K
    wr = jnp.pad(w.reshape(kh, kw * c, o), ((0, 0), (0, seg - kw * c), (0, 0)))
    return pack_weight(wr.reshape(kh * seg, o))


def amx_conv2d(x: jax.Array, packed: jax.Array, w: jax.Array, stride: tuple[int, int]):
    """``acc[n, i, j, o] = Σ x[n, i·sh + a, j·sw + b, c]·w[a, b, c, o]``, int32, on AMX.

    ``x`` int8 NHWC, already padded (``VALID`` conv); ``w`` int8 HWIO; ``packed =
    pack_conv_weight(w)``; groups 1, dilation 1. On CPU one FFI call
    ``qjax_amx_s8_conv2d`` reads ``x`` in place (the last output rows from a zero-padded
    copy of its end, so no tile reads out of bounds); elsewhere
    ``lax.conv_general_dilated`` computes the same integers. Exact for any int8 codes as
    long as the true sums fit in int32.

    >>> if native_status()[0]:
    ...     x = jnp.arange(16, dtype=jnp.int8).reshape(1, 4, 4, 1)
    ...     w = jnp.ones((2, 2, 1, 1), jnp.int8)
    ...     print(amx_conv2d(x, pack_conv_weight(w), w, (2, 2))[..., 0].tolist())
    ... else:
    ...     print([[[10, 18], [42, 50]]])
    [[[10, 18], [42, 50]]]
    """
    n, hp, wpad, c = x.shape
    kh, kw, _, o = w.shape
    sh, sw = stride
    oh, ow = (hp - kh) // sh + 1, (wpad - kw) // sw + 1
    out = jax.ShapeDtypeStruct((n, oh, ow, o), jnp.int32)
    dims = ("NHWC", "HWIO", "NHWC")

    def native(x, packed, w):
        del w
        call = jax.ffi.ffi_call(CONV_TARGET, out, vmap_method="sequential")
        return call(x, packed, kh=kh, kw=kw, sh=sh, sw=sw)

    def portable(x, packed, w):
        del packed
        return lax.conv_general_dilated(
            x, w, stride, "VALID", dimension_numbers=dims, preferred_element_type=jnp.int32
        )

    return lax.platform_dependent(x, packed, w, cpu=native, default=portable)
