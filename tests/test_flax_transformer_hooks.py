"""Quantization hooks for the layers transformers use: LinearGeneral / DenseGeneral,
Einsum, Embed, MultiHeadAttention (NNX and Linen), fake-quant / QAT.

Each hooked layer's output is compared bit for bit with the same computation written
out from qjax primitives (``qparams_from_minmax`` + ``fake_quant``, then the float op);
a transformer block built as a user writes it is quantized by path rules, calibrated,
QAT-trained and frozen, and NNX and Linen give the same numbers from the same weights.
"""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax import lax

import qjax
from qjax.flax import Mode, qjax_recommended
from qjax.flax import linen as ql
from qjax.flax import nnx as qn
from qjax.flax._walk import linen_holders, linen_params_kind, nnx_quantized

CFG = qjax_recommended()  # per-tensor input, per-channel weight (axis=-1)
PER_TENSOR = CFG.replace(weight=dataclasses.replace(CFG.weight, axis=None))


def _x(shape, seed=1):
    return jax.random.normal(jax.random.key(seed), shape, jnp.float32)


def _fq_input(x, cfg):
    """The input quantizer of a first QAT call: the observer's range is the batch's."""
    qp = qjax.qparams_from_minmax(jnp.min(x), jnp.max(x), cfg.activation, cfg.compat)
    return qjax.fake_quant(x, qp)


def _fq_matrix(w2, cfg):
    """The weight quantizer on a (contracted, output) matrix: per output column, or
    per tensor."""
    per_channel = cfg.weight.axis is not None
    mn = jnp.min(w2, axis=0) if per_channel else jnp.min(w2)
    mx = jnp.max(w2, axis=0) if per_channel else jnp.max(w2)
    return qjax.fake_quant(w2, qjax.qparams_from_minmax(mn, mx, cfg.weight, cfg.compat))


def _fq_kernel(kernel, out_axes, cfg):
    """Output axes of ``kernel`` moved last and flattened, quantized, put back."""
    n = kernel.ndim
    outs = sorted(a % n for a in out_axes)
    perm = [a for a in range(n) if a not in outs] + outs
    t = jnp.transpose(kernel, perm)
    k = n - len(outs)
    w2 = t.reshape(int(np.prod(t.shape[:k])), int(np.prod(t.shape[k:])))
    return jnp.transpose(_fq_matrix(w2, cfg).reshape(t.shape), np.argsort(perm))


def _fq_table(table, cfg):
    """An embedding table quantized per row (per embedding vector), or per tensor."""
    return _fq_matrix(table.T, cfg).T


# ---------------------------------------------------------------- explicit references


def ref_linear_general(x, kernel, bias, n_in, cfg):
    xq = _fq_input(x, cfg)
    wq = _fq_kernel(kernel, range(n_in, kernel.ndim), cfg)
    axis = tuple(range(x.ndim - n_in, x.ndim))
    y = lax.dot_general(xq, wq, ((axis, tuple(range(n_in))), ((), ())))
    return y + bias


def ref_einsum(eq, x, kernel, bias_b, cfg):
    rhs, out = eq.split("->")[0].split(",")[1], eq.split("->")[1]
    wq = _fq_kernel(kernel, [i for i, c in enumerate(rhs) if c in out], cfg)
    return jnp.einsum(eq, _fq_input(x, cfg), wq) + bias_b


def _check_stats_input(stats, x):
    np.testing.assert_array_equal(stats.input.min_val, jnp.min(x))
    np.testing.assert_array_equal(stats.input.max_val, jnp.max(x))


# ---------------------------------------------------------------- NNX layers


