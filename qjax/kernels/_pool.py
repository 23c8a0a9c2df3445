"""Integer pooling: max pool, average pool, adaptive average pool (torch's quantized CPU ops).

Inputs are per-tensor QArrays of shape ``(N, C, H, W)`` (``layout="NCHW"``, a contiguous
torch tensor) or ``(N, H, W, C)`` (``layout="NHWC"``, a channels-last torch tensor: the
same memory). The output has the input's qparams (torch's pooling keeps them).

Notation as in ``shared/NUMERICS.md``. ``S = Σ (q - zp)`` over the window's elements
inside the input (padding never contributes), ``d`` the divisor (``divisor_override``,
else the window size clipped to the padded input with ``count_include_pad``, else the
number of elements inside the input), ``m = f32(1/d)``, ``m' = f32(1/f32(1/m))``:

==========================  ====================================================================
op / path                   output code (clamped to the dtype range)
==========================  ====================================================================
``max_pool2d``              integer max over the window (padding ignored), any engine
avg, NCHW (ATen)            ``rint(f32(f32(S·m) + zp))`` (zero point *before* rounding)
avg, NHWC (ATen), channel   ``rint(f32(S·m)) + zp`` (zero point *after* rounding)
``c < C - C mod 16``
avg, NHWC, last ``C mod     ``rint(f32(f32(S·m') + zp))``
16`` channels
avg, ``"qnnpack"``          QNNPACK (quint8, no ``ceil_mode``): padding counts as ``zp``,
                            ``d = kH·kW`` always (``count_include_pad`` and
                            ``divisor_override`` are ignored by torch),
                            ``rint(f32(S·f32(s/f32(s·d)))) + zp``
adaptive avg, NCHW          ``rint(f32(f32(S·m') + zp))`` (``m`` from the adaptive window size)
adaptive avg, NHWC,         ``rint(fma(S, m', zp))`` (torch's ``quantize_vec``, compiled with
channel ``c < C - C mod 8`` fma contraction in its AVX2 kernel)
adaptive avg, NHWC, last    ``rint(f32(f32(S·m') + zp))``
``C mod 8`` channels
==========================  ====================================================================

Windows: ``hstart = oh·stride - pad``, ``hend = min(hstart + k, H + pad)``, clipped to
``[0, H)`` (torch's ``pooling_output_shape`` with ``ceil_mode``); adaptive windows
``[floor(i·H/OH), ceil((i+1)·H/OH))``. torch runs ``qnnpack`` average pooling only when
the engine is ``qnnpack``, the input quint8 and ``ceil_mode`` off; otherwise the ATen
kernels. Measured against torch 2.13 on an AVX512 CPU: the ``16`` is the AVX512 avg-pool
kernel's channel block, the adaptive kernel runs its AVX2 version (block ``8``); other
builds may differ: pass ``nhwc_block``. Under the ``qnnpack`` engine torch runs adaptive
pooling of quint8 input as QNNPACK average pooling (kernel = stride = input/output) when
the output size divides the input size and differs from it; so does ``scheme="qnnpack"``.
"""

from __future__ import annotations

from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from .._float import div_f32 as _div
from .._float import fma_f32 as _fma_f32
from .._float import materialize as _m
from .._qarray import QArray
from ._native import _quantize

__all__ = ["PoolScheme", "adaptive_avg_pool2d", "avg_pool2d", "max_pool2d"]

PoolScheme = Literal["fbgemm", "x86", "onednn", "qnnpack"]
Layout = Literal["NCHW", "NHWC"]
_SCHEMES = ("fbgemm", "x86", "onednn", "qnnpack")


def _pair(v, name) -> tuple[int, int]:
    if isinstance(v, (int, np.integer)):
        return int(v), int(v)
    v = tuple(int(t) for t in v)
    if len(v) == 1:
        return v[0], v[0]
    if len(v) != 2:
        raise ValueError(f"{name} must be an int or a pair, got {v}")
    return v


def _check(x: QArray, layout: str, what: str):
    if not isinstance(x, QArray):
        raise TypeError(f"{what}: expected a QArray, got {type(x).__name__}")
    if x.spec.granularity != "tensor":
        raise ValueError(f"{what}: needs per-tensor qparams")
    if layout not in ("NCHW", "NHWC"):
        raise ValueError(f"{what}: layout must be 'NCHW' or 'NHWC', got {layout!r}")
    if x.ndim != 4:
        raise ValueError(f"{what}: expects a 4-d input, got shape {x.shape}")
    return (2, 3) if layout == "NCHW" else (1, 2)


