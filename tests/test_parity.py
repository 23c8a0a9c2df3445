"""qjax.parity: counting, the rulebook (one test per cause, on torch's own numbers where
the cause is torch's), rendering (rich, plain, markdown, JSON)."""

import json
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _helpers import run_script, tie_heavy

import qjax
from qjax import QArray, QParams, QuantSpec
from qjax.kernels import prepare_conv, prepare_linear, quantized_conv, quantized_linear
from qjax.parity import _rules as rules

torch = pytest.importorskip("torch")
pytestmark = pytest.mark.filterwarnings(
    "ignore:.*quantized tensor creation", "ignore::DeprecationWarning"
)

U8 = QuantSpec(signed=False)
W8 = QuantSpec(signed=True, symmetric=True)


def _ev(name="l", kind="linear", *args, **kw):
    return rules.LayerEvidence(name, kind, *args, **kw)


def test_import_qjax_does_not_import_torch():
    script = "import sys, qjax; qjax.parity.compare; assert 'torch' not in sys.modules; print('ok')"
    run_script(script, marker="ok")


# ---- counting -----------------------------------------------------------------------


def test_compare_traces_counts_and_first_mismatch(rng):
    ref = rng.integers(0, 256, (4, 5, 6)).astype(np.uint8)
    got = ref.copy()
    got[1, 2, 3] += 1
    got[3, 0, 0] = (int(got[3, 0, 0]) + 5) % 256
    mine = {"a": QArray(jnp.asarray(got), QParams(0.1, 0, U8)), "only_qjax": ref}
    r = qjax.parity.compare_traces({"a": ref, "only_ref": ref}, mine)
    la = r["a"]
    assert (la.values, la.mismatches) == (120, 2)
    assert la.max_lsb == max(1, abs(int(got[3, 0, 0]) - int(ref[3, 0, 0])))
    assert la.first == {
        "index": [1, 2, 3],
        "reference": int(ref[1, 2, 3]),
        "qjax": int(got[1, 2, 3]),
    }
    assert not r.ok and r.mismatches == 2
    assert any("only_qjax" in n for n in r.notes) and any("only_ref" in n for n in r.notes)


def test_compare_traces_shape_mismatch_is_a_note_and_bad_codes_are_errors():
    qa = QArray(jnp.zeros((2, 3), jnp.uint8), QParams(0.1, 0, U8))
    r = qjax.parity.compare_traces({"a": np.zeros((3, 2), np.uint8)}, {"a": qa})
    assert r.layers == () and "shape" in r.notes[0]
    with pytest.raises(TypeError, match="reference layer 'a'.*float32"):
        qjax.parity.compare_traces({"a": np.zeros((2, 3), np.float32)}, {"a": qa})
    with pytest.raises(ValueError, match="torch_model or a reference"):
        qjax.parity.compare(None, None, np.zeros(3, np.float32))


def test_compare_takes_torch_quantized_tensors_as_reference():
    x = torch.linspace(-1, 1, 50)
    tq = torch.quantize_per_tensor(x, 0.01, 128, torch.quint8)
    qp = QParams(np.float32(0.01), 128, U8)
    mine = QArray.quantize(jnp.asarray(x.numpy()), qp, compat="torch")
    r = qjax.parity.compare_traces({"q": tq}, {"q": mine})
    assert r.ok and r.values == 50


# ---- rule 9: convert's clamp of the largest weight -------------------------------------


def _torch_symmetric_weight(w, quant_min=-128, quant_max=127):
    obs = torch.ao.quantization.MinMaxObserver(
        dtype=torch.qint8,
        qscheme=torch.per_tensor_symmetric,
        quant_min=quant_min,
        quant_max=quant_max,
    )
    obs(w)
    s, z = obs.calculate_qparams()
    q = torch.quantize_per_tensor(w, float(s), int(z), torch.qint8)
    spec = QuantSpec(signed=True, symmetric=True, quant_min=quant_min, quant_max=quant_max)
    return QArray(jnp.asarray(q.int_repr().numpy()), QParams(np.float32(s), int(z), spec))


