"""A converted Flax program in a file: qjax.save_served / qjax.load_served (format
``qjax.program``): the loaded program gives the converted one's outputs and trace, bit
for bit, at any batch size; a file is validated on load, and nothing in it runs as code.
"""

import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors import safe_open
from safetensors.numpy import save
from test_flax_convert_traced import CNN, _cfg, _frozen, _jit_forward

import qjax
from qjax.flax import Mode, qjax_recommended
from qjax.flax import linen as qlinen
from qjax.flax import nnx as qnnx
from qjax.program import Program, Step


def _round_trip(program, tmp_path, name="m.safetensors"):
    path = tmp_path / name
    qjax.save_served(path, program)
    return qjax.load_served(path), path


def _differ(a, b) -> int:
    return int((np.asarray(a) != np.asarray(b)).sum())


@pytest.fixture(scope="module")
def cnn():
    x = jax.random.normal(jax.random.key(1), (8, 8, 8, 1)) * 2
    model = _frozen(CNN(_cfg("qnnpack"), nnx.Rngs(0)), x)
    return model, qjax.convert(model, x, scheme="qnnpack"), x


def test_cnn_class_round_trips_at_any_batch_size(cnn, tmp_path):
    model, program, x = cnn
    back, path = _round_trip(program, tmp_path)
    assert isinstance(back, qjax.Program)
    assert back.kernels == program.kernels and back.layout == "NHWC"
    assert set(back.float_ops.values()) == set(program.float_ops.values())
    assert [(k, v.op) for k, v in back.layers.items() if v.op != "float"] == [
        (k, v.op) for k, v in program.layers.items() if v.op != "float"
    ]
    for n in (8, 1, 5):  # the example's batch size, one row, another
        v = jax.random.normal(jax.random.key(n), (n, 8, 8, 1)) * 2
        y = back(v)
        assert y.shape == (n, 3)
        assert (_differ(y, program(v)), _differ(y, _jit_forward(model, v))) == (0, 0)
    tr, tr_back = program.trace(x), back.trace(x)
    assert list(tr) == list(tr_back)
    for k in tr:
        assert tr[k].qparams.spec == tr_back[k].qparams.spec
        assert _differ(tr[k].values, tr_back[k].values) == 0, k
    with safe_open(path, "np") as f:
        meta = json.loads(f.metadata()["qjax"])
    assert meta["inputs"][0]["shape"] == [{"dim": "b"}, 8, 8, 1] and meta["batch"] == "b"
    with pytest.raises(TypeError, match=r"takes inputs \[\(\(3, 8, 8, 1\).*got \[\(\(3, 9, 8"):
        back(jnp.ones((3, 9, 8, 1)))
    again, _ = _round_trip(back, tmp_path, "again.safetensors")  # a loaded program saves
    assert _differ(again(x), program(x)) == 0
    # and exports for every batch size at once (its shapes are expressions of b)
    (b,) = jax.export.symbolic_shape("b")
    blob = jax.export.export(jax.jit(back))(jax.ShapeDtypeStruct((b, 8, 8, 1), x.dtype))
    exported = jax.export.deserialize(blob.serialize())
    assert [_differ(exported.call(v), program(v)) for v in (x, x[:3])] == [0, 0]


def test_transformer_block_round_trips(tmp_path):
    """Softmax, q·kᵀ in float, LayerNorm, GELU and six int8 projections, from a file."""

    class Block(nnx.Module):
        def __init__(self, rngs, d=16):
            self.ln1 = nnx.LayerNorm(d, rngs=rngs)
            self.attn = nnx.MultiHeadAttention(2, d, decode=False, rngs=rngs)
            self.fc1 = nnx.Linear(d, 32, rngs=rngs)
            self.fc2 = nnx.Linear(32, d, rngs=rngs)

        def __call__(self, x):
            x = x + self.attn(self.ln1(x))
            return x + self.fc2(jax.nn.gelu(self.fc1(x)))

    model = Block(nnx.Rngs(0))
    qnnx.quantize_model(model, [("attn|fc1|fc2", qjax_recommended().replace(scheme="fbgemm"))])
    x = jax.random.normal(jax.random.key(1), (4, 5, 16))
    model = _frozen(model, x)
    program = qjax.convert(model, x)
    back, _ = _round_trip(program, tmp_path)
    assert sum(layer.op == "linear" for layer in back.layers.values()) == 6
    for v in (x, jax.random.normal(jax.random.key(2), (7, 5, 16))):
        assert (_differ(back(v), program(v)), _differ(back(v), _jit_forward(model, v))) == (0, 0)


def test_linen_function_and_two_outputs_round_trip(tmp_path):
    cfg = _cfg("fbgemm")

    class LNet(nn.Module):
        mode: Mode = Mode.QAT

        @nn.compact
        def __call__(self, x):
            h = qlinen.QuantStub(cfg, mode=self.mode)(x)
            h = nn.relu(qlinen.QuantDense(6, config=cfg, mode=self.mode)(h))
            return qlinen.QuantDense(3, config=cfg, mode=self.mode)(h), h.sum(axis=-1)

    x = jax.random.normal(jax.random.key(4), (4, 5))
    variables = LNet().init(jax.random.key(0), x)
    variables, _ = qlinen.calibrate(LNet(Mode.CALIBRATE), variables, [x], progress=False)
    program = qjax.convert((LNet(), variables), x)
    back, _ = _round_trip(program, tmp_path)
    for v in (x, jax.random.normal(jax.random.key(5), (9, 5))):
        got, want = back(v), program(v)
        assert isinstance(got, tuple) and len(got) == 2
        assert (_differ(got[0], want[0]), _differ(got[1], want[1])) == (0, 0)


