"""``kernel="xla" | "amx" | "onednn" | "auto"`` at the model level: served Flax models,
save/load, the torch importer and pt2e.

* ``qjax.convert(kernel="amx")`` == ``kernel="xla"`` exactly (output floats, hence codes)
  on a calibrated conv-BN-ReLU-pool-dense NNX model, an MLP and a Linen CNN, and
  ``served.kernels`` names every layer "amx";
* ``import_model(kernel="amx")`` on an eager converted CNN (conv+relu, depthwise conv,
  1x1 conv, add, max pool, linear): ``program.trace`` == torch's own codes at run time
  (0 mismatches) and == the XLA-kernel program, engines fbgemm and x86; the depthwise
  layer is reported "xla";
* ``kernel="onednn"`` (where exact on this CPU): served NNX CNN (slow run: MLP) == XLA,
  its dense layer and (on the brgemm ukernel) its convs on oneDNN; ``import_model`` on the
  torch CNN == torch's codes and the XLA program, engines fbgemm and x86, every exactly
  accumulated layer on oneDNN (the saturating depthwise 3x3 of fbgemm on sat16); skipped
  with the reason where the library is missing;
* ``kernel="auto"``; errors: unknown kernel name, unavailable native kernel (probe
  monkeypatched) names the model-level call and the reason; save -> load(kernel="amx").

The AMX comparisons need the native kernel (:func:`qjax.kernels.native_status`) and
are skipped with its reason on machines without it; the rest runs everywhere. Counts are
printed (``pytest -s``).
"""

from __future__ import annotations

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from qjax.converters import torch as qtorch
from qjax.converters.onnx import export_onnx
from torch import nn
from torch.ao import quantization as tq

import qjax
from qjax.flax import default_qat_qconfig
from qjax.flax import linen as qlinen
from qjax.flax import nnx as qnnx
from qjax.kernels import _native, native_status, onednn_exact
from qjax.kernels._native import _sat16
from qjax.kernels._native._quantize import quantize_status

_OK, _REASON = native_status()
amx = pytest.mark.skipif(not _OK, reason=f"native AMX kernel unavailable: {_REASON}")
_DNN, _DNN_REASON = onednn_exact()
_DNN_CONV = _DNN and _native.onednn_fused()  # convolutions need the brgemm ukernel
onednn = pytest.mark.skipif(not _DNN, reason=f"oneDNN int8 matmul unavailable: {_DNN_REASON}")


def _cfg():
    return default_qat_qconfig("x86").replace(quantize_input=True, scheme="fbgemm")


def _data(shape, n=2, seed=0):
    rng = np.random.default_rng(seed)  # numpy: no eager XLA compiles for test data
    return [jnp.asarray(rng.normal(size=shape) * 2.0, jnp.float32) for _ in range(n)]


def _calibrated(model, shape):
    for _, m in nnx.iter_modules(model):
        if isinstance(m, qnnx.QuantConvBn):  # BN away from identity
            g, b = _data(m.bn_scale.shape, seed=1)
            m.bn_scale[...] = 1.0 + 0.15 * g
            m.bn_bias[...] = 0.1 * b
    qnnx.calibrate(model, _data(shape), progress=False)
    if any(isinstance(m, qnnx.QuantConvBn) for _, m in nnx.iter_modules(model)):
        qnnx.freeze_bn_stats(model)
    return model


@pytest.fixture(scope="module")
def nnx_cnn():
    model, x = _cnn(_cfg())
    return model, x, qjax.convert(model, x)  # served on XLA, compiled for x's shape


def _cnn(cfg):
    """The calibrated NNX CNN (two conv-BN-ReLU, max pool, dense) and an input."""
    r = nnx.Rngs(0)
    model = nnx.Sequential(
        qnnx.QuantStub(cfg),
        qnnx.QuantConvBn(3, 16, (3, 3), config=cfg, relu=True, rngs=r),
        qnnx.QuantConvBn(16, 20, (3, 3), config=cfg, relu=True, padding="SAME", rngs=r),
        qnnx.MaxPool((2, 2)),
        qnnx.Flatten(),
        qnnx.QuantLinear(5 * 5 * 20, 7, config=cfg, rngs=r),
        qnnx.DeQuantStub(),
    )
    return _calibrated(model, (16, 10, 10, 3)), _data((48, 10, 10, 3), n=1, seed=5)[0]


