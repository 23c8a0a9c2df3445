"""qjax's own numerics: validation, the "qjax" formulas against NumPy, consistency of the
primitives with each other, degenerate ranges, transforms, gradient rules, properties.

Parity with other systems lives in ``test_parity_torch.py`` and ``test_parity_lsq.py``.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _helpers import tie_heavy
from hypothesis import given, settings
from hypothesis import strategies as st

import qjax
from qjax import QParams, QuantSpec

COMPATS = ("qjax", "torch", "torch_fused", "tflite")


def bits_equal(a, b) -> bool:
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    return a.shape == b.shape and bool(np.all(a.view(np.uint32) == b.view(np.uint32)))


def np_quantize_qjax(x, s, z, qmin, qmax):
    """NumPy reference of the "qjax" rule: clamp(rint(x · f32(1/s)) + z)."""
    return np.clip(np.rint(x * (np.float32(1) / s)) + z, qmin, qmax)


def np_qparams_qjax(mn, mx, qmin, qmax):
    """NumPy reference of the "qjax" affine qparams (float32)."""
    mn_neg = np.minimum(mn, np.float32(0))
    mx_pos = np.maximum(mx, np.float32(0))
    s = (mx_pos - mn_neg) / np.float32(qmax - qmin)
    safe = np.where(s > 0, s, np.float32(1))
    z = np.clip(qmin - np.rint(mn_neg / safe), qmin, qmax)
    return np.where(s > 0, s, np.float32(1)).astype(np.float32), z.astype(np.int32)


# ---------------------------------------------------------------------------------
# validation


@pytest.mark.parametrize("bits", [1, 17, 0, 64])
def test_spec_bits_out_of_range(bits):
    with pytest.raises(ValueError, match=f"got {bits}"):
        QuantSpec(bits=bits)


@pytest.mark.parametrize("bits", [8.0, True, "8"])
def test_spec_bits_not_int(bits):
    with pytest.raises(TypeError, match="bits"):
        QuantSpec(bits=bits)


@pytest.mark.parametrize("qmin, qmax", [(5, 5), (10, 3), (-200, 100), (0, 256)])
def test_spec_bad_custom_range(qmin, qmax):
    with pytest.raises(ValueError, match=f"quant_min={qmin}, quant_max={qmax}"):
        QuantSpec(signed=qmin < 0, quant_min=qmin, quant_max=qmax)


def test_spec_half_custom_range():
    with pytest.raises(ValueError, match="quant_max=None"):
        QuantSpec(quant_min=0)


def test_spec_group_axis_without_group_size():
    with pytest.raises(ValueError, match="group_axis=1"):
        QuantSpec(group_axis=1)
    with pytest.raises(ValueError, match="group_size=32"):
        QuantSpec(group_size=32)
    with pytest.raises(ValueError, match="group_size"):
        QuantSpec(group_size=0, group_axis=0)


def test_spec_unknown_rounding():
    with pytest.raises(ValueError, match="'nearest'"):
        QuantSpec(rounding="nearest")


def test_group_size_must_divide_at_use_time():
    spec = QuantSpec(group_size=24, group_axis=1)  # fine until it meets a tensor
    qp = QParams(jnp.ones(4), jnp.zeros(4, jnp.int32), spec)
    with pytest.raises(ValueError, match=r"group_size=24 does not divide .*size 100"):
        qjax.quantize(jnp.zeros((3, 100)), qp)
    with pytest.raises(ValueError, match="group_size=24"):
        qjax.fake_quant(jnp.zeros((3, 100)), qp)


@pytest.mark.parametrize("axis", [2, -3, 5])
def test_axis_out_of_range_at_use_time(axis):
    spec = QuantSpec(axis=axis)
    qp = QParams(jnp.ones(4), jnp.zeros(4, jnp.int32), spec)
    with pytest.raises(ValueError, match=f"axis {axis} is out of range for a tensor of rank 2"):
        qjax.quantize(jnp.zeros((4, 4)), qp)
    with pytest.raises(ValueError, match=f"axis {axis}"):
        qjax.dequantize(jnp.zeros((4, 4), jnp.int8), qp)


def test_qparams_scale_and_zero_point_shapes_differ():
    with pytest.raises(ValueError, match=r"\(3,\).*\(4,\)"):
        QParams(jnp.ones(3), jnp.zeros(4, jnp.int32), QuantSpec(axis=0))


@pytest.mark.parametrize("fn", ["quantize", "fake_quant", "dequantize"])
def test_qparams_shape_does_not_fit_the_tensor(fn):
    qp = QParams(jnp.ones(3), jnp.zeros(3, jnp.int32), QuantSpec(axis=0))
    x = jnp.zeros((4, 5), jnp.int8 if fn == "dequantize" else jnp.float32)
    with pytest.raises(ValueError, match=r"\(3,\).*\(4, 5\).*\(4,\)"):
        getattr(qjax, fn)(x, qp)


def test_qparams_types():
    assert (
        QParams(jnp.ones(3, jnp.int32), jnp.zeros(3), QuantSpec(axis=0)).scale.dtype == jnp.float32
    )
    with pytest.raises(TypeError, match="scale must be floating"):
        QParams(jnp.ones(3, jnp.bool_), jnp.zeros(3, jnp.int32), QuantSpec(axis=0))
    with pytest.raises(TypeError, match="zero_point"):
        QParams(1.0, jnp.bool_(True))
    with pytest.raises(TypeError, match="QuantSpec"):
        QParams(1.0, 0, spec="int8")


@pytest.mark.parametrize("dtype", [jnp.int8, jnp.uint8, jnp.int32])
def test_integer_input_to_quantize_and_fake_quant(dtype):
    qp = QParams(0.1, 0, QuantSpec())
    with pytest.raises(TypeError, match=f"dtype {jnp.dtype(dtype)}"):
        qjax.quantize(jnp.zeros(4, dtype), qp)
    with pytest.raises(TypeError, match=f"dtype {jnp.dtype(dtype)}"):
        qjax.fake_quant(jnp.zeros(4, dtype), qp)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float16])
def test_float_input_to_dequantize(dtype):
    with pytest.raises(TypeError, match=f"dtype {jnp.dtype(dtype)}"):
        qjax.dequantize(jnp.zeros(4, dtype), QParams(0.1, 0, QuantSpec()))


def test_bad_options():
    qp = QParams(0.1, 0, QuantSpec())
    x = jnp.zeros(4)
    with pytest.raises(ValueError, match="'onnx'"):
        qjax.quantize(x, qp, compat="onnx")
    with pytest.raises(ValueError, match="'straight'"):
        qjax.fake_quant(x, qp, grad="straight")
    with pytest.raises(ValueError, match="grad='ste'"):
        qjax.fake_quant(x, qp, grad_scale=0.5)
    with pytest.raises(ValueError, match="'tf'"):
        qjax.qparams_from_minmax(0.0, 1.0, QuantSpec(), compat="tf")
    with pytest.raises(ValueError, match="per-group"):
        qjax.quantize(
            x.reshape(1, 4),
            QParams(jnp.ones(2), jnp.zeros(2, jnp.int32), QuantSpec(group_size=2, group_axis=1)),
            compat="torch",
        )
    with pytest.raises(ValueError, match="key"):
        qjax.quantize(x, QParams(0.1, 0, QuantSpec(rounding="stochastic")))


# ---------------------------------------------------------------------------------
# the "qjax" formulas against NumPy


@pytest.mark.parametrize("signed", [False, True])
def test_quantize_qjax_mode_matches_numpy(signed):
    rng = np.random.default_rng(11)
    spec = QuantSpec(signed=signed)
    for scale in (0.0235, 1 / 3, 0.1, 2**-7):
        s = np.float32(scale)
        for zp in (0, 1, 3, 127) if signed else (0, 1, 3, 128):
            x = tie_heavy(rng, s, (20000,), -300, 300)
            want = np_quantize_qjax(x, s, zp, spec.qmin, spec.qmax)
            qp = QParams(s, zp, spec)
            assert np.array_equal(qjax.quantize(jnp.asarray(x), qp), want)
            # under jit with the qparams as constants (XLA must not use a reciprocal)
            got = jax.jit(lambda v, qp=qp: qjax.quantize(v, qp))(jnp.asarray(x))
            assert np.array_equal(got, want)


GROUP_CASES = [
    # (spec kwargs, grouped view shape of an (8, 64) tensor, reduced axes, qparams shape)
    (dict(group_size=16, group_axis=1), (8, 4, 16), (0, 2), (4,)),
    (dict(group_size=16, group_axis=1, axis=0), (8, 4, 16), (2,), (8, 4)),
    (dict(group_size=4, group_axis=0, axis=1), (2, 4, 64), (1,), (2, 64)),
]


@pytest.mark.parametrize("kw, view, red, qshape", GROUP_CASES)
@pytest.mark.parametrize("signed", [False, True])
def test_per_group_round_trip_matches_numpy(kw, view, red, qshape, signed):
    rng = np.random.default_rng(12)
    spec = QuantSpec(bits=4, signed=signed, **kw)
    x = (rng.standard_normal((8, 64)) * rng.uniform(0.1, 3, (8, 1))).astype(np.float32)
    x[0, :16] = 0.0  # a constant group
    xg = x.reshape(view)
    mn, mx = xg.min(axis=red), xg.max(axis=red)
    assert spec.qparams_shape(x.shape) == qshape == mn.shape
    qp = qjax.qparams_from_minmax(jnp.asarray(mn), jnp.asarray(mx), spec)
    s_ref, z_ref = np_qparams_qjax(mn, mx, spec.qmin, spec.qmax)
    assert bits_equal(qp.scale, s_ref) and np.array_equal(qp.zero_point, z_ref)
    s_b, z_b = np.expand_dims(s_ref, red), np.expand_dims(z_ref, red)
    q_ref = np_quantize_qjax(xg, s_b, z_b, spec.qmin, spec.qmax).astype(spec.dtype)
    dq_ref = ((q_ref.astype(np.int32) - z_b).astype(np.float32) * s_b).astype(np.float32)
    q = qjax.quantize(jnp.asarray(x), qp)
    assert q.dtype == spec.dtype and q.shape == x.shape
    assert np.array_equal(np.asarray(q).reshape(view), q_ref)
    dq = qjax.dequantize(q, qp)
    assert bits_equal(np.asarray(dq).reshape(view), dq_ref)
    assert bits_equal(qjax.fake_quant(jnp.asarray(x), qp), dq)


def test_qparams_qjax_affine_matches_numpy():
    rng = np.random.default_rng(13)
    a = (rng.standard_normal(50000) * 10.0 ** rng.uniform(-6, 3, 50000)).astype(np.float32)
    b = (rng.standard_normal(50000) * 10.0 ** rng.uniform(-6, 3, 50000)).astype(np.float32)
    mn, mx = np.minimum(a, b), np.maximum(a, b)
    for spec in (QuantSpec(signed=False, axis=0), QuantSpec(bits=4, signed=True, axis=0)):
        qp = qjax.qparams_from_minmax(jnp.asarray(mn), jnp.asarray(mx), spec)
        s_ref, z_ref = np_qparams_qjax(mn, mx, spec.qmin, spec.qmax)
        assert bits_equal(qp.scale, s_ref)
        assert np.array_equal(qp.zero_point, z_ref)


@pytest.mark.parametrize("bits", [8, 4, 16])
@pytest.mark.parametrize("signed", [False, True])
def test_symmetric_qjax_maps_max_exactly(bits, signed):
    rng = np.random.default_rng(14)
    spec = QuantSpec(bits=bits, signed=signed, symmetric=True, axis=0)
    amax = (10.0 ** rng.uniform(-5, 4, 20000)).astype(np.float32)
    qp = qjax.qparams_from_minmax(jnp.asarray(-amax / 3), jnp.asarray(amax), spec)
    zs = spec.symmetric_zero_point()
    n = min(spec.qmax - zs, zs - spec.qmin)
    assert bits_equal(qp.scale, amax / np.float32(n))  # IEEE division, also for constants
    x = jnp.asarray(amax)[:, None]
    q = qjax.quantize(x, qp)
    assert np.all(np.asarray(q, np.int64) == zs + n)  # max -> the top code of the range
    back = np.asarray(qjax.dequantize(q, qp))[:, 0]
    assert np.all(np.abs(back - amax) <= 2 * np.spacing(amax))  # within float rounding
    if bits == 8 and signed:
        # torch's observers divide by 127.5: max is not representable.
        qt = qjax.qparams_from_minmax(
            jnp.asarray(-amax / 3), jnp.asarray(amax), spec, compat="torch"
        )
        bt = np.asarray(qjax.dequantize(qjax.quantize(x, qt, compat="torch"), qt))[:, 0]
        big = amax > 127.5 * 2.0**-23  # below that torch's eps floor takes over
        assert np.all(np.abs(bt - amax)[big] > 100 * np.spacing(amax)[big])


# ---------------------------------------------------------------------------------
# fake_quant == dequantize(quantize) in "qjax" mode


@pytest.mark.parametrize(
    "spec",
    [
        QuantSpec(signed=False),
        QuantSpec(bits=4, signed=True, symmetric=True),
        QuantSpec(signed=True, axis=1),
        QuantSpec(bits=3, signed=False, axis=(0, 2)),
        QuantSpec(bits=4, signed=True, group_size=8, group_axis=2),
        QuantSpec(bits=6, signed=True, axis=0, group_size=4, group_axis=1, rounding="half_away"),
        QuantSpec(bits=4, signed=False, rounding="stochastic"),
        QuantSpec(bits=4, signed=True, axis=2, rounding="stochastic"),
        QuantSpec(bits=12, signed=True, narrow_range=True, axis=1),
    ],
    ids=lambda s: f"{s.bits}b-{s.granularity}-{s.rounding}",
)
def test_fake_quant_is_dequantize_of_quantize(spec):
    rng = np.random.default_rng(21)
    shape = (4, 8, 16)
    x = (rng.standard_normal(shape) * 3).astype(np.float32)
    x.flat[:4] = [np.inf, -np.inf, 0.0, -0.0]
    qshape = spec.qparams_shape(shape)
    mn = np.full(qshape, -4.0, np.float32) * rng.uniform(0.5, 1.5, qshape).astype(np.float32)
    mx = np.full(qshape, 5.0, np.float32) * rng.uniform(0.5, 1.5, qshape).astype(np.float32)
    qp = qjax.qparams_from_minmax(jnp.asarray(mn), jnp.asarray(mx), spec)
    key = jax.random.key(3) if spec.rounding == "stochastic" else None
    xj = jnp.asarray(x)
    q = qjax.quantize(xj, qp, key=key)
    assert q.dtype == spec.dtype
    assert np.all((np.asarray(q, np.int64) >= spec.qmin) & (np.asarray(q, np.int64) <= spec.qmax))
    assert bits_equal(qjax.fake_quant(xj, qp, key=key), qjax.dequantize(q, qp))
    jq = jax.jit(lambda v, qp, k: qjax.quantize(v, qp, key=k))(xj, qp, key)
    jf = jax.jit(lambda v, qp, k: qjax.fake_quant(v, qp, key=k))(xj, qp, key)
    assert np.array_equal(jq, q) and bits_equal(jf, qjax.dequantize(jq, qp))


def test_nan_codes_to_qmax_and_inf_to_the_bounds():
    qp = QParams(0.5, 3, QuantSpec(signed=False))
    q = qjax.quantize(jnp.array([np.nan, np.inf, -np.inf]), qp)
    assert q.tolist() == [255, 255, 0]
    assert bits_equal(
        qjax.fake_quant(jnp.array([np.nan, np.inf, -np.inf]), qp), qjax.dequantize(q, qp)
    )


def test_low_precision_inputs_are_computed_in_float32():
    rng = np.random.default_rng(22)
    qp = QParams(np.float32(0.0235), 3, QuantSpec(signed=True, axis=None))
    x32 = jnp.asarray(rng.standard_normal(4096).astype(np.float32))
    for dt in (jnp.bfloat16, jnp.float16):
        x = x32.astype(dt)
        for compat in ("qjax", "torch", "tflite"):
            assert np.array_equal(
                qjax.quantize(x, qp, compat=compat),
                qjax.quantize(x.astype(jnp.float32), qp, compat=compat),
            )
        y = qjax.fake_quant(x, qp)
        assert y.dtype == jnp.float32 and bits_equal(y, qjax.fake_quant(x.astype(jnp.float32), qp))


# ---------------------------------------------------------------------------------
# stochastic rounding


def test_stochastic_rounding_is_unbiased_and_uses_the_key():
    spec = QuantSpec(bits=8, signed=True, rounding="stochastic")
    s = np.float32(0.1)
    qp = QParams(s, 0, spec)
    for frac in (0.3, 0.5, 0.9):
        x = jnp.full((200_000,), np.float32((7 + frac) * s))
        q = np.asarray(qjax.quantize(x, qp, key=jax.random.key(0)), np.float64)
        assert set(np.unique(q)) == {7.0, 8.0}
        assert abs(q.mean() - (7 + frac)) < 0.005  # P(up) = frac
    rng = np.random.default_rng(31)
    x = jnp.asarray(rng.uniform(-10, 10, 200_000).astype(np.float32))
    err = np.asarray(qjax.fake_quant(x, qp, key=jax.random.key(1))) - np.asarray(x)
    assert abs(err.mean()) < 0.002 * s  # unbiased, where round-to-nearest has |err| ~ s/4
    assert np.abs(err).max() < s  # but never more than one step
    a = qjax.quantize(x, qp, key=jax.random.key(1))
    b = qjax.quantize(x, qp, key=jax.random.key(2))
    assert np.array_equal(a, qjax.quantize(x, qp, key=jax.random.key(1)))  # deterministic
    assert np.mean(np.asarray(a) != np.asarray(b)) > 0.3  # and the key matters
    raw = jax.random.key_data(jax.random.key(1))
    assert np.array_equal(a, qjax.quantize(x, qp, key=raw))  # raw uint32[2] keys too


# ---------------------------------------------------------------------------------
# degenerate ranges


@pytest.mark.parametrize("compat", COMPATS)
@pytest.mark.parametrize(
    "spec",
    [
        QuantSpec(signed=False),
        QuantSpec(signed=True, symmetric=True),
        QuantSpec(signed=True),
        QuantSpec(bits=4, signed=False, symmetric=True),
    ],
)
def test_degenerate_ranges_give_finite_positive_scales(compat, spec):
    cases = {
        "zero": (0.0, 0.0),
        "constant+": (3.5, 3.5),
        "constant-": (-2.0, -2.0),
        "empty": (np.inf, -np.inf),  # an observer that saw nothing
        "all-nan": (np.nan, np.nan),
        "half-nan": (np.nan, 1.0),
        "infinite": (-np.inf, np.inf),
        "tiny": (-1e-40, 1e-40),
    }
    mn = jnp.asarray([c[0] for c in cases.values()], jnp.float32)
    mx = jnp.asarray([c[1] for c in cases.values()], jnp.float32)
    qp = qjax.qparams_from_minmax(mn, mx, spec.replace(axis=0), compat=compat)
    s, z = np.asarray(qp.scale), np.asarray(qp.zero_point)
    assert np.all(np.isfinite(s) & (s > 0)), dict(zip(cases, s, strict=True))
    assert np.all((z >= spec.qmin) & (z <= spec.qmax)), dict(zip(cases, z, strict=True))
    assert np.all(np.isfinite(np.float32(1) / s))
    # per-tensor scalars take the same path
    for lo, hi in cases.values():
        qp1 = qjax.qparams_from_minmax(lo, hi, spec, compat=compat)
        assert np.isfinite(float(qp1.scale)) and float(qp1.scale) > 0


F32_MAX = float(np.finfo(np.float32).max)
HUGE = [(-4e37, 3e38), (-3e38, 3e38), (-3.4e38, 3.4e38), (-F32_MAX, F32_MAX), (-F32_MAX, 1.0)]


@pytest.mark.parametrize("compat", COMPATS)
@pytest.mark.parametrize(
    "spec",
    [
        QuantSpec(signed=False),
        QuantSpec(signed=True),
        QuantSpec(signed=True, symmetric=True),
        QuantSpec(signed=False, symmetric=True),
    ],
    ids=["u8", "s8", "s8-sym", "u8-sym"],
)
def test_finite_range_whose_width_overflows_gives_the_range_scale(compat, spec):
    """max - min overflows float32 (torch: scale inf or NaN outputs, see _qparams): the
    scale is still finite and the range's own, never the 1.0 of an invalid range."""
    mn = jnp.asarray([r[0] for r in HUGE], jnp.float32)
    mx = jnp.asarray([r[1] for r in HUGE], jnp.float32)
    for jit in (False, True):
        fn = lambda a, b: qjax.qparams_from_minmax(a, b, spec.replace(axis=0), compat=compat)
        qp = (jax.jit(fn) if jit else fn)(mn, mx)
        s, z = np.asarray(qp.scale, np.float64), np.asarray(qp.zero_point)
        assert np.all(np.isfinite(s) & (s > 0)), s
        assert np.all((z >= spec.qmin) & (z <= spec.qmax)), z
        lo, hi = (
            np.minimum(np.asarray(mn, np.float64), 0),
            np.maximum(np.asarray(mx, np.float64), 0),
        )
        if spec.symmetric:
            want = np.maximum(-lo, hi) / ((spec.qmax - spec.qmin) / 2)
        else:
            want = (hi - lo) / (spec.qmax - spec.qmin)
        np.testing.assert_allclose(s, want, rtol=0.01)  # the range's scale, not 1.0
        for i, (a, b) in enumerate(HUGE):  # 0 is a code; the ends are the end codes
            qpi = QParams(qp.scale[i], qp.zero_point[i], spec)
            q = np.asarray(qjax.quantize(jnp.asarray([a, 0.0, b], jnp.float32), qpi), np.int64)
            assert q[1] == z[i] and q[0] <= z[i] <= q[2], (a, b, q)
            assert q[2] >= spec.qmax - 1 or q[0] <= spec.qmin + 1, (a, b, q)