def _out_size(n, k, s, p, d, ceil_mode) -> int:
    """torch's ``pooling_output_shape``."""
    num = n + 2 * p - d * (k - 1) - 1 + ((s - 1) if ceil_mode else 0)
    o = num // s + 1
    if ceil_mode and (o - 1) * s >= n + p:
        o -= 1
    return o


def _pad_for(n, k, s, p, d, o) -> tuple[int, int]:
    hi = max((o - 1) * s + d * (k - 1) + 1 - n - p, 0)
    return p, hi


def max_pool2d(
    x: QArray,
    kernel_size,
    stride=None,
    padding=0,
    dilation=1,
    ceil_mode: bool = False,
    *,
    layout: Layout = "NCHW",
    kernel: str = "xla",
) -> QArray:
    """``torch.nn.functional.max_pool2d`` on codes: the integer max, padding ignored.

    ``y[n, oh, ow, c] = max x[n, oh·s - p + i·d, ow·s - p + j·d, c]`` over the window
    positions inside the input, codes in and out of ``x``'s dtype and qparams.
    ``kernel``: ``"xla"`` (default; ``lax.reduce_window``, ``jax.export``-able) or
    ``"auto"``: one native call (:func:`qjax.kernels._native._quantize.max_pool_native`)
    for 8-bit NHWC codes where the native library runs and the window has at most 64
    positions, XLA otherwise; the same codes.

    >>> from qjax import QuantSpec, QParams
    >>> x = QArray(jnp.arange(16, dtype=jnp.uint8).reshape(1, 1, 4, 4),
    ...            QParams(0.1, 3, QuantSpec(signed=False)))
    >>> max_pool2d(x, 2).values[0, 0]
    Array([[ 5,  7],
           [13, 15]], dtype=uint8)
    """
    if kernel not in ("xla", "auto"):
        raise ValueError(f"max_pool2d: kernel must be 'xla' or 'auto', got {kernel!r}")
    ax = _check(x, layout, "max_pool2d")
    k = _pair(kernel_size, "kernel_size")
    s = _pair(k if stride is None or stride == () else stride, "stride")
    p = _pair(padding, "padding")
    d = _pair(dilation, "dilation")
    for i in range(2):
        if p[i] * 2 > k[i]:
            raise ValueError("max_pool2d: padding must be at most half the kernel size")
    dims = [1] * 4
    strides = [1] * 4
    dil = [1] * 4
    pads = [(0, 0)] * 4
    for i, a in enumerate(ax):
        n = x.shape[a]
        o = _out_size(n, k[i], s[i], p[i], d[i], ceil_mode)
        dims[a], strides[a], dil[a] = k[i], s[i], d[i]
        pads[a] = _pad_for(n, k[i], s[i], p[i], d[i], o)
    init = jnp.asarray(np.iinfo(x.dtype).min, x.dtype)

    def xla(v):
        return lax.reduce_window(
            v, init, lax.max, tuple(dims), tuple(strides), tuple(pads), window_dilation=tuple(dil)
        )

    if kernel == "auto" and layout == "NHWC":
        y = native_max_pool(x.values, k, s, d, p, xla)
        if y is not None:
            return QArray(y, x.qparams)
    return QArray(xla(x.values), x.qparams)


def native_max_pool(v, window, strides, dilation, lo, portable):
    """The max pool of ``v`` (N, H, W, C) 8-bit codes from one native call
    (:func:`qjax.kernels._native._quantize.max_pool_native`; ``lo`` the low padding of H
    and W, positions outside the input never win; the output shape ``portable``'s), or
    ``None`` where it does not apply (not 8-bit, a window of more than 64 positions, an
    empty output, the native library unavailable here). ``portable(v)``: XLA's
    reduce_window of the same window, run off CPU."""
    if v.ndim != 4 or v.dtype.itemsize != 1 or window[0] * window[1] > 64:
        return None
    out_hw = jax.eval_shape(portable, v).shape[1:3]
    if min(out_hw) < 1 or not _quantize.quantize_status()[0]:
        return None
    return _quantize.max_pool_native(v, out_hw, window, strides, dilation, lo, portable)


def _window_counts(n, k, s, p, o):
    """Per output index: (size inside the input, pool_size clipped to the padded input)."""
    start = np.arange(o) * s - p
    end = np.minimum(start + k, n + p)
    pool = end - start
    size = np.minimum(end, n) - np.maximum(start, 0)
    return size, pool


