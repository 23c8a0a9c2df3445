"""Converted torch int8 models imported as qjax programs: the same integers as torch.

Random MLPs, CNNs and 1-D conv nets (``_torch_models.py``), quantized with eager
``prepare``/``convert`` (fused with ``fuse_modules`` or not) and with FX
``prepare_fx``/``convert_fx``, under several qconfigs (engine defaults, reduce_range on
and off, per-tensor / per-channel / affine weights). Each is built and run under the
torch engine it is compared with (one thread) and imported with the matching qjax
engine; every quantized activation (``program.trace`` vs ``torch_trace``) and the float
output are compared exactly:

* ``fbgemm`` and ``qnnpack``: 0 mismatching integers;
* ``x86`` and ``onednn``: within rule 13 (one code, about 2 outputs per million; the
  suite's models are small, so this is typically 0 too).

Half of the 50 models run by default, the other half in the ``slow`` sweep. Counts per
engine and family are printed (``pytest -s``).
"""

from __future__ import annotations

import math
import os
import textwrap
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")

import _torch_models as tm  # noqa: E402
from _helpers import run_script  # noqa: E402
from qjax.converters import torch as qtorch  # noqa: E402

from qjax.kernels import host_level  # noqa: E402

VNNI = host_level() in ("vnni", "amx")
VARIANTS = {
    "fbgemm": ("default", "wide", "per_tensor", "affine_w"),
    "qnnpack": ("default", "wide", "per_tensor", "affine_w"),
    "x86": ("default", "wide", "per_tensor", "affine_w"),
    "onednn": ("default", "wide", "per_tensor"),  # oneDNN takes symmetric weights only
}
# (family, count) per engine: 50 models in all (CNNs cost about 3x an MLP to compile)
PLAN = {
    "fbgemm": (("mlp", 8), ("cnn", 5), ("conv1d", 1)),
    "qnnpack": (("mlp", 8), ("cnn", 5), ("conv1d", 1)),
    "x86": (("mlp", 6), ("cnn", 4), ("conv1d", 1)),
    "onednn": (("mlp", 7), ("cnn", 3), ("conv1d", 1)),
}


