"""Native kernel for the int16 pair-saturating accumulation (``*_sat16``): AVX2 and AVX-512.

FBGEMM and oneDNN on CPUs without VNNI multiply uint8 activations by int8 weights with
``vpmaddubsw``: adjacent products summed in pairs, each pair sum saturated to int16, the
pairs then added exactly in int32. qjax's XLA formulation of this
(``_accumulate._sat16_pair_dot``, ``_accumulate._sat16_conv``) materialises every pair
product and runs 100-300x slower than the exact int8 dot; :func:`sat16_dot` computes the same
integers with the instruction itself, one FFI call ``qjax_sat16_gemm`` (source
``sat16_gemm.cc``).

Code paths (:data:`SAT16_ISAS`, chosen per call, :func:`sat16_isa`): ``"avx2"``
(``vpmaddubsw`` + ``vpmaddwd`` with ones + ``vpaddd`` on 256-bit registers),
``"avx512"`` (the same on 512-bit registers, AVX-512BW) and ``"avx512_vnni"``
(``vpmaddubsw`` + ``vpdpwssd`` with ones: the non-saturating VNNI word dot adds the two
int16 pair sums into int32, the same wrapping sum as ``vpmaddwd`` + ``vpaddd``).
``vpmaddubsw`` saturates the same pairs at every width, so every path gives the same
integers (the tests force each one). The library is compiled with ``-mavx2``; the
AVX-512 functions carry a target attribute (``vpdpwssd`` as inline assembly), so it loads
on AVX2-only CPUs, and a call asking for a path the CPU lacks is refused.
``QJAX_SAT16_ISA=avx2`` (or ``avx512``) forces a lower path. One packed weight layout
serves all three (one 64-byte row is two ymm or one zmm operand).

Exact mode (``exact=True``, FFI attribute ``exact = 1``): ``Σ_k x·w`` without saturation,
for any uint8 codes, on the same packed weight: each 32-bit lane's four bytes are
widened in registers to two int16 pairs (bytes 0, 2 and 1, 3; the codes zero-extended,
the weights sign-extended) and multiplied by two ``vpmaddwd``, whose pair sums are exact
in int32. qjax runs it for exact layers the saturating instructions cannot serve (8-bit
codes on a weight whose pairs could saturate) on CPUs below VNNI: the same multiplies per
multiply-add, plus the widening (~1.4x the saturating path's time at batch 256).

Availability (:func:`sat16_status`), checked once per process: x86-64 Linux, ``avx2`` in
``/proc/cpuinfo``, a C++ compiler that builds the library (cached, :mod:`._build`).
Off CPU (``lax.platform_dependent``) the program runs the XLA formulation it is given.

Speed. AVX2: each 32 multiply-adds take ``vpmaddubsw`` + ``vpmaddwd`` + ``vpaddd``, one
thread ~125 GMAC/s on the AMD EPYC test host (about what FBGEMM gets on AVX2 CPUs);
AVX-512: ~250 GMAC/s there (raw 1024x1024 GEMM, batch 32-256, one thread). The bound is
the multiplier ports: the emulation needs two multiplies (``vpmaddubsw`` +
``vpdpwssd``/``vpmaddwd``) per 64 multiply-adds where VNNI's ``vpdpbusd`` needs one, so
on a VNNI host it cannot reach the exact path on oneDNN's ukernel at large batches
(figures: ``benchmarks/int8_sat16.py``, README "Measured"); it is 55-100x faster than the
XLA formulation. Calls from 2^24 multiply-adds share their column blocks with qjax's
helper threads, from 2^18 while they spin (``QJAX_SPIN_US``, :mod:`._threads`).

``jax.export`` refuses the custom call (no compatibility guarantee); the call sits in a
named scope that says to build the model with ``kernel='xla'`` for an exportable
program, and ``jax.export``'s error message quotes it.
"""

from __future__ import annotations

import ctypes
import functools
import os

import jax
import jax.numpy as jnp
from jax import lax

from .._levels import cpu_flags
from . import _build, _threads

__all__ = [
    "SAT16_ISAS",
    "SAT16_TARGET",
    "pack_sat16_weight",
    "require_sat16",
    "sat16_dot",
    "sat16_isa",
    "sat16_isas",
    "sat16_conv_q8",
    "sat16_linear_q8",
    "sat16_status",
]

