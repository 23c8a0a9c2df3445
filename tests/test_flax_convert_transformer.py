"""qjax.convert serves the transformer layers in int8: Einsum hooks as int8 linear layers
(with their transposes), Embed lookups from the int8 table, dynamic int8 linear layers
and weight-only int8 / int4 (per-group, packed) layers as served steps.

The contract: the program's outputs equal the jitted frozen model's, bit for bit; every
comparison counts the outputs compared and asserts that none differ. A saved program
loads back to the same outputs; a tampered file is refused naming the step and the key.
"""

import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors import safe_open
from test_flax_convert_traced import _frozen, _jit_forward
from test_flax_program_file import _tampered

import qjax
from qjax import QuantSpec
from qjax.flax import Mode, qjax_recommended
from qjax.flax import linen as qlinen
from qjax.flax import nnx as qnnx
from qjax.flax._intsim import einsum_layout

CFG = qjax_recommended().replace(scheme="fbgemm")
INT8_CHANNEL = QuantSpec(bits=8, signed=True, symmetric=True, axis=-1)
INT4_GROUP = QuantSpec(bits=4, signed=True, symmetric=True, axis=-1, group_size=4, group_axis=0)
VOCAB, D, T = 11, 16, 5


def _w(seed, shape):
    return jax.random.normal(jax.random.key(seed), shape) / np.sqrt(shape[0])


class TinyLM(nnx.Module):
    """Token ids (int32) -> embedding, an attention
    block with hooked projections, an Einsum MLP ((d) -> (heads, h) -> back, with
    transposes), a dynamic int8 linear, weight-only int8 and int4 layers; a second
    output from the tied embedding (``attend``, float)."""

    def __init__(self, rngs):
        self.emb = nnx.Embed(VOCAB, D, rngs=rngs)
        self.ln = nnx.LayerNorm(D, rngs=rngs)
        self.attn = nnx.MultiHeadAttention(2, D, decode=False, rngs=rngs)
        self.up = nnx.Einsum("btd,dnh->btnh", (D, 2, 8), (2, 8), rngs=rngs)
        self.down = nnx.Einsum("btnh,hnd->bdt", (8, 2, D), (D,), rngs=rngs)
        self.dyn = qnnx.DynamicQuantLinear(_w(4, (D, D)), jnp.full(D, 0.1))
        self.wo8 = qnnx.WeightOnlyLinear(_w(5, (D, D)), jnp.ones(D), spec=INT8_CHANNEL)
        self.wo4 = qnnx.WeightOnlyLinear(_w(6, (D, 6)), None, spec=INT4_GROUP)

    def __call__(self, x):
        h = self.emb(x.astype(jnp.int32))
        h = h + self.attn(self.ln(h))
        h = h + jnp.swapaxes(self.down(jax.nn.gelu(self.up(h))), 1, 2)
        h = self.wo8(jax.nn.relu(self.dyn(h)))
        return self.wo4(h), self.emb.attend(h)


def _ids(seed, n, lo=0, hi=VOCAB):
    return jax.random.randint(jax.random.key(seed), (n, T), lo, hi)  # int32 token ids


def _compare(got, want) -> tuple[int, int]:
    """(outputs compared, outputs that differ) over the leaves of two output trees."""
    pairs = zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True)
    n = differ = 0
    for g, w in pairs:
        g, w = np.asarray(g), np.asarray(w)
        assert g.shape == w.shape and g.dtype == w.dtype
        n += g.size
        differ += int((g.view(np.uint32) != w.view(np.uint32)).sum())  # NaN == NaN too
    return n, differ


@pytest.fixture(scope="module")
def tiny_lm():
    model = TinyLM(nnx.Rngs(0))
    used = qnnx.quantize_model(model, [("emb|attn|up|down", CFG)])
    assert sorted(used) == ["attn/key", "attn/out", "attn/query", "attn/value", "down", "emb", "up"]
    x = _ids(1, 32)
    _frozen(model, x)
    return model, qjax.convert(model, x), x


