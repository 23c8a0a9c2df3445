"""The native boundary quantize (``quantize_input(..., kernel="auto")``, ``quantize.cc``)
against torch's ``quantize_per_tensor`` at run time and against qjax's XLA formula:
exact equality over halfway cases, their float neighbours, NaN, infinities, denormals
and clamped values, uint8 and int8; torch at this CPU's level and forced to AVX2 and
AVX-512 by its own switches (``level_env``, subprocesses). The native boundary
dequantize (``dequantize_output(..., kernel="auto")``): every code, against torch's
``dequantize`` and the XLA formula, bit for bit."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from _helpers import run_script
from jax import lax

import qjax
from qjax.kernels import QArray, _elementwise, dequantize_output, host_level, quantize_input
from qjax.kernels._levels import LEVELS, level_env
from qjax.kernels._native._quantize import quantize_status

NATIVE, REASON = quantize_status()
needs_native = pytest.mark.skipif(not NATIVE, reason=f"native quantize unavailable: {REASON}")

SPECIAL = [np.nan, -np.nan, np.inf, -np.inf, 0.0, -0.0, 1e-45, -1e-45, 1e-38, 3e38, -3e38]


def _inputs(scale, zp, n=20_001, seed=0):
    """Random values, the exact halfway points of the code grid and both float neighbours
    of every value (where fma's single rounding decides the code), and specials."""
    rng = np.random.default_rng(seed)
    inv = np.float32(1) / np.float32(scale)
    half = ((np.arange(-300, 300) + 0.5 - zp) / inv).astype(np.float32)
    x = np.concatenate([rng.normal(0, 200 * scale, n).astype(np.float32), half])
    x = np.concatenate(
        [x, np.nextafter(x, np.float32(np.inf)), np.nextafter(x, -np.float32(np.inf))]
    )
    return np.concatenate([x, np.array(SPECIAL, np.float32)])


CASES = [
    (0.5, 128, False),
    (0.0078, 3, False),
    (3.7, 250, False),
    (0.02, 0, True),
    (1e-3, -7, True),
]


@needs_native
@pytest.mark.parametrize("scale, zp, signed", CASES)
def test_native_equals_torch_and_xla(scale, zp, signed):
    qp = qjax.QParams(scale, zp, qjax.QuantSpec(signed=signed))
    x = _inputs(scale, zp)
    native = np.asarray(jax.jit(lambda v: quantize_input(v, qp, "auto").values)(x))
    xla = np.asarray(quantize_input(jnp.asarray(x), qp).values)
    dt = torch.qint8 if signed else torch.quint8
    ref = torch.quantize_per_tensor(torch.from_numpy(x), scale, zp, dt).int_repr().numpy()
    assert native.dtype == ref.dtype == xla.dtype
    # halfway cases are where a double-rounded fma would differ: some must be present
    v = x[np.isfinite(x)].astype(np.float64) * np.float64(np.float32(1) / np.float32(scale)) + zp
    assert (np.abs(v - np.floor(v) - 0.5) < 1e-6).sum() > 100
    assert int((native != ref).sum()) == 0
    assert int((native != xla).sum()) == 0


@needs_native
def test_native_call_in_program_and_vmap():
    qp = qjax.QParams(0.05, 10, qjax.QuantSpec(signed=False))
    f = jax.jit(lambda v: quantize_input(v, qp, "auto").values)
    x = jnp.linspace(-3.0, 14.0, 7 * 33).reshape(7, 33)
    assert "qjax_quantize_fma" in f.lower(x).as_text()
    np.testing.assert_array_equal(np.asarray(f(x)), np.asarray(quantize_input(x, qp).values))
    np.testing.assert_array_equal(np.asarray(jax.vmap(f)(x)), np.asarray(f(x)))
    # traced qparams (jit arguments) work too, and vmapped ones (one pair per row)
    g = jax.jit(lambda v, p: quantize_input(v, p, "auto").values)
    np.testing.assert_array_equal(np.asarray(g(x, qp)), np.asarray(f(x)))
    scales, zps = jnp.linspace(0.01, 0.2, 7), jnp.arange(7, dtype=jnp.int32) * 20
    u8 = qp.spec
    rows = jax.vmap(lambda v, s, z: g(v, qjax.QParams(s, z, u8)))(x, scales, zps)
    want = [quantize_input(x[i], qjax.QParams(scales[i], zps[i], u8)).values for i in range(7)]
    np.testing.assert_array_equal(np.asarray(rows), np.stack([np.asarray(w) for w in want]))


def test_xla_default_and_fallbacks(monkeypatch):
    u8 = qjax.QuantSpec(signed=False)
    x = jnp.linspace(-1.0, 1.0, 50)
    plain = jax.jit(lambda v: quantize_input(v, qjax.QParams(0.01, 100, u8)).values)
    assert "custom_call" not in plain.lower(x).as_text()
    # per-channel and 16-bit specs keep the XLA formula under "auto"
    pc = qjax.QParams(jnp.full((50,), 0.01), jnp.zeros((50,), jnp.int32), u8.replace(axis=0))
    u16 = qjax.QParams(0.01, 100, qjax.QuantSpec(bits=16, signed=False))
    for qp in (pc, u16):
        f = jax.jit(lambda v, qp=qp: quantize_input(v, qp, "auto").values)
        assert "qjax_quantize_fma" not in f.lower(x).as_text()
    # where the native call does not run, "auto" is the XLA program
    monkeypatch.setattr(_elementwise, "_quantize_status", lambda: (False, "test"))
    f = jax.jit(lambda v: quantize_input(v, qjax.QParams(0.01, 100, u8), "auto").values)
    assert "qjax_quantize_fma" not in f.lower(x).as_text()


def test_auto_refuses_what_torch_compat_refuses():
    """A spec torch's formula cannot take is refused under "auto" as under "xla"."""
    qp = qjax.QParams(0.1, 0, qjax.QuantSpec(signed=False, rounding="half_away"))
    for kernel in ("xla", "auto"):
        with pytest.raises(ValueError, match="rounds half to even"):
            quantize_input(jnp.zeros(3), qp, kernel)


def test_bad_kernel_name_is_named():
    with pytest.raises(ValueError, match="kernel must be 'xla' or 'auto', got 'amx'"):
        quantize_input(jnp.zeros(3), qjax.QParams(0.1, 0, qjax.QuantSpec(signed=False)), "amx")


@needs_native
def test_export_refuses_with_a_hint():
    qp = qjax.QParams(0.1, 0, qjax.QuantSpec(signed=False))
    f = jax.jit(lambda v: quantize_input(v, qp, "auto").values)
    with pytest.raises(Exception, match="kernel='xla'"):
        jax.export.export(f)(jax.ShapeDtypeStruct((4,), jnp.float32))


# scales up to 3e38 (products overflow to inf), products down to the smallest normal
# floats, zero points at both ends of the code range (the widest int32 differences)
DEQ_CASES = [
    (0.5, 128, False),
    (0.0078, 0, False),
    (3e38, 255, False),
    (2.0**-126, 1, False),
    (0.02, 0, True),
    (1e-3, -128, True),
    (2.0**-126, 127, True),
]


@needs_native
@pytest.mark.parametrize("scale, zp, signed", DEQ_CASES)
def test_native_dequantize_equals_torch_and_xla(scale, zp, signed):
    spec = qjax.QuantSpec(signed=signed)
    qp = qjax.QParams(scale, zp, spec)
    codes = np.arange(spec.qmin, spec.qmax + 1).astype(jnp.dtype(spec.dtype))
    codes = np.concatenate([codes, codes[::-1][:101]])  # an odd length: the scalar tail
    q = QArray(jnp.asarray(codes), qp)
    f = jax.jit(lambda q: dequantize_output(q, kernel="auto"))
    assert "qjax_dequantize" in f.lower(q).as_text()
    native = np.asarray(f(q))
    xla = np.asarray(dequantize_output(q))
    dt = torch.qint8 if signed else torch.quint8
    t = torch.quantize_per_tensor(torch.zeros(codes.size), scale, zp, dt)
    t = torch._make_per_tensor_quantized_tensor(torch.from_numpy(codes), t.q_scale(), zp)
    ref = t.dequantize().numpy()
    assert native.dtype == xla.dtype == ref.dtype == np.float32
    # bit patterns: -0.0 and inf count
    assert int((native.view(np.int32) != ref.view(np.int32)).sum()) == 0
    assert int((native.view(np.int32) != xla.view(np.int32)).sum()) == 0


@needs_native
def test_native_dequantize_flushes_denormals_like_xla():
    """XLA's CPU runtime flushes denormals (docs/numerics.md section 9); the native call
    runs inside it: a denormal scale gives XLA's zeros, not torch's denormals."""
    qp = qjax.QParams(3.9e-39, 1, qjax.QuantSpec(signed=False))
    q = QArray(jnp.arange(256, dtype=jnp.int32).astype(jnp.uint8), qp)
    native = np.asarray(jax.jit(lambda q: dequantize_output(q, kernel="auto"))(q))
    xla = np.asarray(jax.jit(dequantize_output)(q))
    assert int((native.view(np.int32) != xla.view(np.int32)).sum()) == 0
    assert not np.any(np.abs(native) > 0)


@needs_native
def test_native_dequantize_vmap_and_fallbacks(monkeypatch):
    u8 = qjax.QuantSpec(signed=False)
    codes = jnp.arange(7 * 33, dtype=jnp.int32).reshape(7, 33).astype(jnp.uint8)
    qp = qjax.QParams(0.05, 10, u8)
    f = jax.jit(lambda v, p: dequantize_output(QArray(v, p), kernel="auto"))
    want = np.asarray(dequantize_output(QArray(codes, qp)))
    np.testing.assert_array_equal(np.asarray(f(codes, qp)), want)
    scales, zps = jnp.linspace(0.01, 0.2, 7), jnp.arange(7, dtype=jnp.int32) * 20
    rows = jax.vmap(lambda v, s, z: f(v, qjax.QParams(s, z, u8)))(codes, scales, zps)
    for i in range(7):
        ref = dequantize_output(QArray(codes[i], qjax.QParams(scales[i], zps[i], u8)))
        np.testing.assert_array_equal(np.asarray(rows[i]), np.asarray(ref))
    # per-channel qparams and other output dtypes keep the XLA formula under "auto"
    pc = qjax.QParams(jnp.full((33,), 0.01), jnp.zeros((33,), jnp.int32), u8.replace(axis=1))
    for q, dtype in ((QArray(codes, pc), jnp.float32), (QArray(codes, qp), jnp.bfloat16)):
        g = jax.jit(lambda q, dtype=dtype: dequantize_output(q, dtype, kernel="auto"))
        assert "qjax_dequantize" not in g.lower(q).as_text()
        np.testing.assert_array_equal(np.asarray(g(q)), np.asarray(dequantize_output(q, dtype)))
    monkeypatch.setattr(_elementwise, "_quantize_status", lambda: (False, "test"))
    g = jax.jit(lambda q: dequantize_output(q, kernel="auto"))
    assert "qjax_dequantize" not in g.lower(QArray(codes, qp)).as_text()
    with pytest.raises(ValueError, match="kernel must be 'xla' or 'auto', got 'onednn'"):
        dequantize_output(QArray(codes, qp), kernel="onednn")


def _hlo(program, x):
    return program._run.lower(program.params, (np.asarray(x),)).as_text()


@needs_native
def test_imported_program_quantizes_natively_and_files_do_not_say(tmp_path):
    """``import_model(kernel="auto")`` quantizes its input, applies an unfused ReLU and
    dequantizes its output with the native calls (== torch's); the choice is the
    program's, not the file's: a saved program loads pure XLA under the default
    ``kernel`` and native again under ``kernel="auto"``."""
    import qjax.converters.torch as qtorch

    torch.backends.quantized.engine = "fbgemm"
    nnq = torch.ao.nn.quantized
    lin = nnq.Linear(16, 4)
    g = torch.Generator().manual_seed(0)
    w = torch.quantize_per_tensor(torch.randn(4, 16, generator=g) / 4, 0.02, 0, torch.qint8)
    lin.set_weight_bias(w, torch.zeros(4))
    lin.scale, lin.zero_point = 0.05, 60
    # an nn.ReLU not fused into the layer: its own step on codes, native too
    model = torch.nn.Sequential(
        nnq.Quantize(0.03, 7, torch.quint8), lin, torch.nn.ReLU(), nnq.DeQuantize()
    )
    x = torch.randn(5, 16, generator=g)
    assert (lin(model[0](x)).int_repr() < 60).any()  # the ReLU clamps some codes
    program = qtorch.import_model(model.eval(), (x,), engine="fbgemm", kernel="auto")
    native_ops = ("qjax_quantize_fma", "qjax_relu_codes", "qjax_dequantize")
    for target in native_ops:
        assert target in _hlo(program, x)
    np.testing.assert_array_equal(np.asarray(program(x)), model(x).numpy())
    path = tmp_path / "m.safetensors"
    qjax.save_served(path, program)
    plain = qjax.load_served(path)
    assert "custom_call" not in _hlo(plain, x)
    native = qjax.load_served(path, kernel="auto")
    for target in native_ops:
        assert target in _hlo(native, x)
    for p in (plain, native):
        np.testing.assert_array_equal(np.asarray(p(x)), model(x).numpy())


_TORCH_CODES = """
import numpy as np, torch
x = np.load({x!r})
for i, (s, z, signed) in enumerate({cases!r}):
    dt = torch.qint8 if signed else torch.quint8
    q = torch.quantize_per_tensor(torch.from_numpy(x), s, z, dt).int_repr().numpy()
    np.save({out!r} + f"{{i}}.npy", q)
print("TORCH-CODES-DONE")
"""


@needs_native
@pytest.mark.parametrize("level", ["avx2", "avx512"])
def test_native_equals_torch_forced_to_lower_levels(level, tmp_path):
    """torch's quantize_per_tensor with torch forced to a lower CPU level by its own
    switches (``level_env``, a subprocess): the same codes as the native call here."""
    here = host_level()
    if here is None or LEVELS.index(here) < LEVELS.index(level):
        pytest.skip(f"this CPU ({here}) cannot run the {level} level")
    x = _inputs(0.0078, 3, n=5_001)
    np.save(tmp_path / "x.npy", x)
    script = _TORCH_CODES.format(x=str(tmp_path / "x.npy"), cases=CASES, out=str(tmp_path / "q"))
    run_script(script, marker="TORCH-CODES-DONE", env=level_env(level))
    for i, (scale, zp, signed) in enumerate(CASES):
        qp = qjax.QParams(scale, zp, qjax.QuantSpec(signed=signed))
        native = np.asarray(jax.jit(lambda v, qp=qp: quantize_input(v, qp, "auto").values)(x))
        ref = np.load(tmp_path / f"q{i}.npy")
        assert int((native != ref).sum()) == 0, (level, scale, zp, signed)


@needs_native
@pytest.mark.parametrize("dtype", [jnp.uint8, jnp.int8])
def test_native_pad_equals_lax_pad(dtype):
    """The zero-point padding of a native conv's input (``_conv._pad``, ``qjax_pad_nhwc``):
    the codes of ``lax.pad`` for 2-D and 1-D inputs, one-sided and empty pads, a traced
    pad value, under vmap."""
    from qjax.kernels._conv import _pad

    rng = np.random.default_rng(0)
    info = jnp.iinfo(dtype)
    x4 = jnp.asarray(rng.integers(info.min, info.max + 1, (3, 5, 7, 6)), dtype)
    for pads in (((1, 1), (1, 1)), ((0, 2), (3, 0)), ((2, 0), (0, 0)), ((0, 0), (0, 1))):
        f = jax.jit(lambda x, v, pads=pads: _pad(x, v, pads, native=True))
        v = jnp.asarray(-5 if dtype == jnp.int8 else 250, dtype)
        assert "qjax_pad_nhwc" in f.lower(x4, v).as_text()
        cfg = [(0, 0, 0), (*pads[0], 0), (*pads[1], 0), (0, 0, 0)]
        want = np.asarray(lax.pad(x4, v, cfg))
        np.testing.assert_array_equal(np.asarray(f(x4, v)), want)
        np.testing.assert_array_equal(
            np.asarray(jax.vmap(f, (0, None))(x4[:, None], v))[:, 0], want
        )
    x3 = x4[:, 0]  # (N, W, C): a 1-D conv's input
    f = jax.jit(lambda x: _pad(x, jnp.asarray(3, dtype), ((2, 1),), native=True))
    want = np.asarray(lax.pad(x3, jnp.asarray(3, dtype), [(0, 0, 0), (2, 1, 0), (0, 0, 0)]))
    np.testing.assert_array_equal(np.asarray(f(x3)), want)
    # the XLA pad where the conv is not native, nothing where nothing is padded
    g = jax.jit(lambda x: _pad(x, jnp.asarray(3, dtype), ((1, 1), (1, 1)), native=False))
    assert "custom_call" not in g.lower(x4).as_text()
    assert _pad(x4, jnp.asarray(3, dtype), ((0, 0), (0, 0)), native=True) is x4


@needs_native
@pytest.mark.parametrize("scale, zp, signed", CASES)
def test_native_product_quantize_equals_qjax_and_torch_fake_quant(scale, zp, signed):
    """A converted Flax model's quantize step natively (``qjax_quantize_product``,
    ``rint(f32(x·f32(1/s))) + z``): the codes of ``qjax.quantize`` (compat ``"qjax"``), and
    dequantized, torch's ``fake_quantize_per_tensor_affine`` (rule 4; NaN aside: torch
    gives ``qmin`` there, qjax ``qmax``)."""
    qp = qjax.QParams(scale, zp, qjax.QuantSpec(signed=signed))
    x = _inputs(scale, zp)
    f = jax.jit(lambda v: _elementwise.native_quantize(v, qp, "qjax", "auto", "test"))
    assert "qjax_quantize_product" in f.lower(x).as_text()
    native = np.asarray(f(x))
    assert int((native != np.asarray(qjax.quantize(jnp.asarray(x), qp))).sum()) == 0
    spec = qp.spec
    keep = ~np.isnan(x)
    ref = torch.fake_quantize_per_tensor_affine(
        torch.from_numpy(x[keep]), scale, zp, spec.qmin, spec.qmax
    ).numpy()
    got = np.asarray(qjax.dequantize(jnp.asarray(native[keep]), qp))
    assert int((got != ref).sum()) == 0
    # with a zero point, the product's rounding differs from the fma's on some inputs
    fma = np.asarray(quantize_input(jnp.asarray(x), qp).values)
    assert int((fma != native).sum()) > 0 or zp == 0


@needs_native
@pytest.mark.parametrize("dtype", [jnp.uint8, jnp.int8])
def test_native_max_pool_equals_reduce_window(dtype):
    """``max_pool2d(..., kernel="auto")`` on NHWC codes (``qjax_max_pool_nhwc``): the codes
    of XLA's reduce_window over windows 1-3, strides 1-3, padding, dilation, ceil mode,
    channel counts that are not multiples of 16 or 32, under vmap; NCHW and windows of
    more than 64 positions stay XLA."""
    from qjax.kernels import max_pool2d

    rng = np.random.default_rng(1)
    info = jnp.iinfo(dtype)
    qp = qjax.QParams(0.1, 0, qjax.QuantSpec(signed=dtype == jnp.int8))
    compared = 0
    for h, w, c in ((8, 8, 32), (7, 9, 3), (5, 6, 17), (6, 6, 48)):
        x = QArray(jnp.asarray(rng.integers(info.min, info.max + 1, (2, h, w, c)), dtype), qp)
        for k, s, p, d, ceil in [(1, 1, 0, 1, False), (2, 2, 0, 1, False), (2, 2, 1, 1, True),
                                 (3, 1, 1, 1, False), (3, 2, 1, 2, True), (3, 3, 0, 1, True),
                                 (2, 1, 1, 2, False)]:  # fmt: skip
            want = max_pool2d(x, k, s, p, d, ceil, layout="NHWC").values
            args = (k, s, p, d, ceil)
            f = jax.jit(lambda v, a=args: max_pool2d(v, *a, layout="NHWC", kernel="auto"))
            assert "qjax_max_pool_nhwc" in f.lower(x).as_text()
            np.testing.assert_array_equal(np.asarray(f(x).values), np.asarray(want))
            compared += want.size
    assert compared > 10_000
    x5 = jnp.asarray(rng.integers(info.min, info.max + 1, (3, 2, 8, 8, 32)), dtype)
    pool = jax.vmap(lambda v: max_pool2d(QArray(v, qp), 2, layout="NHWC", kernel="auto").values)
    want = jax.vmap(lambda v: max_pool2d(QArray(v, qp), 2, layout="NHWC").values)(x5)
    np.testing.assert_array_equal(np.asarray(jax.jit(pool)(x5)), np.asarray(want))
    x = QArray(x5[0], qp)
    for kw in ({"layout": "NCHW", "kernel_size": 2}, {"layout": "NHWC", "kernel_size": (8, 9)}):
        g = jax.jit(lambda v, kw=kw: max_pool2d(v, kernel="auto", **kw).values)
        assert "custom_call" not in g.lower(x).as_text()
    with pytest.raises(ValueError, match="kernel must be 'xla' or 'auto'"):
        max_pool2d(x, 2, layout="NHWC", kernel="onednn")


@needs_native
def test_imported_max_pool_runs_natively_after_a_native_conv():
    """``import_model(kernel="auto")``: a max pool of the channels-last codes a native conv
    wrote is one native call, its codes torch's."""
    import qjax.converters.torch as qtorch

    torch.backends.quantized.engine = "fbgemm"
    nnq = torch.ao.nn.quantized
    g = torch.Generator().manual_seed(0)
    conv = nnq.Conv2d(3, 8, 3, padding=1)
    w = torch.quantize_per_tensor(torch.randn(8, 3, 3, 3, generator=g) / 4, 0.02, 0, torch.qint8)
    conv.set_weight_bias(w, torch.zeros(8))
    conv.scale, conv.zero_point = 0.05, 60
    model = torch.nn.Sequential(
        nnq.Quantize(0.03, 7, torch.quint8), conv, torch.nn.MaxPool2d(2), nnq.DeQuantize()
    ).eval()
    x = torch.randn(2, 3, 8, 8, generator=g)
    program = qtorch.import_model(model, (x,), engine="fbgemm", kernel="auto")
    if program.kernels.get("1") == "xla":
        pytest.skip("no native conv kernel here: the pool stays channels-first (XLA)")
    assert "qjax_max_pool_nhwc" in _hlo(program, x)
    np.testing.assert_array_equal(np.asarray(program(x)), model(x).numpy())


@needs_native
@pytest.mark.parametrize("dtype", [jnp.uint8, jnp.int8])
def test_native_relu_equals_xla(dtype):
    # every code against zero points across the range (traced, as jit arguments), sizes
    # off the 32-code vector width, and under vmap
    info = jnp.iinfo(dtype)
    codes = np.arange(info.min, info.max + 1).astype(dtype)
    spec = qjax.QuantSpec(signed=dtype == jnp.int8)
    n = 0

    @jax.jit
    def both(v, z):
        x = QArray(v, qjax.QParams(jnp.float32(0.1), z, spec))
        return _elementwise.relu(x, kernel="auto").values, _elementwise.relu(x).values

    for z in (info.min, info.min + 1, 0, 3, info.max - 1, info.max):
        for size in (256, 255, 31, 1, 97):
            v = np.resize(np.roll(codes, z), size)
            got, want = both(jnp.asarray(v), jnp.int32(z))
            assert got.dtype == want.dtype == dtype
            np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
            n += size
    assert "qjax_relu_codes" in both.lower(jnp.asarray(codes), jnp.int32(0)).as_text()
    batched = jax.vmap(lambda v: both(v, jnp.int32(5)))(jnp.asarray(codes.reshape(4, 64)))
    np.testing.assert_array_equal(np.asarray(batched[0]), np.asarray(batched[1]))
    print(f"\nnative relu == XLA on {n} codes")
