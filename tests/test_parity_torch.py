"""Run-time parity of qjax's numerics with PyTorch 2.13 (CPU) and TFLite's formulas.

Exact equality everywhere: integer codes compared as integers, floats compared as bit
patterns. Rule numbers are those of /work/shared/NUMERICS.md:

1. ``quantize(compat="torch")`` per-tensor == ``torch.quantize_per_tensor`` (an fma)
2. per-axis == ``torch.quantize_per_channel`` (float64 scales, int64 zero points)
3. ``dequantize`` == torch's ``dequantize`` (per-tensor and per-channel)
4. ``fake_quant(compat="torch")`` == ``torch.fake_quantize_per_{tensor,channel}_affine``,
   values and the straight-through gradient mask
5. ``qparams_from_minmax(compat="torch")`` == observers' ``calculate_qparams``
9. ``qparams_from_minmax(compat="torch_fused")`` == ``fused_moving_avg_obs_fake_quant``
7. ``compat="tflite"`` == an independent NumPy float64 transcription of TFLite's
   ``AffineQuantize`` and ``ChooseQuantizationParams``

Inputs are tie-heavy: values whose code ``x·inv`` is exactly ``k + 1/2``, ``f32((k+1/2)·s)``
and both of its float neighbours, plus uniform values, bound-straddling values and
NaN/inf/subnormal/huge specials. Every rule compares at least a million values; the
module prints the totals at teardown (``pytest -s``). LSQ (rule 10) is in
``test_parity_lsq.py``.
"""

from __future__ import annotations

import collections
import functools

import numpy as np
import pytest
from _helpers import tie_heavy

torch = pytest.importorskip("torch")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

import qjax  # noqa: E402
from qjax import QParams, QuantSpec  # noqa: E402

# torch 2.13 warns that quantized tensor creation functions are deprecated
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

COUNTS: collections.Counter = collections.Counter()

SCALES = [0.0235, 1 / 3, 2**-7, 0.1, 1.6150926, 3.7e-4]
U8_ZPS = [0, 1, 3, 127, 128, 255]
I8_ZPS = [0, 1, 3, 127, -3, -128]
SPECIALS = np.array(
    [
        np.nan,
        -np.nan,
        np.inf,
        -np.inf,
        0.0,
        -0.0,
        1e-45,
        -1e-45,
        1.2e-38,
        3.4e38,
        -3.4e38,
        1e30,
        -1e30,
    ],
    np.float32,
)
TORCH_DTYPES = {"quint8": (False, 0, 255), "qint8": (True, -128, 127)}


@pytest.fixture(scope="module", autouse=True)
def _report_counts():
    yield
    print("\nvalues compared per rule:", dict(sorted(COUNTS.items())))


# ---------------------------------------------------------------------------------
# helpers


def assert_same(rule: str, got, want, x=None) -> None:
    """Exact equality (float bit patterns, integer values); count the values."""
    got, want = np.asarray(got), np.asarray(want)
    assert got.shape == want.shape, (rule, got.shape, want.shape)
    if np.issubdtype(want.dtype, np.floating):
        assert got.dtype == want.dtype, (rule, got.dtype, want.dtype)
        bad = got.view(np.uint32) != want.view(np.uint32)
    else:
        bad = got.astype(np.int64) != want.astype(np.int64)
    if bad.any():
        idx = np.flatnonzero(bad)[:6]
        xs = None if x is None else np.asarray(x).ravel()[idx]
        raise AssertionError(
            f"{rule}: {int(bad.sum())} of {bad.size} differ; first at {idx}: "
            f"x={xs}, qjax={got.ravel()[idx]}, torch={want.ravel()[idx]}"
        )
    COUNTS[rule] += got.size


def boundary_values(scale, zp, qmin, qmax, n_ulps=3):
    """Floats whose code ``x·inv`` is at or next to ``qmin-zp-1/2`` and ``qmax-zp+1/2``."""
    s = np.float32(scale)
    inv = np.float64(np.float32(1) / s)
    out = []
    for t in (
        qmin - zp - 0.5,
        qmax - zp + 0.5,
        qmin - zp - 1.5,
        qmax - zp + 1.5,
        qmin - zp,
        qmax - zp,
    ):
        v = np.float32(t / inv)
        for d in range(-n_ulps, n_ulps + 1):
            w = v
            for _ in range(abs(d)):
                w = np.nextafter(w, np.float32(np.inf if d > 0 else -np.inf))
            out.append(w)
    return np.array(out, np.float32)