@pytest.mark.parametrize("k", [1.0, 0.37])
def test_rule9_weight_at_clamp_bound_on_torch_observer_weights(k):
    # The identity conv of the forum report: torch's calculate_qparams clamps k to 127.
    w = _torch_symmetric_weight(k * torch.eye(3))
    assert int(w.values.max()) == 127 and int(w.values.min()) == 0
    risk = rules.weight_at_clamp_bound(_ev(kind="conv2d", weight=w))
    assert risk.rule == "9" and risk.strength == "risk" and "[-127, 127]" in risk.fix
    # against a fake-quant reference with mismatches: likely, with the lost bins named
    ref, got = np.arange(256), np.minimum(np.round(np.arange(256) * 254 / 255), 255)
    ev = _ev(
        kind="conv2d",
        weight=w,
        codes=got.astype(np.int64),
        ref_codes=ref,
        reference_kind="fake_quant",
    )
    cause = rules.weight_at_clamp_bound(ev)
    assert cause.strength == "likely" and "255" in cause.message and "duplicate" in cause.message
    # a converted model against itself cannot show it; nor can a clean comparison
    assert (
        rules.weight_at_clamp_bound(_ev(kind="conv2d", weight=w, codes=got, ref_codes=ref)) is None
    )
    ev_same = _ev(kind="conv2d", weight=w, codes=ref, ref_codes=ref, reference_kind="fake_quant")
    assert rules.weight_at_clamp_bound(ev_same) is None


def test_rule9_not_named_for_narrow_range_affine_or_a_stored_qmin():
    narrow = _torch_symmetric_weight(torch.eye(3), quant_min=-127)
    assert int(narrow.values.max()) == 127
    assert rules.weight_at_clamp_bound(_ev(weight=narrow)) is None
    neg = _torch_symmetric_weight(-torch.eye(3))  # the negative extreme is lost the same way
    assert int(neg.values.min()) == -127
    assert rules.weight_at_clamp_bound(_ev(weight=neg)).rule == "9"
    has_min = QArray(jnp.array([[-128, 5], [127, 0]], jnp.int8), QParams(0.1, 0, W8))
    assert rules.weight_at_clamp_bound(_ev(weight=has_min)) is None
    affine = QArray(jnp.array([[127, 5]], jnp.int8), QParams(0.1, -3, QuantSpec()))
    assert rules.weight_at_clamp_bound(_ev(weight=affine)) is None


# ---- rule 14: int16 saturation ---------------------------------------------------------


def _sat_layer(rng, hi):
    x = QArray(jnp.asarray(rng.integers(0, hi, (64, 16)).astype(np.uint8)), QParams(0.05, 128, U8))
    wv = rng.integers(-127, 128, (16, 8)).astype(np.int8)
    w = prepare_linear(QArray(jnp.asarray(wv), QParams(np.float32(0.01), 0, W8)))
    out = QParams(np.float32(0.2), 128, U8)
    b = jnp.asarray(rng.standard_normal(8).astype(np.float32))
    lin = jax.jit(
        lambda x, w, b, o, acc: quantized_linear(x, w, b, o, accumulate=acc), static_argnums=4
    )
    return x, w, lin(x, w, b, out, "exact"), lin(x, w, b, out, "fbgemm_sat16")


def test_rule14_int16_saturation_explains_sat16_vs_exact(rng):
    x, w, exact, sat = _sat_layer(rng, 256)
    ev = _ev(
        engine="fbgemm",
        codes=np.asarray(exact.values),
        ref_codes=np.asarray(sat.values),
        weight=w.weight,
        input_codes=np.asarray(x.values),
        input_qparams=x.qparams,
    )
    n, worst, _ = rules._mismatch_stats(ev)
    assert n > 0 and worst > 1
    cause = rules.int16_saturation(ev)
    assert cause.rule == "14" and cause.strength == "likely" and "isa='avx2'" in cause.fix
    assert rules.int16_saturation(_ev(**{**ev.__dict__, "engine": "qnnpack"})) is None
    assert rules.int16_saturation(_ev(**{**ev.__dict__, "engine": "onednn"})) is not None
    # both levels known: level_mismatch names it instead (rule 14 once, not twice)
    lv = _ev(**{**ev.__dict__, "level": "vnni", "reference_level": "avx2"})
    assert rules.int16_saturation(lv) is None
    assert [c.name for c in rules.diagnose(lv)] == ["level_mismatch"]
    same = _ev(**{**ev.__dict__, "level": "avx2", "reference_level": "avx2"})
    assert rules.level_mismatch(same) is None
    risk = rules.int16_saturation(_ev(**{**ev.__dict__, "ref_codes": None}))
    assert risk.strength == "risk"