@pytest.fixture(scope="module")
def nnx_mlp():
    cfg, r = _cfg(), nnx.Rngs(1)
    model = nnx.Sequential(
        qnnx.QuantStub(cfg),
        qnnx.QuantLinear(40, 70, config=cfg, rngs=r),
        nnx.relu,
        qnnx.QuantLinear(70, 33, config=cfg, rngs=r),
        nnx.relu,
        qnnx.QuantLinear(33, 5, config=cfg, rngs=r),
        qnnx.DeQuantStub(),
    )
    x = _data((100, 40), n=1, seed=6)[0]
    model = _calibrated(model, (64, 40))
    return model, x, qjax.convert(model, x)


def _exact(a, b) -> tuple[int, int]:
    a, b = np.asarray(a), np.asarray(b)
    assert a.shape == b.shape and a.dtype == b.dtype == np.float32
    return a.size, int((a != b).sum())


@amx
@pytest.mark.parametrize(
    "which",
    # the MLP's own calibrate/convert compiles take ~40 s on the loaded 2-core machine;
    # the CNN runs both kernels (2-D conv and linear) by default
    ["nnx_cnn", pytest.param("nnx_mlp", marks=pytest.mark.slow)],
)
def test_served_amx_equals_served_xla(which, request):
    model, x, xla = request.getfixturevalue(which)
    fast = qjax.convert(model, x, kernel="amx")
    assert set(xla.kernels.values()) == {"xla"}
    assert set(fast.kernels.values()) == {"amx"} and fast.kernels.keys() == xla.kernels.keys()
    n, mism = _exact(fast(x), xla(x))
    print(f"{which}: served amx vs xla: {mism} of {n} outputs differ")
    assert n > 300 and mism == 0
    # the AMX program really calls the native kernel, the XLA one does not
    assert "custom_call @qjax_amx_" in jax.jit(fast).lower(x).as_text()
    assert "custom_call @qjax_amx_" not in jax.jit(xla).lower(x).as_text()


@amx
@pytest.mark.slow  # Linen shares convert's layer code with NNX; its own compiles take ~30 s
def test_linen_served_amx_equals_xla():
    import flax.linen as nn_linen

    cfg = _cfg()
    model = nn_linen.Sequential(
        [
            qlinen.QuantStub(cfg),
            qlinen.QuantConvBn(16, (3, 3), config=cfg, relu=True, use_running_average=True),
            qlinen.MaxPool((2, 2)),
            qlinen.Flatten(),
            qlinen.QuantDense(5, config=cfg),
            qlinen.DeQuantStub(),
        ]
    )
    xs = _data((16, 8, 8, 2))
    variables = model.init(jax.random.key(0), xs[0])
    variables, _ = qlinen.calibrate(
        model, variables, xs, progress=False, mode=qjax.flax.Mode.CALIBRATE
    )
    fast = qjax.convert((model, variables), xs[0][:1], kernel="amx")
    xla = qjax.convert((model, variables), xs[0][:1])
    assert set(fast.kernels.values()) == {"amx"} and len(fast.kernels) == 2
    n, mism = _exact(fast(xs[1]), xla(xs[1]))
    print(f"linen cnn: served amx vs xla: {mism} of {n} outputs differ")
    assert mism == 0


