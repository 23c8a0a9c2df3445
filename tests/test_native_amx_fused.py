"""The fused AMX linear (``qjax_amx_q8_gemm``: dot + zero-point correction + requantize
in one native call): its codes, checked at run time.

* fused codes == the XLA path's codes for ``"fbgemm"`` and ``"qnnpack"`` x {per-tensor,
  per-channel weights} x {None, relu, relu6, hardtanh} x {uint8, int8 inputs} x {with,
  without bias}, on three data sets each: random; tie-heavy (power-of-two scales, so the
  multiplier is 2^-j and odd accumulators land ``y·M`` on .5); extreme (bias of ±1e9
  saturating at lo/hi, and ``scale_out = 0``: an infinite multiplier, ``0·inf = NaN``);
* == torch's ``quantized::linear[_relu]`` under the fbgemm and qnnpack engines;
* the fused path is taken exactly when it should be (``_native.fusable``).

Counts are printed (``pytest -s``). Skipped, with ``native_status()``'s reason, where the
CPU or the toolchain lacks AMX.
"""

from __future__ import annotations

import functools
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qjax import QParams, QuantSpec
from qjax.kernels import (
    QArray,
    _native,
    native_status,
    prepare_conv,
    prepare_linear,
    quantized_conv,
    quantized_linear,
)

try:
    import torch
except ImportError:
    torch = None

_OK, _REASON = native_status()
pytestmark = pytest.mark.skipif(not _OK, reason=f"native AMX kernel unavailable: {_REASON}")

ACTIVATIONS = (None, "relu", "relu6", "hardtanh")
COMBOS = tuple(
    (s, a, hb) for s in _native.FUSED_SCHEMES for a in ACTIVATIONS for hb in (False, True)
)


def _weights(rng, k, n, *, per_channel, tie):
    if tie:
        wv = rng.integers(-3, 4, (k, n))
        sw = 2.0 ** -rng.integers(2, 5, n if per_channel else 1)
    else:
        wv = rng.integers(-127, 128, (k, n))
        sw = rng.uniform(0.002, 0.02, n if per_channel else 1)
    wv = jnp.asarray(wv, jnp.int8)
    if per_channel:
        qp = QParams(
            jnp.asarray(sw, jnp.float32),
            jnp.zeros(n, jnp.int32),
            QuantSpec(signed=True, symmetric=True, axis=1),
        )
    else:
        qp = QParams(jnp.float32(sw[0]), jnp.int32(0), QuantSpec(signed=True))
    w = QArray(wv, qp)
    return prepare_linear(w, name="fc"), prepare_linear(w, name="fc", kernel="amx")


@functools.partial(jax.jit, static_argnames=("combos",))
def _both_paths(x, pw_xla, pw_amx, b, out, *, combos):
    res = []
    for scheme, act, has_bias in combos:
        bounds = (-0.4, 0.9) if act == "hardtanh" else None
        for pw in (pw_xla, pw_amx):
            y = quantized_linear(
                x, pw, b if has_bias else None, out, scheme=scheme, activation=act, bounds=bounds
            )
            res.append(y.values.astype(jnp.int32))
    return jnp.stack(res)


def _data(rng, kind, m, k, n, signed_x, signed_out):
    """x, bias, out qparams of one data set: 'random', 'tie' or 'extreme'."""
    lo, hi = (-128, 127) if signed_x else (0, 255)
    xspec, ospec = QuantSpec(signed=signed_x), QuantSpec(signed=signed_out)
    zo = jnp.int32(3 if signed_out else 130)
    if kind == "tie":
        zx = 5 if signed_x else 120
        xv = rng.integers(-3, 4, (m, k)) + zx
        sx = 2.0 ** -int(rng.integers(1, 4))
        # bias on multiples of s_x·2^-2 (s_w is 2^-2 .. 2^-4): b/(s_x·s_w) is an integer
        bias = rng.integers(-20, 21, n) * sx * 2.0**-2
        so = sx * 2.0**-1  # M = s_x·s_w/s_o = 2 s_w = 2^-1 .. 2^-3: many exact .5 products
    else:
        zx = -5 if signed_x else 120
        xv = rng.integers(lo, hi + 1, (m, k))
        sx = 0.02
        bias = rng.normal(0, 0.3, n)
        so = 0.05
    if kind == "extreme":
        bias = np.where(np.arange(n) % 3 == 0, 1e9, np.where(np.arange(n) % 3 == 1, -1e9, 0.0))
        so = 0.0  # an infinite multiplier; 0·inf = NaN where y == 0
        xv[0] = zx  # row 0: acc == 0, so NaN (-> zp) in the channels without bias
    x = QArray(
        jnp.asarray(xv, jnp.int8 if signed_x else jnp.uint8),
        QParams(jnp.float32(sx), jnp.int32(zx), xspec),
    )
    out = QParams(jnp.float32(so), zo, ospec)
    return x, jnp.asarray(bias, jnp.float32), out


