"""LSQ parity with PyTorch 2.13 (CPU): ``fake_quant(grad="lsq", compat="torch")`` against
``torch._fake_quantize_learnable_per_{tensor,channel}_affine`` and
``_LearnableFakeQuantize`` (NUMERICS.md rule 10).

Forward values and ``dX`` are compared exactly. ``dScale`` and ``dZeroPoint`` are float32
sums over elements whose order differs between torch and XLA, so summed gradients are
compared with a tolerance relative to the sum of the absolute per-element terms, and
the per-element terms themselves are compared exactly where the sum has one term: one
element per channel (per-channel op) or one element per call (per-tensor op).

Zero points include halves and negatives: the per-tensor forward rounds ``nearbyint(zp)``
while its backward uses ``int(zp + 0.5)`` (2.5 -> 2 forward, 3 backward; -1.5 -> -2 and
-1), and torch's kernel recomputes the code as ``rint(fma(x, inv, zp))``.
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

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

COUNTS: collections.Counter = collections.Counter()
SCALES = [0.0235, 1 / 3, 2**-7]
RANGES = {"quint8": (False, 0, 255), "qint8": (True, -128, 127)}
ZPS = {
    "quint8": [0.0, 2.5, 3.5, 1.2, 3.0, 127.5, 254.6],
    "qint8": [0.0, 2.5, 3.5, -0.5, -1.5, -1.7, 1.2, 126.5],
}


@pytest.fixture(scope="module", autouse=True)
def _report_counts():
    yield
    print("\nvalues compared (rule 10 / LSQ):", dict(sorted(COUNTS.items())))


def assert_same(what: str, got, want, x=None, *, reduction=False) -> None:
    """Bit-exact equality. ``reduction=True`` (dScale, dZeroPoint): a single-term sum,
    compared as a number (``-0.0 == +0.0``): torch's sum starts from +0.0, XLA turns a
    reduction over one element into a reshape that keeps a term's -0.0."""
    got, want = np.asarray(got), np.asarray(want)
    if reduction:
        got, want = got + np.float32(0), want + np.float32(0)
    assert got.shape == want.shape and got.dtype == want.dtype, (what, got.shape, want.shape)
    bad = got.view(np.uint32) != want.view(np.uint32)
    if bad.any():
        idx = np.flatnonzero(bad)[:6]
        xs = None if x is None else np.asarray(x).ravel()[idx]
        raise AssertionError(
            f"{what}: {int(bad.sum())} of {bad.size} differ; first at {idx}: x={xs}, "
            f"qjax={got.ravel()[idx]}, torch={want.ravel()[idx]}"
        )
    COUNTS[what] += got.size


def assert_close_sum(what: str, got, want, abs_terms) -> None:
    """Summed gradients: |qjax - torch| <= 1e-4 · sum of |per-element terms| (+ tiny)."""
    got, want, abs_terms = (np.asarray(a, np.float64) for a in (got, want, abs_terms))
    tol = 1e-4 * abs_terms + 1e-30
    err = np.abs(got - want)
    assert np.all(err <= tol), (what, got, want, err.max(), tol)
    COUNTS[what] += got.size


@functools.partial(jax.jit, static_argnames=("spec", "grad_scale"))
def _lsq(x, scale, zp, g, spec, grad_scale):
    def f(x, scale, zp):
        qp = QParams(scale, zp, spec)
        return qjax.fake_quant(x, qp, grad="lsq", compat="torch", grad_scale=grad_scale)

    y, vjp = jax.vjp(f, x, scale, zp)
    return (y, *vjp(g))


def _lsq_per_element(x, scale, zp, g, spec, grad_scale):
    """Per-element (dX, dScale, dZeroPoint): the per-tensor LSQ applied to each element
    alone (vmap over elements of shape (1,)), as torch computes it on a 1-element X."""
    return jax.vmap(
        lambda xi, gi: _lsq(xi[None], scale, zp, gi[None], spec, grad_scale)[1:],
    )(x, g)