# ---------------------------------------------------------------------------------
# transforms


def test_jit_vmap_grad():
    rng = np.random.default_rng(41)
    spec = QuantSpec(signed=True)
    xs = jnp.asarray(rng.standard_normal((5, 100)).astype(np.float32))
    ss = jnp.asarray(np.float32([0.01, 0.02, 0.1, 1 / 3, 0.5]))
    zs = jnp.asarray([0, 1, -3, 5, 0], jnp.int32)

    def one(x, s, z):
        return qjax.quantize(x, QParams(s, z, spec))

    batched = jax.jit(jax.vmap(one))(xs, ss, zs)
    looped = np.stack([np.asarray(one(xs[i], ss[i], zs[i])) for i in range(5)])
    assert np.array_equal(batched, looped)
    # vmap of fake_quant with per-example qparams and its gradient
    fq = jax.vmap(lambda x, s, z: qjax.fake_quant(x, QParams(s, z, spec)))
    assert bits_equal(
        jax.jit(fq)(xs, ss, zs),
        np.stack([qjax.fake_quant(xs[i], QParams(ss[i], zs[i], spec)) for i in range(5)]),
    )
    for grad in ("ste", "clipped_ste", "identity", "pact", "lsq"):
        f = lambda x, s, grad=grad: qjax.fake_quant(x, QParams(s, 0, spec), grad=grad).sum()
        gx, gs = jax.jit(jax.grad(f, argnums=(0, 1)))(xs, jnp.float32(0.02))
        assert gx.shape == xs.shape and np.all(np.isfinite(gx))
        if grad in ("pact", "lsq"):
            assert np.isfinite(float(gs)) and float(gs) != 0
        else:
            assert float(gs) == 0
    # gradients through qparams_from_minmax (an observer-free, differentiable range)
    g = jax.grad(
        lambda x: qjax.fake_quant(x, qjax.qparams_from_minmax(x.min(), x.max(), spec)).sum()
    )(xs[0])
    assert g.shape == (100,) and np.all(np.isfinite(g))


