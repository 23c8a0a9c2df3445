"""ONNX QDQ export of imported torch int8 programs, run in onnxruntime (CPU EP).

Each model is eager-converted by torch, imported with ``qjax.converters.torch`` under the
schemes ``fbgemm``, ``qnnpack``, ``exact`` and ``onednn``, exported once (the ONNX model
does not depend on the scheme: it holds torch's qparams and weights) and run by
onnxruntime with graph optimizations ON (QDQ fused into QLinearConv / QGemm /
QLinearMatMul / QLinearAdd / ... integer kernels) and OFF (the float reference of the
QDQ graph). Every quantized activation of the program is a graph output
(``intermediates=True``), so codes are compared layer by layer.

A difference in one layer propagates: the counts below are for every activation of the
model, the first diverging layer is what tells the rounding rule apart (asserted
<= 1 LSB there).
"""

from __future__ import annotations

import warnings

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import qjax.converters.torch as qtorch
import torch
from qjax.converters.onnx import export_onnx
from torch import nn
from torch.ao.quantization import (
    DeQuantStub,
    QuantStub,
    convert,
    fuse_modules,
    get_default_qconfig,
    prepare,
)

from qjax.kernels import host_level, quantize_input
from qjax.program import Layer, Program, Step

SCHEMES = ("fbgemm", "qnnpack", "exact", "onednn")
# ORT's optimized u8s8 kernels (QLinearConv, QGemm) sum uint8 x int8 pairs in saturating
# int16 on CPUs without VNNI (onnxruntime's quantization docs: vpmaddubsw); with
# optimizations off, or on VNNI/AMX CPUs, they accumulate exactly. qjax does not emulate
# ORT's saturation, so the "on" code comparisons below are exact promises only there.
ORT_EXACT = host_level() in ("vnni", "amx")
RESULTS: dict[tuple[str, str, str], tuple[int, int, int]] = {}


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.q, self.dq = QuantStub(), DeQuantStub()
        self.fc1, self.r1 = nn.Linear(12, 32), nn.ReLU()
        self.fc2, self.r2 = nn.Linear(32, 16, bias=False), nn.ReLU()
        self.fc3 = nn.Linear(16, 4)

    def forward(self, x):
        return self.dq(self.fc3(self.r2(self.fc2(self.r1(self.fc1(self.q(x)))))))


class CNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.q, self.dq = QuantStub(), DeQuantStub()
        self.c1, self.r1 = nn.Conv2d(3, 8, 3, padding=1), nn.ReLU()
        self.pool = nn.MaxPool2d(2)
        self.c2, self.r2 = nn.Conv2d(8, 16, 3, stride=1, padding=1), nn.ReLU()
        self.avg = nn.AvgPool2d(2)
        self.flat = nn.Flatten()
        self.fc = nn.Linear(16 * 2 * 2, 6)

    def forward(self, x):
        x = self.pool(self.r1(self.c1(self.q(x))))
        x = self.avg(self.r2(self.c2(x)))
        return self.dq(self.fc(self.flat(x)))


class AddCat(nn.Module):
    """Residual add, standalone ReLU and ReLU6, mul, cat, global average pool, reshape to
    3-d and a linear on the 3-d tensor (ONNX MatMul + Add)."""

    def __init__(self):
        super().__init__()
        self.q, self.dq = QuantStub(), DeQuantStub()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.c2 = nn.Conv2d(8, 8, 1)
        self.relu = nn.ReLU()
        self.add = torch.ao.nn.quantized.FloatFunctional()
        self.cat = torch.ao.nn.quantized.FloatFunctional()
        self.mul = torch.ao.nn.quantized.FloatFunctional()
        self.relu6 = nn.ReLU6()
        self.gap = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        a = self.c1(self.q(x))
        y = self.relu(self.add.add(a, self.c2(a)))
        z = self.gap(self.cat.cat([self.mul.mul(y, self.relu6(a)), a], 1))
        return self.dq(self.fc(z.reshape(z.size(0), 2, 8)))


MODELS = {
    "mlp": (MLP, "fbgemm", [["fc1", "r1"], ["fc2", "r2"]], (12,)),
    "cnn": (CNN, "fbgemm", [["c1", "r1"], ["c2", "r2"]], (3, 8, 8)),
    "addcat": (AddCat, "qnnpack", [], (3, 6, 6)),
}


def _convert(name):
    cls, engine, fuse, shape = MODELS[name]
    torch.manual_seed(0)
    torch.backends.quantized.engine = engine
    m = cls().eval()
    if fuse:
        m = fuse_modules(m, fuse)
    m.qconfig = get_default_qconfig(engine)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        p = prepare(m)
        with torch.no_grad():
            for _ in range(4):
                p(torch.randn(16, *shape))
        qm = convert(p)
    x = np.random.default_rng(1).standard_normal((32, *shape)).astype(np.float32)
    return qm, x


