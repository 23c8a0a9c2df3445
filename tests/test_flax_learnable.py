"""Learnable qparams (LSQ, PACT) as parameters: init from statistics, gradients, training,
NNX == Linen."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import qjax
from qjax import QuantSpec
from qjax.flax import Mode, QuantConfig, default_qat_qconfig, qjax_recommended
from qjax.flax import linen as ql
from qjax.flax import nnx as qn

LSQ = qjax_recommended().replace(grad="lsq")
PACT = QuantConfig(
    weight=QuantSpec(bits=8, signed=True, symmetric=True, narrow_range=True, axis=-1),
    activation=QuantSpec(bits=8, signed=True, symmetric=True),  # inputs are signed: [-a, a]
    grad="pact",
)
TORCH_LSQ = default_qat_qconfig("x86").replace(grad="lsq")
CONFIGS = {"lsq": LSQ, "pact": PACT, "torch_x86_lsq": TORCH_LSQ}


class NnxNet(nnx.Module):
    def __init__(self, cfg, rngs, mode=Mode.CALIBRATE):
        self.fc1 = qn.LearnableQuantLinear(6, 8, config=cfg, mode=mode, rngs=rngs)
        self.fc2 = qn.LearnableQuantLinear(8, 3, config=cfg, mode=mode, rngs=rngs)

    def __call__(self, x):
        return self.fc2(jax.nn.relu(self.fc1(x)))


class LinenNet(nn.Module):
    cfg: QuantConfig

    @nn.compact
    def __call__(self, x, mode=Mode.CALIBRATE):
        h = ql.LearnableQuantDense(8, config=self.cfg, name="fc1")(x, mode)
        return ql.LearnableQuantDense(3, config=self.cfg, name="fc2")(jax.nn.relu(h), mode)


def _data(rng, n=32):
    x = rng.standard_normal((n, 6)).astype(np.float32)
    w = rng.standard_normal((6, 3)).astype(np.float32)
    return jnp.asarray(x), jnp.asarray(np.tanh(x @ w))


def _build(cfg, rng):
    """NNX and Linen nets with the same float weights, calibrated on the same batches,
    learnable qparams initialised from the statistics."""
    x, _ = _data(rng)
    model = NnxNet(cfg, nnx.Rngs(0))
    lin = LinenNet(cfg)
    v = lin.init(jax.random.key(1), x)
    params = dict(v["params"])
    for name in ("fc1", "fc2"):
        m = getattr(model, name)
        params[name] = {**params[name], "kernel": m.kernel[...], "bias": m.bias[...] + 0.1}
        m.bias[...] = m.bias[...] + 0.1
    v = {"params": params, "quant_stats": v["quant_stats"]}
    nnx_step = nnx.jit(lambda m, x: m(x))
    linen_step = jax.jit(lambda v, x: lin.apply(v, x, Mode.CALIBRATE, mutable=["quant_stats"]))
    for i in range(3):
        xb = x * (1.0 + 0.5 * i)
        nnx_step(model, xb)
        v = {**v, **linen_step(v, xb)[1]}
    assert qn.init_qparams_from_stats(model) == ["fc1", "fc2"]
    v = ql.init_qparams_from_stats(v)
    qn.set_mode(model, Mode.QAT)
    return model, lin, v


def _leaves_equal(a, b):
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    assert len(la) == len(lb)
    for u, w in zip(la, lb, strict=True):
        np.testing.assert_array_equal(np.asarray(u), np.asarray(w))


@pytest.mark.parametrize("name", list(CONFIGS))
def test_learnable_init_from_stats(name, rng):
    """After calibration the parameters are the observers' qparams; NNX == Linen."""
    cfg = CONFIGS[name]
    model, lin, v = _build(cfg, rng)
    st = model.fc1.quant_stats.get_value()
    obs = cfg.weight_observer(cfg.weight, cfg.compat)
    qp = obs.qparams(st.layer.weight)
    got = qn.LearnableQuantLinear  # noqa: F841 - for the error message below
    p = model.fc1.qparams.get_value()["weight"]
    if cfg.grad == "lsq":
        np.testing.assert_array_equal(p["scale"], qp.scale)
    else:
        np.testing.assert_array_equal(p["alpha"], qp.scale * (cfg.weight.qmax - 0))
    # the qparams the fake-quant uses are the observer's (PACT: symmetric weights)
    from qjax.flax._learnable import tensor_qparams

    used = tensor_qparams(p, cfg.weight, cfg.grad)
    np.testing.assert_allclose(used.scale, qp.scale, rtol=1e-6)
    _leaves_equal(
        jax.tree.map(lambda a: a, nnx.state(model, nnx.Param)["fc1"]["qparams"]),
        v["params"]["fc1"]["qparams"],
    )