def sprinkle(rng, x, values):
    """Overwrite random positions of ``x`` (a copy) with ``values``."""
    x = x.copy()
    flat = x.reshape(-1)
    flat[rng.choice(flat.size, len(values), replace=False)] = values
    return x


def exact_tie_count(x, scale, zp=0):
    """How many ``x`` have ``x·inv + zp`` exactly on a half-integer (rule 1's ties)."""
    inv = np.float64(np.float32(1) / np.float32(scale))
    with np.errstate(invalid="ignore"):
        v = x.astype(np.float64) * inv + zp  # exact: 24 x 24 bits (+ small integer)
        return int(np.sum(np.isfinite(v) & (v - np.floor(v) == 0.5)))


_quantize = jax.jit(qjax.quantize, static_argnames=("compat",))
_dequantize = jax.jit(qjax.dequantize)


@functools.partial(jax.jit, static_argnames=("spec",))
def _fq_torch_value_and_grad(x, scale, zp, spec):
    def f(v):
        return qjax.fake_quant(v, QParams(scale, zp, spec), compat="torch", grad="ste")

    return f(x), jax.grad(lambda v: f(v).sum())(x)


def torch_fq_per_tensor(x, scale, zp, qmin, qmax):
    xt = torch.from_numpy(x).requires_grad_(True)
    y = torch.fake_quantize_per_tensor_affine(xt, float(scale), int(zp), qmin, qmax)
    y.sum().backward()
    return y.detach().numpy(), xt.grad.numpy()


def torch_fq_per_channel(x, scales, zps, axis, qmin, qmax):
    xt = torch.from_numpy(x).requires_grad_(True)
    y = torch.fake_quantize_per_channel_affine(
        xt, torch.from_numpy(scales), torch.from_numpy(zps.astype(np.int32)), axis, qmin, qmax
    )
    y.sum().backward()
    return y.detach().numpy(), xt.grad.numpy()


# ---------------------------------------------------------------------------------
# rule 1: torch.quantize_per_tensor; rule 3 on the same codes


@pytest.mark.parametrize("tdtype", ["quint8", "qint8"])
def test_quantize_per_tensor_matches_torch(tdtype):
    rng = np.random.default_rng(101)
    signed, qmin, qmax = TORCH_DTYPES[tdtype]
    spec = QuantSpec(signed=signed)
    ties = 0
    rule1_vs_rule4 = 0
    for scale in SCALES:
        s = np.float32(scale)
        for zp in I8_ZPS if signed else U8_ZPS:
            x = tie_heavy(rng, s, (30000,), qmin - zp - 20, qmax - zp + 20)
            x = sprinkle(rng, x, np.concatenate([SPECIALS, boundary_values(s, zp, qmin, qmax)]))
            ties += exact_tie_count(x, s, zp)
            tq = torch.quantize_per_tensor(
                torch.from_numpy(x), float(s), zp, getattr(torch, tdtype)
            )
            qp = QParams(s, zp, spec)
            jq = _quantize(jnp.asarray(x), qp, compat="torch")
            assert jq.dtype == spec.dtype
            assert_same("1 quantize_per_tensor", jq, tq.int_repr().numpy(), x)
            assert_same("3 dequantize per-tensor", _dequantize(jq, qp), tq.dequantize().numpy(), x)
            # The data really separates rule 1 (zp before rounding) from rule 4.
            tfq = torch.fake_quantize_per_tensor_affine(
                torch.from_numpy(x), float(s), zp, qmin, qmax
            )
            rule1_vs_rule4 += int(np.sum(tfq.numpy() != tq.dequantize().numpy()))
    assert ties > 20000, ties  # exact x·inv + zp = k + 1/2 cases were exercised
    assert rule1_vs_rule4 > 1000, rule1_vs_rule4