@onednn
@pytest.mark.parametrize("which", ["nnx_cnn", pytest.param("nnx_mlp", marks=pytest.mark.slow)])
def test_served_onednn_equals_served_xla(which, request, tmp_path):
    """Linear layers on oneDNN, convolutions too where the provider is the ukernel."""
    model, x, xla = request.getfixturevalue(which)
    fast = qjax.convert(model, x, kernel="onednn")
    dense = [k for k, v in fast.kernels.items() if v == "onednn"]
    assert dense and set(fast.kernels.values()) <= {"onednn", "xla"}
    if _DNN_CONV:  # every layer of these models accumulates exactly
        assert set(fast.kernels.values()) == {"onednn"}
    n, mism = _exact(fast(x), xla(x))
    print(f"{which}: served onednn ({len(dense)} layers) vs xla: {mism} of {n} outputs differ")
    assert n > 300 and mism == 0
    hlo = jax.jit(fast).lower(x).as_text()
    assert "custom_call @qjax_onednn_" in hlo
    # the QuantStub, the max pool on codes and the DeQuantStub: native calls too
    native = ("qjax_quantize_product", "qjax_max_pool_nhwc", "qjax_dequantize")
    assert all(t in hlo for t in native) == (which == "nnx_cnn" and quantize_status()[0])
    with pytest.raises(ValueError, match="qjax_onednn_"):
        jax.export.export(jax.jit(fast))(jax.ShapeDtypeStruct(x.shape, x.dtype))
    # saved and loaded with the kernel: the same outputs; the file does not hold it
    qjax.save_served(tmp_path / "m.safetensors", fast)
    again = qjax.load_served(tmp_path / "m.safetensors", kernel="onednn")
    assert again.kernels == fast.kernels and _exact(again(x), fast(x))[1] == 0
    assert jax.jit(again).lower(x).as_text().count("custom_call") == hlo.count("custom_call")
    plain = qjax.load_served(tmp_path / "m.safetensors")
    assert "custom_call" not in jax.jit(plain).lower(x).as_text()
    assert _exact(plain(x), fast(x))[1] == 0
    # ONNX: the native steps are written as what they compute, the XLA program's graph
    ops = [[n.op_type for n in export_onnx(p, (x,)).graph.node] for p in (fast, plain)]
    assert ops[0] == ops[1] and ("MaxPool" in ops[0]) == (which == "nnx_cnn")


def test_auto_and_xla_default(nnx_cnn):
    model, x, xla = nnx_cnn
    auto = qjax.convert(model, x, kernel="auto")
    # below VNNI (no AMX, no exact oneDNN) the model's 7-bit layers go to sat16
    sat = "sat16" if _native.sat16_status()[0] else "xla"
    conv = "amx" if _OK else ("onednn" if _DNN_CONV else ("xla" if _DNN else sat))
    dense = "onednn" if _DNN and not _OK else conv  # AMX machines keep AMX
    assert len(auto.kernels) == 3  # 2 convs, 1 dense
    assert list(auto.kernels.values()) == [conv, conv, dense]
    assert set(xla.kernels.values()) == {"xla"}
    n, mism = _exact(auto(x), xla(x))
    assert mism == 0
    # the default stays exportable
    exp = jax.export.export(jax.jit(xla))(jax.ShapeDtypeStruct(x.shape, x.dtype))
    assert _native.TARGET not in exp.mlir_module()


def test_unknown_kernel_name_is_named(nnx_cnn):
    model, x, _ = nnx_cnn
    with pytest.raises(ValueError, match=r"qjax.convert: kernel must be one of .*'tpu'"):
        qjax.convert(model, x[:1], kernel="tpu")
    with pytest.raises(ValueError, match=r"import_model: kernel must be one of .*'AMX'"):
        qtorch.import_model(nn.Identity(), (torch.zeros(1),), kernel="AMX")


def test_unavailable_native_kernel_names_call_and_reason(nnx_cnn, tmp_path, monkeypatch):
    model, x, served = nnx_cnn
    path = tmp_path / "m.safetensors"
    qjax.save_served(path, served)
    monkeypatch.setattr(_native, "native_status", lambda: (False, "CPU lacks amx_int8 (test)"))
    no_dnn = (False, "the optional oneDNN library is not installed (test)")
    monkeypatch.setattr(_native, "onednn_status", lambda: no_dnn)
    monkeypatch.setattr(_native, "onednn_exact", lambda: no_dnn)
    with pytest.raises(RuntimeError, match=r"qjax.convert\(kernel='amx'\).*amx_int8 \(test\)"):
        qjax.convert(model, x, kernel="amx")
    with pytest.raises(RuntimeError, match=r"qjax.load_served\(kernel='amx'\).*\(test\)"):
        qjax.load_served(path, kernel="amx")
    with pytest.raises(RuntimeError, match=r"import_model\(kernel='amx'\).*\(test\)"):
        qtorch.import_model(nn.Identity(), (torch.zeros(1),), kernel="amx")
    with pytest.raises(RuntimeError, match=r"qjax.convert\(kernel='onednn'\).*not installed"):
        qjax.convert(model, x, kernel="onednn")
    # auto never raises (qjax.convert: test_below_vnni_...); every layer reads 7-bit
    # codes (the file's steps say so): sat16 where it runs, as qjax.convert puts it
    sat = "sat16" if _native.sat16_status()[0] else "xla"
    loaded = qjax.load_served(path, kernel="auto")
    assert list(loaded.kernels.values()) == [sat] * 3
    n, mism = _exact(loaded(x), served(x))
    assert n == 48 * 7 and mism == 0


