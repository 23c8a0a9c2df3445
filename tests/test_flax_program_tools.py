"""The program tools on a served Flax program (``qjax.convert`` of a model class):
``qjax.parity.inspect``, ``qjax.parity.compare`` / ``compare_traces``, ``qjax inspect``
(CLI) and ONNX export (``qjax.converters.onnx.export_onnx``, run in onnxruntime).

A traced Flax program differs from an imported one in ways each tool must handle: it is
channels-last (NHWC values; ONNX convs and pools are channels-first), its steps are named
by module path (``"c1"``, ``"fc:input"``), it has ``float`` steps (jax primitives on
dequantized values) and layout steps on codes, and no torch engine (``engine=None``).
"""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import qjax
from qjax.flax import Mode, default_qat_qconfig
from qjax.flax import nnx as qnnx
from qjax.parity import _rules as rules
from qjax.program import Program

# the config trains no scheme, so one calibrated model converts under any scheme
CFG = default_qat_qconfig("x86").replace(quantize_input=True)
TORCH_ONLY = {"weight_at_clamp_bound", "int16_saturation", "onednn_epilogue",
              "engine_mismatch", "level_mismatch"}  # fmt: skip


class CNN(nnx.Module):
    """QuantStub, QuantConv + ReLU, max pool, mean (float), QuantLinear."""

    def __init__(self, rngs, c=6):
        self.stub = qnnx.QuantStub(CFG)
        self.c1 = qnnx.QuantConv(2, c, (3, 3), config=CFG, rngs=rngs)
        self.fc = qnnx.QuantLinear(c, 5, config=CFG, rngs=rngs)

    def __call__(self, x):
        h = nnx.relu(self.c1(self.stub(x)))
        h = nnx.max_pool(h, (2, 2), (2, 2))
        return self.fc(h.mean(axis=(1, 2)))


def _frozen(model, x):
    qnnx.calibrate(model, [x], progress=False)
    qnnx.set_mode(model, Mode.FROZEN)
    model.eval()
    return model


def _x(seed, n):
    return np.asarray(jax.random.normal(jax.random.key(seed), (n, 8, 8, 2)) * 2, np.float32)


@pytest.fixture(scope="module")
def cnn():
    x = _x(0, 16)
    model = _frozen(CNN(nnx.Rngs(0)), x)
    progs = {s: qjax.convert(model, x, scheme=s) for s in ("qnnpack", "fbgemm")}
    return model, x, progs


def _names(program):
    return [s.name for s in program.steps]


# ---- qjax.parity.inspect ----------------------------------------------------------------


def test_inspect_lists_layers_qparams_kernels_and_float_steps(cnn):
    _, x, progs = cnn
    program = progs["qnnpack"]
    report = qjax.parity.inspect(program, x)
    trace = program.trace(x)
    floats = [n for n in _names(program) if n in program.float_ops]
    assert sorted(program.float_ops.values()) == ["div", "reduce_sum"]
    # every activation and every float step, in step order
    assert [la.name for la in report.layers] == [
        n for n in _names(program) if n in trace or n in floats
    ]
    assert [la.name for la in report.activations] == list(trace)
    assert report.engine is None
    for la in report.layers:
        if la.name in floats:
            assert la.is_float and la.op == "float" and la.target == program.float_ops[la.name]
            assert la.code_range is None and la.used is None and la.out is None
            continue
        codes = np.asarray(trace[la.name].values)
        assert la.code_range == (int(codes.min()), int(codes.max())), la.name
        assert la.out is not None and la.out.endswith("[0,127]")  # reduce_range activations
    c1, fc = report["c1"], report["fc"]
    assert (c1.op, c1.scheme, c1.kernel) == ("conv2d", "qnnpack", "xla")
    assert (fc.op, fc.kernel) == ("linear", "xla") and fc.weight.startswith("5 ch")
    assert c1.weight.startswith("6 ch") and report["stub"].kernel is None
    # the torch-only risks (convert's clamp, int16 saturation, oneDNN) are not claimed
    assert not {c.name for la in report.layers for c in la.risks} & TORCH_ONLY
    text = report.render("text")
    assert "2 float steps" in text and "float: reduce_sum" in text and "xla" in text
    d = json.loads(report.to_json())
    assert [la["code_range"] for la in d["layers"] if la["op"] == "float"] == [None, None]


