"""QuantAdd / QuantCat, Linen QuantRules, and statistics health."""

import functools
import warnings

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import qjax
from qjax.flax import Mode, qjax_recommended
from qjax.flax import linen as ql
from qjax.flax import nnx as qn
from qjax.flax._health import raise_if_unhealthy, stats_health

CFG = qjax_recommended()


# --------------------------------------------------------------------------------------
# QuantAdd / QuantCat


def test_quant_add_cat_one_range_nnx_equals_linen(rng):
    a = jnp.asarray(rng.standard_normal((4, 3)).astype(np.float32))
    b = jnp.asarray(3 * rng.standard_normal((4, 3)).astype(np.float32))
    for mode in (Mode.CALIBRATE, Mode.QAT):
        add, cat = qn.QuantAdd(CFG, mode=mode), qn.QuantCat(CFG, mode=mode)
        y_add, y_cat = add(a, b), cat([a, b], axis=-1)
        ladd, lcat = ql.QuantAdd(CFG, mode=mode), ql.QuantCat(CFG, mode=mode)
        va = ladd.init(jax.random.key(0), a, b)
        vc = lcat.init(jax.random.key(0), [a, b])
        z_add, ua = ladd.apply(va, a, b, mutable=["quant_stats"])
        z_cat, uc = lcat.apply(vc, [a, b], mutable=["quant_stats"])
        np.testing.assert_array_equal(y_add, z_add)
        np.testing.assert_array_equal(y_cat, z_cat)
        # one observer sees the whole result
        st = add.quant_stats.get_value()
        assert float(st.min_val) == float((a + b).min())
        assert float(st.max_val) == float((a + b).max())
        assert float(uc["quant_stats"]["stats"].max_val) == float(jnp.maximum(a, b).max())
        np.testing.assert_array_equal(ua["quant_stats"]["stats"].min_val, st.min_val)
    # QAT: the result is fake-quantized with the observer's qparams (one range)
    qp = CFG.activation_observer(CFG.activation, CFG.compat).qparams(st)
    np.testing.assert_array_equal(y_add, qjax.fake_quant(a + b, qp))
    assert len(np.unique(np.asarray(y_cat))) <= 256


def test_quant_cat_errors():
    with pytest.raises(ValueError, match="nothing to concatenate"):
        qn.QuantCat(CFG)([])


# --------------------------------------------------------------------------------------
# Linen QuantRules


class Net(nn.Module):
    @nn.compact
    def __call__(self, x):
        h = nn.relu(nn.Conv(4, (3, 3), name="conv")(x))
        h = h.reshape(h.shape[0], -1)
        h = nn.relu(nn.Dense(8, name="fc1")(h))
        return nn.Dense(2, name="fc2")(h)


class HookedNet(nn.Module):
    """The same net built by hand with the hooks the rules install."""

    mode: Mode = Mode.QAT

    @nn.compact
    def __call__(self, x):
        dg = functools.partial(ql.QuantDotGeneral, config=CFG, mode=self.mode)
        cg = functools.partial(ql.QuantConvGeneralDilated, config=CFG, mode=self.mode)
        h = nn.relu(nn.Conv(4, (3, 3), name="conv", conv_general_dilated_cls=cg)(x))
        h = h.reshape(h.shape[0], -1)
        h = nn.relu(nn.Dense(8, name="fc1", dot_general_cls=dg)(h))
        return nn.Dense(2, name="fc2")(h)


def test_quant_rules_equal_hand_built_hooks(rng):
    x = jnp.asarray(rng.standard_normal((2, 5, 5, 1)).astype(np.float32))
    rules = ql.QuantRules([(r"conv", CFG), (r"fc1", CFG)])
    with rules:
        v = Net().init(jax.random.key(0), x)
    assert rules.matched == {"conv": "conv", "fc1": "fc1"}
    vh = HookedNet().init(jax.random.key(0), x)
    assert jax.tree.structure(v) == jax.tree.structure(vh)

    @jax.jit
    def qat(v, x):
        with rules:
            return Net().apply(v, x, mutable=["quant_stats"])

    y, upd = qat(v, x)
    yh, updh = jax.jit(lambda v, x: HookedNet().apply(v, x, mutable=["quant_stats"]))(vh, x)
    np.testing.assert_array_equal(y, yh)
    for u, w in zip(jax.tree.leaves(upd), jax.tree.leaves(updh), strict=True):
        np.testing.assert_array_equal(u, w)
    # FROZEN via with_mode, jitted
    v = {**v, **upd}
    frozen = rules.with_mode(Mode.FROZEN)

    @jax.jit
    def run(v, x):
        with frozen:
            return Net().apply(v, x)

    np.testing.assert_array_equal(run(v, x), HookedNet(Mode.FROZEN).apply({**vh, **updh}, x))
    # outside the context the model is the float one
    assert float(jnp.abs(Net().apply(v, x) - y).max()) > 0