def test_identity_grad_passes_everything():
    x = jnp.array([-100.0, 0.3, 100.0, np.nan])
    g = jax.grad(lambda v: qjax.fake_quant(v, QParams(0.1, 0, QuantSpec()), grad="identity").sum())(
        x
    )
    assert g.tolist() == [1.0, 1.0, 1.0, 1.0]


# ---------------------------------------------------------------------------------
# gradient rules


@pytest.mark.parametrize("signed, zp", [(False, 10), (True, -3), (True, 0)])
def test_pact_gradient_matches_formula(signed, zp):
    rng = np.random.default_rng(51)
    spec = QuantSpec(bits=4, signed=signed)
    s = np.float32(0.25)
    x = tie_heavy(rng, s, (5000,), spec.qmin - zp - 8, spec.qmax - zp + 8)
    g = rng.standard_normal(5000).astype(np.float32)
    _, vjp = jax.vjp(
        lambda v, sc: qjax.fake_quant(v, QParams(sc, zp, spec), grad="pact"), jnp.asarray(x), s
    )
    dx, ds = vjp(jnp.asarray(g))
    r = np.rint(x * (np.float32(1) / s)) + zp  # the unclamped code
    above, below = r > spec.qmax, r < spec.qmin
    assert np.array_equal(np.asarray(dx) != 0, ~(above | below) & (g != 0))
    assert np.array_equal(np.asarray(dx)[~(above | below)], g[~(above | below)])
    want = np.sum(
        np.where(above, g * (spec.qmax - zp), np.where(below, g * (spec.qmin - zp), 0.0)),
        dtype=np.float64,
    )
    assert abs(float(ds) - want) <= 1e-5 * np.sum(np.abs(g)) * (spec.qmax - spec.qmin)
    assert above.sum() > 100 and below.sum() > 100


