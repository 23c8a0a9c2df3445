"""``qjax.observers.histogram``: parity with torch's ``HistogramObserver`` and behaviour.

Parity runs torch 2.13 at test time on the same float32 batches: the running histogram,
``min_val``/``max_val`` and the searched range are compared with torch's buffers, and
the final qparams with ``calculate_qparams``.
"""

import textwrap
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _helpers import run_script

import qjax
from qjax import QuantSpec
from qjax import observers as obs_lib
from qjax.observers import _histogram as hist_impl

torch = pytest.importorskip("torch")
from torch.ao.quantization import HistogramObserver  # noqa: E402

U8 = QuantSpec(bits=8, signed=False)
S8_SYM = QuantSpec(bits=8, signed=True, symmetric=True)
SPECS = {
    "quint8-affine": (U8, dict(dtype=torch.quint8, qscheme=torch.per_tensor_affine)),
    "qint8-symmetric": (S8_SYM, dict(dtype=torch.qint8, qscheme=torch.per_tensor_symmetric)),
}
SHAPE = (64, 512)


def _bimodal(rng, s):
    return np.where(rng.random(s) < 0.3, rng.normal(-3.0, 0.5, s), rng.normal(2.0, 1.0, s))


DISTS = {
    "normal": lambda rng, s: rng.standard_normal(s),
    "lognormal": lambda rng, s: rng.lognormal(0.0, 1.0, s),
    "student_t3": lambda rng, s: rng.standard_t(3, s),
    "bimodal": _bimodal,
}
# Per batch (scale, shift): the range grows on both sides, stays put, then grows again.
SCHEDULE = [(1.0, 0.0), (1.5, 0.3), (0.7, 0.0), (2.5, -1.0)]


class _Obs:
    """An observer's functions. Called eagerly they run module-level jitted cores that
    are shared by every observer with the same static configuration (one compile per
    input shape for the whole file); the outer ``jax.jit`` is tested on its own below.
    """

    def __init__(self, spec, **kw):
        self.obs = obs_lib.histogram(spec, compat="torch", **kw)
        self.update = self.obs.update
        self.qparams = self.obs.qparams


_OBS = {name: _Obs(spec) for name, (spec, _) in SPECS.items()}
_PARITY: dict[str, bool] = {}  # case -> qparams exactly equal to torch's


def _batches(dist, seed):
    rng = np.random.default_rng(seed)
    return [(DISTS[dist](rng, SHAPE) * a + b).astype(np.float32) for a, b in SCHEDULE]


def _run_both(batches, spec_name, jitted=None, **torch_kw):
    spec, tkw = SPECS[spec_name]
    t = HistogramObserver(**tkw, **torch_kw)
    j = jitted or _OBS[spec_name]
    state = j.obs.init(batches[0])
    for x in batches:
        t(torch.from_numpy(x))
        state = j.update(state, jnp.asarray(x))
    return t, j, state


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("dist", list(DISTS))
@pytest.mark.parametrize("spec_name", list(SPECS))
def test_parity_with_torch(spec_name, dist, seed):
    batches = _batches(dist, seed)
    t, j, state = _run_both(batches, spec_name)
    # Running range: torch's min_val/max_val buffers, bit for bit.
    assert np.float32(t.min_val.item()) == np.asarray(state.min_val)
    assert np.float32(t.max_val.item()) == np.asarray(state.max_val)
    # Counts: every finite value is in the histogram (re-binning conserves mass).
    th, jh = t.histogram.numpy(), np.asarray(state.histogram)
    assert jh.sum() == pytest.approx(th.sum(), rel=1e-6)
    assert jh.sum() == pytest.approx(sum(x.size for x in batches), rel=1e-6)
    np.testing.assert_allclose(jh, th, rtol=1e-5, atol=1e-3)
    # Searched range within one histogram bin of torch's.
    t_min, t_max = (v.item() for v in t._non_linear_param_search())
    j_min, j_max = hist_impl._search_range(
        state.histogram, state.min_val, state.max_val, dst_nbins=256
    )
    width = (t.max_val.item() - t.min_val.item()) / t.bins
    assert abs(float(j_min) - t_min) <= width * (1 + 1e-6)
    assert abs(float(j_max) - t_max) <= width * (1 + 1e-6)
    # Qparams: recorded, and asserted for the bulk of cases in the summary test below.
    t_scale, t_zp = t.calculate_qparams()
    qp = j.qparams(state)
    assert qp.scale.dtype == jnp.float32 and qp.zero_point.dtype == jnp.int32
    exact = np.float32(t_scale.item()) == np.asarray(qp.scale) and int(t_zp.item()) == int(
        qp.zero_point
    )
    _PARITY[f"{spec_name}-{dist}-{seed}"] = bool(exact)
    if not exact:  # then the range must still agree within one bin (asserted above)
        warnings.warn(f"{spec_name}-{dist}-{seed}: qparams differ from torch's", stacklevel=1)


