"""Smoke tests: every example runs and its printed claims hold."""

import importlib.util
import pathlib

import pytest

EXAMPLES = pathlib.Path(__file__).resolve().parents[1] / "examples"


def _load(name):
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_quickstart(capsys):
    out = _load("quickstart").main()
    assert out["max_err_steps"] <= 0.5 + 1e-6
    assert out["zero_point"] == 0  # post-ReLU data: the range starts at 0
    assert out["grad"] == [1.0, 1.0, 0.0]  # inclusive mask; 100.0 is beyond the range
    assert "act: ok" in capsys.readouterr().out


def test_demo_runs_small(capsys):
    # ``qjax demo`` (the end-to-end digits job) runs in tests/test_demo.py; here only that
    # the CLI offers it with the documented options.
    import pytest

    from qjax.cli import main

    with pytest.raises(SystemExit) as e:
        main(["demo", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for opt in ("--out", "--epochs", "--qat-epochs", "--seed", "--quick"):
        assert opt in out


@pytest.mark.slow  # PTQ / QAT accuracy on the digits: the demo test and class examples
def test_qat_digits_nnx(capsys):
    import jax

    with jax.numpy_dtype_promotion("standard"):  # optax adam (see test_demo_runs_small)
        acc = _load("qat_digits_nnx").main(epochs=8, qat_epochs=1)
    assert acc["float"] >= 0.9
    assert acc["PTQ int8 (fake-quant)"] >= acc["float"] - 0.03
    assert acc["QAT int8 (fake-quant)"] >= acc["float"] - 0.03
    assert "test accuracy on sklearn digits" in capsys.readouterr().out
