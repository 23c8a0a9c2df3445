"""qjax.convert by tracing: Flax models written as classes -> one int8 Program.

The contract: the program's outputs equal the frozen model's under jit, bit for bit, when
the layers train with ``QuantConfig(scheme=...)`` equal to the convert scheme (and the
eager model's where no float op rounds differently eagerly); quantized dots/convs run as
int8 steps, what stays float is listed.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import qjax
from qjax.flax import Mode, default_qat_qconfig, qjax_recommended
from qjax.flax import linen as qlinen
from qjax.flax import nnx as qnnx

DEFAULT_SCHEMES = ("fbgemm", "qnnpack", "tflite")
SLOW_SCHEMES = ("onednn", "litert_ref", "litert", "tflite_single_rounding")


def _cfg(scheme):
    return default_qat_qconfig("x86").replace(quantize_input=True, scheme=scheme)


class CNN(nnx.Module):
    """What users write: Conv-BN-ReLU, a residual add, BatchNorm, Dropout, GELU, a mean."""

    def __init__(self, cfg, rngs, c=4):
        self.stub = qnnx.QuantStub(cfg)
        self.c1 = qnnx.QuantConvBn(1, c, (3, 3), config=cfg, relu=True, rngs=rngs)
        self.c2 = qnnx.QuantConv(c, c, (3, 3), config=cfg, rngs=rngs)
        self.bn = nnx.BatchNorm(c, rngs=rngs)
        self.drop = nnx.Dropout(0.5, rngs=rngs)
        self.fc = qnnx.QuantLinear(c, 3, config=cfg, rngs=rngs)

    def __call__(self, x):
        h = self.c1(self.stub(x))
        h = nnx.relu(self.c2(h)) + h
        h = nnx.max_pool(h, (2, 2), (2, 2))
        h = jax.nn.gelu(self.drop(self.bn(h))).mean(axis=(1, 2))
        return self.fc(h)


def _frozen(model, x):
    qnnx.calibrate(model, [x], progress=False)
    qnnx.set_mode(model, Mode.FROZEN)
    model.eval()
    return model


@nnx.jit
def _jit_forward(model, x):
    return model(x)


def _same(program, model, x, eager=True):
    """(differ from the eager frozen model, differ from the jitted one, outputs). The
    contract is with the jitted model; eagerly, XLA may round float ops (LayerNorm,
    softmax, GELU) differently in the last bit, which a later quantizer can turn into a
    code (examples/vit_digits.py measures it); these models show no such case."""
    y = np.asarray(program(x))
    d_eager = int((y != np.asarray(model(x))).sum()) if eager else 0
    jitted = np.asarray(_jit_forward(model, x))
    return d_eager, int((y != jitted).sum()), y.size


@pytest.mark.parametrize("scheme", DEFAULT_SCHEMES)
def test_cnn_class_serves_exactly(scheme):
    x = jax.random.normal(jax.random.key(1), (8, 8, 8, 1)) * 2
    model = _frozen(CNN(_cfg(scheme), nnx.Rngs(0)), x)
    program = qjax.convert(model, x, scheme=scheme)
    assert isinstance(program, qjax.Program)
    ops = [layer.op for layer in program.layers.values()]
    assert ops.count("conv2d") == 2 and ops.count("linear") == 1 and "relu" in ops
    # BN, GELU, the residual add and the mean stay float, and say so
    assert {"tanh", "add", "reduce_sum"} <= set(program.float_ops.values())
    x2 = jax.random.normal(jax.random.key(2), (5, 8, 8, 1)) * 2  # another batch size
    # eagerly once (one scheme): op by op, each new shape and scheme compiles every op again
    for v in (x, x2):
        d_eager, d_jit, n = _same(program, model, v, eager=v is x and scheme == "fbgemm")
        assert (d_eager, d_jit) == (0, 0), (scheme, d_eager, d_jit, n)
    # after the numbers, so a QJAX_TEST_KERNEL sweep (conftest) checks them first
    assert program.kernels == {"c1": "xla", "c2": "xla", "fc": "xla"}
    tr = program.trace(x)
    assert list(tr)[:3] == ["stub", "c1", "c2"] and tr["fc"].values.dtype == jnp.uint8


def _random_model(rng, cfg, rngs):
    """A random stack of the supported layers: convs (with or without BN, ReLU), residual
    adds, max pools, then a mean and one or two linear layers."""
    c = int(rng.integers(2, 6))
    blocks = []
    for _ in range(int(rng.integers(1, 4))):
        kind = rng.choice(["conv", "convbn", "res"])
        k = int(rng.choice([1, 3]))
        if kind == "convbn":
            blocks.append(("convbn", qnnx.QuantConvBn(c, c, (k, k), config=cfg, relu=True,
                                                     rngs=rngs)))  # fmt: skip
        else:
            blocks.append((kind, qnnx.QuantConv(c, c, (k, k), config=cfg, rngs=rngs)))
        if rng.random() < 0.3:
            blocks.append(("pool", None))

    class Random(nnx.Module):
        def __init__(self):
            self.stub = qnnx.QuantStub(cfg)
            self.first = qnnx.QuantConv(1, c, (3, 3), config=cfg, rngs=rngs)
            self.blocks = nnx.List([b for _, b in blocks if b is not None])
            self.kinds = [k for k, _ in blocks]
            self.head = qnnx.QuantLinear(c, 7, config=cfg, rngs=rngs)

        def __call__(self, x):
            h = nnx.relu(self.first(self.stub(x)))
            it = iter(self.blocks)
            for kind in self.kinds:
                if kind == "pool":
                    h = nnx.max_pool(h, (2, 2), (2, 2))
                elif kind == "res":
                    h = h + nnx.relu(next(it)(h))
                else:
                    h = next(it)(h)
            return self.head(h.mean(axis=(1, 2)) if rng_mean else h[:, 0, 0, :])

    rng_mean = bool(rng.random() < 0.5)
    return Random()


def _randomized(schemes, n_models, seed):
    total = differ = 0
    rng = np.random.default_rng(seed)
    for i in range(n_models):
        scheme = schemes[i % len(schemes)]
        model = _random_model(rng, _cfg(scheme), nnx.Rngs(i))
        x = jax.random.normal(jax.random.key(i), (64, 8, 8, 1)) * 2
        _frozen(model, x)
        xs = jax.random.normal(jax.random.key(100 + i), (5120, 8, 8, 1)) * 2
        # the first model converts at another batch size: lowered again for xs
        program = qjax.convert(model, x if i == 0 else xs, scheme=scheme)
        y = np.asarray(program(xs))
        differ += int((y != np.asarray(_jit_forward(model, xs))).sum())
        total += y.size
        assert len(program.programs) == (2 if i == 0 else 1)
        assert next(iter(program.layers)) == "stub"  # (traces: the CNN class test)
    return differ, total


def test_randomized_models_serve_exactly():
    differ, total = _randomized(DEFAULT_SCHEMES, 3, seed=0)
    assert total >= 100_000 and differ == 0, (differ, total)


@pytest.mark.slow
def test_randomized_models_serve_exactly_every_scheme():
    differ, total = _randomized(SLOW_SCHEMES + DEFAULT_SCHEMES, 28, seed=1)
    assert total >= 500_000 and differ == 0, (differ, total)


def test_hooked_stock_layers_serve_exactly():
    """quantize_model's dot_general / conv hooks with a scheme: the int8 value with a
    float output (f32(acc)·f32(s_x·s_w)), the stock layer's bias added in float."""

    class Net(nnx.Module):
        def __init__(self, rngs):
            self.conv = nnx.Conv(1, 4, (3, 3), rngs=rngs)
            self.norm = nnx.LayerNorm(4, rngs=rngs)
            self.fc = nnx.Linear(4, 3, rngs=rngs)

        def __call__(self, x):
            h = jax.nn.relu(self.conv(x))
            return self.fc(self.norm(h).mean(axis=(1, 2)))

    x = jax.random.normal(jax.random.key(3), (6, 6, 6, 1))
    model = Net(nnx.Rngs(0))
    qnnx.quantize_model(model, [("conv|fc", qjax_recommended().replace(scheme="fbgemm"))])
    _frozen(model, x)
    program = qjax.convert(model, x)
    ops = [layer.op for layer in program.layers.values()]
    assert ops.count("conv2d") == 1 and ops.count("linear") == 1
    d_eager, d_jit, n = _same(program, model, x)
    assert (d_eager, d_jit) == (0, 0), (d_eager, d_jit, n)
    assert program.kernels == {"conv": "xla", "fc": "xla"}