def test_clipped_ste_mask_is_on_the_real_range():
    spec = QuantSpec(bits=4, signed=False)
    s, zp = np.float32(0.5), 3
    lo, hi = s * (spec.qmin - zp), s * (spec.qmax - zp)  # [-1.5, 6.0]
    x = np.array(
        [lo - 0.3, lo - 0.2, lo, lo + 0.01, 0.0, hi - 0.01, hi, hi + 0.2, hi + 0.3], np.float32
    )
    f = lambda v, grad: qjax.fake_quant(v, QParams(s, zp, spec), grad=grad).sum()
    g_clip = np.asarray(jax.grad(f)(jnp.asarray(x), "clipped_ste"))
    assert g_clip.tolist() == [0, 0, 1, 1, 1, 1, 1, 0, 0]
    # STE masks on the rounded code instead: lo - 0.2 (code -0.4 -> 0) still passes.
    g_ste = np.asarray(jax.grad(f)(jnp.asarray(x), "ste"))
    assert g_ste.tolist() == [0, 1, 1, 1, 1, 1, 1, 1, 0]


def test_lsq_gradients_qjax_mode_formula():
    spec = QuantSpec(bits=4, signed=True)
    s, zp = np.float32(0.5), np.float32(1.0)
    x = jnp.array([-10.0, -4.2, -0.3, 0.0, 1.1, 3.4, 10.0], jnp.float32)
    y, vjp = jax.vjp(
        lambda v, sc, z: qjax.fake_quant(v, QParams(sc, z, spec), grad="lsq"), x, s, zp
    )
    dx, ds, dz = vjp(jnp.ones_like(y))
    xn = np.asarray(x)
    r = np.rint(xn * (np.float32(1) / s)) + 1
    inside = (r >= -8) & (r <= 7)
    ds_ref = np.where(inside, (np.asarray(y) - xn) / s, np.where(r < -8, -8 - 1.0, 7 - 1.0)).sum()
    assert np.allclose(float(ds), ds_ref, rtol=1e-6, atol=1e-6)
    assert float(dz) == float(-s * np.sum(~inside))
    assert np.asarray(dx).tolist() == inside.astype(np.float32).tolist()
    # grad_scale multiplies ds and dz only
    _, vjp2 = jax.vjp(
        lambda v, sc, z: qjax.fake_quant(v, QParams(sc, z, spec), grad="lsq", grad_scale=0.25),
        x,
        s,
        zp,
    )
    dx2, ds2, dz2 = vjp2(jnp.ones_like(y))
    assert (
        bits_equal(dx2, dx)
        and np.isclose(float(ds2), 0.25 * float(ds))
        and float(dz2) == 0.25 * float(dz)
    )


