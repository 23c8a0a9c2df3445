"""Native AMX int8 GEMM (``prepare_linear(..., kernel="amx")``): exact, checked at run time.

* the raw int32 dot == the exact (int64 NumPy) sum and ``lax.dot_general`` over 24
  shapes covering every M, K and N tail of the 16x64 AMX tiles and both A paths (all
  280 M x K x N in the slow run), extreme codes at the largest K the overflow check
  allows, leading batch dims and ``vmap``;
* ``quantized_linear`` with an AMX-prepared weight == the XLA path for every scheme in
  ``SCHEMES`` and every fused activation, int8/uint8 activations, zero and non-zero
  weight zero points (the full scheme x activation product in the slow run);
* == torch's ``quantized::linear[_relu]`` (fbgemm engine) codes: 0 mismatches;
* one compile per shape, the same codes with and without ``jit`` and across batch sizes;
* the conv kernel (``prepare_conv(..., kernel="amx")``, implicit GEMM): int32 ==
  ``lax.conv_general_dilated`` over kernel sizes, strides and channel tails, and
  ``quantized_conv`` codes == the XLA path (NCHW/NHWC, padding, stride, zero points);
* unavailable kernel (probe monkeypatched) and build failures raise with the reason;
  ``jax.export`` refuses the custom call unless told otherwise.

Counts are printed (``pytest -s``). Skipped, with ``native_status()``'s reason, only
where the CPU or the toolchain lacks AMX support.
"""

from __future__ import annotations

import functools
import warnings

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
    native_status,
    prepare_conv,
    prepare_linear,
    quantized_conv,
    quantized_linear,
)
from qjax.kernels._native import _build

try:
    import torch
except ImportError:
    torch = None

_OK, _REASON = native_status()
pytestmark = pytest.mark.skipif(not _OK, reason=f"native AMX kernel unavailable: {_REASON}")

DN = (((1,), (0,)), ((), ()))
XSPEC = QuantSpec(signed=False)
WSPEC_C = QuantSpec(signed=True, symmetric=True, axis=1)
WSPEC_T = QuantSpec(signed=True)  # per-tensor, any zero point
ACTIVATIONS = (None, "relu", "relu6", "hardtanh")


@jax.jit
def _xla_dot(x, w):
    return lax.dot_general(
        x, w, (((x.ndim - 1,), (0,)), ((), ())), preferred_element_type=jnp.int32
    )


@jax.jit
def _amx_dot(x, packed, w):
    return _native.amx_dot(x, packed, w)


def _codes(rng, shape, lo=-128, hi=127):
    return jnp.asarray(rng.integers(lo, hi + 1, shape), jnp.int8)


# ----------------------------------------------------------------------------------------
# the raw int32 dot


M_SIZES = (1, 2, 15, 16, 17, 33, 64, 257)
K_SIZES = (1, 4, 63, 64, 65, 784, 1024)
N_SIZES = (1, 10, 16, 17, 1024)
# default run (24 shapes): every M with a K that takes the padded-copy path (K % 64 != 0)
# and one read in place (K % 64 == 0), every K and N several times; the full 8 x 7 x 5
# product is the slow test (one XLA compile per shape, ~0.1-0.3 s each)
SHAPES_FAST = [
    (m, k, N_SIZES[(i + j) % len(N_SIZES)])
    for i, m in enumerate(M_SIZES)
    for j, k in enumerate(
        (K_SIZES[i % 7], K_SIZES[(i + 3) % 7], (64, 1024)[i % 2] if i % 7 not in (3, 6) else 65)
    )
]
SHAPES_ALL = [(m, k, n) for m in M_SIZES for k in K_SIZES for n in N_SIZES]


def _check_dots(rng, shapes):
    values = bad = 0
    for m, k, n in shapes:
        x, w = _codes(rng, (m, k)), _codes(rng, (k, n))
        got = np.asarray(_amx_dot(x, _native.pack_weight(w), w))
        # int64 NumPy matmul: the exact sum, independent of XLA
        ref = np.asarray(x, np.int64) @ np.asarray(w, np.int64)
        values += ref.size
        bad += int((got != ref).sum())
    print(f"\namx dot vs exact: {len(shapes)} shapes, {values:,} int32 values, {bad} differ")
    return values, bad


