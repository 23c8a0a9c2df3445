"""Requantization schemes: each formula against an independent NumPy implementation.

NumPy float32 arithmetic rounds every operation separately (no FMA contraction), so it
is the literal reading of the formulas in ``qjax.kernels._schemes``. The pools below are
large enough to contain inputs where contracting ``a·b + c`` into an FMA (as XLA's CPU
backend does unless prevented) changes the code; the tests check that such inputs exist
in the pool and that qjax still matches the separately rounded formula.
"""

from __future__ import annotations

import fractions
import math

import jax
import jax.extend as jex
import jax.numpy as jnp
import numpy as np
import pytest

from qjax import QParams, QuantSpec
from qjax.kernels import (
    SCHEMES,
    activation_bounds,
    multiply_by_quantized_multiplier,
    multiply_by_quantized_multiplier_single_rounding,
    quantize_multiplier,
    requant_exact,
    requant_fbgemm,
    requant_onednn,
    requant_tflite,
    requantize,
    rounding_divide_by_pot,
    saturating_rounding_doubling_high_mul,
)

F = np.float32
I32_MIN, I32_MAX = -(2**31), 2**31 - 1


def _clamp(v, zp, lo, hi):
    return np.clip(v + zp, lo, hi).astype(np.int64)


# ----------------------------------------------------------------------------------------
# NumPy references (float32, separately rounded) straight from NUMERICS.md


def np_fbgemm(acc, bias, sx, sw, so, zp, lo, hi, per_channel):
    ats = F(sx) * F(sw)
    m = ats / F(so)
    y = acc.astype(F)
    if bias is not None:
        y = y + (bias / ats if per_channel else bias * (F(1) / ats))
    return _clamp(np.rint(y * m), zp, lo, hi)


def np_qnnpack(acc, bias, sx, sw, so, zp, lo, hi):
    prod = F(sw) * F(sx)
    a = acc.astype(np.int64)
    if bias is not None:
        a = a + np.rint(bias * (F(1) / prod)).astype(np.int64)
    a = ((a + 2**31) % 2**32 - 2**31).astype(np.int32)  # int32 wrap
    rs = prod * (F(1) / F(so))
    return _clamp(np.rint(a.astype(F) * rs), zp, lo, hi)


def np_onednn(acc, bias, sx, sw, so, zp, lo, hi):
    one = F(1)
    sxp, swp = one / (one / F(sx)), one / (one / F(sw))
    y = (acc.astype(F) * sxp) * swp
    if bias is not None:
        y = y + bias
    v = np.rint(y * (one / F(so)) + F(zp))
    return np.clip(v, lo, hi).astype(np.int64)


def _fma32(a, b, c):
    return (np.float64(a) * np.float64(b) + np.float64(c)).astype(F)


def _pool(rng, n, per_channel, spread=60):
    """Random accumulators, scales and bias; output codes spread over about ±spread."""
    acc = np.round(rng.normal(0, 20_000, n)).astype(np.int32)
    sx = F(np.exp(rng.uniform(-6, -1)))
    sw = np.exp(rng.uniform(-8, -3, n if per_channel else ())).astype(F)
    so = F(sx * np.median(sw) * 20_000 / spread)
    bias = (rng.normal(0, 1, n) * so * spread / 2).astype(F)
    return acc, bias, sx, sw, so


def _jax(fn, acc, bias, sx, sw, so, zp, lo, hi, constants=False):
    """Run a scheme under jit, with the scales (and bias) as arguments or as constants."""
    b = None if bias is None else jnp.asarray(bias)
    q = (jnp.asarray(sx), jnp.asarray(sw), jnp.asarray(so))
    c = (jnp.int32(zp), jnp.int32(lo), jnp.int32(hi))
    if constants:
        out = jax.jit(lambda a: fn(a, b, *q, *c))(jnp.asarray(acc))
    else:
        out = jax.jit(fn)(jnp.asarray(acc), b, *q, *c)
    return np.asarray(out).astype(np.int64)