def _requant_avg(S, size_d, zp, qmin, qmax, vec_mask, *, m, m2):
    """Codes from the centred window sum ``S`` (int32) with the two rounding paths."""
    Sf = S.astype(jnp.float32)
    zf = zp.astype(jnp.float32)
    # zero point after rounding: rint(f32(S·m)) + zp
    after = jnp.round(_m(Sf * m)) + zf
    # zero point before rounding: rint(f32(f32(S·m') + zp))
    p = _m(Sf * m2)
    before = jnp.round(_fma_f32(p, jnp.float32(1.0), jnp.broadcast_to(zf, p.shape)))
    v = jnp.where(vec_mask, after, before)
    return jnp.clip(v, jnp.float32(qmin), jnp.float32(qmax)).astype(jnp.int32)


def _recip_chain(d: np.ndarray) -> tuple[jax.Array, jax.Array]:
    """``m = f32(1/d)`` and ``m' = f32(1/f32(1/m))`` for integer divisors ``d`` (static)."""
    d = np.asarray(d, np.float64)
    m = (1.0 / d).astype(np.float32)
    m2 = (np.float32(1.0) / (np.float32(1.0) / m)).astype(np.float32)
    return jnp.asarray(m), jnp.asarray(m2)


def avg_pool2d(
    x: QArray,
    kernel_size,
    stride=None,
    padding=0,
    ceil_mode: bool = False,
    count_include_pad: bool = True,
    divisor_override: int | None = None,
    *,
    layout: Layout = "NCHW",
    scheme: PoolScheme = "fbgemm",
    nhwc_block: int = 16,
) -> QArray:
    """``torch.nn.functional.avg_pool2d`` on a quantized tensor (formulas: module docstring).

    ``scheme="qnnpack"`` applies where torch would run QNNPACK (quint8 and no
    ``ceil_mode``); otherwise every scheme is the ATen kernel of ``layout``.

    >>> from qjax import QuantSpec, QParams
    >>> u8 = QuantSpec(signed=False)
    >>> x = QArray(jnp.array([[[[0, 1], [2, 5]]]], jnp.uint8), QParams(0.1, 0, u8))
    >>> avg_pool2d(x, 2).values.ravel(), avg_pool2d(x, 2, padding=1).values[0, 0]
    (Array([2], dtype=uint8), Array([[0, 0],
           [0, 1]], dtype=uint8))
    """
    if scheme not in _SCHEMES:
        raise ValueError(f"avg_pool2d: unknown scheme {scheme!r}; known: {_SCHEMES}")
    ax = _check(x, layout, "avg_pool2d")
    k = _pair(kernel_size, "kernel_size")
    s = _pair(k if stride is None or stride == () else stride, "stride")
    p = _pair(padding, "padding")
    if divisor_override is not None and int(divisor_override) == 0:
        raise ValueError("avg_pool2d: divisor must be not zero")
    for i in range(2):
        if p[i] * 2 > k[i]:
            raise ValueError("avg_pool2d: padding must be at most half the kernel size")
    qnn = scheme == "qnnpack" and x.dtype == np.uint8 and not ceil_mode
    zp = jnp.asarray(x.zero_point, jnp.int32).reshape(())
    s_in = jnp.asarray(x.scale, jnp.float32).reshape(())
    xc = x.values.astype(jnp.int32) - zp
    dims, strides, pads = [1] * 4, [1] * 4, [(0, 0)] * 4
    sizes, pools = [], []
    for i, a in enumerate(ax):
        n = x.shape[a]
        o = _out_size(n, k[i], s[i], p[i], 1, ceil_mode)
        dims[a], strides[a] = k[i], s[i]
        pads[a] = _pad_for(n, k[i], s[i], p[i], 1, o)
        sz, pl = _window_counts(n, k[i], s[i], p[i], o)
        sizes.append(sz)
        pools.append(pl)
    S = lax.reduce_window(xc, jnp.int32(0), lax.add, tuple(dims), tuple(strides), tuple(pads))
    size2 = np.outer(sizes[0], sizes[1])
    pool2 = np.outer(pools[0], pools[1])
    spatial_shape = [1] * 4
    spatial_shape[ax[0]], spatial_shape[ax[1]] = size2.shape
    qmin, qmax = x.spec.qmin, x.spec.qmax
    if qnn:
        # QNNPACK: padding holds zp (contributes 0 to S), divisor kH·kW.
        kk = k[0] * k[1]
        scale = _m(_div(s_in, _m(s_in * jnp.float32(kk))))
        v = jnp.round(_m(S.astype(jnp.float32) * scale)) + zp.astype(jnp.float32)
        y = jnp.clip(v, jnp.float32(qmin), jnp.float32(qmax)).astype(jnp.int32)
        return QArray(y.astype(x.dtype), x.qparams)
    if divisor_override is not None:
        div = np.full(size2.shape, int(divisor_override))
    elif count_include_pad:
        div = pool2
    else:
        div = size2
    m, m2 = _recip_chain(div)
    m, m2 = m.reshape(spatial_shape), m2.reshape(spatial_shape)
    if layout == "NCHW":
        # zero point before rounding with the multiplier itself (not its double reciprocal)
        vec_mask = np.zeros((1, 1, 1, 1), bool)
        m2 = m
    else:
        c = x.shape[3]
        vec_mask = (np.arange(c) < c - c % nhwc_block).reshape(1, 1, 1, c)
    y = _requant_avg(S, size2, zp, qmin, qmax, vec_mask, m=m, m2=m2)
    return QArray(y.astype(x.dtype), x.qparams)


