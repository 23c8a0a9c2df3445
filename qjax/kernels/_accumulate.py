"""The int32 accumulator of linear and conv layers: its checks and its variants.

One topic shared by :mod:`qjax.kernels._linear` and :mod:`qjax.kernels._conv`:

* the checks every integer layer runs before it accumulates: the int32 overflow bound
  (:func:`check_accumulator`, at prepare time) and the operands (:func:`check_operands`,
  at call time);
* the ways ``Σ x·w`` is accumulated, one per ``accumulate`` name (:data:`Accumulate`):

  - ``"exact"``: int8 x int8 -> int32 ``dot_general`` (:func:`_int8_dot`) or
    ``conv_general_dilated`` (:func:`_int8_conv`), exact;
  - ``"fbgemm_sat16"``: FBGEMM's ``vpmaddubsw`` on CPUs without VNNI (NUMERICS.md rule
    14): adjacent products along the reduction summed in pairs, each pair saturated to
    int16 (:func:`_sat16_pair_dot`; :func:`_sat16_conv` over FBGEMM's im2col order);
  - ``"onednn_sat16"``: oneDNN's path on the same CPUs: for a linear layer the same
    pairs; for a conv the pairs never span two kernel taps, and the padding taps are
    skipped (:func:`_onednn_sat16_conv`, with :func:`_valid_taps`).

Which engine takes which variant at which CPU level is :mod:`qjax.kernels._levels`; the
native AVX2/AVX-512 kernel computing the saturating sums is :mod:`qjax.kernels._native._sat16`
(the same integers). The layers' module docstrings give the full accumulator rule,
zero-point terms included.
"""

from __future__ import annotations

import math
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from .._qarray import QArray
from .._spec import QParams
from . import _native
from ._prepared import SAT16_SAFE_X, sat16_exact, sat16_widened

__all__ = [
    "Accumulate",
    "check_accumulator",
    "check_operands",
    "sat16_exact",
    "sat16_widened",
    "sat16_exact_max_x",
]

Accumulate = Literal["exact", "fbgemm_sat16", "onednn_sat16"]
_ACCUMULATES = ("exact", "fbgemm_sat16", "onednn_sat16")
_I32_MAX = 2**31 - 1


# --------------------------------------------------------------------------------------
# checks shared by linear and conv


def _concrete(v) -> bool:
    return isinstance(v, (np.ndarray, np.generic, jax.Array)) and not isinstance(v, jax.core.Tracer)


def check_accumulator(w: QArray, k: int, max_abs_x: int, name: str, *, what: str, hint: str):
    """Raise ``ValueError`` naming the layer if an int32 accumulator could overflow.

    Bound: ``K·max(max_abs_x·max|w - zp_w|, 128·max|w|) <= 2^31 - 1`` (the second term
    covers the uint8 -> int8 shifted operand), using the actual codes when ``w`` is
    concrete and the spec's bounds when it is traced. Returns whether every weight zero
    point is known to be 0 (so the ``zp_w`` correction terms can be dropped; never for a
    traced weight).

    >>> from qjax import QuantSpec, QParams
    >>> w = QArray(jnp.full((4, 2), 127, jnp.int8), QParams(0.1, 0, QuantSpec()))
    >>> check_accumulator(w, 4, 255, "fc", what="K=4", hint="split K")
    True
    """
    spec, vals, zp = w.spec, w.values, w.zero_point
    if _concrete(vals) and _concrete(zp):
        wn = np.asarray(vals, np.int64)
        zn = np.asarray(zp, np.int64).reshape(-1 if spec.granularity == "axis" else ())
        max_w = int(np.abs(wn).max(initial=0))
        max_wz = int(np.abs(wn - zn).max(initial=0))
        zp_zero = bool((zn == 0).all())
    else:
        max_w = max(-spec.qmin, spec.qmax)
        # traced zero points are unknown: a symmetric spec does not make them 0 (torch's
        # fused per-channel observer gives an all-negative channel zero point 127)
        zp_zero = False
        max_wz = spec.qmax - spec.qmin
    worst = k * max(max_abs_x * max_wz, 128 * max_w)
    if worst > _I32_MAX:
        raise ValueError(
            f"layer {name!r}: the int32 accumulator could overflow: {what} · "
            f"max(max|x - zp_x|={max_abs_x} · max|w - zp_w|={max_wz}, 128 · max|w|={max_w})"
            f" = {worst} > 2^31 - 1; {hint}"
        )
    return zp_zero