def _torch_lsq_per_tensor(x, scale, zp, g, qmin, qmax, gf):
    xt = torch.from_numpy(x).requires_grad_(True)
    st = torch.tensor([scale], requires_grad=True)
    zt = torch.tensor([zp], requires_grad=True)
    y = torch._fake_quantize_learnable_per_tensor_affine(xt, st, zt, qmin, qmax, gf)
    y.backward(torch.from_numpy(g))
    return y.detach().numpy(), xt.grad.numpy(), st.grad.numpy()[0], zt.grad.numpy()[0]


def _abs_terms(g, dx_torch, gf, scale, zb_abs_max):
    """Upper bound of the sums of |per-element terms| of dScale and dZeroPoint."""
    inside = dx_torch != 0
    ag = np.abs(g.astype(np.float64)) * gf
    ds = np.sum(ag * np.where(inside, 0.5, zb_abs_max))
    dz = np.sum(ag * np.where(inside, 0.0, scale))
    return ds, dz


# ---------------------------------------------------------------------------------
# per-tensor


@pytest.mark.parametrize("tdtype", ["quint8", "qint8"])
@pytest.mark.parametrize("use_grad_scaling", [False, True])
def test_lsq_per_tensor_matches_torch(tdtype, use_grad_scaling):
    rng = np.random.default_rng(1001 + use_grad_scaling)
    signed, qmin, qmax = RANGES[tdtype]
    spec = QuantSpec(signed=signed)
    n = 16000
    gs = "auto" if use_grad_scaling else None
    gf = 1.0 / (n * qmax) ** 0.5 if use_grad_scaling else 1.0
    for scale in SCALES:
        s = np.float32(scale)
        for zp in ZPS[tdtype]:
            zb = int(np.clip(np.float32(zp) + np.float32(0.5), qmin, qmax))  # int(zp + 0.5)
            x = tie_heavy(rng, s, (n,), qmin - zb - 15, qmax - zb + 15)
            x[:3] = [np.nan, np.inf, -np.inf]
            g = rng.standard_normal(n).astype(np.float32)
            ty, tdx, tds, tdz = _torch_lsq_per_tensor(x, s, zp, g, qmin, qmax, gf)
            jy, jdx, jds, jdz = _lsq(jnp.asarray(x), s, np.float32(zp), jnp.asarray(g), spec, gs)
            assert_same("lsq per-tensor forward", jy, ty, x)
            assert_same("lsq per-tensor dX", jdx, tdx, x)
            bound = max(abs(qmin - zb), abs(qmax - zb))
            ads, adz = _abs_terms(g, tdx, gf, s, bound)
            assert_close_sum("lsq per-tensor dScale (sum)", jds, tds, ads)
            assert_close_sum("lsq per-tensor dZeroPoint (sum)", jdz, tdz, adz)


@pytest.mark.parametrize("tdtype", ["quint8", "qint8"])
def test_lsq_per_tensor_terms_exact(tdtype):
    """Each element alone: dScale and dZeroPoint are single terms, compared bit for bit."""
    rng = np.random.default_rng(1011)
    signed, qmin, qmax = RANGES[tdtype]
    spec = QuantSpec(signed=signed)
    m = 300
    for scale in SCALES:
        s = np.float32(scale)
        for zp in ZPS[tdtype]:
            for gs, gf in (
                (None, 1.0),
                ("auto", 1.0 / qmax**0.5),
                (0.0371, float(np.float32(0.0371))),
            ):
                zb = int(np.clip(np.float32(zp) + np.float32(0.5), qmin, qmax))
                x = tie_heavy(rng, s, (m,), qmin - zb - 6, qmax - zb + 6)
                x[:2] = [(qmin - zb - 0.5) * s, (qmax - zb + 0.5) * s]  # the bounds' ties
                g = rng.standard_normal(m).astype(np.float32)
                want = np.array(
                    [
                        _torch_lsq_per_tensor(x[i : i + 1], s, zp, g[i : i + 1], qmin, qmax, gf)[1:]
                        for i in range(m)
                    ],
                    dtype=object,
                )
                tdx = np.array([w[0][0] for w in want], np.float32)
                tds = np.array([w[1] for w in want], np.float32)
                tdz = np.array([w[2] for w in want], np.float32)
                jdx, jds, jdz = _lsq_per_element(
                    jnp.asarray(x), s, np.float32(zp), jnp.asarray(g), spec, gs
                )
                assert_same("lsq per-tensor dX (per element)", np.reshape(jdx, -1), tdx, x)
                assert_same("lsq per-tensor dScale (per element)", jds, tds, x, reduction=True)
                assert_same("lsq per-tensor dZeroPoint (per element)", jdz, tdz, x, reduction=True)