def test_linen_class_and_function_serve_exactly():
    cfg = _cfg("fbgemm")

    class LCNN(nn.Module):
        mode: Mode = Mode.QAT

        @nn.compact
        def __call__(self, x):
            h = qlinen.QuantStub(cfg, mode=self.mode)(x)
            h = nn.relu(qlinen.QuantConv(4, (3, 3), config=cfg, mode=self.mode)(h))
            h = nn.Dropout(0.5, deterministic=True)(h)
            return qlinen.QuantDense(3, config=cfg, mode=self.mode)(h.mean(axis=(1, 2)))

    x = jax.random.normal(jax.random.key(4), (4, 6, 6, 1))
    variables = LCNN().init(jax.random.key(0), x)
    variables, _ = qlinen.calibrate(LCNN(Mode.CALIBRATE), variables, [x], progress=False)
    frozen = LCNN(Mode.FROZEN)
    y_frozen = np.asarray(frozen.apply(variables, x))
    # convert traces every layer in FROZEN, whatever mode the module was built with
    program = qjax.convert((LCNN(), variables), x)
    ops = [layer.op for layer in program.layers.values()]
    assert ops.count("conv2d") == 1 and ops.count("linear") == 1
    assert int((np.asarray(program(x)) != y_frozen).sum()) == 0
    fn_program = qjax.convert(lambda v: frozen.apply(variables, v), x)
    assert int((np.asarray(fn_program(x)) != y_frozen).sum()) == 0


