"""2-D int8 convolution on oneDNN's brgemm ukernel (``kernel="onednn"`` for conv layers).

The kernel (``onednn_ukernel.cc``, the ``"ukernel"`` provider of :mod:`._onednn` only)
computes, on NHWC uint8 codes already padded with the input zero point (a ``VALID``
conv) and an int8 ``HWIO`` weight with ``groups``:

``acc[n, i, j, g·Og + o] = Σ_{a,b,c} x[n, i·sh + a·dh, j·sw + b·dw, g·Cg + c]·w[a, b, c, g·Og + o]``

exactly in int32 (``vpdpbusd``/``tdpbusd``), in tiles of at most 64 output positions x
64 output channels of one group, each either copied out (:func:`onednn_conv2d`) or
requantized by the shared epilogue (:func:`onednn_conv2d_q8`, ``epilogue.h``, the same
steps as the linear layer's). Three ways to feed the ukernel, fixed per layer by the
weight's shape (:func:`onednn_conv_feed`):

* kernel rows (``groups=1``, ``C`` a multiple of 4): one brgemm call per kernel row
  with ``K = kw·C`` (those bytes are contiguous in NHWC), accumulating into the tile, the
  A rows read in place from the padded input (``lda = sw·C``); the tiles span output
  rows where the row pitch allows it (the positions past a row's end are computed and
  dropped); with dilation along W, one call per tap on that tap's rows of the packed
  kernel row (whole VNNI groups of 4);
* taps (grouped, depthwise, other ``C``): the same with one call per kernel tap and
  ``K = Cg``;
* im2col: the tile's rows gathered into a small buffer in ``(a, b, c)`` order and one
  call with ``K = kh·kw·Cg``, for few input channels (a first layer with ``C = 1`` would
  otherwise multiply with ``K = 1``).

The weight is packed once at prepare time (:func:`pack_onednn_conv_weight`, pure
``jnp``: traced and ``vmap``-ped weights work). Off CPU the program runs
``lax.conv_general_dilated`` (and the scheme's own epilogue), the same integers.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from . import _onednn

__all__ = [
    "IM2COL_MAX_K",
    "onednn_conv2d",
    "onednn_conv2d_q8",
    "onednn_conv_feed",
    "pack_onednn_conv_weight",
]

IM2COL_MAX_K = 256  # the kernel's im2col buffer (kIm2colMaxK): kh·kw·Cg rounded up to 4
# Below this many input channels per group the taps' K is too small for the ukernel: the
# im2col path measured faster (AMD EPYC VNNI, 2 cores, see the README's conv numbers).
IM2COL_BELOW_CG = 8
_DIMS = ("NHWC", "HWIO", "NHWC")


FEED_TAPS, FEED_IM2COL, FEED_ROWS = 0, 1, 2


def onednn_conv_feed(cg: int, kh: int, kw: int, groups: int = 1) -> int:
    """How the conv kernel feeds the ukernel and how its weight is packed (module
    docstring): ``1`` im2col (one call, ``K = kh·kw·Cg``) for fewer than 8 channels per
    group when ``kh·kw·Cg`` rounded up to 4 fits the kernel's 256-byte buffer; else ``2``
    kernel rows (``K = kw·C``) for ``groups=1`` and ``C`` a multiple of 4; else ``0``
    taps (``K = Cg``). Independent of stride and dilation (a call's business).

    >>> onednn_conv_feed(1, 3, 3), onednn_conv_feed(32, 3, 3), onednn_conv_feed(7, 7, 7)
    (1, 2, 0)
    >>> onednn_conv_feed(16, 3, 3, groups=4), onednn_conv_feed(8, 7, 7)
    (0, 2)
    """
    if cg < IM2COL_BELOW_CG and -(-kh * kw * cg // 4) * 4 <= IM2COL_MAX_K:
        return FEED_IM2COL
    return FEED_ROWS if groups == 1 and cg % 4 == 0 else FEED_TAPS


def pack_onednn_conv_weight(w: jax.Array, groups: int = 1) -> jax.Array:
    """Pack an int8 ``HWIO`` conv weight ``(kh, kw, Cg, O)`` for the ukernel conv with
    ``groups``: uint8 ``(S,)``.

    For each group ``g`` and each segment of the feed (:func:`onednn_conv_feed`: each
    kernel row ``a``, the ``(kw·Cg, Og)`` matrix in ``(b, c)`` row order; each tap
    ``(a, b)``, ``K = Cg``; or for im2col the whole ``(kh·kw·Cg, Og)`` matrix in
    ``(a, b, c)`` row order) the ``(K, Og)`` matrix ``w[..., g·Og:(g+1)·Og]`` in the layout of
    :func:`~qjax.kernels._native._onednn.pack_onednn_weight` (``"ukernel"``): 64-column
    VNNI blocks, ``K`` padded with zeros to a multiple of 4, ``Og`` to 64; groups, then
    segments, in order. Pure ``jnp``.

    >>> p = pack_onednn_conv_weight(jnp.ones((3, 3, 32, 64), jnp.int8))  # 3 rows x 96 x 64
    >>> p.shape, p.dtype
    ((18432,), dtype('uint8'))
    >>> pack_onednn_conv_weight(jnp.ones((3, 3, 1, 32), jnp.int8)).shape  # im2col, K 9 -> 12
    (768,)
    """
    if w.ndim != 4 or w.dtype != jnp.int8:
        raise TypeError(
            f"pack_onednn_conv_weight needs an int8 HWIO array, got {w.dtype} {w.shape}"
        )
    kh, kw, cg, o = w.shape
    og = o // groups
    wg = w.reshape(kh, kw, cg, groups, og).transpose(3, 0, 1, 2, 4)  # (G, kh, kw, Cg, Og)
    feed = onednn_conv_feed(cg, kh, kw, groups)
    if feed == FEED_IM2COL:
        mats = wg.reshape(groups, kh * kw * cg, og)
    elif feed == FEED_ROWS:
        mats = wg.reshape(groups * kh, kw * cg, og)
    else:
        mats = wg.reshape(groups * kh * kw, cg, og)
    s, k, n = mats.shape
    kp, nb = -(-k // 4) * 4, -(-n // 64)
    mats = jnp.pad(mats, ((0, 0), (0, kp - k), (0, nb * 64 - n)))
    mats = mats.reshape(s, kp // 4, 4, nb, 64).transpose(0, 3, 1, 4, 2)
    return lax.bitcast_convert_type(mats.reshape(-1), jnp.uint8)


def _geometry(x, w, stride, dilation):
    n, hp, wp, _ = x.shape
    kh, kw, cg, o = w.shape
    (sh, sw), (dh, dw) = stride, dilation
    oh = (hp - (kh - 1) * dh - 1) // sh + 1
    ow = (wp - (kw - 1) * dw - 1) // sw + 1
    return (n, oh, ow, o), dict(kh=kh, kw=kw, sh=sh, sw=sw, dh=dh, dw=dw)


def _attrs(x, w, stride, dilation, groups):
    _onednn.onednn_status()  # the probe registers the FFI targets
    shape, attrs = _geometry(x, w, stride, dilation)
    feed = onednn_conv_feed(w.shape[2], w.shape[0], w.shape[1], groups)
    if feed == FEED_ROWS and dilation[1] != 1:
        feed = 3  # the packed kernel rows, one call per tap (dilated along W)
    return shape, dict(attrs, groups=int(groups), feed=int(feed))


def _xla_conv(x, w, stride, dilation, groups):
    return lax.conv_general_dilated(
        x.astype(jnp.int32),
        w.astype(jnp.int32),
        stride,
        "VALID",
        rhs_dilation=dilation,
        dimension_numbers=_DIMS,
        feature_group_count=groups,
    )


def onednn_conv2d(x, packed, w, stride, dilation=(1, 1), groups=1) -> jax.Array:
    """``acc[n, i, j, g·Og + o] = Σ_{a,b,c} x[n, i·sh + a·dh, j·sw + b·dw, g·Cg + c]·
    w[a, b, c, g·Og + o]``: uint8 x int8 -> int32, one ukernel FFI call.

    ``x`` uint8 NHWC codes, already padded (``VALID``); ``w`` int8 ``HWIO``
    ``(kh, kw, C/groups, O)``; ``packed = pack_onednn_conv_weight(w, groups)``;
    ``stride``/``dilation`` ``(h, w)`` pairs. Exact while the true sums fit int32. Off
    CPU, ``lax.conv_general_dilated`` in int32 (same integers). Under ``vmap`` the call
    runs once per batch element.

    >>> if _onednn.onednn_fused():
    ...     x = jnp.arange(16, dtype=jnp.uint8).reshape(1, 4, 4, 1) * 16
    ...     w = jnp.ones((2, 2, 1, 1), jnp.int8)
    ...     p = pack_onednn_conv_weight(w)
    ...     print(onednn_conv2d(x, p, w, (2, 2))[..., 0].tolist())
    ... else:
    ...     print([[[160, 288], [672, 800]]])
    [[[160, 288], [672, 800]]]
    """
    shape, attrs = _attrs(x, w, stride, dilation, groups)
    out = jax.ShapeDtypeStruct(shape, jnp.int32)

    def native(x, packed, w):
        del w
        call = jax.ffi.ffi_call(_onednn.UKERNEL_CONV_TARGET, out, vmap_method="sequential")
        with jax.named_scope(_onednn.EXPORT_HINT):
            return call(x, packed, **attrs)

    def portable(x, packed, w):
        del packed
        return _xla_conv(x, w, stride, dilation, groups)

    return lax.platform_dependent(x, packed, w, cpu=native, default=portable)


def onednn_conv2d_q8(
    x, packed, w, stride, dilation, groups, ivec, fvec, mult, clamp, zp, out_dtype
) -> jax.Array:
    """8-bit NHWC codes of a conv in one ukernel call: :func:`onednn_conv2d`'s ``acc``,
    then per output channel ``o`` the shared epilogue ``a = acc + ivec[o]`` (int32,
    wrapping), ``y = f32(a) + fvec[o]``, ``code = clamp(rint(f32(y·mult[o])), clamp[0],
    clamp[1]) + zp`` (NaN -> ``zp``), or with ``clamp`` ``(5,)`` the ``"onednn"`` steps
    (:func:`~qjax.kernels._native._onednn.portable_codes`), as
    :func:`~qjax.kernels._native._onednn.onednn_linear_q8`;
    vectors from :func:`~qjax.kernels._native.epilogue_vectors` (int32/float32 ``(O,)``, float32
    ``(2,)``, int32 ``(1,)``); ``out_dtype`` int8 or uint8.

    >>> x = jnp.full((1, 2, 2, 1), 200, jnp.uint8)
    >>> w = jnp.ones((2, 2, 1, 1), jnp.int8)
    >>> v = (jnp.zeros(1, jnp.int32), jnp.zeros(1), jnp.full(1, 0.25), jnp.array([0.0, 255.0]))
    >>> if _onednn.onednn_fused():  # 800 / 4
    ...     print(onednn_conv2d_q8(x, pack_onednn_conv_weight(w), w, (1, 1), (1, 1), 1, *v,
    ...                            jnp.array([0], jnp.int32), jnp.uint8)[..., 0])
    ... else:
    ...     print("[[[200]]]")
    [[[200]]]
    """
    shape, attrs = _attrs(x, w, stride, dilation, groups)
    out = jax.ShapeDtypeStruct(shape, out_dtype)

    def native(x, packed, w, *vecs):
        del w
        call = jax.ffi.ffi_call(_onednn.UKERNEL_Q8_CONV_TARGET, out, vmap_method="sequential")
        with jax.named_scope(_onednn.EXPORT_HINT):
            return call(x, packed, *vecs, **attrs)

    def portable(x, packed, w, ivec, fvec, mult, clamp, zp):
        del packed
        acc = _xla_conv(x, w, stride, dilation, groups)
        return _onednn.portable_codes(acc, ivec, fvec, mult, clamp, zp).astype(out_dtype)

    vecs = (ivec, fvec, mult, clamp, zp)
    return lax.platform_dependent(x, packed, w, *vecs, cpu=native, default=portable)
