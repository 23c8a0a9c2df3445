"""Integer convolution (1-D and 2-D): int8 x int8 -> int32 ``conv_general_dilated``.

Accumulator rule (the same as :mod:`qjax.kernels._linear`): for output channel ``o`` in
group ``g`` and output position ``p``,
``acc[o, p] = Σ_{t, c} (x[g·Cg + c, p·stride + t·dilation - pad] - zp_x)·(w[o, c, t] - zp_w[o])``
over the kernel taps ``t`` and the ``Cg = C_in/groups`` input channels of the group,
exact in int32; positions in the padding hold the real value 0, i.e. the code ``zp_x``, so
they contribute nothing. Then :func:`~qjax.kernels.requantize` with the chosen scheme.

How ``acc`` is computed (``accumulate="exact"``, the default):

* the input is padded explicitly with its zero point (the real value 0), then the
  convolution itself is ``VALID``;
* unsigned (uint8) activations are shifted to int8 exactly, as for the linear layer:
  ``x' = x - 128`` (``x ^ 0x80``), ``zp_x' = zp_x - 128``; uint8 never reaches XLA's
  conv, and padding with ``zp_x`` before the shift pads ``x'`` with ``zp_x'``;
* ``lax.conv_general_dilated(x', w, preferred_element_type=int32)`` gives ``Σ x'w`` (a
  pointwise 1x1 conv with ``groups=1`` is an int8 ``dot_general`` over the channels,
  on the strided input, which XLA:CPU runs faster); the
  zero points are folded in afterwards:
  ``acc = Σ x'w - zp_x'·Σw[o] - zp_w[o]·Σ_window x' + K·zp_x'·zp_w[o]`` with
  ``K = Cg·Π kernel``, ``Σw[o]`` precomputed by :func:`prepare_conv` and the window sums
  ``Σ_window x'`` (per group, per output position) from an integer ``reduce_window``,
  left out of the program when the weight zero points are known to be 0. int32
  arithmetic wraps modulo ``2^32``, so the result is exact whenever ``acc`` itself fits.

``accumulate="fbgemm_sat16"`` reproduces FBGEMM's int16 pair saturation (NUMERICS.md rule
14): with raw uint8 codes (padding = ``zp_x``) and the reduction index in FBGEMM's im2col
order ``k = (t, c)`` (kernel taps row-major, then the channel inside the group),
``acc = Σ_j sat16(x[2j]·w[2j] + x[2j+1]·w[2j+1]) - zp_x·Σw`` (plus the ``zp_w`` terms).
For a depthwise 3x3 convolution (``Cg = 1``) that is FBGEMM's tap pairing
(0,1),(2,3),(4,5),(6,7),(8). FBGEMM's direct depthwise 3x3 kernel saturates this way even on
AVX512-VNNI CPUs: torch's fbgemm engine took it in the tests for C in {8, 16}, padding 1,
stride 1-2, channel multiplier 1-2 (0 mismatches with ``"fbgemm_sat16"`` there);
depthwise convs with other channel counts or 5x5 kernels accumulated exactly on VNNI.

``accumulate="onednn_sat16"`` is oneDNN's ``vpmaddubsw`` path (CPUs without VNNI): the
pairs run over the channels of one kernel tap, never across taps, i.e. the channels of a
group are padded with zeros to an even count and then paired as above. With an even
``Cg`` it is the same sum as ``"fbgemm_sat16"``. Which engine takes which path at which
CPU level is the table in :mod:`qjax.kernels._levels`.

Layouts: activations ``"NCHW"`` (torch; ``"NCW"`` in 1-D) or ``"NHWC"`` (``"NWC"``);
weights are given as ``"OIHW"`` (torch, ``(C_out, C_in/groups, kh, kw)``) or ``"HWIO"``
(Flax) to :func:`prepare_conv` and stored as ``HWIO`` with per-channel qparams along the
last axis. The output has the activations' layout. The convolution itself always runs
channels-last (``N...C`` x ``HWIO``): XLA:CPU's int8 conv is fast there and about 40x
slower channels-first (measured), so NCHW codes are transposed in and out.

Overflow: as for the linear layer, ``K·max|x - zp_x|·max|w - zp_w|`` and ``K·128·max|w|``
must stay below ``2^31``; :func:`prepare_conv` checks it and raises with the layer name.

Kernel. ``prepare_conv(w, kernel="amx")`` (opt-in, AMX-INT8 CPUs; 2-D, ``groups=1``)
packs the weight once and ``accumulate="exact"`` then computes ``Σ x'w`` with the native
implicit-GEMM kernel (:func:`qjax.kernels._native.amx_conv2d`) on the same padded,
shifted NHWC input; dilation other than 1 is refused at call time. With ``"fbgemm"`` /
``"qnnpack"`` and weight zero points known to be 0, one fused call
(``qjax_amx_q8_conv2d``) reads the padded raw codes (uint8 through ``tdpbusd``) and
applies the zero-point term and the requantize epilogue per tile: the same codes.
``jax.export`` as for the linear layer. ``kernel="sat16"``: exact sums of uint8 codes as
for the linear layer (saturating instructions within ``sat16_max_x``, else exact mode).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from .._qarray import QArray
from .._spec import QParams
from . import _native
from ._accumulate import (
    _I32_MAX,
    Accumulate,
    _int8_conv,
    _onednn_sat16_conv,
    _sat16_conv,
    check_accumulator,
    check_operands,
    fused_sat16_conv,
    sat16_conv_max_x,
    sat16_conv_pack,
    sat16_exact,
)
from ._native._quantize import pad_native as _pad_native
from ._native._quantize import quantize_status as _quantize_status
from ._prepared import SAT16_SAFE_X, Kernel, register_prepared
from ._requant import Scheme, clamp_activation, dequantize_accumulator, requantize

__all__ = ["ConvActivation", "PreparedConv", "prepare_conv", "quantized_conv"]

ConvActivation = Literal["relu", "relu6", "hardtanh"] | None
_WEIGHT_LAYOUTS = {"OIHW": (2, True), "HWIO": (2, False), "OIW": (1, True), "WIO": (1, False)}
_X_LAYOUTS = {"NCHW": (2, True), "NHWC": (2, False), "NCW": (1, True), "NWC": (1, False)}


@register_prepared(
    leaves=("weight", "w_sum"),
    static=("name", "groups", "max_abs_x", "zero_point_is_zero"),
    packed_when=lambda kernel: kernel != "xla",  # amx, onednn and sat16 pack
    serialized_name="qjax.kernels.PreparedConv",
)
@dataclasses.dataclass(frozen=True)
class PreparedConv:
    """Weights of an integer convolution, prepared once by :func:`prepare_conv`.

    Leaves: ``weight`` (a :class:`~qjax.QArray`, int8, ``HWIO`` = ``(*kernel, C_in/groups,
    C_out)``, per-channel qparams on the last axis) and ``w_sum`` (int32 ``(C_out,)``,
    ``Σ_{t,c} w[t, c, o]`` of the raw codes). Static: ``name``, ``groups``, ``max_abs_x``
    (the largest ``|x - zp_x|`` the overflow check allowed for) and ``zero_point_is_zero``.
    With ``kernel="amx"`` a third leaf ``packed`` holds the weight in AMX tile order
    (:func:`qjax.kernels._native.pack_conv_weight`); ``kernel="sat16"``: the pack the
    fused call reads (:func:`~qjax.kernels._accumulate.sat16_conv_pack`, ``None`` with
    groups) and a static ``sat16_max_x``, the largest uint8 code for which its pair sums
    cannot saturate (:func:`~qjax.kernels._accumulate.sat16_conv_max_x`, both pairings).
    """

    weight: QArray
    w_sum: jax.Array
    name: str = "conv"
    groups: int = 1
    max_abs_x: int = 255
    zero_point_is_zero: bool = False
    packed: jax.Array | None = None
    kernel: str = "xla"
    epilogue: tuple | None = None  # folded requantization (fold_requant), with its key
    folded: tuple | None = None
    sat16_max_x: int = 128  # kernel "sat16": its pair sums are exact for codes up to this

    @property
    def kernel_size(self) -> tuple[int, ...]:
        return tuple(self.weight.shape[:-2])

    @property
    def in_channels(self) -> int:
        return self.weight.shape[-2] * self.groups

    @property
    def out_channels(self) -> int:
        return self.weight.shape[-1]


def prepare_conv(
    w: QArray,
    *,
    name: str = "conv",
    groups: int = 1,
    weight_layout: str = "OIHW",
    max_abs_x: int = 255,
    kernel: Kernel = "xla",
) -> PreparedConv:
    """Check an int8 conv weight once: flip it to ``HWIO``, precompute ``Σw`` per channel.

    ``w_sum[o] = Σ_{t,c} w[t, c, o]`` (raw codes, int32). Checks: int8 codes, rank 3 or 4,
    qparams per-tensor or per output channel, the :class:`~qjax.QArray` invariants, and
    that the int32 accumulator cannot overflow: ``K·max_abs_x·max|w - zp_w| <= 2^31 - 1``
    and ``K·128·max|w| <= 2^31 - 1`` with ``K = (C_in/groups)·Π kernel`` (actual codes
    when ``w`` is concrete, the spec's bounds when traced).

    Args:
      w: the weight: ``(C_out, C_in/groups, *kernel)`` for ``weight_layout="OIHW"``
        (torch; ``"OIW"`` in 1-D) or ``(*kernel, C_in/groups, C_out)`` for ``"HWIO"``
        (``"WIO"``); per-channel qparams along the ``O`` axis.
      name: layer name for error messages.
      groups: feature groups (``C_in`` for a depthwise conv).
      weight_layout: ``"OIHW"``, ``"HWIO"``, ``"OIW"`` or ``"WIO"``.
      max_abs_x: the largest ``|x - zp_x|`` inputs may have (255: any 8-bit activation).
      kernel: ``"xla"`` (default), ``"amx"`` (native AMX implicit GEMM, 2-D kernels
        with ``groups=1``; raises ``RuntimeError`` with the reason when unavailable, see
        :func:`qjax.kernels.native_status`) or ``"sat16"`` (the native sat16 GEMM on XLA's
        im2col patches for ``accumulate="fbgemm_sat16"``/``"onednn_sat16"``, any groups,
        dilation and 1-D/2-D; with one group, zero weight zero points and per-tensor
        8-bit output qparams one fused call on the weight packed here, reading the patches
        in place (FBGEMM's pairs: ``C % 4 == 0``); exact sums of uint8 codes: there, or
        unfused within ``sat16_max_x``, else XLA; :func:`qjax.kernels.sat16_status`).

    Returns:
      a :class:`PreparedConv` (a pytree).

    >>> from qjax import QuantSpec, QParams
    >>> w = QArray(jnp.array([[[1, 2, 3]], [[-1, 0, 4]]], jnp.int8),   # (O=2, I=1, 3)
    ...            QParams(jnp.array([0.1, 0.2]), jnp.array([0, 0]),
    ...                    QuantSpec(symmetric=True, axis=0)))
    >>> p = prepare_conv(w, weight_layout="OIW")
    >>> p.weight.shape, p.w_sum
    ((3, 1, 2), Array([6, 3], dtype=int32))
    >>> big = QArray(jnp.full((4, 9000, 3, 3), 127, jnp.int8),
    ...              QParams(0.1, 0, QuantSpec(symmetric=True)))
    >>> prepare_conv(big, name="stem")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
      ...
    ValueError: layer 'stem': the int32 accumulator could overflow: K=81000 ...
    """
    if kernel not in ("xla", "amx", "sat16", "onednn"):
        raise ValueError(
            f"layer {name!r}: kernel must be one of ('xla', 'amx', 'sat16', 'onednn'), "
            f"got {kernel!r}"
        )
    if isinstance(w, PreparedConv):
        if kernel != "xla" and w.kernel != kernel:  # stored HWIO, O last
            layout = "HWIO" if len(w.kernel_size) == 2 else "WIO"
            return prepare_conv(
                w.weight,
                name=w.name,
                groups=w.groups,
                weight_layout=layout,
                max_abs_x=w.max_abs_x,
                kernel=kernel,
            )
        return w
    if not isinstance(w, QArray):
        raise TypeError(f"layer {name!r}: weight must be a QArray, got {type(w).__name__}")
    if kernel == "amx":
        _native.require_amx(name)
    elif kernel == "sat16":
        _native.require_sat16(name)
    elif kernel == "onednn":
        _native.require_onednn(name)
        if not _native.onednn_fused():
            raise RuntimeError(
                f"layer {name!r}: kernel='onednn' convolutions run on oneDNN's brgemm ukernel "
                f"(torch's CPU wheel), but the provider here is {_native.onednn_provider()!r}; "
                "use kernel='xla'"
            )
    if weight_layout not in _WEIGHT_LAYOUTS:
        raise ValueError(
            f"layer {name!r}: weight_layout must be one of {sorted(_WEIGHT_LAYOUTS)}, "
            f"got {weight_layout!r}"
        )
    nsp, o_first = _WEIGHT_LAYOUTS[weight_layout]
    spec = w.spec
    if spec.dtype != np.int8:
        raise TypeError(
            f"layer {name!r}: integer conv needs int8 weights, got {spec.dtype} "
            f"({spec.bits}-bit {'signed' if spec.signed else 'unsigned'} spec)"
        )
    if w.ndim != nsp + 2:
        raise ValueError(
            f"layer {name!r}: a {weight_layout} weight must have rank {nsp + 2}, "
            f"got shape {w.shape}"
        )
    o_axis = 0 if o_first else nsp + 1
    if spec.granularity == "group" or (
        spec.granularity == "axis" and spec.normalized_axes(w.ndim) != (o_axis,)
    ):
        raise ValueError(
            f"layer {name!r}: weight qparams must be per-tensor or per output channel "
            f"(axis={o_axis} of the {weight_layout} weight), got axis={spec.axis}, "
            f"group_size={spec.group_size}"
        )
    w.validate()
    if not isinstance(groups, (int, np.integer)) or groups < 1:
        raise ValueError(f"layer {name!r}: groups must be a positive integer, got {groups!r}")
    groups = int(groups)
    vals = w.values
    if o_first:  # (O, I, *k) -> (*k, I, O)
        vals = jnp.transpose(vals, tuple(range(2, nsp + 2)) + (1, 0))
    c_out = vals.shape[-1]
    if c_out % groups:
        raise ValueError(f"layer {name!r}: C_out={c_out} is not divisible by groups={groups}")
    new_spec = spec.replace(axis=nsp + 1) if spec.granularity == "axis" else spec
    wq = QArray(vals, QParams(w.scale, w.zero_point, new_spec))
    k = int(np.prod(vals.shape[:-1]))
    zp_zero = check_accumulator(
        wq,
        k,
        max_abs_x,
        name,
        what=f"K={k} (C_in/groups · kernel {tuple(vals.shape[:-2])})",
        hint="split the input channels or narrow the ranges",
    )
    w_sum = jnp.sum(vals.astype(jnp.int32), axis=tuple(range(nsp + 1)))
    packed, sat_x = None, SAT16_SAFE_X
    if kernel == "amx":
        if not _native.conv_supported(nsp, groups):
            raise ValueError(
                f"layer {name!r}: kernel='amx' supports 2-D convolutions with groups=1, got "
                f"a {nsp}-D kernel with groups={groups}; use kernel='xla'"
            )
        packed = _native.pack_conv_weight(vals)
    elif kernel == "onednn":
        if k * 255 * 128 > _I32_MAX:
            raise ValueError(
                f"layer {name!r}: kernel='onednn' sums uint8 codes up to 255, K={k} · 255 · 128 "
                "> 2^31 - 1 could overflow the int32 accumulator; use kernel='xla'"
            )
        packed = _native.pack_onednn_conv_weight(
            vals.reshape((1,) * (2 - nsp) + vals.shape), groups
        )
    elif kernel == "sat16":
        packed, sat_x = sat16_conv_pack(vals, groups), sat16_conv_max_x(vals)
    return PreparedConv(
        wq, w_sum, name, groups, int(max_abs_x), zp_zero, packed, kernel, sat16_max_x=sat_x
    )


def _pad(xv, value, pads, native: bool):
    """``xv`` (N, *spatial, C) padded with the code ``value``; ``native``: for a native
    conv kernel (not ``jax.export``-able anyway), one native call where it runs (XLA's
    pad fusion measured 4x slower, :mod:`qjax.kernels._native._quantize`)."""
    if not any(p for pp in pads for p in pp):
        return xv
    cfg = [(0, 0, 0)] + [(lo, hi, 0) for lo, hi in pads] + [(0, 0, 0)]
    if not (native and xv.ndim in (3, 4) and _quantize_status()[0]):
        return lax.pad(xv, value, cfg)
    if xv.ndim == 3:  # a 1-D conv's (N, W, C) as H = 1
        return _pad(xv[:, None], value, ((0, 0), *pads), native)[:, 0]
    return _pad_native(xv, value, pads, lambda x, v: lax.pad(x, v, cfg))


def _onednn_2d(f, xv, stride, dilation):
    """``f(xv, stride, dilation)`` of a 2-D NHWC conv, a 1-D ``NWC`` one as ``H = 1``."""
    if xv.ndim == 4:
        return f(xv, stride, dilation)
    return f(xv[:, None], (1,) + stride, (1,) + dilation)[:, 0]


def _tuple(v, n: int, what: str, layer: str) -> tuple[int, ...]:
    if isinstance(v, (int, np.integer)):
        return (int(v),) * n
    t = tuple(int(a) for a in v)
    if len(t) != n:
        raise ValueError(f"layer {layer!r}: {what} needs {n} values, got {v!r}")
    return t


def _pads(padding, n, kernel, stride, dilation, in_sizes, layer) -> tuple[tuple[int, int], ...]:
    if isinstance(padding, str):
        p = padding.upper()
        if p not in ("VALID", "SAME"):
            raise ValueError(
                f"layer {layer!r}: padding must be VALID, SAME or ints, got {padding!r}"
            )
        eff = [(kk - 1) * d + 1 for kk, d in zip(kernel, dilation, strict=True)]
        return tuple(lax.padtype_to_pads(in_sizes, eff, stride, p))
    if isinstance(padding, (int, np.integer)):
        return ((int(padding), int(padding)),) * n
    pads = []
    for p in padding:
        if isinstance(p, (int, np.integer)):
            pads.append((int(p), int(p)))
        else:
            lo, hi = p
            pads.append((int(lo), int(hi)))
    if len(pads) != n:
        raise ValueError(f"layer {layer!r}: padding needs {n} entries, got {padding!r}")
    return tuple(pads)


def quantized_conv(
    x: QArray,
    w: PreparedConv | QArray,
    bias: jax.Array | None,
    out_qparams: QParams,
    *,
    stride: int | Sequence[int] = 1,
    padding: int | str | Sequence = 0,
    dilation: int | Sequence[int] = 1,
    groups: int | None = None,
    layout: str = "NCHW",
    scheme: Scheme = "fbgemm",
    activation: ConvActivation = None,
    bounds: tuple[float, float] | None = None,
    accumulate: Accumulate = "exact",
    name: str | None = None,
) -> QArray:
    """Integer ``y = requant(conv(x, w) + b)``: int8 x int8 -> int32 conv, then ``scheme``.

    ``acc[n, o, p] = Σ_{t,c} (x[n, g·Cg + c, p·s + t·d - pad] - zp_x)·(w[t, c, o] - zp_w[o])``
    with the padding holding ``zp_x`` (the real value 0), exact in int32 (module
    docstring); bias and rounding follow ``scheme`` (:data:`~qjax.kernels.SCHEMES`).
    ``activation``: ``"relu"`` clamps the codes below at ``zp_out``; ``"relu6"`` and
    ``"hardtanh"`` (``bounds=(min, max)``, real values) clamp them to
    ``[q(min), q(max)]`` with ``q`` torch's ``quantize_per_tensor`` (rule 1), as torch's
    quantized ``relu6``/``hardtanh`` applied to the conv output do.

    Args:
      x: activations ``(N, C_in, *spatial)`` (``layout="NCHW"``/``"NCW"``) or
        ``(N, *spatial, C_in)`` (``"NHWC"``/``"NWC"``), int8 or uint8, per-tensor qparams.
      w: a :class:`PreparedConv` (preferred) or an int8 ``OIHW`` :class:`~qjax.QArray`.
      bias: float32 ``(C_out,)`` or ``None``.
      out_qparams: per-tensor output qparams (their spec sets the output dtype).
        ``None``: no output quantizer, the float32 output
        :func:`~qjax.kernels.dequantize_accumulator` ``f32(acc)·f32(s_x·s_w) + b``.
      stride, dilation: int or one per spatial dim.
      padding: int, one int per spatial dim, ``(lo, hi)`` pairs, ``"VALID"`` or ``"SAME"``.
      groups: must equal the prepared weight's (``None``: take it from there).
      layout: ``"NCHW"``, ``"NHWC"``, ``"NCW"`` or ``"NWC"`` (the 2-D names work in 1-D).
      scheme: a key of :data:`~qjax.kernels.SCHEMES`.
      activation: ``None``, ``"relu"``, ``"relu6"`` or ``"hardtanh"``.
      bounds: ``(min, max)`` for ``"hardtanh"``.
      accumulate: ``"exact"``, ``"fbgemm_sat16"`` or ``"onednn_sat16"`` (uint8
        activations only).
      name: layer name for errors (defaults to the prepared weight's).

    Returns:
      a :class:`~qjax.QArray` in ``layout`` with ``out_qparams``.

    >>> from qjax import QuantSpec, QParams
    >>> x = QArray(jnp.array([[[130, 120, 128, 140]]], jnp.uint8),       # (N=1, C=1, W=4)
    ...            QParams(0.1, 128, QuantSpec(signed=False)))
    >>> w = QArray(jnp.array([[[10, -5, 20]]], jnp.int8),                # (O=1, I=1, 3)
    ...            QParams(0.05, 0, QuantSpec(symmetric=True)))
    >>> out = QParams(0.02, 128, QuantSpec(signed=False))
    >>> y = quantized_conv(x, prepare_conv(w, weight_layout="OIW"), None, out, padding=1)
    >>> y.values  # x = [0 | .2 -.8 0 1.2 | 0], w = [.5 -.25 1]: [-.85 .3 .8 -.3]/.02 + 128
    Array([[[ 85, 143, 168, 113]]], dtype=uint8)
    """
    layer = name if name is not None else getattr(w, "name", "conv")
    if not isinstance(x, QArray):
        raise TypeError(f"layer {layer!r}: x must be a QArray, got {type(x).__name__}")
    if layout not in _X_LAYOUTS:
        raise ValueError(
            f"layer {layer!r}: layout must be one of {sorted(_X_LAYOUTS)}, got {layout!r}"
        )
    channels_first = _X_LAYOUTS[layout][1]
    nsp = x.ndim - 2
    if nsp not in (1, 2):
        raise ValueError(
            f"layer {layer!r}: x must be (N, C, W) or (N, C, H, W) (or channels-last), "
            f"got shape {x.shape}"
        )
    if not isinstance(w, PreparedConv):
        w = prepare_conv(
            w,
            name=layer,
            groups=1 if groups is None else groups,
            weight_layout="OIHW" if nsp == 2 else "OIW",
        )
    pw = w
    if name is not None and name != pw.name:
        pw = dataclasses.replace(pw, name=name)
    if groups is not None and groups != pw.groups:
        raise ValueError(
            f"layer {layer!r}: groups={groups} but the weight was prepared with groups={pw.groups}"
        )
    if len(pw.kernel_size) != nsp:
        raise ValueError(
            f"layer {layer!r}: a {len(pw.kernel_size)}-D kernel for a {nsp}-D input "
            f"of shape {x.shape}"
        )
    unsigned = check_operands(x, out_qparams, pw.max_abs_x, accumulate, activation, layer)
    # no int16 pair sum can saturate (prepare-time bound): the saturating sums are exact
    sat_ok = pw.kernel == "sat16" and unsigned and sat16_exact(x.spec, pw.sat16_max_x)
    acc_mode = "fbgemm_sat16" if accumulate == "exact" and sat_ok else accumulate
    c_axis = 1 if channels_first else x.ndim - 1
    sp_axes = tuple(range(2, x.ndim)) if channels_first else tuple(range(1, x.ndim - 1))
    c_in = x.shape[c_axis]
    if c_in != pw.in_channels:
        raise ValueError(
            f"layer {layer!r}: x of shape {x.shape} ({layout}) has {c_in} channels but the "
            f"weight {pw.weight.shape} (HWIO) with groups={pw.groups} needs {pw.in_channels}"
        )
    kernel = pw.kernel_size
    stride_t = _tuple(stride, nsp, "stride", layer)
    dil_t = _tuple(dilation, nsp, "dilation", layer)
    in_sizes = tuple(x.shape[a] for a in sp_axes)
    pads = _pads(padding, nsp, kernel, stride_t, dil_t, in_sizes, layer)
    if any(p < 0 for pp in pads for p in pp) or min(stride_t + dil_t) < 1:
        raise ValueError(f"layer {layer!r}: negative padding or non-positive stride/dilation")
    padded = [n + lo + hi for n, (lo, hi) in zip(in_sizes, pads, strict=True)]
    eff = [(kk - 1) * d + 1 for kk, d in zip(kernel, dil_t, strict=True)]
    if any(p < e for p, e in zip(padded, eff, strict=True)):
        raise ValueError(
            f"layer {layer!r}: the (dilated) kernel {tuple(eff)} is larger than the padded "
            f"input {tuple(padded)}"
        )

    # The conv runs channels-last (N, *spatial, C) x HWIO: XLA:CPU's int8 conv is fast
    # there (about 4x its float32 conv) and 40x slower channels-first; NCHW inputs are
    # transposed on the way in (uint8 codes) and out (output codes).
    xv = jnp.moveaxis(x.values, 1, -1) if channels_first else x.values
    # Pad with the zero point (the real value 0), in the raw dtype.
    zx = jnp.asarray(x.zero_point).astype(jnp.int32).reshape(())
    xv_unpadded = xv
    fused16 = pw.kernel == "sat16" and _native.fusable(pw, x, bias, out_qparams, scheme, accumulate)
    # oneDNN's fused saturating conv reads zeros in the padding (its zero-point term
    # skips the padding taps)
    pad_code = jnp.zeros((), xv.dtype) if fused16 and accumulate == "onednn_sat16" else zx
    native_pad = (accumulate == "exact" and pw.kernel in ("onednn", "amx")) or fused16
    xv = _pad(xv, pad_code.astype(xv.dtype), pads, native=native_pad)
    wq = pw.weight
    zw = jnp.asarray(wq.zero_point).astype(jnp.int32)  # () or (O,)
    g = pw.groups
    o = pw.out_channels
    cg = c_in // g
    _native.check_folded(pw, x, bias, out_qparams, scheme, activation, accumulate, layer)
    native_ok = pw.kernel == "onednn" or (
        pw.kernel == "amx" and _native.conv_supported(2, 1, dil_t)
    )
    codes = None
    if accumulate == "exact" and native_ok and _native.fusable(pw, x, bias, out_qparams, scheme):
        # one native call on the padded raw codes: conv + zero-point term + requantize
        codes = _onednn_2d(
            lambda xv, st, dl: _native.fused_conv_codes(
                xv, x, pw, bias, out_qparams, scheme, activation == "relu", st, dl
            ),
            xv,
            stride_t,
            dil_t,
        )
    elif fused16:  # one fused sat16 call: the saturating sums, zero-point term, requantize
        relu = activation == "relu"
        codes = fused_sat16_conv(xv, zx, x, pw, bias, out_qparams, scheme, relu, stride_t,
                                 dil_t, pads, accumulate)  # fmt: skip
    if codes is not None:
        try:
            codes = clamp_activation(codes, out_qparams, activation, bounds)
        except (TypeError, ValueError) as e:
            raise type(e)(f"layer {layer!r}: {e}") from None
        return QArray(jnp.moveaxis(codes, -1, 1) if channels_first else codes, out_qparams)
    if accumulate == "exact" and pw.kernel == "onednn":
        # the ukernel takes uint8 codes: signed ones shifted up, x + 128 (a bit flip)
        if not unsigned:
            xv = lax.bitcast_convert_type(xv ^ jnp.int8(-128), jnp.uint8)
            zx = zx + jnp.int32(128)
        w2 = wq.values.reshape((1,) * (4 - wq.ndim) + wq.shape)  # a 1-D WIO one as kh = 1
        acc = _onednn_2d(
            lambda xv, st, dl: _native.onednn_conv2d(xv, pw.packed, w2, st, dl, g),
            xv,
            stride_t,
            dil_t,
        )
    elif acc_mode == "exact":
        if unsigned:  # x - 128 as int8: flip the top bit, reinterpret
            xv = lax.bitcast_convert_type(xv ^ jnp.uint8(0x80), jnp.int8)
            zx = zx - jnp.int32(128)
        if pw.kernel == "amx":
            if not _native.conv_supported(2, 1, dil_t):
                raise ValueError(
                    f"layer {layer!r}: kernel='amx' supports dilation 1, got {dil_t}; "
                    "prepare the weight with kernel='xla'"
                )
            acc = _native.amx_conv2d(xv, pw.packed, wq.values, stride_t)
        elif g == 1 and all(kk == 1 for kk in kernel):
            # Pointwise: an int8 dot over the channels (measured faster on XLA:CPU).
            xs = xv[(slice(None),) + tuple(slice(None, None, st) for st in stride_t)]
            acc = lax.dot_general(
                xs,
                wq.values.reshape(cg, o),
                (((xs.ndim - 1,), (0,)), ((), ())),
                preferred_element_type=jnp.int32,
            )
        else:
            acc = _int8_conv(xv, wq.values, stride_t, dil_t, g)
    elif acc_mode == "fbgemm_sat16":
        acc = _sat16_conv(xv, wq.values, stride_t, dil_t, g, native=pw.kernel == "sat16")
    else:  # oneDNN skips the padding taps, so it starts from the unpadded codes
        acc = _onednn_sat16_conv(
            xv_unpadded, wq.values, zx, pads, stride_t, dil_t, g, native=pw.kernel == "sat16"
        )
    if acc_mode != "onednn_sat16":
        acc = acc - zx * pw.w_sum
    if not pw.zero_point_is_zero:
        # Σ_window x' per group and output position, then per output channel.
        xi = xv.astype(jnp.int32)
        xg = jnp.sum(xi.reshape(xi.shape[:-1] + (g, cg)), axis=-1)  # (N, *sp, G)
        win = lax.reduce_window(
            xg,
            jnp.int32(0),
            lax.add,
            (1,) + kernel + (1,),
            (1,) + stride_t + (1,),
            "VALID",
            window_dilation=(1,) + dil_t + (1,),
        )
        win = jnp.repeat(win, o // g, axis=-1)  # (N, *out, O)
        k = cg * int(np.prod(kernel))
        acc = acc - zw * win + jnp.int32(k) * zx * zw
    scale_w = wq.scale if wq.spec.granularity == "axis" else jnp.reshape(wq.scale, ())
    if out_qparams is None:  # no output quantizer: the float layer output
        y = dequantize_accumulator(
            acc, scale_x=jnp.reshape(x.scale, ()), scale_w=scale_w, bias=bias
        )
        return jnp.moveaxis(y, -1, 1) if channels_first else y
    try:
        codes = requantize(
            acc,
            scale_x=jnp.reshape(x.scale, ()),
            scale_w=scale_w,
            out=out_qparams,
            bias=bias,
            activation="relu" if activation == "relu" else None,
            scheme=scheme,
            channel_axis=-1,
        )
        codes = clamp_activation(codes, out_qparams, activation, bounds)
    except (TypeError, ValueError) as e:
        if str(e).startswith(f"layer {layer!r}"):
            raise
        raise type(e)(f"layer {layer!r}: {e}") from None
    if channels_first:
        codes = jnp.moveaxis(codes, -1, 1)
    return QArray(codes, out_qparams)
