"""Smoke test of examples/vit_digits.py: a ViT (nnx class, stock Linear and
MultiHeadAttention layers hooked by ``quantize_model``) runs as a script with ``--quick``
(a few float and QAT steps), converts with ``qjax.convert`` and serves exactly what the
jitted frozen model computes."""

import pathlib
import re
import subprocess
import sys

import pytest

EXAMPLE = pathlib.Path(__file__).resolve().parents[1] / "examples" / "vit_digits.py"


# slow run only: the same comparison on a transformer block (MultiHeadAttention projections
# and MLP in int8) runs by default in tests/test_flax_convert_traced.py
@pytest.mark.slow
def test_vit_example_serves_exactly_what_qat_trained():
    run = subprocess.run(
        [sys.executable, str(EXAMPLE), "--quick"], capture_output=True, text=True, timeout=300
    )
    out = run.stdout
    assert run.returncode == 0, out + run.stderr
    m = re.search(r"served != frozen \(nnx\.jit\): (\d+) of (\d+) outputs", out)
    assert m, out
    assert (int(m.group(1)), int(m.group(2))) == (0, 3600)  # the whole test split, 0 differ
    assert re.search(r"served != frozen \(eager\): \d+ of 3600 outputs", out), out
    # every projection of both attention blocks, the MLPs, the embedding and the head
    projections = ["query", "key", "value", "out"]
    blocks = [[f"blocks/{i}/attn/{p}" for p in projections] + [f"blocks/{i}/fc1",
              f"blocks/{i}/fc2"] for i in (0, 1)]  # fmt: skip
    assert f"int8 layers: {['embed', *blocks[0], *blocks[1], 'head']}" in out
    float_ops = out.split("float ops:")[1].splitlines()[0]
    for op in ("exp", "rsqrt", "tanh", "dot_general"):  # softmax, LayerNorm, GELU, q·kᵀ
        assert f"'{op}'" in float_ops, float_ops
    served = re.search(r"served int8 \(qjax\.Program\)\s+([\d.]+)%", out)
    frozen = re.search(r"QAT int8 \(frozen fake-quant\)\s+([\d.]+)%", out)
    assert served and frozen and served.group(1) == frozen.group(1), out