def _below_vnni(monkeypatch):
    """This process decides kernels as on a CPU without VNNI or AMX (oneDNN refuses)."""
    monkeypatch.setattr(_native, "native_status", lambda: (False, "CPU lacks amx_int8 (test)"))
    no_dnn = (False, "CPU lacks avx512_vnni: oneDNN's ukernel refuses (test)")
    monkeypatch.setattr(_native, "onednn_exact", lambda: no_dnn)


_SAT16 = pytest.mark.skipif(not _native.sat16_status()[0], reason=_native.sat16_status()[1])


def _seven_eight():
    seven = _cfg()  # torch's x86 qconfig: reduce_range activations, codes 0..127
    assert seven.activation.qmax == 127
    return seven, seven.replace(activation=seven.activation.replace(reduce_range=False))


def _small_mlp(cfg):
    r = nnx.Rngs(3)
    model = nnx.Sequential(
        qnnx.QuantStub(cfg),
        qnnx.QuantLinear(40, 64, config=cfg, rngs=r),
        nnx.relu,
        qnnx.QuantLinear(64, 5, config=cfg, rngs=r),
        qnnx.DeQuantStub(),
    )
    qnnx.calibrate(model, _data((64, 40), n=1), progress=False)
    return model, _data((50, 40), n=1, seed=7)[0]


def test_below_vnni_exact_layers_take_sat16(nnx_cnn, monkeypatch):
    # 7-bit activations (torch's x86 qconfig, reduce_range): no int16 pair sum can
    # saturate, so kernel="auto" (and None) put the convs (one group) and the dense layer
    # on sat16's saturating instructions with XLA's codes, each one call with its
    # requantization folded (the first conv's 3 channels read in place with a zero one).
    # 8-bit activations with the same weight codes could saturate: the convs on sat16's
    # exact (widened) mode, the dense layer too with the kernel's AVX-512 code, on XLA
    # with its AVX2 code (the same CNN: the next test)
    from qjax.kernels._accumulate import sat16_conv_max_x, sat16_exact_max_x
    from qjax.kernels._choice import conv_kernel, linear_kernel

    model, x, xla = nnx_cnn
    _below_vnni(monkeypatch)
    seven, eight = _seven_eight()
    auto = qjax.convert(model, x, kernel="auto")  # never raises
    sat = "sat16" if _native.sat16_status()[0] else "xla"
    assert list(auto.kernels.values()) == [sat] * 3
    n, mism = _exact(auto(x), xla(x))
    print(f"\nCNN below VNNI on {sat}: {mism} of {n} outputs differ from XLA's")
    assert n == 48 * 7 and mism == 0
    if sat == "xla":
        return
    text = jax.jit(auto).lower(x).as_text()
    assert text.count("custom_call @qjax_sat16_q8_gemm") == 1  # the dense layer
    assert text.count("custom_call @qjax_sat16_q8_conv") == 2 and "qjax_sat16_gemm" not in text
    assert "exact = 1" not in text  # every layer on the saturating instructions
    (p,) = _prepared(auto)
    w = p.weight.values
    assert linear_kernel("default", x_spec=seven.activation, w=w) == "sat16"
    for isa in _sat16.sat16_isas():
        monkeypatch.setenv(_sat16.ISA_ENV, isa)
        want = "xla" if isa == "avx2" else "sat16"
        assert linear_kernel("auto", x_spec=eight.activation, w=w) == want, isa
    assert linear_kernel("auto", w=w) == "xla"  # the codes' spec unknown (torch imports)
    assert sat16_exact_max_x(w) < 255  # why: a pair of this weight can saturate
    wc = _prepared(auto, qjax.kernels.PreparedConv)[0].weight.values
    assert sat16_conv_max_x(wc) < 255
    assert conv_kernel("auto", 2, x_spec=seven.activation, w=wc) == "sat16"
    assert conv_kernel("auto", 2, x_spec=eight.activation, w=wc) == "sat16"  # widened
    assert conv_kernel("auto", 2, x_spec=eight.activation) == "xla"  # weight unknown
    assert conv_kernel("auto", 2, groups=2, x_spec=seven.activation, w=wc) == "xla"
    signed = qjax.QuantSpec(signed=True)  # int8 codes: the conv reads uint8 only
    assert conv_kernel("auto", 2, x_spec=signed, w=wc) == "xla"
    monkeypatch.undo()  # with an exact VNNI kernel here, oneDNN keeps the layers
    if not _native.native_status()[0]:  # (AMX machines: the AMX kernel)
        assert linear_kernel("auto", x_spec=seven.activation, w=w) == (
            "onednn" if _DNN else "sat16"
        )
        on_vnni = conv_kernel("auto", 2, x_spec=seven.activation, w=wc)
        assert on_vnni == ("onednn" if _DNN_CONV else "sat16")