def check_operands(x, out_qparams, max_abs_x: int, accumulate, activation, layer: str) -> bool:
    """Validate what linear and conv layers share; return whether ``x`` is unsigned.

    Checks: ``out_qparams`` is a :class:`~qjax.QParams` (or ``None``, a float output,
    without an activation); ``accumulate`` and the fused
    ``activation`` are known; ``x`` holds int8/uint8 codes with per-tensor qparams whose
    code span fits the ``max_abs_x`` the layer's overflow check assumed; and
    ``"fbgemm_sat16"`` only with uint8 activations. Errors name the layer.

    >>> from qjax import QuantSpec, QParams
    >>> x = QArray(jnp.zeros((1, 2), jnp.uint8), QParams(0.1, 0, QuantSpec(signed=False)))
    >>> check_operands(x, x.qparams, 255, "exact", "relu", "fc")
    True
    """
    if out_qparams is None:
        if activation is not None:
            raise ValueError(
                f"layer {layer!r}: a float output (out_qparams=None) has no fused activation; "
                f"got activation={activation!r}"
            )
    elif not isinstance(out_qparams, QParams):
        raise TypeError(
            f"layer {layer!r}: out_qparams must be a QParams or None, got "
            f"{type(out_qparams).__name__}"
        )
    if accumulate not in _ACCUMULATES:
        raise ValueError(
            f"layer {layer!r}: accumulate must be one of {_ACCUMULATES}, got {accumulate!r}"
        )
    if activation not in (None, "relu", "relu6", "hardtanh"):
        raise ValueError(
            f"layer {layer!r}: unsupported fused activation {activation!r}; supported: "
            "None, 'relu', 'relu6', 'hardtanh'"
        )
    xs = x.spec
    if xs.dtype not in (np.dtype(np.int8), np.dtype(np.uint8)):
        raise TypeError(f"layer {layer!r}: activations must be int8 or uint8 codes, got {xs.dtype}")
    if xs.granularity != "tensor":
        raise ValueError(
            f"layer {layer!r}: activation qparams must be per-tensor, got axis={xs.axis}, "
            f"group_size={xs.group_size}"
        )
    if xs.qmax - xs.qmin > max_abs_x:
        raise ValueError(
            f"layer {layer!r}: activations span {xs.qmax - xs.qmin} codes but the layer was "
            f"checked for overflow with max_abs_x={max_abs_x}; prepare it with a larger "
            "max_abs_x"
        )
    if accumulate != "exact" and xs.signed:
        raise ValueError(
            f"layer {layer!r}: accumulate={accumulate!r} models a uint8 x int8 "
            f"vpmaddubsw kernel; got {xs.dtype} activations"
        )
    return not xs.signed


# --------------------------------------------------------------------------------------
# linear: (..., K) x (K, N)

# A one-row dot gets a zero row appended (sliced off again after the dot): XLA:CPU runs
# a one-row int8 dot (a matrix-vector product) on a slow generic path, a two-row one on
# its int8 GEMM (raw 1024x1024 dot: 1 row ~270 us, 2 rows ~130 us; MLP 784-1024-1024-10
# at batch 1: ~1.5-1.9x faster). Padding 2 or 3 rows up to 4 measured no better. The pad
# fuses into the pass that makes the int8 operand, the slice into the requantize
# epilogue; each row of ``acc`` is computed on its own, so the codes are unchanged.
_MIN_DOT_ROWS = 2