def _session(model, optimize: bool, save=None):
    so = ort.SessionOptions()
    so.graph_optimization_level = (
        ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if optimize
        else ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    )
    so.log_severity_level = 3
    if save is not None:
        so.optimized_model_filepath = str(save)
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


def _run(model, x, optimize, save=None):
    s = _session(model, optimize, save)
    return dict(zip([o.name for o in s.get_outputs()], s.run(None, {"x": x}), strict=True))


@pytest.fixture(scope="module", params=sorted(MODELS))
def case(request, tmp_path_factory):
    name = request.param
    qm, x = _convert(name)
    engine = MODELS[name][1]
    torch.backends.quantized.engine = engine
    # exact accumulation (a VNNI CPU's integers): what an ONNX graph expresses and what
    # ORT computes with optimizations off (or on VNNI CPUs)
    progs = {s: qtorch.import_model(qm, (x,), engine=s, isa="vnni") for s in SCHEMES}
    models = {s: export_onnx(p, (x,), intermediates=True) for s, p in progs.items()}
    opt_path = tmp_path_factory.mktemp(name) / "optimized.onnx"
    ort_out = {
        s: {"on": _run(m, x, True, opt_path if s == "fbgemm" else None), "off": _run(m, x, False)}
        for s, m in models.items()
    }
    return dict(
        name=name, qm=qm, x=x, progs=progs, models=models, ort=ort_out,
        optimized=onnx.load(str(opt_path)),
    )  # fmt: skip


def _diffs(ort_out, trace):
    """Per activation: (codes compared, mismatches, max |LSB| difference)."""
    out = {}
    for k, qa in trace.items():
        if k not in ort_out:
            continue  # aliases (identity steps) are not repeated as graph outputs
        a = np.asarray(ort_out[k]).astype(np.int32)
        b = np.asarray(qa.values).astype(np.int32)
        assert a.shape == b.shape, k
        d = np.abs(a - b)
        out[k] = (d.size, int((d > 0).sum()), int(d.max()))
    return out


def test_export_is_scheme_independent(case):
    """The model holds torch's qparams and weights: programs of different schemes export
    the same bytes, except where a step reproduces an engine's own behaviour (torch's
    QNNPACK clamp layout bug: ``Layer.extra["qnnpack_layout_bug"]``)."""
    want = case["models"]["fbgemm"].SerializeToString()
    bugs = {}
    for s in SCHEMES:
        layers = case["progs"][s].layers.values()
        bugs[s] = any(ly.extra.get("qnnpack_layout_bug") for ly in layers)
        assert (case["models"][s].SerializeToString() == want) != bugs[s], s
    # addcat's channels-last relu6 under the qnnpack scheme is the only case here
    assert bugs == {s: case["name"] == "addcat" and s == "qnnpack" for s in SCHEMES}


def test_ort_fuses_integer_kernels(case):
    """With optimizations ON every Conv/Gemm/MatMul runs as an integer kernel."""
    ops = [n.op_type for n in case["optimized"].graph.node]
    assert not {"Conv", "Gemm", "MatMul", "FusedConv", "FusedGemm"} & set(ops), ops
    want = {
        "mlp": {"QGemm": 3},  # fc2 has no bias
        "cnn": {"QLinearConv": 2, "QGemm": 1},
        "addcat": {"QLinearConv": 2, "QGemm": 1, "QLinearAdd": 1, "QLinearMul": 1},
    }
    assert {k: ops.count(k) for k in want[case["name"]]} == want[case["name"]], ops
    plain = [n.op_type for n in case["models"]["fbgemm"].graph.node]
    assert {"QuantizeLinear", "DequantizeLinear"} <= set(plain)


