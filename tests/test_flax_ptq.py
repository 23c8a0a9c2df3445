"""PTQ layers: dynamic quantization (vs torch quantize_dynamic), int4 packing, weight-only."""

import functools
import warnings

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hypothesis import given, settings
from hypothesis import strategies as st

import qjax
from qjax import QuantSpec
from qjax.flax import _ptq
from qjax.flax import linen as ql
from qjax.flax import nnx as qn

torch = pytest.importorskip("torch")


# --------------------------------------------------------------------------------------
# dynamic quantization vs torch.ao.nn.quantized.dynamic.Linear


def _torch_dynamic(k, n, per_channel, seed):
    torch.manual_seed(seed)
    lin = torch.nn.Linear(k, n)
    qconfig = (
        torch.ao.quantization.per_channel_dynamic_qconfig
        if per_channel
        else torch.ao.quantization.default_dynamic_qconfig
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        m = torch.ao.quantization.quantize_dynamic(
            torch.nn.Sequential(lin), {torch.nn.Linear: qconfig}, dtype=torch.qint8
        )
    return lin, m[0]


def _weight_from_torch(qlin, per_channel):
    """The torch layer's int8 weight as a qjax PreparedLinear ((out, in) -> (in, out))."""
    w, b = qlin._packed_params._weight_bias()
    codes = jnp.asarray(w.int_repr().numpy().T)
    if per_channel:
        spec = QuantSpec(bits=8, signed=True, symmetric=True, axis=-1)
        scale = w.q_per_channel_scales().numpy().astype(np.float32)
        zp = w.q_per_channel_zero_points().numpy().astype(np.int32)
    else:
        spec = QuantSpec(bits=8, signed=True, symmetric=True)
        scale, zp = np.float32(w.q_scale()), np.int32(w.q_zero_point())
    wq = qjax.QArray(codes, qjax.QParams(jnp.asarray(scale), jnp.asarray(zp), spec))
    return qjax.kernels.prepare_linear(wq), jnp.asarray(b.detach().numpy()), spec


# fbgemm runs the same FBGEMM kernels as x86 for Linear: slow-marked
@pytest.mark.parametrize("engine", ["x86", pytest.param("fbgemm", marks=pytest.mark.slow)])
@pytest.mark.parametrize("per_channel", [False, True])
def test_dynamic_linear_matches_torch(engine, per_channel, rng):
    """Float outputs of torch's dynamic Linear, compared bit for bit (0 mismatches), and
    the int8 weights qjax makes from the float weights equal torch's."""
    torch.backends.quantized.engine = engine
    total = mismatched = 0
    for seed, (m, k, n) in enumerate([(23, 37, 19), (1, 64, 8), (5, 17, 33), (16, 128, 10)]):
        lin, qlin = _torch_dynamic(k, n, per_channel, seed)
        pw, bias, spec = _weight_from_torch(qlin, per_channel)
        # qjax quantizes torch's float weight to the same codes and scales (rules 2, 6)
        mine = _ptq.prepare_dynamic_weight(jnp.asarray(lin.weight.detach().numpy().T), spec)
        np.testing.assert_array_equal(mine.weight.values, pw.weight.values)
        np.testing.assert_array_equal(mine.weight.scale, pw.weight.scale)
        f = jax.jit(lambda x, pw=pw, bias=bias: _ptq.dynamic_linear(x, pw, bias))
        for t in range(6):
            shift = rng.uniform(-1, 1) * (t % 3)
            x = (rng.standard_normal((m, k)) * rng.uniform(0.05, 8) + shift).astype(np.float32)
            if t == 5:
                x = np.abs(x)  # min >= 0: range widened to include 0
            want = qlin(torch.from_numpy(x)).numpy()
            got = np.asarray(f(jnp.asarray(x)))
            mismatched += int((got.view(np.int32) != want.view(np.int32)).sum())
            total += want.size
    print(f"dynamic linear {engine} per_channel={per_channel}: {mismatched}/{total} differ")
    assert total == 4620 and mismatched == 0


def test_dynamic_linear_uses_int8_dot():
    """The compiled program's only dot is int8 x int8 -> int32 (no float matmul)."""
    pw = _ptq.prepare_dynamic_weight(jnp.ones((16, 4)))
    jaxpr = jax.make_jaxpr(lambda x: _ptq.dynamic_linear(x, pw, jnp.zeros(4)))(jnp.ones((3, 16)))
    dots = [e for e in jaxpr.eqns if e.primitive.name == "dot_general"]
    assert len(dots) == 1
    assert [v.aval.dtype for v in dots[0].invars] == [jnp.int8, jnp.int8]
    assert dots[0].outvars[0].aval.dtype == jnp.int32


def test_dynamic_linear_is_per_batch(rng):
    """Activation qparams come from each call's own range: scaling x by 10 scales y."""
    k = rng.standard_normal((8, 3)).astype(np.float32)
    pw = _ptq.prepare_dynamic_weight(jnp.asarray(k))
    x = jnp.asarray(rng.standard_normal((4, 8)).astype(np.float32))
    f = jax.jit(lambda x: _ptq.dynamic_linear(x, pw))
    y1, y10 = f(x), f(10 * x)
    np.testing.assert_allclose(y10, 10 * y1, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(y1, x @ k, atol=0.1)


def test_dynamic_errors():
    pw = _ptq.prepare_dynamic_weight(jnp.ones((4, 2)))
    with pytest.raises(ValueError, match="does not fit a \\(4, 2\\) weight"):
        _ptq.dynamic_linear(jnp.ones((1, 3)), pw)
    with pytest.raises(TypeError, match="floating input"):
        _ptq.dynamic_linear(jnp.ones((1, 4), jnp.int32), pw)
    with pytest.raises(ValueError, match="must be 8-bit, per-tensor or per-token"):
        _ptq.dynamic_linear(jnp.ones((1, 4)), pw, act_spec=QuantSpec(bits=4))
    with pytest.raises(ValueError, match="kernel must be \\(in, out\\)"):
        _ptq.prepare_dynamic_weight(jnp.ones(4))


def test_dynamic_nnx_equals_linen(rng):
    k = jnp.asarray(rng.standard_normal((12, 5)).astype(np.float32))
    b = jnp.asarray(rng.standard_normal(5).astype(np.float32))
    x = jnp.asarray(rng.standard_normal((7, 12)).astype(np.float32))
    lin = nnx.Linear(12, 5, rngs=nnx.Rngs(0))
    lin.kernel[...], lin.bias[...] = k, b
    a = nnx.jit(lambda m, x: m(x))(qn.DynamicQuantLinear.from_linear(lin), x)
    v = {ql.QUANTIZED: ql.dynamic_variables(k, b)}
    c = jax.jit(ql.DynamicQuantDense(5).apply)(v, x)
    np.testing.assert_array_equal(a, c)
    # init path: Linen quantizes its own kernel_init kernel into the quantized collection
    v0 = ql.DynamicQuantDense(5).init(jax.random.key(0), x)
    assert sorted(v0) == [ql.QUANTIZED] and v0[ql.QUANTIZED]["weight"].weight.dtype == jnp.int8


# --------------------------------------------------------------------------------------
# int4 packing


@settings(max_examples=12, deadline=None)
@given(
    signed=st.booleans(),
    rows=st.integers(1, 9),
    cols=st.integers(1, 5),
    axis=st.sampled_from([0, 1, -1]),
    seed=st.integers(0, 2**16),
)
def test_pack_unpack_roundtrip(signed, rows, cols, axis, seed):
    """unpack(pack(q)) == q for codes over the full 4-bit range, either axis."""
    r = np.random.default_rng(seed)
    shape = [2 * rows, 2 * cols]
    lo, hi = (-8, 7) if signed else (0, 15)
    q = r.integers(lo, hi + 1, size=shape)
    q.flat[:2] = [lo, hi]  # both ends always present
    q = jnp.asarray(q.astype(np.int8 if signed else np.uint8))
    p = _ptq.pack_int4(q, axis=axis)
    assert p.dtype == jnp.uint8 and p.size * 2 == q.size
    np.testing.assert_array_equal(_ptq.unpack_int4(p, axis=axis, signed=signed), q)


def test_pack_every_pair():
    """All 256 (lo, hi) pairs of signed codes round-trip, and each byte is distinct."""
    lo, hi = np.meshgrid(np.arange(-8, 8), np.arange(-8, 8), indexing="ij")
    q = jnp.asarray(np.stack([lo.ravel(), hi.ravel()], axis=0).astype(np.int8))
    p = _ptq.pack_int4(q, axis=0)
    assert len(np.unique(np.asarray(p))) == 256
    np.testing.assert_array_equal(_ptq.unpack_int4(p, axis=0), q)


def test_pack_errors():
    with pytest.raises(ValueError, match="odd size 5"):
        _ptq.pack_int4(jnp.zeros((5, 2), jnp.int8))
    with pytest.raises(ValueError, match="odd size 3"):
        _ptq.pack_int4(jnp.zeros((2, 3), jnp.int8), axis=1)
    with pytest.raises(TypeError, match="int8 or uint8"):
        _ptq.pack_int4(jnp.zeros(2, jnp.int32))
    with pytest.raises(TypeError, match="uint8 bytes"):
        _ptq.unpack_int4(jnp.zeros(2, jnp.int8))
    with pytest.raises(ValueError, match="out of range"):
        _ptq.pack_int4(jnp.zeros(2, jnp.int8), axis=3)
    with pytest.raises(ValueError, match="in_features=5 is odd"):
        _ptq.pack_weight(jnp.ones((5, 2)))


# --------------------------------------------------------------------------------------
# weight-only layers

INT4_GROUP = QuantSpec(bits=4, signed=True, symmetric=True, axis=-1, group_size=16, group_axis=0)
INT8_CHANNEL = QuantSpec(bits=8, signed=True, symmetric=True, axis=-1)


@pytest.mark.parametrize(
    "spec,want_bytes",
    [
        # 64x32 kernel (8192 B in float32): codes + float32 scales + int32 zero points
        (_ptq.INT4_WEIGHT, 64 * 32 // 2 + 32 * 4 + 32 * 4),
        (INT4_GROUP, 64 * 32 // 2 + 4 * 32 * 4 * 2),
        (INT8_CHANNEL, 64 * 32 + 32 * 4 * 2),
    ],
    ids=["int4-channel", "int4-group16", "int8-channel"],
)
def test_weight_only(spec, want_bytes, rng):
    k = jnp.asarray(rng.standard_normal((64, 32)).astype(np.float32))
    b = jnp.asarray(rng.standard_normal(32).astype(np.float32))
    x = jnp.asarray(rng.standard_normal((3, 64)).astype(np.float32))
    layer = qn.WeightOnlyLinear(k, b, spec=spec)
    print(f"weight-only {spec.bits}-bit {spec.granularity}: {layer.nbytes} B vs {k.nbytes} B")
    assert layer.nbytes == want_bytes
    stored = layer.weight.get_value().codes
    assert stored.dtype == (jnp.uint8 if spec.bits == 4 else jnp.int8)
    # reference: the float kernel fake-quantized with its own per-channel/group range
    mn, mx, _ = qjax.observers.finite_minmax(k, spec)
    wf = qjax.fake_quant(k, qjax.qparams_from_minmax(mn, mx, spec))
    np.testing.assert_array_equal(layer(x), x @ wf + b)
    # NNX == Linen from the same kernel
    v = {ql.QUANTIZED: ql.weight_only_variables(k, b, spec=spec)}
    np.testing.assert_array_equal(ql.WeightOnlyDense(32, spec=spec).apply(v, x), layer(x))
    # int4 error is bounded by half a step per weight
    assert float(jnp.abs(wf - k).max()) <= float(jnp.abs(k).max()) / spec.qmax


def test_weight_only_errors():
    with pytest.raises(ValueError, match="signed int8 and int4"):
        _ptq.pack_weight(jnp.ones((4, 2)), QuantSpec(bits=6))
    with pytest.raises(ValueError, match="signed int8 and int4"):
        _ptq.pack_weight(jnp.ones((4, 2)), QuantSpec(bits=4, signed=False))
    with pytest.raises(ValueError, match="does not fit"):
        qn.WeightOnlyLinear(jnp.ones((4, 2)))(jnp.ones((1, 3)))


# --------------------------------------------------------------------------------------
# a whole model: dynamic and weight-only stay close to float


class _LinenMLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        h = nn.relu(nn.Dense(16)(x))
        return nn.Dense(4)(h)


@pytest.mark.slow
def test_dynamic_mlp_close_to_float(rng):
    model = _LinenMLP()
    x = jnp.asarray(rng.standard_normal((32, 8)).astype(np.float32))
    p = model.init(jax.random.key(1), x)["params"]
    yf = model.apply({"params": p}, x)

    @functools.partial(jax.jit, static_argnums=1)
    def run(layer_vars, cls):
        h = cls(16).apply({ql.QUANTIZED: layer_vars[0]}, x)
        return cls(4).apply({ql.QUANTIZED: layer_vars[1]}, jax.nn.relu(h))

    d = [ql.dynamic_variables(p[n]["kernel"], p[n]["bias"]) for n in ("Dense_0", "Dense_1")]
    w = [ql.weight_only_variables(p[n]["kernel"], p[n]["bias"]) for n in ("Dense_0", "Dense_1")]
    err_dyn = float(jnp.abs(run(d, ql.DynamicQuantDense) - yf).max())
    err_w4 = float(jnp.abs(run(w, ql.WeightOnlyDense) - yf).max())
    print(f"MLP max |error|: dynamic int8 {err_dyn:.4f}, weight-only int4 {err_w4:.4f}")
    assert err_dyn < 0.05 * float(jnp.abs(yf).max())
    assert err_w4 < 0.3 * float(jnp.abs(yf).max())
