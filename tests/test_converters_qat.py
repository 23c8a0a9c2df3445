"""Import a PyTorch prepared-QAT model into qjax.flax and continue training there.

Exactness: float32 sums are order-dependent, so the exact tests use data that keep
every sum exact (dyadic inputs with 4 fractional bits, weights with 7, every batch
holding the input extremes and every weight row its maximum, so the activation and
weight scales stay powers of two; BN frozen with eps=0 and powers-of-four running
variances). Where that is impossible (BN batch statistics, stacked layers) the test
states and asserts a measured tolerance on the integer codes.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from qjax.converters._torch_fq import qparams_fn
from qjax.converters.qat import import_qat_state, import_qat_variables

from qjax.flax import EMAMinMax, QuantConfig, default_qat_qconfig
from qjax.flax import linen as ql
from qjax.flax import nnx as qn
from qjax.observers import MinMaxState

torch = pytest.importorskip("torch")
tq = pytest.importorskip("torch.ao.quantization")

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::UserWarning")

COUNTS = {"values": 0, "qparams": 0}


def _v0_config():
    """qjax's twin of torch's unfused ``tq.default_qat_qconfig`` (FakeQuantize)."""
    from qjax import QuantSpec

    return QuantConfig(
        weight=QuantSpec(bits=8, signed=True, symmetric=True, quant_min=-128, quant_max=127),
        activation=QuantSpec(bits=8, signed=False, quant_min=0, quant_max=255, reduce_range=True),
        weight_observer=EMAMinMax(0.01),
        activation_observer=EMAMinMax(0.01),
        compat="torch",
        quantize_input=False,
        quantize_output=True,
    )


def _setup(name):
    if name == "v0":
        return tq.default_qat_qconfig, _v0_config()
    return tq.get_default_qat_qconfig(name), default_qat_qconfig(name)


def _exact_weight(r, shape, kind):
    """Dyadic weights whose fake-quant scale is 1/128 (so fq(w) == w)."""
    w = r.integers(-127, 128, shape).astype(np.float32)
    if kind == "v0":  # rule 6: amax / 127.5, per tensor
        w[0, 0] = 127.5
    else:  # rule 9: max(|min|/128, max/127), every output channel
        w.reshape(shape[0], -1)[:, 0] = 127
    return w / 128


def _exact_input(r, shape, qmax):
    x = r.integers(0, qmax + 1, shape).astype(np.float32)
    flat = x.reshape(-1)
    flat[0], flat[1] = 0, qmax
    return x / 16


def _eq(a, b, what):
    a, b = np.asarray(a), np.asarray(b)
    np.testing.assert_array_equal(a, b, err_msg=what)
    COUNTS["values"] += a.size


def _assert_stats(st, fq, cfg, slot, what):
    obs = fq.activation_post_process
    _eq(st.min_val, obs.min_val.numpy(), f"{what} min")
    _eq(st.max_val, obs.max_val.numpy(), f"{what} max")
    spec = cfg.weight if slot == "weight" else cfg.activation
    factory = cfg.weight_observer if slot == "weight" else cfg.activation_observer
    qp = qparams_fn(factory, spec, cfg.compat)(st)
    _eq(np.asarray(qp.scale).reshape(-1), fq.scale.numpy().reshape(-1), f"{what} scale")
    _eq(np.asarray(qp.zero_point).reshape(-1), fq.zero_point.numpy().reshape(-1), f"{what} zp")
    COUNTS["qparams"] += int(np.size(qp.scale))


class TorchLinear(torch.nn.Module):
    def __init__(self, din=12, dout=5):
        super().__init__()
        self.quant = tq.QuantStub()
        self.fc = torch.nn.Linear(din, dout)
        self.dequant = tq.DeQuantStub()

    def forward(self, x):
        return self.dequant(self.fc(self.quant(x)))


class NnxLinear(nnx.Module):
    def __init__(self, cfg, din=12, dout=5, seed=3):
        self.stub = qn.QuantStub(cfg)
        self.fc = qn.QuantLinear(din, dout, config=cfg, rngs=nnx.Rngs(seed))

    def __call__(self, x):
        return self.fc(self.stub(x))


def _prepared_linear(name, r):
    qconfig, cfg = _setup(name)
    m = TorchLinear()
    with torch.no_grad():
        m.fc.weight.copy_(torch.from_numpy(_exact_weight(r, (5, 12), name)))
        m.fc.bias.copy_(torch.from_numpy((r.integers(-2000, 2000, 5) / 2048).astype(np.float32)))
    m.qconfig = qconfig
    tq.prepare_qat(m.train(), inplace=True)
    qmax = cfg.activation.qmax
    for _ in range(2):  # torch trains first: observers leave their initial state
        m(torch.from_numpy(_exact_input(r, (9, 12), qmax)))
    return m, cfg


@pytest.mark.parametrize("name", ["x86", "qnnpack", "v0"])
def test_import_eager_linear_then_train_bit_exact(name):
    r = np.random.default_rng(11)
    m, cfg = _prepared_linear(name, r)
    net = NnxLinear(cfg)
    rep = import_qat_state(m, net, {"quant": "stub", "fc": "fc"})
    assert rep.copied["fc/kernel"] == "fc.weight (linear: [out, in] -> [in, out])"
    assert rep.switches["fc"] == (True, True)
    _eq(net.fc.kernel[...], m.fc.weight.detach().numpy().T, "kernel")
    _eq(net.fc.bias[...], m.fc.bias.detach().numpy(), "bias")
    st = net.fc.quant_stats.get_value()
    assert int(st.weight.count) == 1 and int(net.stub.quant_stats.get_value().count) == 1

    weights = jnp.arange(1.0, 6.0, dtype=jnp.float32)

    @nnx.jit
    def fwd_bwd(net, x):
        def loss(net, x):
            y = net(x)
            return jnp.sum(y * weights), y

        (_, y), g = nnx.value_and_grad(loss, has_aux=True)(net, x)
        return y, g

    for step in range(3):
        x = _exact_input(r, (9, 12), cfg.activation.qmax)
        m.fc.weight.grad = None
        yt = m(torch.from_numpy(x))
        (yt * torch.arange(1.0, 6.0)).sum().backward()
        y, g = fwd_bwd(net, jnp.asarray(x))
        what = f"{name} step {step}"
        _eq(y, yt.detach().numpy(), what)
        _eq(np.asarray(g.fc.kernel[...]).T, m.fc.weight.grad.numpy(), what + " grad")
        st = net.fc.quant_stats.get_value()
        _assert_stats(st.weight, m.fc.weight_fake_quant, cfg, "weight", what + " weight")
        _assert_stats(st.output, m.fc.activation_post_process, cfg, "output", what + " out")
        _assert_stats(
            net.stub.quant_stats.get_value(), m.quant.activation_post_process, cfg, "act", what
        )


def test_import_linen_variables_then_train_bit_exact():
    r = np.random.default_rng(12)
    m, cfg = _prepared_linear("x86", r)

    import flax.linen as nn

    class Net(nn.Module):
        @nn.compact
        def __call__(self, x):
            x = ql.QuantStub(cfg, name="stub")(x)
            return ql.QuantDense(5, config=cfg, name="fc")(x)

    net = Net()
    v = net.init(jax.random.key(0), jnp.zeros((1, 12), jnp.float32))
    v, rep = import_qat_variables(m, v, cfg, {"quant": "stub", "fc": "fc"})
    assert rep.qparams_checked == 5 + 1 + 1
    apply = jax.jit(lambda v, x: net.apply(v, x, mutable=["quant_stats"]))
    for step in range(3):
        x = _exact_input(r, (9, 12), cfg.activation.qmax)
        with torch.no_grad():
            yt = m(torch.from_numpy(x)).numpy()
        y, upd = apply(v, jnp.asarray(x))
        v = {**v, **upd}
        _eq(y, yt, f"linen step {step}")
        st = v["quant_stats"]["fc"]["stats"]
        _assert_stats(st.output, m.fc.activation_post_process, cfg, "output", "linen out")
        _assert_stats(st.weight, m.fc.weight_fake_quant, cfg, "weight", "linen weight")


class TorchConvBn(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.quant = tq.QuantStub()
        self.conv = torch.nn.Conv2d(2, 3, 3, padding=1, bias=False)
        self.bn = torch.nn.BatchNorm2d(3)
        self.relu = torch.nn.ReLU()
        self.dequant = tq.DeQuantStub()

    def forward(self, x):
        return self.dequant(self.relu(self.bn(self.conv(self.quant(x)))))


class NnxConvBn(nnx.Module):
    def __init__(self, cfg, eps):
        self.quant = qn.QuantStub(cfg)
        pad = ((1, 1), (1, 1))
        self.conv = qn.QuantConvBn(
            2, 3, (3, 3), config=cfg, padding=pad, relu=True, epsilon=eps, rngs=nnx.Rngs(5)
        )

    def __call__(self, x):
        return self.conv(self.quant(x))


def test_import_conv_bn_relu_frozen_bit_exact():
    r = np.random.default_rng(13)
    qconfig, cfg = _setup("x86")
    m = TorchConvBn().train()
    m = tq.fuse_modules_qat(m, [["conv", "bn", "relu"]])
    gamma = np.array([1.0, 0.5, 2.0], np.float32)
    var = np.array([0.25, 1.0, 4.0], np.float32)  # std 0.5, 1, 2: fold factors 2, 0.5, 1
    with torch.no_grad():
        m.conv[0].weight.copy_(torch.from_numpy(_exact_weight(r, (3, 2, 3, 3), "x86")))
        m.conv[1].weight.copy_(torch.from_numpy(gamma))
        m.conv[1].bias.copy_(torch.tensor([0.125, 0.0, -0.5]))
        m.conv[1].running_mean.copy_(torch.tensor([0.5, -0.25, 0.0]))
        m.conv[1].running_var.copy_(torch.from_numpy(var))
    m.qconfig = qconfig
    tq.prepare_qat(m, inplace=True)
    m.conv.bn.eps = 0.0
    m.apply(torch.ao.nn.intrinsic.qat.freeze_bn_stats)
    qmax = cfg.activation.qmax
    for _ in range(2):
        m(torch.from_numpy(_exact_input(r, (2, 2, 5, 5), qmax)))

    net = NnxConvBn(cfg, eps=0.0)
    fwd = nnx.jit(lambda net, x: net(x))
    # Linen: the same import into init variables (BN statistics in batch_stats).
    import flax.linen as nn

    class LinenConvBn(nn.Module):
        @nn.compact
        def __call__(self, x):
            x = ql.QuantStub(cfg, name="quant")(x)
            cb = ql.QuantConvBn(3, (3, 3), config=cfg, padding=((1, 1), (1, 1)), relu=True,
                                epsilon=0.0, freeze_bn_stats=True, name="conv")  # fmt: skip
            return cb(x)

    lnet = LinenConvBn()
    v = lnet.init(jax.random.key(0), jnp.zeros((2, 5, 5, 2), jnp.float32))
    v, _ = import_qat_variables(m, v, cfg)
    _eq(v["batch_stats"]["conv"]["bn_var"], var, "linen bn_var")
    lfwd = jax.jit(lambda v, x: lnet.apply(v, x, mutable=["quant_stats", "batch_stats"]))
    rep = import_qat_state(m, net)  # same paths: the default mapping
    assert rep.copied["conv/kernel"].endswith("(conv2d: [out, in, kh, kw] -> [kh, kw, in, out])")
    assert net.conv.freeze_bn
    _eq(net.conv.kernel[...], m.conv.weight.detach().numpy().transpose(2, 3, 1, 0), "kernel")
    _eq(net.conv.bn_var[...], var, "bn_var")
    for step in range(3):
        x = _exact_input(r, (2, 2, 5, 5), qmax)
        with torch.no_grad():
            yt = m(torch.from_numpy(x)).numpy().transpose(0, 2, 3, 1)
        y = fwd(net, jnp.asarray(x.transpose(0, 2, 3, 1)))
        what = f"convbn step {step}"
        _eq(y, yt, what)
        y_l, upd = lfwd(v, jnp.asarray(x.transpose(0, 2, 3, 1)))
        v = {**v, **upd}
        _eq(y_l, yt, what + " linen")
        _assert_stats(v["quant_stats"]["conv"]["stats"].output, m.conv.activation_post_process,
                      cfg, "output", what + " linen out")  # fmt: skip
        st = net.conv.quant_stats.get_value()
        _assert_stats(st.weight, m.conv.weight_fake_quant, cfg, "weight", what + " weight")
        _assert_stats(st.output, m.conv.activation_post_process, cfg, "output", what + " out")
        _eq(net.conv.bn_mean[...], m.conv.bn.running_mean.numpy(), what + " bn mean")


def test_import_fx_prepared_bit_exact():
    from torch.ao.quantization.quantize_fx import prepare_qat_fx

    class F(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1 = torch.nn.Linear(12, 5)

        def forward(self, x):
            return torch.relu(self.fc1(x)) + x[:, :5]

    r = np.random.default_rng(14)
    cfg = default_qat_qconfig("x86")
    f = F()
    with torch.no_grad():
        f.fc1.weight.copy_(torch.from_numpy(_exact_weight(r, (5, 12), "x86")))
    example = (torch.zeros(1, 12),)
    pm = prepare_qat_fx(f.train(), tq.get_default_qat_qconfig_mapping("x86"), example)
    for _ in range(2):
        pm(torch.from_numpy(_exact_input(r, (9, 12), 127)))

    class Net(nnx.Module):  # the graph's fake-quants, one ActQuant each
        def __init__(self):
            self.stub = qn.QuantStub(cfg)
            self.fc1 = qn.QuantLinear(12, 5, config=cfg, rngs=nnx.Rngs(0))
            self.relu_q, self.skip_q, self.add_q = (
                qn.ActQuant(cfg),
                qn.ActQuant(cfg),
                qn.ActQuant(cfg),
            )

        def __call__(self, x):
            y = self.relu_q(jax.nn.relu(self.fc1(self.stub(x))))
            return self.add_q(y + self.skip_q(x[:, :5]))

    net = Net()
    mapping = {
        "activation_post_process_0": "stub",
        "fc1": "fc1",
        "activation_post_process_1": ("fc1", "output"),
        "activation_post_process_2": "relu_q",
        "activation_post_process_3": "skip_q",
        "activation_post_process_4": "add_q",
    }
    rep = import_qat_state(pm, net, mapping)
    assert rep.copied["fc1/quant_stats/output"] == "activation_post_process_1"
    fwd = nnx.jit(lambda net, x: net(x))
    for step in range(3):
        x = _exact_input(r, (9, 12), 127)
        with torch.no_grad():
            yt = pm(torch.from_numpy(x)).numpy()
        _eq(fwd(net, jnp.asarray(x)), yt, f"fx step {step}")
        st = net.fc1.quant_stats.get_value()
        _assert_stats(st.output, pm.activation_post_process_1, cfg, "output", "fx fc1 out")
        _assert_stats(st.weight, pm.fc1.weight_fake_quant, cfg, "weight", "fx fc1 weight")
        for i, name in ((2, "relu_q"), (3, "skip_q"), (4, "add_q")):
            st = getattr(net, name).quant_stats.get_value()
            _assert_stats(st, getattr(pm, f"activation_post_process_{i}"), cfg, "a", name)

    # The same graph into a stock nnx.Linear with a dot_general hook (input-quantizing):
    # the graph's input fake-quant fills the hook's input slot.
    class Plain(nnx.Module):
        def __init__(self):
            self.fc1 = nnx.Linear(12, 5, rngs=nnx.Rngs(0))
            self.out_q = qn.ActQuant(cfg)

        def __call__(self, x):
            return self.out_q(self.fc1(x))

    plain = Plain()
    hook_cfg = cfg.replace(quantize_input=True, quantize_output=False)
    qn.quantize_model(plain, [("fc1", hook_cfg)])
    mapping = {
        "activation_post_process_0": ("fc1", "input"),
        "fc1": "fc1",
        "activation_post_process_1": "out_q",
        **{f"activation_post_process_{i}": None for i in (2, 3, 4)},
    }
    rep = import_qat_state(pm, plain, mapping)
    assert rep.copied["fc1/dot_general/quant_stats/input"] == "activation_post_process_0"
    seen = []
    handle = pm.activation_post_process_1.register_forward_hook(lambda m, i, o: seen.append(o))
    x = _exact_input(r, (9, 12), 127)
    with torch.no_grad():
        pm(torch.from_numpy(x))
    handle.remove()
    _eq(fwd(plain, jnp.asarray(x)), seen[0].numpy(), "fx into a hooked nnx.Linear")
    st = plain.fc1.dot_general.quant_stats.get_value()
    _assert_stats(st.input, pm.activation_post_process_0, cfg, "input", "hook input")


# --------------------------------------------------------------------------------------
# stacked layers with BN batch statistics: a measured tolerance


class TorchCNN(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.quant = tq.QuantStub()
        self.conv = torch.nn.Conv2d(1, 4, 3, bias=False)
        self.bn = torch.nn.BatchNorm2d(4)
        self.relu = torch.nn.ReLU()
        self.fc1 = torch.nn.Linear(4, 8)
        self.relu1 = torch.nn.ReLU()
        self.fc2 = torch.nn.Linear(8, 3)
        self.dequant = tq.DeQuantStub()

    def forward(self, x):
        x = self.relu(self.bn(self.conv(self.quant(x)))).flatten(1)  # 3x3 input: 1x1 maps
        return self.dequant(self.fc2(self.relu1(self.fc1(x))))


class NnxCNN(nnx.Module):
    def __init__(self, cfg):
        r = nnx.Rngs(1)
        self.stub = qn.QuantStub(cfg)
        self.conv = qn.QuantConvBn(1, 4, (3, 3), config=cfg, padding="VALID", relu=True, rngs=r)
        self.fc1 = qn.QuantLinear(4, 8, config=cfg.replace(activation=None), rngs=r)
        self.fc1_act = qn.ActQuant(cfg)
        self.fc2 = qn.QuantLinear(8, 3, config=cfg, rngs=r)

    def __call__(self, x):
        x = self.conv(self.stub(x)).reshape(x.shape[0], -1)
        return self.fc2(self.fc1_act(jax.nn.relu(self.fc1(x))))


def test_import_cnn_with_bn_batch_stats_within_measured_tolerance():
    """BN batch statistics and stacked layers may round differently in torch and XLA (sum
    order, ``1/sqrt`` vs ``/sqrt``), so this asserts a tolerance: output codes at most 1
    apart, observer ranges within 1e-5 relative. Measured on this data: outputs and
    observer ranges equal, BN running statistics within 6e-8."""
    r = np.random.default_rng(15)
    torch.manual_seed(0)
    m = TorchCNN().train()
    m = tq.fuse_modules_qat(m, [["conv", "bn", "relu"], ["fc1", "relu1"]])
    m.qconfig = tq.get_default_qat_qconfig("x86")
    tq.prepare_qat(m, inplace=True)
    for _ in range(2):
        m(torch.from_numpy(r.standard_normal((16, 1, 3, 3)).astype(np.float32)))
    cfg = default_qat_qconfig("x86")
    net = NnxCNN(cfg)
    mapping = {
        "quant": "stub",
        "conv": "conv",
        "fc1": "fc1",
        "fc1.activation_post_process": "fc1_act",
        "fc2": "fc2",
    }
    import_qat_state(m, net, mapping)
    fwd = nnx.jit(lambda net, x: net(x))
    worst = 0
    for _ in range(3):
        x = r.standard_normal((16, 1, 3, 3)).astype(np.float32)
        before = np.array(net.conv.bn_mean[...])
        with torch.no_grad():
            yt = m(torch.from_numpy(x)).numpy()
        # torch updates its buffers in place: the imported arrays must not alias them
        np.testing.assert_array_equal(np.asarray(net.conv.bn_mean[...]), before)
        y = np.asarray(fwd(net, jnp.asarray(x.transpose(0, 2, 3, 1))))
        s = float(m.fc2.activation_post_process.scale)
        codes = np.abs(np.rint(y / s) - np.rint(yt / s))
        worst = max(worst, int(codes.max()))
        pairs = [
            (net.conv.quant_stats.get_value().output, m.conv.activation_post_process),
            (net.fc1_act.quant_stats.get_value(), m.fc1.activation_post_process),
            (net.fc2.quant_stats.get_value().output, m.fc2.activation_post_process),
        ]
        for st, fq in pairs:
            obs = fq.activation_post_process
            np.testing.assert_allclose(st.min_val, obs.min_val.numpy(), rtol=1e-5, atol=1e-7)
            np.testing.assert_allclose(st.max_val, obs.max_val.numpy(), rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(
            net.conv.bn_mean[...], m.conv.bn.running_mean.numpy(), rtol=1e-5, atol=1e-7
        )
    assert worst <= 1, worst


# --------------------------------------------------------------------------------------
# named errors


def test_unmatched_quantizers_named_on_both_sides():
    m, cfg = _prepared_linear("x86", np.random.default_rng(1))
    net = NnxLinear(cfg)
    with pytest.raises(ValueError) as e:
        import_qat_state(m, net, {"fc": "fc"})
    msg = str(e.value)
    assert "'quant.activation_post_process'" in msg and "'stub/quant_stats'" in msg
    # Skipping on purpose (None) and strict=False are the two ways out.
    import_qat_state(m, net, {"fc": "fc"}, strict=False)
    with pytest.raises(ValueError, match=r"not filled: \['stub/quant_stats'\]"):
        import_qat_state(m, net, {"fc": "fc", "quant": None})


def test_config_mismatch_and_bad_mappings_are_named():
    m, cfg = _prepared_linear("x86", np.random.default_rng(2))
    fq_msg = r"'fc.weight_fake_quant' -> qjax 'fc' \(weight\).*per_channel"
    with pytest.raises(ValueError, match=fq_msg):
        import_qat_state(m, NnxLinear(default_qat_qconfig("qnnpack")), {"fc": "fc"}, strict=False)
    with pytest.raises(ValueError, match="compat='torch_fused'"):
        import_qat_state(m, NnxLinear(_v0_config()), {"fc": "fc"}, strict=False)
    with pytest.raises(
        ValueError, match=r"'fc.weight' -> qjax 'fc/kernel'.*shape \(12, 5\), qjax has \(12, 4\)"
    ):
        import_qat_state(m, NnxLinear(cfg, dout=4), {"fc": "fc"}, strict=False)
    with pytest.raises(ValueError, match="torch model has no module 'nope'"):
        import_qat_state(m, NnxLinear(cfg), {"nope": "fc"})
    with pytest.raises(ValueError, match="qjax model has no module 'fc2'"):
        import_qat_state(m, NnxLinear(cfg), {"fc": "fc2"})
    with pytest.raises(TypeError, match=r"Linear \(linear\) cannot go into qjax 'stub' \(act\)"):
        import_qat_state(m, NnxLinear(cfg), {"fc": "stub"})
    with pytest.raises(ValueError, match="name the quantizer"):
        import_qat_state(m, NnxLinear(cfg), {"quant": "fc"})
    with pytest.raises(TypeError, match=r"mapping\['fc'\] must be a qjax path"):
        import_qat_state(m, NnxLinear(cfg), {"fc": ("fc", "weight", 3)})
    with pytest.raises(ValueError, match="slot must be one of"):
        import_qat_state(m, NnxLinear(cfg), {"quant": ("fc", "bias")})
    with pytest.raises(TypeError, match="'dequant'.*DeQuantStub"):
        import_qat_state(m, NnxLinear(cfg), {"dequant": "stub"})


def test_hand_set_qparams_and_lsq_are_refused():
    r = np.random.default_rng(3)
    m, cfg = _prepared_linear("v0", r)
    m.apply(tq.disable_observer)
    with torch.no_grad():
        m.fc.activation_post_process.scale.mul_(2)
    with pytest.raises(ValueError, match=r"'fc.activation_post_process'.*set by hand"):
        import_qat_state(m, NnxLinear(_v0_config()), {"quant": "stub", "fc": "fc"})
    # Observers off in torch: the NNX switches follow.
    m2, _ = _prepared_linear("v0", r)
    m2.apply(tq.disable_observer)
    net = NnxLinear(_v0_config())
    import_qat_state(m2, net, {"quant": "stub", "fc": "fc"})
    assert (net.fc.observe, net.fc.fake_quant, net.stub.observe) == (False, True, False)

    from torch.ao.quantization._learnable_fake_quantize import _LearnableFakeQuantize

    lsq = _LearnableFakeQuantize.with_args(
        observer=tq.MovingAverageMinMaxObserver, quant_min=0, quant_max=255
    )
    m3 = TorchLinear()
    m3.qconfig = tq.QConfig(activation=lsq, weight=tq.default_weight_fake_quant)
    tq.prepare_qat(m3.train(), inplace=True)
    with pytest.raises(ValueError, match="LSQ.*cannot be imported"):
        import_qat_state(m3, NnxLinear(cfg), {"quant": "stub", "fc": "fc"})


def test_linear_relu_output_must_be_mapped_after_the_relu():
    m = TorchCNN().train()
    m = tq.fuse_modules_qat(m, [["conv", "bn", "relu"], ["fc1", "relu1"]])
    m.qconfig = tq.get_default_qat_qconfig("x86")
    tq.prepare_qat(m, inplace=True)
    cfg = default_qat_qconfig("x86")
    with pytest.raises(ValueError, match=r"'fc1' is a LinearReLU.*map 'fc1.activation_post"):
        import_qat_state(m, qn.QuantLinear(4, 8, config=cfg, rngs=nnx.Rngs(0)), {"fc1": ""})
    # Never-run observers (empty per-channel min/max) import as "never observed".
    net = NnxCNN(cfg)
    mapping = {"quant": "stub", "conv": "conv", "fc1": "fc1"}
    mapping.update({"fc1.activation_post_process": "fc1_act", "fc2": "fc2"})
    import_qat_state(m, net, mapping)
    st = net.conv.quant_stats.get_value().weight
    assert isinstance(st, MinMaxState) and int(st.count) == 0
    assert np.all(np.isposinf(np.asarray(st.min_val))) and st.min_val.shape == (4,)
    with pytest.raises(ValueError, match="relu"):
        bad = NnxCNN(cfg)
        bad.conv.relu = False
        import_qat_state(m, bad, mapping)


def test_report_counts():
    """Runs last in this file: the number of values compared exactly above."""
    assert COUNTS["values"] > 0
    print(f"\nqat import parity: {COUNTS['values']} values, {COUNTS['qparams']} qparams equal")