def test_quantize_per_tensor_eager_and_constant_qparams():
    """The same rule outside jit, and under jit with the qparams closed over (constants)."""
    rng = np.random.default_rng(102)
    for scale, zp, signed in [(0.0235, 3, False), (1 / 3, -3, True), (0.1, 127, True)]:
        s = np.float32(scale)
        qp = QParams(s, zp, QuantSpec(signed=signed))
        x = tie_heavy(rng, s, (50000,), -300, 300)
        want = torch.quantize_per_tensor(
            torch.from_numpy(x), float(s), zp, torch.qint8 if signed else torch.quint8
        ).int_repr()
        assert_same(
            "1 quantize_per_tensor", qjax.quantize(jnp.asarray(x), qp, compat="torch"), want, x
        )
        const = jax.jit(lambda v, qp=qp: qjax.quantize(v, qp, compat="torch"))
        assert_same("1 quantize_per_tensor", const(jnp.asarray(x)), want, x)


# Inputs on which fma(x, inv, zp) and the double rounding f32(f64(x·inv) + zp) round
# to different codes: x·inv = k + 1/2 ± 2^-17 ± 2^-47, found by factoring.
FMA_CASES = [
    ("0x1.9d78540000000p-9", "0x1.9d76b60000000p-8", 128),
    ("0x1.636f620000000p-9", "0x1.636dfe0000000p-8", 128),
    ("0x1.70c5440000000p-9", "0x1.70c3d40000000p-8", 128),
    ("-0x1.03be440000000p-9", "0x1.03bf480000000p-8", 255),
    ("-0x1.cc405a0000000p-7", "0x1.07000e0000000p-8", 255),
]


@pytest.mark.parametrize("xh, sh, zp", FMA_CASES)
def test_quantize_per_tensor_is_one_rounding(xh, sh, zp):
    x = np.float32(float.fromhex(xh))
    s = np.float32(float.fromhex(sh))
    inv = np.float32(1) / s
    double_rounded = np.rint(np.float32(np.float64(x) * np.float64(inv) + zp))
    qp_t = QParams(s, zp, QuantSpec(signed=False))
    for n in (1, 7, 64, 100):  # ATen's scalar tail and vector body
        xs = np.full(n, x, np.float32)
        tq = torch.quantize_per_tensor(torch.from_numpy(xs), float(s), zp, torch.quint8).int_repr()
        assert int(tq[0]) != double_rounded  # the case does separate the two
        assert_same(
            "1 quantize_per_tensor", _quantize(jnp.asarray(xs), qp_t, compat="torch"), tq, xs
        )
    # rule 2 rounds twice (f32(f32(x·inv) + zp)): XLA must not contract it into an fma.
    xs = np.full((2, 40), x, np.float32)
    tq = torch.quantize_per_channel(
        torch.from_numpy(xs),
        torch.tensor([s, s], dtype=torch.float64),
        torch.tensor([zp, zp]),
        0,
        torch.quint8,
    ).int_repr()
    assert int(tq[0, 0]) == np.rint(np.float32(np.float32(x * inv) + np.float32(zp)))
    qp_c = QParams(jnp.full((2,), s), jnp.full((2,), zp), QuantSpec(signed=False, axis=0))
    assert_same("2 quantize_per_channel", _quantize(jnp.asarray(xs), qp_c, compat="torch"), tq, xs)


# ---------------------------------------------------------------------------------
# rule 2: torch.quantize_per_channel; rule 3 on the same codes


def _channel_qparams(rng, c, signed):
    scales = rng.choice(np.float32(SCALES), c) * rng.choice([1.0, 1.0, 0.75, 1.3], c)
    scales = scales.astype(np.float32)
    scales[: len(SCALES)] = np.float32(SCALES)  # the round ones exactly, too
    zps = rng.choice(I8_ZPS if signed else U8_ZPS, c).astype(np.int64)
    return scales, zps


@pytest.mark.parametrize("tdtype", ["quint8", "qint8"])
@pytest.mark.parametrize("axis", [0, 1])
def test_quantize_per_channel_matches_torch(tdtype, axis):
    rng = np.random.default_rng(201 + axis)
    signed, qmin, qmax = TORCH_DTYPES[tdtype]
    c = 64
    shape = (c, 8192) if axis == 0 else (16, c, 512)
    scales, zps = _channel_qparams(rng, c, signed)
    bshape = [1] * len(shape)
    bshape[axis] = c
    x = tie_heavy(rng, scales.reshape(bshape), shape, -300, 300)
    x = sprinkle(rng, x, np.tile(SPECIALS, 20))
    tq = torch.quantize_per_channel(
        torch.from_numpy(x),
        torch.from_numpy(scales.astype(np.float64)),  # float64 scales from float32 values
        torch.from_numpy(zps),  # int64 zero points
        axis,
        getattr(torch, tdtype),
    )
    spec = QuantSpec(signed=signed, axis=axis)
    qp = QParams(jnp.asarray(scales), jnp.asarray(zps.astype(np.int32)), spec)
    jq = _quantize(jnp.asarray(x), qp, compat="torch")
    assert_same("2 quantize_per_channel", jq, tq.int_repr().numpy(), x)
    assert_same("3 dequantize per-channel", _dequantize(jq, qp), tq.dequantize().numpy(), x)


