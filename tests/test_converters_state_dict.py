"""load_state_dict: PyTorch state_dicts (float and converted int8) onto qjax/Flax trees."""

import io

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from qjax.converters.state_dict import Loaded, Rule, load_state_dict

from qjax import QArray, QParams
from qjax.flax import Mode, default_qat_qconfig
from qjax.flax import nnx as qn

torch = pytest.importorskip("torch")
tq = pytest.importorskip("torch.ao.quantization")

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::UserWarning")

INV = {"linear": (1, 0), "conv2d": (3, 2, 0, 1)}  # Flax -> torch (inverse permutations)


class TorchFloat(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(2, 5, 3, padding=1)
        self.bn = torch.nn.BatchNorm2d(5)
        self.fc = torch.nn.Linear(4, 3)


TABLE = [
    (r"fc\.weight", "fc/kernel", "linear"),  # [out, in] -> [in, out]
    (r"fc\.bias", "fc/bias"),
    (r"conv\.weight", "cb/kernel", "conv2d"),  # [out, in, kh, kw] -> [kh, kw, in, out]
    (r"conv\.bias", "cb/bias"),
    Rule(r"bn\.weight", "cb/bn_scale"),
    (r"bn\.bias", "cb/bn_bias"),
    (r"bn\.running_(mean|var)", r"cb/bn_\1"),
    (r"bn\.num_batches_tracked", None),
]


class NnxQat(nnx.Module):
    def __init__(self, fc_out=3):
        cfg = default_qat_qconfig("x86")
        r = nnx.Rngs(0)
        self.fc = qn.QuantLinear(4, fc_out, config=cfg, rngs=r)
        self.cb = qn.QuantConvBn(2, 5, (3, 3), config=cfg, use_bias=True, rngs=r)


def _trained_float(seed=0):
    torch.manual_seed(seed)
    m = TorchFloat()
    with torch.no_grad():
        m.bn.running_mean.normal_()
        m.bn.running_var.uniform_(0.5, 2.0)
        m.bn.weight.normal_()
        m.bn.bias.normal_()
    return m


def _saved(obj) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def test_float_state_dict_into_nnx_qat_model_round_trip(tmp_path):
    m = _trained_float()
    path = tmp_path / "float.pt"
    torch.save(m.state_dict(), path)
    net = NnxQat()
    out = load_state_dict(path, net, TABLE)
    assert out.tree is net and out.missing == [] and out.extra == {}
    assert out.loaded["cb/kernel"] == "conv.weight (conv2d: [out, in, kh, kw] -> [kh, kw, in, out])"
    n = 0
    sd = m.state_dict()
    pairs = [
        ("fc/kernel", "fc.weight", "linear"),
        ("fc/bias", "fc.bias", None),
        ("cb/kernel", "conv.weight", "conv2d"),
        ("cb/bias", "conv.bias", None),
        ("cb/bn_scale", "bn.weight", None),
        ("cb/bn_bias", "bn.bias", None),
        ("cb/bn_mean", "bn.running_mean", None),
        ("cb/bn_var", "bn.running_var", None),
    ]
    for qpath, key, lay in pairs:
        mod, name = qpath.split("/")
        v = np.asarray(getattr(getattr(net, mod), name)[...])
        back = v if lay is None else v.transpose(INV[lay])  # the round trip back to torch
        np.testing.assert_array_equal(back, sd[key].numpy(), err_msg=qpath)
        n += v.size
    assert n == 12 + 3 + 90 + 5 + 4 * 5
    # The loaded float weights are what the QAT layer computes with (FLOAT mode).
    qn.set_mode(net, Mode.FLOAT)
    x = np.random.default_rng(0).standard_normal((6, 4)).astype(np.float32)
    with torch.no_grad():
        yt = m.fc(torch.from_numpy(x)).numpy()
    # float32 matmuls sum in different orders: a few ulp apart (measured <= 2.4e-7).
    np.testing.assert_allclose(np.asarray(net.fc(jnp.asarray(x))), yt, rtol=1e-6, atol=1e-6)


def test_linen_abstract_target_from_eval_shape():
    class Net(nn.Module):
        @nn.compact
        def __call__(self, x, train=False):
            x = nn.Conv(5, (3, 3), name="conv")(x)
            x = nn.BatchNorm(use_running_average=not train, name="bn")(x)
            return nn.Dense(3, name="fc")(x.mean((1, 2))[:, :4])

    abstract = jax.eval_shape(Net().init, jax.random.key(0), jnp.zeros((1, 6, 6, 2)))
    table = [
        (r"(conv|fc)\.weight", r"params/\1/kernel", "auto"),
        (r"(conv|fc)\.bias", r"params/\1/bias"),
        (r"bn\.weight", "params/bn/scale"),
        (r"bn\.bias", "params/bn/bias"),
        (r"bn\.running_mean", "batch_stats/bn/mean"),
        (r"bn\.running_var", "batch_stats/bn/var"),
        (r".*num_batches_tracked", None),
    ]
    m = _trained_float(1)
    out = load_state_dict(io.BytesIO(_saved(m.state_dict())), abstract, table)
    v = out.tree
    kernel = m.conv.weight.detach().numpy().transpose(2, 3, 1, 0)
    np.testing.assert_array_equal(v["params"]["conv"]["kernel"], kernel)
    np.testing.assert_array_equal(v["batch_stats"]["bn"]["var"], m.bn.running_var.numpy())
    assert "auto" not in out.loaded["params/fc/kernel"]
    assert out.loaded["params/fc/kernel"].endswith("(linear: [out, in] -> [in, out])")
    y = Net().apply(v, jnp.ones((1, 6, 6, 2)))
    assert y.shape == (1, 3)


def test_nnx_state_target():
    lin = nnx.Linear(4, 3, rngs=nnx.Rngs(0))
    params = nnx.state(lin, nnx.Param)
    sd = _trained_float().state_dict()
    table = [(r"fc\.weight", "kernel", "linear"), (r"fc\.bias", "bias"), (r"(conv|bn)\..*", None)]
    out = load_state_dict(sd, params, table)
    assert out.tree is params
    nnx.update(lin, params)
    np.testing.assert_array_equal(np.asarray(lin.kernel[...]), sd["fc.weight"].numpy().T)


def test_missing_and_extra_named_on_both_sides():
    sd = _trained_float().state_dict()
    net = NnxQat()
    table = [r for r in TABLE if not r[0].startswith(r"fc\.b")] + [(r"extra\.(.*)", r"ex/\1")]
    sd = {**sd, "extra.w": torch.ones(2)}
    with pytest.raises(ValueError) as e:
        load_state_dict(sd, net, table)
    msg = str(e.value)
    assert "torch keys not loaded: fc.bias (no table rule), extra.w (target has no 'ex/w')" in msg
    assert "target paths not filled: fc/bias" in msg
    before = np.asarray(net.fc.bias[...]).copy()
    out = load_state_dict(sd, net, table, strict=False)
    assert isinstance(out, Loaded) and out.missing == ["fc/bias"]
    assert set(out.extra) == {"fc.bias", "extra.w"}
    np.testing.assert_array_equal(np.asarray(net.fc.bias[...]), before)  # left as it was


def test_shape_dtype_kind_and_table_errors_are_named():
    sd = _trained_float().state_dict()
    msg = r"'fc.weight' has shape \[4, 3\] after linear flip, target 'fc/kernel' has \[4, 2\]"
    with pytest.raises(ValueError, match=msg):
        load_state_dict(sd, NnxQat(fc_out=2), TABLE)
    sd64 = {**sd, "fc.bias": sd["fc.bias"].double()}
    msg = r"'fc.bias' has dtype float64, target 'fc/bias' has float32 \(pass cast=True"
    with pytest.raises(ValueError, match=msg):
        load_state_dict(sd64, NnxQat(), TABLE)
    net = NnxQat()
    load_state_dict(sd64, net, TABLE, cast=True)
    assert net.fc.bias[...].dtype == jnp.float32
    with pytest.raises(ValueError, match=r"both map to 'cb/bn_mean'"):
        load_state_dict(sd, NnxQat(), [(r"bn\.running_.*", "cb/bn_mean")] + TABLE)
    with pytest.raises(ValueError, match="unknown layout 'nchw'"):
        load_state_dict(sd, NnxQat(), [(r".*", "x", "nchw")])
    with pytest.raises(ValueError, match="bad pattern"):
        load_state_dict(sd, NnxQat(), [("(", "x")])
    with pytest.raises(TypeError, match=r"table\[0\] must be"):
        load_state_dict(sd, NnxQat(), ["fc.weight"])
    with pytest.raises(ValueError, match=r"torch 'fc.bias': layout linear .* needs a 2-D tensor"):
        load_state_dict(sd, NnxQat(), [(r"fc\.bias", "fc/bias", "linear")], strict=False)
    with pytest.raises(TypeError, match="target must be"):
        load_state_dict(sd, [1, 2], TABLE)


# --------------------------------------------------------------------------------------
# a converted eager model (NUMERICS rule 20)


class TorchEager(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.quant = tq.QuantStub()
        self.conv = torch.nn.Conv2d(2, 3, 3)
        self.fc = torch.nn.Linear(3, 4)
        self.dequant = tq.DeQuantStub()

    def forward(self, x):
        return self.dequant(self.fc(self.conv(self.quant(x)).mean((2, 3))))


CONVERTED_TABLE = [
    (r"quant\.qparams", "stub/qparams"),
    (r"conv\.weight", "conv/kernel", "conv2d"),
    (r"fc\.weight", "fc/kernel", "linear"),
    (r"(conv|fc)\.bias", r"\1/bias"),
    (r"(conv|fc)\.qparams", r"\1/out"),
]


def _converted():
    torch.backends.quantized.engine = "x86"
    torch.manual_seed(0)
    m = TorchEager().eval()
    m.qconfig = tq.get_default_qconfig("x86")
    tq.prepare(m, inplace=True)
    m(torch.randn(8, 2, 5, 5))
    return tq.convert(m)


def test_converted_eager_state_dict_to_qarrays(tmp_path):
    qm = _converted()
    path = tmp_path / "int8.pt"
    torch.save(qm.state_dict(), path)
    out = load_state_dict(str(path), None, CONVERTED_TABLE)
    t = out.tree
    checked = 0
    for name, perm in (("conv", (2, 3, 1, 0)), ("fc", (1, 0))):
        w = getattr(qm, name).weight()
        k = t[name]["kernel"]
        assert isinstance(k, QArray) and k.spec.axis == -1 and k.values.dtype == jnp.int8
        np.testing.assert_array_equal(k.values, w.int_repr().numpy().transpose(perm))
        np.testing.assert_array_equal(k.scale, w.q_per_channel_scales().numpy().astype(np.float32))
        np.testing.assert_array_equal(k.zero_point, w.q_per_channel_zero_points().numpy())
        # float64 torch scales are float32 values: dequantized weights agree exactly
        np.testing.assert_array_equal(k.dequantize(), w.dequantize().numpy().transpose(perm))
        np.testing.assert_array_equal(t[name]["bias"], getattr(qm, name).bias().detach().numpy())
        qp = t[name]["out"]
        assert isinstance(qp, QParams) and not qp.spec.signed
        assert float(qp.scale) == np.float32(getattr(qm, name).scale)
        assert int(qp.zero_point) == getattr(qm, name).zero_point
        checked += 3 * k.values.size + 2 * k.scale.size + 2
    assert float(t["stub"]["qparams"].scale) == np.float32(qm.quant.scale.item())
    assert checked == 3 * (54 + 12) + 2 * (3 + 4) + 4
    # A target with QArray leaves checks the codes' shape and dtype; a float target names
    # the kind mismatch.
    fc_w = t["fc"]["kernel"]
    target = {"fc": {"kernel": jax.eval_shape(lambda: fc_w)}}
    table = [(r"fc\.weight", "fc/kernel", "linear"), (r".*", None)]
    assert isinstance(load_state_dict(path, target, table).tree["fc"]["kernel"], QArray)
    msg = r"'fc.weight' is QArray int8\[3, 4\], target 'fc/kernel' is float32\[3, 4\]"
    with pytest.raises(ValueError, match=msg):
        load_state_dict(path, {"fc": {"kernel": jnp.zeros((3, 4))}}, table)


def _per_channel(w, scales):
    """``w`` (a per-channel qint8 tensor) with other scales (torch accepts any double)."""
    s = torch.tensor(scales, dtype=torch.double)
    return torch._make_per_channel_quantized_tensor(
        w.int_repr(), s, w.q_per_channel_zero_points(), w.q_per_channel_axis()
    )


def _put(key, value):
    def edit(sd):
        sd[key] = value

    return edit


def _weight_scales(scales):
    def edit(sd):
        sd["conv.weight"] = _per_channel(sd["conv.weight"], scales)

    return edit


def _packed(scales=None, bias=None):
    def edit(sd):
        w, b = sd["fc._packed_params._packed_params"]
        if scales is not None:
            w = _per_channel(w, scales)
        if bias is not None:
            b = torch.tensor(bias, dtype=torch.float32)
        sd["fc._packed_params._packed_params"] = (w, b)

    return edit


NAN, INF = float("nan"), float("inf")
SD_TAMPERED = [  # (case, edit, message)
    (
        "stub scale NaN",
        _put("quant.scale", torch.tensor([NAN])),
        r"'quant.scale'.* scale must be finite and > 0, got nan",
    ),
    (
        "stub scale -0.05",
        _put("quant.scale", torch.tensor([-0.05])),
        r"'quant.scale'.*finite and > 0, got -0.05",
    ),
    (
        "stub scale inf",
        _put("quant.scale", torch.tensor([INF])),
        r"'quant.scale'.*finite and > 0, got inf",
    ),
    (
        "stub scale 1e300 (inf in float32)",
        _put("quant.scale", torch.tensor([1e300], dtype=torch.float64)),
        r"'quant.scale'.*got inf",
    ),
    ("output scale 0", _put("fc.scale", torch.tensor(0.0)), r"'fc.scale'.*finite and > 0, got 0.0"),
    (
        "output scale -1",
        _put("conv.scale", torch.tensor(-1.0)),
        r"'conv.scale'.*finite and > 0, got -1.0",
    ),
    (
        "output zero point 700",
        _put("fc.zero_point", torch.tensor(700)),
        r"'fc.(scale|zero_point)'.*zero_point 700 is outside the spec range \[0, 255\]",
    ),
    (
        "conv weight scale NaN",
        _weight_scales([NAN, 0.1, 0.1]),
        r"'conv.weight'.*scale must be finite and > 0, got \[nan\]",
    ),
    (
        "conv weight scale negative",
        _weight_scales([0.1, -0.5, 0.1]),
        r"'conv.weight'.*got \[-0.5\]",
    ),
    ("conv weight scale 0", _weight_scales([0.1, 0.1, 0.0]), r"'conv.weight'.*got \[0.0\]"),
    (
        "linear weight scale NaN",
        _packed(scales=[0.1, NAN, 0.1, 0.1]),
        r"'fc._packed_params._packed_params'.*got \[nan\]",
    ),
    (
        "linear bias NaN",
        _packed(bias=[0.0, NAN, 0.0, 0.0]),
        r"'fc._packed_params._packed_params'.*bias must be finite, got nan",
    ),
    (
        "conv bias inf",
        _put("conv.bias", torch.tensor([0.0, INF, 0.0])),
        r"'conv.bias'.*bias must be finite, got inf",
    ),
]


@pytest.mark.parametrize(
    "edit, pattern", [c[1:] for c in SD_TAMPERED], ids=[c[0] for c in SD_TAMPERED]
)
def test_converted_state_dict_with_bad_qparams_is_refused(tmp_path, edit, pattern):
    sd = dict(_converted().state_dict())
    edit(sd)
    path = tmp_path / "bad.pt"
    torch.save(sd, path)  # a file, read with weights_only=True like any other
    with pytest.raises(ValueError, match=pattern):
        load_state_dict(path, None, CONVERTED_TABLE)


# --------------------------------------------------------------------------------------
# files: weights_only always, trusted only on request, clean errors for bad bytes


def test_pickled_module_needs_trusted(tmp_path, monkeypatch):
    module = torch.nn.Sequential(torch.nn.Linear(3, 2))
    path = tmp_path / "module.pt"
    torch.save(module, path)
    calls = []
    real_load = torch.load

    def spy(*a, **k):
        calls.append(k.get("weights_only"))
        return real_load(*a, **k)

    monkeypatch.setattr(torch, "load", spy)
    with pytest.raises(
        ValueError, match=r"module.pt: holds Python objects \(torch.nn.*trusted=True"
    ):
        load_state_dict(path, None, [(r"0\.(.*)", r"fc/\1")])
    assert calls == [True]
    table = [(r"0\.weight", "fc/kernel", "linear"), (r"0\.bias", "fc/bias")]
    out = load_state_dict(path, None, table, trusted=True)
    assert calls == [True, True, False]
    np.testing.assert_array_equal(out.tree["fc"]["kernel"], module[0].weight.detach().numpy().T)


def test_file_errors_are_named(tmp_path):
    with pytest.raises(ValueError, match="'nope.pt': no such file"):
        load_state_dict("nope.pt", None, [])
    (tmp_path / "t.pt").write_bytes(_saved(torch.ones(3)))
    with pytest.raises(TypeError, match="holds a Tensor, not a state_dict"):
        load_state_dict(tmp_path / "t.pt", None, [])
    (tmp_path / "ck.pt").write_bytes(_saved({"model": {"w": torch.ones(1)}, "epoch": 3}))
    with pytest.raises(
        TypeError, match=r"entry 'model' is a nested mapping.*checkpoint\['model'\]"
    ):
        load_state_dict(tmp_path / "ck.pt", None, [])
    with pytest.raises(TypeError, match="source must be"):
        load_state_dict(3.5, None, [])
    with pytest.raises(TypeError, match="entry 'x' is a str, not a tensor"):
        load_state_dict({"x": "hello"}, None, [(r".*", "x")])


_VALID = None


def _valid_bytes():
    global _VALID
    if _VALID is None:
        _VALID = _saved(_trained_float().state_dict())
    return _VALID


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=2048))
def test_fuzz_random_bytes_give_named_errors(data):
    # (a pickle GLOBAL opcode with a dotted name would be reported as "holds Python objects")
    with pytest.raises(ValueError, match="^<file object>: (not a readable PyTorch file|holds)"):
        load_state_dict(io.BytesIO(data), None, [(r".*", None)])


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_fuzz_truncated_and_corrupted_files_give_named_errors(data):
    raw = bytearray(_valid_bytes())
    cut = data.draw(st.integers(0, len(raw) - 1), label="cut")
    flips = data.draw(st.lists(st.integers(0, len(raw) - 1), max_size=4), label="flips")
    if data.draw(st.booleans(), label="truncate") or not flips:
        raw = raw[:cut]
    for i in flips:
        if i < len(raw):
            raw[i] ^= 0xFF
    try:
        out = load_state_dict(io.BytesIO(bytes(raw)), None, [(r".*", None)])
    except ValueError as e:  # the file is unreadable: a clean, named error
        assert "<file object>" in str(e)
    else:  # a flip landed in tensor data (zip entries are not checksummed by torch)
        assert isinstance(out, Loaded)