WIDE = (77, -(2**15), 2**15 - 1)  # zero point and clamp bounds that clamp almost nothing
NP_REFS = {
    "fbgemm": lambda a, b, sx, sw, so, zp, lo, hi: np_fbgemm(
        a, b, sx, sw, so, zp, lo, hi, np.ndim(sw) > 0
    ),
    "qnnpack": np_qnnpack,
    "onednn": np_onednn,
}


@pytest.mark.parametrize("scheme", sorted(NP_REFS))
@pytest.mark.parametrize("per_channel", [False, True])
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("constants", [False, True])
def test_float_scheme_matches_numpy(scheme, per_channel, with_bias, constants):
    rng = np.random.default_rng(100 * sorted(NP_REFS).index(scheme) + 2 * per_channel + with_bias)
    acc, bias, sx, sw, so = _pool(rng, 200_000, per_channel, spread=3000)
    bias = bias if with_bias else None
    want = NP_REFS[scheme](acc, bias, sx, sw, so, *WIDE)
    got = _jax(SCHEMES[scheme], acc, bias, sx, sw, so, *WIDE, constants=constants)
    np.testing.assert_array_equal(got, want)


# Each test below builds a pool where one compiler shortcut would change some codes,
# checks that it does (so the test has teeth), and that qjax does not take it.


@pytest.mark.parametrize("constants", [False, True])
def test_fbgemm_per_tensor_bias_is_not_fused_into_an_fma(constants):
    rng = np.random.default_rng(12)
    acc, bias, sx, sw, so = _pool(rng, 1_000_000, per_channel=False, spread=3000)
    ats = F(sx) * F(sw)
    fused = _fma32(bias, F(1) / ats, acc.astype(F))
    want = np_fbgemm(acc, bias, sx, sw, so, *WIDE, False)
    shortcut = _clamp(np.rint(fused * (ats / F(so))), *WIDE)
    assert (shortcut != want).sum() > 0
    got = _jax(requant_fbgemm, acc, bias, sx, sw, so, *WIDE, constants=constants)
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("constants", [False, True])
def test_fbgemm_multiplier_is_a_true_division(constants):
    # XLA rewrites x / broadcast(s) as x · (1/s): M = ats/s_out would be off by an ulp.
    rng = np.random.default_rng(14)
    acc, _, sx, sw, so = _pool(rng, 1_000_000, per_channel=True, spread=3000)
    ats = F(sx) * sw
    want = np_fbgemm(acc, None, sx, sw, so, *WIDE, True)
    shortcut = _clamp(np.rint(acc.astype(F) * (ats * (F(1) / F(so)))), *WIDE)
    assert (shortcut != want).sum() > 0
    got = _jax(requant_fbgemm, acc, None, sx, sw, so, *WIDE, constants=constants)
    np.testing.assert_array_equal(got, want)


def test_fbgemm_bias_formula_depends_on_granularity():
    rng = np.random.default_rng(13)
    ats = (F(0.01) * np.exp(rng.uniform(-3, 3, 100_000))).astype(F)
    b = rng.normal(0, 1, 100_000).astype(F)
    assert (b * (F(1) / ats) != b / ats).sum() > 0  # rule 11 really has two formulas


@pytest.mark.parametrize("per_channel", [False, True])
def test_onednn_is_not_fused_or_simplified(per_channel):
    rng = np.random.default_rng(31 + per_channel)
    acc, bias, sx, sw, so = _pool(rng, 1_000_000, per_channel, spread=3000)
    want = np_onednn(acc, bias, sx, sw, so, *WIDE)
    one = F(1)
    sxp, swp = one / (one / sx), one / (one / sw)
    y = (acc.astype(F) * sxp) * swp + bias
    fused = np.clip(np.rint(_fma32(y, one / so, F(WIDE[0]))), *WIDE[1:])
    assert (fused != want).sum() > 0  # contracting y·(1/s_out) + zp changes codes
    if per_channel:  # folding 1/(1/s) into s changes codes
        folded = np.clip(
            np.rint((((acc.astype(F) * sx) * sw + bias) * (one / so)) + F(77)), *WIDE[1:]
        )
        assert (folded != want).sum() > 0
    for constants in (False, True):
        got = _jax(requant_onednn, acc, bias, sx, sw, so, *WIDE, constants=constants)
        np.testing.assert_array_equal(got, want)