def test_dot_is_exact_over_tile_tails(rng):
    values, bad = _check_dots(rng, SHAPES_FAST)
    assert bad == 0 and values > 150_000
    # and the same integers as XLA's dot_general on the largest tails
    for m, k, n in ((257, 1024, 1024), (33, 65, 17)):
        x, w = _codes(rng, (m, k)), _codes(rng, (k, n))
        np.testing.assert_array_equal(
            np.asarray(_amx_dot(x, _native.pack_weight(w), w)), np.asarray(_xla_dot(x, w))
        )


@pytest.mark.slow
def test_dot_is_exact_over_all_tile_tails(rng):
    values, bad = _check_dots(rng, SHAPES_ALL)
    assert bad == 0 and values > 2_000_000


def test_two_thread_split_is_exact(rng):
    """Calls above 2^31 multiply-adds hand half the tiles to XLA's pool: same integers."""
    before = _native.parallel_calls()
    x, w = _codes(rng, (2048, 1024)), _codes(rng, (1024, 1040))
    got = np.asarray(_amx_dot(x, _native.pack_weight(w), w))
    np.testing.assert_array_equal(got, np.asarray(_xla_dot(x, w)))
    xc, wc = _codes(rng, (10, 58, 58, 64)), _codes(rng, (3, 3, 64, 128))
    got = np.asarray(_amx_conv(xc, _native.pack_conv_weight(wc), wc, (1, 1)))
    dn = ("NHWC", "HWIO", "NHWC")
    ref = lax.conv_general_dilated(
        xc, wc, (1, 1), "VALID", dimension_numbers=dn, preferred_element_type=jnp.int32
    )
    np.testing.assert_array_equal(got, np.asarray(ref))
    assert _native.parallel_calls() - before == 2


def _largest_safe_k(w_code: int, max_abs_x: int = 255) -> int:
    """The largest K that ``prepare_linear``'s overflow check accepts for constant codes."""
    return (2**31 - 1) // max(max_abs_x * abs(w_code), 128 * abs(w_code))


@pytest.mark.parametrize("x_code, w_code", [(-128, -128), (127, -128)])
def test_extreme_codes_at_largest_allowed_k(x_code, w_code):
    k = _largest_safe_k(w_code)
    spec = QuantSpec(signed=True, symmetric=True)
    w = QArray(jnp.full((k, 17), w_code, jnp.int8), QParams(0.1, 0, spec))
    pw = prepare_linear(w, kernel="amx")  # the check passes at this K ...
    with pytest.raises(ValueError, match="overflow"):  # ... and fails one row later
        prepare_linear(QArray(jnp.full((k + 1, 17), w_code, jnp.int8), w.qparams))
    x = jnp.full((17, k), x_code, jnp.int8)
    got = np.asarray(_amx_dot(x, pw.packed, w.values))
    exact = k * x_code * w_code  # Python int: no wrap-around
    assert abs(exact) <= 2**31 - 1
    assert (got == exact).all(), (k, exact, np.unique(got))
    np.testing.assert_array_equal(got, np.asarray(_xla_dot(x, w.values)))


def test_leading_batch_dims_and_vmap(rng):
    w = _codes(rng, (65, 33))
    p = _native.pack_weight(w)
    x = _codes(rng, (2, 3, 5, 65))
    ref = np.asarray(_xla_dot(x, w))
    np.testing.assert_array_equal(np.asarray(_amx_dot(x, p, w)), ref)
    vm = jax.jit(jax.vmap(_native.amx_dot, in_axes=(0, None, None)))
    np.testing.assert_array_equal(np.asarray(vm(x, p, w)), ref)
    # a batched packed weight is refused by the kernel, not misread
    with pytest.raises(Exception, match="batched"):
        jax.vmap(_native.amx_dot, in_axes=(None, 0, None))(x[0, 0], jnp.stack([p, p]), w)


def test_pack_weight_layout(rng):
    """``packed[nt, kt, r, 4c + q] == w[64kt + 4r + q, 16nt + c]``, zeros past K and N."""
    k, n = 70, 20
    w = np.asarray(_codes(rng, (k, n)))
    p = np.asarray(_native.pack_weight(jnp.asarray(w)))
    assert p.shape == (2, 2, 16, 64)
    for nt, kt, r, c, q in np.ndindex(2, 2, 16, 16, 4):
        kk, nn = 64 * kt + 4 * r + q, 16 * nt + c
        want = w[kk, nn] if kk < k and nn < n else 0
        assert p[nt, kt, r, 4 * c + q] == want


# ----------------------------------------------------------------------------------------
# quantized_linear: AMX == XLA path for every scheme and activation