def test_quant_rules_errors(rng):
    x = jnp.ones((1, 5, 5, 1))
    with pytest.raises(ValueError, match=r"rules \['fc9'\] matched no nn.Dense/nn.Conv"):
        with ql.QuantRules([(r"fc.", CFG), (r"fc9", CFG)]):
            Net().init(jax.random.key(0), x)
    with pytest.raises(TypeError, match="'fc1', which already has a dot_general_cls"):
        with ql.QuantRules([(r"fc1", CFG)]):
            HookedNet().init(jax.random.key(0), x)
    with pytest.raises(ValueError, match="cannot quantize the output"):
        ql.QuantRules([(r"fc1", qjax.flax.default_qat_qconfig("x86"))])
    with pytest.raises(TypeError, match="needs a QuantConfig"):
        ql.QuantRules([(r"fc1", "int8")])


# --------------------------------------------------------------------------------------
# statistics health


def _nan_stats(layer):
    st = layer.quant_stats.get_value()
    bad = st.input._replace(max_val=jnp.float32(jnp.nan))
    layer.quant_stats.set_value(st._replace(input=bad))


class Two(nnx.Module):
    def __init__(self):
        self.fc1 = qn.QuantLinear(3, 4, config=CFG, rngs=nnx.Rngs(0))
        self.fc2 = qn.QuantLinear(4, 2, config=CFG, rngs=nnx.Rngs(1))

    def __call__(self, x):
        return self.fc2(self.fc1(x))


def test_health_frozen_names_module_path():
    model = Two()
    qn.calibrate(model, [jnp.ones((2, 3)), -jnp.ones((2, 3))], progress=False)
    _nan_stats(model.fc2)
    with pytest.raises(ValueError, match=r"set_mode\(FROZEN\): non-finite ranges in \['fc2"):
        qn.set_mode(model, Mode.FROZEN)
    with pytest.raises(ValueError, match=r"non-finite ranges in \['fc2.*re-initialise"):
        qn.check_statistics(model)
    # Linen: require_statistics (and so calibrate) reports it with the path
    layer = ql.QuantDense(2, config=CFG)
    v = layer.init(jax.random.key(0), jnp.ones((1, 3)))
    _, upd = layer.apply(v, jnp.ones((1, 3)), mode=Mode.CALIBRATE, mutable=["quant_stats"])
    st = upd["quant_stats"]["stats"]
    broken = {"stats": st._replace(weight=st.weight._replace(min_val=st.weight.min_val * jnp.inf))}
    with pytest.raises(ValueError, match=r"non-finite ranges in \['quant_stats/weight"):
        ql.require_statistics(broken)


def test_health_inside_jit_and_ignored_nan_warning():
    """NaN inputs are ignored by the observers (counted, warned); a per-channel observer
    whose channel only saw NaN has a non-finite range: found inside jit, raised outside."""
    spec = qjax.QuantSpec(axis=-1)
    obs = qjax.observers.minmax(spec)

    @jax.jit
    def step(state, x):
        state = obs.update(state, x)
        return state, stats_health({"enc/fc1": state})

    x = jnp.array([[1.0, jnp.nan], [2.0, jnp.nan]])
    state, health = step(obs.init(x), x)
    assert int(health["enc/fc1"].nonfinite) == 2 and int(health["enc/fc1"].bad_range) == 1
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        with pytest.raises(ValueError, match=r"in \['enc/fc1 \(1 entry\)'\]"):
            raise_if_unhealthy(health, where="calibration")
    assert any("ignored NaN/inf inputs in ['enc/fc1 (2)']" in str(m.message) for m in w)
    # finite data: healthy, no warning
    state, health = step(obs.init(x), jnp.ones((2, 2)))
    raise_if_unhealthy(health)
