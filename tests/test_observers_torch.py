"""Observer parity with PyTorch 2.13 at run time: running state and qparams bit for bit.

Covers NUMERICS.md rules 6 (``calculate_qparams``), 8 (moving-average observers) and 9
(``FusedMovingAvgObsFakeQuantize`` / ``torch.fused_moving_avg_obs_fake_quant``). Every
comparison is exact: float32 bit patterns of min/max/scale, integer zero points.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import qjax
from qjax import QuantSpec
from qjax import observers as obs_lib

torch = pytest.importorskip("torch")
tq = pytest.importorskip("torch.ao.quantization")
from torch.ao.quantization import fake_quantize as tfq  # noqa: E402
from torch.ao.quantization import observer as tobs  # noqa: E402

N_BATCHES = 16
BATCH = 65536  # 16 x 64k = 1M values per configuration

# (id, torch observer kwargs, the equivalent QuantSpec)
PER_TENSOR = [
    ("quint8-affine", dict(dtype=torch.quint8), QuantSpec(signed=False)),
    ("qint8-affine", dict(dtype=torch.qint8), QuantSpec(signed=True)),
    (
        "qint8-symmetric",
        dict(dtype=torch.qint8, qscheme=torch.per_tensor_symmetric),
        QuantSpec(signed=True, symmetric=True),
    ),
    (
        "quint8-symmetric",
        dict(dtype=torch.quint8, qscheme=torch.per_tensor_symmetric),
        QuantSpec(signed=False, symmetric=True),
    ),
    (
        "quint8-affine-reduce",
        dict(dtype=torch.quint8, reduce_range=True),
        QuantSpec(signed=False, reduce_range=True),
    ),
    (
        "qint8-symmetric-reduce",
        dict(dtype=torch.qint8, qscheme=torch.per_tensor_symmetric, reduce_range=True),
        QuantSpec(signed=True, symmetric=True, reduce_range=True),
    ),
    (
        "quint8-custom-0-15",
        dict(dtype=torch.quint8, quant_min=0, quant_max=15),
        QuantSpec(signed=False, quant_min=0, quant_max=15),
    ),
    (
        "qint8-custom-symmetric--8-7",
        dict(dtype=torch.qint8, qscheme=torch.per_tensor_symmetric, quant_min=-8, quant_max=7),
        QuantSpec(signed=True, symmetric=True, quant_min=-8, quant_max=7),
    ),
    (
        "quint8-custom-symmetric-0-15",
        dict(dtype=torch.quint8, qscheme=torch.per_tensor_symmetric, quant_min=0, quant_max=15),
        QuantSpec(signed=False, symmetric=True, quant_min=0, quant_max=15),
    ),
    (
        "quint8-custom-0-31-reduce",
        dict(dtype=torch.quint8, quant_min=0, quant_max=31, reduce_range=True),
        QuantSpec(signed=False, quant_min=0, quant_max=31, reduce_range=True),
    ),
]

_PER_CHANNEL_SCHEMES = {
    torch.per_tensor_affine: torch.per_channel_affine,
    torch.per_tensor_symmetric: torch.per_channel_symmetric,
}


def _per_channel(kwargs):
    kw = dict(kwargs)
    kw["qscheme"] = _PER_CHANNEL_SCHEMES[kw.get("qscheme", torch.per_tensor_affine)]
    return kw


# (id, torch kwargs, spec, batch shape): ch_axis 0 and 1, symmetric and affine.
PER_CHANNEL = [
    (
        "qint8-symmetric-axis0",
        dict(dtype=torch.qint8, qscheme=torch.per_channel_symmetric, ch_axis=0),
        QuantSpec(signed=True, symmetric=True, axis=0),
        (512, 128),
    ),
    (
        "qint8-affine-axis0",
        dict(dtype=torch.qint8, qscheme=torch.per_channel_affine, ch_axis=0),
        QuantSpec(signed=True, axis=0),
        (512, 128),
    ),
    (
        "qint8-symmetric-axis1",
        dict(dtype=torch.qint8, qscheme=torch.per_channel_symmetric, ch_axis=1),
        QuantSpec(signed=True, symmetric=True, axis=1),
        (8, 512, 4, 4),
    ),
    (
        "quint8-affine-axis1",
        dict(dtype=torch.quint8, qscheme=torch.per_channel_affine, ch_axis=1),
        QuantSpec(signed=False, axis=1),
        (128, 512),
    ),
]


def _bits(a) -> np.ndarray:
    return np.ascontiguousarray(np.asarray(a, np.float32)).reshape(-1).view(np.uint32)


def _t(a) -> np.ndarray:
    return a.detach().cpu().numpy()


def _assert_bits(got, want, what: str) -> int:
    g, w = _bits(got), _bits(want)
    assert g.shape == w.shape, f"{what}: shape {g.shape} != torch {w.shape}"
    bad = np.flatnonzero(g != w)
    assert bad.size == 0, (
        f"{what}: {bad.size}/{g.size} differ from torch, first at {bad[0]}: "
        f"{g.view(np.float32)[bad[0]]!r} vs {w.view(np.float32)[bad[0]]!r}"
    )
    return g.size


def _assert_qparams(qp, scale_t, zp_t, what: str) -> int:
    n = _assert_bits(qp.scale, _t(scale_t), f"{what} scale")
    z, zt = np.asarray(qp.zero_point).reshape(-1), _t(zp_t).reshape(-1).astype(np.int64)
    bad = np.flatnonzero(z != zt)
    assert bad.size == 0, f"{what} zero_point: {bad.size} differ, first {z[bad[0]]} vs {zt[bad[0]]}"
    return n


def _batches(seed: int, shape, ch_axis=None):
    """Batches of varied location/scale, some all-positive or all-negative, some on grids.

    Per-channel batches also vary location and scale per channel, so individual channels
    are one-signed or ride small binary grids (ties in ``min/scale``).
    """
    rng = np.random.default_rng(seed)
    for i in range(N_BATCHES):
        x = rng.standard_normal(shape)
        if ch_axis is not None:
            cshape = [1] * len(shape)
            cshape[ch_axis] = shape[ch_axis]
            x = x * np.exp(rng.uniform(-6, 3, cshape)) + rng.uniform(-4, 4, cshape)
        else:
            x = x * np.exp(rng.uniform(-6, 3)) + rng.uniform(-2, 2)
        if i % 4 == 1:
            x = np.abs(x)
        elif i % 4 == 2:
            x = np.round(x * 8) / 8  # values on a grid: exact, tie-prone ranges
        elif i == 3:
            x = -np.abs(x)
        yield np.asarray(x, np.float32)


def _run_pair(tmod, obs, shape, ch_axis=None, seed=0, state_of=None, qparams_of=None):
    """Feed the same batches to a torch observer and a qjax observer; compare each step."""
    update, qparams = jax.jit(obs.update), jax.jit(obs.qparams)
    state = obs.init(jnp.zeros(shape, jnp.float32))
    compared = 0
    for i, x in enumerate(_batches(seed, shape, ch_axis)):
        tmod(torch.from_numpy(x))
        state = update(state, x)
        tmin, tmax = state_of(tmod)
        compared += _assert_bits(state.min_val, _t(tmin), f"batch {i} min_val")
        compared += _assert_bits(state.max_val, _t(tmax), f"batch {i} max_val")
        scale_t, zp_t = qparams_of(tmod)
        compared += _assert_qparams(qparams(state), scale_t, zp_t, f"batch {i}")
    return compared


def _observer_state(m):
    return m.min_val, m.max_val


def _observer_qparams(m):
    return m.calculate_qparams()


# ---------------------------------------------------------------------------------------
# Rule 6: MinMaxObserver / PerChannelMinMaxObserver


@pytest.mark.parametrize("name,kwargs,spec", PER_TENSOR, ids=[c[0] for c in PER_TENSOR])
def test_minmax_per_tensor_matches_torch(name, kwargs, spec):
    t = tobs.MinMaxObserver(**kwargs)
    obs = obs_lib.minmax(spec, compat="torch")
    _run_pair(t, obs, (BATCH,), None, 1, _observer_state, _observer_qparams)


@pytest.mark.parametrize("name,kwargs,spec", PER_TENSOR, ids=[c[0] for c in PER_TENSOR])
def test_calculate_qparams_many_ranges_matches_torch(name, kwargs, spec):
    """Rule 6 over 64k unrelated ranges at once: one channel per (min, max) pair."""
    rng = np.random.default_rng(2)
    n = BATCH
    lo = -np.exp(rng.uniform(-25, 8, n)) * (rng.random(n) < 0.9)
    hi = np.exp(rng.uniform(-25, 8, n)) * (rng.random(n) < 0.9)
    grid = rng.random(n) < 0.3  # small dyadic ranges: exact quotients and .5 ties
    lo = np.where(grid, -rng.integers(0, 64, n) / 16, lo)
    hi = np.where(grid, rng.integers(0, 64, n) / 16, hi)
    x = np.stack([lo, hi], axis=1).astype(np.float32)
    t = tobs.PerChannelMinMaxObserver(ch_axis=0, **_per_channel(kwargs))
    t(torch.from_numpy(x))
    scale_t, zp_t = t.calculate_qparams()
    qp = jax.jit(qjax.qparams_from_minmax, static_argnames=("spec", "compat"))(
        jnp.asarray(x[:, 0]), jnp.asarray(x[:, 1]), spec=spec.replace(axis=0), compat="torch"
    )
    assert _assert_qparams(qp, scale_t, zp_t, name) == n


@pytest.mark.parametrize("name,kwargs,spec,shape", PER_CHANNEL, ids=[c[0] for c in PER_CHANNEL])
def test_minmax_per_channel_matches_torch(name, kwargs, spec, shape):
    t = tobs.PerChannelMinMaxObserver(**kwargs)
    obs = obs_lib.per_channel_minmax(spec, compat="torch")
    _run_pair(t, obs, shape, kwargs["ch_axis"], 3, _observer_state, _observer_qparams)


# ---------------------------------------------------------------------------------------
# Rule 8: MovingAverageMinMaxObserver / MovingAveragePerChannelMinMaxObserver

# (config, averaging constant)
EMA_PER_TENSOR = [
    (*PER_TENSOR[0], 0.01),
    (*PER_TENSOR[2], 0.3),
    (*PER_TENSOR[4], 0.01),
    (*PER_TENSOR[6], 0.3),
]


@pytest.mark.parametrize(
    "name,kwargs,spec,c", EMA_PER_TENSOR, ids=[f"{e[0]}-c{e[3]}" for e in EMA_PER_TENSOR]
)
def test_ema_per_tensor_matches_torch(name, kwargs, spec, c):
    t = tobs.MovingAverageMinMaxObserver(averaging_constant=c, **kwargs)
    obs = obs_lib.ema_minmax(spec, averaging_constant=c, compat="torch")
    _run_pair(t, obs, (BATCH,), None, 4, _observer_state, _observer_qparams)


@pytest.mark.parametrize("name,kwargs,spec,shape", PER_CHANNEL, ids=[c[0] for c in PER_CHANNEL])
def test_ema_per_channel_matches_torch(name, kwargs, spec, shape):
    t = tobs.MovingAveragePerChannelMinMaxObserver(averaging_constant=0.05, **kwargs)
    obs = obs_lib.per_channel_ema_minmax(spec, averaging_constant=0.05, compat="torch")
    _run_pair(t, obs, shape, kwargs["ch_axis"], 5, _observer_state, _observer_qparams)


# ---------------------------------------------------------------------------------------
# Rule 9: FusedMovingAvgObsFakeQuantize (the default QAT fake-quant)

FUSED = [
    (
        "default_fused_act",
        tfq.default_fused_act_fake_quant,
        QuantSpec(signed=False, quant_min=0, quant_max=255),
        (BATCH,),
        None,
    ),
    (
        "default_fused_wt",
        tfq.default_fused_wt_fake_quant,
        QuantSpec(signed=True, symmetric=True, quant_min=-128, quant_max=127),
        (256, 256),
        None,
    ),
    (
        "default_fused_per_channel_wt-2d",
        tfq.default_fused_per_channel_wt_fake_quant,
        QuantSpec(signed=True, symmetric=True, quant_min=-128, quant_max=127, axis=0),
        (512, 128),
        0,
    ),
    (
        "default_fused_per_channel_wt-4d",
        tfq.default_fused_per_channel_wt_fake_quant,
        QuantSpec(signed=True, symmetric=True, quant_min=-128, quant_max=127, axis=0),
        (256, 16, 4, 4),
        0,
    ),
]


def _fused_state(m):
    return m.activation_post_process.min_val, m.activation_post_process.max_val


def _fused_qparams(m):  # recomputed by every forward (rule 9)
    return m.scale, m.zero_point


@pytest.mark.parametrize("name,make,spec,shape,ch_axis", FUSED, ids=[c[0] for c in FUSED])
def test_fused_moving_avg_obs_fake_quant_matches_torch(name, make, spec, shape, ch_axis):
    t = make()
    obs = obs_lib.ema_minmax(spec, compat="torch_fused")
    _run_pair(t, obs, shape, ch_axis, 6, _fused_state, _fused_qparams)


def test_fused_symmetric_nonnegative_falls_back_to_affine():
    """All-nonnegative weights under the fused symmetric qint8 config: zp -128 (rule 9)."""
    t = tfq.default_fused_wt_fake_quant()
    obs = obs_lib.ema_minmax(
        QuantSpec(signed=True, symmetric=True, quant_min=-128, quant_max=127),
        compat="torch_fused",
    )
    x = np.abs(np.random.default_rng(7).standard_normal(4096)).astype(np.float32)
    t(torch.from_numpy(x))
    qp = obs.qparams(obs.update(obs.init(x), x))
    _assert_qparams(qp, t.scale, t.zero_point, "nonnegative")
    assert int(qp.zero_point) == -128
    np.testing.assert_equal(np.float32(qp.scale), np.float32(x.max() / np.float64(255)))


@pytest.mark.parametrize(
    "per_channel,symmetric,qmin,qmax",
    [
        (False, False, 0, 127),
        (False, True, -127, 127),
        (True, True, -127, 127),
        (True, False, 0, 255),
    ],
)
def test_fused_functional_matches_torch(per_channel, symmetric, qmin, qmax):
    """``torch.fused_moving_avg_obs_fake_quant`` called directly: state, qparams and output."""
    shape = (512, 128)
    c = 0.01
    spec = QuantSpec(
        signed=qmin < 0,
        symmetric=symmetric,
        quant_min=qmin,
        quant_max=qmax,
        axis=0 if per_channel else None,
    )
    n = shape[0] if per_channel else 1
    rmin = torch.full((n,) if per_channel else (), float("inf"))
    rmax = torch.full((n,) if per_channel else (), float("-inf"))
    scale = torch.ones(n)
    zp = torch.zeros(n, dtype=torch.int32)
    on = torch.tensor([1], dtype=torch.long)
    obs = obs_lib.ema_minmax(spec, averaging_constant=c, compat="torch_fused")
    update, qparams = jax.jit(obs.update), jax.jit(obs.qparams)
    state = obs.init(jnp.zeros(shape, jnp.float32))
    for i, x in enumerate(_batches(8, shape, 0 if per_channel else None)):
        y = torch.fused_moving_avg_obs_fake_quant(
            torch.from_numpy(x), on, on, rmin, rmax, scale, zp, c, qmin, qmax, 0,
            per_channel, symmetric,
        )  # fmt: skip
        state = update(state, x)
        _assert_bits(state.min_val, _t(rmin), f"batch {i} running_min")
        _assert_bits(state.max_val, _t(rmax), f"batch {i} running_max")
        qp = qparams(state)
        _assert_qparams(qp, scale, zp, f"batch {i}")
        y_q = qjax.fake_quant(jnp.asarray(x), qp, compat="torch")
        _assert_bits(y_q, _t(y), f"batch {i} fake-quant output")