@pytest.mark.parametrize("setting", ["on", "off"])
@pytest.mark.parametrize("scheme", SCHEMES)
def test_codes_vs_qjax(case, scheme, setting):
    prog = case["progs"][scheme]
    trace = prog.trace(case["x"])
    d = _diffs(case["ort"][scheme][setting], trace)
    n = sum(v[0] for v in d.values())
    mism = sum(v[1] for v in d.values())
    mx = max(v[2] for v in d.values())
    RESULTS[(case["name"], scheme, setting)] = (n, mism, mx)
    print(f"\n{case['name']:7s} {scheme:8s} ORT-{setting:3s}: {n} codes, {mism} mismatches, "
          f"max {mx} LSB; per layer {d}")  # fmt: skip
    assert n >= 400
    # the input QuantizeLinear: rint(x/s)+zp vs torch's rint(fma(x, 1/s, zp)), random
    # inputs have no near-ties
    first = next(iter(d))
    assert d[first][1] == 0, (first, d[first])
    if setting == "on" and not ORT_EXACT:
        return  # ORT's saturating u8s8 kernels on this CPU: counted above, not promised
    # the first diverging layer differs by at most one LSB (a rounding rule, not a bug)
    for k, v in d.items():
        if v[1]:
            assert v[2] <= 1, (k, v)
            break
    if scheme == "qnnpack" and setting == "on":
        # ORT's QLinearConv/QGemm/QLinearMatMul/QLinearAdd/QLinearConcat/
        # QLinearGlobalAveragePool codes are QNNPACK's: exact up to the first average
        # pool. QLinearAveragePool dequantizes, averages in float and rounds
        # rint(y/s + zp) (zero point before rounding): one LSB from torch's pool there.
        ops = prog.layers
        for k, v in d.items():
            if ops[k].op == "avg_pool2d":
                assert v[2] <= 1, (k, v)
                break
            assert v[1] == 0, (k, v)
        else:
            out = np.asarray(prog(case["x"]))
            dq = [n.name for n in case["models"][scheme].graph.output][0]
            np.testing.assert_array_equal(case["ort"][scheme][setting][dq], out)
    else:
        # after the first diverging layer, differences propagate (and grow through a
        # layer with large weights): bounded in count only
        assert mism <= n // 100, d


@pytest.mark.parametrize("setting", ["on", "off"])
def test_codes_vs_torch(case, setting):
    """ORT against torch itself, under the engine the model was converted with (the
    ONNX model of the program of that engine)."""
    engine = MODELS[case["name"]][1]
    torch.backends.quantized.engine = engine
    want = qtorch.torch_trace(case["qm"], torch.from_numpy(case["x"]))
    d = _diffs(case["ort"][engine][setting], want)
    n = sum(v[0] for v in d.values())
    mism = sum(v[1] for v in d.values())
    print(f"\n{case['name']:7s} torch {engine:8s} ORT-{setting:3s}: {n} codes, {mism} mismatches, "
          f"max {max(v[2] for v in d.values())} LSB")  # fmt: skip
    assert n >= 400 and set(d) <= set(case["progs"][engine].trace(case["x"]))
    if setting == "on" and not ORT_EXACT:
        return  # ORT's saturating u8s8 kernels on this CPU: counted above, not promised
    diverging = [k for k, v in d.items() if v[1]]
    assert not diverging or d[diverging[0]][2] <= 1, d  # first diverging layer: 1 LSB
    if engine == "qnnpack" and setting == "on":
        assert mism == 0, d
    else:
        assert mism <= n // 100, d


def test_unsupported_step_is_named():
    qp = quantize_input.__module__  # any import-time constant; the step fails before use
    del qp
    from qjax import QParams, QuantSpec

    q8 = QParams(0.5, 128, QuantSpec(signed=False))
    p = Program(
        [
            Step("q", lambda _, x: quantize_input(x, q8), ("x",), layer=Layer("quantize", "q")),
            Step("ms", lambda _, q: q, ("q",), layer=Layer("mul_scalar", "quantized.mul_scalar")),
        ],
        inputs=("x",),
        output="ms",
    )
    x = np.zeros((2, 3), np.float32)
    with pytest.raises(NotImplementedError, match=r"step 'ms' \(op='mul_scalar'.*mul_scalar"):
        export_onnx(p, (x,))


def test_bad_arguments(tmp_path):
    qm, x = _convert("mlp")
    prog = qtorch.import_model(qm, (x[:2],), engine="fbgemm")
    with pytest.raises(TypeError, match="expected a Program"):
        export_onnx(qm, (x,))
    with pytest.raises(ValueError, match="opset"):
        export_onnx(prog, (x,), opset=12)
    with pytest.raises(ValueError, match="1 input"):
        export_onnx(prog, (x, x))
    path = tmp_path / "mlp.onnx"
    model = export_onnx(prog, x[:2], path=str(path), opset=17)
    assert onnx.load(str(path)).SerializeToString() == model.SerializeToString()
    assert model.opset_import[0].version == 17