def test_einsum_layout_names_what_the_int8_linear_runs():
    assert einsum_layout("btd,dnh->btnh", (2, 3, 8), (8, 2, 4)) == (1, (2, 4), None)
    # kernel output axes around the contracted one, two contracted axes, output reordered
    assert einsum_layout("bd,ndh->bnh", (5, 8), (2, 8, 3))[2] == ((0, 1), (1, 0, 2), (0, 1, 2))
    assert einsum_layout("btnh,hnd->bdt", (2, 3, 2, 4), (4, 2, 8))[:2] == (2, (8,))
    assert einsum_layout("...d,dh->...h", (2, 3, 8), (8, 4)) == (1, (4,), None)
    for eq, xs, ks, why in [
        ("btd,tdh->bth", (2, 5, 8), (5, 8, 4), "axis 't' of the kernel is a batch axis"),
        ("bd,dh->h", (2, 8), (8, 4), "input axis 'b' is summed"),
        ("bd,dhk->bh", (2, 8), (8, 4, 3), "kernel axis 'k' is summed"),
        ("bdd,dh->bh", (2, 8, 8), (8, 4), "repeated index"),
        ("bd,h->bdh", (2, 8), (4,), "no contracted axis"),
    ]:
        with pytest.raises(ValueError, match=why):
            einsum_layout(eq, xs, ks, name="mix")


def test_nnx_transformer_serves_exactly(tiny_lm):
    model, program, x = tiny_lm
    ops = {k: layer.op for k, layer in program.layers.items()}
    assert ops["emb"] == "embed"
    linear = [k for k, op in ops.items() if op == "linear"]
    assert linear == ["attn/query", "attn/key", "attn/value", "attn/out", "up", "down"]
    assert [op for op in ops.values() if "linear" in op and op != "linear"] == [
        "dynamic_linear", "weight_only_linear", "weight_only_linear",
    ]  # fmt: skip
    # softmax, q·kᵀ / p·v, GELU and attend's dot stay float, and say so
    assert {"exp", "tanh", "dot_general"} <= set(program.float_ops.values())
    total = 0
    # the calibration batch, another batch size, and ids out of range (NaN rows, as jnp.take)
    for v in (x, _ids(2, 7), _ids(3, 4, lo=-13, hi=VOCAB + 3)):
        n, differ = _compare(program(v), _jit_forward(model, v))
        assert differ == 0, (differ, n)
        total += n
    assert total == (32 + 7 + 4) * T * (6 + VOCAB)


def test_nnx_transformer_round_trips(tiny_lm, tmp_path):
    model, program, x = tiny_lm
    path = tmp_path / "lm.safetensors"
    qjax.save_served(path, program)
    back = qjax.load_served(path)
    with safe_open(path, "np") as f:
        meta = json.loads(f.metadata()["qjax"])
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    kinds = {st["name"]: (i, st["kind"]) for i, st in enumerate(meta["steps"])}
    i = kinds["emb"][0]
    assert kinds["emb"][1] == "embed" and tensors[f"{i}.t.values"].dtype == np.int8
    assert tensors[f"{i}.t.values"].shape == (VOCAB, D)
    i4 = kinds["wo4"][0]
    assert tensors[f"{i4}.w.codes"].dtype == np.uint8 and tensors[f"{i4}.w.codes"].shape == (8, 6)
    assert tensors[f"{i4}.w.scale"].shape == (4, 6)  # 4 groups of 4 rows, 6 columns
    assert tensors[f"{kinds['wo8'][0]}.w.codes"].dtype == np.int8
    total = 0
    for v in (x, _ids(4, 3)):
        n, differ = _compare(back(v), program(v))
        n2, differ2 = _compare(back(v), _jit_forward(model, v))
        assert (differ, differ2) == (0, 0)
        total += n
    assert total == (32 + 3) * T * (6 + VOCAB)


def test_unsupported_einsum_stays_float_with_the_reason():
    """A per-position kernel (a batch axis) is no int8 linear: the float einsum on the
    fake-quantized operands is served, listed with the reason. Measured: the program
    equals the eager frozen model; the jitted frozen model rounds this float dot_general
    differently (1 ulp in 119 of 160 outputs here): a float op, outside the int8
    contract, left as found (the report of issue 15 names it)."""

    class Mix(nnx.Module):
        def __init__(self, rngs):
            self.stub = qnnx.QuantStub(CFG)
            self.mix = nnx.Einsum("btd,tdh->bth", (T, D, 4), (T, 4), rngs=rngs)  # per-t weights

        def __call__(self, x):
            return self.mix(self.stub(x))

    model = Mix(nnx.Rngs(0))
    qnnx.quantize_model(model, [("mix", CFG)])
    x = jax.random.normal(jax.random.key(0), (8, T, D))
    program = qjax.convert(_frozen(model, x), x)
    assert "linear" not in [layer.op for layer in program.layers.values()]
    (why,) = [v for v in program.float_ops.values() if "einsum" in v]
    assert why.startswith("mix: einsum 'btd,tdh->bth': axis 't' of the kernel is a batch axis")
    n, differ = _compare(program(x), model(x))
    assert (n, differ) == (8 * T * 4, 0)
    np.testing.assert_allclose(program(x), _jit_forward(model, x), rtol=0, atol=1e-6)


