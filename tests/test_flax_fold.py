"""Native layers of a converted Flax model with their requantization folded in
(:mod:`qjax.flax._fold`): served == frozen exactly, saved and loaded (folded again), and
an edited ``program.params`` refolded before the next call, never run on a stale fold."""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
import pytest
from flax import nnx

import qjax
from qjax.flax import Mode, default_qat_qconfig, qjax_recommended
from qjax.flax import nnx as qnnx
from qjax.flax._fold import fold_program
from qjax.kernels import _native, native_status, onednn_exact

_FUSED = native_status()[0] or (onednn_exact()[0] and _native.onednn_fused())
fused = pytest.mark.skipif(not _FUSED, reason="no native kernel with the fused epilogue here")
CFG = default_qat_qconfig("x86").replace(quantize_input=True, scheme="fbgemm")


class CNN(nnx.Module):
    """benchmarks/served_flax.py's CNN class, small: conv-BN-ReLU x2, residual conv, max
    pool, BatchNorm, GELU, mean, linear."""

    def __init__(self, rngs, c=8):
        self.stub = qnnx.QuantStub(CFG)
        self.c1 = qnnx.QuantConvBn(1, c, (3, 3), config=CFG, relu=True, rngs=rngs)
        self.c2 = qnnx.QuantConvBn(c, c, (3, 3), config=CFG, relu=True, rngs=rngs)
        self.c3 = qnnx.QuantConv(c, c, (3, 3), config=CFG, rngs=rngs)
        self.bn = nnx.BatchNorm(c, rngs=rngs)
        self.fc = qnnx.QuantLinear(c, 5, config=CFG, rngs=rngs)

    def __call__(self, x):
        h = self.c2(self.c1(self.stub(x)))
        h = h + nnx.relu(self.c3(h))
        h = nnx.max_pool(h, (2, 2), (2, 2))
        return self.fc(jax.nn.gelu(self.bn(h)).mean(axis=(1, 2)))


def _x(shape, seed=0):
    return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


def _frozen(model, x):
    qnnx.calibrate(model, [x], progress=False)
    qnnx.set_mode(model, Mode.FROZEN)
    model.eval()
    return model


def _folded(program) -> dict[str, bool]:
    return {
        k: v[0].folded is not None
        for k, v in program.params.items()
        if isinstance(v, tuple) and len(v) == 3 and hasattr(v[0], "folded")
    }


def _differ(a, b) -> int:
    a, b = np.asarray(a), np.asarray(b)
    assert a.shape == b.shape and a.dtype == b.dtype
    return int((a != b).sum())


@pytest.fixture(scope="module")
def cnn():
    x = _x((6, 8, 8, 1))
    model = _frozen(CNN(nnx.Rngs(0)), x)
    # the XLA kernel computes the coefficients in every call: the reference
    return model, x, qjax.convert(model, x, kernel="auto"), qjax.convert(model, x)


@fused
def test_nnx_cnn_folded_serves_the_frozen_model(cnn):
    model, x, served, xla = cnn
    assert _folded(served) == {"c1": True, "c2": True, "c3": True, "fc": True}
    assert _differ(served(x), nnx.jit(lambda m, v: m(v))(model, x)) == 0
    assert _differ(served(x), xla(x)) == 0
    x3 = x[:3]  # another batch size: lowered again, folded too
    assert _differ(served(x3), xla(x3)) == 0
    assert all(_folded(served.programs[next(reversed(served.programs))]).values())


@fused
def test_edited_params_fold_again_never_stale(cnn):
    model, x, served, xla = cnn
    qp = served.params["stub"]
    edited = dataclasses.replace(qp, scale=qp.scale * 1.25, zero_point=qp.zero_point + 3)
    before = np.asarray(served(x))
    try:
        served.params["stub"] = edited  # c1's input qparams: its fold depends on them
        xla.params["stub"] = edited
        want = np.asarray(xla(x))
        assert _differ(want, before) > 0  # the edit changes the outputs
        stale = served.params["c1"][0].folded
        assert _differ(served(x), want) == 0  # folded again from the edited params
        assert served.params["c1"][0].folded != stale and all(_folded(served).values())
        # without the refresh the stale fold would run: the guard is what keeps it exact
        served.params["stub"] = qp
        served(x)
        served.params["stub"] = edited
        served.refresh = None
        assert _differ(served(x), want) > 0
    finally:
        served.refresh = fold_program
        served.params["stub"] = xla.params["stub"] = qp
    assert _differ(served(x), before) == 0


