"""Per-token dynamic int8 linear layers vs torchao's ``Int8DynamicActivationInt8WeightConfig``.

torchao's ``quantize_`` (0.18, its version-2 ``Int8Tensor``) quantizes each row of the
activation (each token) from its own range and runs an int8 x int8 -> int32 matmul;
``dynamic_linear(..., recipe="torchao")`` computes the same integers and the same float
roundings. Compared here at run time against torchao itself, bit for bit on the float32
outputs, for symmetric and asymmetric activations, per-token and per-tensor; then the
layer served by ``qjax.convert`` (and loaded back from its file) against its own
simulation under jit.

Below VNNI ``torch._int_mm`` saturates adjacent u8 x s8 pairs to int16 (oneDNN's
``vpmaddubsw``), so the comparison takes ``accumulate="onednn_sat16"`` on such a CPU,
and a subprocess forces torch to the AVX2 level with its own switches (``level_env``)
where this CPU is above it.
"""

import os
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _helpers import run_script
from flax import nnx

import qjax
from qjax import QuantSpec
from qjax.flax import _ptq
from qjax.flax import linen as ql
from qjax.flax import nnx as qn
from qjax.kernels import LEVELS, host_level, level_env

torch = pytest.importorskip("torch")
torchao_q = pytest.importorskip("torchao.quantization")


