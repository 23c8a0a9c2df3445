"""How the int8 kernels lower under ``jit``: integer-only dots/convs, hoisted coefficients.

The requantization schemes are split into per-channel coefficients (computed once) and a
per-element apply (``qjax.kernels._schemes._coefficients``); these tests check that the
split changes no code (against the same formulas evaluated op by op, with ties and
per-channel scales), that the hoisting guard is the identity on every special value, that
the compiled epilogue no longer recomputes divisions per element, that the serving
program only has int8 x int8 -> int32 dots and convolutions, and that a serving function
compiles once per shape.
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qjax import QArray, QParams, QuantSpec
from qjax.kernels import _schemes as R
from qjax.kernels import (
    max_pool2d,
    prepare_conv,
    prepare_linear,
    quantized_conv,
    quantized_linear,
    requantize,
)

U8 = QuantSpec(signed=False)
FAST_SCHEMES = ("fbgemm", "qnnpack", "onednn", "tflite", "tflite_single_rounding", "litert")


def _tie_case(rng, m, n, per_channel):
    """acc, bias, scales where many outputs land exactly on .5 before rounding."""
    # power-of-two scales make s_x·s_w/s_out a power of two: acc·M hits halves often
    sx = np.float32(2.0**-6)
    if per_channel:
        sw = np.float32(2.0) ** -rng.integers(4, 9, n).astype(np.float32)
        b = (rng.integers(-64, 64, n) * np.float32(2.0**-9)).astype(np.float32)
    else:
        sw = np.float32(2.0**-7)
        b = (rng.integers(-64, 64, n) * np.float32(2.0**-9)).astype(np.float32)
    acc = rng.integers(-300, 300, (m, n)).astype(np.int32)
    return acc, b, sx, sw


@pytest.mark.parametrize("per_channel", [False, True])
@pytest.mark.parametrize("scheme", FAST_SCHEMES)
def test_split_equals_op_by_op(rng, scheme, per_channel):
    """Jitted (coefficients hoisted, epilogue fused) == eager (every op on its own)."""
    out = QParams(jnp.float32(2.0**-12), jnp.int32(3), U8)
    acc, b, sx, sw = _tie_case(rng, 48, 40, per_channel)
    acc2 = rng.integers(-(2**20), 2**20, (48, 40)).astype(np.int32)  # saturating codes
    sw_r = (rng.random(40) * 0.01 + 1e-4).astype(np.float32) if per_channel else np.float32(3e-3)
    b_r = rng.standard_normal(40).astype(np.float32)
    cases = [(acc, b, sx, sw), (acc2, b_r, np.float32(0.0123), sw_r), (acc, None, sx, sw)]

    def f(a, bias, s_x, s_w):
        return requantize(
            a, scale_x=s_x, scale_w=s_w, out=out, bias=bias, activation="relu", scheme=scheme
        )

    ties = 0
    for a, bias, s_x, s_w in cases:
        got = np.asarray(jax.jit(f)(a, bias, s_x, s_w))
        with jax.disable_jit():
            want = np.asarray(f(a, bias, s_x, s_w))
        assert got.dtype == np.uint8
        np.testing.assert_array_equal(got, want)
        if bias is not None and s_x == sx:
            y = (a.astype(np.float64) * float(s_x) * np.asarray(s_w, np.float64) + bias) / 2**-12
            ties += int((np.abs(y - np.floor(y) - 0.5) == 0).sum())
    assert ties > 100  # the tie-heavy case really has ties


def test_split_equals_numpy_one_shot(rng):
    """fbgemm codes == the one-shot float32 formula in NumPy (per-channel bias b/ats)."""
    acc, b, sx, sw = _tie_case(rng, 64, 32, True)
    so, zp = np.float32(2.0**-12), 3
    ats = np.float32(sx) * sw
    y = acc.astype(np.float32) + b / ats
    want = np.clip(np.rint(y * (ats / so)) + zp, zp, 255)
    got = requantize(
        jnp.asarray(acc),
        scale_x=sx,
        scale_w=jnp.asarray(sw),
        out=QParams(jnp.float32(so), jnp.int32(zp), U8),
        bias=jnp.asarray(b),
        activation="relu",
    )
    np.testing.assert_array_equal(np.asarray(got), want)


def test_hoist_is_identity_on_special_values():
    f32 = np.array([0.0, -0.0, 1.5, -(2.0**-100), np.inf, -np.inf, np.nan, 3e38], np.float32)
    i32 = np.array([0, 1, -1, 2**31 - 1, -(2**31), 12345, -777], np.int32)

    @jax.jit
    def g(f, i):
        # broadcast consumers, as in the epilogue
        hf, hi = R._hoist(f), R._hoist(i)
        return hf[None, :] + jnp.zeros((4, 1), jnp.float32), hi[None, :] + jnp.zeros(
            (4, 1), jnp.int32
        )

    hf, hi = g(f32, i32)
    np.testing.assert_array_equal(
        np.asarray(hf).view(np.int32), np.broadcast_to(f32.view(np.int32), (4, 8))
    )
    np.testing.assert_array_equal(np.asarray(hi), np.broadcast_to(i32, (4, 7)))


def _epilogue_ops(hlo: str, shape: str) -> tuple[int, int]:
    """(fused computations of output ``shape``, instructions in them)."""
    n = ops = 0
    for comp in re.split(r"\n(?=%)", hlo):
        if f"-> {shape}" in comp.split("\n", 1)[0]:
            n += 1
            ops += sum(" = " in line for line in comp.splitlines()[1:])
    return n, ops


@pytest.mark.parametrize("scheme", ["fbgemm", "qnnpack", "onednn"])
def test_epilogue_is_lean(scheme):
    """One elementwise pass, no division in it, fewer ops than without the hoist."""
    out = QParams(jnp.float32(0.02), jnp.int32(3), U8)

    def f(a, sw, b, sx):
        return requantize(a, scale_x=sx, scale_w=sw, out=out, bias=b, scheme=scheme)

    args = (
        jnp.zeros((64, 256), jnp.int32),
        jnp.ones(256, jnp.float32),
        jnp.ones(256, jnp.float32),
        jnp.float32(0.5),
    )
    hlo = jax.jit(lambda *a: f(*a)).lower(*args).compile().as_text()
    hoist = R._hoist
    try:
        R._hoist = lambda c: c  # the old one-shot lowering
        hlo_old = jax.jit(lambda *a: f(*a)).lower(*args).compile().as_text()
    finally:
        R._hoist = hoist
    n, ops = _epilogue_ops(hlo, "u8[64,256]")
    n_old, ops_old = _epilogue_ops(hlo_old, "u8[64,256]")
    assert n == n_old == 1
    assert ops < ops_old
    big = [c for c in re.split(r"\n(?=%)", hlo) if "-> u8[64,256]" in c.split("\n", 1)[0]]
    assert " divide(" not in big[0]


def _int_dot_operands(jaxpr) -> list[tuple]:
    found = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name in ("dot_general", "conv_general_dilated"):
            dts = tuple(str(v.aval.dtype) for v in eqn.invars)
            found.append((eqn.primitive.name, dts, str(eqn.outvars[0].aval.dtype)))
        for sub in jax.core.subjaxprs(eqn) if hasattr(jax.core, "subjaxprs") else ():
            found += _int_dot_operands(sub)
        for p in eqn.params.values():
            if hasattr(p, "jaxpr") and hasattr(p.jaxpr, "eqns"):
                found += _int_dot_operands(p.jaxpr)
    return found


def _layers(rng):
    wspec = QuantSpec(signed=True, symmetric=True, axis=0)
    wc = QArray(
        jnp.asarray(rng.integers(-127, 128, (8, 3, 3, 3)), jnp.int8),
        QParams(
            jnp.asarray(rng.random(8) * 0.01 + 1e-3, jnp.float32), jnp.zeros(8, jnp.int32), wspec
        ),
    )
    conv = prepare_conv(wc, weight_layout="OIHW")
    wl = QArray(
        jnp.asarray(rng.integers(-127, 128, (8 * 4 * 4, 5)), jnp.int8),
        QParams(
            jnp.asarray(rng.random(5) * 0.01 + 1e-3, jnp.float32),
            jnp.zeros(5, jnp.int32),
            wspec.replace(axis=1),
        ),
    )
    return conv, prepare_linear(wl)


def test_serving_program_is_int8_only(rng):
    conv, fc = _layers(rng)
    o1 = QParams(jnp.float32(0.05), jnp.int32(2), U8)
    o2 = QParams(jnp.float32(0.1), jnp.int32(128), U8)

    def net(xv):
        x = QArray(xv, QParams(jnp.float32(1 / 255), jnp.int32(0), U8))
        h = quantized_conv(x, conv, None, o1, padding=1, layout="NHWC", activation="relu")
        h = max_pool2d(h, 2, layout="NHWC")
        h = QArray(h.values.reshape(h.shape[0], -1), h.qparams)
        return quantized_linear(h, fc, jnp.zeros(5, jnp.float32), o2).values

    xv = jnp.asarray(rng.integers(0, 256, (2, 8, 8, 3)), jnp.uint8)
    ops = _int_dot_operands(jax.make_jaxpr(net)(xv).jaxpr)
    assert [o[0] for o in ops] == ["conv_general_dilated", "dot_general"]
    for _, ins, out in ops:
        assert ins == ("int8", "int8") and out == "int32"


def test_one_compile_per_shape(rng):
    conv, fc = _layers(rng)
    traces = []
    out = QParams(jnp.float32(0.1), jnp.int32(10), U8)

    @jax.jit
    def serve(xv, scale):
        traces.append(xv.shape)
        x = QArray(xv, QParams(scale, jnp.int32(3), U8))
        return quantized_linear(x, fc, None, out, activation="relu").values

    for m in (1, 4, 4, 1, 4):
        for s in (0.01, 0.02):
            serve(jnp.asarray(rng.integers(0, 256, (m, 128)), jnp.uint8), jnp.float32(s))
    assert traces == [(1, 128), (4, 128)]
