"""qjax.convert of a Flax Sequential (NNX and Linen): traced and lowered to the one int8
Program like any class; train == serve; export; save/load."""

import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import qjax
from qjax.flax import Mode, default_qat_qconfig
from qjax.flax import linen as qlinen
from qjax.flax import nnx as qnnx

# Schemes whose integer formula runs identically in the layer and in the server. "exact"
# (a host callback) also works under jit in both paths; it is slow, so one model only.
SCHEMES = ("fbgemm", "qnnpack", "onednn", "tflite", "litert_ref", "litert")


def _cfg(backend, scheme):
    return default_qat_qconfig(backend).replace(quantize_input=True, scheme=scheme)


def _mlp(cfg, seed=0):
    r = nnx.Rngs(seed)
    return nnx.Sequential(
        qnnx.QuantStub(cfg),
        qnnx.QuantLinear(12, 16, config=cfg, rngs=r),
        nnx.relu,
        qnnx.QuantLinear(16, 16, config=cfg, rngs=r),
        nnx.relu,
        qnnx.QuantLinear(16, 5, config=cfg, rngs=r),
        qnnx.DeQuantStub(),
    )


def _cnn(cfg, seed=0):
    r = nnx.Rngs(seed)
    return nnx.Sequential(
        qnnx.QuantStub(cfg),
        qnnx.QuantConvBn(1, 4, (3, 3), config=cfg, relu=True, rngs=r),
        qnnx.QuantConvBn(4, 6, (3, 3), config=cfg, relu=True, rngs=r),
        qnnx.MaxPool((2, 2)),
        qnnx.Flatten(),
        qnnx.QuantLinear(4 * 4 * 6, 5, config=cfg, rngs=r),
        qnnx.DeQuantStub(),
    )


def _data(shape, n=3, seed=0):
    keys = jax.random.split(jax.random.key(seed), n)
    return [jax.random.normal(k, shape) * 2.0 for k in keys]


def _prepare(make, backend, shape, seed=0):
    """A calibrated model (BN with moved running statistics and random affine params),
    then ``FROZEN`` with BN frozen. No training steps: they would only add compile time
    (the example trains and checks the same equality)."""
    model = make(_cfg(backend, "fbgemm"), seed)
    for _, m in nnx.iter_modules(model):
        if isinstance(m, qnnx.QuantConvBn):
            k1, k2 = jax.random.split(jax.random.key(seed + 1))
            m.bn_scale[...] = 1.0 + 0.3 * jax.random.normal(k1, m.bn_scale.shape)
            m.bn_bias[...] = 0.2 * jax.random.normal(k2, m.bn_bias.shape)
    qnnx.calibrate(model, _data(shape, seed=seed), progress=False)
    if any(isinstance(m, qnnx.QuantConvBn) for _, m in nnx.iter_modules(model)):
        qnnx.freeze_bn_stats(model)
    test_shape = (16 * shape[0],) + shape[1:]  # many outputs: near-ties do occur
    return model, _data(test_shape, n=1, seed=seed + 100)[0]


def _with_scheme(model, scheme):
    """The same trained model with another ``QuantConfig.scheme`` (statistics kept)."""
    for _, m in nnx.iter_modules(model):
        if isinstance(m, (qnnx.ActQuant, qnnx.QuantLinear, qnnx.QuantConv, qnnx.QuantConvBn)):
            m.config = m.config.replace(scheme=scheme)
    return model


_MODELS = {}


def _model(kind, backend):
    key = (kind, backend)
    if key not in _MODELS:
        make, shape = {"mlp": (_mlp, (64, 12)), "cnn": (_cnn, (16, 8, 8, 1))}[kind]
        _MODELS[key] = _prepare(make, backend, shape)
    return _MODELS[key]


def _compare(model, x, scheme):
    """(values compared, mismatches, max |diff| in output LSB): frozen vs served."""
    frozen = nnx.jit(lambda m, x: m(x))(model, x)
    served = qjax.convert(model, x, scheme=scheme)
    y = served(x)
    diff = np.asarray(y) != np.asarray(frozen)
    last = [m for m in model.layers if isinstance(m, qnnx.QuantLinear)][-1]
    qy = last.config.activation_observer(last.config.activation, last.config.compat).qparams(
        last.quant_stats.get_value().output
    )
    lsb = float(np.max(np.abs(np.asarray(y) - np.asarray(frozen)), initial=0.0)) / float(qy.scale)
    return diff.size, int(diff.sum()), lsb