SAT16_TARGET = "qjax_sat16_gemm"
SAT16_Q8_TARGET = "qjax_sat16_q8_gemm"
SAT16_Q8_CONV_TARGET = "qjax_sat16_q8_conv"
NB = 16  # output columns per packed block
# Named scope of the custom call: jax.export's refusal quotes the op's location with it.
EXPORT_HINT = "qjax_native_sat16_kernel: for jax.export build the model with kernel='xla'"
# Threads per call (1, or 2: qjax's helper threads too for large calls, threads.h).
THREADS = 2

_LIB = None

SAT16_ISAS = ("avx2", "avx512", "avx512_vnni")
"""The kernel's code paths, lowest first (the FFI attribute ``isa`` is the index)."""
# /proc/cpuinfo flags each path needs
_ISA_FLAGS = {
    "avx2": ("avx2",),
    "avx512": ("avx2", "avx512f", "avx512bw"),
    "avx512_vnni": ("avx2", "avx512f", "avx512bw", "avx512_vnni"),
}
ISA_ENV = "QJAX_SAT16_ISA"


@functools.cache
def _probe() -> tuple[bool, str]:
    lib, reason = _build.load(_build.SAT16, ("avx2",))
    if lib is None:
        return False, reason
    jax.ffi.register_ffi_target(SAT16_TARGET, jax.ffi.pycapsule(lib.QjaxSat16Gemm), platform="cpu")
    q8 = jax.ffi.pycapsule(lib.QjaxSat16Q8Gemm)
    jax.ffi.register_ffi_target(SAT16_Q8_TARGET, q8, platform="cpu")
    conv = jax.ffi.pycapsule(lib.QjaxSat16Q8Conv)
    jax.ffi.register_ffi_target(SAT16_Q8_CONV_TARGET, conv, platform="cpu")
    lib.qjax_sat16_parallel_calls.restype = ctypes.c_int64
    lib.qjax_sat16_spin_us.restype = ctypes.c_int64
    lib.qjax_sat16_spin_us.argtypes = [ctypes.c_int64]
    lib.qjax_sat16_spin_us(_threads.spin_us())  # its helper threads (threads.h)
    global _LIB
    _LIB = lib
    return True, f"AVX2/AVX-512 saturating int8 GEMM ready ({lib._name})"


def sat16_status() -> tuple[bool, str]:
    """Whether the native saturating GEMM can run here (its AVX2 path at least), and why
    (not).

    ``reason`` names the first failed condition: not x86-64 Linux, no ``avx2``, no C++
    compiler, the compile failed (tail of the compiler's output) or loading failed.

    >>> ok, reason = sat16_status()
    >>> isinstance(ok, bool) and reason != ""
    True
    """
    return _probe()


def sat16_isas() -> tuple[str, ...]:
    """The code paths of :data:`SAT16_ISAS` this CPU can run (``/proc/cpuinfo``), lowest
    first; empty where the kernel is unavailable (:func:`sat16_status`).

    >>> set(sat16_isas()) <= set(SAT16_ISAS)
    True
    """
    if not sat16_status()[0]:
        return ()
    return tuple(i for i in SAT16_ISAS if all(f in cpu_flags() for f in _ISA_FLAGS[i]))


def sat16_isa() -> str:
    """The code path a native sat16 call traced now runs: the highest of
    :func:`sat16_isas`, lowered by the environment variable ``QJAX_SAT16_ISA``
    (``"avx2"``, ``"avx512"`` or ``"avx512_vnni"``; read each time a call is traced, so
    set it before building a model) — e.g. ``QJAX_SAT16_ISA=avx2`` runs the AVX2 code
    on an AVX-512 machine. All paths compute the same integers. ``"avx2"`` where the
    kernel is unavailable (no call is made then).

    >>> sat16_isa() in SAT16_ISAS
    True
    """
    have = sat16_isas() or ("avx2",)
    want = os.environ.get(ISA_ENV, "").strip().lower()
    if want and want not in SAT16_ISAS:
        raise ValueError(f"{ISA_ENV}={want!r}: must be one of {SAT16_ISAS}")
    if want and SAT16_ISAS.index(want) < SAT16_ISAS.index(have[-1]):
        return want
    return have[-1]