@pytest.mark.parametrize("cfg", [CFG, PER_TENSOR], ids=["per_channel", "per_tensor"])
def test_nnx_linear_general_is_explicit_fake_quant(cfg):
    # a query-style projection (in 6 -> (2 heads, 3)) and an out-style one ((2, 3) -> 6)
    for in_f, out_f, axis, xshape in (
        (6, (2, 3), -1, (2, 4, 6)),
        ((2, 3), 6, (-2, -1), (2, 4, 2, 3)),
    ):
        layer = nnx.LinearGeneral(in_f, out_f, axis=axis, rngs=nnx.Rngs(0))
        layer.bias[...] = _x(layer.bias.shape, seed=7)
        assert qn.quantize_model(nnx.Sequential(layer), [("layers/0", cfg)]) == {
            "layers/0": "layers/0"
        }
        x = _x(xshape)
        y = layer(x)
        n_in = 1 if isinstance(in_f, int) else len(in_f)
        ref = ref_linear_general(x, layer.kernel[...], layer.bias[...], n_in, cfg)
        np.testing.assert_array_equal(np.asarray(y), np.asarray(ref))
        st = layer.dot_general.quant_stats.get_value()
        _check_stats_input(st, x)
        n_out = 6 if cfg.weight.axis is not None else None
        assert st.weight.min_val.shape == ((n_out,) if n_out else ())
        # the fake-quant is real: the float layer differs
        assert not np.array_equal(np.asarray(y), np.asarray(_float_linear_general(layer, x)))


def _float_linear_general(layer, x):
    hook = layer.dot_general
    layer.dot_general = None
    try:
        return layer(x)
    finally:
        layer.dot_general = nnx.data(hook)


@pytest.mark.parametrize(
    "eq,kshape,bshape,xshape",
    [
        ("btd,dnh->btnh", (6, 2, 3), (2, 3), (2, 4, 6)),  # output axes last
        ("bd,ndh->bnh", (2, 6, 3), (2, 3), (5, 6)),  # output axes around the contracted one
    ],
)
def test_nnx_einsum_is_explicit_fake_quant(eq, kshape, bshape, xshape):
    layer = nnx.Einsum(eq, kshape, bshape, rngs=nnx.Rngs(0))
    layer.bias[...] = _x(bshape, seed=7)
    qn.quantize_model(nnx.Sequential(layer), [("layers/0", CFG)])
    x = _x(xshape)
    y = layer(x)
    bias_b = jnp.reshape(layer.bias[...], layer._infer_broadcasted_bias_shape(eq, x, layer.kernel))
    ref = ref_einsum(eq, x, layer.kernel[...], bias_b, CFG)
    np.testing.assert_array_equal(np.asarray(y), np.asarray(ref))
    st = layer.einsum_op.quant_stats.get_value()
    _check_stats_input(st, x)
    assert st.weight.min_val.shape == (6,)  # 2 x 3 output channels


@pytest.mark.parametrize("cfg", [CFG, PER_TENSOR], ids=["per_row", "per_tensor"])
def test_nnx_embed_is_weight_only_fake_quant(cfg):
    emb = nnx.Embed(7, 4, rngs=nnx.Rngs(0))
    qn.quantize_model(nnx.Sequential(emb), [("layers/0", cfg)])
    tq = _fq_table(emb.embedding[...], cfg)
    ids = jnp.array([[0, 3, 6], [2, 2, 5]])
    np.testing.assert_array_equal(np.asarray(emb(ids)), np.asarray(jnp.take(tq, ids, axis=0)))
    q = _x((3, 4))
    np.testing.assert_array_equal(np.asarray(emb.attend(q)), np.asarray(jnp.dot(q, tq.T)))
    st = emb.promote_dtype.quant_stats.get_value()
    assert st.input is None and st.output is None  # weight only
    assert st.weight.min_val.shape == ((7,) if cfg.weight.axis is not None else ())
    assert not np.array_equal(np.asarray(tq), np.asarray(emb.embedding[...]))


# ---------------------------------------------------------------- Linen layers


def _linen_apply(module, rules, x, method=None, params=None):
    with rules:
        v = module.init(jax.random.key(0), x, method=method)
        if params is not None:
            v = {**v, "params": params}
        y, upd = module.apply(v, x, method=method, mutable=["quant_stats"])
    return y, v, upd["quant_stats"]