# ---------------------------------------------------------------------------------
# rule 3: every code, many scales


@pytest.mark.parametrize("tdtype", ["quint8", "qint8"])
def test_dequantize_every_code_matches_torch(tdtype):
    rng = np.random.default_rng(301)
    signed, qmin, qmax = TORCH_DTYPES[tdtype]
    codes = np.arange(qmin, qmax + 1)
    c = 2048
    scales = (10.0 ** rng.uniform(-6, 2, c)).astype(np.float32)
    scales[: len(SCALES)] = np.float32(SCALES)
    zps = rng.integers(qmin, qmax + 1, c)
    q = np.broadcast_to(codes, (c, codes.size)).astype(np.int8 if signed else np.uint8).copy()
    tq = torch._make_per_channel_quantized_tensor(
        torch.from_numpy(q), torch.from_numpy(scales.astype(np.float64)), torch.from_numpy(zps), 0
    )
    spec = QuantSpec(signed=signed, axis=0)
    qp = QParams(jnp.asarray(scales), jnp.asarray(zps.astype(np.int32)), spec)
    assert_same(
        "3 dequantize per-channel", _dequantize(jnp.asarray(q), qp), tq.dequantize().numpy()
    )
    spec_t = QuantSpec(signed=signed)
    for i in range(0, c, 8):  # per-tensor: the same codes, one scale at a time
        tq = torch._make_per_tensor_quantized_tensor(
            torch.from_numpy(q[i]), float(scales[i]), int(zps[i])
        )
        qp = QParams(scales[i], int(zps[i]), spec_t)
        assert_same(
            "3 dequantize per-tensor", _dequantize(jnp.asarray(q[i]), qp), tq.dequantize().numpy()
        )


# ---------------------------------------------------------------------------------
# rule 4: fake-quant values and gradient mask

FQ_RANGES = [
    # (QuantSpec kwargs, qmin, qmax)
    (dict(signed=False), 0, 255),
    (dict(signed=True), -128, 127),
    (dict(signed=False, reduce_range=True), 0, 127),
    (dict(signed=True, reduce_range=True), -64, 63),
    (dict(bits=4, signed=False), 0, 15),
    (dict(bits=4, signed=True), -8, 7),
    (dict(signed=False, quant_min=0, quant_max=200), 0, 200),
]


