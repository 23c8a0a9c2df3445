"""``qjax demo --quick``: the end-to-end job runs, writes its summary and plots, and the
exactness it promises holds (served == frozen QAT, torch parity 0 mismatches on fbgemm).

The end-to-end run is compile-bound (about 110 s on 2 cores: a dozen XLA programs), so it
is in the ``slow`` set; the default run checks the torch twin of the model and the
summary rendering."""

import json

import jax
import pytest

pytest.importorskip("torch")
pytest.importorskip("sklearn")
pytest.importorskip("matplotlib")

from qjax.kernels import host_level  # noqa: E402

ACCURACY_ROWS = (
    "float (JAX, Flax NNX)",
    "PTQ int8 served (torch x86 preset)",
    "QAT fake-quant (frozen)",
    "QAT int8 served",
)


@pytest.mark.slow
def test_demo_quick_end_to_end(tmp_path, capsys):
    from qjax.cli import main

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
    assert fb["level"] == host_level()  # the engine emulates torch at this CPU's level
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


def test_torch_twin_has_the_same_float_logits():
    import jax.numpy as jnp
    import numpy as np
    import torch
    from flax import nnx

    from qjax.demo._data import make_model
    from qjax.demo._torch import to_nchw, torch_float_model
    from qjax.flax import Mode, default_qconfig
    from qjax.flax import nnx as qnnx

    model = make_model(nnx.Rngs(3), default_qconfig("x86"))
    layers = model.layers
    rng = np.random.default_rng(0)
    for q in (layers[1], layers[2]):  # BN statistics away from the identity
        n = q.bn_mean[...].shape[0]
        q.bn_mean[...] = jnp.asarray(rng.normal(0, 0.3, n), jnp.float32)
        q.bn_var[...] = jnp.asarray(rng.uniform(0.5, 2.0, n), jnp.float32)
        q.bn_scale[...] = jnp.asarray(rng.uniform(0.5, 1.5, n), jnp.float32)
    qnnx.set_mode(model, Mode.FLOAT)
    qnnx.freeze_bn_stats(model)
    x = rng.uniform(0, 1, (16, 8, 8, 1)).astype(np.float32)
    want = np.asarray(model(jnp.asarray(x)))
    with torch.no_grad():
        got = torch_float_model(model)(to_nchw(x)).numpy()
    assert got.shape == want.shape == (16, 10)
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
    assert np.abs(want).max() > 0.1  # not trivially zero


def test_summary_files_and_accuracy_figure(tmp_path):
    from qjax.demo._report import plot_accuracy, write_summary

    s = {
        "n_test": 360,
        "accuracy": {ACCURACY_ROWS[0]: 0.99, ACCURACY_ROWS[3]: 0.98},
        "speed": {"batch": 256, "repeats": 3, "float_ms": 2.0, "int8_ms": 1.0, "ratio": 0.5},
        "engines": {
            "fbgemm": {
                "accuracy": 0.97,
                "level": "avx2",
                "parity": {"values": 10, "mismatches": 0, "max_lsb": 0, "promise": "0"},
                "direct": None,
            }
        },
        "checks": [{"name": "served == frozen", "result": "0 of 3600 differ", "ok": True}],
        "stage_seconds": {"float training": 1.0},
    }
    text = write_summary(s, tmp_path)
    assert "99.0%" in text and "0 / 10" in text and "0.50x" in text
    md = (tmp_path / "summary.md").read_text()
    assert (
        "| fbgemm | avx2 | 97.0% | 0 / 10 |" in md and "stage times (s): float training 1.0" in md
    )
    assert json.loads((tmp_path / "summary.json").read_text())["speed"]["batch"] == 256
    png = plot_accuracy(s, tmp_path / "accuracy.png")
    assert png.read_bytes()[:4] == b"\x89PNG"