def parallel_calls() -> int:
    """How many native sat16 calls so far split their work over two threads.

    >>> parallel_calls() >= 0
    True
    """
    return int(_LIB.qjax_sat16_parallel_calls()) if _LIB is not None else 0


def require_sat16(layer: str) -> None:
    """Raise ``RuntimeError`` naming the layer and the reason if the kernel cannot run."""
    _build.require(sat16_status(), layer, "sat16", "saturating (sat16) kernel")


def pack_sat16_weight(w: jax.Array) -> jax.Array:
    """Pack int8 ``(K, N)`` (or ``(B, K, N)``) weights: int8 ``(B, Nb, K4, 64)``.

    ``packed[b, nb, k4, 4c + q] = w[b][4·k4 + q, 16·nb + c]`` with ``K4 = ceil(K/4)``,
    ``Nb = ceil(N/16)`` and zeros past ``K`` / ``N``: one ``(nb, k4)`` row is the two
    256-bit operands of ``vpmaddubsw`` for 16 columns (four K values of each column side
    by side, so pairs (0,1) and (2,3) are summed in int16 then added in int32). Pure
    ``jnp``; works on traced weights.

    >>> w = jnp.arange(8, dtype=jnp.int8).reshape(4, 2)  # K=4, N=2
    >>> p = pack_sat16_weight(w)
    >>> p.shape, p[0, 0, 0, :8]
    ((1, 1, 1, 64), Array([0, 2, 4, 6, 1, 3, 5, 7], dtype=int8))
    """
    if w.dtype != jnp.int8 or w.ndim not in (2, 3):
        raise TypeError(
            f"pack_sat16_weight needs int8 (K, N) or (B, K, N), got {w.dtype} {w.shape}"
        )
    if w.ndim == 2:
        w = w[None]
    b, k, n = w.shape
    k4, nb = -(-k // 4), -(-n // NB)
    wp = jnp.pad(w, ((0, 0), (0, 4 * k4 - k), (0, NB * nb - n)))
    wp = wp.reshape(b, k4, 4, nb, NB).transpose(0, 3, 1, 4, 2)  # (b, nb, k4, c, q)
    return wp.reshape(b, nb, k4, 4 * NB)


def sat16_dot(
    x: jax.Array,
    packed: jax.Array,
    w: jax.Array,
    portable,
    threads: int | None = None,
    isa: str | None = None,
    exact: bool = False,
) -> jax.Array:
    """``Σ_j sat16(x[..., 2j]·w[2j, n] + x[..., 2j+1]·w[2j+1, n])``, int32, native.

    ``x`` uint8 ``(..., K)`` with ``packed = pack_sat16_weight(w)`` of one ``(K, N)``
    weight, or ``x`` ``(..., B, M, K)`` with ``B`` weights ``(B, K, N)`` (convolution
    groups); ``portable(x, w)`` is the XLA formulation the program runs off CPU (the same
    integers). ``threads``: 1 or 2 per call (default :data:`THREADS`; the second thread
    is used only for large calls). ``isa``: the code path, one of :func:`sat16_isas`
    (default :func:`sat16_isa`); every path gives the same integers. ``exact``: the
    exact sums ``Σ_k x[..., k]·w[k, n]`` instead (no pair saturates: the codes and
    weights widened to int16 pairs on every path), for any uint8 codes, on the same
    ``packed`` weight; ``portable`` must then compute them. Call :func:`require_sat16`
    first (prepare time).
    """
    out = jax.ShapeDtypeStruct(x.shape[:-1] + (w.shape[-1],), jnp.int32)
    return _call(
        SAT16_TARGET, out, x, packed, w, (), portable, threads, isa, "sat16_dot", exact=exact
    )


def sat16_linear_q8(x, packed, w, vecs, out_dtype, portable, threads=None, isa=None,
                    exact=False):  # fmt: skip
    """8-bit codes ``(..., N)`` of a linear layer in one native call: :func:`sat16_dot`'s
    sums ``acc`` through the requantize epilogue of the fused native kernels
    (``epilogue.h``): per column ``a = acc + ivec[n]`` (int32, wrapping), ``y = f32(a) +
    fvec[n]``, ``code = clamp(rint(f32(y·mult[n])), clamp[0], clamp[1]) + zp`` (NaN ->
    ``zp``), or with ``clamp`` ``(5,)`` the ``"onednn"`` scheme's steps
    (:func:`~qjax.kernels._native._onednn.portable_codes`); the int32 sums are never
    written to memory.

    ``x`` uint8 ``(..., K)``, ``packed = pack_sat16_weight(w)`` of one int8 ``(K, N)``
    weight; ``vecs = (ivec, fvec, mult, clamp, zp)`` from
    :func:`~qjax.kernels._native.epilogue_vectors`; ``out_dtype`` int8 or uint8;
    ``portable(x, w, *vecs)``: the codes in XLA, what the program runs off CPU.
    ``threads`` / ``isa`` / ``exact`` as for :func:`sat16_dot` (the AVX2 path requantizes on AVX2
    registers, the others on AVX-512 ones: the same codes). Call :func:`require_sat16`
    first.

    >>> from qjax.kernels._accumulate import _sat16_pair_dot
    >>> from qjax.kernels._native._onednn import portable_codes
    >>> def xla(x, w, *vecs):
    ...     return portable_codes(_sat16_pair_dot(x, w), *vecs).astype(jnp.int8)
    >>> x = jnp.array([[200, 3]], jnp.uint8)
    >>> w = jnp.array([[1, -1], [2, 1]], jnp.int8)
    >>> one, z = jnp.ones(2, jnp.float32), jnp.zeros(2, jnp.float32)
    >>> vecs = (jnp.zeros(2, jnp.int32), z, one / 2, jnp.array([-128.0, 127.0]),
    ...         jnp.array([0], jnp.int32))
    >>> # rint(206 / 2) = 103, rint(-197 / 2) = -98 (ties to even); off CPU: xla
    >>> jax.jit(lambda x: sat16_linear_q8(x, pack_sat16_weight(w), w, vecs, jnp.int8, xla))(x)
    Array([[103, -98]], dtype=int8)
    """
    out = jax.ShapeDtypeStruct(x.shape[:-1] + (w.shape[-1],), out_dtype)
    return _call(SAT16_Q8_TARGET, out, x, packed, w, vecs, portable, threads, isa, "sat16_q8",
                 exact=exact)  # fmt: skip


def sat16_conv_q8(
    x, packed, w, vecs, out_dtype, portable, kernel, stride, dilation, border=None,
    threads=None, isa=None, exact=False,
):  # fmt: skip
    """8-bit NHWC codes of a 2-D conv with one group in one native call, the patches of
    FBGEMM's im2col read in place (never written): per output position ``(n, i, j)`` and
    channel ``o``, the sums ``acc = Σ_t Σ_j sat16(pair j of tap t)`` of
    :func:`sat16_linear_q8` over ``k = t·C + c`` (taps ``t = a·kw + b`` row-major,
    ``x[n, i·sh + a·dh, j·sw + b·dw, c]``), then the same epilogue.

    ``x`` the zero-point-padded NHWC uint8 codes ``(N, Hp, Wp, C)`` with ``C % 4 == 0``
    (a pair never spans two taps); ``w`` the int8 im2col weight ``(kh·kw·C, O)``
    (:func:`qjax.kernels._accumulate.im2col_patches`) and ``packed`` its
    :func:`pack_sat16_weight`; ``vecs``, ``out_dtype``, ``threads``, ``isa``, ``exact`` as for
    :func:`sat16_linear_q8`; ``portable(x, w, *vecs, wtap, zx)`` the codes in XLA (what
    runs off CPU); ``kernel`` ``(kh, kw)``, ``stride``, ``dilation`` ``(h, w)``.
    ``border=(zp_x, (pt, pl, h, w))``: oneDNN's zero-point term over the valid taps only
    (``accumulate="onednn_sat16"``; ``x`` padded with zeros, ``pt`` rows on top and ``pl``
    columns on the left of the unpadded ``h x w``, ``vecs``' ``ivec`` with ``-zp_x·Σw``
    over every tap): each output position whose taps read padding gets ``zp_x·Σ_c w[t,
    c, o]`` back per such tap ``t``, in wrapping int32. Call :func:`require_sat16` first.

    >>> from qjax.kernels._accumulate import _sat16_conv
    >>> from qjax.kernels._native._onednn import portable_codes
    >>> x = jnp.full((1, 2, 2, 4), 200, jnp.uint8)
    >>> w = jnp.full((2, 2, 4, 1), 100, jnp.int8)  # pairs 2·200·100 saturate at 32767
    >>> def xla(x, w, *vecs):  # vecs, then wtap and zx (unused without border)
    ...     acc = _sat16_conv(x, w.reshape(2, 2, 4, 1), (1, 1), (1, 1), 1)
    ...     return portable_codes(acc, *vecs[:5]).astype(jnp.uint8)
    >>> vecs = (jnp.zeros(1, jnp.int32), jnp.zeros(1), jnp.full(1, 1 / 1024),
    ...         jnp.array([0.0, 255.0]), jnp.array([0], jnp.int32))
    >>> f = lambda x: sat16_conv_q8(x, pack_sat16_weight(w.reshape(16, 1)), w.reshape(16, 1),
    ...                             vecs, jnp.uint8, xla, (2, 2), (1, 1), (1, 1))
    >>> jax.jit(f)(x)[0, 0, 0]  # 8 pairs of 32767, / 1024
    Array([255], dtype=uint8)
    """
    n, hp, wp, c = x.shape
    kh, kw = kernel
    o = w.shape[-1]
    if c % 4 or w.shape[0] != kh * kw * c:
        raise ValueError(f"sat16_conv_q8: C = {c} must be a multiple of 4 and the weight "
                         f"{w.shape} (kh·kw·C, O) with (kh, kw) = {kernel}")  # fmt: skip
    oh = (hp - (kh - 1) * dilation[0] - 1) // stride[0] + 1
    ow = (wp - (kw - 1) * dilation[1] - 1) // stride[1] + 1
    out = jax.ShapeDtypeStruct((n, oh, ow, o), out_dtype)
    attrs = dict(kh=kh, kw=kw, sh=stride[0], sw=stride[1], dh=dilation[0], dw=dilation[1])
    if border is None:
        extra = (jnp.zeros(1, jnp.int32), jnp.zeros(1, jnp.int32))
        attrs.update(valid_taps=0, pt=0, pl=0, ih=0, iw=0)
    else:
        zx, (pt, pl, h, wd) = border
        wtap = jnp.sum(w.reshape(kh * kw, c, o).astype(jnp.int32), axis=1)  # (T, O)
        extra = (wtap, jnp.reshape(zx, (1,)).astype(jnp.int32))
        attrs.update(valid_taps=1, pt=pt, pl=pl, ih=h, iw=wd)
    return _call(SAT16_Q8_CONV_TARGET, out, x, packed, w, tuple(vecs) + extra, portable,
                 threads, isa, "sat16_conv_q8", "sequential", exact=exact, **attrs)  # fmt: skip


def _call(target, out, x, packed, w, vecs, portable, threads, isa, who, vmap="expand_dims",
          exact=False, **attrs):  # fmt: skip
    """The custom call ``target`` on CPU, ``portable(x, w, *vecs)`` elsewhere; under
    ``vmap`` the GEMMs take the batch as leading rows (``"expand_dims"``), the conv one
    call per element (``"sequential"``)."""
    threads = THREADS if threads is None else int(threads)
    isa = sat16_isa() if isa is None else isa
    if isa not in SAT16_ISAS:
        raise ValueError(f"{who}: isa must be one of {SAT16_ISAS}, got {isa!r}")
    code = SAT16_ISAS.index(isa)

    def native(x, packed, w, *vecs):
        del w
        call = jax.ffi.ffi_call(target, out, vmap_method=vmap)
        with jax.named_scope(EXPORT_HINT):
            return call(x, packed, *vecs, threads=threads, isa=code, exact=int(exact), **attrs)

    def default(x, packed, w, *vecs):
        del packed
        return portable(x, w, *vecs)

    return lax.platform_dependent(x, packed, w, *vecs, cpu=native, default=default)