def _layer(rng, k, n, *, per_channel, wzp=0):
    wv = _codes(rng, (k, n), -127, 127)
    if per_channel:
        qp = QParams(
            jnp.asarray(rng.uniform(0.002, 0.02, n), jnp.float32), jnp.zeros(n, jnp.int32), WSPEC_C
        )
    else:
        qp = QParams(jnp.float32(0.01), jnp.int32(wzp), WSPEC_T)
    w = QArray(wv, qp)
    return prepare_linear(w, name="fc"), prepare_linear(w, name="fc", kernel="amx")


def _combos(full):
    if full:
        return tuple((s, a) for s in SCHEMES for a in ACTIVATIONS)
    # every scheme once and every activation twice
    return tuple((s, ACTIVATIONS[i % len(ACTIVATIONS)]) for i, s in enumerate(SCHEMES))


@functools.partial(jax.jit, static_argnames=("signed", "combos"))
def _all_schemes(x, pw_xla, pw_amx, b, *, signed, combos):
    ospec = QuantSpec(signed=signed)
    out = QParams(jnp.float32(0.05), jnp.int32(3 if signed else 130), ospec)
    res = []
    for scheme, act in combos:
        bounds = (-0.4, 0.9) if act == "hardtanh" else None
        for pw in (pw_xla, pw_amx):
            y = quantized_linear(x, pw, b, out, scheme=scheme, activation=act, bounds=bounds)
            res.append(y.values.astype(jnp.int32))
    return jnp.stack(res)


def _check_schemes(rng, signed, full):
    m, k, n = 37, 200, 45
    lo, hi = (-128, 127) if signed else (0, 255)
    xv = jnp.asarray(rng.integers(lo, hi + 1, (m, k)), jnp.int8 if signed else jnp.uint8)
    xqp = QParams(jnp.float32(0.02), jnp.int32(-5 if signed else 120), QuantSpec(signed=signed))
    x = QArray(xv, xqp)
    b = jnp.asarray(rng.normal(0, 0.3, n), jnp.float32)
    combos = _combos(full)
    compared = bad = 0
    kinds = ((True, 0), (False, 4))  # per-channel symmetric; per-tensor with zp 4
    for per_channel, wzp in kinds if full else kinds[signed : signed + 1]:
        pw_xla, pw_amx = _layer(rng, k, n, per_channel=per_channel, wzp=wzp)
        assert pw_amx.zero_point_is_zero == (wzp == 0)
        out = np.asarray(_all_schemes(x, pw_xla, pw_amx, b, signed=signed, combos=combos))
        compared += out[1::2].size
        bad += int((out[0::2] != out[1::2]).sum())
        assert len(np.unique(out)) > 20  # codes spread, not all clamped
    print(
        f"\namx vs xla, signed x={signed}: {compared:,} codes over {len(combos)} "
        f"scheme/activation pairs, {bad} differ"
    )
    assert bad == 0


@pytest.mark.parametrize("signed", [False, True])
def test_quantized_linear_amx_equals_xla_every_scheme(signed, rng):
    _check_schemes(rng, signed, full=False)


@pytest.mark.slow
@pytest.mark.parametrize("signed", [False, True])
def test_quantized_linear_amx_equals_xla_scheme_activation_product(signed, rng):
    _check_schemes(rng, signed, full=True)


# ----------------------------------------------------------------------------------------
# AMX == torch fbgemm


@functools.partial(jax.jit, static_argnames=("relu",))
def _amx_layer(x, pw, b, out, *, relu):
    return quantized_linear(x, pw, b, out, scheme="fbgemm", activation="relu" if relu else None)