@_SAT16
def test_below_vnni_8bit_cnn_convs_on_sat16_exact_mode(monkeypatch):
    # the CNN with 8-bit activations below VNNI with the sat16 kernel's AVX2 code:
    # kernel="auto" puts the convs (one group, uint8 codes) on its exact mode (the codes
    # widened to int16 pairs), one fused call each, and the dense layer on XLA; XLA's
    # outputs
    _below_vnni(monkeypatch)
    monkeypatch.setenv(_sat16.ISA_ENV, "avx2")
    model, x = _cnn(_seven_eight()[1])
    auto = qjax.convert(model, x, kernel="auto")
    assert list(auto.kernels.values()) == ["sat16", "sat16", "xla"], auto.kernels
    text = jax.jit(auto).lower(x).as_text()
    assert text.count("custom_call @qjax_sat16_q8_conv") == 2
    assert "exact = 1" in text  # a weight whose pairs 8-bit codes could saturate
    n, mism = _exact(auto(x), qjax.convert(model, x)(x))
    print(f"\n8-bit CNN below VNNI, convs on sat16's exact mode: {mism} of {n} differ")
    assert n == 48 * 7 and mism == 0


@_SAT16
@pytest.mark.slow  # two calibrates + three converts (~9 s on the loaded 2-core machine)
def test_below_vnni_mlp_7bit_and_8bit(monkeypatch):
    _below_vnni(monkeypatch)
    seven, eight = _seven_eight()
    eight_on = "xla" if _sat16.sat16_isa() == "avx2" else "sat16"  # exact mode: AVX-512
    for cfg, want in ((seven, "sat16"), (eight, eight_on)):
        model, x = _small_mlp(cfg)
        auto = qjax.convert(model, x, kernel="auto")
        assert set(auto.kernels.values()) == {want}, (cfg.activation, auto.kernels)
        n, mism = _exact(auto(x), qjax.convert(model, x)(x))
        print(f"\n{cfg.activation.qmax + 1}-code MLP below VNNI on {want}: {mism} of {n} differ")
        assert n == 250 and mism == 0


@pytest.mark.parametrize("bits", [7, 8])
def test_below_vnni_load_served_takes_convert_kernels(bits, monkeypatch, tmp_path):
    # a program file records no kernel, but its steps give the spec of the codes each
    # layer reads: loaded back below VNNI, each layer takes qjax.convert's kernel. 7-bit
    # model: the first layer quantizes its input to 7 bits, the second has no input
    # quantizer and reads the first one's 7-bit output codes (sat16 both), the third
    # quantizes to 8 bits (XLA with the sat16 kernel's AVX2 code, its exact mode with its
    # AVX-512 code); 8-bit model: the same throughout. The same integers either way
    _below_vnni(monkeypatch)
    seven, eight = _seven_eight()
    cfg = seven if bits == 7 else eight
    # no input quantizer on the second layer: it reads the codes the first one wrote
    plain = cfg.replace(quantize_input=False, scheme=None)
    r = nnx.Rngs(4)
    model = nnx.Sequential(
        qnnx.QuantStub(cfg),
        qnnx.QuantLinear(24, 32, config=cfg, rngs=r),
        nnx.relu,
        qnnx.QuantLinear(32, 16, config=plain, rngs=r),
        qnnx.QuantLinear(16, 5, config=eight, rngs=r),
        qnnx.DeQuantStub(),
    )
    qnnx.calibrate(model, _data((32, 24), n=1), progress=False)
    x = _data((20, 24), n=1, seed=7)[0]
    sat = "sat16" if _native.sat16_status()[0] else "xla"
    eight_on = "xla" if _sat16.sat16_isa() == "avx2" else sat  # exact mode: AVX-512
    want = [sat, sat, eight_on] if bits == 7 else [eight_on] * 3
    path = tmp_path / "mlp.safetensors"
    served = {k: qjax.convert(model, x, kernel=k) for k in ("auto", None, "xla")}
    qjax.save_served(path, served["xla"])
    y = np.asarray(served["xla"](x))
    for k, conv in served.items():
        again = qjax.load_served(path, kernel=k)
        assert list(conv.kernels.values()) == (["xla"] * 3 if k == "xla" else want)
        assert again.kernels == conv.kernels, (k, again.kernels, conv.kernels)
        assert _exact(again(x), y) == (100, 0) and _exact(conv(x), y) == (100, 0)
    assert set(qjax.load_served(path).kernels.values()) == {"xla"}  # the default: "xla"


