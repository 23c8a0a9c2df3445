"""Imported torch (eager / FX) and pt2e programs saved and loaded: ``qjax.save_served`` /
``qjax.load_served`` (format ``qjax.program``, ``"program": "imported"``).

For each model: import -> save -> load; the loaded program's outputs and every code of its
``trace`` equal the imported program's, and torch's own quantized activations and
outputs (run here, exact integers). Then ``jax.export``, ``qjax.parity.compare`` /
``inspect`` and ``qjax inspect`` on a loaded program, other batch sizes, files edited
by hand (each refused with a ``ValueError`` naming the step and the key) and a step
without a description (refused by ``save_served``, naming the step and its op).
"""

from __future__ import annotations

import json
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
pt2e_api = pytest.importorskip("torchao.quantization.pt2e.quantize_pt2e")

import _torch_models as tm  # noqa: E402
from qjax.converters import pt2e  # noqa: E402
from qjax.converters import torch as qtorch  # noqa: E402
from test_converters_pt2e import CNN as Pt2eCNN  # noqa: E402
from test_converters_pt2e import _convert, _x86  # noqa: E402
from test_converters_torch import _Hsw  # noqa: E402
from test_converters_torch_bn import _build as _build_bn  # noqa: E402
from test_flax_program_file import _tampered  # noqa: E402

import qjax  # noqa: E402

# (name, engine, build): eager and FX, per-tensor / per-channel / affine weights, the
# ops the importer has (conv, linear, relu family, add / add_relu / mul / cat, pools,
# hardswish ATen and QNNPACK, batch norm, flatten / reshape / size)
_TORCH = {
    "cnn_add_avg_x86_eager": ("x86", "cnn", 11, "default", "eager", dict(block="add", pool="avg")),
    "cnn_cat_max_fbgemm_fx": ("fbgemm", "cnn", 12, "wide", "fx", dict(block="cat", pool="max")),
    "cnn_addrelu_adaptive_qnnpack_eager": (
        "qnnpack", "cnn", 13, "per_tensor", "eager", dict(block="add_relu", pool="adaptive")
    ),
    "cnn_dw_onednn_fx": ("onednn", "cnn", 14, "wide", "fx", dict(block="dw", pool="avg_pad")),
    "mlp_fbgemm_eager": ("fbgemm", "mlp", 5, "affine_w", "eager", {}),
    "mlp_qnnpack_fx": ("qnnpack", "mlp", 7, "default", "fx", {}),
    "conv1d_x86_fx": ("x86", "conv1d", 4, "per_tensor", "fx", {}),
}  # fmt: skip
_OTHER = ("hardswish_qnnpack_fx", "hardswish_fbgemm_eager", "bn_fbgemm_eager")
_PT2E = ("pt2e_cnn_x86",)  # conv, add, cat, pools on codes; float conv, add, linear
CASES = (*_TORCH, *_OTHER, *_PT2E)


def _hsw(engine, mode):
    torch.manual_seed(3)
    model = _Hsw().eval()
    calib, x = torch.randn(16, 3, 5, 6) * 2, torch.randn(3, 3, 5, 6) * 2
    qc = tm.qconfig(engine, "wide")
    if mode == "eager":
        model.qconfig = qc
        p = tm.prepare(model)
        p(calib)
        return tm.convert(p), x
    p = tm.prepare_fx(model, tm.QConfigMapping().set_global(qc), (calib,))
    p(calib)
    return tm.convert_fx(p), x


def _torch_case(name):
    if name in _TORCH:
        engine, fam, seed, variant, mode, opts = _TORCH[name]
        torch.backends.quantized.engine = engine
        return (engine, *tm.build(fam, seed, engine, variant, mode, **opts))
    engine = name.split("_")[1]
    torch.backends.quantized.engine = engine
    if name.startswith("hardswish"):
        return (engine, *_hsw(engine, name.split("_")[2]))
    return (engine, *_build_bn("conv_bn_relu", 6, engine, 5, "eager"))


def _diff(a, b) -> int:
    a, b = np.asarray(a), np.asarray(b)
    assert a.shape == b.shape and a.dtype == b.dtype
    return int((a != b).sum())