@fused
def test_frozen_program_folds_first_and_lowers_new_shapes(cnn):
    """``freeze`` on a converted model: the params refolded before they are compiled in,
    another batch size lowered on first use, outputs == the XLA program's."""
    model, x, served, xla = cnn
    qp = served.params["stub"]
    edited = dataclasses.replace(qp, scale=qp.scale * 1.25, zero_point=qp.zero_point + 3)
    try:
        served.params["stub"] = xla.params["stub"] = edited
        frozen = served.freeze()  # refolds: c1's fold depends on the stub's qparams
        assert _differ(frozen(x), xla(x)) == 0
        assert _differ(frozen(x[:2]), xla(x[:2])) == 0
    finally:
        served.params["stub"] = xla.params["stub"] = qp
    assert _differ(served(x), xla(x)) == 0 and _differ(frozen(x), xla(x)) > 0


def test_program_refresh_runs_when_params_are_replaced():
    """``Program.refresh`` runs before the first call and again only after ``params`` or
    an entry of it was replaced (identity)."""
    import jax.numpy as jnp

    from qjax.program import Program, Step

    p = Program([Step("y", lambda w, x: x * w, ("x",), jnp.float32(2))], ("x",), "y")
    runs = []
    p.refresh = lambda prog: runs.append(float(prog.params["y"]))
    x = jnp.ones(2)
    p(x), p(x), p.run_traced(x)
    assert runs == [2.0]
    p.params["y"] = jnp.float32(3)  # an entry replaced
    assert float(p(x)[0]) == 3.0 and runs == [2.0, 3.0]
    p(x)
    p.params = {"y": jnp.float32(4)}  # the dict replaced
    assert float(p(x)[0]) == 4.0 and runs == [2.0, 3.0, 4.0]


@fused
def test_save_load_folds_again(cnn, tmp_path):
    _, x, served, _ = cnn
    qjax.save_served(tmp_path / "m.safetensors", served)
    plain = qjax.load_served(tmp_path / "m.safetensors")
    again = qjax.load_served(tmp_path / "m.safetensors", kernel="auto")
    assert again.kernels == served.kernels and all(_folded(again).values())
    assert not any(_folded(plain).values())
    assert _differ(again(x), served(x)) == 0 and _differ(plain(x), served(x)) == 0


@fused
@pytest.mark.slow  # Linen shares convert's code with NNX; its own compiles take ~12 s
def test_linen_cnn_folded_serves_the_frozen_model():
    import flax.linen as nn

    from qjax.flax import linen as qlinen

    def layers(mode):
        return nn.Sequential(
            [
                qlinen.QuantStub(CFG, mode=mode),
                qlinen.QuantConvBn(
                    8, (3, 3), config=CFG, relu=True, use_running_average=True, mode=mode
                ),
                qlinen.MaxPool((2, 2)),
                qlinen.Flatten(),
                qlinen.QuantDense(5, config=CFG, mode=mode),
                qlinen.DeQuantStub(),
            ]
        )

    x = _x((4, 6, 6, 2), seed=2)
    model = layers(Mode.QAT)
    variables = model.init(jax.random.key(0), x)
    variables, _ = qlinen.calibrate(model, variables, [x], progress=False, mode=Mode.CALIBRATE)
    frozen = layers(Mode.FROZEN)
    served = qjax.convert((frozen, variables), x, kernel="auto")
    assert all(_folded(served).values()) and len(_folded(served)) == 2
    assert _differ(served(x), jax.jit(frozen.apply)(variables, x)) == 0


class Block(nnx.Module):
    """benchmarks/served_flax.py's transformer block, small."""

    def __init__(self, rngs, d=32):
        self.ln1 = nnx.LayerNorm(d, rngs=rngs)
        self.attn = nnx.MultiHeadAttention(2, d, decode=False, rngs=rngs)
        self.ln2 = nnx.LayerNorm(d, rngs=rngs)
        self.fc1 = nnx.Linear(d, 2 * d, rngs=rngs)
        self.fc2 = nnx.Linear(2 * d, d, rngs=rngs)

    def __call__(self, x):
        x = x + self.attn(self.ln1(x))
        return x + self.fc2(jax.nn.gelu(self.fc1(self.ln2(x))))


@pytest.mark.slow  # ~5 s of compiles; the block's kernels are covered by test_kernel_choice
def test_block_auto_serves_the_frozen_model():
    """The block's hooked layers have float outputs (no output quantizer): no epilogue to
    fold, the program runs them as they are, == frozen."""
    model = Block(nnx.Rngs(0))
    qnnx.quantize_model(model, [("attn|fc1|fc2", qjax_recommended().replace(scheme="fbgemm"))])
    x = _x((2, 4, 32), seed=3)
    model = _frozen(model, x)
    served = qjax.convert(model, x, kernel="auto")
    assert len(_folded(served)) == 6 and not any(_folded(served).values())
    assert _differ(served(x), nnx.jit(lambda m, v: m(v))(model, x)) == 0
