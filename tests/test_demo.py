"""``qjax demo --quick``: the end-to-end job runs, writes its summary and plots, and the
exactness it promises holds (served == frozen QAT, torch parity 0 mismatches on fbgemm)."""

import json

import jax
import pytest

pytest.importorskip("torch")
pytest.importorskip("sklearn")
pytest.importorskip("matplotlib")

ACCURACY_ROWS = (
    "float (JAX, Flax NNX)",
    "PTQ int8 served (torch x86 preset)",
    "QAT fake-quant (frozen)",
    "QAT int8 served",
)


def test_demo_quick_end_to_end(tmp_path, capsys):
    from qjax._cli import main

    out = tmp_path / "demo"
    # optax's adam is not strict-promotion clean (int32 step count ** float)
    with jax.numpy_dtype_promotion("standard"):
        rc = main(["demo", "--quick", "--out", str(out), "--seed", "1"])
    printed = capsys.readouterr().out
    assert rc == 0, printed
    for name in ("summary.md", "summary.json", "histograms.png", "sqnr.png", "accuracy.png"):
        assert (out / name).stat().st_size > 0, name
    for name in ("histograms.png", "sqnr.png", "accuracy.png"):
        assert (out / name).read_bytes()[:4] == b"\x89PNG", name

    s = json.loads((out / "summary.json").read_text())
    for key in ("accuracy", "speed", "engines", "checks", "served_vs_frozen", "stage_seconds",
                "torch_float_max_abs_diff", "sqnr_db", "ok"):  # fmt: skip
        assert key in s, key
    assert s["ok"] is True and all(c["ok"] for c in s["checks"])
    assert tuple(s["accuracy"]) == ACCURACY_ROWS
    accs = list(s["accuracy"].values()) + [e["accuracy"] for e in s["engines"].values()]
    assert all(0.0 <= a <= 1.0 for a in accs)
    assert s["served_vs_frozen"]["mismatches"] == 0
    assert s["served_vs_frozen"]["compared"] == s["n_test"] * 10
    assert s["torch_float_max_abs_diff"] <= 1e-4

    fb = s["engines"]["fbgemm"]
    assert fb["parity"]["mismatches"] == 0 and fb["parity"]["values"] > 10**6
    layers = fb["parity"]["report"]["layers"]
    assert sum(la["values"] for la in layers) == fb["parity"]["values"]
    assert fb["direct"]["values"] > 0 and fb["direct"]["layers"] == 6
    # the input quantizer's qparams come from the same histogram search on the same images
    first = fb["direct"]["per_layer"][0]
    assert first["layer"] == "quant" and first["same_qparams"] and first["mismatches"] == 0
    assert first["torch_outside_qjax_range"] == 0
    # fc has no BN to fold: same float weights, so torch's per-channel weight observer and
    # qjax's give the same scales and codes
    fc = {w["layer"]: w for w in fb["direct"]["weights"]}["fc"]
    assert fc["scales"] == 10 and fc["codes"] == 5120
    assert fc["scale_mismatches"] == 0 and fc["code_mismatches"] == 0

    sp = s["speed"]
    assert sp["batch"] == 256 and sp["float_ms"] > 0 and sp["int8_ms"] > 0
    md = (out / "summary.md").read_text()
    assert "test accuracy, sklearn digits" in md and "parity mismatches" in md
    assert "QAT int8 served == frozen fake-quant" in printed