# ----------------------------------------------------------------------------------------
# TFLite fixed point: primitives against NumPy int64


def _edge_int32(rng, n):
    edges = np.array([I32_MIN, I32_MIN + 1, -(2**30), -3, -2, -1, 0, 1, 2, 3, 2**30, I32_MAX])
    r = rng.integers(I32_MIN, I32_MAX, n, endpoint=True)
    small = rng.integers(-70_000, 70_000, n)
    return np.concatenate([edges, r, small]).astype(np.int64)


def np_srdhm(a, b):
    ab = a * b
    n = ab + np.where(ab >= 0, 1 << 30, 1 - (1 << 30))
    q = np.abs(n) // (1 << 31) * np.sign(n)  # truncating division, as C++
    return np.where((a == I32_MIN) & (b == I32_MIN), I32_MAX, q)


def np_rdbpot(x, e):
    mask = (np.int64(1) << e) - 1
    rem = x & mask
    thr = (mask >> 1) + (x < 0)
    return (x >> e) + (rem > thr)


def test_srdhm_matches_int64(rng):
    a = _edge_int32(rng, 200_000)
    b = np.concatenate([a[12:][::-1], a[:12]])
    ab = np.stack(np.meshgrid(a[:12], a[:12])).reshape(2, -1)  # every pair of edges
    a, b = np.concatenate([a, ab[0]]), np.concatenate([b, ab[1]])
    got = saturating_rounding_doubling_high_mul(
        jnp.asarray(a, jnp.int32), jnp.asarray(b, jnp.int32)
    )
    np.testing.assert_array_equal(np.asarray(got), np_srdhm(a, b))


def test_rounding_divide_by_pot_matches_int64(rng):
    x = _edge_int32(rng, 20_000)
    for e in range(32):
        got = rounding_divide_by_pot(jnp.asarray(x, jnp.int32), e)
        np.testing.assert_array_equal(np.asarray(got), np_rdbpot(x, e), err_msg=f"e={e}")
    # per-element exponents
    e = rng.integers(0, 32, x.size)
    got = rounding_divide_by_pot(jnp.asarray(x, jnp.int32), jnp.asarray(e, jnp.int32))
    np.testing.assert_array_equal(np.asarray(got), np_rdbpot(x, e))


def np_quantize_multiplier(m, single):
    if m == 0:
        return 0, 0
    q, shift = math.frexp(m)
    qf = int(math.floor(q * 2.0**31 + 0.5))  # q > 0: half away from zero
    if qf == 2**31:
        qf, shift = qf // 2, shift + 1
    if shift < -31:
        return 0, 0
    if single and shift > 30:
        return 2**31 - 1, 30
    return qf, shift


@pytest.mark.parametrize("single", [False, True])
def test_quantize_multiplier_matches_reference(single, rng):
    ms = [
        0.0,
        1.0,
        0.5,
        0.75,
        2.0**-31,
        2.0**-32,
        2.0**-40,
        1 - 2.0**-40,
        2.0**31,
        3.0e9,
        0.1,
        1 / 3,
        2.0**30 * 1.5,
    ]
    ms += list(np.exp(rng.uniform(-25, 10, 3000)))
    ms = np.asarray(ms, np.float64)
    want = [np_quantize_multiplier(float(m), single) for m in ms]
    qm, sh = quantize_multiplier(ms, single_rounding=single)  # float64 input kept
    np.testing.assert_array_equal(np.asarray(qm), [w[0] for w in want])
    np.testing.assert_array_equal(np.asarray(sh), [w[1] for w in want])
    # under jit (the float64 array must enter with x64 on, as the tflite schemes do)
    with jax.enable_x64(True):
        qm2, sh2 = jax.jit(lambda m: quantize_multiplier(m, single_rounding=single))(ms)
    np.testing.assert_array_equal(np.asarray(qm2), np.asarray(qm))
    np.testing.assert_array_equal(np.asarray(sh2), np.asarray(sh))


