"""``kernel="onednn"`` for convolutions on oneDNN's brgemm ukernel
(:mod:`qjax.kernels._native._onednn_conv`).

* the raw int32 conv (:func:`qjax.kernels._native.onednn_conv2d`, uint8 x int8) == the
  exact ``lax.conv_general_dilated`` over a sweep of shapes: every feed (kernel rows,
  the rows called per tap when dilated, taps, im2col), tiles across output rows and per
  row, groups, depthwise, strides, dilation, odd sizes and channel counts, 64-position /
  64-channel tails (the slow run adds a random sweep);
* ``quantized_conv`` with a oneDNN-prepared weight == the XLA path's codes for every
  scheme, uint8 and int8 activations, per-tensor and per-channel weights, zero and
  non-zero weight zero points, bias, relu / relu6, NCHW / NHWC, 1-D and 2-D; the
  ``"fbgemm"``/``"qnnpack"`` layers with zero weight zero points run as one fused call
  (no XLA conv in the program);
* :func:`qjax.kernels.fold_requant`: the folded layer's codes == the XLA path's with the
  weight and qparams as ``jit`` arguments, nothing but the native call left; a call
  with other qparams or scheme raises;
* at ``ONEDNN_MAX_CPU_ISA=AVX2`` torch refuses the ukernel and every conv stays on XLA
  with the same codes: checked in the linear tests' subprocess
  (:mod:`tests.test_native_onednn_ukernel`, one process for both).

The torch parity of the oneDNN conv runs in :mod:`tests.test_int8_conv` (the engine
sweep, with this kernel beside XLA). Skipped, with the reason, where the ukernel is not
the provider. Counts are printed (``pytest -s``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from qjax import QParams, QuantSpec
from qjax.kernels import (
    SCHEMES,
    QArray,
    _native,
    fold_requant,
    onednn_exact,
    prepare_conv,
    quantized_conv,
)
from qjax.kernels._choice import conv_kernel
from qjax.kernels._native import _onednn, _onednn_conv

_OK = onednn_exact()[0] and _native.onednn_fused()
pytestmark = pytest.mark.skipif(
    not _OK, reason=f"oneDNN brgemm ukernel is not the provider: {_native.onednn_status()[1]}"
)

# (N, H, W, C, O, kh, kw, stride, dilation, groups): each feed and tiling, tails
RAW = [
    (2, 7, 9, 1, 5, 3, 3, (1, 1), (1, 1), 1),  # im2col, C = 1
    (1, 30, 30, 32, 64, 3, 3, (1, 1), (1, 1), 1),  # the CNN benchmark's conv: rows, wide tiles
    (2, 12, 15, 16, 24, 3, 3, (1, 2), (2, 2), 1),  # packed rows called per tap (dilated)
    (2, 11, 13, 16, 12, 3, 2, (2, 1), (1, 2), 2),  # taps, grouped, strided, dilated
    (1, 9, 10, 6, 70, 1, 1, (1, 1), (1, 1), 1),  # 1x1, im2col, 2 column blocks
    (3, 12, 12, 24, 36, 3, 3, (2, 2), (1, 1), 3),  # stride 2: one output row per tile
    (1, 20, 70, 130, 65, 2, 3, (1, 3), (2, 1), 1),  # Cg % 4 = 2, per-row, 70-wide rows
    (2, 8, 8, 16, 16, 3, 3, (1, 1), (1, 1), 16),  # depthwise
    (2, 9, 9, 8, 16, 3, 3, (1, 1), (1, 1), 8),  # depthwise, channel multiplier 2
    (1, 6, 200, 3, 8, 3, 3, (1, 1), (1, 1), 1),  # im2col, rows longer than a tile
    (1, 5, 5, 17, 3, 5, 5, (1, 1), (1, 1), 1),  # kernel = input: one output
    (2, 13, 11, 5, 130, 7, 7, (3, 2), (1, 1), 1),  # im2col K = 245, 3 column blocks
    (2, 3, 30, 6, 20, 2, 11, (1, 2), (1, 1), 1),  # im2col rows of 66 bytes: 60-byte pieces
    (3, 4, 9, 2, 8, 2, 2, (1, 1), (1, 1), 1),  # im2col, few positions per image: tiles span images
]


def _exact(x, w, stride, dil, groups):
    return np.asarray(
        lax.conv_general_dilated(
            x.astype(jnp.int32),
            w.astype(jnp.int32),
            stride,
            "VALID",
            rhs_dilation=dil,
            dimension_numbers=("NHWC", "HWIO", "NHWC"),
            feature_group_count=groups,
        )
    )


def _raw(rng, cases):
    conv = jax.jit(_native.onednn_conv2d, static_argnums=(3, 4, 5))
    values = bad = 0
    modes = set()
    for n, h, w_, c, o, kh, kw, st, dil, g in cases:
        x = jnp.asarray(rng.integers(0, 256, (n, h, w_, c)), jnp.uint8)
        w = jnp.asarray(rng.integers(-128, 128, (kh, kw, c // g, o)), jnp.int8)
        got = np.asarray(conv(x, _native.pack_onednn_conv_weight(w, g), w, st, dil, g))
        want = _exact(x, w, st, dil, g)
        assert got.shape == want.shape
        values += want.size
        bad += int((got != want).sum())
        feed = _native.onednn_conv_feed(c // g, kh, kw, g)
        modes.add(3 if feed == 2 and dil[1] > 1 else feed)
    return values, bad, modes


def test_raw_conv_equals_exact_sums():
    assert _onednn._LIB.qjax_onednn_uk_im2col_max_k() == _onednn_conv.IM2COL_MAX_K
    values, bad, modes = _raw(np.random.default_rng(0), RAW)
    print(f"\noneDNN ukernel conv vs exact: {len(RAW)} shapes, {values:,} int32, {bad} differ")
    assert bad == 0 and values > 90_000 and modes == {0, 1, 2, 3}


@pytest.mark.slow
def test_raw_conv_random_sweep():
    rng = np.random.default_rng(1)
    cases = []
    for _ in range(60):
        g = int(rng.choice([1, 1, 2, 3, 4]))
        cg, og = int(rng.integers(1, 40)), int(rng.integers(1, 80))
        kh, kw = (int(v) for v in rng.integers(1, 6, 2))
        st = tuple(int(v) for v in rng.integers(1, 4, 2))
        dil = tuple(int(v) for v in rng.integers(1, 3, 2))
        h = (kh - 1) * dil[0] + 1 + int(rng.integers(0, 20))
        w_ = (kw - 1) * dil[1] + 1 + int(rng.integers(0, 40))
        cases.append((int(rng.integers(1, 4)), h, w_, cg * g, og * g, kh, kw, st, dil, g))
    values, bad, modes = _raw(rng, cases)
    print(
        f"\noneDNN ukernel conv random sweep: {len(cases)} shapes, {values:,} int32, {bad} differ"
    )
    assert bad == 0 and modes == {0, 1, 2, 3}


# (nsp, C_in, C_out, kernel, stride, padding, dilation, groups, layout)
LAYERS = [
    (2, 1, 32, 3, 1, 1, 1, 1, "NHWC"),
    (2, 32, 64, 3, 1, 1, 1, 1, "NCHW"),
    (2, 12, 20, 3, 2, 0, 1, 1, "NHWC"),
    (2, 16, 24, (3, 2), 1, ((2, 1), (0, 3)), 2, 4, "NCHW"),
    (2, 16, 16, 3, 1, 1, 1, 16, "NHWC"),
    (2, 3, 70, 5, 2, "SAME", 1, 1, "NCHW"),
    (2, 64, 64, 1, 1, 0, 1, 1, "NHWC"),
    (1, 24, 40, 5, 2, 2, 1, 1, "NCW"),
    (1, 8, 16, 3, 1, 2, 2, 2, "NWC"),
]


def _layer(rng, i, cfg):
    nsp, c, o, k, st, pad, dil, g, layout = cfg
    signed = i % 3 == 2
    size = (9, 11) if nsp == 2 else (37,)
    xs = (3, c) + size if layout in ("NCHW", "NCW") else (3,) + size + (c,)
    lo, hi = (-128, 128) if signed else (0, 256)
    xv = jnp.asarray(rng.integers(lo, hi, xs), jnp.int8 if signed else jnp.uint8)
    x = QArray(
        xv, QParams(jnp.float32(0.03), jnp.int32(-7 if signed else 117), QuantSpec(signed=signed))
    )
    ks = (k,) * nsp if isinstance(k, int) else k
    wv = jnp.asarray(rng.integers(-127, 128, (o, c // g) + ks), jnp.int8)
    wzp = i % 4 == 3  # non-zero per-tensor weight zero points: the unfused path
    if i % 2 and not wzp:
        qp = QParams(
            jnp.asarray(rng.uniform(0.002, 0.02, o), jnp.float32),
            jnp.zeros(o, jnp.int32),
            QuantSpec(signed=True, symmetric=True, axis=0),
        )
    else:
        qp = QParams(jnp.float32(0.01), jnp.int32(5 if wzp else 0), QuantSpec(signed=True))
    w = QArray(wv, qp)
    lay = "OIHW" if nsp == 2 else "OIW"
    pws = [prepare_conv(w, groups=g, weight_layout=lay, kernel=kk) for kk in ("xla", "onednn")]
    b = jnp.asarray(rng.normal(0, 0.3, o), jnp.float32) if i % 3 else None
    kk = int(np.prod(ks)) * c // g
    out = QParams(
        jnp.float32(0.02 * kk**0.5), jnp.int32(3 if signed else 131), QuantSpec(signed=signed)
    )
    opts = dict(stride=st, padding=pad, dilation=dil, groups=g, layout=layout)
    return x, pws, b, out, opts


def _every_scheme(rng, which):
    compared = bad = fused = 0
    for i, cfg in enumerate(LAYERS):
        x, (pw_xla, pw_dnn), b, out, opts = _layer(rng, i, cfg)
        if i not in which:
            continue
        assert pw_dnn.kernel == "onednn" and pw_dnn.packed is not None
        acts = [(None, "relu", "relu6")[(i + len(s)) % 3] for s in SCHEMES]

        @jax.jit  # one compile per layer: every scheme, both kernels
        def f(x, pws, b=b, out=out, acts=acts, opts=opts):
            return [
                [
                    quantized_conv(x, p, b, out, scheme=s, activation=a, **opts).values
                    for s, a in zip(SCHEMES, acts, strict=True)
                ]
                for p in pws
            ]

        want, got = f(x, (pw_xla, pw_dnn))
        for w_, g_ in zip(want, got, strict=True):
            compared += w_.size
            bad += int((np.asarray(g_) != np.asarray(w_)).sum())
        fused += sum(_native.fusable(pw_dnn, x, b, out, s) for s in SCHEMES)
    return compared, bad, fused


def test_quantized_conv_equals_xla_for_every_scheme():
    """A representative three layers by default (kernel rows, NCHW; grouped and dilated
    with weight zero points, NCHW; a grouped dilated 1-D conv, NWC); all in the slow run."""
    compared, bad, fused = _every_scheme(np.random.default_rng(2), (1, 3, 8))
    print(f"\nquantized_conv onednn vs xla: 3 layers x {len(SCHEMES)} schemes, "
          f"{compared:,} codes ({fused} fused calls), {bad} differ")  # fmt: skip
    assert bad == 0 and compared > 100_000 and fused >= 6


@pytest.mark.slow
def test_quantized_conv_equals_xla_for_every_scheme_all_layers():
    compared, bad, fused = _every_scheme(np.random.default_rng(2), range(len(LAYERS)))
    print(f"\nquantized_conv onednn vs xla: {len(LAYERS)} layers x {len(SCHEMES)} schemes, "
          f"{compared:,} codes ({fused} fused calls), {bad} differ")  # fmt: skip
    assert bad == 0 and compared > 200_000 and fused >= 8


def test_fused_conv_program_has_no_xla_conv():
    rng = np.random.default_rng(3)
    x, (_, pw), b, out, opts = _layer(rng, 0, LAYERS[1])
    f = jax.jit(lambda x: quantized_conv(x, pw, b, out, activation="relu", **opts).values)
    hlo = f.lower(x).as_text()
    assert _onednn.UKERNEL_Q8_CONV_TARGET in hlo and "convolution" not in hlo
    assert conv_kernel("onednn", 2, groups=16, dilation=2) == conv_kernel("auto", 1) == "onednn"


def test_folded_requantization_gives_the_same_codes():
    """fold_requant: the epilogue vectors computed once at prepare time; the layer is then
    one native call (no other op on the weight's side), the same codes; a call with other
    qparams or scheme is an error."""
    rng = np.random.default_rng(4)
    compared = bad = 0
    for i in (0, 1, 2, 5):  # the layers above that the fused call runs
        x, (pw_xla, pw), b, out, opts = _layer(rng, i, LAYERS[i])
        for scheme in ("fbgemm", "qnnpack", "onednn"):
            act = "relu" if i % 2 else None
            folded = fold_requant(pw, x.qparams, b, out, scheme=scheme, activation=act)
            assert folded.folded is not None and len(folded.epilogue) == 5

            def f(x, p, b, out, scheme=scheme, act=act, opts=opts):
                return quantized_conv(x, p, b, out, scheme=scheme, activation=act, **opts).values

            want = np.asarray(jax.jit(f)(x, pw_xla, b, out))
            got = np.asarray(jax.jit(f)(x, folded, b, out))  # weight, qparams: jit arguments
            compared += want.size
            bad += int((got != want).sum())
    print(f"\nfolded oneDNN conv vs xla: {compared:,} codes, {bad} differ")
    assert bad == 0 and compared > 20_000
    hlo = jax.jit(f).lower(x, folded, b, out).compile().as_text()
    # no coefficient left: the NCHW transposes, the pad value and the int8 codes' flip to
    # uint8 (the padding itself is a native call)
    assert hlo.count("fusion(") <= 4 and "qjax_pad_nhwc" in hlo
    with pytest.raises(ValueError, match="folded for"):
        quantized_conv(x, folded, b, out, scheme="fbgemm" if scheme != "fbgemm" else "qnnpack",
                       activation=act, **opts)  # fmt: skip
    other = QParams(out.scale * 2, out.zero_point, out.spec)
    with pytest.raises(ValueError, match="folded for"):
        quantized_conv(x, folded, b, other, scheme=scheme, activation=act, **opts)
    with pytest.raises(ValueError, match="nothing to fold"):
        fold_requant(pw, x.qparams, b, out, scheme="tflite")
    with pytest.raises(TypeError, match="concrete"):
        jax.jit(lambda s: fold_requant(pw, QParams(s, 3, x.spec), b, out).packed)(x.scale)