def _torchao_linear(k, n, seed, *, asymmetric=False, per_tensor=False, bias=True):
    from torchao.quantization import Int8DynamicActivationInt8WeightConfig, quantize_
    from torchao.quantization.granularity import PerRow, PerTensor
    from torchao.quantization.quant_primitives import MappingType

    torch.manual_seed(seed)
    lin = torch.nn.Linear(k, n, bias=bias)
    with torch.no_grad():  # a spread of channel ranges, as trained weights have
        lin.weight.mul_(torch.rand(n, 1) * 4 + 0.05)
    q = torch.nn.Linear(k, n, bias=bias)
    q.load_state_dict(lin.state_dict())
    config = Int8DynamicActivationInt8WeightConfig(
        act_mapping_type=MappingType.ASYMMETRIC if asymmetric else MappingType.SYMMETRIC,
        granularity=PerTensor() if per_tensor else PerRow(),
        set_inductor_config=False,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        quantize_(q, config)
    return lin, q


def _accumulate(level):
    """What torchao's int8 matmul (``torch._int_mm``) accumulates like at ``level``."""
    return "exact" if level in (None, "vnni", "amx") else "onednn_sat16"


def _qjax_layer(lin, *, asymmetric=False, per_tensor=False, accumulate=None):
    act = _ptq.TORCHAO_ACTIVATION.replace(symmetric=not asymmetric)
    weight = _ptq.DYNAMIC_WEIGHT
    if per_tensor:
        act, weight = act.replace(axis=None), weight.replace(axis=None)
    return qn.DynamicQuantLinear(
        jnp.asarray(lin.weight.detach().numpy().T),
        None if lin.bias is None else jnp.asarray(lin.bias.detach().numpy()),
        weight_spec=weight,
        act_spec=act,
        act_compat="torch",
        recipe="torchao",
        accumulate=_accumulate(host_level()) if accumulate is None else accumulate,
    )


def _bits(a):
    return np.asarray(a, np.float32).view(np.int32)


CASES = [  # (rows shape, k, n, asymmetric, per_tensor, bias)
    ((7,), 64, 24, False, False, True),
    ((3, 5), 37, 19, True, False, True),
    ((9,), 40, 16, False, True, True),
    ((4,), 32, 8, True, True, True),
    ((1,), 128, 10, False, False, False),  # slow run from here
    ((2, 4), 48, 33, True, False, False),
]
_DEFAULT_CASES = 4


def _compare(case, rng, accumulate=None):
    """``(differ, total)`` float32 outputs of torchao's layer and qjax's for ``case``;
    the inputs include rows of one sign, a constant row and an all-zero row."""
    rows, k, n, asym, per_tensor, bias = case
    lin, q = _torchao_linear(k, n, len(rows) + k, asymmetric=asym, per_tensor=per_tensor, bias=bias)
    layer = _qjax_layer(lin, asymmetric=asym, per_tensor=per_tensor, accumulate=accumulate)
    w = layer.weight.get_value().weight
    np.testing.assert_array_equal(w.values, q.weight.qdata.numpy().T)
    np.testing.assert_array_equal(w.scale, q.weight.scale.numpy().reshape(w.scale.shape))
    f = jax.jit(lambda x: layer(x))
    differ = total = 0
    for t in range(5):
        x = rng.standard_normal(rows + (k,)) * rng.uniform(0.05, 6) + rng.uniform(-1, 1) * t
        x = x.astype(np.float32)
        if t == 3:
            x = np.abs(x)  # every row one-signed: the range widens to include 0
        if t == 4:
            x.reshape(-1, k)[0] = 0.0  # eps-clamped scale
            x.reshape(-1, k)[-1] = 1.5  # a constant row
        with torch.no_grad():
            want = q(torch.from_numpy(x)).numpy()
        got = np.asarray(f(x))
        assert got.shape == want.shape
        differ += int(np.sum(_bits(got) != _bits(want)))
        total += want.size
    return differ, total


@pytest.mark.parametrize(
    "case",
    [
        c if i < _DEFAULT_CASES else pytest.param(c, marks=pytest.mark.slow)
        for i, c in enumerate(CASES)
    ],
    ids=lambda c: "x".join(map(str, c[0] + c[1:3])),
)
def test_per_token_dynamic_matches_torchao(case, rng):
    """Weight codes, weight scales and float32 outputs equal torchao's on this CPU (0
    differ), with this CPU level's accumulation."""
    differ, total = _compare(case, rng)
    print(f"torchao dynamic {case} at {host_level()}: {differ}/{total} differ")
    assert differ == 0


_LEVEL_SCRIPT = """
import sys, numpy as np
sys.path.insert(0, {root!r})
from test_flax_ptq_torchao import CASES, _compare
rng = np.random.default_rng(3)
for acc in ("onednn_sat16", "exact"):
    d = t = 0
    for case in CASES[:2]:  # symmetric with bias, asymmetric per-token
        dc, tc = _compare(case, rng, acc)
        d, t = d + dc, t + tc
    print(f"{{acc}} {{d}} {{t}}")
print("LEVEL-DONE")
"""


def test_per_token_dynamic_matches_torchao_forced_to_avx2():
    """torchao with torch forced to AVX2 (``level_env("avx2")``, a subprocess): the
    saturating accumulation gives its outputs bit for bit, the exact one does not."""
    here = host_level()
    if here is None or LEVELS.index(here) < LEVELS.index("avx2"):
        pytest.skip(f"this CPU ({here}) cannot run the AVX2 level")
    root = os.path.dirname(os.path.abspath(__file__))
    out = run_script(_LEVEL_SCRIPT.format(root=root), marker="LEVEL-DONE", env=level_env("avx2"))
    counts = {ln.split()[0]: tuple(map(int, ln.split()[1:])) for ln in out.splitlines()[:-1]}
    print(f"torchao dynamic forced to avx2 on {here}: {counts}")
    assert counts["onednn_sat16"][0] == 0 < counts["exact"][0]


def test_torchao_recipe_refuses_what_torchao_has_not():
    pw = _ptq.prepare_dynamic_weight(jnp.ones((4, 2)), _ptq.DYNAMIC_WEIGHT.replace(symmetric=False))
    with pytest.raises(ValueError, match="symmetric weights"):
        _ptq.dynamic_linear(
            jnp.ones((1, 4)), pw, recipe="torchao", act_spec=_ptq.TORCHAO_ACTIVATION
        )
    pw = _ptq.prepare_dynamic_weight(jnp.ones((4, 2)))
    with pytest.raises(ValueError, match="recipe"):
        _ptq.dynamic_linear(jnp.ones((1, 4)), pw, recipe="onnx")
    with pytest.raises(ValueError, match="per-tensor or per-token"):
        _ptq.dynamic_linear(jnp.ones((1, 4)), pw, act_spec=QuantSpec(bits=8, axis=1))


def test_per_token_fbgemm_recipe_is_per_row(rng):
    """With the fbgemm recipe a per-token spec gives every row its own qparams: a row's
    output does not depend on the other rows (per-tensor it does)."""
    pw = _ptq.prepare_dynamic_weight(jnp.asarray(rng.standard_normal((32, 8)), jnp.float32))
    x = rng.standard_normal((6, 32)).astype(np.float32)
    per_token = _ptq.DYNAMIC_ACTIVATION.replace(axis=0)
    f = jax.jit(lambda x: _ptq.dynamic_linear(x, pw, act_spec=per_token))
    alone = np.concatenate([np.asarray(f(x[i : i + 1])) for i in range(6)])
    np.testing.assert_array_equal(_bits(f(x)), _bits(alone))
    g = jax.jit(lambda x: _ptq.dynamic_linear(x, pw))
    assert not np.array_equal(_bits(g(x)), np.concatenate([g(x[i : i + 1]) for i in range(6)]))


class _Tokens(nnx.Module):
    def __init__(self, rngs):
        k = jax.random.normal(rngs.params(), (16, 24))
        self.a = qn.DynamicQuantLinear(
            k, jnp.linspace(-1, 1, 24), act_spec=_ptq.TORCHAO_ACTIVATION,
            act_compat="torch", recipe="torchao", accumulate="onednn_sat16", name="a",
        )  # fmt: skip
        asym = _ptq.TORCHAO_ACTIVATION.replace(symmetric=False)
        k2 = jax.random.normal(rngs.params(), (24, 8))
        self.b = qn.DynamicQuantLinear(k2, act_spec=asym, act_compat="torch", recipe="torchao")
        self.c = qn.DynamicQuantLinear(
            jax.random.normal(rngs.params(), (8, 4)),
            act_spec=_ptq.DYNAMIC_ACTIVATION.replace(axis=0),
        )

    def __call__(self, x):
        return self.c(jax.nn.gelu(self.b(nnx.relu(self.a(x)))))


def test_per_token_served_equals_simulation(tmp_path, rng):
    """The served dynamic_linear steps (torchao symmetric per-token with AVX2's saturating
    accumulation and asymmetric exact, fbgemm per-token) equal the model's own function
    under jit, at two batch sizes, and after a save/load round trip."""
    model = _Tokens(nnx.Rngs(0))
    x = jnp.asarray(rng.standard_normal((2, 5, 16)) * 3, jnp.float32)
    program = qjax.convert(model, x)
    ops = [lay.op for lay in program.layers.values()]
    assert ops.count("dynamic_linear") == 3
    frozen = nnx.jit(lambda m, x: m(x))
    path = tmp_path / "tokens.safetensors"
    qjax.save_served(path, program)
    loaded = qjax.load_served(path)
    total = 0
    for shape in [(2, 5, 16), (3, 5, 16)]:
        x = jnp.asarray(rng.standard_normal(shape) * 3, jnp.float32)
        want = _bits(frozen(model, x))
        np.testing.assert_array_equal(_bits(program(x)), want)
        np.testing.assert_array_equal(_bits(loaded(x)), want)
        total += 2 * want.size
    print(f"per-token dynamic served: 0/{total} differ")


def test_linen_per_token_matches_nnx(rng):
    """The Linen layer with the torchao recipe computes what the NNX layer does."""
    k = jnp.asarray(rng.standard_normal((12, 6)), jnp.float32)
    b = jnp.asarray(rng.standard_normal(6), jnp.float32)
    kw = dict(act_spec=_ptq.TORCHAO_ACTIVATION, act_compat="torch", recipe="torchao")
    nnx_layer = qn.DynamicQuantLinear(k, b, **kw)
    dense = ql.DynamicQuantDense(6, **kw)
    v = {ql.QUANTIZED: ql.dynamic_variables(k, b)}
    x = jnp.asarray(rng.standard_normal((3, 4, 12)), jnp.float32)
    np.testing.assert_array_equal(_bits(dense.apply(v, x)), _bits(nnx_layer(x)))