@pytest.mark.parametrize("single", [False, True])
def test_multiply_by_quantized_multiplier_matches_int64(single, rng):
    x = _edge_int32(rng, 30_000)
    x = np.clip(x, -(2**24), 2**24)  # realistic accumulators (no left-shift overflow)
    x = np.concatenate([x, _edge_int32(rng, 0)])
    ms = np.exp(rng.uniform(-20, 3, 40))
    ms = np.concatenate([ms, [0.5, 0.25, 1.0, 2.0**-31, 1.999999]])
    for m in ms:
        qm, sh = np_quantize_multiplier(float(m), single)
        if single:
            t = 31 - sh
            want = (x * qm + (1 << (t - 1))) >> t
            fn = multiply_by_quantized_multiplier_single_rounding
        else:
            left, right = max(sh, 0), max(-sh, 0)
            xl = ((x << left) + 2**31) % 2**32 - 2**31
            want = np_rdbpot(np_srdhm(xl, np.int64(qm)), right)
            fn = multiply_by_quantized_multiplier
        if single and np.abs(want).max() > I32_MAX:  # TFLite DCHECKs the result fits
            keep = np.abs(want) <= I32_MAX
            x_, want = x[keep], want[keep]
        else:
            x_ = x
        got = fn(jnp.asarray(x_, jnp.int32), jnp.int32(qm), jnp.int32(sh))
        np.testing.assert_array_equal(np.asarray(got), want, err_msg=f"m={m}")


@pytest.mark.parametrize("kind", ["litert_ref", "litert"])
def test_litert_multiply_matches_int64(kind, rng):
    from qjax.kernels import (
        multiply_by_quantized_multiplier_litert,
        multiply_by_quantized_multiplier_litert_ref,
    )

    x = _edge_int32(rng, 30_000)
    x = np.clip(x, -(2**24), 2**24)
    x = np.concatenate([x, _edge_int32(rng, 0), np.arange(-64, 65)])
    ms = np.exp(rng.uniform(-20, 3, 40))
    ms = np.concatenate([ms, [0.5, 0.25, 0.75, 1.0, 2.0, 2.0**-31, 1.999999]])
    for m in ms:
        if kind == "litert_ref":
            qm, sh = np_quantize_multiplier(float(m), True)
            t = 31 - sh
            p = x * qm
            want = np.sign(p) * ((np.abs(p) + (1 << (t - 1))) >> t)  # ties away from zero
            fn = multiply_by_quantized_multiplier_litert_ref
        else:
            qm, sh = np_quantize_multiplier(float(m), False)
            left, right = max(sh, 0), max(-sh, 0)
            xl = ((x << left) + 2**31) % 2**32 - 2**31
            tt = (xl * qm + (1 << 30)) >> 31  # ties upward, twice
            want = (tt + ((1 << right) >> 1)) >> right
            fn = multiply_by_quantized_multiplier_litert
        keep = np.abs(want) <= I32_MAX
        got = fn(jnp.asarray(x[keep], jnp.int32), jnp.int32(qm), jnp.int32(sh))
        np.testing.assert_array_equal(np.asarray(got), want[keep], err_msg=f"m={m}")


