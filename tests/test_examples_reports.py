"""Smoke tests of the two user-report reproductions (examples/*_report.py, iris golden model):
each runs end to end and its printed claims hold, compared with torch at run time."""

import importlib.util
import pathlib

import numpy as np
import pytest

pytest.importorskip("torch")
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::DeprecationWarning")

EXAMPLES = pathlib.Path(__file__).resolve().parents[1] / "examples"


def _load(name):
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_identity_conv_report(capsys):
    out = _load("identity_conv_report").main(rows=2)
    assert out["vs_torch"].ok and out["vs_torch"].values == 3 * 3 * 2 * 256  # quant, conv, act
    conv = out["report"]["conv"]
    # every input code >= 128 lands one code low: 128 per row, 3 channels x 2 rows
    assert (conv.mismatches, conv.max_lsb) == (128 * 6, 1)
    assert conv.first == {"index": [0, 0, 0, 128], "reference": 128, "qjax": 127}
    assert conv.ref_range == (0, 255) and conv.qjax_range == (0, 254)
    (cause,) = conv.causes
    assert cause.rule == "9" and "[127, 128] (duplicate)" in cause.message
    assert "never produced: [255]" in cause.message and "[-127, 127]" in cause.fix
    assert out["report"]["act"].propagated_from == "conv"
    assert out["weight_codes"] == [0, 127] and out["fixed_weight_codes"] == [0, 127]
    assert all(v == (0, 254, 255) for v in out["engines"].values())
    assert out["fixed"].ok and out["fixed_vs_torch"].ok and all(out["fixed_engines"].values())
    text = capsys.readouterr().out
    assert "weight_at_clamp_bound" in text and "identity on every engine" in text
    assert np.isfinite(conv.rate)


def test_iris_golden_model(capsys):
    out = _load("iris_golden_model").main(epochs=10)
    here = out["here"]
    assert here.values == 150 * (4 + 16 + 16 + 3)  # quant, fc1, relu1, fc2
    assert here.ok  # the import follows this machine's CPU level (rule 14 or exact)
    # the user's arithmetic: within the int32 bias rounding of qjax's exact engine, and
    # exact once the bias is kept unrounded
    for la in out["vs_hand"].layers:
        assert la.max_lsb <= 1
        assert la.mismatches == 0 or [c.rule for c in la.causes] == ["11,12"]
    assert out["vs_hand_unrounded_bias"].ok and out["vs_hand_unrounded_bias"].values == 2850
    avx2 = out["avx2"]
    assert avx2["level"] == "avx2"
    assert avx2["x86_here"]["ok"] and avx2["x86_here"]["values"] == here.values
    assert avx2["acc_qjax_avx2"] == avx2["acc_torch_avx2"] and avx2["max_logit_diff"] == 0.0
    exact = {la["name"]: la for la in avx2["x86_vnni"]["layers"]}
    assert exact["fc1"]["mismatches"] > 0 and exact["fc1"]["max_lsb"] > 10  # rule 14 drift
    assert [c["name"] for c in exact["fc1"]["causes"]] == ["level_mismatch"]
    assert exact["quant"]["mismatches"] == 0
    text = capsys.readouterr().out
    assert "level_mismatch" in text and "(avx2) vs torch under AVX2: 0 of" in text
