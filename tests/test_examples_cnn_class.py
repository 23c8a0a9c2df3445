"""Smoke tests of examples/cnn_class_digits.py (NNX class) and
examples/cnn_class_digits_linen.py (Linen class): each runs as a script with ``--quick``
(one float and one QAT epoch), converts its model with ``qjax.convert`` and serves
exactly the frozen QAT outputs."""

import pathlib
import re
import subprocess
import sys

import pytest

EXAMPLES = pathlib.Path(__file__).resolve().parents[1] / "examples"


# the slow run only: the same comparisons (a CNN class, NNX and Linen, served == frozen)
# run by default in tests/test_flax_convert_traced.py; a script costs a fresh process
@pytest.mark.slow
@pytest.mark.parametrize("name", ["cnn_class_digits", "cnn_class_digits_linen"])
def test_cnn_class_example_serves_exactly_what_qat_trained(name):
    run = subprocess.run(
        [sys.executable, str(EXAMPLES / f"{name}.py"), "--quick"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    out = run.stdout
    m = re.search(r"served int8 == frozen QAT: (\d+) outputs, (\d+) mismatches", out)
    assert m, out
    assert (int(m.group(1)), int(m.group(2))) == (3600, 0)  # the whole test split, 0 differ
    assert re.search(r"int8 layers: \{'block1': 'xla', 'block2': 'xla', 'head': 'xla'\}", out)
    assert "'add'" in out.split("float ops:")[1].splitlines()[0]  # the residual add is float
    served = re.search(r"QAT int8 \(served\)\s+([\d.]+)%", out)
    frozen = re.search(r"QAT int8 \(frozen fake-quant\)\s+([\d.]+)%", out)
    assert served and frozen and served.group(1) == frozen.group(1), out