def test_torch_only_rules_do_not_apply_to_flax_weights(cnn):
    """The conv's weight has channels at +127 with no -128: for torch's convert() that
    is rule 9's clamp (amax/127.5); a Flax program serves its model's own codes."""
    _, x, progs = cnn
    w = progs["qnnpack"].params["c1"][0].weight
    ev = rules.LayerEvidence("c1", "conv2d", None, weight=w, scheme="onednn")
    assert rules.weight_at_clamp_bound(ev) is not None  # the weight has the property
    assert rules.onednn_epilogue(ev) is not None
    flax_ev = rules.LayerEvidence("c1", "conv2d", None, weight=w, scheme="onednn", origin="flax")
    assert rules.weight_at_clamp_bound(flax_ev) is None
    assert rules.onednn_epilogue(flax_ev) is None
    # bias rounding: a qnnpack layer is the side that rounds the bias
    kw = dict(codes=np.array([5, 7]), ref_codes=np.array([5, 6]), has_bias=True,
              reference_kind="hand", origin="flax")  # fmt: skip
    here = rules.bias_rounding(rules.LayerEvidence("fc", "linear", scheme="qnnpack", **kw))
    there = rules.bias_rounding(rules.LayerEvidence("fc", "linear", scheme="fbgemm", **kw))
    assert "rounded to int32 here" in here.message and "kept in float" in there.message


# ---- qjax.parity.compare / compare_traces ---------------------------------------------


def test_compare_with_its_own_trace_at_another_batch(cnn):
    _, x, progs = cnn
    program = progs["qnnpack"]
    x2 = _x(1, 5)  # another batch size: the program lowers again for it
    report = qjax.parity.compare(None, program, x2, reference=program.trace(x2))
    assert report.ok and report.engine is None and report.reference_kind == "hand"
    assert [la.name for la in report.layers] == list(program.trace(x2))
    assert report.values == sum(int(np.size(q.values)) for q in program.trace(x2).values())
    assert report["c1"].scheme == "qnnpack" and report["c1"].shape == (5, 8, 8, 6)


def test_compare_reports_mismatches_and_traces_them_through_float_steps(cnn):
    _, x, progs = cnn
    program = progs["qnnpack"]
    moved = x.copy()
    moved[3] += 0.37  # sample 3 only: the reference's codes differ there, downstream too
    reference = program.trace(moved)
    report = qjax.parity.compare(None, program, x, reference=reference,
                                 reference_kind="fake_quant")  # fmt: skip
    assert not report.ok and report.mismatches > 0
    stub = report["stub"]
    assert stub.mismatches > 0 and stub.first["index"][0] == 3 and not stub.causes
    for la in report.layers:
        if la.mismatches:
            assert la.first["index"][0] == 3, la.name  # only sample 3 differs
        assert not {c.name for c in la.causes} & TORCH_ONLY, la.name
    assert report["c1"].propagated_from == "stub"
    # fc:input reads the float mean (div <- reduce_sum <- dequantize <- max_pool):
    # traced back through the float steps to the activation that differs
    assert report["fc:input"].mismatches > 0
    assert report["fc:input"].propagated_from == "max_pool"
    assert "input 'max_pool' already differs" in report.render("text")


def test_compare_against_another_schemes_trace(cnn):
    _, x, progs = cnn
    xs = _x(2, 64)
    report = qjax.parity.compare_traces(
        progs["fbgemm"].trace(xs), progs["qnnpack"].trace(xs), program=progs["qnnpack"],
        inputs=(xs,), reference_kind="hand",
    )  # fmt: skip
    assert report.values == sum(la.values for la in report.layers) > 0
    assert [la.name for la in report.layers] == list(progs["qnnpack"].trace(xs))
    for la in report.layers:
        assert la.max_lsb <= 1 or la.propagated_from, la  # scheme rounding: one step
        assert not {c.name for c in la.causes} & TORCH_ONLY
        assert {c.name for c in la.causes} <= {"bias_rounding"}
        for c in la.causes:  # the qnnpack layer is the side that rounds its bias
            assert "rounded to int32 here (scheme 'qnnpack'" in c.message