FAST = [  # the full cross product runs with -m slow
    ("mlp", "x86", "fbgemm"),
    ("mlp", "qnnpack", "qnnpack"),
    ("cnn", "x86", "fbgemm"),
    ("cnn", "qnnpack", "tflite"),
]
ALL = [
    (k, b, s)
    for k in ("mlp", "cnn")
    for b in ("x86", "qnnpack")  # per-channel / per-tensor weights
    for s in SCHEMES
]
CASES = FAST + [pytest.param(*c, marks=pytest.mark.slow) for c in ALL if c not in FAST]


@pytest.mark.parametrize("kind,backend,scheme", CASES)
def test_frozen_equals_served(kind, backend, scheme):
    model, x = _model(kind, backend)
    model = _with_scheme(model, scheme)
    n, bad, _ = _compare(model, x, scheme)
    print(f"{kind} {backend} {scheme}: {n} outputs, {bad} mismatches")
    assert n == x.shape[0] * 5 and bad == 0


@pytest.mark.slow
def test_eager_frozen_equals_served():
    """Not only under jit: the un-jitted frozen forward gives the same numbers."""
    model, x = _model("cnn", "x86")
    model = _with_scheme(model, "fbgemm")
    assert bool((model(x) == qjax.convert(model, x)(x)).all())


@pytest.mark.slow
def test_exact_scheme_host_callback_under_jit():
    model, x = _model("mlp", "x86")
    n, bad, _ = _compare(_with_scheme(model, "exact"), x[:64], "exact")
    assert n == 64 * 5 and bad == 0


@pytest.mark.parametrize("kind", ["mlp", "cnn"])
def test_float_simulation_differs_by_at_most_one_lsb(kind):
    """scheme=None (float simulation): measured, bounded, not exact."""
    model, _ = _model(kind, "x86")
    shape = {"mlp": (4096, 12), "cnn": (1024, 8, 8, 1)}[kind]
    x = _data(shape, n=1, seed=5)[0]
    n, bad, lsb = _compare(_with_scheme(model, None), x, "fbgemm")
    print(f"{kind} scheme=None: {n} outputs, {bad} mismatches, max {lsb:.3f} LSB")
    assert lsb <= 1.0 + 1e-3
    assert bad < 0.05 * n


def test_qjax_recommended_input_quantizer_convention():
    """quantize_input-only layers take their output qparams from the next quantizer."""
    from qjax.flax import qjax_recommended

    c = qjax_recommended()
    r = nnx.Rngs(0)
    model = nnx.Sequential(
        qnnx.QuantLinear(6, 8, config=c, rngs=r),
        nnx.relu,
        qnnx.QuantLinear(8, 4, config=c, rngs=r),
        qnnx.ActQuant(c),
    )
    x = _data((32, 6))[0]
    qnnx.calibrate(model, [x], progress=False)
    served = qjax.convert(model, x)
    # each layer quantizes its own input; without an output quantizer it returns the float
    # f32(acc)·f32(s_x·s_w) + b, the ReLU runs in float, the ActQuant quantizes the output
    ops = [la.op for la in served.layers.values()]
    assert ops == ["quantize", "linear", "float", "quantize", "linear", "quantize", "dequantize"]
    assert list(served.float_ops.values()) == ["max"]
    y, f = np.asarray(served(x)), np.asarray(nnx.jit(lambda m, x: m(x))(model, x))
    assert np.array_equal(y, f)  # served == frozen (the config has no scheme: no ties here)


def _walk_eqns(jaxpr):
    for eqn in jaxpr.eqns:
        yield eqn
        for p in eqn.params.values():
            subs = p if isinstance(p, (list, tuple)) else [p]
            for s in subs:
                inner = getattr(s, "jaxpr", None)
                if inner is not None:
                    yield from _walk_eqns(getattr(inner, "jaxpr", inner))