@pytest.mark.skipif(torch is None, reason="needs torch (the [torch] extra)")
def test_amx_codes_equal_torch_fbgemm(rng):
    torch.backends.quantized.engine = "fbgemm"
    torch.set_num_threads(1)
    n_out = bad = 0
    # one compile per (shape, weight kind, relu); fresh codes and qparams per case
    for (m, k, n), per_channel, relu in (
        ((1, 784, 10), True, True),
        ((17, 65, 33), False, False),
        ((32, 300, 100), True, False),
        ((3, 1024, 17), False, True),
    ):
        for _ in range(4):
            wzp = 0 if per_channel else int(rng.integers(-10, 11))
            xq = rng.integers(0, 256, (m, k)).astype(np.uint8)
            wq = rng.integers(-127, 128, (k, n)).astype(np.int8)
            sx, zx = float(rng.uniform(0.005, 0.05)), int(rng.integers(0, 256))
            sw = rng.uniform(0.001, 0.01, n if per_channel else 1).astype(np.float32)
            bias = (rng.standard_normal(n) * 0.5).astype(np.float32)
            acc_std = np.sqrt(k) * 74.0 * 60
            so, zo = float(sx * np.median(sw) * acc_std / 40), int(rng.integers(0, 256))
            wt = torch.from_numpy(np.ascontiguousarray(wq.T))
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                if per_channel:
                    tw = torch._make_per_channel_quantized_tensor(
                        wt,
                        torch.from_numpy(sw.astype(np.float64)),
                        torch.zeros(n, dtype=torch.long),
                        0,
                    )
                else:
                    tw = torch._make_per_tensor_quantized_tensor(wt, float(sw[0]), wzp)
                tx = torch._make_per_tensor_quantized_tensor(torch.from_numpy(xq), sx, zx)
            op = torch.ops.quantized.linear_relu if relu else torch.ops.quantized.linear
            packed = torch.ops.quantized.linear_prepack(tw, torch.from_numpy(bias))
            ref = op(tx, packed, so, zo).int_repr().numpy()
            if per_channel:
                wqp = QParams(jnp.asarray(sw), jnp.zeros(n, jnp.int32), WSPEC_C)
            else:
                wqp = QParams(jnp.float32(sw[0]), jnp.int32(wzp), WSPEC_T)
            pw = prepare_linear(QArray(jnp.asarray(wq), wqp), kernel="amx")
            x = QArray(jnp.asarray(xq), QParams(jnp.float32(sx), jnp.int32(zx), XSPEC))
            out = QParams(jnp.float32(so), jnp.int32(zo), XSPEC)
            got = np.asarray(_amx_layer(x, pw, jnp.asarray(bias), out, relu=relu).values)
            n_out += ref.size
            bad += int((got != ref).sum())
    print(f"\namx vs torch fbgemm: {n_out:,} output codes, {bad} differ")
    assert bad == 0 and n_out > 15_000


# ----------------------------------------------------------------------------------------
# the program


def test_one_compile_per_shape_jit_equals_eager_and_batch_split(rng):
    _, pw = _layer(rng, 130, 40, per_channel=True)
    out = QParams(jnp.float32(0.03), jnp.int32(100), XSPEC)
    b = jnp.asarray(rng.normal(0, 0.2, 40), jnp.float32)
    traces = []

    @jax.jit
    def f(x, pw):
        traces.append(x.shape)
        return quantized_linear(x, pw, b, out, activation="relu").values

    xv = jnp.asarray(rng.integers(0, 256, (256, 130)), jnp.uint8)
    xqp = QParams(jnp.float32(0.02), jnp.int32(128), XSPEC)
    full = np.asarray(f(QArray(xv, xqp), pw))
    for _ in range(3):
        f(QArray(xv, xqp), pw)
    assert traces == [(256, 130)]
    eager = quantized_linear(QArray(xv, xqp), pw, b, out, activation="relu").values
    np.testing.assert_array_equal(np.asarray(eager), full)
    parts = [np.asarray(f(QArray(xv[i : i + s], xqp), pw)) for i, s in ((0, 1), (1, 32), (33, 223))]
    np.testing.assert_array_equal(np.concatenate(parts), full)
    assert len(traces) == 4  # one per new shape
    # the compiled CPU program is one fused native call: no dot, no int32 (M, N) pass
    hlo = f.lower(QArray(xv, xqp), pw).compile().as_text()
    assert hlo.count("custom_call_target=") == 1
    assert f'custom_call_target="{_native.QTARGET}"' in hlo and "dot(" not in hlo
    assert "s32[256,40]" not in hlo and "f32[256,40]" not in hlo


def test_prepared_pytree_roundtrip_and_xla_aux_unchanged(rng):
    pw_xla, pw_amx = _layer(rng, 20, 7, per_channel=True)
    leaves, tree = jax.tree_util.tree_flatten(pw_amx)
    assert len(leaves) == len(jax.tree_util.tree_leaves(pw_xla)) + 1
    back = jax.tree_util.tree_unflatten(tree, leaves)
    assert back.kernel == "amx" and back.packed.shape == (1, 1, 16, 64)
    assert pw_xla.kernel == "xla" and pw_xla.packed is None
    assert pw_xla.tree_flatten()[1] == ("fc", 255, True)  # the pre-AMX aux, unchanged
    # re-preparing keeps the kernel; asking for AMX upgrades an XLA-prepared weight
    assert prepare_linear(pw_amx).kernel == "amx"
    assert prepare_linear(pw_xla, kernel="amx").kernel == "amx"
    keys = [jax.tree_util.keystr(k) for k, _ in jax.tree_util.tree_flatten_with_path(pw_amx)[0]]
    assert any(".packed" in k for k in keys)