@pytest.fixture(scope="module")
def cases(tmp_path_factory):
    """``{case: (model, x, imported, loaded, path, torch codes, torch output)}``, each
    built on first use (torch with one thread under the case's engine)."""
    folder = tmp_path_factory.mktemp("imported")
    cache = {}

    def get(name):
        if name in cache:
            return cache[name]
        threads, engine0 = torch.get_num_threads(), torch.backends.quantized.engine
        torch.set_num_threads(1)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                if name in _PT2E:
                    xt = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(1))
                    model = _convert(Pt2eCNN().eval(), (xt,), _x86())
                    imported = pt2e.import_pt2e(model, (xt,))
                    ref = _pt2e_codes(model, xt)
                    ref_out = model(xt).detach().numpy()
                    x = xt
                else:
                    engine, model, x = _torch_case(name)
                    imported = qtorch.import_model(model, (x,), engine=engine)
                    ref = qtorch.torch_trace(model, x)
                    with torch.no_grad():
                        ref_out = model(x).numpy()
        finally:
            torch.set_num_threads(threads)
            torch.backends.quantized.engine = engine0
        path = folder / f"{name}.safetensors"
        qjax.save_served(path, imported)
        loaded = qjax.load_served(path)
        cache[name] = (model, x, imported, loaded, path, ref, ref_out)
        return cache[name]

    return get


def _pt2e_codes(gm, x) -> dict:
    """torch's codes at every quantize_per_tensor node of a pt2e graph."""
    out = {}

    class Rec(torch.fx.Interpreter):
        def run_node(self, n):
            v = super().run_node(n)
            if n.op == "call_function" and "quantize_per_tensor" in str(n.target):
                if "dequantize" not in str(n.target):
                    out[n.name] = v.detach().numpy()
            return v

    with torch.no_grad():
        Rec(gm).run(x)
    return out


COUNTS: dict[str, int] = {}


_SLOW = ("mlp_fbgemm_eager", "hardswish_fbgemm_eager")  # the qnnpack FX ones run by default


@pytest.mark.parametrize(
    "case", [pytest.param(c, marks=pytest.mark.slow) if c in _SLOW else c for c in CASES]
)
def test_loaded_equals_imported_and_torch(cases, case):
    model, x, imported, loaded, path, ref, ref_out = cases(case)
    assert [s.spec[0] for s in loaded.steps] == [s.spec[0] for s in imported.steps]
    assert (loaded.engine, loaded.level, loaded.layout) == (
        imported.engine, imported.level, imported.layout
    )  # fmt: skip
    assert loaded.kernels.keys() == imported.kernels.keys()
    out_i, trace_i = imported.run_traced(x)
    out_l, trace_l = loaded.run_traced(x)
    assert list(trace_l) == list(trace_i) and set(ref) <= set(trace_l)
    n = differ = 0
    for k, q in trace_l.items():
        assert q.qparams.spec == trace_i[k].qparams.spec, k
        differ += _diff(q.values, trace_i[k].values) + _diff(q.scale, trace_i[k].scale)
        n += q.values.size
    for k, r in ref.items():  # torch's own codes, at run time
        codes = r.values if hasattr(r, "values") else r
        differ += _diff(trace_l[k].values, codes)
        n += np.size(codes)
    differ += _diff(out_l, out_i)
    n += np.size(ref_out)
    if case in _PT2E:  # a float output (an fc after the last quantize): float32 sums
        np.testing.assert_allclose(np.asarray(out_l), ref_out, rtol=1e-5, atol=1e-5)
    else:  # dequantized codes
        differ += _diff(out_l, ref_out)
        n += np.size(ref_out)
    COUNTS[case] = n
    assert differ == 0, (case, differ, n)
    for name, lay in imported.layers.items():  # reports see the same layers
        got = loaded.layers[name]
        assert (got.op, got.target, got.scheme) == (lay.op, lay.target, lay.scheme), name
        assert {k: v for k, v in got.extra.items() if k != "kernel"} == {
            k: v for k, v in lay.extra.items() if k != "kernel"
        }, name


def test_counts_printed(cases):
    print(f"\nimported vs loaded vs torch: {len(COUNTS)} models, {sum(COUNTS.values())} values")


def test_other_batch_sizes_and_layout_exports(cases):
    _, x, imported, loaded, *_ = cases("conv1d_x86_fx")
    x5 = np.random.default_rng(0).standard_normal((5, *x.shape[1:])).astype(np.float32)
    a, b = imported.run_traced(x5), loaded.run_traced(x5)
    np.testing.assert_array_equal(np.asarray(a[0]), np.asarray(b[0]))
    for k, q in b[1].items():  # NCHW codes (Step.export) as the imported program gives
        assert q.shape == a[1][k].shape, k
        np.testing.assert_array_equal(np.asarray(q.values), np.asarray(a[1][k].values))
    assert any(s.export is not None for s in loaded.steps)