def _adaptive_bounds(n: int, o: int) -> tuple[np.ndarray, np.ndarray]:
    i = np.arange(o)
    start = (i * n) // o
    end = -((-(i + 1) * n) // o)
    return start, end


def adaptive_avg_pool2d(
    x: QArray,
    output_size,
    *,
    layout: Layout = "NCHW",
    scheme: PoolScheme = "fbgemm",
    nhwc_block: int = 8,
) -> QArray:
    """``torch.nn.functional.adaptive_avg_pool2d`` on a quantized tensor (module docstring).

    ``output_size`` is an int or a pair (``None`` entries keep the input size).

    >>> from qjax import QuantSpec, QParams
    >>> x = QArray(jnp.array([[[[0, 1, 2], [2, 4, 7]]]], jnp.uint8),
    ...            QParams(0.1, 0, QuantSpec(signed=False)))
    >>> adaptive_avg_pool2d(x, 1).values[0, 0]
    Array([[3]], dtype=uint8)
    """
    if scheme not in _SCHEMES:
        raise ValueError(f"adaptive_avg_pool2d: unknown scheme {scheme!r}; known: {_SCHEMES}")
    ax = _check(x, layout, "adaptive_avg_pool2d")
    if isinstance(output_size, (int, np.integer)) or output_size is None:
        output_size = (output_size, output_size)
    osz = tuple(x.shape[a] if o is None else int(o) for a, o in zip(ax, output_size, strict=True))
    in_hw = tuple(x.shape[a] for a in ax)
    if (
        scheme == "qnnpack"
        and x.dtype == np.uint8
        and in_hw != osz
        and in_hw[0] % osz[0] == 0
        and in_hw[1] % osz[1] == 0
    ):
        # torch runs QNNPACK average pooling with kernel = stride = input/output
        kern = (in_hw[0] // osz[0], in_hw[1] // osz[1])
        return avg_pool2d(x, kern, kern, 0, layout=layout, scheme="qnnpack")
    zp = jnp.asarray(x.zero_point, jnp.int32).reshape(())
    xc = x.values.astype(jnp.int32) - zp
    # Separable window sums via cumulative sums (exact int32).
    bounds = [_adaptive_bounds(x.shape[a], o) for a, o in zip(ax, osz, strict=True)]
    S = xc
    for a, (st, en) in zip(ax, bounds, strict=True):
        cs = jnp.cumsum(S, axis=a, dtype=jnp.int32)
        pad = [(0, 0)] * 4
        pad[a] = (1, 0)
        cs = jnp.pad(cs, pad)
        S = jnp.take(cs, jnp.asarray(en), axis=a) - jnp.take(cs, jnp.asarray(st), axis=a)
    size2 = np.outer(bounds[0][1] - bounds[0][0], bounds[1][1] - bounds[1][0])
    spatial_shape = [1] * 4
    spatial_shape[ax[0]], spatial_shape[ax[1]] = size2.shape
    _, m2 = _recip_chain(size2)
    m2 = m2.reshape(spatial_shape)
    Sf = S.astype(jnp.float32)
    zf = jnp.broadcast_to(zp.astype(jnp.float32), S.shape)
    # scalar path: rint(f32(f32(S·m') + zp)); vector channels (NHWC): rint(fma(S, m', zp))
    before = jnp.round(_fma_f32(_m(Sf * m2), jnp.float32(1.0), zf))
    if layout == "NHWC":
        c = x.shape[3]
        fused = jnp.round(_fma_f32(Sf, jnp.broadcast_to(m2, S.shape), zf))
        vec_mask = (np.arange(c) < c - c % nhwc_block).reshape(1, 1, 1, c)
        before = jnp.where(vec_mask, fused, before)
    y = jnp.clip(before, jnp.float32(x.spec.qmin), jnp.float32(x.spec.qmax)).astype(jnp.int32)
    return QArray(y.astype(x.dtype), x.qparams)