def test_rule14_not_named_when_codes_stay_below_128(rng):
    x, w, exact, sat = _sat_layer(rng, 128)
    assert np.array_equal(exact.values, sat.values)  # reduce_range-sized codes never saturate
    ev = _ev(
        engine="x86", weight=w.weight, input_codes=np.asarray(x.values), input_qparams=x.qparams
    )
    assert rules.int16_saturation(ev) is None


def test_rule14_conv_counts_weight_pairs_along_k(rng):
    # K runs (kh, kw, c_in): weights (127, 127) in one pair saturate with codes > 129;
    # an identity weight (one nonzero per pair) never does. Checked against the kernels.
    x = QArray(
        jnp.asarray(rng.integers(150, 256, (1, 4, 3, 3)).astype(np.uint8)), QParams(0.05, 128, U8)
    )
    out = QParams(np.float32(0.5), 128, U8)
    conv = jax.jit(
        lambda x, w, o, acc: quantized_conv(x, w, None, o, accumulate=acc), static_argnums=3
    )
    for oihw, expect in (
        (np.eye(4, dtype=np.int8).reshape(4, 4, 1, 1) * 127, None),
        (np.full((2, 4, 1, 1), 127, np.int8), "14"),
    ):
        w = prepare_conv(QArray(jnp.asarray(oihw), QParams(np.float32(0.01), 0, W8)))
        exact = conv(x, w, out, "exact")
        sat = conv(x, w, out, "fbgemm_sat16")
        assert np.array_equal(exact.values, sat.values) == (expect is None)
        ev = _ev(
            "c",
            "conv2d",
            scheme="fbgemm",
            weight=w.weight,
            input_codes=np.asarray(x.values),
            input_qparams=x.qparams,
        )
        cause = rules.int16_saturation(ev)
        assert (cause.rule if cause else None) == expect


# ---- rules 1 vs 4: zero point before / after rounding ------------------------------------


@pytest.mark.parametrize("zp", [3, 77])
def test_rule1_vs_4_ties_confirmed_on_torch(rng, zp):
    s = np.float32(1 / 3)
    x = tie_heavy(rng, s, (4096,), -zp, 255 - zp)
    xt = torch.from_numpy(x)
    real = torch.quantize_per_tensor(xt, float(s), zp, torch.quint8).int_repr().numpy()
    fq = torch.fake_quantize_per_tensor_affine(xt, float(s), zp, 0, 255).numpy()
    fq_codes = (np.round(fq.astype(np.float64) / float(s)) + zp).astype(np.int64)
    ev = _ev(
        "quant",
        "quantize",
        codes=real,
        ref_codes=fq_codes,
        float_input=x,
        out_qparams=QParams(s, zp, U8),
        reference_kind="fake_quant",
    )
    n, worst, _ = rules._mismatch_stats(ev)
    assert n > 100 and worst == 1  # ties differ by one code, nothing else
    cause = rules.zero_point_tie(ev)
    assert (
        cause.strength == "confirmed"
        and f"{n} of {n} mismatches are within a float32 ulp of a tie" in cause.message
    )