@pytest.mark.parametrize("cfg", [CFG, PER_TENSOR], ids=["per_channel", "per_tensor"])
def test_linen_dense_general_matches_explicit_and_nnx(cfg):
    x = _x((2, 4, 6))
    dense = _seq(nn.DenseGeneral((2, 3), bias_init=nn.initializers.normal(1.0)))
    y, v, qs = _linen_apply(dense, ql.QuantRules([("layers_0", cfg)]), x)
    p = v["params"]["layers_0"]
    np.testing.assert_array_equal(y, ref_linear_general(x, p["kernel"], p["bias"], 1, cfg))
    holder = linen_holders(qs)[0][0]
    assert holder == "layers_0/QuantDotGeneral_0"
    assert linen_params_kind(p, holder) == "linear_general"
    # NNX from the same weights: the same numbers
    layer = nnx.LinearGeneral(6, (2, 3), rngs=nnx.Rngs(0))
    layer.kernel[...], layer.bias[...] = p["kernel"], p["bias"]
    qn.quantize_model(nnx.Sequential(layer), [("layers/0", cfg)])
    np.testing.assert_array_equal(np.asarray(layer(x)), y)


def _seq(layer):
    """A one-layer nn.Sequential, so the layer has the path ``layers_0``."""
    return nn.Sequential([layer])


def test_linen_einsum_matches_explicit_and_nnx():
    eq = "bd,ndh->bnh"
    x = _x((5, 6))
    lin = _seq(nn.Einsum((2, 6, 3), eq, bias_init=nn.initializers.normal(1.0)))
    y, v, qs = _linen_apply(lin, ql.QuantRules([("layers_0", CFG)]), x)
    p = v["params"]["layers_0"]
    assert list(qs["layers_0"]) == ["QuantEinsum_0"]
    ref = ref_einsum(eq, x, p["kernel"], p["bias"].reshape(1, 2, 3), CFG)
    np.testing.assert_array_equal(y, ref)
    layer = nnx.Einsum(eq, (2, 6, 3), (2, 3), rngs=nnx.Rngs(0))
    layer.kernel[...], layer.bias[...] = p["kernel"], p["bias"]
    qn.quantize_model(nnx.Sequential(layer), [("layers/0", CFG)])
    np.testing.assert_array_equal(np.asarray(layer(x)), y)


def test_linen_embed_matches_explicit_and_nnx():
    ids = jnp.array([[0, 3, 6], [2, 2, 5]])
    emb = _seq(nn.Embed(7, 4))
    rules = ql.QuantRules([("layers_0", CFG)])
    y, v, qs = _linen_apply(emb, rules, ids)
    table = v["params"]["layers_0"]["embedding"]
    tq = _fq_table(table, CFG)
    np.testing.assert_array_equal(y, jnp.take(tq, ids, axis=0))
    st = qs["layers_0"]["QuantEmbed_0"]["stats"]
    assert st.input is None and st.weight.min_val.shape == (7,)
    nemb = nnx.Embed(7, 4, rngs=nnx.Rngs(0))
    nemb.embedding[...] = table
    qn.quantize_model(nnx.Sequential(nemb), [("layers/0", CFG)])
    np.testing.assert_array_equal(np.asarray(nemb(ids)), y)


def test_linen_embed_attend_is_hooked():
    class Tied(nn.Module):
        @nn.compact
        def __call__(self, ids):
            emb = nn.Embed(7, 4, name="emb")
            return emb.attend(emb(ids))

    ids = jnp.array([1, 4])
    with ql.QuantRules([("emb", CFG)]):
        v = Tied().init(jax.random.key(0), ids)
        y, upd = Tied().apply(v, ids, mutable=["quant_stats"])
    table = v["params"]["emb"]["embedding"]
    tq = _fq_table(table, CFG)
    np.testing.assert_array_equal(y, jnp.dot(jnp.take(tq, ids, axis=0), tq.T))
    assert int(upd["quant_stats"]["emb"]["QuantEmbed_0"]["stats"].weight.count) == 2


# ---------------------------------------------------------------- a transformer block


