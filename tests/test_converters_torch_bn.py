"""Quantized BatchNorm2d: the kernel vs ``torch.ops.quantized.batch_norm2d`` and imported models.

* kernel: random and tie-heavy statistics (dyadic ``alpha``/``beta``, so ``y`` lands on
  ``k + 1/2``, plus their float neighbours), quint8 and qint8, NCHW and NHWC, with and
  without the fused relu, channel counts that take torch's vector body, its 16-wide
  remainder and its scalar tail; codes compared exactly;
* importer: eager models ``QuantStub -> Conv2d -> BatchNorm2d -> ReLU -> DeQuantStub``
  (not fused) and ``QuantStub -> BatchNorm2d -> DeQuantStub`` (and the latter through
  FX), random calibration data and random BN statistics / affine parameters, converted
  under fbgemm, qnnpack and x86; every activation (``program.trace`` vs ``torch_trace``)
  and the float output compared exactly. Counts are printed (``pytest -s``).
"""

from __future__ import annotations

import functools
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")

from _helpers import tie_heavy  # noqa: E402
from qjax.converters import torch as qtorch  # noqa: E402

from qjax import QArray, QParams, QuantSpec  # noqa: E402
from qjax import kernels as K  # noqa: E402


def _f32(v) -> float:
    return float(np.float32(v))


def _random_params(rng, c):
    w = (rng.standard_normal(c) * 1.5).astype(np.float32)
    b = (rng.standard_normal(c) * 0.7).astype(np.float32)
    m = (rng.standard_normal(c) * 0.5).astype(np.float32)
    v = (rng.random(c) * 3 + 0.01).astype(np.float32)
    return w, b, m, v, 1e-5


def _tie_params(rng, c):
    """Dyadic parameters: with ``eps = 0``, power-of-four variances and scales whose ratio
    is a power of two, ``alpha`` and ``beta`` are short binary fractions and
    ``alpha·(q - zp) + beta`` hits ``k + 1/2`` exactly; a third of the channels get the
    next float of the weight or bias instead (one ulp off a tie)."""
    w = (rng.integers(-16, 17, c) / 8.0).astype(np.float32)
    b = (rng.integers(-32, 33, c) / 16.0).astype(np.float32)
    m = (rng.integers(-16, 17, c) / 16.0).astype(np.float32)
    v = (4.0 ** rng.integers(-2, 3, c)).astype(np.float32)
    pick = rng.integers(0, 3, c)
    w = np.where(pick == 1, np.nextafter(w, np.float32(np.inf)), w).astype(np.float32)
    b = np.where(pick == 2, np.nextafter(b, np.float32(-np.inf)), b).astype(np.float32)
    return w, b, m, v, 0.0


@functools.partial(jax.jit, static_argnums=(5, 7, 8))
def _bn_jit(x, w, b, m, v, eps, out, relu, layout):
    return K.quantized_batch_norm(x, w, b, m, v, eps, out, relu=relu, layout=layout)


def _kernel_case(rng, dtype, c, hw, params, relu, layout, pow2):
    signed = dtype == torch.qint8
    lo, hi = (-128, 127) if signed else (0, 255)
    s_in = 2.0 ** -int(rng.integers(2, 6)) if pow2 else _f32(rng.uniform(0.01, 0.1))
    s_out = s_in * 2.0 ** int(rng.integers(-1, 3)) if pow2 else _f32(rng.uniform(0.01, 0.1))
    z_in, z_out = int(rng.integers(lo, hi + 1)), int(rng.integers(lo + 50, hi - 49))
    shape = (2, c, hw, hw)
    x = tie_heavy(rng, s_in, shape, lo - z_in, hi - z_in)
    qx = torch.quantize_per_tensor(torch.from_numpy(x), s_in, z_in, dtype)
    w, b, m, v, eps = params
    tt = [torch.from_numpy(a) for a in (w, b, m, v)]
    op = torch.ops.quantized.batch_norm2d_relu if relu else torch.ops.quantized.batch_norm2d
    want = op(qx, *tt, eps, s_out, z_out).int_repr().numpy()
    spec = QuantSpec(signed=signed)
    codes = qx.int_repr().numpy()
    if layout == "NHWC":
        codes = np.ascontiguousarray(codes.transpose(0, 2, 3, 1))
    xq = QArray(jnp.asarray(codes), QParams(s_in, z_in, spec))
    wj, bj, mj, vj = (jnp.asarray(a) for a in (w, b, m, v))
    got = _bn_jit(xq, wj, bj, mj, vj, eps, QParams(s_out, z_out, spec), relu, layout)
    got = np.asarray(got.values)
    if layout == "NHWC":
        got = got.transpose(0, 3, 1, 2)
    assert got.dtype == want.dtype and got.shape == want.shape
    return got.size, int((got != want).sum())


