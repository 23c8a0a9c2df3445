"""QAT layers for flax.nnx and flax.linen: one core, two shells, same numbers."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import qjax
from qjax.flax import (
    Mode,
    QuantConfig,
    default_qat_qconfig,
    qjax_recommended,
)
from qjax.flax import linen as ql
from qjax.flax import nnx as qn

CONFIGS = {
    "recommended": qjax_recommended(),
    "torch_x86": default_qat_qconfig("x86"),
    "torch_qnnpack": default_qat_qconfig("qnnpack"),
}
MODES = [Mode.FLOAT, Mode.CALIBRATE, Mode.QAT, Mode.FROZEN]


def assert_tree_equal(a, b, what=""):
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    assert len(la) == len(lb), what
    for u, v in zip(la, lb, strict=True):
        np.testing.assert_array_equal(np.asarray(u), np.asarray(v), err_msg=what)


def _snap(model):
    """A copy of the observer state (``nnx.state`` returns live Variables)."""
    return jax.tree.map(lambda a: a, nnx.state(model, qn.QuantStat))


# --------------------------------------------------------------------------------------
# models: the same MLP in both shells


class NnxMLP(nnx.Module):
    def __init__(self, cfg, din, dh, dout, rngs, mode=Mode.QAT):
        self.stub = qn.QuantStub(cfg, mode=mode)
        self.fc1 = qn.QuantLinear(din, dh, config=cfg, mode=mode, rngs=rngs)
        self.fc2 = qn.QuantLinear(dh, dout, config=cfg, mode=mode, rngs=rngs)

    def __call__(self, x):
        return self.fc2(jax.nn.relu(self.fc1(self.stub(x))))


class LinenMLP(nn.Module):
    cfg: QuantConfig
    dh: int
    dout: int

    @nn.compact
    def __call__(self, x, mode=Mode.QAT):
        x = ql.QuantStub(self.cfg, name="stub")(x, mode=mode)
        x = ql.QuantDense(self.dh, config=self.cfg, name="fc1")(x, mode=mode)
        return ql.QuantDense(self.dout, config=self.cfg, name="fc2")(jax.nn.relu(x), mode=mode)


def _linen_vars_from_nnx(model):
    params = {k: {"kernel": getattr(model, k).kernel[...], "bias": getattr(model, k).bias[...]}
              for k in ("fc1", "fc2")}  # fmt: skip
    stats = {
        k: {"stats": getattr(model, k).quant_stats.get_value()} for k in ("stub", "fc1", "fc2")
    }
    return {"params": params, "quant_stats": stats}


@pytest.mark.parametrize("cfg_name", ["recommended", "torch_x86"])
def test_nnx_and_linen_identical_in_every_mode(cfg_name, rng):
    cfg = CONFIGS[cfg_name]
    model = NnxMLP(cfg, 6, 16, 3, nnx.Rngs(0))
    lmodel = LinenMLP(cfg, 16, 3)
    v = _linen_vars_from_nnx(model)
    # The Linen init allocates the same structure (and does not observe).
    v0 = lmodel.init(jax.random.key(1), jnp.zeros((2, 6), jnp.float32))
    assert jax.tree.structure(v0) == jax.tree.structure(v)

    def nnx_loss(m, x):
        return jnp.sum(m(x) ** 2)

    def linen_loss(params, stats, x, mode):
        y, upd = lmodel.apply(
            {"params": params, "quant_stats": stats}, x, mode, mutable=["quant_stats"]
        )
        return jnp.sum(y**2), (y, upd["quant_stats"])

    # CALIBRATE first so that FROZEN has statistics; then every mode, twice over.
    for step, mode in enumerate([Mode.CALIBRATE, Mode.FLOAT, Mode.QAT, Mode.FROZEN]):
        x = jnp.asarray(rng.standard_normal((5, 6)).astype(np.float32) * (1 + step))
        qn.set_mode(model, mode)
        before = _snap(model)
        y_n = model(x)
        after = _snap(model)
        nnx.update(model, before)  # nnx.grad runs the forward (and the observers) again
        grads_n = nnx.grad(nnx_loss, argnums=nnx.DiffState(0, nnx.Param))(model, x)
        assert_tree_equal(nnx.state(model, qn.QuantStat), after)
        (_, (y_l, st_l)), grads_l = jax.value_and_grad(linen_loss, has_aux=True)(
            v["params"], v["quant_stats"], x, mode
        )
        what = f"{cfg_name} {mode}"
        np.testing.assert_array_equal(np.asarray(y_n), np.asarray(y_l), err_msg=what)
        for k in ("fc1", "fc2"):
            g = getattr(grads_n, k)
            np.testing.assert_array_equal(
                np.asarray(g.kernel[...]), np.asarray(grads_l[k]["kernel"]), err_msg=what
            )
            np.testing.assert_array_equal(
                np.asarray(g.bias[...]), np.asarray(grads_l[k]["bias"]), err_msg=what
            )
            # Statistics: same values, in QuantStat (NNX) and in quant_stats (Linen).
            assert_tree_equal(getattr(model, k).quant_stats.get_value(), st_l[k]["stats"], what)
        changed = not all(
            np.array_equal(np.asarray(u), np.asarray(w))
            for u, w in zip(jax.tree.leaves(before), jax.tree.leaves(after), strict=True)
        )
        assert changed == mode.observes, what
        v = {"params": v["params"], "quant_stats": st_l}


def test_nnx_and_linen_hooks_identical(rng):
    cfg = qjax_recommended()
    hook_n = qn.QuantDotGeneral(cfg, kernel_shape=(4, 3))
    lin = nnx.Linear(4, 3, dot_general=hook_n, rngs=nnx.Rngs(0))
    dense = nn.Dense(3, dot_general_cls=functools.partial(ql.QuantDotGeneral, config=cfg))
    v = dense.init(jax.random.key(0), jnp.zeros((1, 4), jnp.float32))
    v = {
        "params": {"kernel": lin.kernel[...], "bias": lin.bias[...]},
        "quant_stats": v["quant_stats"],
    }
    for _ in range(3):
        x = jnp.asarray(rng.standard_normal((8, 4)).astype(np.float32))
        y_n = lin(x)
        y_l, upd = dense.apply(v, x, mutable=["quant_stats"])
        v = {"params": v["params"], **upd}
        np.testing.assert_array_equal(np.asarray(y_n), np.asarray(y_l))
        assert_tree_equal(
            hook_n.quant_stats.get_value(), upd["quant_stats"]["QuantDotGeneral_0"]["stats"]
        )
    # The hook quantized the input and the weight: equal to the explicit formula.
    st = hook_n.quant_stats.get_value()
    obs_in = cfg.activation_observer(cfg.activation, cfg.compat)
    obs_w = cfg.weight_observer(cfg.weight, cfg.compat)
    xq = qjax.fake_quant(x, obs_in.qparams(st.input))
    wq = qjax.fake_quant(lin.kernel[...], obs_w.qparams(st.weight))
    np.testing.assert_array_equal(np.asarray(y_n), np.asarray(xq @ wq + lin.bias[...]))


def test_hooks_refuse_output_quantization():
    with pytest.raises(ValueError, match="cannot quantize the output"):
        qn.QuantDotGeneral(default_qat_qconfig("x86"), kernel_shape=(2, 2), name="enc/fc")
    dense = nn.Dense(
        2, dot_general_cls=functools.partial(ql.QuantDotGeneral, config=default_qat_qconfig())
    )
    with pytest.raises(ValueError, match="QuantDotGeneral_0.*cannot quantize the output"):
        dense.init(jax.random.key(0), jnp.zeros((1, 2), jnp.float32))


def test_conv_nnx_hook_linen_hook_and_layers_agree(rng):
    cfg = qjax_recommended()
    hook = qn.QuantConvGeneralDilated(cfg, kernel_shape=(3, 3, 2, 4))
    conv_n = nnx.Conv(2, 4, (3, 3), conv_general_dilated=hook, rngs=nnx.Rngs(0))
    qconv_n = qn.QuantConv(2, 4, (3, 3), config=cfg, rngs=nnx.Rngs(0))
    qconv_n.kernel.set_value(conv_n.kernel[...])
    conv_l = nn.Conv(
        4,
        (3, 3),
        conv_general_dilated_cls=functools.partial(ql.QuantConvGeneralDilated, config=cfg),
    )
    qconv_l = ql.QuantConv(4, (3, 3), config=cfg)
    x = jnp.asarray(rng.standard_normal((2, 6, 6, 2)).astype(np.float32))
    params = {"kernel": conv_n.kernel[...], "bias": conv_n.bias[...]}
    vl = conv_l.init(jax.random.key(0), x)
    vq = qconv_l.init(jax.random.key(0), x)
    y1 = conv_n(x)
    y2 = qconv_n(x)
    y3, _ = conv_l.apply({"params": params, "quant_stats": vl["quant_stats"]}, x, mutable=True)
    y4, _ = qconv_l.apply({"params": params, "quant_stats": vq["quant_stats"]}, x, mutable=True)
    for y in (y2, y3, y4):
        np.testing.assert_array_equal(np.asarray(y1), np.asarray(y))
    assert not np.array_equal(
        np.asarray(y1), np.asarray(nnx.Conv(2, 4, (3, 3), rngs=nnx.Rngs(0))(x))
    )


# --------------------------------------------------------------------------------------
# statistics are not parameters


def test_observer_state_never_reaches_the_optimizer():
    model = NnxMLP(qjax_recommended(), 4, 8, 2, nnx.Rngs(0))
    stats = nnx.state(model, qn.QuantStat)
    assert set(stats.keys()) == {"stub", "fc1", "fc2"}
    opt = nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.Param)
    n_params = len(jax.tree.leaves(nnx.state(model, nnx.Param)))
    mu = opt.opt_state[0].mu
    assert len(jax.tree.leaves(mu)) == n_params
    flat = jax.tree_util.tree_flatten_with_path(nnx.to_pure_dict(nnx.state(opt, ...)))[0]
    assert not any("quant_stats" in jax.tree_util.keystr(p) for p, _ in flat)

    lmodel = LinenMLP(qjax_recommended(), 8, 2)
    v = lmodel.init(jax.random.key(0), jnp.zeros((1, 4), jnp.float32))
    assert set(v) == {"params", "quant_stats"}
    assert "quant_stats" not in str(jax.tree_util.tree_flatten_with_path(v["params"])[0])
    assert set(v["quant_stats"]) == {"stub", "fc1", "fc2"}
    # Observing without a mutable collection is an error naming the module.
    with pytest.raises(ValueError, match="stub.*mutable=\\['quant_stats'\\]"):
        lmodel.apply(v, jnp.ones((1, 4), jnp.float32))


def test_stats_updated_under_stop_gradient(rng):
    """The new observer state carries no gradient to the input or the params."""
    cfg = qjax_recommended()
    x = jnp.asarray(rng.standard_normal((3, 4)).astype(np.float32))
    layer = ql.QuantDense(2, config=cfg)
    v = layer.init(jax.random.key(0), x)

    def stats_sum(params, x):
        _, upd = layer.apply(
            {"params": params, "quant_stats": v["quant_stats"]}, x, mutable=["quant_stats"]
        )
        st = upd["quant_stats"]["stats"]
        return jnp.sum(st.input.max_val) + jnp.sum(st.weight.max_val - st.weight.min_val)

    gp, gx = jax.grad(stats_sum, argnums=(0, 1))(v["params"], x)
    for leaf in jax.tree.leaves((gp, gx)):
        assert not np.any(np.asarray(leaf)), "observer state passed a gradient"
    assert float(stats_sum(v["params"], x)) != 0.0


# --------------------------------------------------------------------------------------
# modes


def test_calibrate_is_float_frozen_is_fake_quant(rng):
    cfg = qjax_recommended()
    layer = qn.QuantLinear(5, 3, config=cfg, rngs=nnx.Rngs(0))
    x = jnp.asarray(rng.standard_normal((7, 5)).astype(np.float32))
    float_y = x @ layer.kernel[...] + layer.bias[...]
    qn.set_mode(layer, Mode.FLOAT)
    np.testing.assert_array_equal(np.asarray(layer(x)), np.asarray(float_y))
    before = layer.quant_stats.get_value()
    assert int(before.input.count) == 0
    with pytest.raises(ValueError, match="never saw data"):
        qn.set_mode(layer, Mode.FROZEN)
    qn.set_mode(layer, Mode.CALIBRATE)
    np.testing.assert_array_equal(np.asarray(layer(x)), np.asarray(float_y))
    after = layer.quant_stats.get_value()
    assert int(after.input.count) == 1 and int(after.weight.count) == 1
    assert float(after.input.max_val) == float(jnp.max(x))

    qn.set_mode(layer, Mode.FROZEN)
    x2 = jnp.asarray(rng.standard_normal((7, 5)).astype(np.float32) * 3)
    y = layer(x2)
    assert_tree_equal(layer.quant_stats.get_value(), after, "FROZEN must not observe")
    qin = cfg.activation_observer(cfg.activation, cfg.compat).qparams(after.input)
    qw = cfg.weight_observer(cfg.weight, cfg.compat).qparams(after.weight)
    want = qjax.fake_quant(x2, qin) @ qjax.fake_quant(layer.kernel[...], qw) + layer.bias[...]
    np.testing.assert_array_equal(np.asarray(y), np.asarray(want))


def test_per_layer_switches(rng):
    model = NnxMLP(qjax_recommended(), 4, 8, 2, nnx.Rngs(0))
    x = jnp.asarray(rng.standard_normal((3, 4)).astype(np.float32))
    qn.set_mode(model, Mode.QAT)
    model(x)
    qn.disable_observer(model, where="fc1")
    model(x)
    assert int(model.fc1.quant_stats.get_value().weight.count) == 1
    assert int(model.fc2.quant_stats.get_value().weight.count) == 2
    qn.enable_observer(model)
    qn.disable_fake_quant(model)
    model(x)
    assert int(model.fc1.quant_stats.get_value().weight.count) == 2
    # Observers on, fake-quant off everywhere == CALIBRATE: the float output.
    y_off = model(x)
    qn.set_mode(model, Mode.FLOAT)
    np.testing.assert_array_equal(np.asarray(y_off), np.asarray(model(x)))
    qn.enable_fake_quant(model)
    with pytest.raises(ValueError, match="no quantized modules matching 'nope'"):
        qn.disable_observer(model, where="nope")

    # Linen: the same switches are attributes.
    layer = ql.QuantDense(3, config=qjax_recommended(), observe=False)
    v = layer.init(jax.random.key(0), x)
    y, upd = layer.apply(v, x, Mode.CALIBRATE, mutable=["quant_stats"])
    assert int(upd["quant_stats"]["stats"].weight.count) == 0
    np.testing.assert_array_equal(
        np.asarray(y), np.asarray(x @ v["params"]["kernel"] + v["params"]["bias"])
    )
    # Fake-quant on an observer that is switched off and never saw data: an error.
    with pytest.raises(ValueError, match="<root> \\(input\\).*never saw data"):
        layer.apply(v, x, Mode.QAT, mutable=["quant_stats"])


def test_frozen_without_statistics_names_the_module():
    v = LinenMLP(qjax_recommended(), 8, 2).init(jax.random.key(0), jnp.ones((1, 4), jnp.float32))
    with pytest.raises(ValueError, match="quant_stats/stub/stats"):
        ql.require_statistics(v["quant_stats"])
    with pytest.raises(ValueError, match="stub: fake-quantizes.*never saw data"):
        LinenMLP(qjax_recommended(), 8, 2).apply(v, jnp.ones((1, 4), jnp.float32), Mode.FROZEN)
    model = NnxMLP(qjax_recommended(), 4, 8, 2, nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"no statistics in \['fc1', 'fc2', 'stub'\]"):
        qn.set_mode(model, Mode.FROZEN)


# --------------------------------------------------------------------------------------
# whole-model rules


class Plain(nnx.Module):
    def __init__(self, rngs):
        self.fc1 = nnx.Linear(4, 8, rngs=rngs)
        self.norm = nnx.LayerNorm(8, rngs=rngs)
        self.fc2 = nnx.Linear(8, 2, rngs=rngs)

    def __call__(self, x):
        return self.fc2(self.norm(jax.nn.relu(self.fc1(x))))


def test_quantize_model_rules_and_errors(rng):
    cfg = qjax_recommended()
    model = Plain(nnx.Rngs(0))
    x = jnp.asarray(rng.standard_normal((3, 4)).astype(np.float32))
    y_float = model(x)
    with pytest.raises(TypeError, match="'norm', a LayerNorm"):
        qn.quantize_model(model, [(r".*", cfg)])
    with pytest.raises(ValueError, match=r"rules \['dec/.\*'\] matched no module"):
        qn.quantize_model(model, [(r"fc\d", cfg), (r"dec/.*", cfg)])
    assert qn.quantize_model(model, [(r"fc\d", cfg)]) == {"fc1": r"fc\d", "fc2": r"fc\d"}
    assert set(nnx.state(model, qn.QuantStat).keys()) == {"fc1", "fc2"}
    qn.set_mode(model, Mode.CALIBRATE)
    np.testing.assert_array_equal(np.asarray(model(x)), np.asarray(y_float))
    qn.set_mode(model, Mode.FROZEN)
    assert not np.array_equal(np.asarray(model(x)), np.asarray(y_float))


# --------------------------------------------------------------------------------------
# an ordinary optax training loop


def _digits_like(n=256, seed=0):
    """Synthetic 8x8 'digits' (no download): 10 noisy prototypes."""
    r = np.random.default_rng(seed)
    protos = r.uniform(0, 16, (10, 64)).astype(np.float32)
    y = r.integers(0, 10, n)
    x = protos[y] + r.normal(0, 3.0, (n, 64)).astype(np.float32)
    return jnp.asarray(x / 16.0), jnp.asarray(y)


def test_qat_training_loop_nnx_and_linen():
    x, y = _digits_like()
    cfg = qjax_recommended()

    model = NnxMLP(cfg, 64, 32, 10, nnx.Rngs(0))
    qn.set_mode(model, Mode.CALIBRATE)
    model(x[:128])
    qn.set_mode(model, Mode.QAT)
    # optax.adam's bias correction (float ** int32 count) fails under the strict dtype
    # promotion these tests run with; SGD with momentum does not.
    opt = nnx.Optimizer(model, optax.sgd(0.1, momentum=0.9), wrt=nnx.Param)

    @nnx.jit
    def step(model, opt, xb, yb):
        def loss_fn(m):
            return optax.softmax_cross_entropy_with_integer_labels(m(xb), yb).mean()

        loss, grads = nnx.value_and_grad(loss_fn)(model)
        opt.update(model, grads)
        return loss

    losses = [float(step(model, opt, x, y)) for _ in range(20)]
    assert losses[-1] < 0.5 * losses[0], losses[::10]
    assert int(model.fc1.quant_stats.get_value().input.count) == 21

    lmodel = LinenMLP(cfg, 32, 10)
    v = lmodel.init(jax.random.key(0), x[:1])
    tx = optax.sgd(0.1, momentum=0.9)
    params, stats = v["params"], v["quant_stats"]
    opt_state = tx.init(params)

    @jax.jit
    def lstep(params, stats, opt_state, xb, yb):
        def loss_fn(p):
            out, upd = lmodel.apply(
                {"params": p, "quant_stats": stats}, xb, mutable=["quant_stats"]
            )
            return optax.softmax_cross_entropy_with_integer_labels(out, yb).mean(), upd

        (loss, upd), g = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, opt_state = tx.update(g, opt_state, params)
        return optax.apply_updates(params, updates), upd["quant_stats"], opt_state, loss

    llosses = []
    for _ in range(20):
        params, stats, opt_state, loss = lstep(params, stats, opt_state, x, y)
        llosses.append(float(loss))
    assert llosses[-1] < 0.5 * llosses[0], llosses[::10]


# --------------------------------------------------------------------------------------
# PyTorch's default QAT qconfig, bit for bit


@pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::UserWarning")
@pytest.mark.parametrize("backend", ["x86", "qnnpack"])
def test_torch_preset_matches_prepare_qat_linear(backend):
    torch = pytest.importorskip("torch")
    from torch.ao import quantization as tq

    class M(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.quant = tq.QuantStub()
            self.fc = torch.nn.Linear(12, 5)
            self.dequant = tq.DeQuantStub()

        def forward(self, x):
            return self.dequant(self.fc(self.quant(x)))

    r = np.random.default_rng(7)
    # Exactly representable data (multiples of 2^-4 inputs, 2^-7 weights, 2^-11 bias)
    # keep float32 matmul sums exact, so the accumulation order of torch's and XLA's
    # matmuls cannot differ; every batch holds the input extremes 0 and qmax/16 and
    # each weight row its max 127/128, so the power-of-two scales stay fixed
    # (x86: activations 0..127 under reduce_range, per-channel weights; qnnpack:
    # 0..255, per-tensor weights).
    w = r.integers(-128, 128, (5, 12)).astype(np.float32)
    w[:, 0] = 127
    w /= 128
    b = (r.integers(-2000, 2000, 5) / 2048).astype(np.float32)
    torch.manual_seed(0)
    m = M()
    with torch.no_grad():
        m.fc.weight.copy_(torch.from_numpy(w))
        m.fc.bias.copy_(torch.from_numpy(b))
    m.qconfig = tq.get_default_qat_qconfig(backend)
    m.train()
    tq.prepare_qat(m, inplace=True)

    cfg = default_qat_qconfig(backend)
    qmax = cfg.activation.qmax
    stub = qn.QuantStub(cfg)
    fc = qn.QuantLinear(12, 5, config=cfg, rngs=nnx.Rngs(0))
    fc.kernel.set_value(jnp.asarray(w.T))  # torch (out, in) -> flax (in, out)
    fc.bias.set_value(jnp.asarray(b))

    weights = jnp.arange(1.0, 6.0, dtype=jnp.float32)

    @nnx.jit
    def fwd_bwd(stub, fc, x):
        def loss(stub, fc, x):
            y = fc(stub(x))
            return jnp.sum(y * weights), y

        argnums = (nnx.DiffState(1, nnx.Param), 2)
        (_, y), (gk, gx) = nnx.value_and_grad(loss, argnums=argnums, has_aux=True)(stub, fc, x)
        return y, gk, gx

    for step in range(3):
        x = r.integers(0, qmax + 1, (9, 12)).astype(np.float32)
        x[0, 0], x[1, 1] = 0, qmax
        x /= 16
        xt = torch.from_numpy(x).requires_grad_(True)
        m.fc.weight.grad = None
        yt = m(xt)
        (yt * torch.arange(1.0, 6.0)).sum().backward()
        y, gk, gx = fwd_bwd(stub, fc, jnp.asarray(x))  # jitted: one forward, one update
        what = f"{backend} step {step}"
        np.testing.assert_array_equal(np.asarray(y), yt.detach().numpy(), err_msg=what)
        np.testing.assert_array_equal(
            np.asarray(gk.kernel[...]).T, m.fc.weight.grad.numpy(), err_msg=what
        )
        np.testing.assert_array_equal(np.asarray(gx), xt.grad.numpy(), err_msg=what)
        st = fc.quant_stats.get_value()
        fq_out = m.fc.activation_post_process
        np.testing.assert_array_equal(
            np.asarray(st.output.min_val), fq_out.activation_post_process.min_val.numpy()
        )
        np.testing.assert_array_equal(
            np.asarray(st.output.max_val), fq_out.activation_post_process.max_val.numpy()
        )
        qp = cfg.activation_observer(cfg.activation, cfg.compat).qparams(st.output)
        np.testing.assert_array_equal(np.asarray(qp.scale).reshape(1), fq_out.scale.numpy())
        np.testing.assert_array_equal(
            np.asarray(qp.zero_point).reshape(1), fq_out.zero_point.numpy()
        )


def test_mode_change_retraces_under_jit(rng):
    """Mode and switches are static: nnx.jit recompiles instead of reusing a stale program."""
    model = Plain(nnx.Rngs(0))
    qn.quantize_model(model, [(r"fc\d", qjax_recommended())], mode=Mode.FLOAT)
    f = nnx.jit(lambda m, x: m(x))
    x = jnp.asarray(rng.standard_normal((3, 4)).astype(np.float32))
    y_float = f(model, x)
    qn.set_mode(model, Mode.CALIBRATE)
    np.testing.assert_array_equal(np.asarray(f(model, x)), np.asarray(y_float))
    assert int(model.fc1.dot_general.quant_stats.get_value().input.count) == 1
    qn.set_mode(model, Mode.FROZEN)
    y_frozen = f(model, x)
    assert not np.array_equal(np.asarray(y_frozen), np.asarray(y_float))
    np.testing.assert_array_equal(np.asarray(y_frozen), np.asarray(model(x)))
    qn.disable_fake_quant(model)
    np.testing.assert_array_equal(np.asarray(f(model, x)), np.asarray(y_float))


def test_ptq_calibrate_nnx_and_linen(rng):
    cfg = qjax_recommended()
    batches = [jnp.asarray(rng.standard_normal((8, 4)).astype(np.float32) * s) for s in (1, 2, 3)]
    model = NnxMLP(cfg, 4, 8, 2, nnx.Rngs(0))
    lmodel = LinenMLP(cfg, 8, 2)
    v = _linen_vars_from_nnx(model)
    assert qn.calibrate(model, iter(batches), progress=True) == 3  # a tqdm bar, no total
    assert model.fc1.mode is Mode.FROZEN
    v, n = ql.calibrate(lmodel, v, batches, max_batches=2, mode=Mode.CALIBRATE)
    assert n == 2
    v, n = ql.calibrate(lmodel, v, batches[2:], mode=Mode.CALIBRATE)
    for k in ("stub", "fc1", "fc2"):
        assert_tree_equal(getattr(model, k).quant_stats.get_value(), v["quant_stats"][k]["stats"])
    x = batches[0]
    np.testing.assert_array_equal(np.asarray(model(x)), np.asarray(lmodel.apply(v, x, Mode.FROZEN)))
    with pytest.raises(ValueError, match="got no batches"):
        qn.calibrate(model, [])
    with pytest.raises(ValueError, match="no 'quant_stats' collection"):
        ql.calibrate(lmodel, {"params": v["params"]}, batches, mode=Mode.CALIBRATE)


# --------------------------------------------------------------------------------------
# Conv + BatchNorm folding


def test_conv_bn_nnx_and_linen_identical(rng):
    cfg = default_qat_qconfig("x86")
    cb = qn.QuantConvBn(2, 3, (3, 3), config=cfg, relu=True, rngs=nnx.Rngs(0))
    stub = qn.QuantStub(cfg)
    lstub, lcb = ql.QuantStub(cfg), ql.QuantConvBn(3, (3, 3), config=cfg, relu=True)
    x0 = jnp.zeros((2, 5, 5, 2), jnp.float32)
    vs, vc = lstub.init(jax.random.key(0), x0), lcb.init(jax.random.key(0), x0)
    params = {"kernel": cb.kernel[...], "bn_scale": cb.bn_scale[...], "bn_bias": cb.bn_bias[...]}
    vc = {**vc, "params": params}
    for step in range(3):
        if step == 2:
            mean_before_freeze = np.asarray(cb.bn_mean[...])
            qn.freeze_bn_stats(cb)
            lcb = lcb.clone(freeze_bn_stats=True)
        x = jnp.asarray(rng.standard_normal((2, 5, 5, 2)).astype(np.float32))
        y_n = cb(stub(x))
        xs, us = lstub.apply(vs, x, mutable=["quant_stats"])
        vs = {**vs, **us}
        y_l, uc = lcb.apply(vc, xs, mutable=["quant_stats", "batch_stats"])
        vc = {**vc, **uc}
        np.testing.assert_array_equal(np.asarray(y_n), np.asarray(y_l))
        np.testing.assert_array_equal(np.asarray(cb.bn_mean[...]), vc["batch_stats"]["bn_mean"])
        np.testing.assert_array_equal(np.asarray(cb.bn_var[...]), vc["batch_stats"]["bn_var"])
        assert_tree_equal(cb.quant_stats.get_value(), vc["quant_stats"]["stats"])
    # Frozen BN statistics did not move in the last step; BatchStat is not a Param.
    np.testing.assert_array_equal(np.asarray(cb.bn_mean[...]), mean_before_freeze)
    assert set(nnx.state(cb, nnx.Param).keys()) == {"kernel", "bn_scale", "bn_bias"}
    assert set(nnx.state(cb, nnx.BatchStat).keys()) == {"bn_mean", "bn_var"}
    with pytest.raises(ValueError, match="batch_stats"):
        lcb.clone(freeze_bn_stats=False).apply(vc, xs, mutable=["quant_stats"])


@pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::UserWarning")
def test_conv_bn_close_to_torch_convbn2d(rng):
    """Against torch's prepared-QAT ConvBn2d (x86 qconfig): conv sums and BN batch
    statistics are reduced in different orders, so this is a tolerance test (1 LSB)."""
    torch = pytest.importorskip("torch")
    from torch.ao import quantization as tq

    class M(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.quant = tq.QuantStub()
            self.conv = torch.nn.Conv2d(2, 4, 3, padding=1, bias=False)
            self.bn = torch.nn.BatchNorm2d(4)
            self.dequant = tq.DeQuantStub()

        def forward(self, x):
            return self.dequant(self.bn(self.conv(self.quant(x))))

    torch.manual_seed(0)
    m = M()
    w = m.conv.weight.detach().numpy().copy()
    m.train()
    m = tq.fuse_modules_qat(m, [["conv", "bn"]])
    m.qconfig = tq.get_default_qat_qconfig("x86")
    tq.prepare_qat(m, inplace=True)

    cfg = default_qat_qconfig("x86")
    stub = qn.QuantStub(cfg)
    cb = qn.QuantConvBn(2, 4, (3, 3), config=cfg, padding=((1, 1), (1, 1)), rngs=nnx.Rngs(0))
    cb.kernel.set_value(jnp.asarray(w.transpose(2, 3, 1, 0)))  # [O, I, kh, kw] -> [kh, kw, I, O]
    for step in range(3):
        x = rng.standard_normal((4, 2, 6, 6)).astype(np.float32)
        with torch.no_grad():
            yt = m(torch.from_numpy(x)).numpy().transpose(0, 2, 3, 1)
        y = np.asarray(cb(stub(jnp.asarray(x.transpose(0, 2, 3, 1)))))
        scale = float(m.conv.activation_post_process.scale)
        assert np.max(np.abs(y - yt)) <= scale * 1.001, f"step {step}"
        # The output scales differ by float rounding (the observer sees BN outputs that
        # differ in the last bits), so compare integer codes: at most 1 apart, rarely.
        st = cb.quant_stats.get_value().output
        qp = cfg.activation_observer(cfg.activation, cfg.compat).qparams(st)
        np.testing.assert_allclose(float(qp.scale), scale, rtol=1e-5)
        codes = np.rint(y / float(qp.scale)) - np.rint(yt / scale)
        assert np.max(np.abs(codes)) <= 1 and np.mean(codes != 0) < 0.01, f"step {step}"
        np.testing.assert_allclose(
            cb.bn_mean[...], m.conv.bn.running_mean.numpy(), rtol=1e-5, atol=1e-6
        )
        np.testing.assert_allclose(cb.bn_var[...], m.conv.bn.running_var.numpy(), rtol=1e-5)