def test_rule1_vs_4_even_zero_point_differs_only_next_to_ties(rng):
    s = np.float32(1 / 3)
    x = tie_heavy(rng, s, (4096,), -100, 100)
    xt = torch.from_numpy(x)
    real = torch.quantize_per_tensor(xt, float(s), 128, torch.quint8).int_repr().numpy()
    fq = torch.fake_quantize_per_tensor_affine(xt, float(s), 128, 0, 255).numpy()
    fq_codes = (np.round(fq.astype(np.float64) / float(s)) + 128).astype(np.int64)
    qp = QParams(s, 128, U8)
    ev = _ev(
        "quant",
        "quantize",
        codes=real,
        ref_codes=fq_codes,
        float_input=x,
        out_qparams=qp,
        reference_kind="fake_quant",
    )
    assert rules._mismatch_stats(ev)[0] > 0  # fma rounds once at |v + 128|: near-tie flips
    assert rules.zero_point_tie(ev).strength == "confirmed"
    assert rules.zero_point_tie(_ev("quant", "quantize", out_qparams=qp)) is None  # no risk
    far = x + np.float32(0.25) * s  # quarter steps away from every tie: nothing differs
    far_real = torch.quantize_per_tensor(torch.from_numpy(far), float(s), 127, torch.quint8)
    far_fq = torch.fake_quantize_per_tensor_affine(torch.from_numpy(far), float(s), 127, 0, 255)
    far_codes = (np.round(far_fq.numpy().astype(np.float64) / float(s)) + 127).astype(np.int64)
    assert np.array_equal(far_real.int_repr().numpy(), far_codes)


# ---- rule 18: reduce_range output clamp --------------------------------------------------


def test_rule18_reduce_range_clamp_on_torch(rng):
    x = torch.from_numpy(rng.uniform(-1, 4, 2000).astype(np.float32))
    s, zp = 0.02, 20
    fq = torch.fake_quantize_per_tensor_affine(x, s, zp, 0, 127).numpy()  # QAT: reduce_range
    ref = (np.round(fq.astype(np.float64) / s) + zp).astype(np.int64)
    got = torch.quantize_per_tensor(x, s, zp, torch.quint8).int_repr().numpy()  # converted
    ev = _ev("fc", "linear", codes=got, ref_codes=ref, reference_kind="fake_quant")
    cause = rules.reduce_range_clamp(ev)
    assert cause.rule == "18" and cause.strength == "confirmed"
    got2 = got.copy()
    got2[np.argmax(ref < 100)] += 1  # a mismatch away from the clamp: not this rule
    assert rules.reduce_range_clamp(_ev("fc", "linear", codes=got2, ref_codes=ref)) is None


# ---- rule 13: oneDNN epilogue ----------------------------------------------------------


def test_rule13_onednn_epilogue_only_for_rare_one_lsb_on_onednn():
    ref = np.zeros(200_000, np.int64)
    got = ref.copy()
    got[[5, 99_000]] = 1
    assert rules.onednn_epilogue(_ev("c", "conv2d", "x86", got, ref)).strength == "likely"
    assert rules.onednn_epilogue(_ev("c", "linear", "onednn", got, ref)) is not None
    assert rules.onednn_epilogue(_ev("c", "conv2d", "fbgemm", got, ref)) is None
    assert rules.onednn_epilogue(_ev("c", "linear", "x86", got, ref)) is None  # x86 linear: FBGEMM
    many = ref.copy()
    many[::100] = 1  # 1% of outputs: not oneDNN's rounding order
    assert rules.onednn_epilogue(_ev("c", "conv2d", "x86", many, ref)) is None
    two = got.copy()
    two[5] = 2
    assert rules.onednn_epilogue(_ev("c", "conv2d", "x86", two, ref)) is None


# ---- rules 11 vs 12: bias rounding -----------------------------------------------------


def test_rule11_vs_12_bias_rounding_hand_simulation(rng):
    # A hand simulation that rounds the bias to int32 (the Iris report) vs qjax's fbgemm.
    xv = rng.integers(0, 128, (512, 8)).astype(np.uint8)
    wv = rng.integers(-127, 128, (8, 4)).astype(np.int8)
    s_x, s_w, s_y = np.float32(0.03), np.float32(0.011), np.float32(0.05)
    b = (rng.standard_normal(4) * 0.3).astype(np.float32)
    x = QArray(jnp.asarray(xv), QParams(s_x, 64, U8))
    w = QArray(jnp.asarray(wv), QParams(s_w, 0, W8))
    y = quantized_linear(x, w, jnp.asarray(b), QParams(s_y, 128, U8), scheme="fbgemm")
    acc = (xv.astype(np.int64) - 64) @ wv.astype(np.int64)
    acc = acc + np.round(b / (s_x * s_w)).astype(np.int64)
    hand = np.clip(np.round(acc * (s_x * s_w / s_y)) + 128, 0, 255).astype(np.int64)
    ev = _ev(
        "fc1", "linear", "fbgemm", np.asarray(y.values), hand, has_bias=True, reference_kind="hand"
    )
    n, worst, _ = rules._mismatch_stats(ev)
    assert n > 0 and worst == 1
    assert rules.bias_rounding(ev).rule == "11,12"
    assert rules.bias_rounding(_ev(**{**ev.__dict__, "reference_kind": "torch"})) is None
    assert rules.bias_rounding(_ev(**{**ev.__dict__, "has_bias": False})) is None


