"""Small input checks (issue 13, item 8): each failed before its fix with a message that
did not say what was wrong (``Cannot determine dtype of [...]``, ``dot_general requires
contracting dimensions ...``, ``MODEL ... does not exist`` for a directory) or did not
say that ``qjax debug`` runs the user's file."""

import re

import jax.numpy as jnp
import pytest
from flax import nnx

import qjax
from qjax.cli import main
from qjax.flax import default_qat_qconfig
from qjax.flax import nnx as qn


@pytest.mark.parametrize("fn", [qjax.quantize, qjax.fake_quant, qjax.dequantize])
@pytest.mark.parametrize("x", [[3, 1, 9], (3, 1)])
def test_lists_are_refused_like_jax_numpy(fn, x):
    qp = qjax.QParams(scale=0.5, zero_point=0, spec=qjax.QuantSpec(bits=4))
    kind = type(x).__name__
    dtype = jnp.int8 if fn is qjax.dequantize else jnp.float32
    with pytest.raises(TypeError, match=rf"{fn.__name__} requires an array or a scalar, got a "
                       rf"{kind}; pass jnp.asarray\(x, jnp.{jnp.dtype(dtype).name}\)"):  # fmt: skip
        fn(x, qp)
    assert fn(jnp.asarray(x, dtype), qp).shape == (len(x),)  # the array works


def test_wrong_input_features_name_the_layer():
    cfg = default_qat_qconfig("x86")
    r = nnx.Rngs(0)
    cases = [
        (qn.QuantLinear(3, 2, config=cfg, rngs=r, name="fc1"), (4, 5), "fc1", 5, 3),
        (qn.QuantConv(3, 2, (3, 3), config=cfg, rngs=r), (1, 6, 6, 4), "QuantConv", 4, 3),
        (qn.QuantConvBn(3, 2, (3, 3), config=cfg, rngs=r), (1, 6, 6, 1), "QuantConvBn", 1, 3),
    ]
    for layer, shape, name, got, want in cases:
        msg = f"{name}: the input has {got} features (shape {shape}), the layer takes "
        with pytest.raises(ValueError, match="^" + re.escape(f"{msg}in_features={want}")):
            layer(jnp.ones(shape))


def test_parity_on_a_directory_says_so(tmp_path, capsys):
    assert main(["parity", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert f"MODEL {str(tmp_path)!r} is a directory" in err, err


def test_debug_help_says_it_runs_the_users_file(capsys):
    with pytest.raises(SystemExit):
        main(["debug", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "your own Python file or module is executed" in out, out
    assert "pass only code you trust" in out


def test_linen_wrong_input_features_name_the_layer():
    """Linen layers size the kernel from the first input; a later input of another feature
    size is the NNX layers' ValueError (was flax's ScopeParamShapeError)."""
    import flax.linen as nn
    import jax

    from qjax.flax import linen as ql

    cfg = default_qat_qconfig("x86")

    class Net(nn.Module):
        @nn.compact
        def __call__(self, x):
            return ql.QuantDense(2, config=cfg, name="fc1")(x)

    cases = [
        (Net(), (4, 3), (4, 5), "fc1", 5, 3, "(3, 2)"),
        (ql.QuantDense(2, config=cfg), (4, 3), (4, 5), "<root>", 5, 3, "(3, 2)"),
        (ql.QuantConv(2, (3, 3), config=cfg), (1, 6, 6, 3), (1, 6, 6, 4), "<root>", 4, 3,
         "(3, 3, 3, 2)"),
        (ql.QuantConvBn(2, (3, 3), config=cfg), (1, 6, 6, 3), (1, 6, 6, 1), "<root>", 1, 3,
         "(3, 3, 3, 2)"),
    ]  # fmt: skip
    for layer, good, bad, name, got, want, kshape in cases:
        v = layer.init(jax.random.key(0), jnp.ones(good))
        msg = (
            f"{name}: the input has {got} features (shape {bad}), the layer takes "
            f"in_features={want} (kernel shape {kshape})"
        )
        with pytest.raises(ValueError, match="^" + re.escape(msg)):
            layer.apply(v, jnp.ones(bad), mutable=["quant_stats", "batch_stats"])
        layer.apply(v, jnp.ones(good), mutable=["quant_stats", "batch_stats"])  # still works