def test_convert_errors_name_the_problem():
    with pytest.raises(TypeError, match="expects an nnx.Module, a .linen Module, variables"):
        qjax.convert(3, jnp.ones((1, 2)))

    class Plain(nnx.Module):
        def __init__(self, rngs):
            self.fc = nnx.Linear(2, 2, rngs=rngs)

        def __call__(self, x):
            return self.fc(x)

    with pytest.raises(ValueError, match="Plain has no quantized layer"):
        qjax.convert(Plain(nnx.Rngs(0)), jnp.ones((1, 2)))
    x = jnp.ones((2, 8, 8, 1))
    model = CNN(_cfg("fbgemm"), nnx.Rngs(0))
    with pytest.raises(ValueError, match="never saw data"):
        qjax.convert(model, x)
    _frozen(model, x)
    with pytest.raises(ValueError, match=r"c1 trained with QuantConfig\(scheme='fbgemm'\)"):
        qjax.convert(model, x, scheme="qnnpack")
    with pytest.raises(TypeError, match="a function calling an NNX model cannot be traced"):
        qjax.convert(lambda v: model(v), x)
    model.c1.name = "my conv"
    before = model.c1.mode, model.c1.name, model.drop.deterministic
    qjax.convert(model, x)  # traces an eval() copy with layers named by path
    assert (model.c1.mode, model.c1.name, model.drop.deterministic) == before


def test_transformer_block_projections_serve_in_int8():
    """nnx.MultiHeadAttention's four LinearGeneral projections and the MLP in int8
    (hooked, scheme fbgemm), LayerNorm / softmax / q·kᵀ / GELU / residuals in float."""

    class Block(nnx.Module):
        def __init__(self, rngs, d=16):
            self.ln1 = nnx.LayerNorm(d, rngs=rngs)
            self.attn = nnx.MultiHeadAttention(2, d, decode=False, rngs=rngs)
            self.ln2 = nnx.LayerNorm(d, rngs=rngs)
            self.fc1 = nnx.Linear(d, 32, rngs=rngs)
            self.fc2 = nnx.Linear(32, d, rngs=rngs)

        def __call__(self, x):
            x = x + self.attn(self.ln1(x))
            return x + self.fc2(jax.nn.gelu(self.fc1(self.ln2(x))))

    model = Block(nnx.Rngs(0))
    qnnx.quantize_model(model, [("attn|fc1|fc2", qjax_recommended().replace(scheme="fbgemm"))])
    x = jax.random.normal(jax.random.key(1), (4, 5, 16))
    program = qjax.convert(_frozen(model, x), x)
    linear = [k for k, layer in program.layers.items() if layer.op == "linear"]
    assert linear == ["attn/query", "attn/key", "attn/value", "attn/out", "fc1", "fc2"]
    assert {"exp", "rsqrt", "tanh", "dot_general"} <= set(program.float_ops.values())
    for v in (x, jax.random.normal(jax.random.key(2), (3, 5, 16))):
        d_eager, d_jit, n = _same(program, model, v, eager=v is x)
        assert (d_eager, d_jit) == (0, 0), (d_eager, d_jit, n)


def test_traced_program_round_trips_through_jax_export():
    """The program serializes with jax.export (weights baked in) and the deserialized
    call gives the same outputs."""
    x = jax.random.normal(jax.random.key(1), (4, 8, 8, 1))
    program = qjax.convert(_frozen(CNN(_cfg("qnnpack"), nnx.Rngs(0)), x), x, scheme="qnnpack")
    blob = jax.export.export(jax.jit(program))(x).serialize()
    back = jax.export.deserialize(blob)
    assert int((np.asarray(back.call(x)) != np.asarray(program(x))).sum()) == 0