def test_tflite_requant_is_integer_only_on_the_accumulator():
    acc = jnp.zeros((7, 5), jnp.int32)
    args = (
        jnp.zeros((1, 5), jnp.float32),
        jnp.float32(0.1),
        jnp.ones((1, 5), jnp.float32),
        jnp.float32(0.3),
        jnp.int32(3),
        jnp.int32(0),
        jnp.int32(255),
    )

    def eqns(j):
        for e in j.eqns:
            yield e
            for sub in jex.core.jaxprs_in_params(e.params):
                yield from eqns(sub)

    jaxpr = jax.make_jaxpr(requant_tflite)(acc, *args).jaxpr
    for e in eqns(jaxpr):
        for v in e.outvars:
            if tuple(v.aval.shape) == (7, 5):
                assert not jnp.issubdtype(v.aval.dtype, jnp.floating), e


# ----------------------------------------------------------------------------------------
# the exact reference


def _brute_exact(acc, bias, sx, sw, so, zp, lo, hi):
    fr = fractions.Fraction
    out = []
    for a, b, w in zip(
        acc.tolist(),
        np.broadcast_to(bias, acc.shape).tolist(),
        np.broadcast_to(sw, acc.shape).tolist(),
        strict=True,
    ):
        y = (fr(float(sx)) * fr(w) * a + fr(b)) / fr(float(so))
        out.append(min(max(round(y) + zp, lo), hi))  # Fraction.__round__: half to even
    return np.asarray(out)


def test_exact_scheme_matches_brute_force_fractions(rng):
    acc, bias, sx, sw, so = _pool(rng, 3000, per_channel=True)
    got = _jax(requant_exact, acc, bias, sx, sw, so, 100, 0, 255)
    np.testing.assert_array_equal(got, _brute_exact(acc, bias, sx, sw, so, 100, 0, 255))


def test_exact_scheme_rounds_ties_to_even():
    acc = jnp.array([1, 3, 5, -1, -3, -5], jnp.int32)  # · 0.5 -> .5 ties
    got = requant_exact(
        acc,
        None,
        jnp.float32(1.0),
        jnp.float32(0.5),
        jnp.float32(1.0),
        jnp.int32(10),
        jnp.int32(0),
        jnp.int32(255),
    )
    np.testing.assert_array_equal(got, [10, 12, 12, 10, 8, 8])


def test_every_float_scheme_is_within_one_code_of_exact(rng):
    acc, bias, sx, sw, so = _pool(rng, 20_000, per_channel=True)
    exact = _jax(requant_exact, acc, bias, sx, sw, so, 128, 0, 255)
    for name in (
        "fbgemm",
        "qnnpack",
        "onednn",
        "tflite",
        "tflite_single_rounding",
        "litert_ref",
        "litert",
    ):
        got = _jax(SCHEMES[name], acc, bias, sx, sw, so, 128, 0, 255)
        assert np.abs(got - exact).max() <= 1, name


# ----------------------------------------------------------------------------------------
# properties shared by every scheme, and requantize()