def test_parity_summary():
    """Qparams equal torch's exactly in the bulk of the cases above (all, on x86-64)."""
    if not _PARITY:
        pytest.skip("parity cases did not run in this process")
    n_exact = sum(_PARITY.values())
    print(f"histogram qparams exactly equal to torch: {n_exact}/{len(_PARITY)}")
    assert n_exact >= 0.9 * len(_PARITY), _PARITY


_LIN = np.linspace(-2.0, 3.0, 256)


@pytest.mark.parametrize(
    "name,batches",
    [
        ("constant-then-normal", [np.full(256, 1.5), _LIN]),
        ("constant-only", [np.full(256, -0.7)] * 3),
        ("zeros", [np.zeros(256)]),
        ("two-constants", [np.full(256, 2.0), np.full(256, 3.0), _LIN * 0.3]),
        ("tiny-batches", [np.arange(7.0) * k - 3 for k in (1, 2, 0.5, 3)]),
        ("one-sided-growth", [_LIN * 0.1 + k for k in (0, 0.5, 2)]),
    ],
)
def test_parity_degenerate_and_point_mass(name, batches):
    """Point-mass histograms (``min == max``) and tiny batches go through torch's branches."""
    batches = [np.asarray(b, np.float32) for b in batches]
    for spec_name in SPECS:
        t, j, state = _run_both(batches, spec_name)
        np.testing.assert_array_equal(np.asarray(state.histogram), t.histogram.numpy())
        t_scale, t_zp = t.calculate_qparams()
        qp = j.qparams(state)
        assert np.float32(t_scale.item()) == np.asarray(qp.scale), name
        assert int(t_zp.item()) == int(qp.zero_point), name


def test_parity_other_bins_and_upsample_rate():
    """``bins`` not a power of two and another ``upsample_rate`` (torch: an attribute)."""
    rng = np.random.default_rng(5)
    batches = [(rng.standard_normal(4000) * k).astype(np.float32) for k in (1, 3, 5)]
    j = _Obs(U8, bins=1000, upsample_rate=7)
    t = HistogramObserver(bins=1000, dtype=torch.quint8)
    t.upsample_rate = 7
    state = j.obs.init(batches[0])
    for x in batches:
        t(torch.from_numpy(x))
        state = j.update(state, jnp.asarray(x))
    np.testing.assert_array_equal(np.asarray(state.histogram), t.histogram.numpy())
    t_scale, t_zp = t.calculate_qparams()
    qp = j.qparams(state)
    assert (np.float32(t_scale.item()), int(t_zp.item())) == (float(qp.scale), int(qp.zero_point))


# ---------------------------------------------------------------------------------------
# Building blocks, exact against the torch kernels they reproduce


def test_histc_and_linspace_match_torch_exactly():
    rng = np.random.default_rng(1)
    for k in range(6):
        x = (rng.standard_normal(20000) * 10.0**k + k).astype(np.float32)
        lo, hi = np.float32(x.min() - k), np.float32(x.max())
        want = torch.histc(torch.from_numpy(x), 2048, min=float(lo), max=float(hi)).numpy()
        got = jax.jit(hist_impl._histc, static_argnums=3)(x, lo, hi, 2048)
        np.testing.assert_array_equal(np.asarray(got), want)
        for steps in (2049, 32769):
            want = torch.linspace(torch.tensor(lo), torch.tensor(hi), steps).numpy()
            got = jax.jit(hist_impl._torch_linspace, static_argnums=2)(lo, hi, steps)
            np.testing.assert_array_equal(np.asarray(got), want)