def test_export_refuses_the_custom_call_unless_allowed(rng):
    pw_xla, pw_amx = _layer(rng, 64, 16, per_channel=True)
    x = QArray(jnp.asarray(rng.integers(0, 256, (4, 64)), jnp.uint8), QParams(0.02, 128, XSPEC))
    out = QParams(jnp.float32(0.03), jnp.int32(100), XSPEC)
    f = jax.jit(lambda x, pw: quantized_linear(x, pw, None, out))
    with pytest.raises(ValueError, match=_native.QTARGET):
        jax.export.export(f)(x, pw_amx)
    allow = [jax.export.DisabledSafetyCheck.custom_call(_native.QTARGET)]
    exp = jax.export.export(f, disabled_checks=allow)(x, pw_amx)
    restored = jax.export.deserialize(exp.serialize())  # aux with the kernel round-trips
    y = restored.call(x, pw_amx)
    np.testing.assert_array_equal(y.values, f(x, pw_xla).values)


# ----------------------------------------------------------------------------------------
# convolution


CONV_CASES = [  # (N, H, W, C, O, kh, kw, stride)
    (2, 8, 8, 3, 5, 3, 3, (1, 1)),
    (1, 30, 30, 32, 64, 3, 3, (1, 1)),  # the int8 CNN benchmark's conv, one image
    (3, 9, 37, 16, 17, 3, 3, (2, 1)),
    (2, 10, 10, 8, 33, 1, 1, (1, 1)),
    (1, 7, 7, 70, 20, 5, 5, (1, 2)),
    (2, 30, 30, 3, 16, 2, 2, (2, 2)),
    (1, 5, 40, 1, 1, 1, 3, (1, 1)),
    (4, 3, 3, 70, 9, 3, 3, (1, 1)),  # every row reads the zero-padded tail copy
    (2, 4, 5, 2, 3, 2, 3, (1, 2)),
]


@functools.partial(jax.jit, static_argnums=3)
def _amx_conv(x, packed, w, stride):
    return _native.amx_conv2d(x, packed, w, stride)


def test_conv_int32_equals_conv_general_dilated(rng):
    values = bad = 0
    for n, h, w_, c, o, kh, kw, stride in CONV_CASES:
        x, w = _codes(rng, (n, h, w_, c)), _codes(rng, (kh, kw, c, o))
        got = np.asarray(_amx_conv(x, _native.pack_conv_weight(w), w, stride))
        ref = np.asarray(
            lax.conv_general_dilated(
                x,
                w,
                stride,
                "VALID",
                dimension_numbers=("NHWC", "HWIO", "NHWC"),
                preferred_element_type=jnp.int32,
            )
        )
        assert got.shape == ref.shape
        values += ref.size
        bad += int((got != ref).sum())
    print(
        f"\namx conv vs conv_general_dilated: {len(CONV_CASES)} shapes, {values:,} int32, "
        f"{bad} differ"
    )
    assert bad == 0 and values > 50_000


@functools.partial(jax.jit, static_argnames=("layout", "stride", "padding"))
def _qconv(x, pw, b, out, *, layout, stride, padding):
    return quantized_conv(
        x, pw, b, out, stride=stride, padding=padding, layout=layout, activation="relu"
    ).values