def _prepared(served, cls=qjax.kernels.PreparedLinear) -> list:
    leaves = jax.tree_util.tree_leaves(served.params, is_leaf=lambda v: isinstance(v, cls))
    return [v for v in leaves if isinstance(v, cls)]


@amx
def test_save_load_with_kernel(nnx_cnn, tmp_path):
    model, x, xla = nnx_cnn
    fast = qjax.convert(model, x, kernel="amx")
    path = tmp_path / "cnn.safetensors"
    qjax.save_served(path, fast)
    again = qjax.load_served(path, kernel="amx")
    plain = qjax.load_served(path)  # the file holds no kernel: XLA by default
    assert set(again.kernels.values()) == {"amx"} and set(plain.kernels.values()) == {"xla"}
    y = np.asarray(fast(x))
    for other in (again, plain):
        n, mism = _exact(other(x), y)
        assert mism == 0
    print(f"save -> load(kernel='amx'): 0 of {n} outputs differ")
    # jax.export refuses the native custom call, naming it
    with pytest.raises(ValueError, match="qjax_amx_"):
        jax.export.export(jax.jit(fast))(jax.ShapeDtypeStruct(x.shape, x.dtype))


# ---------------------------------------------------------------------------------------
# torch importer


class _TorchCNN(nn.Module):
    """quant -> conv+relu -> depthwise 3x3 + relu -> 1x1 conv -> add(stem) -> max pool ->
    linear -> dequant."""

    def __init__(self):
        super().__init__()
        self.q, self.dq = tq.QuantStub(), tq.DeQuantStub()
        self.stem, self.stem_relu = nn.Conv2d(3, 16, 3, padding=1), nn.ReLU()
        self.dw, self.dw_relu = nn.Conv2d(16, 16, 3, padding=1, groups=16), nn.ReLU()
        self.pw = nn.Conv2d(16, 16, 1)
        self.ff = torch.ao.nn.quantized.FloatFunctional()
        self.pool = nn.MaxPool2d(2)
        self.fc = nn.Linear(16 * 4 * 4, 6)

    def forward(self, x):
        y = self.stem_relu(self.stem(self.q(x)))
        z = self.ff.add(y, self.pw(self.dw_relu(self.dw(y))))
        z = self.pool(z)
        return self.dq(self.fc(z.reshape(z.size(0), -1)))