def test_diagnose_runs_every_rule_and_each_has_a_docstring():
    assert len(rules.RULES) == 8
    for rule in rules.RULES:
        assert rule.__doc__ and "Rule" in rule.__doc__.split("\n")[0]
    assert rules.diagnose(_ev("r", "relu", codes=np.zeros(3), ref_codes=np.ones(3))) == []


# ---- rendering ---------------------------------------------------------------------------


def _report():
    ref = np.arange(256, dtype=np.int64)
    got = np.minimum(np.round(ref * 254 / 255), 255).astype(np.uint8)
    w = _torch_symmetric_weight(torch.eye(3))
    ev = _ev("conv", "conv2d", "fbgemm", got, ref, weight=w, reference_kind="fake_quant")
    from qjax.parity import ParityReport, _layer_parity

    return ParityReport((_layer_parity(ev, "fbgemm"),), "fbgemm", "fake_quant")


def test_report_renders_as_text_markdown_json_and_rich():
    r = _report()
    la = r["conv"]
    assert (la.mismatches, la.max_lsb, la.first["index"]) == (128, 1, [128])
    text = r.render("text")
    assert "rule 9 weight_at_clamp_bound (likely)" in text and "128 of 256" in text
    md = r.render("markdown")
    assert md.startswith("**qjax parity") and "| conv | conv2d/fbgemm | 256 | 128 |" in md
    d = json.loads(r.render("json"))
    assert d["mismatches"] == 128 and d["layers"][0]["causes"][0]["rule"] == "9"
    assert d["layers"][0]["first"] == {"index": [128], "reference": 128, "qjax": 127}
    rich_text = r.render("rich")
    assert "weight_at_clamp_bound" in rich_text and "conv2d" in rich_text
    with pytest.raises(ValueError, match="format must be"):
        r.render("html")


def test_report_prints_plain_text_without_rich(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "rich", None)  # import rich -> ImportError
    monkeypatch.setitem(sys.modules, "rich.console", None)
    _report().print()
    out = capsys.readouterr().out
    assert out.startswith("qjax parity vs fake_quant") and "rule 9" in out


def test_compare_and_inspect_on_an_imported_model_name_rule14_risk():
    # The Iris report's setup in small: symmetric quint8 activations without reduce_range.
    from qjax.converters.torch import import_model
    from torch.ao import quantization as tq

    torch.backends.quantized.engine = "x86"
    torch.manual_seed(0)
    m = torch.nn.Sequential(
        tq.QuantStub(),
        torch.nn.Linear(8, 16),
        torch.nn.ReLU(),
        torch.nn.Linear(16, 4),
        tq.DeQuantStub(),
    ).eval()
    act = tq.MinMaxObserver.with_args(qscheme=torch.per_tensor_symmetric, dtype=torch.quint8)
    m.qconfig = tq.QConfig(activation=act, weight=tq.default_per_channel_weight_observer)
    p = tq.prepare(m)
    x = torch.randn(64, 8) * 2
    p(x)
    qm = tq.convert(p)
    program = import_model(qm, (x,), engine="x86")
    report = qjax.parity.compare(qm, program, x, engine="x86")
    assert report.ok and report.values == 64 * (8 + 16 + 16 + 4)
    info = {la.name: la for la in qjax.parity.inspect(program, x, engine="x86").layers}
    assert info["_0"].out.endswith("zp=128 [0,255]") and info["_0"].code_range[1] > 127
    rules_of = {n: [c.rule for c in la.risks] for n, la in info.items()}
    assert "14" in rules_of["_1"] and "14" in rules_of["_3"]  # both linears read codes > 127
    assert rules_of["_2"] == []  # relu: no arithmetic
    assert "9" in rules_of["_1"] and info["_1"].weight.startswith("16 ch")