def _cases():
    out = []
    i = 0
    for engine, fams in PLAN.items():
        for fam, n in fams:
            for j in range(n):
                variants = VARIANTS[engine]
                variant = variants[j % len(variants)]
                opts = {}
                if fam == "cnn":
                    eidx = list(PLAN).index(engine)
                    opts = dict(block=tm.BLOCKS[j % 5], pool=tm.POOLS[(j // 2 + eidx) % 4])
                mode = "fx" if (i + j) % 2 else "eager"
                core = (j + list(PLAN).index(engine)) % 2 == 0
                out.append(((engine, fam, 1000 * i + j, variant, mode, j % 3 != 2, opts), core))
            i += 1
    return out


CASES = [c for c, _ in _cases()]


def _compare(engine, fam, seed, variant, mode, fuse, opts, call: bool):
    torch.backends.quantized.engine = engine
    model, x = tm.build(fam, seed, engine, variant, mode, fuse, **opts)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = qtorch.import_model(model, (x,), engine=engine)
        ref_trace = qtorch.torch_trace(model, x)
        with torch.no_grad():
            ref_out = model(x).numpy()
    out, trace = program.run_traced(x)
    assert list(trace) == list(ref_trace)
    n = mism = maxd = 0
    for k, ref in ref_trace.items():
        got = trace[k]
        assert got.shape == ref.shape and got.dtype == ref.dtype, k
        np.testing.assert_array_equal(np.asarray(got.scale), np.asarray(ref.scale), err_msg=k)
        np.testing.assert_array_equal(
            np.asarray(got.zero_point), np.asarray(ref.zero_point), err_msg=k
        )
        d = np.abs(np.asarray(got.values, np.int64) - np.asarray(ref.values, np.int64))
        n += d.size
        mism += int((d > 0).sum())
        maxd = max(maxd, int(d.max(initial=0)))
    out = np.asarray(out)
    assert out.shape == ref_out.shape and out.dtype == np.float32
    out_mism = int((out != ref_out).sum())
    if call:  # the serving program (its own compile) returns the same floats
        np.testing.assert_array_equal(np.asarray(program(x)), out)
    return dict(n=n + out.size, mism=mism + out_mism, maxd=maxd, layers=len(ref_trace))


# Half of the models run by default (every engine, family and block); the other half is
# the slow sweep (XLA compiles each imported model: about 2 s per model on 2 cores).
CORE = [c for c, core in _cases() if core]
EXTENDED = [c for c, core in _cases() if not core]


def _sweep(cases, label):
    threads = torch.get_num_threads()
    engine = torch.backends.quantized.engine
    torch.set_num_threads(1)
    supported = set(torch.backends.quantized.supported_engines)
    res = {}
    try:
        for i, (eng, fam, seed, variant, mode, fuse, opts) in enumerate(cases):
            if eng not in supported:
                continue
            r = _compare(eng, fam, seed, variant, mode, fuse, opts, call=i % 5 == 0)
            agg = res.setdefault(eng, {}).setdefault(
                fam, dict(models=0, n=0, mism=0, maxd=0, layers=0)
            )
            agg["models"] += 1
            agg["n"] += r["n"]
            agg["mism"] += r["mism"]
            agg["maxd"] = max(agg["maxd"], r["maxd"])
            agg["layers"] += r["layers"]
    finally:
        torch.set_num_threads(threads)
        torch.backends.quantized.engine = engine
    print(f"\nimported torch models vs torch, {label} (models, activations, values, mismatches):")
    for eng, fams in res.items():
        for fam, a in fams.items():
            print(
                f"  {eng:8s} {fam:7s} models={a['models']:2d} layers={a['layers']:3d} "
                f"values={a['n']:7,d} mismatches={a['mism']} max_diff={a['maxd']}"
            )
    return res


@pytest.fixture(scope="module")
def results():
    return _sweep(CORE, "core")


@pytest.fixture(scope="module")
def results_extended():
    return _sweep(EXTENDED, "extended")


def test_plan_has_at_least_50_models():
    assert len(CORE) + len(EXTENDED) >= 50
    for cases in (CORE, EXTENDED):
        assert {c[4] for c in cases} == {"eager", "fx"}
        assert {c[1] for c in cases} == {"mlp", "cnn", "conv1d"}
        assert {c[0] for c in cases} == set(PLAN)
    assert {c[6]["block"] for c in CORE if c[1] == "cnn"} == set(tm.BLOCKS)
    assert {c[6]["pool"] for c in CORE if c[1] == "cnn"} == set(tm.POOLS)


def _check_exact(res, engine, min_models):
    if engine not in res:
        pytest.skip(f"torch engine {engine} not available")
    fams = res[engine]
    assert sum(a["models"] for a in fams.values()) >= min_models
    assert sum(a["n"] for a in fams.values()) > 2_000
    for fam, a in fams.items():
        assert a["mism"] == 0, (engine, fam, a)


def _check_rule_13(res, engine):
    if engine not in res:
        pytest.skip(f"torch engine {engine} not available")
    n = sum(a["n"] for a in res[engine].values())
    mism = sum(a["mism"] for a in res[engine].values())
    assert n > 2_000
    assert max(a["maxd"] for a in res[engine].values()) <= 1, res[engine]
    assert mism <= math.ceil(2e-6 * n), res[engine]


@pytest.mark.parametrize("engine", ["fbgemm", "qnnpack"])
def test_bit_exact_with_torch(engine, results):
    _check_exact(results, engine, 6)


@pytest.mark.parametrize("engine", ["x86", "onednn"])
def test_onednn_conv_within_rule_13(engine, results):
    _check_rule_13(results, engine)


@pytest.mark.slow
@pytest.mark.parametrize("engine", ["fbgemm", "qnnpack", "x86", "onednn"])
def test_extended_sweep(engine, results_extended):
    if engine in ("fbgemm", "qnnpack"):
        _check_exact(results_extended, engine, 6)
    else:
        _check_rule_13(results_extended, engine)


@pytest.mark.skipif(not VNNI, reason="on CPUs without VNNI every FBGEMM conv saturates")
def test_fbgemm_depthwise_3x3_fast_path_saturates_like_torch(monkeypatch):
    """FBGEMM's direct depthwise 3x3 kernel saturates pairs to int16 even with VNNI (rule
    14): the importer runs it with ``accumulate="fbgemm_sat16"``; exact accumulation
    would differ from torch on this model."""
    torch.backends.quantized.engine = "fbgemm"
    torch.set_num_threads(1)
    model, x = tm.build("cnn", 5, "fbgemm", "wide", "eager", block="dw", width=16, dw=True)
    ref = qtorch.torch_trace(model, x)

    def mismatches(program):
        trace = program.trace(x)
        return sum(
            int((np.asarray(trace[k].values) != np.asarray(r.values)).sum()) for k, r in ref.items()
        )

    program = qtorch.import_model(model, x, engine="fbgemm")
    assert program.layers["b1"].extra["accumulate"] == "fbgemm_sat16"
    assert int(ref["stem_act"].values.max()) > 127
    assert mismatches(program) == 0
    from qjax.converters import _torch_ops

    monkeypatch.setattr(_torch_ops, "fbgemm_depthwise_fast_path", lambda *a: False)
    exact = qtorch.import_model(model, x, engine="fbgemm")
    assert exact.layers["b1"].extra["accumulate"] == "exact"
    assert mismatches(exact) > 0


# ---------------------------------------------------------------------------------------
# program: inputs, compiles, layers, the int8-only jaxpr


@pytest.fixture(scope="module")
def cnn_x86():
    eng = torch.backends.quantized.engine
    torch.backends.quantized.engine = "x86"
    try:
        model, x = tm.build("cnn", 7, "x86", "default", "fx", block="dw", pool="avg")
        program = qtorch.import_model(model, x, engine="x86")
    finally:
        torch.backends.quantized.engine = eng
    return model, x, program


def test_inputs_numpy_jax_torch_and_one_compile_per_shape(cnn_x86):
    model, x, program = cnn_x86
    y = np.asarray(program(x))
    np.testing.assert_array_equal(np.asarray(program(x.numpy())), y)
    np.testing.assert_array_equal(np.asarray(program(jnp.asarray(x.numpy()))), y)
    count = program.compile_count
    program(x)
    assert program.compile_count == count
    x2 = torch.cat([x, x])
    y2 = np.asarray(program(x2))
    assert program.compile_count == count + 1
    np.testing.assert_array_equal(y2[: x.shape[0]], y)
    with pytest.raises(TypeError, match="takes 1 input"):
        program(x, x)
    with pytest.raises(TypeError, match="quantized torch tensors"):
        program(torch.quantize_per_tensor(x, 0.1, 0, torch.quint8))


def test_freeze_serves_the_same_with_the_params_compiled_in(cnn_x86):
    """``Program.freeze``: the same outputs at every shape, the params not arguments of
    the compiled program (one leaf in: the input), and later edits reach only the
    program."""
    model, x, program = cnn_x86
    frozen = program.freeze()
    x2 = torch.cat([x, x])
    for v in (x, x2):
        np.testing.assert_array_equal(np.asarray(frozen(v)), np.asarray(program(v)))
    lowered = frozen._run(program).lower((jnp.asarray(x.numpy()),))
    assert lowered.in_tree.num_leaves == 1
    assert jax.tree_util.tree_structure(program.params).num_leaves > 10
    w, b, *rest = program.params["fc"]
    y = np.asarray(frozen(x))
    try:
        program.params["fc"] = (w, b + 1.0, *rest)
        assert (np.asarray(program(x)) != y).any()  # the edit changes the program's outputs
        np.testing.assert_array_equal(np.asarray(frozen(x)), y)  # not the frozen one's
        np.testing.assert_array_equal(np.asarray(program.freeze()(x)), np.asarray(program(x)))
    finally:
        program.params["fc"] = (w, b, *rest)
    assert "FrozenProgram(Program(" in repr(frozen)


def test_layers_metadata(cnn_x86):
    model, x, program = cnn_x86
    layers = program.layers
    mods = dict(model.named_modules())
    convs = {k: v for k, v in layers.items() if v.op == "conv2d"}
    linears = {k: v for k, v in layers.items() if v.op == "linear"}
    assert convs and linears
    for name, lay in convs.items():
        assert lay.scheme == "onednn"  # x86: oneDNN for symmetric weights
        mod = mods[name]
        np.testing.assert_array_equal(
            np.asarray(lay.weight.scale), mod.weight().q_per_channel_scales().numpy()
        )
        assert float(lay.out.scale) == np.float32(mod.scale)
        assert int(lay.out.zero_point) == mod.zero_point
    for lay in linears.values():
        assert lay.scheme == "fbgemm"  # x86: FBGEMM for linear
    assert list(layers)[0] == "quantize_per_tensor" and layers["quantize_per_tensor"].out


def _eqns(jaxpr):
    for e in jaxpr.eqns:
        yield e
        for v in e.params.values():
            for sub in v if isinstance(v, (list, tuple)) else [v]:
                if isinstance(sub, jax.extend.core.ClosedJaxpr):
                    yield from _eqns(sub.jaxpr)
                elif isinstance(sub, jax.extend.core.Jaxpr):
                    yield from _eqns(sub)


def test_program_is_int8_dots_and_convs_only(cnn_x86):
    """At an exact level every dot/conv is int8 x int8 -> int32; at a saturating level
    (int16 pairs, rule 14) no dot or conv runs on floats either."""
    model, x, _ = cnn_x86
    xj = jnp.asarray(x.numpy())
    for isa in ("vnni", "avx2"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            program = qtorch.import_model(model, x, engine="x86", isa=isa)
        jaxpr = jax.make_jaxpr(lambda v, p=program: p(v))(xj)
        names = ("dot_general", "conv_general_dilated")
        heavy = [e for e in _eqns(jaxpr.jaxpr) if e.primitive.name in names]
        for e in heavy:
            dts = [str(v.aval.dtype) for v in e.invars]
            assert all("float" not in d for d in dts), (isa, e.primitive.name, dts)
            assert str(e.outvars[0].aval.dtype) == "int32"
            if isa == "vnni":
                assert dts == ["int8", "int8"], (e.primitive.name, dts)
        if isa == "vnni":
            assert len(heavy) >= 4


# ---------------------------------------------------------------------------------------
# errors name the node, its op and target


def _eager(model, x, engine="fbgemm"):
    torch.backends.quantized.engine = engine
    model.eval().qconfig = tm.get_default_qconfig(engine)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        p = tm.prepare(model)
        p(x)
        return tm.convert(p)


def test_unsupported_module_is_named():
    m = torch.nn.Sequential(
        tm.QuantStub(), torch.nn.Linear(4, 4), torch.nn.LeakyReLU(0.1), tm.DeQuantStub()
    )
    x = torch.randn(3, 4)
    q = _eager(m, x)
    with pytest.raises(NotImplementedError, match=r"node '_2'.*call_module.*LeakyReLU"):
        qtorch.import_model(q, x, engine="fbgemm")


class _Sig(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.q, self.dq, self.fc = tm.QuantStub(), tm.DeQuantStub(), torch.nn.Linear(4, 4)

    def forward(self, x):
        return self.dq(torch.sigmoid(self.fc(self.q(x))))


def test_unsupported_function_and_float_module_are_named():
    x = torch.randn(3, 4)
    q = _eager(_Sig(), x)
    with pytest.raises(NotImplementedError, match=r"node 'sigmoid'.*call_function.*sigmoid"):
        qtorch.import_model(q, x, engine="fbgemm")
    float_model = torch.nn.Sequential(torch.nn.Linear(4, 2)).eval()
    with pytest.raises(NotImplementedError, match=r"node '_0'.*torch.nn.modules.linear.Linear"):
        qtorch.import_model(float_model, x)


def test_bad_engine_and_inputs():
    q = _eager(_Sig(), torch.randn(3, 4))
    with pytest.raises(ValueError, match="unknown engine 'fbgem'"):
        qtorch.import_model(q, torch.randn(3, 4), engine="fbgem")
    with pytest.raises(TypeError, match="expected a torch.nn.Module"):
        qtorch.import_model(object(), torch.randn(3, 4))


# ---------------------------------------------------------------------------------------
# fbgemm_avx2: FBGEMM's int16 saturation (rule 14), torch forced to AVX2 in a subprocess

_AVX2_SCRIPT = textwrap.dedent(
    """
    import sys, warnings
    import numpy as np, torch
    sys.path.insert(0, {tests!r})
    import _torch_models as tm
    from qjax.converters import torch as qtorch
    warnings.simplefilter("ignore")
    torch.set_num_threads(1)
    torch.backends.quantized.engine = "fbgemm"
    torch.manual_seed(0)
    m = torch.nn.Sequential(
        tm.QuantStub(), torch.nn.Linear(16, 64), torch.nn.ReLU(),
        torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Linear(32, 8), tm.DeQuantStub(),
    ).eval()
    with torch.no_grad():  # large weights: pairs of u8 x s8 products past the int16 range
        for fc in (m[1], m[3], m[5]):
            fc.weight.mul_(6.0)
    tm.fuse_modules(m, [["1", "2"], ["3", "4"]], inplace=True)
    m.qconfig = tm.qconfig("fbgemm", "per_tensor")
    m.qconfig = m.qconfig._replace(
        activation=tm.MinMaxObserver.with_args(dtype=torch.quint8, reduce_range=False))
    x = torch.rand(64, 16) * 4
    p = tm.prepare(m); p(x); q = tm.convert(p)
    ref = qtorch.torch_trace(q, x)
    codes = int(ref["_2"].values.max())
    counts = {{}}
    # default: the level torch runs at here (the switch says AVX2); the alias; and the
    # exact accumulation of a VNNI CPU, which must differ
    for key, engine, isa in (("here", "fbgemm", None), ("fbgemm_avx2", "fbgemm_avx2", None),
                             ("vnni", "fbgemm", "vnni")):
        program = qtorch.import_model(q, x, engine=engine, isa=isa)
        assert program.level == ("vnni" if isa else "avx2"), program.level
        trace = program.trace(x)
        counts[key] = sum(
            int((np.asarray(trace[k].values) != np.asarray(r.values)).sum())
            for k, r in ref.items())
    n = sum(r.values.size for r in ref.values())
    print("values", n, "max code", codes, "mismatches", counts)
    assert codes > 127 and counts["here"] == counts["fbgemm_avx2"] == 0 and counts["vnni"] > 0
    print("AVX2-OK")
    """
)


def test_fbgemm_avx2_saturation_matches_torch_forced_to_avx2():
    tests = os.path.dirname(os.path.abspath(__file__))
    out = run_script(
        _AVX2_SCRIPT.format(tests=tests),
        marker="AVX2-OK",
        env={"FBGEMM_ENABLE_INSTRUCTIONS": "AVX2"},
    )
    print(out)


def test_tflite_and_exact_engines_are_integer_programs_near_torch():
    """The non-torch engines (TFLite fixed point, exact rational requant) run the same graph;
    on an MLP their codes stay within 2 codes of torch's fbgemm ones at every layer."""
    torch.backends.quantized.engine = "fbgemm"
    torch.set_num_threads(1)
    # reduce_range codes (<= 127): no CPU level saturates, so torch's codes are exact sums
    model, x = tm.build("mlp", 11, "fbgemm", "default", "eager")
    ref = qtorch.torch_trace(model, x)
    for engine in ("tflite", "exact"):
        program = qtorch.import_model(model, x, engine=engine)
        assert {lay.scheme for lay in program.layers.values() if lay.op == "linear"} == {engine}
        trace = program.trace(x)
        assert list(trace) == list(ref)
        for k, r in ref.items():
            d = np.abs(np.asarray(trace[k].values, np.int64) - np.asarray(r.values, np.int64))
            assert d.max(initial=0) <= 2, (engine, k, d.max())


class _Hsw(torch.nn.Module):
    """Quant -> Conv -> Hardswish (channels-last codes) -> flatten -> Linear -> Hardswish."""

    def __init__(self):
        super().__init__()
        self.q, self.dq = tm.QuantStub(), tm.DeQuantStub()
        self.conv = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.act1 = torch.nn.Hardswish()
        self.fc = torch.nn.Linear(8 * 5 * 6, 70)  # 70 outputs per row: a scalar tail
        self.act2 = torch.nn.Hardswish()

    def forward(self, x):
        x = self.act1(self.conv(self.q(x)))
        return self.dq(self.act2(self.fc(torch.flatten(x, 1))))


@pytest.mark.parametrize(
    "engine,mode", [("fbgemm", "eager"), ("fbgemm", "fx"), ("qnnpack", "eager"), ("qnnpack", "fx")]
)
def test_hardswish_matches_torch(engine, mode):
    torch.backends.quantized.engine = engine
    torch.set_num_threads(1)
    torch.manual_seed(3)
    model = _Hsw().eval()
    calib, x = torch.randn(16, 3, 5, 6) * 2, torch.randn(3, 3, 5, 6) * 2
    qc = tm.qconfig(engine, "wide")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if mode == "eager":
            model.qconfig = qc
            p = tm.prepare(model)
            p(calib)
            q = tm.convert(p)
        else:
            p = tm.prepare_fx(model, tm.QConfigMapping().set_global(qc), (calib,))
            p(calib)
            q = tm.convert_fx(p)
        ref = qtorch.torch_trace(q, x)
        program = qtorch.import_model(q, x, engine=engine)
        want = q(x).numpy()
    out, trace = program.run_traced(x)
    kinds = {lay.scheme for lay in program.layers.values() if lay.op == "hardswish"}
    assert kinds == {"qnnpack" if engine == "qnnpack" else "aten"}
    assert list(trace) == list(ref)
    for k, r in ref.items():
        np.testing.assert_array_equal(np.asarray(trace[k].values), np.asarray(r.values), err_msg=k)
    np.testing.assert_array_equal(np.asarray(out), want)