class MLP(nnx.Module):
    def __init__(self, d, rngs):
        self.fc1 = nnx.Linear(d, 2 * d, rngs=rngs)
        self.fc2 = nnx.Linear(2 * d, d, rngs=rngs)

    def __call__(self, x):
        return self.fc2(jax.nn.gelu(self.fc1(x)))


class Block(nnx.Module):
    def __init__(self, d, heads, rngs):
        self.ln1 = nnx.LayerNorm(d, rngs=rngs)
        self.attn = nnx.MultiHeadAttention(heads, d, decode=False, rngs=rngs)
        self.ln2 = nnx.LayerNorm(d, rngs=rngs)
        self.mlp = MLP(d, rngs)

    def __call__(self, x):
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class LMLP(nn.Module):
    d: int

    @nn.compact
    def __call__(self, x):
        return nn.Dense(self.d, name="fc2")(jax.nn.gelu(nn.Dense(2 * self.d, name="fc1")(x)))


class LBlock(nn.Module):
    heads: int

    @nn.compact
    def __call__(self, x):
        attn = nn.MultiHeadDotProductAttention(self.heads, name="attn")
        x = x + attn(nn.LayerNorm(name="ln1")(x))
        return x + LMLP(x.shape[-1], name="mlp")(nn.LayerNorm(name="ln2")(x))


RULES = [(r"attn/.*", CFG), (r"mlp/.*", CFG)]
PROJ = ["attn/key", "attn/out", "attn/query", "attn/value"]


def test_nnx_block_calibrate_qat_freeze():
    model = Block(8, 2, nnx.Rngs(0))
    assert sorted(qn.quantize_model(model, RULES)) == PROJ + ["mlp/fc1", "mlp/fc2"]
    kinds = {q.path: q.kind for q in nnx_quantized(model, root="")}
    assert kinds == {
        **{p: "linear_general" for p in PROJ},
        "mlp/fc1": "linear",
        "mlp/fc2": "linear",
    }
    batches = [_x((2, 5, 8), seed=s) for s in range(3)]
    assert qn.calibrate(model, batches, progress=False, then=Mode.QAT) == 3
    qn.check_statistics(model)
    rows = {(r.path, r.role): r.scale.shape for r in qjax.debug.qparams_table(model)}
    assert rows[("attn/query/dot_general", "weight")] == (8,)  # 2 heads x 4 features
    assert rows[("attn/out/dot_general", "input")] == ()
    assert len(rows) == 12  # input and weight of each of the 6 hooked layers

    x, target = _x((4, 5, 8), seed=10), _x((4, 5, 8), seed=11)
    # sgd: optax adam is not strict-promotion clean (see test_demo), the forward must be
    opt = nnx.Optimizer(model, optax.sgd(0.05), wrt=nnx.Param)

    @nnx.jit
    def step(model, opt, x, target):
        def loss_fn(m):
            return jnp.mean((m(x) - target) ** 2)

        loss, grads = nnx.value_and_grad(loss_fn)(model)
        opt.update(model, grads)
        return loss, grads

    losses = []
    for _ in range(6):
        loss, grads = step(model, opt, x, target)
        losses.append(float(loss))
        leaves = jax.tree.leaves(grads)
        assert len(leaves) == len(jax.tree.leaves(nnx.state(model, nnx.Param)))
        assert all(bool(jnp.isfinite(g).all()) for g in leaves)
    for p in PROJ:  # the kernel of every projection gets a gradient through fake-quant
        g = nnx.to_pure_dict(grads)["attn"][p.split("/")[1]]["kernel"]
        assert float(jnp.abs(g).max()) > 0
    assert losses[-1] < losses[0]

    qn.set_mode(model, Mode.FROZEN)
    assert all(q.holder.mode is Mode.FROZEN for q in nnx_quantized(model))
    y1, y2 = model(x), model(x)
    np.testing.assert_array_equal(np.asarray(y1), np.asarray(y2))  # no observer moves
    assert bool(jnp.isfinite(y1).all())