def test_a_model_that_branches_on_the_batch_size_saves_at_fixed_shapes(tmp_path):
    cfg = _cfg("fbgemm")

    class Branchy(nnx.Module):
        def __init__(self, rngs):
            self.stub = qnnx.QuantStub(cfg)
            self.fc = qnnx.QuantLinear(4, 2, config=cfg, rngs=rngs)

        def __call__(self, x):
            y = self.fc(self.stub(x))
            return y * 2 if x.shape[0] > 3 else y  # Python on the batch size

    x = jax.random.normal(jax.random.key(0), (6, 4))
    program = qjax.convert(_frozen(Branchy(nnx.Rngs(0)), x), x)
    back, _ = _round_trip(program, tmp_path)
    assert _differ(back(x), program(x)) == 0
    with pytest.raises(TypeError, match=r"saved at fixed shapes: .*Symbolic dimension"):
        back(x[:2])


# -- a file from anywhere: validated on load ----------------------------------------------


def _tampered(path, tmp_path, edit=None, tensor_edit=None):
    """A copy of the file at ``path`` with ``edit(meta)`` and ``tensor_edit(meta,
    tensors)`` applied (also used by test_flax_convert_transformer.py)."""
    with safe_open(path, "np") as f:
        meta = json.loads(f.metadata()["qjax"])
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    if edit is not None:
        edit(meta)
    if tensor_edit is not None:
        tensor_edit(meta, tensors)
    out = tmp_path / "bad.safetensors"
    out.write_bytes(save(tensors, metadata={"qjax": json.dumps(meta)}))
    return out


def _step(meta, kind, primitive=None):
    for i, st in enumerate(meta["steps"]):
        a = st["attrs"]["dict"]
        if st["kind"] == kind and (primitive is None or a.get("primitive") == primitive):
            return i, st, a
    raise AssertionError((kind, primitive))


def _set_primitive(meta, name):
    _step(meta, "lax", "tanh")[2]["primitive"] = name


def _set_dim(meta, text):
    meta["inputs"][0]["shape"][0] = {"dim": text}
    _step(meta, "lax", "reduce_window_max")[2]["params"]["dict"]["window_dimensions"][0] = {
        "dim": text
    }


BAD = [
    (lambda m: _set_primitive(m, "debug_callback"), "primitive 'debug_callback' is not one"),
    (lambda m: _set_dim(m, "__import__('os')"), "unexpected '_'"),
    (lambda m: _step(m, "quantize")[1].update(kind="exec"), "unknown kind 'exec'"),
    (lambda m: _step(m, "layer")[2].update(scheme="mine"), "unknown scheme 'mine'"),
    (lambda m: _step(m, "quantize")[2].update(compat="numpy"), "unknown compat 'numpy'"),
    (lambda m: _step(m, "layer")[2].update(relu="yes"), "relu 'yes' must be true or false"),
    (lambda m: _step(m, "layer")[2]["geometry"]["dict"].update(stride=[0, 1]), r"stride"),
    (lambda m: _step(m, "lax", "tanh")[2].update(shell="rm"), "attributes"),
    (lambda m: _step(m, "lax", "tanh")[1].update(inputs=["nowhere"]), "'nowhere'"),
    (lambda m: _step(m, "dequantize")[2].update(dtype={"dtype": "object"}), "dtype 'object'"),
    (lambda m: m.update(output={"name": "missing"}), "output 'missing'"),
    (lambda m: m.update(version=7), "version 7"),
]


@pytest.fixture(scope="module")
def cnn_file(cnn, tmp_path_factory):
    """The CNN's file, written once (a save lowers the model again, symbolically)."""
    path = tmp_path_factory.mktemp("cnn") / "m.safetensors"
    qjax.save_served(path, cnn[1])
    return path


@pytest.mark.parametrize("edit,match", BAD, ids=[m for _, m in BAD])
def test_bad_files_are_refused_naming_the_problem(cnn_file, tmp_path, edit, match):
    with pytest.raises(ValueError, match=match):
        qjax.load_served(_tampered(cnn_file, tmp_path, edit))


def test_bad_tensors_are_refused(cnn_file, tmp_path):
    path = cnn_file
    with safe_open(path, "np") as f:
        meta = json.loads(f.metadata()["qjax"])
    i = _step(meta, "layer")[0]

    def nan_bias(_, t):
        t[f"{i}.b"] = np.full_like(t[f"{i}.b"], np.nan)

    def zero_scale(_, t):
        t[f"{i}.w.scale"] = np.zeros_like(t[f"{i}.w.scale"])

    def drop(_, t):
        del t[f"{i}.w.values"]

    for tensor_edit, match in ((nan_bias, "finite"), (zero_scale, "scale"), (drop, "missing")):
        with pytest.raises(ValueError, match=match):
            qjax.load_served(_tampered(path, tmp_path, tensor_edit=tensor_edit))


def test_only_described_programs_save(tmp_path):
    # converted and imported programs describe every step (Step.spec); a bare function
    # does not (tests/test_converters_save.py saves the imported ones)
    step = Step("out", lambda _, x: x * 2, ("x",), traced=False)
    with pytest.raises(TypeError, match="step 'out' .* is a function without a description"):
        qjax.save_served(tmp_path / "m.safetensors", Program([step], ("x",), "out"))
    with pytest.raises(TypeError, match="expected a qjax.Program .*, got dict"):
        qjax.save_served(tmp_path / "m.safetensors", {})