@pytest.mark.parametrize("case", ["conv1d_x86_fx", "pt2e_cnn_x86"])
def test_jax_export_of_a_loaded_program(cases, case):
    _, x, _, loaded, *_ = cases(case)
    x = np.asarray(x)
    exp = jax.export.export(jax.jit(lambda v: loaded(v)))(jax.ShapeDtypeStruct(x.shape, x.dtype))
    back = jax.export.deserialize(exp.serialize())
    np.testing.assert_array_equal(np.asarray(back.call(x)), np.asarray(loaded(x)))


def test_parity_compare_and_inspect_on_a_loaded_program(cases, tmp_path, capsys):
    model, x, _, loaded, path, *_ = cases("mlp_fbgemm_eager")
    torch.backends.quantized.engine, engine0 = "fbgemm", torch.backends.quantized.engine
    try:
        report = qjax.parity.compare(model, loaded, x)
    finally:
        torch.backends.quantized.engine = engine0
    assert report.ok and report.layers
    assert {la.name for la in qjax.parity.inspect(loaded, x).layers} >= set(loaded.trace(x))
    from qjax.cli import main

    np.save(tmp_path / "x.npy", np.asarray(x))
    (tmp_path / "saved.py").write_text(
        "import numpy as np, qjax\n"
        f"def served():\n    return qjax.load_served({str(path)!r}), "
        f"np.load({str(tmp_path / 'x.npy')!r})\n"
    )
    assert main(["inspect", f"{tmp_path / 'saved.py'}:served", "--format", "json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["engine"] == "fbgemm" and {la["op"] for la in out["layers"]} >= {"linear"}
    # the file itself (random inputs at the import's example shapes)
    assert main(["inspect", str(path), "--format", "json"]) == 0
    again = json.loads(capsys.readouterr().out)
    assert [la["name"] for la in again["layers"]] == [la["name"] for la in out["layers"]]
    assert main(["parity", str(path)]) == 2
    assert "a saved qjax program" in capsys.readouterr().err


# ---- files edited by hand -----------------------------------------------------------


def _steps_of(meta, kind):
    return [st for st in meta["steps"] if st["kind"] == kind]


def _attrs(st):
    return st["attrs"]["dict"]


def _edit_ref(meta):
    _attrs(_steps_of(meta, "torch_output")[0])["template"] = {"tuple": [{"ref": 7}]}


def _drop_tensor(meta, tensors):
    key = next(k for k in tensors if k.endswith(".values"))
    del tensors[key]


def _bad_scale(meta, tensors):
    key = next(k for k in tensors if k.endswith(".a.qp.scale"))
    tensors[key] = np.full(tensors[key].shape, -1.0, np.float32)


def _codes_as_float(meta, tensors):
    key = next(k for k in tensors if k.endswith(".values"))
    tensors[key] = tensors[key].astype(np.float32)


def _bias_shape(meta, tensors):
    key = next(k for k in tensors if k.endswith(".p.1"))
    tensors[key] = np.zeros(tensors[key].size + 1, np.float32)


def _example_shape(meta):
    meta["example_shapes"][0][0][1] += 1  # channels: the first conv's weights no longer fit


_TORCH_EDITS = {
    "unknown kind": (lambda m: m["steps"][1].update(kind="torch_system"), None, "unknown kind"),
    "cl not a bool": (
        lambda m: _attrs(m["steps"][0]).update(cl="yes"),
        None,
        "cl 'yes' must be true or false",
    ),
    "unknown scheme": (
        lambda m: _attrs(_steps_of(m, "torch_conv")[0]).update(scheme="fast"),
        None,
        "scheme",
    ),
    "extra attribute": (lambda m: _attrs(m["steps"][0]).update(code="1"), None, "attributes"),
    "ref out of range": (_edit_ref, None, "reference to one of the"),
    "unknown output": (lambda m: m.update(output={"name": "nope"}), None, "output 'nope'"),
    "undefined input": (lambda m: m["steps"][1].update(inputs=["later"]), None, "not defined"),
    "missing tensor": (None, _drop_tensor, "missing tensor"),
    "negative scale": (None, _bad_scale, "scale"),
    "float codes": (None, _codes_as_float, "dtype"),
    "bias shape": (None, _bias_shape, "bias"),
    "example shape": (_example_shape, None, "does not run on its example inputs"),
    "engine": (lambda m: m.update(engine="tpu"), None, "engine 'tpu'"),
}


@pytest.mark.parametrize("edit", list(_TORCH_EDITS))
def test_a_tampered_torch_file_is_refused(cases, tmp_path, edit):
    path = cases("cnn_add_avg_x86_eager")[4]
    meta_edit, tensor_edit, message = _TORCH_EDITS[edit]
    bad = _tampered(path, tmp_path, meta_edit, tensor_edit)
    with pytest.raises(ValueError, match=message) as e:
        qjax.load_served(bad)
    assert "step" in str(e.value) or edit in ("unknown output", "engine", "example shape")


def _float_op(meta, op):
    _attrs(_steps_of(meta, "pt2e_float")[0])["op"] = op


@pytest.mark.parametrize(
    "edit,message",
    [
        (lambda m: _float_op(m, "aten.system.default"), "op 'aten.system.default' must be one of"),
        (lambda m: _float_op(m, {"dict": {"eval": "1"}}), "op"),
        (lambda m: _attrs(_steps_of(m, "pt2e_quantize")[0]).update(spec={"spec": {"signed": "no"}}),
         "spec"),
    ],
)  # fmt: skip
def test_a_tampered_pt2e_file_is_refused(cases, tmp_path, edit, message):
    path = cases("pt2e_cnn_x86")[4]
    with pytest.raises(ValueError, match=message) as e:
        qjax.load_served(_tampered(path, tmp_path, edit))
    assert "step" in str(e.value)


# ---- what cannot be saved ---------------------------------------------------------------


def test_a_step_without_a_description_is_refused_naming_it(tmp_path):
    from qjax import kernels
    from qjax.program import Layer, Program, Step

    qp = qjax.QParams(0.5, 128, qjax.QuantSpec(signed=False))
    p = Program(
        [
            Step("q", lambda _, x: kernels.quantize_input(x, qp), ("x",),
                 layer=Layer("quantize", "my.quantize")),
            Step("out", lambda _, q: kernels.dequantize_output(q), ("q",), traced=False),
        ],
        inputs=("x",), output="out",
    )  # fmt: skip
    with pytest.raises(TypeError, match=r"step 'q' \(quantize, my.quantize\) is a function"):
        qjax.save_served(tmp_path / "p.safetensors", p)
    assert not (tmp_path / "p.safetensors").exists()
    np.testing.assert_array_equal(np.asarray(p(jnp.ones(2))), np.ones(2, np.float32))


def test_a_value_that_cannot_be_written_names_the_step(cases, tmp_path):
    import dataclasses

    from qjax.program import Program

    _, x, imported, *_ = cases("mlp_qnnpack_fx")
    steps = list(imported.steps)
    kind, attrs = steps[0].spec
    steps[0] = dataclasses.replace(steps[0], spec=(kind, {**attrs, "qp": object()}))
    p = Program(steps, imported.inputs, imported.output)
    with pytest.raises(ValueError, match=f"step {steps[0].name!r} .* object value"):
        qjax.save_served(tmp_path / "p.safetensors", p)


def test_kernels_are_chosen_on_load_with_each_layers_accumulation(cases, tmp_path):
    from qjax.kernels import sat16_status

    model, x, *_ = cases("mlp_fbgemm_eager")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        avx2 = qtorch.import_model(model, (x,), engine="fbgemm", isa="avx2")  # int16 pairs
    qjax.save_served(tmp_path / "avx2.safetensors", avx2)
    native = qjax.load_served(tmp_path / "avx2.safetensors", kernel=None)
    xla = qjax.load_served(tmp_path / "avx2.safetensors")  # kernel="xla"
    assert set(native.kernels.values()) == {"sat16" if sat16_status()[0] else "xla"}
    assert native.kernels == avx2.kernels and set(xla.kernels.values()) == {"xla"}
    assert native.layers[next(iter(native.kernels))].extra["accumulate"] == "fbgemm_sat16"
    want = np.asarray(avx2(x))
    for p in (native, xla):
        np.testing.assert_array_equal(np.asarray(p(x)), want)