@pytest.mark.parametrize("scheme", sorted(SCHEMES))
def test_scheme_properties(scheme, rng):
    acc, bias, sx, sw, so = _pool(rng, 4000, per_channel=True)
    acc = acc.reshape(40, 100)
    sw, bias = sw[:100], bias[:100]
    out = QParams(so, 90, QuantSpec(signed=False))
    kw = dict(scale_x=sx, scale_w=jnp.asarray(sw), out=out, scheme=scheme)
    rq = jax.jit(requantize, static_argnames=("scheme", "activation", "channel_axis"))
    y = rq(jnp.asarray(acc), bias=jnp.asarray(bias), **kw)
    if scheme in ("fbgemm", "qnnpack"):  # eager (op by op) gives the same codes
        eager = requantize(jnp.asarray(acc), bias=jnp.asarray(bias), **kw)
        np.testing.assert_array_equal(y, eager)
    assert y.dtype == jnp.uint8 and y.shape == acc.shape
    yr = rq(jnp.asarray(acc), bias=jnp.asarray(bias), activation="relu", **kw)
    np.testing.assert_array_equal(yr, np.maximum(np.asarray(y), 90))
    none = rq(jnp.asarray(acc), bias=None, **kw)
    zero = rq(jnp.asarray(acc), bias=jnp.zeros(100, jnp.float32), **kw)
    np.testing.assert_array_equal(none, zero)
    # channels along axis 0
    yt = rq(jnp.asarray(acc.T), bias=jnp.asarray(bias), channel_axis=0, **kw)
    np.testing.assert_array_equal(yt, np.asarray(y).T)
    # int8 output
    out8 = QParams(so, -5, QuantSpec(signed=True))
    y8 = rq(
        jnp.asarray(acc),
        bias=jnp.asarray(bias),
        scale_x=sx,
        scale_w=jnp.asarray(sw),
        out=out8,
        scheme=scheme,
    )
    ex8 = rq(
        jnp.asarray(acc),
        bias=jnp.asarray(bias),
        scale_x=sx,
        scale_w=jnp.asarray(sw),
        out=out8,
        scheme="exact",
    )
    assert y8.dtype == jnp.int8
    assert np.abs(np.asarray(y8, np.int64) - np.asarray(ex8, np.int64)).max() <= 1
    assert 0.2 < np.mean((np.asarray(y8) > -128) & (np.asarray(y8) < 127))  # not all clamped


def test_float_schemes_saturate_instead_of_wrapping():
    # (The TFLite schemes shift x left in int32 for multipliers > 1 and wrap, as TFLite.)
    acc = jnp.array([I32_MIN, -(2**30), 0, 2**30, I32_MAX], jnp.int32)
    out = QParams(1e-6, 128, QuantSpec(signed=False))
    for scheme in ("fbgemm", "qnnpack", "onednn", "exact"):
        y = requantize(acc, scale_x=1.0, scale_w=1.0, out=out, scheme=scheme)
        np.testing.assert_array_equal(y, [0, 0, 128, 255, 255], err_msg=scheme)


def test_activation_bounds():
    lo, hi = activation_bounds(QParams(0.1, -20, QuantSpec(signed=True)), "relu")
    assert (int(lo), int(hi)) == (-20, 127)
    lo, hi = activation_bounds(QParams(0.1, 0, QuantSpec(signed=False, reduce_range=True)))
    assert (int(lo), int(hi)) == (0, 127)


def test_requantize_rejects_bad_input():
    out = QParams(0.1, 0, QuantSpec(signed=False))
    acc = jnp.zeros((2, 3), jnp.int32)
    with pytest.raises(TypeError, match="acc must be int32, got int8"):
        requantize(acc.astype(jnp.int8), scale_x=1.0, scale_w=1.0, out=out)
    with pytest.raises(ValueError, match="unknown requantization scheme 'float'"):
        requantize(acc, scale_x=1.0, scale_w=1.0, out=out, scheme="float")
    with pytest.raises(ValueError, match="output qparams must be per-tensor"):
        requantize(
            acc,
            scale_x=1.0,
            scale_w=1.0,
            out=QParams(jnp.ones(3), jnp.zeros(3, jnp.int32), QuantSpec(axis=1)),
        )
    with pytest.raises(ValueError, match=r"4 weight scales for acc of shape \(2, 3\)"):
        requantize(acc, scale_x=1.0, scale_w=jnp.ones(4), out=out)
    with pytest.raises(ValueError, match="scale_x must be per-tensor"):
        requantize(acc, scale_x=jnp.ones(2), scale_w=1.0, out=out)
    with pytest.raises(TypeError, match="bias must be floating"):
        requantize(acc, scale_x=1.0, scale_w=1.0, out=out, bias=jnp.zeros(3, jnp.int32))
    with pytest.raises(ValueError, match="bias of shape"):
        requantize(acc, scale_x=1.0, scale_w=1.0, out=out, bias=jnp.zeros(5))
    with pytest.raises(ValueError, match="unsupported fused activation 'relu6'"):
        requantize(acc, scale_x=1.0, scale_w=1.0, out=out, activation="relu6")