# ---------------------------------------------------------------------------------
# properties

SPECS = [
    QuantSpec(bits=8, signed=False),
    QuantSpec(bits=8, signed=True),
    QuantSpec(bits=4, signed=True, narrow_range=True),
    QuantSpec(bits=2, signed=False),
    QuantSpec(bits=16, signed=True),
    QuantSpec(bits=8, signed=False, reduce_range=True),
    QuantSpec(bits=8, signed=False, quant_min=10, quant_max=200),
    QuantSpec(bits=6, signed=True, rounding="half_away"),
]
N = 48
floats32 = st.floats(-1e4, 1e4, width=32, allow_nan=False, allow_infinity=False)


@st.composite
def setups(draw, compats=("qjax", "torch", "tflite")):
    spec = draw(st.sampled_from(SPECS))
    compat = draw(st.sampled_from(compats))
    if spec.rounding != "half_even" and compat != "qjax":
        compat = "qjax"
    scale = np.float32(draw(st.floats(2.0**-10, 50.0, width=32)))
    zp = draw(st.integers(spec.qmin, spec.qmax))
    x = np.array(draw(st.lists(floats32, min_size=N, max_size=N)), np.float32)
    return spec, compat, scale, zp, x


@functools.cache
def _jitted(fn, compat):
    return jax.jit(functools.partial(getattr(qjax, fn), compat=compat))