def _int8_dot(x: jax.Array, w: jax.Array) -> jax.Array:
    """``Σ_k x[..., k]·w[k, n]``: int8 x int8 -> int32 ``dot_general``, shaped for speed."""
    lead = x.shape[:-1]
    rows = math.prod(lead)
    if isinstance(rows, int) and 0 < rows < _MIN_DOT_ROWS:  # (symbolic: a saved program)
        x2 = jnp.pad(x.reshape(rows, x.shape[-1]), ((0, _MIN_DOT_ROWS - rows), (0, 0)))
        acc = lax.dot_general(x2, w, (((1,), (0,)), ((), ())), preferred_element_type=jnp.int32)
        return acc[:rows].reshape(lead + (w.shape[1],))
    return lax.dot_general(
        x, w, (((x.ndim - 1,), (0,)), ((), ())), preferred_element_type=jnp.int32
    )


def _u8_dot(x: jax.Array, w: jax.Array) -> jax.Array:
    """``Σ_k x[..., k]·w[k, n]`` of uint8 codes ``x`` and int8 ``w`` (int32, wrapping):
    :func:`_int8_dot` of ``x - 128`` (the top bit flipped) plus ``128·Σ_k w[k, n]``. The
    sat16 kernel's exact sums in XLA (what its exact calls run off CPU).

    >>> int(_u8_dot(jnp.array([[255, 200]], jnp.uint8), jnp.array([[-128], [127]], jnp.int8))[0, 0])
    -7240
    """
    return _from_u8(_int8_dot, x, w, w)


def _from_u8(int8_sums, x, w, wk, *args):
    """``int8_sums(x - 128, w, *args) + 128·Σ_k wk[k, n]``: the exact sums of uint8 codes
    ``x`` from XLA's int8 kernels (``wk`` the ``(K, N)`` view of ``w``)."""
    xs = lax.bitcast_convert_type(x ^ jnp.uint8(0x80), jnp.int8)  # x - 128
    return int8_sums(xs, w, *args) + jnp.int32(128) * jnp.sum(wk.astype(jnp.int32), axis=0)


def _sat16_pair_dot(x: jax.Array, w: jax.Array) -> jax.Array:
    """``Σ_j sat16(x[2j]·w[2j] + x[2j+1]·w[2j+1])`` over K, int32 (FBGEMM vpmaddubsw)."""
    k = x.shape[-1]
    xi = x.astype(jnp.int32)
    wi = w.astype(jnp.int32)
    if k % 2:
        xi = jnp.concatenate([xi, jnp.zeros(xi.shape[:-1] + (1,), jnp.int32)], axis=-1)
        wi = jnp.concatenate([wi, jnp.zeros((1,) + wi.shape[1:], jnp.int32)], axis=0)
    xe, xo = xi[..., 0::2, None], xi[..., 1::2, None]  # (..., K/2, 1)
    we, wo = wi[0::2], wi[1::2]  # (K/2, N)
    pair = jnp.clip(xe * we + xo * wo, -(2**15), 2**15 - 1)
    return jnp.sum(pair, axis=-2)


_I16_MAX = 2**15 - 1


