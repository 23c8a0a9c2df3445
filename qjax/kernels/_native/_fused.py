"""The fused native layers (AMX, oneDNN ukernel): 8-bit codes in, 8-bit codes out, one call.

``qjax_amx_q8_gemm`` computes the int32 dot on AMX (uint8 codes as they are through
``tdpbusd``, int8 through ``tdpbssd``) and runs the requantize epilogue on each 16x16
accumulator tile while it is still in cache, writing the output codes directly. The
per-channel coefficients are computed in XLA by the scheme's own coefficient function
(``_coef_fbgemm`` / ``_coef_qnnpack`` via ``_coefficients``, the one implementation of
those float formulas); the kernel only runs the per-element steps of
``_apply_fbgemm``, in the same order with the same roundings:

``a = acc + ivec[n]`` (int32, wrapping), ``y = f32(a) + fvec[n]``,
``code = clamp(rint(f32(y·mult[n])), lo - zp, hi - zp) + zp`` (NaN -> ``zp``)

with, for ``"fbgemm"``: ``ivec = -zp_x·Σ_k w``, ``fvec = b`` (the scheme's ``f32(b/ats)``
or ``f32(b·inv(ats))``, 0 without bias), ``mult = M``; for ``"qnnpack"``: ``ivec =
-zp_x·Σ_k w + b_q`` (int32, wrapping, as ``(acc - zp_x·Σw) + b_q``), ``fvec = 0``
(``f32(a) + 0 = f32(a)`` exactly), ``mult = rs``. So the codes equal the unfused path's.

The same epilogue (``epilogue.h``) runs in oneDNN's ukernel calls (linear and conv,
:mod:`._onednn`, :mod:`._onednn_conv`), which also take the ``"onednn"`` scheme (rule
13, ``_coef_onednn`` / ``_apply_onednn``): ``clamp`` ``(5,)`` = ``(lo, hi, s_x',
f32(1/s_out), zp)``, ``mult = s_w'``, ``fvec = b`` (or 0), ``zp = 0``:
``y = f32(f32(f32(a)·s_x')·s_w') + b``, ``code = clamp(rint(f32(f32(y·inv_so) + zp)),
lo, hi)`` (NaN -> 0), the XLA path's steps (its exactness guards only keep XLA from
fusing them differently; the C++ is compiled without contraction). The AMX kernels
take ``"fbgemm"``/``"qnnpack"`` only.

:func:`qjax.kernels.fold_requant` computes these vectors once at prepare time for static
qparams (:func:`fold_key`, :func:`check_folded`).

Covered: weights whose zero points are known to be 0 (``zero_point_is_zero``; otherwise
a per-row ``Σ_k x`` term is needed and the unfused path runs), per-tensor or
per-channel weight scales, ``activation`` ``None``/``"relu"`` (folded into ``lo``) and
``"relu6"``/``"hardtanh"`` (their clamp runs after the call), int8/uint8 outputs.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from .._requant import _zero_point_scalar, activation_bounds
from .._schemes import _apply_fbgemm, _coef_fbgemm, _coef_onednn, _coef_qnnpack, _coefficients
from . import _onednn, _onednn_conv, _sat16

QTARGET = "qjax_amx_q8_gemm"
QCONV_TARGET = "qjax_amx_q8_conv2d"
FUSED_SCHEMES = ("fbgemm", "qnnpack")
_CODES = (np.dtype(np.int8), np.dtype(np.uint8))


def epilogue_vectors(scheme, n, corr, bias, scale_x, scale_w, out, relu):
    """``(ivec, fvec, mult, clamp, zp)`` of the fused epilogue (module docstring).

    ``corr`` int32 ``(N,)`` (``-zp_x·Σ_k w``); ``bias`` float32 ``(N,)``/0-d or ``None``;
    ``scale_w`` 0-d (per-tensor) or ``(N,)``. Returns int32 ``(N,)``, float32 ``(N,)``,
    float32 ``(N,)``, float32 ``(2,)`` = ``(lo - zp, hi - zp)``, int32 ``(1,)``.

    >>> from qjax import QParams, QuantSpec
    >>> out = QParams(0.5, 3, QuantSpec(signed=False))
    >>> iv, fv, mu, cl, zp = epilogue_vectors("qnnpack", 2, jnp.array([-4, 0], jnp.int32),
    ...     jnp.array([1.0, -1.0], jnp.float32), 1.0, jnp.float32(0.5), out, True)
    >>> iv.tolist(), fv.tolist(), mu.tolist(), cl.tolist(), zp.tolist()
    ([-2, -2], [0.0, 0.0], [1.0, 1.0], [0.0, 252.0], [3])
    """
    lo, hi = activation_bounds(out, "relu" if relu else None)
    sx = jnp.asarray(scale_x, jnp.float32).reshape(())
    sw = jnp.asarray(scale_w, jnp.float32)
    so = jnp.asarray(out.scale, jnp.float32).reshape(())
    zo = _zero_point_scalar(out.zero_point)
    b = None if bias is None else jnp.asarray(bias).astype(jnp.float32)
    if scheme == "fbgemm":
        bf, mult, zp, flo, fhi = _coefficients(_coef_fbgemm, b, sx, sw, so, zo, lo, hi)
        ivec = corr
        fvec = jnp.zeros((n,), jnp.float32) if bf is None else jnp.broadcast_to(bf, (n,))
    elif scheme == "qnnpack":
        b_q, mult, zp, flo, fhi = _coefficients(_coef_qnnpack, b, sx, sw, so, zo, lo, hi)
        ivec = corr if b_q is None else corr + b_q
        fvec = jnp.zeros((n,), jnp.float32)
    elif scheme == "onednn":  # oneDNN's ukernel only: clamp (5,) selects its steps
        c = _coefficients(_coef_onednn, b, sx, sw, so, zo, lo, hi)
        sxp, swp, _, bo, inv_so, zpf, flo, fhi = c
        ivec = corr
        fvec = jnp.zeros((n,), jnp.float32) if bo is None else jnp.broadcast_to(bo, (n,))
        mult = jnp.broadcast_to(swp, (n,))
        clamp = jnp.stack([jnp.reshape(v, ()) for v in (flo, fhi, sxp, inv_so, zpf)])
        return ivec.astype(jnp.int32), fvec, mult, clamp, jnp.zeros((1,), jnp.int32)
    else:
        raise ValueError(f"the fused epilogue covers {FUSED_SCHEMES + ('onednn',)}, got {scheme!r}")
    ivec = jnp.broadcast_to(ivec, (n,)).astype(jnp.int32)
    mult = jnp.broadcast_to(mult, (n,))
    clamp = jnp.stack([jnp.reshape(flo, ()), jnp.reshape(fhi, ())])
    return ivec, fvec, mult, clamp, jnp.reshape(zp, (1,))


def fusable(pw, x, bias, out, scheme, accumulate="exact") -> bool:
    """Whether ``quantized_linear`` / ``quantized_conv`` can take the fused call (else the
    unfused path runs).

    Needs, for ``accumulate="exact"``, an AMX-prepared weight or a ``kernel="onednn"``
    one where its provider has the fused epilogue
    (:func:`~qjax.kernels._native._onednn.onednn_fused`), or a ``kernel="sat16"`` linear
    weight (the saturating instructions where its pair sums provably cannot saturate,
    :func:`~qjax.kernels._prepared.sat16_exact`, else its widened exact products), or
    such a conv weight with one group and uint8 inputs; for ``"fbgemm_sat16"`` /
    ``"onednn_sat16"`` a ``kernel="sat16"`` linear weight (its pair saturation) or conv
    weight with one group. Then
    zero points known to be 0, scheme ``"fbgemm"``/``"qnnpack"`` (and ``"onednn"`` on
    oneDNN's and the sat16 kernel), int8/uint8 inputs and per-tensor int8/uint8
    outputs with an integer zero point, and a float32-castable ``(N,)`` or 0-d bias;
    anything else (including malformed input, whose error the unfused path raises) is
    ``False``.

    >>> fusable(None, None, None, None, "tflite")
    False
    """
    kernel = getattr(pw, "kernel", None)
    if out is None or kernel not in ("amx", "onednn", "sat16"):
        return False
    if scheme not in FUSED_SCHEMES + (() if kernel == "amx" else ("onednn",)):
        return False  # the "onednn" scheme's epilogue: not in the AMX kernels
    if kernel == "onednn" and not _onednn.onednn_fused():
        return False  # only the ukernel provider has the epilogue
    if not pw.zero_point_is_zero or x.values.dtype not in _CODES:
        return False
    if kernel == "sat16":  # saturating, or exact (widened where a pair could saturate)
        if not hasattr(pw, "out_features"):  # conv: one group, uint8 codes if exact
            if pw.groups != 1 or (accumulate == "exact" and x.values.dtype != np.uint8):
                return False
        if accumulate != "exact" and x.values.dtype != np.uint8:
            return False
    elif accumulate != "exact":
        return False
    ospec = out.spec
    if ospec.granularity != "tensor" or np.dtype(ospec.dtype) not in _CODES:
        return False
    if jnp.size(out.scale) != 1 or not jnp.issubdtype(
        jnp.asarray(out.zero_point).dtype, jnp.integer
    ):
        return False
    if jnp.size(x.scale) != 1:
        return False
    if bias is not None:
        b = jnp.asarray(bias)
        n = pw.out_features if hasattr(pw, "out_features") else pw.out_channels
        if not jnp.issubdtype(b.dtype, jnp.floating) or b.shape not in ((), (n,)):
            return False
    return True


def fused_linear_codes(x, pw, bias, out, scheme, relu, pair_dot=None, exact=False) -> jax.Array:
    """Output codes of ``quantized_linear`` (before a ``relu6``/``hardtanh`` clamp) in one
    fused AMX, oneDNN-ukernel or sat16 call; only when :func:`fusable` said so.

    ``x`` a :class:`~qjax.QArray` ``(..., K)``; ``pw`` an AMX, oneDNN or sat16
    ``PreparedLinear``; the accumulator correction ``-zp_x·Σ_k w`` uses the raw codes'
    zero point (uint8 codes are not shifted: ``tdpbusd``/``vpdpbusd`` take them as they
    are). oneDNN's and the sat16 kernel take uint8 only: int8 codes are shifted up by 128
    (the top bit flipped) and their zero point with them. ``pair_dot(x, w)``: the sat16
    kernel's sums in XLA (``_accumulate._sat16_pair_dot``), what it runs off CPU;
    ``exact``: the sat16 kernel's exact (widened) sums, ``pair_dot`` then the exact
    ones (``_accumulate._u8_dot``). Returns ``out.spec.dtype``.

    >>> fusable(None, None, None, None, "exact")  # see quantized_linear's tests
    False
    """
    if pw.kernel in ("onednn", "sat16"):
        xv, shift = x.values, 0
        if xv.dtype == jnp.int8:  # x + 128 as uint8: flip the top bit, reinterpret
            xv, shift = lax.bitcast_convert_type(xv ^ jnp.int8(-128), jnp.uint8), 128
        vecs = _vectors(x, pw, pw.col_sum, bias, out, scheme, relu, shift)
        if pw.kernel == "sat16":
            return _sat16_codes(xv, pw.packed, pw.weight.values, vecs, out, pair_dot, exact)
        q8 = _onednn.onednn_linear_q8
        return q8(xv, pw.packed, pw.weight.values, *vecs, out.spec.dtype)
    vecs = _vectors(x, pw, pw.col_sum, bias, out, scheme, relu)
    return amx_linear_q8(x.values, pw.packed, pw.weight.values, *vecs, out.spec.dtype)


def fused_conv_codes(xv, x, pw, bias, out, scheme, relu, stride, dilation=(1, 1)) -> jax.Array:
    """Output codes (NHWC) of a 2-D ``quantized_conv`` in one fused AMX or oneDNN-ukernel
    call.

    ``xv`` the zero-point-padded NHWC codes (int8 or uint8, not shifted); ``x`` the
    input :class:`~qjax.QArray` (its scale and zero point); ``pw`` an AMX
    ``PreparedConv`` with ``groups == 1`` and dilation 1, or a oneDNN one (any groups
    and dilation, :mod:`._onednn_conv`; int8 codes shifted up by 128 as in
    :func:`fused_linear_codes`); ``stride``/``dilation`` ``(h, w)``. Only when
    :func:`fusable` said so; as :func:`fused_linear_codes` with ``Σ_{kh,kw,c} w``.

    >>> fusable(None, None, None, None, "onednn")
    False
    """
    if pw.kernel == "onednn":
        shift = 0
        if xv.dtype == jnp.int8:  # x + 128 as uint8: flip the top bit, reinterpret
            xv, shift = lax.bitcast_convert_type(xv ^ jnp.int8(-128), jnp.uint8), 128
        vecs = _vectors(x, pw, pw.w_sum, bias, out, scheme, relu, shift)
        w = pw.weight.values
        w = w if w.ndim == 4 else w[None]  # a 1-D conv runs as H = 1
        return _onednn_conv.onednn_conv2d_q8(
            xv, pw.packed, w, stride, dilation, pw.groups, *vecs, out.spec.dtype
        )
    vecs = _vectors(x, pw, pw.w_sum, bias, out, scheme, relu)
    return amx_conv2d_q8(xv, pw.packed, pw.weight.values, stride, *vecs, out.spec.dtype)


def fused_sat16_conv_codes(
    xk, w, x, pw, bias, out, scheme, relu, stride, dilation, sums, border=None, exact=False
) -> jax.Array:
    """Output codes (NHWC) of a saturating 2-D conv with one group in one fused sat16
    call whose im2col rows are read in place (:func:`~._sat16.sat16_conv_q8`): the sums,
    ``-zp_x·Σw`` (``pw.w_sum``; over the valid taps only with ``border``), the layer's
    requantization (:func:`fused_linear_codes`' epilogue).

    ``xk`` the uint8 codes the kernel reads (NHWC, padded: with ``zp_x`` for
    ``"fbgemm_sat16"``, with zeros and ``border = (zp_x, (pt, pl, h, w))`` for
    ``"onednn_sat16"``), ``C % 4 == 0``; ``w`` the int8 HWIO weight (a 1-D conv's with
    ``H = 1``); ``x`` the input :class:`~qjax.QArray` (scale, zero point); ``pw`` the
    sat16 ``PreparedConv`` (its ``w_sum``, scales, folded epilogue); ``sums(xk, wk)`` the
    kernel's int32 sums in XLA before ``ivec`` (what runs off CPU; ``wk`` the
    ``(kh·kw·C, O)`` weight); ``exact``: the kernel's exact (widened) sums, which
    ``sums`` must then compute. Only when :func:`fusable` said so.

    >>> fusable(None, None, None, None, "fbgemm", "fbgemm_sat16")
    False
    """
    wk = w.reshape(-1, w.shape[-1])  # k = tap·C + c: HWIO's row-major (K, O) reshape
    vecs = _vectors(x, pw, pw.w_sum, bias, out, scheme, relu)

    def portable(xk, wk, *v):
        return _onednn.portable_codes(sums(xk, wk), *v[:5]).astype(out.spec.dtype)

    q8 = _sat16.sat16_conv_q8
    # prepare_conv's pack (sat16_conv_pack: C padded as here); a weight from a tree saved
    # before it had one is packed in the call
    packed = _sat16.pack_sat16_weight(wk) if pw.packed is None else pw.packed
    return q8(xk, packed, wk, vecs, out.spec.dtype, portable, w.shape[:2], stride, dilation,
              border, exact=exact)  # fmt: skip


def fused_sat16_patches_codes(patches, x, pw, bias, out, scheme, relu, pair_dot) -> jax.Array:
    """The sat16 conv of :func:`fused_sat16_conv_codes` (``"fbgemm_sat16"``, any ``C``)
    on im2col ``patches`` XLA built (uint8 ``(..., kh·kw·C)``, FBGEMM's order): the
    linear layer of :func:`fused_linear_codes` with ``Σw = pw.w_sum``; ``pair_dot`` the
    sums in XLA (off CPU).

    >>> fusable(None, None, None, None, "fbgemm", "fbgemm_sat16")
    False
    """
    w = pw.weight.values
    wk = w.reshape(-1, w.shape[-1])
    vecs = _vectors(x, pw, pw.w_sum, bias, out, scheme, relu)
    return _sat16_codes(patches, _sat16.pack_sat16_weight(wk), wk, vecs, out, pair_dot)


def _sat16_codes(xv, packed, w, vecs, out, pair_dot, exact=False):
    """:func:`~._sat16.sat16_linear_q8`, ``pair_dot`` (XLA's sums) off CPU."""

    def portable(x, w, *vecs):
        return _onednn.portable_codes(pair_dot(x, w), *vecs).astype(out.spec.dtype)

    return _sat16.sat16_linear_q8(xv, packed, w, vecs, out.spec.dtype, portable, exact=exact)


def _vectors(x, pw, w_sum, bias, out, scheme, relu, shift=0):
    """The layer's epilogue vectors: folded at prepare time (:func:`fold_key`), else
    computed here, in the program, from the call's qparams and bias."""
    if pw.folded is not None:
        return pw.epilogue
    return _layer_vectors(x, pw.weight, w_sum, bias, out, scheme, relu, shift)


def fold_key(x, out, scheme, relu) -> tuple:
    """What a folded epilogue was made for, checked at each call (static, hashable):
    ``(scheme, relu, x dtype, x scale, x zero point, out dtype, out scale, out zero
    point)``; the scales and zero points as Python numbers (concrete qparams only).

    >>> from qjax import QParams, QuantSpec
    >>> u8 = QuantSpec(signed=False)
    >>> x = QParams(0.5, 3, u8)
    >>> fold_key(x, QParams(0.25, 128, u8), "fbgemm", True)
    ('fbgemm', True, 'uint8', 0.5, 3, 'uint8', 0.25, 128)
    """

    def num(v, kind):
        v = np.asarray(v).reshape(())
        return float(v) if kind == "f" else int(v)

    return (
        scheme,
        bool(relu),
        str(np.dtype(x.spec.dtype)),
        num(x.scale, "f"),
        num(x.zero_point, "i"),
        str(np.dtype(out.spec.dtype)),
        num(out.scale, "f"),
        num(out.zero_point, "i"),
    )


def check_folded(pw, x, bias, out, scheme, activation, accumulate, layer) -> None:
    """Raise ``ValueError`` naming the layer unless a call fits the requantization folded
    into ``pw`` (nothing to check when none is): the fused call possible for the call's
    accumulation (:func:`fusable`), the same scheme, ReLU, input and output dtypes, and, where
    the call's qparams are concrete, the same scales and zero points (traced ones, e.g.
    ``jit`` arguments, cannot be compared: the folded values are used).

    >>> check_folded(None, None, None, None, "fbgemm", None, "exact", "fc")  # not folded
    """
    key = getattr(pw, "folded", None)
    if key is None:
        return
    bad = None
    if out is None or not fusable(pw, x, bias, out, scheme, accumulate):
        bad = "a call the fused kernel cannot run (accumulate, output qparams or bias)"
    elif key[:3] != (scheme, activation == "relu", str(np.dtype(x.values.dtype))):
        bad = f"scheme {scheme!r}, activation {activation!r}, input {x.values.dtype}"
    elif key[5] != str(np.dtype(out.spec.dtype)):
        bad = f"output dtype {np.dtype(out.spec.dtype)}"
    else:
        concrete = (x.scale, x.zero_point, out.scale, out.zero_point)
        if not any(isinstance(v, jax.core.Tracer) for v in concrete):
            now = fold_key(x.qparams, out, scheme, activation == "relu")
            if now != key:
                bad = f"qparams {now[3:5]} -> {now[6:]}"
    if bad is not None:
        raise ValueError(
            f"layer {layer!r}: the weight's requantization was folded for {key} "
            f"(scheme, relu, x dtype, scale, zero point, out dtype, scale, zero point), "
            f"this call has {bad}; fold it again (qjax.kernels.fold_requant) or use the "
            "weight as prepared"
        )


def _layer_vectors(x, wq, w_sum, bias, out, scheme, relu, shift=0):
    """:func:`epilogue_vectors` of a layer: ``corr = -(zp_x + shift)·Σw`` per output
    channel (``w_sum``, int32 ``(N,)``; ``shift`` what the caller added to the codes), the
    input's scale and the weight's (0-d per tensor)."""
    zx = jnp.asarray(x.zero_point).astype(jnp.int32).reshape(()) + jnp.int32(shift)
    corr = jnp.int32(0) - zx * w_sum
    scale_w = wq.scale if wq.spec.granularity == "axis" else jnp.reshape(wq.scale, ())
    sx = jnp.reshape(x.scale, ())
    return epilogue_vectors(scheme, w_sum.shape[0], corr, bias, sx, scale_w, out, relu)


def amx_conv2d_q8(x, packed, w, stride, ivec, fvec, mult, clamp, zp, out_dtype) -> jax.Array:
    """8-bit NHWC codes of the fused conv: the epilogue of :func:`amx_linear_q8` applied
    to ``Σ x[n, i·sh + a, j·sw + b, c]·w[a, b, c, o]`` (``x`` padded NHWC int8/uint8
    codes, ``w`` int8 HWIO, ``packed = pack_conv_weight(w)``), per output channel ``o``.

    >>> from qjax.kernels._native import native_status, pack_conv_weight
    >>> x = jnp.full((1, 2, 2, 1), 200, jnp.uint8)
    >>> w = jnp.ones((2, 2, 1, 1), jnp.int8)
    >>> v = (jnp.zeros(1, jnp.int32), jnp.zeros(1), jnp.full(1, 0.25), jnp.array([0.0, 255.0]))
    >>> if native_status()[0]:  # 800 / 4
    ...     print(amx_conv2d_q8(x, pack_conv_weight(w), w, (1, 1), *v,
    ...                         jnp.array([0], jnp.int32), jnp.uint8)[..., 0])
    ... else:
    ...     print("[[[200]]]")
    [[[200]]]
    """
    n, hp, wpad, _ = x.shape
    kh, kw, _, o = w.shape
    sh, sw = stride
    oh, ow = (hp - kh) // sh + 1, (wpad - kw) // sw + 1
    shape = jax.ShapeDtypeStruct((n, oh, ow, o), out_dtype)

    def native(x, packed, w, *vecs):
        del w
        call = jax.ffi.ffi_call(QCONV_TARGET, shape, vmap_method="sequential")
        return call(x, packed, *vecs, kh=kh, kw=kw, sh=sh, sw=sw)

    def portable(x, packed, w, ivec, fvec, mult, clamp, zp):
        del packed
        acc = lax.conv_general_dilated(
            x.astype(jnp.int32),
            w.astype(jnp.int32),
            stride,
            "VALID",
            dimension_numbers=("NHWC", "HWIO", "NHWC"),
        )
        codes = _apply_fbgemm(acc + ivec, fvec, mult, zp[0], clamp[0], clamp[1])
        return codes.astype(out_dtype)

    vecs = (ivec, fvec, mult, clamp, zp)
    return lax.platform_dependent(x, packed, w, *vecs, cpu=native, default=portable)


def amx_linear_q8(x, packed, w, ivec, fvec, mult, clamp, zp, out_dtype) -> jax.Array:
    """8-bit codes ``(..., N)`` of the fused layer (module docstring) from codes ``x``.

    ``x`` int8 or uint8 ``(..., K)``; ``packed = pack_weight(w)``, ``w`` int8 ``(K, N)``
    (used only off CPU, where ``lax.dot_general`` and ``_apply_fbgemm`` compute the same
    codes); the vectors from :func:`epilogue_vectors`; ``out_dtype`` int8 or uint8.

    >>> from qjax.kernels._native import native_status, pack_weight
    >>> x = jnp.array([[200, 3]], jnp.uint8)
    >>> w = jnp.array([[1, -1], [2, 1]], jnp.int8)
    >>> one, z = jnp.ones(2, jnp.float32), jnp.zeros(2, jnp.float32)
    >>> if native_status()[0]:  # rint(206 / 2) = 103, rint(-197 / 2) = -98 (ties to even)
    ...     print(amx_linear_q8(x, pack_weight(w), w, jnp.zeros(2, jnp.int32), z, one / 2,
    ...           jnp.array([-128.0, 127.0]), jnp.array([0], jnp.int32), jnp.int8))
    ... else:
    ...     print("[[103 -98]]")
    [[103 -98]]
    """
    n = w.shape[1]
    shape = jax.ShapeDtypeStruct(x.shape[:-1] + (n,), out_dtype)

    def native(x, packed, w, *vecs):
        del w
        return jax.ffi.ffi_call(QTARGET, shape, vmap_method="expand_dims")(x, packed, *vecs)

    def portable(x, packed, w, ivec, fvec, mult, clamp, zp):
        del packed
        dims = (((x.ndim - 1,), (0,)), ((), ()))
        acc = lax.dot_general(x.astype(jnp.int32), w.astype(jnp.int32), dims)
        codes = _apply_fbgemm(acc + ivec, fvec, mult, zp[0], clamp[0], clamp[1])
        return codes.astype(out_dtype)

    vecs = (ivec, fvec, mult, clamp, zp)
    return lax.platform_dependent(x, packed, w, *vecs, cpu=native, default=portable)