def _check(rng, cases, kinds, label):
    m, k, n = 37, 100, 45
    compared = bad = 0
    seen = {}
    for signed_x, per_channel in cases:
        for kind in kinds:
            pw_xla, pw_amx = _weights(rng, k, n, per_channel=per_channel, tie=kind == "tie")
            assert _native.fusable(
                pw_amx,
                QArray(jnp.zeros((1, k), jnp.uint8), QParams(0.1, 0, QuantSpec(signed=False))),
                None,
                QParams(0.1, 0, QuantSpec()),
                "fbgemm",
            )
            signed_out = not signed_x if len(cases) < 4 else signed_x != per_channel
            x, b, out = _data(rng, kind, m, k, n, signed_x, signed_out)
            got = np.asarray(_both_paths(x, pw_xla, pw_amx, b, out, combos=COMBOS))
            compared += got[1::2].size
            bad += int((got[0::2] != got[1::2]).sum())
            seen[kind] = seen.get(kind, set()) | set(np.unique(got).tolist())
    print(f"\nfused amx vs xla ({label}): {compared:,} codes, {bad} differ")
    assert bad == 0
    if "random" in seen:
        assert len(seen["random"]) > 40  # codes spread, not all clamped
    if "extreme" in seen:  # saturation at both ends of int8 and uint8 ranges
        assert {-128, 127, 0, 255} <= seen["extreme"]


def test_fused_equals_xla_path(rng):
    # every scheme x activation x bias combination; input kinds and weight kinds paired
    _check(rng, ((False, True), (True, False)), ("random", "tie", "extreme"), "default")


@pytest.mark.slow
def test_fused_equals_xla_path_full_product(rng):
    cases = ((False, True), (False, False), (True, True), (True, False))
    _check(rng, cases, ("random", "tie", "extreme"), "full")


def test_tie_cases_do_tie(rng):
    """The tie data set really puts many ``y·M`` on .5 (so round-half-even matters)."""
    _, pw = _weights(rng, 100, 45, per_channel=True, tie=True)
    x, b, out = _data(rng, "tie", 37, 100, 45, False, False)
    xi = np.asarray(x.values, np.int64) - int(x.zero_point)
    acc = xi @ np.asarray(pw.weight.values, np.int64)
    mult = np.float64(x.scale) * np.asarray(pw.weight.scale, np.float64) / np.float64(out.scale)
    frac = np.abs((acc * mult) % 1.0 - 0.5) == 0
    print(f"\ntie data set: {frac.mean():.1%} of the products are exact ties")
    assert frac.mean() > 0.2


def test_fused_path_taken_only_where_it_applies(rng):
    k, n = 64, 16
    wv = jnp.asarray(rng.integers(-127, 128, (k, n)), jnp.int8)
    wzp = QArray(wv, QParams(jnp.float32(0.01), jnp.int32(4), QuantSpec(signed=True)))
    w0 = QArray(wv, QParams(jnp.float32(0.01), jnp.int32(0), QuantSpec(signed=True)))
    x = QArray(jnp.zeros((2, k), jnp.uint8), QParams(0.02, 128, QuantSpec(signed=False)))
    out = QParams(jnp.float32(0.03), jnp.int32(100), QuantSpec(signed=False))

    def targets(w, scheme, accumulate="exact"):
        f = jax.jit(
            lambda x: quantized_linear(x, w, None, out, scheme=scheme, accumulate=accumulate).values
        )
        hlo = f.lower(x).compile().as_text()
        return (_native.QTARGET in hlo, _native.TARGET in hlo)

    amx0 = prepare_linear(w0, kernel="amx")
    assert targets(amx0, "fbgemm") == (True, False)
    assert targets(amx0, "qnnpack") == (True, False)
    assert targets(amx0, "onednn") == (False, True)  # other schemes: dot + XLA epilogue
    assert targets(amx0, "fbgemm", "fbgemm_sat16") == (False, False)
    assert targets(prepare_linear(wzp, kernel="amx"), "fbgemm") == (False, True)  # zp_w != 0
    assert targets(prepare_linear(w0), "fbgemm") == (False, False)  # XLA kernel unchanged