def sat16_exact_max_x(w) -> int:
    """The largest uint8 activation code ``h`` for which ``vpmaddubsw``'s int16 pair sums
    of the weight ``w`` cannot saturate: with every ``x`` in ``[0, h]`` and the pairs
    ``(w[2j, n], w[2j+1, n])`` along K (axis 0; an odd K's last row pairs with 0),

    ``h·(w⁺[2j, n] + w⁺[2j+1, n]) <= 2^15 - 1`` and ``h·(w⁻[2j, n] + w⁻[2j+1, n]) <= 2^15``

    (``w⁺ = max(w, 0)``, ``w⁻ = max(-w, 0)``): each pair sum lies in
    ``[-h·(w⁻_a + w⁻_b), h·(w⁺_a + w⁺_b)]``. Then the saturating kernel
    (:func:`qjax.kernels._native.sat16_dot`) gives the exact ``Σ x·w``. ``w``: int8
    ``(K, ...)`` codes, concrete (NumPy or a JAX array); a traced weight gets
    :data:`SAT16_SAFE_X` = 128, which holds for any int8 weight (``128·254 <= 32767``,
    ``128·256 = 32768``). Returns an ``int`` in ``[128, 255]``.

    >>> sat16_exact_max_x(np.array([[127], [127]], np.int8))  # 129·254 = 32766
    129
    >>> sat16_exact_max_x(np.array([[-128], [-128]], np.int8))
    128
    >>> sat16_exact_max_x(np.array([[64], [-64], [60], [0]], np.int8))  # 255·64 fits
    255
    """
    if not _concrete(w):
        return SAT16_SAFE_X
    wn = np.asarray(w, np.int64)
    if wn.shape[0] % 2:
        wn = np.concatenate([wn, np.zeros((1,) + wn.shape[1:], np.int64)], axis=0)
    pos, neg = np.maximum(wn, 0), np.maximum(-wn, 0)
    up = int((pos[0::2] + pos[1::2]).max(initial=0))
    down = int((neg[0::2] + neg[1::2]).max(initial=0))
    h = 255
    if up:
        h = min(h, _I16_MAX // up)
    if down:
        h = min(h, (_I16_MAX + 1) // down)
    return h


# --------------------------------------------------------------------------------------
# conv: (N, *spatial, C) x HWIO, channels-last, input already padded


def sat16_conv_max_x(w) -> int:
    """:func:`sat16_exact_max_x` of a conv weight (``HWIO`` / ``WIO`` int8 codes) for both
    pairings its exact sums may run in: FBGEMM's along the im2col K (tap-major,
    channel-minor; pairs cross taps for odd ``C``) and per tap with the channels
    zero-padded to a multiple of 4 (the fused conv's, :func:`fused_sat16_conv`).

    >>> w = np.zeros((1, 3, 1, 1), np.int8)  # 1x3 taps, one channel, one output
    >>> w[0, :2] = 127  # taps 0 and 1: a pair in FBGEMM's order (per tap: each with a 0)
    >>> sat16_conv_max_x(w), sat16_conv_max_x(w[:, ::2])  # 129 * 254 <= 32767
    (129, 255)
    """
    if not _concrete(w):
        return SAT16_SAFE_X
    o = w.shape[-1]
    return min(sat16_exact_max_x(np.reshape(v, (-1, o))) for v in (w, _pad_channels4(w)))


def _int8_conv(xv, w, stride, dilation, groups):
    """``Σ x·w`` over each window: ``(N, *sp, C)`` x HWIO int8 -> int32, ``VALID``."""
    sp = "HW" if xv.ndim == 4 else "W"
    return lax.conv_general_dilated(
        xv,
        w,
        window_strides=stride,
        padding="VALID",
        rhs_dilation=dilation,
        dimension_numbers=("N" + sp + "C", sp + "IO", "N" + sp + "C"),
        feature_group_count=groups,
        preferred_element_type=jnp.int32,
    )


def _sat16_conv(xv, w, stride, dilation, groups, per_tap=False, native=False):
    """FBGEMM im2col + ``vpmaddubsw``: ``Σ_j sat16(x[2j]·w[2j] + x[2j+1]·w[2j+1])``.

    ``xv`` raw (padded) uint8 ``(N, *sp, C)``, ``w`` HWIO int8; the reduction index runs
    over (kernel taps row-major, channel in group) (:func:`im2col_patches`). ``per_tap``
    (oneDNN): each tap's channels padded with zeros to an even count first, so no pair
    spans two taps. ``native``: the same im2col patches (uint8) go to the native kernel
    (:func:`qjax.kernels._native.sat16_dot`), one call for all groups; the same integers.
    Returns int32 ``(N, *out, C_out)``.
    """
    p, wk = im2col_patches(xv if native else xv.astype(jnp.int32), w, stride, dilation, groups,
                           per_tap)  # fmt: skip
    groups, k, og = wk.shape
    if native:
        lead = p.shape[:-2]
        pg = jnp.moveaxis(p.reshape((-1, groups, k)), 1, 0)  # (G, M, K)
        acc = _native.sat16_dot(pg, _native.pack_sat16_weight(wk), wk, _batched_pair_dot)
        return jnp.moveaxis(acc, 0, 1).reshape(lead + (groups * og,))  # (M, G, Og) -> (N, *out, O)
    wk = wk.astype(jnp.int32)
    if k % 2:
        p = jnp.concatenate([p, jnp.zeros(p.shape[:-1] + (1,), jnp.int32)], axis=-1)
        wk = jnp.concatenate([wk, jnp.zeros((groups, 1, og), jnp.int32)], axis=1)
    xe, xo = p[..., 0::2, None], p[..., 1::2, None]  # (N, *out, G, K/2, 1)
    pair = jnp.clip(xe * wk[:, 0::2] + xo * wk[:, 1::2], -(2**15), 2**15 - 1)
    acc = jnp.sum(pair, axis=-2)  # (N, *out, G, Og)
    return acc.reshape(acc.shape[:-2] + (groups * og,))


def im2col_patches(xv, w, stride, dilation, groups, per_tap=False):
    """FBGEMM's im2col: ``(patches, weight)`` with ``patches[n, *o, g, k] =
    x[n, o·stride + t·dilation, g·Cg + c]`` and ``weight[g, k, j] = w[t, c, g·Og + j]``
    for ``k = t·Cg + c`` (taps ``t`` row-major, then the channel in the group), so
    ``Σ_k patches·weight`` is the ``VALID`` conv. ``per_tap``: each tap's ``Cg`` padded
    with a zero channel to an even count (oneDNN's pairs, never across taps).

    ``xv`` ``(N, *sp, C)`` (any dtype, kept), ``w`` HWIO (or ``WIO``); returns
    ``(N, *out, G, K)`` and ``(G, K, Og)``.

    >>> x = jnp.arange(6, dtype=jnp.uint8).reshape(1, 3, 2)  # (N, W, C)
    >>> p, wk = im2col_patches(x, jnp.ones((2, 2, 1), jnp.int8), (1,), (1,), 1)
    >>> p[0, :, 0], wk.shape  # k = (tap 0: c0 c1, tap 1: c0 c1)
    (Array([[0, 1, 2, 3],
           [2, 3, 4, 5]], dtype=uint8), (1, 4, 1))
    """
    nsp = xv.ndim - 2
    kernel = w.shape[:nsp]
    out_sizes = [
        (xv.shape[1 + i] - (kernel[i] - 1) * dilation[i] - 1) // stride[i] + 1 for i in range(nsp)
    ]
    taps = []
    for t in np.ndindex(*kernel):
        idx = [slice(None)]
        for i in range(nsp):
            start = t[i] * dilation[i]
            idx.append(slice(start, start + (out_sizes[i] - 1) * stride[i] + 1, stride[i]))
        idx.append(slice(None))
        taps.append(xv[tuple(idx)])  # (N, *out, C)
    p = jnp.stack(taps, axis=-2)  # (N, *out, T, C)
    n_t, c, o = p.shape[-2], p.shape[-1], w.shape[-1]
    cg = c // groups
    p = p.reshape(p.shape[:-1] + (groups, cg))  # (N, *out, T, G, Cg)
    p = jnp.moveaxis(p, -2, -3)  # (N, *out, G, T, Cg)
    wk = w.reshape(n_t, cg, groups, o // groups)
    if per_tap and cg % 2:
        p = jnp.pad(p, [(0, 0)] * (p.ndim - 1) + [(0, 1)])
        wk = jnp.pad(wk, ((0, 0), (0, 1), (0, 0), (0, 0)))
        cg += 1
    k = n_t * cg
    p = p.reshape(p.shape[:-2] + (k,))  # (N, *out, G, K)
    return p, jnp.moveaxis(wk, 2, 0).reshape(groups, k, o // groups)


def fused_sat16_conv(xv, zx, x, pw, bias, out, scheme, relu, stride, dilation, pads,
                     accumulate):  # fmt: skip
    """Output codes (channels-last) of a saturating conv with one group in one fused
    native sat16 call: :func:`_sat16_conv`'s sums (FBGEMM's pairs; oneDNN's,
    :func:`_onednn_sat16_conv`, with its zero-point term over the valid taps; for
    ``accumulate="exact"`` the exact sums: the saturating instructions where the
    weight's ``sat16_max_x`` says no pair can saturate, else the kernel's widened exact
    products), the zero-point term, the requantization, the same codes as the
    unfused layer. With ``C % 4 == 0`` the kernel reads the patches in place
    (:func:`qjax.kernels._native.fused_sat16_conv_codes`; a 1-D conv as height 1), and
    for oneDNN's pairs (never across taps) and exact sums with the channels padded with
    zeros to a multiple of 4; FBGEMM's pairs with other ``C``: XLA builds the patches
    (:func:`im2col_patches`).

    ``xv`` the raw uint8 codes ``(N, *sp, C)`` padded by ``pads`` (``((lo, hi), ...)``
    per spatial dim) with ``zx``, with zeros for ``"onednn_sat16"``; ``x`` the input
    :class:`~qjax.QArray`; ``pw`` a ``kernel="sat16"`` :class:`~qjax.kernels.PreparedConv` for which
    :func:`~qjax.kernels._native.fusable` said yes.
    """
    w = pw.weight.values
    c = xv.shape[-1]
    # exact sums the pair-sum bound does not cover (8-bit codes): the kernel's widened
    # exact products
    wide = sat16_widened(x.spec, pw.sat16_max_x, accumulate)
    if c % 4 and accumulate != "fbgemm_sat16":
        # oneDNN pairs channels within a tap, an odd count with a zero: zero channels up
        # to a multiple of 4 give the same pairs (and zero ones), so the kernel reads it;
        # exact sums (no pair can saturate) are the same in any pairing
        xv, w = jnp.pad(xv, [(0, 0)] * (xv.ndim - 1) + [(0, -c % 4)]), _pad_channels4(w)
    elif c % 4:
        p = im2col_patches(xv, w, stride, dilation, 1)[0][..., 0, :]
        return _native.fused_sat16_patches_codes(
            p, x, pw, bias, out, scheme, relu, _sat16_pair_dot
        )  # fmt: skip
    one_d = w.ndim == 3
    if one_d:  # (N, W, C) as (N, 1, W, C)
        xv, w = xv[:, None], w[None]
        stride, dilation, pads = (1, *stride), (1, *dilation), ((0, 0), *pads)
    if accumulate == "onednn_sat16":
        (pt, pb), (pl, pr) = pads
        h, wd = xv.shape[1] - pt - pb, xv.shape[2] - pl - pr
        border = (zx, (pt, pl, h, wd))

        def sums(xk, wk):  # oneDNN's (valid taps), the kernel's ivec term added back
            xu = xk[:, pt : pt + h, pl : pl + wd]
            acc = _onednn_sat16_conv(xu, wk.reshape(w.shape), zx, pads, stride, dilation, 1)
            return acc + zx * pw.w_sum
    else:
        border = None

        def sums(xk, wk):
            if wide:
                return _from_u8(_int8_conv, xk, wk.reshape(w.shape), wk, stride, dilation, 1)
            return _sat16_conv(xk, wk.reshape(w.shape), stride, dilation, 1)

    codes = _native.fused_sat16_conv_codes(
        xv, w, x, pw, bias, out, scheme, relu, stride, dilation, sums, border, exact=wide
    )
    return codes[:, 0] if one_d else codes


def sat16_conv_pack(w: jax.Array, groups: int) -> jax.Array | None:
    """A ``kernel="sat16"`` conv weight packed once, at prepare time, for the fused call
    that reads the patches in place (:func:`fused_sat16_conv`): the int8 HWIO (or WIO)
    ``w`` with its channels padded with zeros to ``C4`` (a multiple of 4), as the
    ``(kh·kw·C4, O)`` im2col weight (``k = tap·C4 + c``) in
    :func:`~qjax.kernels._native.pack_sat16_weight`'s order. The one pack serves every
    pairing the fused call runs: FBGEMM's when ``C % 4 == 0`` (no pad), oneDNN's per tap
    and exact sums for any ``C``. ``None`` with groups (those convs pack per call).

    >>> sat16_conv_pack(jnp.ones((3, 3, 2, 5), jnp.int8), 1).shape  # K = 9 taps · 4
    (1, 1, 9, 64)
    """
    if groups != 1:
        return None
    return _native.pack_sat16_weight(_pad_channels4(w).reshape(-1, w.shape[-1]))


def _pad_channels4(w: jax.Array) -> jax.Array:
    """HWIO / WIO ``w`` with zero input channels up to a multiple of 4."""
    return jnp.pad(w, [(0, 0)] * (w.ndim - 2) + [(0, -w.shape[-2] % 4), (0, 0)])


def _batched_pair_dot(x, w):
    """:func:`_sat16_pair_dot` per group: ``(G, M, K)`` x ``(G, K, N)``."""
    return jax.vmap(_sat16_pair_dot)(x, w)


def _onednn_sat16_conv(x, w, zx, pads, stride, dilation, groups, native=False):
    """oneDNN's ``vpmaddubsw`` conv: per-tap pairs, padding taps skipped, ``zp_x`` folded in.

    ``x`` raw uint8 ``(N, *sp, C)`` before padding, ``w`` HWIO int8, ``zx`` the int32
    input zero point. oneDNN skips the padding taps: the products run over a zero-padded
    input (:func:`_sat16_conv` with ``per_tap``) and the zero-point term
    ``zp_x·Σ_c w[t, c, o]`` over the valid taps of each output position only. Returns
    int32 ``(N, *out, C_out)``, the zero-point term included.
    """
    nsp = x.ndim - 2
    pad_cfg = [(0, 0, 0)] + [(lo, hi, 0) for lo, hi in pads] + [(0, 0, 0)]
    xz = lax.pad(x, jnp.zeros((), x.dtype), pad_cfg)
    acc = _sat16_conv(xz, w, stride, dilation, groups, per_tap=True, native=native)
    valid = _valid_taps(x.shape[1:-1], pads, w.shape[:nsp], stride, dilation)  # (*out, T) 0/1
    w_tap = jnp.sum(w.astype(jnp.int32), axis=-2).reshape(valid.shape[-1], w.shape[-1])
    return acc - zx * jnp.einsum("...t,to->...o", jnp.asarray(valid), w_tap)


def _valid_taps(in_sizes, pads, kernel, stride, dilation) -> np.ndarray:
    """int32 ``(*out, T)``: 1 where kernel tap ``t`` of output position ``p`` reads the
    input, 0 where it reads padding (static shapes, so plain NumPy)."""
    axes = []
    for n, (lo, hi), k, s, d in zip(in_sizes, pads, kernel, stride, dilation, strict=True):
        out = (n + lo + hi - (k - 1) * d - 1) // s + 1
        pos = np.arange(out)[:, None] * s + np.arange(k)[None, :] * d - lo  # (out, k)
        axes.append(((pos >= 0) & (pos < n)).astype(np.int32))
    m = axes[0]
    for a in axes[1:]:  # outer product over the spatial axes, taps row-major
        m = (m[:, None, :, None] * a[None, :, None, :]).reshape(
            m.shape[:-1] + a.shape[:-1] + (m.shape[-1] * a.shape[-1],)
        )
    return m