def test_einsum_with_a_scheme_computes_the_int8_value_in_qat():
    """QAT and FROZEN with QuantConfig(scheme=...): the Einsum hook's value is the int8
    linear's f32(acc)·f32(s_x·s_w), the gradient the float einsum's."""
    layer = nnx.Einsum("bd,ndh->bnh", (2, D, 3), (2, 3), rngs=nnx.Rngs(0))
    qnnx.quantize_model(nnx.Sequential(layer), [("layers/0", CFG)])
    x = jax.random.normal(jax.random.key(1), (5, D))
    y = layer(x)  # QAT
    hook = layer.einsum_op
    float_layer = nnx.Einsum("bd,ndh->bnh", (2, D, 3), (2, 3), rngs=nnx.Rngs(0))
    qnnx.quantize_model(nnx.Sequential(float_layer), [("layers/0", qjax_recommended())])
    y_sim = float_layer(x)
    assert not np.array_equal(np.asarray(y), np.asarray(y_sim))
    assert float(jnp.max(jnp.abs(y - y_sim))) < 0.05
    g = nnx.grad(lambda m: jnp.sum(m(x)))(layer)
    assert float(jnp.abs(g.kernel[...]).max()) > 0
    assert hook.quant_stats.get_value().weight.min_val.shape == (6,)


# -- Linen ---------------------------------------------------------------------------------


