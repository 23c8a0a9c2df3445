"""Smoke test of examples/cnn_digits.py: train, PTQ, QAT, convert, serve (fewer epochs)."""

import importlib.util
import pathlib

import jax

EXAMPLES = pathlib.Path(__file__).resolve().parents[1] / "examples"


def _load(name):
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_cnn_digits_serves_exactly_what_qat_trained(capsys):
    with jax.numpy_dtype_promotion("standard"):  # optax adam (see test_examples.py)
        acc = _load("cnn_digits").main(epochs=3, qat_epochs=1)
    assert acc["mismatches"] == 0 and acc["compared"] == 3600
    assert acc["QAT int8 (served)"] == acc["QAT int8 (frozen fake-quant)"]
    assert acc["float"] >= 0.85
    assert acc["PTQ int8 (served)"] >= acc["float"] - 0.03
    assert acc["QAT int8 (served)"] >= acc["float"] - 0.03
    assert "served int8 == frozen QAT: 3600 outputs, 0 mismatches" in capsys.readouterr().out