def test_quantized_conv_amx_equals_xla(rng):
    compared = bad = 0
    for layout, stride, padding, wzp, signed in (
        ("NCHW", 1, 1, 0, False),
        ("NHWC", 2, "SAME", 3, True),
        ("NCHW", (1, 2), ((0, 1), (2, 0)), 0, True),
    ):
        c, o = 12, 20
        spec = QuantSpec(signed=True, symmetric=not wzp, axis=None if wzp else 0)
        if wzp:
            wqp = QParams(jnp.float32(0.01), jnp.int32(wzp), spec)
        else:
            wqp = QParams(
                jnp.asarray(rng.uniform(0.002, 0.02, o), jnp.float32), jnp.zeros(o, jnp.int32), spec
            )
        w = QArray(_codes(rng, (o, c, 3, 3), -127, 127), wqp)
        pw_xla, pw_amx = prepare_conv(w, name="c"), prepare_conv(w, name="c", kernel="amx")
        shape = (2, c, 11, 13) if layout == "NCHW" else (2, 11, 13, c)
        lo, hi = (-128, 127) if signed else (0, 255)
        xv = jnp.asarray(rng.integers(lo, hi + 1, shape), jnp.int8 if signed else jnp.uint8)
        x = QArray(
            xv,
            QParams(jnp.float32(0.02), jnp.int32(-3 if signed else 125), QuantSpec(signed=signed)),
        )
        out = QParams(jnp.float32(0.05), jnp.int32(60), XSPEC)
        b = jnp.asarray(rng.normal(0, 0.3, o), jnp.float32)
        kw = dict(layout=layout, stride=stride, padding=padding)
        ref = np.asarray(_qconv(x, pw_xla, b, out, **kw))
        got = np.asarray(_qconv(x, pw_amx, b, out, **kw))
        compared += ref.size
        bad += int((got != ref).sum())
        assert len(np.unique(ref)) > 20
    print(f"\namx vs xla quantized_conv: {compared:,} codes, {bad} differ")
    assert bad == 0


def test_conv_amx_refuses_what_it_does_not_cover(rng):
    spec = QuantSpec(signed=True, symmetric=True)
    w = QArray(_codes(rng, (8, 2, 3, 3), -127, 127), QParams(0.1, 0, spec))
    with pytest.raises(ValueError, match=r"layer 'dw'.*kernel='amx'.*groups=1.*groups=2"):
        prepare_conv(w, name="dw", groups=2, kernel="amx")
    w1 = QArray(_codes(rng, (8, 2, 3), -127, 127), QParams(0.1, 0, spec))
    with pytest.raises(ValueError, match=r"2-D convolutions.*1-D"):
        prepare_conv(w1, weight_layout="OIW", kernel="amx")
    pw = prepare_conv(QArray(w.values[:, :1], w.qparams), name="c2", kernel="amx")
    assert (
        pw.kernel == "amx" and prepare_conv(prepare_conv(w, groups=2), kernel="xla").packed is None
    )
    x = QArray(jnp.zeros((1, 1, 9, 9), jnp.uint8), QParams(0.1, 0, XSPEC))
    with pytest.raises(ValueError, match=r"layer 'c2'.*dilation 1, got \(2, 2\)"):
        quantized_conv(x, pw, None, QParams(0.1, 0, XSPEC), dilation=2)


# ----------------------------------------------------------------------------------------
# availability and errors


def test_unavailable_kernel_raises_with_reason(monkeypatch, rng):
    w = QArray(_codes(rng, (8, 4)), QParams(0.1, 0, QuantSpec(symmetric=True)))
    monkeypatch.setattr(_native, "native_status", lambda: (False, "CPU lacks amx_int8 (test)"))
    with pytest.raises(RuntimeError, match=r"layer 'enc.fc1'.*kernel='amx'.*CPU lacks amx_int8"):
        prepare_linear(w, name="enc.fc1", kernel="amx")
    assert prepare_linear(w).kernel == "xla"  # the default path never asks
    with pytest.raises(ValueError, match=r"layer 'fc': kernel must be one of .*'gpu'"):
        prepare_linear(w, name="fc", kernel="gpu")


def test_build_cache_and_compiler_errors(tmp_path, monkeypatch):
    monkeypatch.setenv("QJAX_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("CXX", "/bin/false")
    with pytest.raises(_build.BuildError, match=r"compiling amx_gemm.cc failed \(/bin/false"):
        _build.build()
    assert not [p for p in (tmp_path / "cache").rglob("*") if p.is_file()]  # no half library
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-c++"))
    with pytest.raises(_build.BuildError, match="does not run"):
        _build.build()
    monkeypatch.delenv("CXX")
    monkeypatch.setattr(_build.shutil, "which", lambda name: None)
    with pytest.raises(_build.BuildError, match="no C\\+\\+ compiler found"):
        _build.build()


@pytest.mark.slow  # a fresh compile: 5-15 s
def test_fresh_build_is_cached(tmp_path, monkeypatch):
    import time

    monkeypatch.setenv("QJAX_CACHE_DIR", str(tmp_path))
    t0 = time.perf_counter()
    lib = _build.build()
    t1 = time.perf_counter()
    assert _build.build() == lib and lib.is_file()
    t2 = time.perf_counter()
    print(f"\nfresh build {t1 - t0:.1f} s, cached lookup {t2 - t1:.3f} s")
    assert [p.name for p in lib.parent.iterdir()] == [_build.LIB_NAME]