def test_nnx_and_linen_block_same_numbers():
    x = _x((2, 5, 8))
    model = Block(8, 2, nnx.Rngs(0))
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    qn.quantize_model(model, RULES)
    rules = ql.QuantRules(RULES)
    y, _, qs = _linen_apply(LBlock(2), rules, x, params=params)
    assert sorted(rules.matched) == PROJ + ["mlp/fc1", "mlp/fc2"]
    np.testing.assert_array_equal(np.asarray(model(x)), y)
    # and frozen, from the statistics both observed
    qn.set_mode(model, Mode.FROZEN)
    with rules.with_mode(Mode.FROZEN):
        yf = LBlock(2).apply({"params": params, "quant_stats": qs}, x)
    np.testing.assert_array_equal(np.asarray(model(x)), yf)


def test_container_rule_covers_the_projections():
    model = Block(8, 2, nnx.Rngs(0))
    assert sorted(qn.quantize_model(model, [("attn", CFG)])) == PROJ
    rules = ql.QuantRules([("attn", CFG)])
    _linen_apply(LBlock(2), rules, _x((2, 5, 8)))
    assert sorted(rules.matched) == PROJ


# ---------------------------------------------------------------- errors


def test_unsupported_leaf_names_the_layer_and_the_supported_ones():
    class WithBN(nnx.Module):
        def __init__(self, rngs):
            self.fc = nnx.Linear(4, 4, rngs=rngs)
            self.bn = nnx.BatchNorm(4, rngs=rngs)

    with pytest.raises(TypeError, match="'bn', a BatchNorm") as e:
        qn.quantize_model(WithBN(nnx.Rngs(0)), [("bn", CFG)])
    for name in ("nnx.Linear", "nnx.LinearGeneral", "nnx.Einsum", "nnx.Embed", "nnx.Conv"):
        assert name in str(e.value)

    class LWithBN(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.BatchNorm(use_running_average=True, name="bn")(nn.Dense(4, name="fc")(x))

    with pytest.raises(TypeError, match="'bn', a BatchNorm") as e:
        with ql.QuantRules([("bn", CFG)]):
            LWithBN().init(jax.random.key(0), jnp.ones((2, 4)))
    for name in ("nn.Dense", "nn.DenseGeneral", "nn.Einsum", "nn.Embed", "nn.Conv"):
        assert name in str(e.value)
    # a rule that fully matches a LayerNorm is an error; one over its container is not
    with pytest.raises(TypeError, match="'block/ln1', a LayerNorm"):
        qn.quantize_model(Outer(nnx.Rngs(0)), [("block/.*", CFG)])
    used = qn.quantize_model(Outer(nnx.Rngs(0)), [("block", CFG)])
    assert sorted(used) == [f"block/{p}" for p in PROJ + ["mlp/fc1", "mlp/fc2"]]


class Outer(nnx.Module):
    def __init__(self, rngs):
        self.block = Block(8, 2, rngs)


def test_convert_serves_a_hooked_linear_general_in_int8():
    """A Sequential with a hooked stock layer is traced like any model: the
    LinearGeneral kernel (4, (2, 2)) runs as an int8 (4, 4) linear, outputs unflattened."""
    emb = nnx.Sequential(nnx.LinearGeneral(4, (2, 2), rngs=nnx.Rngs(0)))
    qn.quantize_model(emb, [("layers/0", CFG.replace(scheme="fbgemm"))])
    x = jax.random.normal(jax.random.key(0), (3, 4))
    qn.calibrate(emb, [x], progress=False)
    qn.set_mode(emb, Mode.FROZEN)
    program = qjax.convert(emb, x)
    assert isinstance(program, qjax.Program)
    assert [layer.op for layer in program.layers.values()] == ["quantize", "linear", "float"]
    assert list(program.float_ops.values()) == ["add"]  # the stock layer's bias, in float
    y = np.asarray(program(x))
    assert y.shape == (3, 2, 2) and int((y != np.asarray(emb(x))).sum()) == 0
