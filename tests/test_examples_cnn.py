"""Smoke tests of examples/cnn_digits.py (NNX) and examples/cnn_digits_linen.py (Linen):
train, PTQ, QAT, convert, serve (fewer epochs)."""

import importlib.util
import pathlib

import jax
import pytest

EXAMPLES = pathlib.Path(__file__).resolve().parents[1] / "examples"


def _load(name, monkeypatch):
    monkeypatch.syspath_prepend(str(EXAMPLES))  # the examples import examples/_digits.py
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.slow  # served == frozen of Sequential CNNs runs by default in test_flax_convert.py
@pytest.mark.parametrize("name", ["cnn_digits", "cnn_digits_linen"])
def test_cnn_digits_serves_exactly_what_qat_trained(name, capsys, monkeypatch):
    with jax.numpy_dtype_promotion("standard"):  # optax adam (see test_examples.py)
        acc = _load(name, monkeypatch).main(epochs=3, qat_epochs=1)
    assert acc["mismatches"] == 0 and acc["compared"] == 3600
    assert acc["QAT int8 (served)"] == acc["QAT int8 (frozen fake-quant)"]
    assert acc["float"] >= 0.85
    assert acc["PTQ int8 (served)"] >= acc["float"] - 0.03
    assert acc["QAT int8 (served)"] >= acc["float"] - 0.03
    assert "served int8 == frozen QAT: 3600 outputs, 0 mismatches" in capsys.readouterr().out