def _zps_in(qmin, qmax):
    cands = [qmin, qmin + 1, qmin + 3, (qmin + qmax) // 2, (qmin + qmax + 1) // 2, qmax, 0, 1, 3]
    return sorted({z for z in cands if qmin <= z <= qmax})


@pytest.mark.parametrize("kw, qmin, qmax", FQ_RANGES)
def test_fake_quant_per_tensor_matches_torch(kw, qmin, qmax):
    rng = np.random.default_rng(401 + qmax - qmin)
    spec = QuantSpec(**kw)
    assert (spec.qmin, spec.qmax) == (qmin, qmax)
    for scale in SCALES:
        s = np.float32(scale)
        for zp in _zps_in(qmin, qmax):
            x = tie_heavy(rng, s, (4000,), qmin - zp - 10, qmax - zp + 10)
            x = sprinkle(rng, x, np.concatenate([SPECIALS, boundary_values(s, zp, qmin, qmax)]))
            ty, tg = torch_fq_per_tensor(x, s, zp, qmin, qmax)
            jy, jg = _fq_torch_value_and_grad(jnp.asarray(x), s, np.int32(zp), spec)
            assert_same("4 fake_quant per-tensor value", jy, ty, x)
            assert_same("4 fake_quant per-tensor grad mask", jg, tg, x)


@pytest.mark.parametrize("kw, qmin, qmax", FQ_RANGES[:4] + FQ_RANGES[5:6])
@pytest.mark.parametrize("axis", [0, 1])
def test_fake_quant_per_channel_matches_torch(kw, qmin, qmax, axis):
    rng = np.random.default_rng(451 + axis + qmax)
    spec = QuantSpec(axis=axis, **kw)
    c = 48
    shape = (c, 2500) if axis == 0 else (10, c, 250)
    scales = _channel_qparams(rng, c, True)[0]
    zps = rng.choice(_zps_in(qmin, qmax), c)
    bshape = [1] * len(shape)
    bshape[axis] = c
    span = qmax - qmin
    x = tie_heavy(rng, scales.reshape(bshape), shape, -span - 10, span + 10)
    edges = np.concatenate([boundary_values(scales[i], zps[i], qmin, qmax) for i in range(c)])
    xc = np.moveaxis(x, axis, 0)
    moved = xc.shape
    xc = xc.reshape(c, -1).copy()
    per = edges.size // c
    xc[:, :per] = edges.reshape(c, per)  # each channel gets its own boundary values
    xc[:, per : per + SPECIALS.size] = SPECIALS
    x = np.ascontiguousarray(np.moveaxis(xc.reshape(moved), 0, axis))
    ty, tg = torch_fq_per_channel(x, scales, zps, axis, qmin, qmax)
    jy, jg = _fq_torch_value_and_grad(
        jnp.asarray(x), jnp.asarray(scales), jnp.asarray(zps.astype(np.int32)), spec
    )
    assert_same("4 fake_quant per-channel value", jy, ty, x)
    assert_same("4 fake_quant per-channel grad mask", jg, tg, x)


def test_fake_quant_mask_is_inclusive_on_the_unclamped_code():
    """x·inv = qmax - zp + 1/2 rounds half-even: to qmax+1 (masked) or qmax (kept)."""
    spec = QuantSpec(signed=False)
    s = np.float32(2**-4)
    for zp in (0, 1):  # qmax - zp + 1/2 = 255.5 -> 256 (out), 254.5 -> 254 (in)
        x = np.array([(255 - zp + 0.5) * s, (0 - zp - 0.5) * s], np.float32)
        ty, tg = torch_fq_per_tensor(x, s, zp, 0, 255)
        jy, jg = _fq_torch_value_and_grad(jnp.asarray(x), s, np.int32(zp), spec)
        assert_same("4 fake_quant per-tensor grad mask", jg, tg, x)
        assert_same("4 fake_quant per-tensor value", jy, ty, x)
        assert list(tg) == ([0.0, 1.0] if zp == 0 else [1.0, 0.0])


# ---------------------------------------------------------------------------------
# rule 5: observers' calculate_qparams


def random_ranges(rng, n):
    """min <= max pairs: mixed signs, all-positive, all-negative, symmetric, zero,
    constant, tiny (eps-sized) and huge magnitudes."""
    kind = rng.integers(0, 8, n)
    a = (rng.standard_normal(n) * 10.0 ** rng.uniform(-9, 4, n)).astype(np.float32)
    b = (rng.standard_normal(n) * 10.0 ** rng.uniform(-9, 4, n)).astype(np.float32)
    mn, mx = np.minimum(a, b), np.maximum(a, b)
    pos = kind == 1
    mn, mx = (
        np.where(pos, np.abs(a).clip(max=np.abs(b)), mn),
        np.where(pos, np.maximum(np.abs(a), np.abs(b)), mx),
    )
    neg = kind == 2
    mn, mx = (
        np.where(neg, -np.maximum(np.abs(a), np.abs(b)), mn),
        np.where(neg, -np.minimum(np.abs(a), np.abs(b)), mx),
    )
    mn = np.where(kind == 3, -np.abs(mx), mn)  # exactly symmetric
    mx = np.where(kind == 3, np.abs(mx), mx)
    mn, mx = np.where(kind == 4, 0, mn), np.where(kind == 4, 0, mx)  # zero range
    mx = np.where(kind == 5, mn, mx)  # constant
    tiny = kind == 6  # around the eps / small-scale thresholds
    t = (
        rng.uniform(0, 3, n)
        * np.float32(2**-23)
        * rng.choice([1, 127.5, 255, 6.1e-5 / 2**-23 * 255], n)
    )
    mn, mx = np.where(tiny, -t * rng.uniform(0, 1, n), mn), np.where(tiny, t, mx)
    mn, mx = mn.astype(np.float32), mx.astype(np.float32)
    return np.minimum(mn, mx), np.maximum(mn, mx)


OBSERVER_CONFIGS = [
    (dtype, sym, rr, custom)
    for dtype in ("quint8", "qint8")
    for sym in (False, True)
    for rr in (False, True)
    for custom in (False, True)
    if not (sym and rr and dtype == "quint8")  # torch refuses this combination
]


@pytest.mark.parametrize("dtype, sym, rr, custom", OBSERVER_CONFIGS)
def test_qparams_match_torch_observers(dtype, sym, rr, custom):
    from torch.ao.quantization.observer import MinMaxObserver, PerChannelMinMaxObserver

    rng = np.random.default_rng(501)
    signed = dtype == "qint8"
    kw = {}
    if custom:
        kw = dict(quant_min=-100, quant_max=100) if signed else dict(quant_min=0, quant_max=200)
    qscheme = torch.per_channel_symmetric if sym else torch.per_channel_affine
    obs = PerChannelMinMaxObserver(
        ch_axis=0, dtype=getattr(torch, dtype), qscheme=qscheme, reduce_range=rr, **kw
    )
    mn, mx = random_ranges(rng, 100_000)
    obs.min_val, obs.max_val = torch.from_numpy(mn), torch.from_numpy(mx)
    ts, tz = obs.calculate_qparams()
    spec = QuantSpec(signed=signed, symmetric=sym, reduce_range=rr, axis=0, **kw)
    assert (spec.qmin, spec.qmax) == (obs.quant_min, obs.quant_max)
    qp = qjax.qparams_from_minmax(jnp.asarray(mn), jnp.asarray(mx), spec, compat="torch")
    assert_same("5 observer scale", qp.scale, ts.numpy(), np.stack([mn, mx], 1))
    assert_same("5 observer zero_point", qp.zero_point, tz.numpy(), np.stack([mn, mx], 1))
    # Per-tensor observers take the same path; a few hundred scalars through it too.
    qscheme = torch.per_tensor_symmetric if sym else torch.per_tensor_affine
    obs_t = MinMaxObserver(dtype=getattr(torch, dtype), qscheme=qscheme, reduce_range=rr, **kw)
    spec_t = spec.replace(axis=None)
    f = jax.jit(lambda a, b: qjax.qparams_from_minmax(a, b, spec_t, compat="torch"))
    for i in range(0, 300):
        obs_t.min_val, obs_t.max_val = torch.tensor(mn[i]), torch.tensor(mx[i])
        ts, tz = obs_t.calculate_qparams()
        qp = f(mn[i], mx[i])
        assert_same("5 observer scale", np.reshape(qp.scale, (1,)), ts.numpy())
        assert_same("5 observer zero_point", np.reshape(qp.zero_point, (1,)), tz.numpy())


# ---------------------------------------------------------------------------------
# rule 9: the fused observer + fake-quant (default QAT qconfig)

FUSED_RANGES = [
    (dict(signed=False), 0, 255),
    (dict(signed=True), -128, 127),
    (dict(signed=False, reduce_range=True), 0, 127),
    (dict(signed=True, reduce_range=True), -64, 63),
    (dict(signed=False, quant_min=0, quant_max=200), 0, 200),
    (dict(signed=True, quant_min=-100, quant_max=100), -100, 100),
]


@pytest.mark.parametrize("kw, qmin, qmax", FUSED_RANGES)
@pytest.mark.parametrize("sym", [False, True])
def test_qparams_match_torch_fused_choose_qparams(kw, qmin, qmax, sym):
    rng = np.random.default_rng(901)
    n = 100_000
    mn, mx = random_ranges(rng, n)
    # The observer is off, so the running min/max are used as given (no averaging).
    scale, zp = torch.ones(n), torch.zeros(n, dtype=torch.int32)
    torch.fused_moving_avg_obs_fake_quant(
        torch.zeros(n, 1), torch.tensor([0]), torch.tensor([1]),
        torch.from_numpy(mn.copy()), torch.from_numpy(mx.copy()), scale, zp,
        1.0, qmin, qmax, 0, True, sym,
    )  # fmt: skip
    spec = QuantSpec(symmetric=sym, axis=0, **kw)
    assert (spec.qmin, spec.qmax) == (qmin, qmax)
    qp = qjax.qparams_from_minmax(jnp.asarray(mn), jnp.asarray(mx), spec, compat="torch_fused")
    assert_same("9 fused scale", qp.scale, scale.numpy(), np.stack([mn, mx], 1))
    assert_same("9 fused zero_point", qp.zero_point, zp.numpy(), np.stack([mn, mx], 1))


def _fused_spec(fq_module):
    o = fq_module.activation_post_process
    return QuantSpec(
        signed=o.dtype == torch.qint8,
        symmetric=fq_module.is_symmetric_quant,
        axis=0 if fq_module.is_per_channel else None,
        quant_min=o.quant_min,
        quant_max=o.quant_max,
    )


@pytest.mark.parametrize("which", ["act", "wt", "per_channel_wt"])
def test_fused_fake_quant_module_matches(which):
    """FusedMovingAvgObsFakeQuantize end to end: qparams, values and gradients."""
    from torch.ao.quantization import fake_quantize as tfq

    factory = {
        "act": tfq.default_fused_act_fake_quant,
        "wt": tfq.default_fused_wt_fake_quant,
        "per_channel_wt": tfq.default_fused_per_channel_wt_fake_quant,
    }[which]
    rng = np.random.default_rng(911)
    for trial in range(40):
        shape = (16, 500)
        x = (rng.standard_normal(shape) * 10.0 ** rng.uniform(-4, 2)).astype(np.float32)
        if trial % 4 == 1:
            x = np.abs(x)  # all >= 0: the symmetric branch falls back to affine (zp -128)
        elif trial % 4 == 2:
            x = -np.abs(x)
        elif trial % 4 == 3:
            x = np.eye(*shape, dtype=np.float32) * np.float32(rng.uniform(0.1, 3))  # k·I
        mod = factory()
        xt = torch.from_numpy(x).requires_grad_(True)
        y = mod(xt)
        y.sum().backward()
        spec = _fused_spec(mod)
        if spec.granularity == "tensor":
            mn, mx = x.min(), x.max()
        else:
            mn, mx = x.min(axis=1), x.max(axis=1)
        qp = qjax.qparams_from_minmax(mn, mx, spec, compat="torch_fused")
        assert_same("9 fused scale", np.reshape(qp.scale, -1), mod.scale.numpy())
        assert_same("9 fused zero_point", np.reshape(qp.zero_point, -1), mod.zero_point.numpy())
        jy, jg = _fq_torch_value_and_grad(jnp.asarray(x), qp.scale, qp.zero_point, spec)
        assert_same("9 fused fake_quant value", jy, y.detach().numpy(), x)
        assert_same("9 fused fake_quant grad", jg, xt.grad.numpy(), x)
        if trial % 4 == 3 and which == "wt":
            # NUMERICS.md: k·I trains with scale k/255 and zero point -128.
            assert int(mod.zero_point) == -128
        # With the observer disabled the op still recomputes scale/zp from the stored
        # min/max every forward, overwriting hand-set values.
        mod.disable_observer()
        mod.scale.fill_(123.0)
        mod(torch.from_numpy(rng.standard_normal(shape).astype(np.float32)))
        assert_same("9 fused scale", np.reshape(qp.scale, -1), mod.scale.numpy())


def test_choose_qparams_per_tensor_matches_torch_fused():
    """``torch._choose_qparams_per_tensor`` (dynamic quant): quint8, no preserve_sparsity."""
    rng = np.random.default_rng(921)
    f = {}
    for rr in (False, True):
        spec = QuantSpec(signed=False, reduce_range=rr)
        f[rr] = jax.jit(lambda a, b, spec=spec: qjax.qparams_from_minmax(a, b, spec, "torch_fused"))
    for i in range(400):
        x = (rng.standard_normal(64) * 10.0 ** rng.uniform(-6, 3) + rng.uniform(-1, 1)).astype(
            np.float32
        )
        rr = bool(i % 2)
        ts, tz = torch._choose_qparams_per_tensor(torch.from_numpy(x), rr)
        qp = f[rr](x.min(), x.max())
        assert_same("9 fused scale", np.float32(qp.scale), np.float32(ts))
        assert_same("9 fused zero_point", int(qp.zero_point), tz)


# ---------------------------------------------------------------------------------
# rule 7: TFLite, against a NumPy transcription of its reference formulas


def tflite_quantize_ref(x, scale, zp, qmin, qmax):
    """TFLite AffineQuantize: ``clamp(TfLiteRound(x / s) + zp)`` with float32 ``x / s``."""
    v = (x / np.float32(scale)).astype(np.float64)  # IEEE float32 quotient, widened
    r = np.sign(v) * np.floor(np.abs(v) + 0.5)  # std::round, exact in float64
    return np.clip(r + zp, qmin, qmax).astype(np.int64)


def tflite_choose_qparams_ref(rmin, rmax, qmin, qmax):
    """TFLite ``ChooseQuantizationParams`` (quantization_util.h) in float64, per element."""
    rmin = np.minimum(rmin.astype(np.float64), 0.0)
    rmax = np.maximum(rmax.astype(np.float64), 0.0)
    scale = (rmax - rmin) / (float(qmax) - float(qmin))
    with np.errstate(divide="ignore", invalid="ignore"):
        zp_from_min = qmin - rmin / scale
        zp_from_max = qmax - rmax / scale
        err_min = abs(qmin) + np.abs(rmin / scale)
        err_max = abs(qmax) + np.abs(rmax / scale)
    zpd = np.where(err_min < err_max, zp_from_min, zp_from_max)
    frac = np.abs(zpd - np.trunc(zpd))  # exact in float64
    rounded = np.trunc(zpd) + np.where(frac >= 0.5, np.sign(zpd), 0.0)  # std::round
    zp = np.where(zpd < qmin, qmin, np.where(zpd > qmax, qmax, rounded))
    point = rmin == rmax  # TFLite: scale 0, zp 0 (qjax documents scale 1.0 instead)
    return np.where(point, 0.0, scale), np.where(point, 0, zp).astype(np.int64)


@pytest.mark.parametrize("signed", [False, True])
def test_tflite_quantize_matches_reference(signed):
    rng = np.random.default_rng(701)
    qmin, qmax = (-128, 127) if signed else (0, 255)
    spec = QuantSpec(signed=signed)
    for scale in SCALES + [0.0173, 5.5]:
        s = np.float32(scale)
        for zp in I8_ZPS if signed else U8_ZPS:
            x = tie_heavy(rng, s, (12000,), qmin - zp - 10, qmax - zp + 10)
            x = np.concatenate([x, -x])  # half-away ties on both signs
            x = sprinkle(rng, x, boundary_values(s, zp, qmin, qmax))
            jq = _quantize(jnp.asarray(x), QParams(s, zp, spec), compat="tflite")
            assert_same("7 tflite quantize", jq, tflite_quantize_ref(x, s, zp, qmin, qmax), x)
    # per-axis: the same formula per channel, and qparams closed over (constants)
    scales = np.float32([0.0235, 1 / 3, 0.1])
    zps = np.array([1, 3, 0] if not signed else [-3, 1, 0])
    x = tie_heavy(rng, scales[:, None], (3, 20000), -150, 150)
    qp = QParams(jnp.asarray(scales), jnp.asarray(zps, jnp.int32), QuantSpec(signed=signed, axis=0))
    got = jax.jit(lambda v: qjax.quantize(v, qp, compat="tflite"))(jnp.asarray(x))
    want = np.stack([tflite_quantize_ref(x[i], scales[i], zps[i], qmin, qmax) for i in range(3)])
    assert_same("7 tflite quantize", got, want, x)


@pytest.mark.parametrize("kw, qmin, qmax", [
    (dict(signed=True), -128, 127),
    (dict(signed=False), 0, 255),
    (dict(signed=True, narrow_range=True), -127, 127),
])  # fmt: skip
def test_tflite_qparams_match_reference(kw, qmin, qmax):
    rng = np.random.default_rng(711)
    mn, mx = random_ranges(rng, 200_000)
    spec = QuantSpec(axis=0, **kw)
    assert (spec.qmin, spec.qmax) == (qmin, qmax)
    qp = qjax.qparams_from_minmax(jnp.asarray(mn), jnp.asarray(mx), spec, compat="tflite")
    scale, zp = tflite_choose_qparams_ref(mn, mx, qmin, qmax)
    point = scale == 0
    want_scale = np.where(point, 1.0, scale).astype(np.float32)  # documented qjax choice
    assert_same("7 tflite qparams scale", qp.scale, want_scale, np.stack([mn, mx], 1))
    assert_same("7 tflite qparams zero_point", qp.zero_point, zp, np.stack([mn, mx], 1))
    assert point.sum() > 1000  # the point range was exercised