def test_served_program_has_only_int8_dots_and_convs():
    model, x = _model("cnn", "x86")
    model = _with_scheme(model, "fbgemm")
    served = qjax.convert(model, x)
    jaxpr = jax.make_jaxpr(served)(x)
    seen = 0
    for eqn in _walk_eqns(jaxpr.jaxpr):
        if eqn.primitive.name in ("dot_general", "conv_general_dilated"):
            seen += 1
            ins = [v.aval.dtype for v in eqn.invars]
            assert ins == [jnp.int8, jnp.int8], (eqn.primitive.name, ins)
            assert eqn.outvars[0].aval.dtype == jnp.int32
    assert seen == 3  # two convs and one dense


def test_export_round_trip_and_save_load(tmp_path):
    model, x = _model("cnn", "x86")
    model = _with_scheme(model, "fbgemm")
    served = qjax.convert(model, x)
    y = served(x)
    exp = jax.export.export(jax.jit(served))(jax.ShapeDtypeStruct(x.shape, x.dtype))
    back = jax.export.deserialize(exp.serialize())
    assert bool((back.call(x) == y).all())
    path = tmp_path / "cnn.safetensors"
    qjax.save_served(path, served)
    loaded = qjax.load_served(path)
    assert [s.name for s in loaded.steps] == [s.name for s in served.steps]
    assert [s.spec[0] for s in loaded.steps] == [s.spec[0] for s in served.steps]
    assert bool((loaded(x) == y).all())
    for a, b in zip(jax.tree.leaves(loaded.params), jax.tree.leaves(served.params), strict=True):
        assert a.dtype == b.dtype and a.shape == b.shape and np.array_equal(a, b)
    with open(path, "rb") as f:  # safetensors: 8-byte header length, then JSON
        n = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(n))
    assert json.loads(header["__metadata__"]["qjax"])["format"] == "qjax.program"


def test_linen_sequential_converts_and_serves_exactly():
    cfg = _cfg("x86", "fbgemm")
    model = nn.Sequential(
        [
            qlinen.QuantStub(cfg),
            qlinen.QuantConvBn(4, (3, 3), config=cfg, relu=True, use_running_average=True),
            qlinen.MaxPool((2, 2)),
            qlinen.Flatten(),
            qlinen.QuantDense(5, config=cfg),
            qlinen.DeQuantStub(),
        ]
    )
    xs = _data((8, 6, 6, 1))
    variables = model.init(jax.random.key(0), xs[0])
    variables, _ = qlinen.calibrate(model, variables, xs, progress=False, mode=Mode.CALIBRATE)
    frozen = nn.Sequential(
        [
            qlinen.QuantStub(cfg, mode=Mode.FROZEN),
            qlinen.QuantConvBn(
                4, (3, 3), config=cfg, relu=True, use_running_average=True, mode=Mode.FROZEN
            ),
            qlinen.MaxPool((2, 2)),
            qlinen.Flatten(),
            qlinen.QuantDense(5, config=cfg, mode=Mode.FROZEN),
            qlinen.DeQuantStub(),
        ]
    )
    x = _data((8, 6, 6, 1), n=1, seed=7)[0]
    y_frozen = frozen.apply(variables, x)
    served = qjax.convert((frozen, variables), x)
    assert bool((served(x) == y_frozen).all())


def test_qat_gradient_is_the_float_straight_through_one():
    x = _data((8, 6))[0]
    grads = []
    for scheme in ("fbgemm", None):
        layer = qnnx.QuantLinear(6, 3, config=_cfg("x86", scheme), rngs=nnx.Rngs(0))
        qnnx.calibrate(layer, [x], progress=False, then=Mode.QAT)
        g = nnx.grad(lambda m: jnp.sum(m(x) * jnp.arange(3.0)))(layer)
        grads.append(g.kernel[...])
    assert bool((grads[0] == grads[1]).all()) and float(jnp.abs(grads[0]).sum()) > 0


# ---- errors that name the module path and the fix ----------------------------------