# ----------------------------------------------------------------------------------------
# == torch


@functools.partial(jax.jit, static_argnames=("scheme", "relu"))
def _fused_layer(x, pw, b, out, *, scheme, relu):
    act = "relu" if relu else None
    return quantized_linear(x, pw, b, out, scheme=scheme, activation=act).values


@pytest.mark.skipif(torch is None, reason="needs torch (the [torch] extra)")
@pytest.mark.parametrize("engine", ["fbgemm", "qnnpack"])
def test_fused_codes_equal_torch(engine, rng):
    torch.backends.quantized.engine = engine
    torch.set_num_threads(1)
    n_out = bad = 0
    for (m, k, n), per_channel, relu in (
        ((1, 784, 10), True, True),
        ((17, 65, 33), False, False),
        ((32, 300, 100), True, False),
        ((3, 130, 17), False, True),
    ):
        for case in range(4):
            tie = case % 2 == 1
            if tie:  # power-of-two scales, small codes: many exact .5 products
                zx = int(rng.integers(3, 253))
                xq = (rng.integers(-3, 4, (m, k)) + zx).astype(np.uint8)
                wq = rng.integers(-3, 4, (k, n)).astype(np.int8)
                sx = 2.0 ** -float(rng.integers(2, 6))
                sw = (2.0 ** -rng.integers(3, 7, n if per_channel else 1)).astype(np.float32)
                bias = (rng.integers(-40, 41, n) * sx * 2.0**-7).astype(np.float32)
                so = sx * 2.0 ** -float(rng.integers(3, 6))
            else:
                zx = int(rng.integers(0, 256))
                xq = rng.integers(0, 256, (m, k)).astype(np.uint8)
                wq = rng.integers(-127, 128, (k, n)).astype(np.int8)
                sx = float(rng.uniform(0.005, 0.05))
                sw = rng.uniform(0.001, 0.01, n if per_channel else 1).astype(np.float32)
                bias = (rng.standard_normal(n) * 0.5).astype(np.float32)
                so = float(sx * np.median(sw) * np.sqrt(k) * 74.0 * 60 / 40)
            zo = int(rng.integers(0, 256))
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
                    tw = torch._make_per_tensor_quantized_tensor(wt, float(sw[0]), 0)
                tx = torch._make_per_tensor_quantized_tensor(torch.from_numpy(xq), sx, zx)
                op = torch.ops.quantized.linear_relu if relu else torch.ops.quantized.linear
                packed = torch.ops.quantized.linear_prepack(tw, torch.from_numpy(bias))
                ref = op(tx, packed, so, zo).int_repr().numpy()
            if per_channel:
                wqp = QParams(
                    jnp.asarray(sw), jnp.zeros(n, jnp.int32), QuantSpec(axis=1, symmetric=True)
                )
            else:
                wqp = QParams(jnp.float32(sw[0]), jnp.int32(0), QuantSpec(signed=True))
            pw = prepare_linear(QArray(jnp.asarray(wq), wqp), kernel="amx")
            xspec = QuantSpec(signed=False)
            x = QArray(jnp.asarray(xq), QParams(jnp.float32(sx), jnp.int32(zx), xspec))
            out = QParams(jnp.float32(so), jnp.int32(zo), xspec)
            got = np.asarray(_fused_layer(x, pw, jnp.asarray(bias), out, scheme=engine, relu=relu))
            n_out += ref.size
            bad += int((got != ref).sum())
    print(f"\nfused amx vs torch {engine}: {n_out:,} output codes, {bad} differ")
    assert bad == 0 and n_out > 15_000


# ----------------------------------------------------------------------------------------
# the fused conv


@functools.partial(jax.jit, static_argnames=("combos", "layout", "stride", "padding"))
def _conv_both(x, pw_xla, pw_amx, b, out, *, combos, layout, stride, padding):
    res = []
    for scheme, act, has_bias in combos:
        bounds = (-0.4, 0.9) if act == "hardtanh" else None
        for pw in (pw_xla, pw_amx):
            y = quantized_conv(
                x,
                pw,
                b if has_bias else None,
                out,
                scheme=scheme,
                activation=act,
                bounds=bounds,
                layout=layout,
                stride=stride,
                padding=padding,
            )
            res.append(y.values.astype(jnp.int32))
    return jnp.stack(res)