def test_a_served_sequential_is_a_program_the_tools_take():
    """A Sequential converts to the same Program as a class calling it (one path): the
    tools inspect both alike; something that is not a program is refused by name."""
    seq = nnx.Sequential(qnnx.QuantLinear(6, 5, config=CFG, rngs=nnx.Rngs(0)))
    x = jnp.linspace(-1, 1, 96).reshape(16, 6)  # the fixture's fc shapes: compiled already
    qnnx.calibrate(seq, [x], progress=False)
    served = qjax.convert(seq, x)
    assert isinstance(served, Program)

    class Model(nnx.Module):
        def __init__(self, seq):
            self.seq = seq

        def __call__(self, v):
            return self.seq(v)

    program = qjax.convert(Model(seq), x)
    ops = [la.op for la in qjax.parity.inspect(program, x).layers]
    assert ops[:2] == ["quantize", "linear"]
    assert [la.op for la in qjax.parity.inspect(served, x).layers] == ops
    assert bool((served(x) == program(x)).all())
    with pytest.raises(TypeError, match="expected a qjax.Program.*no per-layer trace"):
        qjax.parity.inspect(lambda v: v, x)


# ---- ONNX export ------------------------------------------------------------------------


def export_onnx(*args, **kwargs):
    """``qjax.converters.onnx.export_onnx`` (the ``onnx`` extra: skipped without it)."""
    pytest.importorskip("onnxruntime")
    from qjax.converters.onnx import export_onnx as export

    return export(*args, **kwargs)


def _session(model, optimize: bool):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = (
        ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if optimize
        else ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    )
    so.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


def _run(model, x, optimize):
    s = _session(model, optimize)
    return dict(zip([o.name for o in s.get_outputs()], s.run(None, {"x": x}), strict=True))


def _diffs(outs, trace):
    d = {}
    for name, q in trace.items():
        if name in outs:
            a = np.asarray(outs[name], np.int64)
            b = np.asarray(q.values, np.int64)
            assert a.shape == b.shape, (name, a.shape, b.shape)
            d[name] = (a.size, int((a != b).sum()), int(np.abs(a - b).max()))
    return d


@pytest.mark.parametrize("scheme", ["qnnpack", "fbgemm"])
def test_onnx_export_channels_last_cnn(cnn, scheme):
    """Codes in ORT vs the program, every activation a graph output: QNNPACK's
    requantization is ORT's (exact); FBGEMM keeps the bias in float where the ONNX
    model has an int32 bias (1 LSB at rounding ties, then propagated)."""
    _, _, progs = cnn
    program = progs[scheme]
    program.layout = "NHWC"  # what qjax.convert declares (and export infers for it)
    x = _x(3, 24)  # not the conversion batch: exported at this batch's steps
    model = export_onnx(program, (x,), intermediates=True)
    ops = [n.op_type for n in model.graph.node]
    assert {"Conv", "MaxPool", "ReduceSum", "Div", "Gemm", "Transpose", "Clip"} <= set(ops)
    assert ops.count("Transpose") == 4  # codes to/from channels-first: the conv, the pool
    trace = program.trace(x)
    y = np.asarray(program(x))
    for optimize in (False, True):
        outs = _run(model, x, optimize)
        d = _diffs(outs, trace)
        assert set(d) == set(trace), set(trace) - set(d)
        assert d["stub"][1] == 0  # rint(x/s)+zp vs the model's quantizer: no ties here
        first = next((k for k, v in d.items() if v[1]), None)
        if scheme == "qnnpack":
            assert first is None, d
            np.testing.assert_array_equal(outs[model.graph.output[0].name], y)
        else:
            assert first is None or d[first][2] <= 1, d
            n = sum(v[0] for v in d.values())
            assert sum(v[1] for v in d.values()) <= n // 100, d


def test_onnx_export_infers_the_layout_and_checks_it(cnn):
    _, x, progs = cnn
    program = progs["qnnpack"]
    program.layout = None  # a traced Flax program is channels-last whatever it says
    model = export_onnx(program, (x,))
    assert [n.op_type for n in model.graph.node].count("Transpose") == 4
    # the same steps in a plain Program that claims torch's channels-first order
    plain = Program(program.steps, program.inputs, program.output)
    with pytest.raises(NotImplementedError, match="step 'c1'.*set program.layout = 'NHWC'"):
        export_onnx(plain, (x,))
    plain.layout = "NHWC"
    out = _run(export_onnx(plain, (x,)), x, False)
    np.testing.assert_array_equal(next(iter(out.values())), np.asarray(program(x)))