class LTinyLM(nn.Module):
    @nn.compact
    def __call__(self, x):
        emb = nn.Embed(VOCAB, D, name="emb")
        h = emb(x.astype(jnp.int32))
        h = h + nn.MultiHeadDotProductAttention(2, name="attn")(nn.LayerNorm(name="ln")(h))
        h = nn.Einsum((D, 2, D // 2), "btd,dnh->bnth", name="mix")(h)  # heads first
        h = jnp.transpose(h, (0, 2, 1, 3)).reshape(h.shape[0], -1, D)
        h = qlinen.DynamicQuantDense(D, name="dyn")(h)
        h = qlinen.WeightOnlyDense(D, spec=INT8_CHANNEL, name="wo8")(jax.nn.relu(h))
        return qlinen.WeightOnlyDense(6, use_bias=False, spec=INT4_GROUP, name="wo4")(h)


def test_linen_transformer_serves_exactly_and_round_trips(tmp_path):
    rules = qlinen.QuantRules([("emb|attn|mix", CFG)])
    x = _ids(1, 16)
    with rules:
        variables = LTinyLM().init(jax.random.key(0), x)
    with rules.with_mode(Mode.CALIBRATE):
        _, upd = LTinyLM().apply(variables, x, mutable=["quant_stats"])
    variables = {**variables, **upd}
    frozen = rules.with_mode(Mode.FROZEN)

    def forward(v):
        with frozen:
            return LTinyLM().apply(variables, v)

    program = qjax.convert(forward, x)
    ops = [layer.op for layer in program.layers.values()]
    assert ops.count("embed") == 1 and ops.count("linear") == 5  # attention's 4, the Einsum
    assert program.layers["mix"].op == "linear" and "mix" not in str(program.float_ops)
    assert ops.count("dynamic_linear") == 1 and ops.count("weight_only_linear") == 2
    assert {k: v for k, v in program.layers.items() if v.op == "dynamic_linear"}.keys() == {"dyn"}
    path = tmp_path / "l.safetensors"
    qjax.save_served(path, program)
    back = qjax.load_served(path)
    jitted = jax.jit(forward)
    total = 0
    for v in (x, _ids(2, 5)):
        want = jitted(v)
        for got in (program(v), back(v)):
            n, differ = _compare(got, want)
            assert differ == 0, (differ, n)
            total += n
    assert total == 2 * (16 + 5) * T * 6


# -- files from anywhere: the new kinds are validated on load ------------------------------


def _step(meta, name):
    for i, st in enumerate(meta["steps"]):
        if st["name"] == name:
            return i, st, st["attrs"]["dict"]
    raise AssertionError(name)


def _spec(meta, name, key="spec"):
    return _step(meta, name)[2][key]["dict"]


def _tensor(name, key, fn):
    def edit(meta, t):
        i = _step(meta, name)[0]
        t[f"{i}.{key}"] = fn(t[f"{i}.{key}"])

    return edit


BAD = [
    ("embed mode", lambda m: _step(m, "emb")[2].update(mode="wrap"), None, "mode 'wrap'"),
    (
        "embed codes out of range",
        lambda m: _step(m, "emb")[1]["params"]["spec"].update(narrow_range=True),
        _tensor("emb", "t.values", lambda v: np.full_like(v, -128)),
        r"codes span \[-128, -128\], outside the spec range \[-127, 127\]",
    ),
    (
        "embed table shape",
        None,
        _tensor("emb", "t.values", lambda v: v[:, :, None]),
        "must be \\(num_embeddings, features\\)",
    ),
    (
        "embed per-row scales",
        None,
        _tensor("emb", "t.scale", lambda s: s[:-1]),
        "scale",
    ),
    (
        "weight-only group size",
        lambda m: _spec(m, "wo4").update(group_size=5),
        None,
        "group_size=5 does not divide",
    ),
    (
        "int4 packed size",
        None,
        _tensor("wo4", "w.codes", lambda c: c[:-1]),
        r"kernel \(14, 6\) from packed codes of shape \(7, 6\)",
    ),
    (
        "int4 codes out of range",
        lambda m: _spec(m, "wo4").update(narrow_range=True),
        _tensor("wo4", "w.codes", lambda c: np.full_like(c, 0x88)),
        r"codes span \[-8, -8\], outside the spec range \[-7, 7\]",
    ),
    (
        "int8 codes stored packed",
        None,
        _tensor("wo8", "w.codes", lambda c: c.view(np.uint8)),
        "must be int8, got uint8",
    ),
    (
        "weight-only 3-bit",
        lambda m: _spec(m, "wo8").update(bits=3),
        None,
        "signed int8 or int4",
    ),
    (
        "dynamic 4-bit activations",
        lambda m: _spec(m, "DynamicQuantLinear", "act_spec").update(bits=4),
        None,
        "8-bit per-tensor or per-token",
    ),
    (
        "dynamic recipe",
        lambda m: _step(m, "DynamicQuantLinear")[2].update(recipe="onnx"),
        None,
        "unknown recipe 'onnx'",
    ),
    (
        "dynamic accumulate",
        lambda m: _step(m, "DynamicQuantLinear")[2].update(accumulate="fbgemm_sat16"),
        None,
        "accumulate 'fbgemm_sat16'",
    ),
    (
        "dynamic per-channel activations",
        lambda m: _spec(m, "DynamicQuantLinear", "act_spec").update(axis=1),
        None,
        "8-bit per-tensor or per-token",
    ),
    (
        "dynamic weight scale",
        None,
        _tensor("DynamicQuantLinear", "w.scale", lambda s: -s),
        "scale",
    ),
    (
        "einsum perm",
        lambda m: _step(m, "down")[2].update(perm=[[0, 1, 2, 3], [0, 0, 1], [0, 2, 1]]),
        None,
        "perm",
    ),
    (
        "dynamic bias",
        None,
        _tensor("DynamicQuantLinear", "b", lambda b: b[:3]),
        r"bias has shape \(3,\)",
    ),
]


@pytest.fixture(scope="module")
def lm_file(tiny_lm, tmp_path_factory):
    """The model's file, written once (a save lowers the model again, symbolically)."""
    path = tmp_path_factory.mktemp("lm") / "lm.safetensors"
    qjax.save_served(path, tiny_lm[1])
    return path


@pytest.mark.parametrize("edit,tensor_edit,match", [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_files_of_the_new_kinds_are_refused(lm_file, tmp_path, edit, tensor_edit, match):
    with pytest.raises(ValueError, match=match):
        qjax.load_served(_tampered(lm_file, tmp_path, edit, tensor_edit))