@settings(deadline=None, max_examples=100)
@given(setups())
def test_codes_stay_in_range(setup):
    spec, compat, scale, zp, x = setup
    x = x.copy()
    x[:3] = [np.nan, np.inf, -np.inf]
    q = np.asarray(_jitted("quantize", compat)(jnp.asarray(x), QParams(scale, zp, spec)), np.int64)
    assert np.all((q >= spec.qmin) & (q <= spec.qmax))


@settings(deadline=None, max_examples=100)
@given(setups())
def test_quantize_is_monotone(setup):
    spec, compat, scale, zp, x = setup
    xs = np.sort(x)
    q = np.asarray(_jitted("quantize", compat)(jnp.asarray(xs), QParams(scale, zp, spec)), np.int64)
    assert np.all(np.diff(q) >= 0)


@settings(deadline=None, max_examples=100)
@given(setups())
def test_fake_quant_error_is_at_most_half_a_step_inside_the_range(setup):
    spec, compat, scale, zp, x = setup
    qp = QParams(scale, zp, spec)
    y = np.asarray(_jitted("fake_quant", compat)(jnp.asarray(x), qp))
    lo = np.float64(scale) * (spec.qmin - zp)
    hi = np.float64(scale) * (spec.qmax - zp)
    inside = (x >= lo) & (x <= hi)
    # a quarter-step margin at the ends absorbs the edge codes' rounding
    slack = 4 * np.spacing(np.maximum(np.abs(x), np.abs(y))) + np.float64(scale) * 2.0**-20
    err = np.abs(y.astype(np.float64) - x)
    assert np.all(err[inside] <= np.float64(scale) / 2 + slack[inside])
    assert np.all(np.abs(y) <= np.maximum(np.abs(lo), np.abs(hi)) * (1 + 2.0**-22))


@settings(deadline=None, max_examples=100)
@given(setups())
def test_fake_quant_is_idempotent(setup):
    spec, compat, scale, zp, x = setup
    qp = QParams(scale, zp, spec)
    f = _jitted("fake_quant", compat)
    y = f(jnp.asarray(x), qp)
    assert bits_equal(f(y, qp), y)
    q = _jitted("quantize", compat)(y, qp)  # fake-quantized values are exact codes
    assert bits_equal(qjax.dequantize(q, qp), y)