def _torch_model(engine):
    torch.backends.quantized.engine = engine
    torch.manual_seed(0)
    net = _TorchCNN().eval()
    net.qconfig = tq.get_default_qconfig(engine)
    tq.fuse_modules(net, [["stem", "stem_relu"], ["dw", "dw_relu"]], inplace=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prepared = tq.prepare(net)
        prepared(torch.randn(32, 3, 8, 8) * 2)
        return tq.convert(prepared)


@amx
@pytest.mark.parametrize("engine", ["fbgemm", "x86"])
def test_imported_amx_equals_torch_and_xla(engine):
    eng = torch.backends.quantized.engine
    try:
        qm = _torch_model(engine)
        x = torch.randn(5, 3, 8, 8) * 2
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ref = qtorch.torch_trace(qm, x)
            with torch.no_grad():
                ref_out = qm(x).numpy()
        fast = qtorch.import_model(qm, (x,), engine=engine, kernel="amx")
        xla = qtorch.import_model(qm, (x,), engine=engine)
    finally:
        torch.backends.quantized.engine = eng
    assert fast.kernels == {"stem": "amx", "dw": "xla", "pw": "amx", "fc": "amx"}
    assert set(xla.kernels.values()) == {"xla"}
    assert fast.layers["fc"].extra["kernel"] == "amx" and fast.layers["dw"].extra["kernel"] == "xla"
    out, trace = fast.run_traced(x)
    _, trace_xla = xla.run_traced(x)
    assert list(trace) == list(ref)
    n = vs_torch = vs_xla = 0
    for k, r in ref.items():
        got = np.asarray(trace[k].values)
        n += got.size
        vs_torch += int((got != np.asarray(r.values)).sum())
        vs_xla += int((got != np.asarray(trace_xla[k].values)).sum())
    out_mism = int((np.asarray(out) != ref_out).sum())
    print(f"{engine}: import amx: {vs_torch} of {n} codes differ from torch, {vs_xla} from xla; "
          f"{out_mism} of {ref_out.size} floats")  # fmt: skip
    assert n > 3000 and vs_torch == 0 and vs_xla == 0 and out_mism == 0
    np.testing.assert_array_equal(np.asarray(fast(x)), ref_out)


@onednn
@pytest.mark.parametrize("engine", ["fbgemm", "x86"])
def test_imported_onednn_equals_torch_and_xla(engine):
    eng = torch.backends.quantized.engine
    try:
        qm = _torch_model(engine)
        x = torch.randn(5, 3, 8, 8) * 2
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ref = qtorch.torch_trace(qm, x)
            with torch.no_grad():
                ref_out = qm(x).numpy()
        fast = qtorch.import_model(qm, (x,), engine=engine, kernel="onednn")
        xla = qtorch.import_model(qm, (x,), engine=engine)
    finally:
        torch.backends.quantized.engine = eng
    # every exact layer changes (fbgemm's depthwise 3x3 saturates: sat16 either way)
    assert xla.kernels["fc"] == "xla" and fast.kernels["fc"] == "onednn"
    if _DNN_CONV:
        assert fast.kernels == {k: "onednn" if v == "xla" else v for k, v in xla.kernels.items()}
        assert fast.kernels["stem"] == fast.kernels["pw"] == "onednn"
    out, trace = fast.run_traced(x)
    _, trace_xla = xla.run_traced(x)
    assert list(trace) == list(ref)
    n = vs_torch = vs_xla = 0
    for k, r in ref.items():
        got = np.asarray(trace[k].values)
        n += got.size
        vs_torch += int((got != np.asarray(r.values)).sum())
        vs_xla += int((got != np.asarray(trace_xla[k].values)).sum())
    out_mism = int((np.asarray(out) != ref_out).sum())
    print(f"{engine}: import onednn: {vs_torch} of {n} codes differ from torch, {vs_xla} from "
          f"xla; {out_mism} of {ref_out.size} floats")  # fmt: skip
    assert n > 3000 and vs_torch == 0 and vs_xla == 0 and out_mism == 0


@amx
def test_fbgemm_avx2_sat16_layers_take_the_sat16_kernel():
    """Saturating layers never run on AMX: under kernel='amx' they take the native AVX2
    sat16 kernel (tests/test_native_sat16.py checks its codes), XLA where it cannot run."""
    eng = torch.backends.quantized.engine
    try:
        qm = _torch_model("fbgemm")
        x = torch.randn(2, 3, 8, 8)
        program = qtorch.import_model(qm, (x,), engine="fbgemm_avx2", kernel="amx")
    finally:
        torch.backends.quantized.engine = eng
    from qjax.kernels import sat16_status

    want = "sat16" if sat16_status()[0] else "xla"
    assert set(program.kernels.values()) == {want} and len(program.kernels) == 4


@amx
def test_pt2e_kernel_amx_equals_xla():
    from qjax.converters.pt2e import import_pt2e
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
    from torchao.testing.pt2e._xnnpack_quantizer import (
        XNNPACKQuantizer,
        get_symmetric_quantization_config,
    )

    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 4))
    x = (torch.randn(3, 3, 8, 8),)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        q = XNNPACKQuantizer().set_global(get_symmetric_quantization_config())
        gm = prepare_pt2e(torch.export.export(m.eval(), x).module(), q)
        gm(*x)
        gm = convert_pt2e(gm)
    fast = import_pt2e(gm, x, kernel="amx")
    xla = import_pt2e(gm, x)
    assert sorted(fast.kernels.values()) == ["amx", "amx"]
    assert sorted(xla.kernels.values()) == ["xla", "xla"]
    a, b = fast.trace(*x), xla.trace(*x)
    assert list(a) == list(b)
    for k in a:
        np.testing.assert_array_equal(np.asarray(a[k].values), np.asarray(b[k].values))
    np.testing.assert_array_equal(np.asarray(fast(*x)), np.asarray(xla(*x)))
    assert jnp.asarray(fast(*x)).dtype == jnp.float32