@pytest.mark.parametrize(
    "name", ["lsq", "pact", pytest.param("torch_x86_lsq", marks=pytest.mark.slow)]
)
def test_learnable_grads_and_training(name, rng):
    """Gradients reach every learnable qparam (nonzero), are equal in NNX and Linen, and
    optax training changes them and lowers the loss; statistics never become params."""
    cfg = CONFIGS[name]
    model, lin, v = _build(cfg, rng)
    x, y = _data(rng)

    def nnx_loss(m):
        return jnp.mean((m(x) - y) ** 2)

    def linen_loss(params, qs):
        out, upd = lin.apply({"params": params, "quant_stats": qs}, x, Mode.QAT,
                             mutable=["quant_stats"])  # fmt: skip
        return jnp.mean((out - y) ** 2), upd

    g_nnx = nnx.jit(nnx.grad(nnx_loss))(model)
    linen_grad = jax.jit(jax.value_and_grad(linen_loss, has_aux=True))
    (l_lin, _), g_lin = linen_grad(v["params"], v["quant_stats"])
    for layer in ("fc1", "fc2"):
        q_nnx = jax.tree.map(lambda a: a, g_nnx[layer]["qparams"])
        _leaves_equal(q_nnx, g_lin[layer]["qparams"])
        _leaves_equal(jax.tree.map(lambda a: a, g_nnx[layer]["kernel"]), g_lin[layer]["kernel"])
        for path, leaf in jax.tree_util.tree_leaves_with_path(g_lin[layer]["qparams"]):
            where = jax.tree_util.keystr(path)
            assert bool(jnp.isfinite(leaf).all()), (name, layer, where)
            if cfg.grad == "lsq":
                assert float(jnp.abs(leaf).sum()) > 0, (name, layer, where)
    if cfg.grad == "pact":
        # PACT's alpha gets gradient only from clipped values; alpha from the observers
        # (the calibrated range) clips little or nothing, so halve it: every alpha learns
        half = jax.tree_util.tree_map_with_path(
            lambda p, a: a * 0.5 if "alpha" in jax.tree_util.keystr(p) else a, v["params"]
        )
        g_half = linen_grad(half, v["quant_stats"])[1]
        for layer in ("fc1", "fc2"):
            for where, leaf in jax.tree_util.tree_leaves_with_path(g_half[layer]["qparams"]):
                assert float(jnp.abs(leaf).sum()) > 0, (layer, jax.tree_util.keystr(where))
    # statistics are not parameters, in either shell
    assert "quant_stats" not in str(jax.tree_util.tree_structure(nnx.state(model, nnx.Param)))
    assert not any(
        hasattr(leaf, "min_val") for leaf in jax.tree.leaves(v["params"], is_leaf=lambda a: True)
    )

    # train with optax (NNX): the loss falls and the qparams move
    def scales(m):  # the scales / clipping levels of fc1 (float zero points move slowly)
        flat = jax.tree_util.tree_leaves_with_path(nnx.state(m, nnx.Param)["fc1"]["qparams"])
        keep = [a for p, a in flat if "zero_point" not in jax.tree_util.keystr(p)]
        return [jnp.copy(a) for a in keep]

    before = scales(model)
    # optax.adam's bias correction (float ** int32) fails under strict dtype promotion
    opt = nnx.Optimizer(model, optax.sgd(0.01, momentum=0.9), wrt=nnx.Param)

    @nnx.jit
    def step(model, opt):
        loss, g = nnx.value_and_grad(nnx_loss)(model)
        opt.update(model, g)
        return loss

    losses = [float(step(model, opt)) for _ in range(30)]
    assert losses[-1] < 0.7 * losses[0], losses
    after = scales(model)
    moved = [bool(jnp.any(u != w)) for u, w in zip(before, after, strict=True)]
    assert len(moved) >= 2 and all(moved), moved
    print(f"{name}: loss {losses[0]:.4f} -> {losses[-1]:.4f} in 30 SGD steps; "
          f"initial linen loss {float(l_lin):.4f}")  # fmt: skip


@pytest.mark.parametrize("name", ["lsq", "pact"])
def test_learnable_nnx_equals_linen_forward(name, rng):
    model, lin, v = _build(CONFIGS[name], rng)
    x, _ = _data(rng, 16)
    qn.set_mode(model, Mode.FROZEN)
    a = model(x)
    b = lin.apply(v, x, Mode.FROZEN)  # FROZEN needs no mutable statistics
    np.testing.assert_array_equal(a, b)
    # and the fake-quant differs from float (the quantizers are really on)
    qn.set_mode(model, Mode.FLOAT)
    assert float(jnp.abs(model(x) - a).max()) > 0


def test_learnable_pact_clips_at_alpha():
    """PACT: activations above alpha are clipped; d(out)/d(alpha) = 1 there."""
    spec = QuantSpec(bits=8, signed=False)
    from qjax.flax._learnable import tensor_qparams

    def f(alpha, x):
        qp = tensor_qparams({"alpha": alpha}, spec, "pact")
        return qjax.fake_quant(x, qp, grad="pact")

    x = jnp.array([0.5, 1.0, 3.0, 5.0])
    y = f(jnp.float32(2.0), x)
    assert float(y[-1]) == pytest.approx(2.0) and float(y[-2]) == pytest.approx(2.0)
    g = jax.grad(lambda a: f(a, x).sum())(jnp.float32(2.0))
    assert float(g) == pytest.approx(2.0)  # two elements above alpha


def test_learnable_errors(rng):
    with pytest.raises(ValueError, match="grad in \\('lsq', 'pact'\\)"):
        qn.LearnableQuantLinear(2, 2, config=qjax_recommended(), rngs=nnx.Rngs(0))
    # the observer-driven layers refuse learnable configs, naming the layer
    layer = qn.QuantLinear(2, 2, config=LSQ, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="learns the qparams as parameters"):
        layer(jnp.ones((1, 2)))
    # reading qparams from observers that never saw data
    m = qn.LearnableQuantLinear(2, 2, config=LSQ, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="never saw data"):
        qn.init_qparams_from_stats(m)
    lin = ql.LearnableQuantDense(2, config=LSQ)
    v = lin.init(jax.random.key(0), jnp.ones((1, 2)))
    with pytest.raises(ValueError, match="<root>: observers \\['input', 'weight'\\] never saw"):
        ql.init_qparams_from_stats(v)
    with pytest.raises(ValueError, match="per-tensor"):
        qn.LearnableQuantLinear(
            2, 2, config=LSQ.replace(activation=QuantSpec(axis=0)), rngs=nnx.Rngs(0)
        )