def test_errors_name_the_module():
    cfg = _cfg("x86", "fbgemm")
    x = _data((4, 12))[0]
    model = _mlp(cfg)
    with pytest.raises(ValueError, match=r"layers/0 .*never saw data.*calibrate"):
        qjax.convert(model, x)
    qnnx.calibrate(model, [x], progress=False)
    with pytest.raises(ValueError, match=r"layers/1 trained with QuantConfig\(scheme='fbgemm'\)"):
        qjax.convert(model, x, scheme="qnnpack")
    served = qjax.convert(model, x)
    with pytest.raises(ValueError, match=r"layers/1: the input has 11 features.*in_features=12"):
        served(jnp.ones((4, 11)))
    # a stock layer: the unquantized nnx.Linear runs in float on the dequantized codes,
    # listed as such
    mixed = nnx.Sequential(qnnx.QuantStub(cfg), nnx.Linear(12, 3, rngs=nnx.Rngs(0)))
    qnnx.calibrate(mixed, [x], progress=False)
    traced = qjax.convert(mixed, x)
    assert isinstance(traced, qjax.Program) and "dot_general" in traced.float_ops.values()
    assert bool((traced(x) == mixed(x)).all())
    nonfinite = model  # statistics loaded from elsewhere, say, with a NaN in them
    st = nonfinite.layers[0].quant_stats.get_value()
    nonfinite.layers[0].quant_stats.set_value(st._replace(max_val=jnp.float32(jnp.nan)))
    with pytest.raises(ValueError, match=r"layers/0 has non-finite observer statistics"):
        qjax.convert(nonfinite, x)
    torch_style = default_qat_qconfig("x86")  # no input quantizer on the layer
    m = nnx.Sequential(qnnx.QuantLinear(12, 3, config=torch_style, rngs=nnx.Rngs(0)))
    qnnx.calibrate(m, [x], progress=False)
    with pytest.raises(ValueError, match=r"layers/0 receives a float tensor.*QuantStub"):
        qjax.convert(m, x)


def test_config_scheme_validation():
    with pytest.raises(
        ValueError, match=r"needs the layer.s input qparams; set quantize_input=True"
    ):
        default_qat_qconfig("x86").replace(scheme="fbgemm")
    with pytest.raises(ValueError, match="scheme must be None or one of"):
        _cfg("x86", "nope")


def test_avg_pool_serves_the_frozen_float_pool_exactly():
    """AvgPool after a quantizer: the frozen model averages the fake-quantized values in
    float, and so does the served program (a float step on the dequantized codes, listed
    in float_ops), bit for bit. (The removed Sequential interpreter averaged the codes in
    integers instead: up to half a quantization step off the frozen model.)"""
    cfg = _cfg("x86", "fbgemm")
    model = nnx.Sequential(
        qnnx.QuantStub(cfg), qnnx.AvgPool((2, 2)), qnnx.Flatten(), qnnx.DeQuantStub()
    )
    x = _data((8, 6, 6, 3))[0]
    qnnx.calibrate(model, [x], progress=False)
    served = qjax.convert(model, x)
    assert [la.op for la in served.layers.values()] == ["quantize", "dequantize"] + ["float"] * 3
    assert sorted(served.float_ops.values()) == ["div", "reduce_window_sum", "reshape"]
    frozen = np.asarray(nnx.jit(lambda m, x: m(x))(model, x))
    assert np.array_equal(np.asarray(served(x)), frozen)
    assert np.array_equal(np.asarray(served(x)), np.asarray(model(x)))


def test_nnx_and_linen_layers_give_identical_integer_values():
    cfg = _cfg("x86", "fbgemm")
    x = _data((16, 6))[0]
    layer = qnnx.QuantLinear(6, 4, config=cfg, rngs=nnx.Rngs(0))
    qnnx.calibrate(layer, [x], progress=False)
    dense = qlinen.QuantDense(4, config=cfg)
    v = dict(dense.init(jax.random.key(0), x))
    v["params"] = {"kernel": layer.kernel[...], "bias": layer.bias[...]}
    v, _ = qlinen.calibrate(dense, v, [x], progress=False, mode=Mode.CALIBRATE)
    y_linen = dense.apply(v, x, mode=Mode.FROZEN)
    assert bool((layer(x) == y_linen).all())