# ---------------------------------------------------------------------------------------
# qjax demo: the speed row


@pytest.mark.parametrize(
    "kernel",
    [
        pytest.param("amx", marks=amx),
        pytest.param(
            "onednn",
            marks=pytest.mark.skipif(
                _OK or not _DNN_CONV, reason="needs oneDNN's exact ukernel and no AMX"
            ),
        ),
        pytest.param("sat16", marks=_SAT16),  # below VNNI (decided so): kernel="auto"
    ],
)
def test_demo_speed_stage_times_the_native_kernel_and_checks_it(kernel, nnx_cnn, monkeypatch):
    from qjax.demo import _speed_stage

    model, x, served = nnx_cnn
    if kernel == "sat16":  # the kernel choice's probes and the demo's (qjax.kernels)
        _below_vnni(monkeypatch)
        for probe in ("native_status", "onednn_exact"):
            monkeypatch.setattr(qjax.kernels, probe, getattr(_native, probe))
    want = np.asarray(served(x))
    checks = []
    sp = _speed_stage(model, model, served, want, np.asarray(x), 8, 2, checks)
    assert sp[kernel]["available"] and sp[kernel]["mismatches"] == 0
    assert sp[kernel]["compared"] == want.size
    assert set(sp[kernel]["kernels"].values()) == {kernel}
    ms, ratio = sp[f"{kernel}_ms"], sp[f"{kernel}_vs_int8"]
    assert ms > 0 and ratio == ms / sp["int8_ms"]
    assert [c["ok"] for c in checks] == [True]
    # a wrong reference fails the demo's check (exit status 1), naming the count
    bad = []
    _speed_stage(model, model, served, want + 1.0, np.asarray(x), 8, 1, bad)
    assert not bad[0]["ok"] and bad[0]["result"] == f"{want.size} of {want.size} outputs differ"


def test_demo_speed_row_with_and_without_amx():
    from qjax.demo._report import tables

    base = {"batch": 256, "repeats": 3, "float_ms": 2.0, "int8_ms": 1.0, "ratio": 0.5}
    s = {"n_test": 1, "accuracy": {}, "engines": {}, "checks": []}
    fast = dict(base, amx={"available": True, "reason": "ready"}, amx_ms=0.5)
    fast.update(amx_ratio=0.25, amx_vs_int8=0.5)
    (_, header, rows), *_ = [t for t in tables(dict(s, speed=fast)) if "speed" in t[0]]
    assert header[3] == "int8 AMX (ms)" and rows == [
        ["2.000", "1.000", "0.50x", "0.500", "0.25x", "0.50x"]
    ]
    none = dict(base, amx={"available": False, "reason": "CPU lacks amx_int8"})
    (_, header, rows), *_ = [t for t in tables(dict(s, speed=none)) if "speed" in t[0]]
    assert rows[0][3] == "unavailable: CPU lacks amx_int8" and rows[0][4:] == ["-", "-"]
    dnn = dict(none, onednn_ms=0.25, onednn_ratio=0.125, onednn_vs_int8=0.25)
    (_, header, rows), *_ = [t for t in tables(dict(s, speed=dnn)) if "speed" in t[0]]
    assert header[6:] == ["int8 oneDNN (ms)", "oneDNN / float time", "oneDNN / XLA time"]
    assert rows[0][6:] == ["0.250", "0.12x", "0.25x"]
    sat = dict(none, sat16_ms=0.5, sat16_ratio=0.25, sat16_vs_int8=0.5)
    (_, header, rows), *_ = [t for t in tables(dict(s, speed=sat)) if "speed" in t[0]]
    assert header[6:] == ["int8 sat16 (ms)", "sat16 / float time", "sat16 / XLA time"]
    assert rows[0][6:] == ["0.500", "0.25x", "0.50x"]