def test_floor_div_matches_torch():
    rng = np.random.default_rng(2)
    a = (rng.standard_normal(50000) * 100).astype(np.float32)
    a[:1000] = np.arange(1000, dtype=np.float32) * np.float32(0.1)  # near-integer quotients
    for b in (np.float32(0.1), np.float32(3.3e-3), np.float32(7.0)):
        want = torch.div(torch.from_numpy(a), float(b), rounding_mode="floor").numpy()

        def f(a, b):
            with jax.enable_x64(True):
                return hist_impl._floor_div(a, b)

        np.testing.assert_array_equal(np.asarray(jax.jit(f)(a, b)), want)


# ---------------------------------------------------------------------------------------
# Behaviour


def test_nonfinite_values_are_ignored_and_counted():
    rng = np.random.default_rng(3)
    x = rng.standard_normal(1000).astype(np.float32)
    dirty = x.copy()
    dirty[[3, 50, 999]] = [np.nan, np.inf, -np.inf]
    j = _OBS["quint8-affine"]
    clean_state = j.update(j.obs.init(x), np.delete(x, [3, 50, 999]))
    state = j.update(j.obs.init(x), dirty)
    assert int(state.nonfinite) == 3
    for a, b in zip(state[:3], clean_state[:3], strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # torch drops the infinities (not NaN); with them only, the states agree.
    t = HistogramObserver(dtype=torch.quint8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        t(torch.from_numpy(np.where(np.isnan(dirty), 0.5, dirty)))
    st2 = j.update(j.obs.init(x), np.where(np.isnan(dirty), 0.5, dirty).astype(np.float32))
    np.testing.assert_array_equal(np.asarray(st2.histogram), t.histogram.numpy())
    h = obs_lib.health(state)
    assert int(h.nonfinite) == 3 and bool(h.observed)


def test_all_nan_input_gives_finite_default_qparams():
    j = _OBS["quint8-affine"]
    x = jnp.full((8, 8), jnp.nan, jnp.float32)
    state = j.update(j.obs.init(x), x)
    assert int(state.nonfinite) == 64 and int(state.count) == 1
    assert float(state.min_val) == np.inf and float(state.max_val) == -np.inf
    assert not bool(obs_lib.health(state).observed)
    qp = j.qparams(state)
    assert np.isfinite(float(qp.scale)) and float(qp.scale) == 1.0 and int(qp.zero_point) == 0
    # A later finite batch starts the histogram as a first batch would.
    y = jnp.linspace(-1.0, 1.0, 64).reshape(8, 8)
    state = j.update(state, y)
    ref = j.update(j.obs.init(y), y)
    np.testing.assert_array_equal(np.asarray(state.histogram), np.asarray(ref.histogram))
    # qjax compat also gives finite qparams for the never-observed state.
    qp = obs_lib.histogram(S8_SYM).qparams(j.obs.init(x))
    assert float(qp.scale) == 1.0


def _structure(state):
    return jax.tree.structure(state), [(v.shape, v.dtype) for v in jax.tree.leaves(state)]


def test_jit_compiles_once_and_state_structure_is_stable():
    obs = obs_lib.histogram(U8, compat="torch")
    traces = []

    def update(state, x):
        traces.append(1)
        return obs.update(state, x)

    jupdate = jax.jit(update)
    x = np.linspace(-1, 1, 512, dtype=np.float32).reshape(16, 32)
    state = obs.init(x)
    want = _structure(state)
    eager = state
    # first batch, same range, growth, all-NaN, point mass -> growth
    for b in (x, x * 0.5, x * 3.0, x * np.nan, x * 3.0 + 1.0):
        state = jupdate(state, b)
        eager = obs.update(eager, b)
        assert _structure(state) == want
        for a, c in zip(jax.tree.leaves(state), jax.tree.leaves(eager), strict=True):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(c))
    assert len(traces) == 1
    assert int(state.count) == 5 and int(state.nonfinite) == x.size
    jq = jax.jit(obs.qparams)(state)
    eq = obs.qparams(state)
    assert float(jq.scale) == float(eq.scale) and int(jq.zero_point) == int(eq.zero_point)


def test_eval_shape_and_scan():
    obs = obs_lib.histogram(S8_SYM, bins=256)
    example = jax.ShapeDtypeStruct((4, 128), jnp.bfloat16)
    shapes = jax.eval_shape(obs.init, example)
    assert shapes.histogram.shape == (256,) and shapes.histogram.dtype == jnp.float32
    assert shapes.min_val.shape == () and shapes.count.dtype == jnp.int32
    after = jax.eval_shape(obs.update, shapes, example)
    assert _structure(after) == _structure(shapes)
    qp = jax.eval_shape(obs.qparams, after)
    assert qp.scale.shape == () and qp.zero_point.dtype == jnp.int32
    # Fixed shapes: a scan over batches equals the Python loop.
    xs = jnp.asarray(np.random.default_rng(4).standard_normal((5, 4, 128)), jnp.bfloat16)
    scanned, _ = jax.lax.scan(lambda s, x: (obs.update(s, x), None), obs.init(xs[0]), xs)
    looped = obs.init(xs[0])
    for x in xs:
        looped = obs.update(looped, x)
    np.testing.assert_array_equal(np.asarray(scanned.histogram), np.asarray(looped.histogram))


def test_rejects_per_axis_specs_and_bad_arguments():
    spec = QuantSpec(symmetric=True, axis=0)
    with pytest.raises(ValueError, match="per-tensor only.*axis=0"):
        obs_lib.histogram(spec)
    with pytest.raises(ValueError, match="per-group"):
        obs_lib.histogram(QuantSpec(group_size=4, group_axis=1))
    with pytest.raises(ValueError, match="bins"):
        obs_lib.histogram(U8, bins=0)
    with pytest.raises(ValueError, match="compat"):
        obs_lib.histogram(U8, compat="onnx")
    obs = obs_lib.histogram(U8)
    with pytest.raises(TypeError, match="floating"):
        obs.update(obs.init(jnp.zeros(3)), jnp.arange(3))
    with pytest.raises(ValueError, match=r"float32\[2048\]"):
        obs.update(obs_lib.histogram(U8, bins=16).init(jnp.zeros(3)), jnp.zeros(3))


def test_qjax_compat_uses_the_searched_range():
    x = np.random.default_rng(6).standard_normal(100_000).astype(np.float32)
    obs = obs_lib.histogram(U8)  # compat="qjax"
    state = obs.update(obs.init(x), x)
    lo, hi = hist_impl._search_range(state.histogram, state.min_val, state.max_val, dst_nbins=256)
    assert float(state.min_val) <= float(lo) < float(hi) <= float(state.max_val)
    assert float(hi) - float(lo) < float(state.max_val - state.min_val)  # a tail is clipped
    want = qjax.qparams_from_minmax(lo, hi, U8)
    qp = obs.qparams(state)
    assert float(qp.scale) == float(want.scale) and int(qp.zero_point) == int(want.zero_point)


_SHARD_SCRIPT = textwrap.dedent(
    """
    import jax, numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    import qjax
    spec = qjax.QuantSpec(bits=8, signed=False)
    mesh = Mesh(np.array(jax.devices()[:4]), ("b",))
    sharded = qjax.observers.histogram(spec, compat="torch", axis_name="b")
    single = qjax.observers.histogram(spec, compat="torch")
    step = jax.jit(jax.shard_map(sharded.update, mesh=mesh, in_specs=(P(), P("b")),
                                 out_specs=P()))
    rng = np.random.default_rng(0)
    xs = [(rng.standard_normal((64, 32)) * k).astype(np.float32) for k in (1, 2, 0.5, 4)]
    xs[2][3, 4] = np.nan
    a = b = single.init(xs[0])
    for x in xs:
        a = single.update(a, x)
        b = step(b, jax.device_put(x, NamedSharding(mesh, P("b"))))
    for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(np.asarray(u), np.asarray(v))
    print("SHARDED-OK")
    """
)


def test_shard_map_with_axis_name_equals_single_device():
    run_script(_SHARD_SCRIPT, marker="SHARDED-OK", host_devices=4)