# ---------------------------------------------------------------------------------
# per-channel


def _torch_lsq_per_channel(x, scales, zps, g, axis, qmin, qmax, gf):
    xt = torch.from_numpy(x).requires_grad_(True)
    st = torch.from_numpy(scales).requires_grad_(True)
    zt = torch.from_numpy(zps).requires_grad_(True)
    y = torch._fake_quantize_learnable_per_channel_affine(xt, st, zt, axis, qmin, qmax, gf)
    y.backward(torch.from_numpy(g))
    return y.detach().numpy(), xt.grad.numpy(), st.grad.numpy(), zt.grad.numpy()


def _channel_params(rng, c, tdtype):
    _, qmin, qmax = RANGES[tdtype]
    scales = (rng.choice(np.float32(SCALES), c) * rng.choice([1.0, 1.0, 1.37], c)).astype(
        np.float32
    )
    zps = rng.choice(np.float32(ZPS[tdtype]), c).astype(np.float32)
    return scales, zps


@pytest.mark.parametrize("tdtype", ["quint8", "qint8"])
@pytest.mark.parametrize("use_grad_scaling", [False, True])
def test_lsq_per_channel_terms_exact(tdtype, use_grad_scaling):
    """One element per channel, 200k channels: every per-element term compared exactly."""
    rng = np.random.default_rng(1021 + use_grad_scaling)
    signed, qmin, qmax = RANGES[tdtype]
    c = 200_000
    scales, zps = _channel_params(rng, c, tdtype)
    zr = np.clip(np.round(zps), qmin, qmax)  # per-channel rounds half-even, forward and back
    span = qmax - qmin
    x = tie_heavy(rng, scales, (c,), -span - 8, span + 8).reshape(c, 1)
    x[:4, 0] = [np.nan, np.inf, -np.inf, 3e38]
    x[4:8, 0] = (np.array([qmin - 0.5, qmax + 0.5, qmin - 1.5, qmax + 1.5]) - zr[4:8]) * scales[4:8]
    g = rng.standard_normal((c, 1)).astype(np.float32)
    gs = "auto" if use_grad_scaling else None
    gf = 1.0 / (c * qmax) ** 0.5 if use_grad_scaling else 1.0
    ty, tdx, tds, tdz = _torch_lsq_per_channel(x, scales, zps, g, 0, qmin, qmax, gf)
    spec = QuantSpec(signed=signed, axis=0)
    jy, jdx, jds, jdz = _lsq(
        jnp.asarray(x), jnp.asarray(scales), jnp.asarray(zps), jnp.asarray(g), spec, gs
    )
    assert_same("lsq per-channel forward", jy, ty, x)
    assert_same("lsq per-channel dX", jdx, tdx, x)
    assert_same("lsq per-channel dScale (per element)", jds, tds, x, reduction=True)
    assert_same("lsq per-channel dZeroPoint (per element)", jdz, tdz, x, reduction=True)


