"""Native boundary quantize: torch's per-tensor ``quantize_per_tensor`` (rule 1) with the
FMA instruction itself (and ``qjax.quantize``'s product-then-round formula, a converted
Flax model's quantize step, ``qjax_quantize_product``).

``code = NaN(r) ? qmax : clamp(r, qmin, qmax)``, ``r = rint(fma(x, f32(1/s), z))``: what
``qjax.quantize(x, qp, compat="torch")`` computes for a per-tensor 8-bit spec. XLA has no
fused multiply-add it promises to keep, so that formula emulates the single rounding in
float64 (round to odd, :func:`qjax._float.fma_f32`): ~150 µs for 256x784 inputs on the
AMD EPYC test host against ~10 µs here. One FFI call ``qjax_quantize_fma`` (source
``quantize.cc``, ``-mavx2 -mfma``, built on first use and cached like the other native
kernels); the same codes, checked by the tests over halfway cases, NaN, infinities,
denormals and clamped values. Off CPU (``lax.platform_dependent``) the program runs the
XLA formula; ``jax.export`` refuses the custom call (build with ``kernel='xla'``).

The same library holds the boundary dequantize ``qjax_dequantize`` (``f32(q - zp)·s``,
rule 3, the XLA formula's float32 bits): not for its own speed but because XLA's CPU
client runs a program whose XLA ops count fewer than 1000 flops (``HloCostAnalysis``;
custom calls count none) on the calling thread and hands any other to its thread pool,
the caller waiting on a wake-up (~40 µs per call on the 2-core AMD EPYC host, e.g. the
int8 MLP at batch 32: 160 against 125 µs): with it a program of native layers stays
on the caller. And the zero-point padding of a native conv's input, ``qjax_pad_nhwc``
(rows copied whole; XLA's pad fusion took 75-110 µs for the int8 CNN's 64x28x28x32
input against ~20). And the max pool of 8-bit NHWC codes, ``qjax_max_pool_nhwc`` (exact:
a max; the channels 32 at a time), and the quantized ReLU ``max(q, zp)`` on codes,
``qjax_relu_codes`` (a torch model's ``nn.ReLU`` modules not fused into their layers:
as XLA ops they sent the int8 MLP of ``benchmarks/int8_sat16.py`` to XLA's pool, 286
against 164 µs at batch 32 with the ReLUs fused).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from . import _build

__all__ = [
    "DEQUANTIZE_TARGET",
    "MAX_POOL_TARGET",
    "PAD_TARGET",
    "PRODUCT_TARGET",
    "QUANTIZE_TARGET",
    "RELU_TARGET",
    "dequantize_native",
    "max_pool_native",
    "pad_native",
    "quantize_fma",
    "quantize_status",
    "relu_native",
]

QUANTIZE_TARGET = "qjax_quantize_fma"
PRODUCT_TARGET = "qjax_quantize_product"
DEQUANTIZE_TARGET = "qjax_dequantize"
PAD_TARGET = "qjax_pad_nhwc"
MAX_POOL_TARGET = "qjax_max_pool_nhwc"
RELU_TARGET = "qjax_relu_codes"
EXPORT_HINT = "qjax_native_quantize: for jax.export build the model with kernel='xla'"


@functools.cache
def quantize_status() -> tuple[bool, str]:
    """Whether the native quantize runs here, and why (not): x86-64 Linux with AVX2 and
    FMA, and a C++ compiler that builds it.

    >>> ok, reason = quantize_status()
    >>> isinstance(ok, bool) and isinstance(reason, str)
    True
    """
    lib, reason = _build.load(_build.QUANTIZE, ("avx2", "fma"))
    if lib is None:
        return False, reason
    for target, handler in (
        (QUANTIZE_TARGET, lib.QjaxQuantizeFma),
        (PRODUCT_TARGET, lib.QjaxQuantizeProduct),
        (DEQUANTIZE_TARGET, lib.QjaxDequantize),
        (PAD_TARGET, lib.QjaxPadNhwc),
        (MAX_POOL_TARGET, lib.QjaxMaxPoolNhwc),
        (RELU_TARGET, lib.QjaxReluCodes),
    ):
        jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(handler), platform="cpu")
    return True, f"AVX2+FMA quantize ready ({lib._name})"


def quantize_fma(x, inv, zf, qmin: int, qmax: int, nan_code: int, dtype, portable, fma=True):
    """``NaN(r) ? nan_code : clamp(r, qmin, qmax)`` with ``r = rint(fma(x, inv, zf))``
    (``fma``; torch's per-tensor quantize) or ``r = rint(f32(x·inv)) + zf`` (not ``fma``:
    ``qjax.quantize``), as ``dtype`` (int8 / uint8), natively; ``portable(x)`` is the XLA
    formula for the same codes, run off CPU. ``x`` float32 of any shape, ``inv`` and
    ``zf`` float32 scalars. Call only where :func:`quantize_status` says available.
    """
    out = jax.ShapeDtypeStruct(x.shape, jnp.dtype(dtype))
    target = QUANTIZE_TARGET if fma else PRODUCT_TARGET

    def native(x, inv, zf):
        call = jax.ffi.ffi_call(target, out, vmap_method="broadcast_all")
        with jax.named_scope(EXPORT_HINT):
            return call(x, inv, zf, qmin=int(qmin), qmax=int(qmax), nan_code=int(nan_code))

    def default(x, inv, zf):
        del inv, zf
        return portable(x)

    x = jnp.asarray(x, jnp.float32)
    inv = jnp.asarray(inv, jnp.float32).reshape(())
    zf = jnp.asarray(zf, jnp.float32).reshape(())
    return lax.platform_dependent(x, inv, zf, cpu=native, default=default)


def dequantize_native(q, scale, zp, portable):
    """``f32(int32(q) - zp)·scale`` natively (float32 out, ``q``'s shape): ``q`` int8 /
    uint8 codes of any shape, ``scale`` float32 and ``zp`` int32 scalars; ``portable(q)``
    is the XLA formula for the same floats, run off CPU. Call only where
    :func:`quantize_status` says available.
    """
    out = jax.ShapeDtypeStruct(q.shape, jnp.float32)

    def native(q, scale, zp):
        call = jax.ffi.ffi_call(DEQUANTIZE_TARGET, out, vmap_method="broadcast_all")
        with jax.named_scope(EXPORT_HINT):
            return call(q, scale, zp)

    def default(q, scale, zp):
        del scale, zp
        return portable(q)

    scale = jnp.asarray(scale, jnp.float32).reshape(())
    zp = jnp.asarray(zp, jnp.int32).reshape(())
    return lax.platform_dependent(q, scale, zp, cpu=native, default=default)


def pad_native(x, value, pads, portable):
    """``x`` (N, H, W, C) 8-bit codes padded with the code ``value`` (a scalar of ``x``'s
    dtype): ``pads = ((lo_h, hi_h), (lo_w, hi_w))``, natively (rows copied whole; the
    input of a native conv, which is not ``jax.export``-able either); ``portable(x,
    value)`` is the XLA pad, run off CPU. Call only where :func:`quantize_status` says
    available.
    """
    (lo_h, hi_h), (lo_w, hi_w) = pads
    n, h, w, c = x.shape
    out = jax.ShapeDtypeStruct((n, lo_h + h + hi_h, lo_w + w + hi_w, c), x.dtype)

    def native(x, value):
        call = jax.ffi.ffi_call(PAD_TARGET, out, vmap_method="sequential")
        with jax.named_scope(EXPORT_HINT):
            return call(x, value, lo_h=lo_h, hi_h=hi_h, lo_w=lo_w, hi_w=hi_w)

    value = jnp.asarray(value, x.dtype).reshape(())
    return lax.platform_dependent(x, value, cpu=native, default=portable)


def max_pool_native(x, out_hw, window, strides, dilation, pads, portable):
    """The max over each window of ``x`` (N, H, W, C) 8-bit codes, natively: output
    ``(N, *out_hw, C)``, ``window``/``strides``/``dilation`` pairs over (H, W), ``pads``
    the low padding of H and W (positions outside the input never win; the high side
    follows from ``out_hw``); ``portable(x)`` is XLA's reduce_window, run off CPU. Call
    only where :func:`quantize_status` says available.
    """
    out = jax.ShapeDtypeStruct((x.shape[0], *out_hw, x.shape[3]), x.dtype)
    (kh, kw), (sh, sw), (dh, dw), (ph, pw) = window, strides, dilation, pads

    def native(x):
        call = jax.ffi.ffi_call(MAX_POOL_TARGET, out, vmap_method="sequential")
        with jax.named_scope(EXPORT_HINT):
            return call(x, kh=kh, kw=kw, sh=sh, sw=sw, dh=dh, dw=dw, ph=ph, pw=pw)

    return lax.platform_dependent(x, cpu=native, default=portable)


def relu_native(x, lo, portable):
    """``max(x, lo)`` of 8-bit codes ``x`` (any shape) in one native call; ``lo`` a scalar of
    ``x``'s dtype (the zero point; may be traced); ``portable(x)`` the XLA formula, run off
    CPU. Call only where :func:`quantize_status` says available.
    """
    out = jax.ShapeDtypeStruct(x.shape, x.dtype)

    def native(x, lo):
        call = jax.ffi.ffi_call(RELU_TARGET, out, vmap_method="expand_dims")
        with jax.named_scope(EXPORT_HINT):
            return call(x, jnp.reshape(lo, (1,)))

    return lax.platform_dependent(x, lo, cpu=native, default=lambda x, lo: portable(x))