def test_onnx_export_float_layers_and_float_ops(cnn):
    """Layers without an output quantizer (int8 dot/conv, float output and bias),
    LayerNorm, a window-sum average pool, softmax and GELU: float steps of many
    primitives."""
    cfg = CFG.replace(quantize_output=False)

    class Net(nnx.Module):
        def __init__(self, rngs):
            self.stub = qnnx.QuantStub(CFG)
            self.conv = qnnx.QuantConv(2, 6, (3, 3), strides=(2, 2), config=cfg, rngs=rngs)
            self.norm = nnx.LayerNorm(6, rngs=rngs)
            self.fc = qnnx.QuantLinear(6, 5, config=cfg, rngs=rngs)

        def __call__(self, x):
            h = jax.nn.gelu(self.conv(self.stub(x)))
            h = jax.lax.reduce_window(h, 0.0, jax.lax.add, (1, 2, 2, 1), (1, 1, 1, 1), "SAME")
            h = self.norm(h / 4.0).mean(axis=(1, 2))
            return jax.nn.softmax(self.fc(h), axis=-1)

    x = _x(5, 16)
    program = qjax.convert(_frozen(Net(nnx.Rngs(0)), x), x, scheme="qnnpack")
    prims = set(program.float_ops.values())
    assert {"tanh", "integer_pow", "rsqrt", "reduce_window_sum", "exp", "reduce_max"} <= prims
    report = qjax.parity.inspect(program, x)  # the float-output layers are listed too
    assert report["conv"].op == "conv2d" and report["conv"].code_range is None
    assert "conv2d (float out)" in report.render("text")
    model_onnx = export_onnx(program, (x,), intermediates=True)
    y = np.asarray(program(x))
    for optimize in (False, True):
        outs = _run(model_onnx, x, optimize)
        d = _diffs(outs, program.trace(x))
        assert {"stub", "fc:input"} <= set(d), d  # (the conv's input is the stub's)
        assert all(v[2] <= 1 and v[1] <= v[0] // 100 for v in d.values()), d
        # float steps: the same float32 ops, up to summation order and exp/tanh ulps
        np.testing.assert_allclose(outs[model_onnx.graph.output[0].name], y, atol=1e-6)


def test_onnx_export_names_the_step_and_primitive_it_cannot_write(cnn):
    model, x, _ = cnn

    class Cumulative(nnx.Module):
        def __init__(self, inner):
            self.inner = inner

        def __call__(self, v):
            return jnp.cumsum(self.inner(v), axis=-1)

    program = qjax.convert(Cumulative(model), x, scheme="qnnpack")
    step = next(n for n, p in program.float_ops.items() if p == "cumsum")
    with pytest.raises(NotImplementedError, match=f"step '{step}'.*'cumsum' has no ONNX"):
        export_onnx(program, (x,))


# ---- qjax inspect (CLI) ------------------------------------------------------------------


def test_cli_inspect_a_flax_program(tmp_path, capsys):
    from qjax.cli import main

    (tmp_path / "served.py").write_text(
        "import jax, numpy as np\n"
        "from flax import nnx\n"
        "import qjax\n"
        "from qjax.flax import Mode, default_qat_qconfig\n"
        "from qjax.flax import nnx as qnnx\n"
        "cfg = default_qat_qconfig('x86').replace(quantize_input=True)\n"
        "class Net(nnx.Module):\n"
        "    def __init__(self, rngs):\n"
        "        self.stub = qnnx.QuantStub(cfg)\n"
        "        self.c1 = qnnx.QuantConv(2, 6, (3, 3), config=cfg, rngs=rngs)\n"
        "        self.fc = qnnx.QuantLinear(6, 5, config=cfg, rngs=rngs)\n"
        "    def __call__(self, x):\n"
        "        return self.fc(jax.nn.gelu(self.c1(self.stub(x))).mean(axis=(1, 2)))\n"
        "def served():\n"
        "    x = np.linspace(-2, 2, 16 * 8 * 8 * 2, dtype=np.float32).reshape(16, 8, 8, 2)\n"
        "    m = Net(nnx.Rngs(0))\n"
        "    qnnx.calibrate(m, [x], progress=False)\n"
        "    qnnx.set_mode(m, Mode.FROZEN)\n"
        "    return qjax.convert(m, x), x\n"
    )
    target = f"{tmp_path / 'served.py'}:served"
    assert main(["inspect", target, "--format", "json"]) == 0
    out = json.loads(capsys.readouterr().out)
    ops = {la["name"]: la["op"] for la in out["layers"]}
    assert out["engine"] is None and ops["stub"] == "quantize"
    assert (ops["c1"], ops["fc"]) == ("conv2d", "linear")
    assert "float" in ops.values()  # the GELU's and the mean's steps
    assert main(["inspect", target, "--input-shape", "3,8,8,2", "--format", "text"]) == 0
    assert "qjax inspect" in capsys.readouterr().out
    assert main(["parity", target]) == 2
    assert "has no torch model" in capsys.readouterr().err