@pytest.mark.parametrize("axis", [0, 1])
@pytest.mark.parametrize("tdtype", ["quint8", "qint8"])
def test_lsq_per_channel_sums_match_torch(axis, tdtype):
    rng = np.random.default_rng(1031 + axis)
    signed, qmin, qmax = RANGES[tdtype]
    c = 24
    shape = (c, 12000) if axis == 0 else (40, c, 300)
    scales, zps = _channel_params(rng, c, tdtype)
    bshape = [1] * len(shape)
    bshape[axis] = c
    span = qmax - qmin
    x = tie_heavy(rng, scales.reshape(bshape), shape, -span - 8, span + 8)
    g = rng.standard_normal(shape).astype(np.float32)
    spec = QuantSpec(signed=signed, axis=axis)
    for gs, gf in ((None, 1.0), ("auto", 1.0 / (x.size * qmax) ** 0.5)):
        ty, tdx, tds, tdz = _torch_lsq_per_channel(x, scales, zps, g, axis, qmin, qmax, gf)
        jy, jdx, jds, jdz = _lsq(
            jnp.asarray(x), jnp.asarray(scales), jnp.asarray(zps), jnp.asarray(g), spec, gs
        )
        assert_same("lsq per-channel forward", jy, ty, x)
        assert_same("lsq per-channel dX", jdx, tdx, x)
        zr = np.clip(np.round(zps), qmin, qmax)
        bound = np.maximum(np.abs(qmin - zr), np.abs(qmax - zr)).reshape(bshape)
        red = tuple(a for a in range(len(shape)) if a != axis)
        inside = tdx != 0
        ag = np.abs(g.astype(np.float64)) * gf
        ads = np.sum(ag * np.where(inside, 0.5, bound), axis=red)
        adz = np.sum(ag * np.where(inside, 0.0, scales.reshape(bshape)), axis=red)
        assert_close_sum("lsq per-channel dScale (sum)", jds, tds, ads)
        assert_close_sum("lsq per-channel dZeroPoint (sum)", jdz, tdz, adz)


# ---------------------------------------------------------------------------------
# the module


@pytest.mark.parametrize("per_channel", [False, True])
@pytest.mark.parametrize("use_grad_scaling", [False, True])
def test_learnable_fake_quantize_module(per_channel, use_grad_scaling):
    from torch.ao.quantization._learnable_fake_quantize import _LearnableFakeQuantize
    from torch.ao.quantization.observer import (
        MovingAverageMinMaxObserver,
        MovingAveragePerChannelMinMaxObserver,
    )

    rng = np.random.default_rng(1041)
    c = 8
    kwargs = dict(quant_min=0, quant_max=255, use_grad_scaling=use_grad_scaling, dtype=torch.quint8)
    if per_channel:
        mod = _LearnableFakeQuantize(
            observer=MovingAveragePerChannelMinMaxObserver, channel_len=c, ch_axis=0,
            qscheme=torch.per_channel_affine, **kwargs,
        )  # fmt: skip
    else:
        mod = _LearnableFakeQuantize(observer=MovingAverageMinMaxObserver, **kwargs)
    mod.toggle_observer_update(False)  # learned qparams, no observer overwrite
    scales = np.float32([0.0235, 1 / 3, 0.1, 2**-7, 0.05, 0.0235, 0.2, 0.011])[
        : c if per_channel else 1
    ]
    zps = np.float32([2.5, 3.5, 127.5, 1.2, 0.0, 200.4, 3.0, 17.5])[: c if per_channel else 1]
    with torch.no_grad():
        mod.scale.copy_(torch.from_numpy(scales))
        mod.zero_point.copy_(torch.from_numpy(zps))
    x = tie_heavy(rng, scales.reshape(-1, 1), (c, 4000), -20, 280)
    g = rng.standard_normal(x.shape).astype(np.float32)
    xt = torch.from_numpy(x).requires_grad_(True)
    y = mod(xt)
    y.backward(torch.from_numpy(g))
    spec = QuantSpec(signed=False, axis=0 if per_channel else None)
    s_arg = jnp.asarray(scales) if per_channel else scales[0]
    z_arg = jnp.asarray(zps) if per_channel else zps[0]
    gs = "auto" if use_grad_scaling else None
    jy, jdx, jds, jdz = _lsq(jnp.asarray(x), s_arg, z_arg, jnp.asarray(g), spec, gs)
    assert_same("lsq module forward", jy, y.detach().numpy(), x)
    assert_same("lsq module dX", jdx, xt.grad.numpy(), x)
    gf = 1.0 / (x.size * 255) ** 0.5 if use_grad_scaling else 1.0
    ag = np.abs(g.astype(np.float64)) * gf
    red = 1 if per_channel else None
    ads = np.sum(ag * 256, axis=red)
    adz = np.sum(ag * scales.reshape(-1, 1), axis=red)
    assert_close_sum(
        "lsq module dScale (sum)", np.reshape(jds, -1), mod.scale.grad.numpy(), np.reshape(ads, -1)
    )
    assert_close_sum(
        "lsq module dZeroPoint (sum)",
        np.reshape(jdz, -1),
        mod.zero_point.grad.numpy(),
        np.reshape(adz, -1),
    )