def test_kernel_bit_exact_with_torch():
    rng = np.random.default_rng(0)
    torch.backends.quantized.engine = torch.backends.quantized.engine  # no engine dependence
    n = mism = 0
    tie_n = tie_mism = 0
    # C: scalar tail only (5), 16-wide remainder (40), vector body + tail (70)
    for i, (dtype, c) in enumerate(
        [(torch.quint8, 5), (torch.quint8, 40), (torch.quint8, 70), (torch.qint8, 70),
         (torch.quint8, 16), (torch.qint8, 13)] * 2
    ):  # fmt: skip
        ties = i % 2 == 1
        params = _tie_params(rng, c) if ties else _random_params(rng, c)
        layout = ("NCHW", "NHWC")[(i // 2) % 2]
        k, bad = _kernel_case(rng, dtype, c, 16, params, i % 3 == 0, layout, ties)
        n, mism = n + k, mism + bad
        if ties:
            tie_n, tie_mism = tie_n + k, tie_mism + bad
    print(f"\nquantized_batch_norm vs torch: values={n:,d} mismatches={mism} "
          f"(tie-heavy: values={tie_n:,d} mismatches={tie_mism})")  # fmt: skip
    assert n >= 100_000 and tie_n >= 50_000
    assert mism == 0


def test_kernel_ties_really_are_ties():
    """The tie-heavy parameters put a real share of the outputs on ``k + 1/2`` (else the
    exactness test above would not exercise the rounding)."""
    rng = np.random.default_rng(1)
    w, b, m, v, eps = _tie_params(rng, 64)
    s_in = s_out = 0.125
    a, be = K._norm.batch_norm_params(w, b, m, v, eps, s_in, s_out)
    d = np.arange(-128, 128, dtype=np.float32)[:, None]
    y = np.asarray(a)[None] * d + np.asarray(be)[None]
    frac = np.abs(y - np.floor(y) - 0.5) == 0
    assert frac.mean() > 0.05


def test_kernel_errors():
    u8 = QuantSpec(signed=False)
    x = QArray(jnp.zeros((1, 3, 2, 2), jnp.uint8), QParams(0.1, 0, u8))
    ones = jnp.ones((3,), jnp.float32)
    out = QParams(0.1, 0, u8)
    with pytest.raises(ValueError, match="mean has shape"):
        K.quantized_batch_norm(x, ones, ones, jnp.ones((4,)), ones, 1e-5, out)
    with pytest.raises(ValueError, match="layout"):
        K.quantized_batch_norm(x, ones, ones, ones, ones, 1e-5, out, layout="NWC")
    with pytest.raises(ValueError, match="4-d"):
        K.quantized_batch_norm(QArray(jnp.zeros((3,), jnp.uint8), x.qparams),
                               ones, ones, ones, ones, 1e-5, out)  # fmt: skip
    with pytest.raises(TypeError, match="QArray"):
        K.quantized_batch_norm(jnp.zeros((1, 3, 2, 2)), ones, ones, ones, ones, 1e-5, out)
    with pytest.raises(ValueError, match="var has shape"):
        K.quantized_batch_norm(x, ones, ones, ones, jnp.ones((2,)), 1e-5, out)


# ---------------------------------------------------------------------------------------
# imported models


class ConvBNReLU(torch.nn.Module):
    def __init__(self, c_out):
        super().__init__()
        self.quant = torch.ao.quantization.QuantStub()
        self.conv = torch.nn.Conv2d(3, c_out, 3, padding=1)
        self.bn = torch.nn.BatchNorm2d(c_out)
        self.relu = torch.nn.ReLU()
        self.dequant = torch.ao.quantization.DeQuantStub()

    def forward(self, x):
        return self.dequant(self.relu(self.bn(self.conv(self.quant(x)))))


class BNOnly(torch.nn.Module):
    def __init__(self, c, relu=False):
        super().__init__()
        self.quant = torch.ao.quantization.QuantStub()
        self.bn = torch.nn.BatchNorm2d(c)
        self.relu = torch.nn.ReLU() if relu else torch.nn.Identity()
        self.dequant = torch.ao.quantization.DeQuantStub()

    def forward(self, x):
        return self.dequant(self.relu(self.bn(self.quant(x))))


def _randomize_bn(bn, rng):
    c = bn.num_features
    with torch.no_grad():
        bn.running_mean.copy_(torch.from_numpy((rng.standard_normal(c) * 0.5).astype(np.float32)))
        bn.running_var.copy_(torch.from_numpy((rng.random(c) * 2 + 0.05).astype(np.float32)))
        bn.weight.copy_(torch.from_numpy((rng.standard_normal(c) * 1.2).astype(np.float32)))
        bn.bias.copy_(torch.from_numpy((rng.standard_normal(c) * 0.5).astype(np.float32)))


def _build(kind, c, engine, seed, mode):
    from torch.ao.quantization import QConfigMapping, convert, get_default_qconfig, prepare
    from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    if kind == "conv_bn_relu":
        model = ConvBNReLU(c).eval()
    else:
        model = BNOnly(c, relu=kind == "bn_relu_fused").eval()
    _randomize_bn(model.bn, rng)
    cin = 3 if kind == "conv_bn_relu" else c
    calib = torch.from_numpy((rng.standard_normal((16, cin, 6, 6)) * 1.5).astype(np.float32))
    x = torch.from_numpy((rng.standard_normal((2, cin, 6, 6)) * 1.5).astype(np.float32))
    qc = get_default_qconfig(engine)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if mode == "eager":  # conv and BN never fused: the BatchNorm2d stays a module
            if kind == "bn_relu_fused":  # BatchNorm2d + ReLU -> nniq.BNReLU2d
                torch.ao.quantization.fuse_modules(model, [["bn", "relu"]], inplace=True)
            model.qconfig = qc
            p = prepare(model)
            p(calib)
            q = convert(p)
        else:
            p = prepare_fx(model, QConfigMapping().set_global(qc), (calib,))
            p(calib)
            q = convert_fx(p)
    return q, x


def _compare(model, x, engine):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = qtorch.import_model(model, (x,), engine=engine)
        ref_trace = qtorch.torch_trace(model, x)
        with torch.no_grad():
            ref_out = model(x).numpy()
    out, trace = program.run_traced(x)
    assert list(trace) == list(ref_trace)
    n = mism = 0
    for k, ref in ref_trace.items():
        got = trace[k]
        assert got.shape == ref.shape and got.dtype == ref.dtype, k
        np.testing.assert_array_equal(np.asarray(got.scale), np.asarray(ref.scale), err_msg=k)
        np.testing.assert_array_equal(np.asarray(got.zero_point), np.asarray(ref.zero_point))
        d = np.asarray(got.values, np.int64) != np.asarray(ref.values, np.int64)
        n, mism = n + d.size, mism + int(d.sum())
    out = np.asarray(out)
    assert out.shape == ref_out.shape
    return n + out.size, mism + int((out != ref_out).sum()), list(ref_trace)


# (kind, channels, mode): 20 channels = 16-wide block + scalar tail; 70 = vector body + tail;
# bn_relu_fused: fuse_modules(bn, relu) -> nniq.BNReLU2d (quantized.batch_norm2d_relu)
MODELS = [
    ("conv_bn_relu", 8, "eager"),
    ("conv_bn_relu", 20, "eager"),
    ("bn_only", 70, "eager"),
    ("bn_relu_fused", 24, "eager"),
    ("bn_only", 12, "fx"),
]


@pytest.mark.parametrize("engine", ["fbgemm", "qnnpack", "x86"])
def test_imported_bn_models_bit_exact(engine):
    if engine not in torch.backends.quantized.supported_engines:
        pytest.skip(f"torch engine {engine} not available")
    old, threads = torch.backends.quantized.engine, torch.get_num_threads()
    torch.backends.quantized.engine = engine
    torch.set_num_threads(1)
    n = mism = 0
    try:
        for i, (kind, c, mode) in enumerate(MODELS):
            model, x = _build(kind, c, engine, 100 + i, mode)
            if mode == "eager":
                mods = dict(model.named_modules())
                want = "BNReLU2d" if kind == "bn_relu_fused" else "BatchNorm2d"
                assert type(mods["bn"]).__name__ == want, type(mods["bn"])
                assert type(mods["bn"]).__module__.startswith("torch.ao.nn.")
                assert ".quantized" in type(mods["bn"]).__module__
            k, bad, names = _compare(model, x, engine)
            assert "bn" in names or any("bn" in k or "batch_norm" in k for k in names), names
            n, mism = n + k, mism + bad
    finally:
        torch.backends.quantized.engine = old
        torch.set_num_threads(threads)
    print(f"\nBN models vs torch ({engine}): models={len(MODELS)} values={n:,d} mismatches={mism}")
    assert mism == 0


class OpBN(torch.nn.Module):
    """``torch.ops.quantized.batch_norm2d[_relu]`` called directly (a ``call_function`` node
    whose parameters are ``get_attr`` nodes)."""

    def __init__(self, rng, c, relu):
        super().__init__()
        w, b, m, v, _ = _random_params(rng, c)
        self.w, self.b, self.m, self.v = (torch.from_numpy(a) for a in (w, b, m, v))
        self.relu = relu

    def forward(self, x):
        q = torch.quantize_per_tensor(x, 0.05, 128, torch.quint8)
        op = (
            torch.ops.quantized.batch_norm2d_relu if self.relu else torch.ops.quantized.batch_norm2d
        )
        return op(q, self.w, self.b, self.m, self.v, 1e-5, 0.0625, 100).dequantize()


@pytest.mark.parametrize("relu", [False, True])
def test_imported_batch_norm2d_op(relu):
    rng = np.random.default_rng(7)
    model = OpBN(rng, 6, relu).eval()
    x = torch.from_numpy((rng.standard_normal((2, 6, 5, 5)) * 2).astype(np.float32))
    n, mism, names = _compare(model, x, "fbgemm")
    assert any("batch_norm2d" in k for k in names), names
    assert n > 300 and mism == 0


def test_kernel_scale_ratio_in_float64():
    """``alpha = f32(f64(f32(inv_sigma·w))·f64(s_in/s_out))``: channels picked where a float32
    ratio would give another ``alpha`` and other codes; torch agrees with the kernel and
    not with the float32 alternative."""
    rng = np.random.default_rng(5)
    f32, f64 = np.float32, np.float64
    s_in, s_out, n = f32(0.0371), f32(0.00913), 200_000
    w = (rng.standard_normal(n) * 1.5).astype(f32)
    v = (rng.random(n) * 3 + 0.01).astype(f32)
    inv = (1.0 / np.sqrt((v + f32(1e-5)).astype(f32)).astype(f32).astype(f64)).astype(f32)
    aw = (inv * w).astype(f32)
    a64 = (aw.astype(f64) * (f64(s_in) / f64(s_out))).astype(f32)
    a32 = (aw * f32(s_in / s_out)).astype(f32)
    d = np.arange(-128, 128, dtype=f32)[:, None]
    cand = np.nonzero(a64 != a32)[0]
    codes_differ = (np.rint(a64[cand][None] * d) != np.rint(a32[cand][None] * d)).any(axis=0)
    sel = cand[codes_differ][:16]
    assert len(sel) == 16
    c = len(sel)
    q = np.broadcast_to(np.arange(256, dtype=np.uint8).reshape(1, 1, 16, 16), (1, c, 16, 16))
    qx = torch._make_per_tensor_quantized_tensor(torch.from_numpy(q.copy()), float(s_in), 128)
    zeros = torch.zeros(c)
    wt, vt = torch.from_numpy(w[sel]), torch.from_numpy(v[sel])
    want = torch.ops.quantized.batch_norm2d(qx, wt, zeros, zeros, vt, 1e-5, float(s_out), 128)
    want = want.int_repr().numpy()
    u8 = QuantSpec(signed=False)
    z = jnp.zeros((c,), jnp.float32)
    got = _bn_jit(
        QArray(jnp.asarray(q), QParams(s_in, 128, u8)), jnp.asarray(w[sel]), z, z,
        jnp.asarray(v[sel]), 1e-5, QParams(s_out, 128, u8), False, "NCHW",
    )  # fmt: skip
    np.testing.assert_array_equal(np.asarray(got.values), want)
    alt = np.clip(np.rint(a32[sel][None, :, None, None] * (q.astype(f32) - 128)) + 128, 0, 255)
    assert int((alt != want).sum()) > 0