def _tie_program(kind: str, scheme: str, sx, sw, sy, bias):
    """quantize -> one linear (K=1) or 1x1 / 1 conv (2-d / 1-d) with weights [1, 3, 5, -7],
    by hand."""
    from qjax import QArray, QParams, QuantSpec
    from qjax import kernels as K

    qx = QParams(sx, 128, QuantSpec(signed=False))
    qy = QParams(sy, 3, QuantSpec(signed=False))  # odd zero point: before/after rounding
    w8 = np.array([1, 3, 5, -7], np.int8)
    wq = QParams(sw, 0, QuantSpec(signed=True))
    b = None if bias is None else np.asarray(bias, np.float32)
    if kind == "linear":
        pw = K.prepare_linear(QArray(w8.reshape(1, 4), wq))

        def f(p, x):
            return K.quantized_linear(x, p[0], p[1], qy, scheme=scheme)

        layer = Layer("linear", "by hand", scheme, wq, qy, {"activation": None})
    else:
        nsp = 2 if kind == "conv" else 1
        wl, xl = ("OIHW", "NCHW") if nsp == 2 else ("OIW", "NCW")
        pw = K.prepare_conv(QArray(w8.reshape(4, 1, *(1,) * nsp), wq), weight_layout=wl)
        one, zero = (1,) * nsp, (0,) * nsp
        opts = dict(stride=one, padding=zero, dilation=one, groups=1, activation=None)

        def f(p, x):
            return K.quantized_conv(x, p[0], p[1], qy, layout=xl, scheme=scheme, **opts)

        layer = Layer(f"conv{nsp}d", "by hand", scheme, wq, qy, opts)
    steps = [
        Step("q", lambda _, x: quantize_input(x, qx), ("x",), layer=Layer("quantize", "q")),
        Step(kind, f, ("q",), params=(pw, b), layer=layer),
    ]
    return Program(steps, inputs=("x",), output=kind)


@pytest.mark.parametrize("kind", ["linear", "conv", "conv1d"])
def test_requant_rule_at_ties(kind, tmp_path):
    """Scales chosen so that ORT's multiplier f32(f32(s_x·s_w)/s_y) is exactly 1/2 while
    QNNPACK's f32(f32(s_x·s_w)·f32(1/s_y)) is 1/2 - 2^-25: every odd accumulator is a
    tie. ORT (optimizations ON: QGemm / QLinearConv) matches
    ``rint(f32(f32(acc + b_q)·M)) + zp`` exactly (round half to even, zero point after
    rounding), and not the qnnpack scheme nor zero-point-before-rounding."""
    f32 = np.float32
    sx = f32(0.02)
    for sw in np.linspace(0.001, 0.01, 200).astype(f32):
        p = f32(sx * sw)
        if f32(p * f32(f32(1) / f32(2 * p))) != f32(0.5):
            break
    sy = f32(2 * p)
    assert f32(p / sy) == f32(0.5) and f32(p * f32(f32(1) / sy)) != f32(0.5)
    k_b = np.array([2, -5, 0, 7])
    bias = (k_b * p).astype(f32)  # b / f32(s_x·s_w) rounds to k_b under either rule
    codes = np.arange(256)
    x = ((codes - 128).astype(f32) * sx).reshape(256, 1)
    shape = {"linear": (256, 4), "conv": (1, 4, 16, 16), "conv1d": (1, 4, 256)}[kind]
    if kind != "linear":
        x = x.reshape(1, 1, *shape[2:])
    prog = _tie_program(kind, "qnnpack", sx, sw, sy, bias)
    model = export_onnx(prog, (x,))
    got = _run(model, x, True, tmp_path / "opt.onnx")[kind].astype(np.int64)
    fused = "QGemm" if kind == "linear" else "QLinearConv"
    assert fused in [n.op_type for n in onnx.load(str(tmp_path / "opt.onnx")).graph.node]
    off = _run(model, x, False)[kind].astype(np.int64)
    acc = (codes - 128)[:, None] * np.array([1, 3, 5, -7]) + k_b  # (256, 4) = acc + b_q
    t = (acc.astype(f32) * f32(p / sy)).astype(f32)
    rule = {
        "ort": np.clip(np.rint(t) + 3, 0, 255),
        "zp_before": np.clip(np.rint(t + f32(3)), 0, 255),
    }
    if kind != "linear":
        rule = {k: v.T.reshape(shape) for k, v in rule.items()}
    mism = {k: int((got != v).sum()) for k, v in rule.items()}
    mism["qnnpack"] = int((got != np.asarray(prog(x).values)).sum())
    off_vs_ort = int((off != rule["ort"]).sum())
    msg = f"ORT-on mismatches {mism}; ORT-off vs rule {off_vs_ort}"
    print(f"\n{kind} at ties ({got.size} codes): {msg}")
    assert mism["ort"] == 0
    assert mism["qnnpack"] > 50 and mism["zp_before"] > 100