def test_fused_conv_equals_xla_path(rng):
    compared = bad = 0
    combos = tuple((s, a, hb) for s, a, hb in COMBOS if (a is None) == hb or a == "relu6")
    for layout, stride, padding, signed, per_channel, tie in (
        ("NHWC", 1, "SAME", False, True, False),
        ("NCHW", (1, 2), ((0, 1), (2, 0)), True, False, False),
        ("NHWC", 2, "VALID", False, False, True),
    ):
        c, o = 12, 20
        spec = QuantSpec(signed=True, symmetric=True, axis=0 if per_channel else None)
        if tie:
            wv, sw, sx, so = rng.integers(-3, 4, (o, c, 3, 3)), 2.0**-3, 2.0**-2, 2.0**-6
        else:
            wv, sw, sx, so = rng.integers(-127, 128, (o, c, 3, 3)), 0.01, 0.02, 0.05
        scale = jnp.asarray(rng.uniform(0.5, 1.5, o) * sw if per_channel and not tie else sw)
        wqp = QParams(scale.astype(jnp.float32), jnp.zeros(scale.shape, jnp.int32), spec)
        w = QArray(jnp.asarray(wv, jnp.int8), wqp)
        pw_xla, pw_amx = prepare_conv(w, name="c"), prepare_conv(w, name="c", kernel="amx")
        shape = (2, c, 11, 13) if layout == "NCHW" else (2, 11, 13, c)
        zx = -3 if signed else 125
        if tie:
            xv = rng.integers(-3, 4, shape) + zx
        else:
            xv = rng.integers(-128, 128, shape) if signed else rng.integers(0, 256, shape)
        xspec = QuantSpec(signed=signed)
        x = QArray(
            jnp.asarray(xv, jnp.int8 if signed else jnp.uint8),
            QParams(jnp.float32(sx), jnp.int32(zx), xspec),
        )
        out = QParams(jnp.float32(so), jnp.int32(3 if signed else 60), QuantSpec(signed=signed))
        b = jnp.asarray(rng.integers(-9, 10, o) * sx * sw, jnp.float32)
        kw = dict(combos=combos, layout=layout, stride=stride, padding=padding)
        got = np.asarray(_conv_both(x, pw_xla, pw_amx, b, out, **kw))
        compared += got[1::2].size
        bad += int((got[0::2] != got[1::2]).sum())
        assert len(np.unique(got)) > 10
    print(f"\nfused amx vs xla quantized_conv: {compared:,} codes, {bad} differ")
    assert bad == 0
    # the program: one fused conv call, no int32 output-sized pass
    f = jax.jit(lambda x, pw: quantized_conv(x, pw, b, out, layout="NHWC", padding="SAME").values)
    xn = QArray(jnp.zeros((2, 11, 13, c), jnp.uint8), QParams(0.02, 125, QuantSpec(signed=False)))
    pw = prepare_conv(
        QArray(jnp.asarray(wv, jnp.int8), QParams(0.01, 0, QuantSpec(signed=True))), kernel="amx"
    )
    hlo = f.lower(xn, pw).compile().as_text()
    assert hlo.count("custom_call_target=") == 1 and _native.QCONV_TARGET in hlo
    assert "s32[2,11,13,20]" not in hlo


def test_fused_vmap_batch_dims_and_two_thread_split(rng):
    """Leading batch dims and ``vmap`` fold into M; a call above 2^31 multiply-adds splits
    its N tiles over two threads (each tile's epilogue on the thread that computed it)."""
    out = QParams(jnp.float32(0.4), jnp.int32(7), QuantSpec(signed=False))
    xspec = QParams(jnp.float32(0.02), jnp.int32(128), QuantSpec(signed=False))

    def both(xv, k, n):
        pw_xla, pw_amx = _weights(rng, k, n, per_channel=True, tie=False)
        b = jnp.asarray(rng.normal(0, 0.3, n), jnp.float32)
        f = jax.jit(lambda xv, pw: quantized_linear(QArray(xv, xspec), pw, b, out).values)
        return np.asarray(f(xv, pw_xla)), np.asarray(f(xv, pw_amx)), f, pw_amx

    xv = jnp.asarray(rng.integers(0, 256, (3, 5, 70)), jnp.uint8)
    ref, got, f, pw = both(xv, 70, 24)
    np.testing.assert_array_equal(got, ref)
    np.testing.assert_array_equal(np.asarray(jax.vmap(f, in_axes=(0, None))(xv, pw)), ref)
    before = _native.parallel_calls()
    xv = jnp.asarray(rng.integers(0, 256, (2048, 1024)), jnp.uint8)
    ref, got, _, _ = both(xv, 1024, 1040)
    assert _native.parallel_calls() > before  # the split was taken
    np.testing.assert_array_equal(got, ref)
    assert len(np.unique(ref)) > 40
