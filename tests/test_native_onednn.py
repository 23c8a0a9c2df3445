"""oneDNN's int8 matmul (``kernel="onednn"``, the optional library): exact, checked at run
time.

* the raw int32 dot (:func:`qjax.kernels._native.onednn_dot`, uint8 x int8) == the exact
  (int64 NumPy) sum over shapes covering M, K and N tails of oneDNN's blocks (all of
  them in the slow run), extreme codes at the largest K the kernel accepts, leading
  batch dims and ``vmap``, a weight packed inside ``jit`` (host callback);
* ``quantized_linear`` with a oneDNN-prepared weight == the XLA path for every scheme
  and activation, int8/uint8 activations, zero and non-zero weight zero points;
* == torch's ``quantized::linear[_relu]`` (fbgemm engine) codes;
* model level: ``qjax.convert(kernel="onednn" | "auto")`` == ``kernel="xla"`` on an NNX
  MLP and CNN (the dense layers on oneDNN, the convs too on the brgemm ukernel,
  :mod:`tests.test_native_onednn_conv`), ``import_model`` on a torch
  CNN == torch's own codes, every layer; ``jax.export`` refuses the custom call;
* CPU levels: in a subprocess with ``ONEDNN_MAX_CPU_ISA=AVX2`` oneDNN dispatches to
  AVX2 (no VNNI): :func:`~qjax.kernels.onednn_exact` says no, the shim refuses the
  saturating primitive, every layer is recorded "xla" and its codes equal the XLA path's.

Skipped, with the reason, only where the library is not installed (or does not load, or
is not exact on this CPU: :func:`qjax.kernels.onednn_exact`). Counts are printed
(``pytest -s``).
"""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
import textwrap
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qjax import QParams, QuantSpec
from qjax.kernels import (
    SCHEMES,
    QArray,
    _native,
    onednn_exact,
    onednn_status,
    prepare_linear,
    quantized_linear,
)
from qjax.kernels._choice import linear_kernel, resolve_kernel

try:
    import torch
except ImportError:
    torch = None

_OK, _REASON = onednn_exact()
pytestmark = pytest.mark.skipif(not _OK, reason=f"oneDNN int8 matmul unavailable: {_REASON}")

XSPEC = QuantSpec(signed=False)
WSPEC_C = QuantSpec(signed=True, symmetric=True, axis=1)
WSPEC_T = QuantSpec(signed=True)
ACTIVATIONS = (None, "relu", "relu6", "hardtanh")


@jax.jit
def _dot(x, packed, w):
    return _native.onednn_dot(x, packed, w)


def _u8(rng, shape):
    return jnp.asarray(rng.integers(0, 256, shape), jnp.uint8)


def _s8(rng, shape, lo=-128, hi=127):
    return jnp.asarray(rng.integers(lo, hi + 1, shape), jnp.int8)


# ----------------------------------------------------------------------------------------
# the raw int32 dot

M_SIZES = (1, 2, 15, 16, 17, 33, 64, 257)
K_SIZES = (1, 3, 4, 63, 64, 65, 784, 1024)
N_SIZES = (1, 10, 16, 17, 64, 65, 1024)
# every M, K and N at least twice (one compile per shape); the full product is slow
SHAPES_FAST = [
    (m, K_SIZES[(3 * i + j) % len(K_SIZES)], N_SIZES[(2 * i + j) % len(N_SIZES)])
    for i, m in enumerate(M_SIZES)
    for j in range(2)
]
SHAPES_ALL = [(m, k, n) for m in M_SIZES for k in K_SIZES for n in N_SIZES]


def _check_dots(rng, shapes):
    values = bad = 0
    for m, k, n in shapes:
        x, w = _u8(rng, (m, k)), _s8(rng, (k, n))
        got = np.asarray(_dot(x, _native.pack_onednn_weight(w), w))
        ref = np.asarray(x, np.int64) @ np.asarray(w, np.int64)  # exact, independent of XLA
        values += ref.size
        bad += int((got != ref).sum())
    print(f"\nonednn dot vs exact: {len(shapes)} shapes, {values:,} int32 values, {bad} differ")
    return values, bad


def test_dot_is_exact_over_block_tails(rng):
    values, bad = _check_dots(rng, SHAPES_FAST)
    assert bad == 0 and values > 90_000


@pytest.mark.slow
def test_dot_is_exact_over_all_block_tails(rng):
    values, bad = _check_dots(rng, SHAPES_ALL)
    assert bad == 0 and values > 2_000_000


def test_pair_sums_beyond_int16_are_exact():
    """255·127 + 255·127 = 64,770: a vpmaddubsw pair would saturate to 32,767."""
    x = jnp.full((4, 64), 255, jnp.uint8)
    w = jnp.concatenate([jnp.full((64, 3), 127, jnp.int8), jnp.full((64, 2), -128, jnp.int8)], 1)
    got = np.asarray(_dot(x, _native.pack_onednn_weight(w), w))
    assert (got[:, :3] == 64 * 255 * 127).all() and (got[:, 3:] == 64 * 255 * -128).all()


def test_extreme_codes_at_largest_k():
    """Raw uint8 codes reach 255 even for symmetric int8 activations (shifted by 128), so
    kernel='onednn' takes K <= (2^31 - 1) / (255·128), below what XLA's path allows."""
    k = (2**31 - 1) // (255 * 128)
    spec = QuantSpec(signed=True, symmetric=True)
    w = QArray(jnp.full((k, 17), -128, jnp.int8), QParams(0.1, 0, spec))
    pw = prepare_linear(w, kernel="onednn", max_abs_x=128)
    w1 = QArray(jnp.full((k + 1, 17), -128, jnp.int8), w.qparams)
    prepare_linear(w1, max_abs_x=128)  # XLA's path takes one more row ...
    with pytest.raises(ValueError, match="kernel='onednn' sums uint8 codes"):  # ... oneDNN not
        prepare_linear(w1, kernel="onednn", max_abs_x=128)
    got = np.asarray(_dot(jnp.full((3, k), 255, jnp.uint8), pw.packed, w.values))
    assert (got == k * 255 * -128).all()


def test_leading_batch_dims_vmap_and_traced_pack(rng):
    w = _s8(rng, (65, 33))
    p = _native.pack_onednn_weight(w)
    x = _u8(rng, (2, 3, 5, 65))
    ref = np.asarray(x, np.int64) @ np.asarray(w, np.int64)
    np.testing.assert_array_equal(np.asarray(_dot(x, p, w)), ref)
    vm = jax.jit(jax.vmap(_native.onednn_dot, in_axes=(0, None, None)))
    np.testing.assert_array_equal(np.asarray(vm(x, p, w)), ref)
    # a weight known only inside jit is reordered by a host callback: the same bytes
    traced = jax.jit(_native.pack_onednn_weight)(w)
    np.testing.assert_array_equal(np.asarray(traced), np.asarray(p))
    both = jax.jit(lambda x, w: _native.onednn_dot(x, _native.pack_onednn_weight(w), w))
    np.testing.assert_array_equal(np.asarray(both(x, w)), ref)


def test_impl_is_brgemm_vnni_and_one_layout_for_every_m():
    impls = {_native.onednn_impl(m, 784, 1024) for m in (1, 2, 32, 256, 1000)}
    print(f"\noneDNN implementations: {impls}")
    # the matmul primitive's name, or qjax's fixed ukernel blocking (one kernel per shape)
    prefix = "brgemm_ukernel:" if _native.onednn_provider() == "ukernel" else "brg_matmul:"
    assert len(impls) == 1 and impls.pop().startswith(prefix)


def test_wrong_packed_size_is_refused(rng):
    w = _s8(rng, (64, 16))
    with pytest.raises(Exception, match="packed weight has"):
        _dot(_u8(rng, (2, 64)), jnp.zeros(7, jnp.uint8), w).block_until_ready()


# ----------------------------------------------------------------------------------------
# quantized_linear: oneDNN == XLA path for every scheme and activation


def _layer(rng, k, n, *, per_channel, wzp=0):
    wv = _s8(rng, (k, n), -127, 127)
    if per_channel:
        scale = jnp.asarray(rng.uniform(0.002, 0.02, n), jnp.float32)
        qp = QParams(scale, jnp.zeros(n, jnp.int32), WSPEC_C)
    else:
        qp = QParams(jnp.float32(0.01), jnp.int32(wzp), WSPEC_T)
    w = QArray(wv, qp)
    return prepare_linear(w, name="fc"), prepare_linear(w, name="fc", kernel="onednn")


@functools.partial(jax.jit, static_argnames=("signed", "combos"))
def _all_schemes(x, pw_xla, pw_dnn, b, *, signed, combos):
    out = QParams(jnp.float32(0.05), jnp.int32(3 if signed else 130), QuantSpec(signed=signed))
    res = []
    for scheme, act in combos:
        bounds = (-0.4, 0.9) if act == "hardtanh" else None
        for pw in (pw_xla, pw_dnn):
            y = quantized_linear(x, pw, b, out, scheme=scheme, activation=act, bounds=bounds)
            res.append(y.values.astype(jnp.int32))
    return jnp.stack(res)


def _check_schemes(rng, signed, full):
    m, k, n = 37, 200, 45
    lo, hi = (-128, 127) if signed else (0, 255)
    xv = jnp.asarray(rng.integers(lo, hi + 1, (m, k)), jnp.int8 if signed else jnp.uint8)
    xqp = QParams(jnp.float32(0.02), jnp.int32(-5 if signed else 120), QuantSpec(signed=signed))
    x = QArray(xv, xqp)
    b = jnp.asarray(rng.normal(0, 0.3, n), jnp.float32)
    if full:
        combos = tuple((s, a) for s in SCHEMES for a in ACTIVATIONS)
    else:  # every scheme once, every activation twice
        combos = tuple((s, ACTIVATIONS[i % len(ACTIVATIONS)]) for i, s in enumerate(SCHEMES))
    compared = bad = 0
    kinds = ((True, 0), (False, 4))  # per-channel symmetric; per-tensor with zp 4
    for per_channel, wzp in kinds if full else kinds[signed : signed + 1]:
        pw_xla, pw_dnn = _layer(rng, k, n, per_channel=per_channel, wzp=wzp)
        assert pw_dnn.kernel == "onednn" and pw_dnn.zero_point_is_zero == (wzp == 0)
        out = np.asarray(_all_schemes(x, pw_xla, pw_dnn, b, signed=signed, combos=combos))
        compared += out[1::2].size
        bad += int((out[0::2] != out[1::2]).sum())
        assert len(np.unique(out)) > 20  # codes spread, not all clamped
    print(
        f"\nonednn vs xla, signed x={signed}: {compared:,} codes over {len(combos)} "
        f"scheme/activation pairs, {bad} differ"
    )
    assert bad == 0


@pytest.mark.parametrize("signed", [False, True])
def test_quantized_linear_onednn_equals_xla_every_scheme(signed, rng):
    _check_schemes(rng, signed, full=False)


@pytest.mark.slow
@pytest.mark.parametrize("signed", [False, True])
def test_quantized_linear_onednn_equals_xla_scheme_activation_product(signed, rng):
    _check_schemes(rng, signed, full=True)


def test_float_output_batch_one_and_jit_equals_eager(rng):
    pw_xla, pw_dnn = _layer(rng, 130, 40, per_channel=True)
    b = jnp.asarray(rng.normal(0, 0.2, 40), jnp.float32)
    out = QParams(jnp.float32(0.03), jnp.int32(100), XSPEC)
    layer = jax.jit(quantized_linear)

    def codes(y):  # requantized codes, or the float output (no quantizer)
        return np.asarray(y.values if isinstance(y, QArray) else y)

    for m in (1, 2, 9):
        x = QArray(_u8(rng, (m, 130)), QParams(jnp.float32(0.02), jnp.int32(128), XSPEC))
        for o in (out, None):
            want = codes(layer(x, pw_xla, b, o))
            np.testing.assert_array_equal(codes(layer(x, pw_dnn, b, o)), want)
            np.testing.assert_array_equal(codes(quantized_linear(x, pw_dnn, b, o)), want)


@functools.partial(jax.jit, static_argnames=("relu",))
def _dnn_layer(x, pw, b, out, *, relu):
    return quantized_linear(x, pw, b, out, scheme="fbgemm", activation="relu" if relu else None)


@pytest.mark.skipif(torch is None, reason="needs torch (the [torch] extra)")
def test_onednn_codes_equal_torch_fbgemm(rng):
    torch.backends.quantized.engine = "fbgemm"
    n_out = bad = 0
    for (m, k, n), per_channel, relu in (
        ((1, 784, 10), True, True),
        ((17, 65, 33), False, False),
        ((32, 300, 100), True, False),
    ):
        for _ in range(3):
            wzp = 0 if per_channel else int(rng.integers(-10, 11))
            xq = rng.integers(0, 256, (m, k)).astype(np.uint8)
            wq = rng.integers(-127, 128, (k, n)).astype(np.int8)
            sx, zx = float(rng.uniform(0.005, 0.05)), int(rng.integers(0, 256))
            sw = rng.uniform(0.001, 0.01, n if per_channel else 1).astype(np.float32)
            bias = (rng.standard_normal(n) * 0.5).astype(np.float32)
            so = float(sx * np.median(sw) * np.sqrt(k) * 74.0 * 60 / 40)
            zo = int(rng.integers(0, 256))
            wt = torch.from_numpy(np.ascontiguousarray(wq.T))
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                if per_channel:
                    sw64 = torch.from_numpy(sw.astype(np.float64))
                    zeros = torch.zeros(n, dtype=torch.long)
                    tw = torch._make_per_channel_quantized_tensor(wt, sw64, zeros, 0)
                else:
                    tw = torch._make_per_tensor_quantized_tensor(wt, float(sw[0]), wzp)
                tx = torch._make_per_tensor_quantized_tensor(torch.from_numpy(xq), sx, zx)
            op = torch.ops.quantized.linear_relu if relu else torch.ops.quantized.linear
            packed = torch.ops.quantized.linear_prepack(tw, torch.from_numpy(bias))
            ref = op(tx, packed, so, zo).int_repr().numpy()
            if per_channel:
                wqp = QParams(jnp.asarray(sw), jnp.zeros(n, jnp.int32), WSPEC_C)
            else:
                wqp = QParams(jnp.float32(sw[0]), jnp.int32(wzp), WSPEC_T)
            pw = prepare_linear(QArray(jnp.asarray(wq), wqp), kernel="onednn")
            x = QArray(jnp.asarray(xq), QParams(jnp.float32(sx), jnp.int32(zx), XSPEC))
            out = QParams(jnp.float32(so), jnp.int32(zo), XSPEC)
            got = np.asarray(_dnn_layer(x, pw, jnp.asarray(bias), out, relu=relu).values)
            n_out += ref.size
            bad += int((got != ref).sum())
    print(f"\nonednn vs torch fbgemm: {n_out:,} output codes, {bad} differ")
    assert bad == 0 and n_out > 10_000


def test_export_refuses_the_custom_call_with_a_hint(rng):
    _, pw = _layer(rng, 64, 16, per_channel=True)
    out = QParams(jnp.float32(0.03), jnp.int32(100), XSPEC)
    x = QArray(_u8(rng, (4, 64)), QParams(jnp.float32(0.02), jnp.int32(128), XSPEC))

    def f(xv):
        return quantized_linear(QArray(xv, x.qparams), pw, None, out).values

    with pytest.raises(ValueError, match=r"qjax_onednn_\w+"):  # the provider's target
        jax.export.export(jax.jit(f))(jax.ShapeDtypeStruct(x.shape, x.values.dtype))


# ----------------------------------------------------------------------------------------
# kernel choice


def test_choice_onednn_and_auto():
    assert resolve_kernel("onednn", "qjax.convert") == "onednn"
    assert linear_kernel("onednn") == linear_kernel("auto") == "onednn"
    sat = "sat16" if _native.sat16_status()[0] else "xla"
    assert linear_kernel("onednn", "fbgemm_sat16") == sat  # saturating layers never on oneDNN


def test_not_installed_names_the_call_and_reason(monkeypatch):
    why = "the optional oneDNN library is not installed (test)"
    monkeypatch.setattr(_native, "onednn_status", lambda: (False, why))
    monkeypatch.setattr(_native, "onednn_exact", lambda: (False, why))
    with pytest.raises(
        RuntimeError, match=r"qjax.convert\(kernel='onednn'\).*not installed \(test\)"
    ):
        resolve_kernel("onednn", "qjax.convert")
    want = "amx" if _native.native_status()[0] else "xla"
    assert linear_kernel(resolve_kernel("auto", "qjax.convert")) == want


def test_library_status_reason_names_version_and_isa():
    ok, reason = onednn_status()
    assert ok and reason.startswith("oneDNN 3.")
    assert "VNNI" in _REASON and "exact" in _REASON


# ----------------------------------------------------------------------------------------
# CPU levels: oneDNN at AVX2 (no VNNI) saturates, so the layers stay on XLA

_AVX2_SCRIPT = textwrap.dedent(
    """
    import json
    import jax, jax.numpy as jnp, numpy as np
    from qjax import QParams, QuantSpec
    from qjax.kernels import QArray, _native, prepare_linear, quantized_linear
    from qjax.kernels._choice import linear_kernel, resolve_kernel

    res = {"status": _native.onednn_status(), "exact": _native.onednn_exact()}
    try:
        _native.onednn_impl(32, 1024, 1024)
        res["impl"] = "accepted"
    except RuntimeError as e:
        res["impl"] = str(e)
    res["kernel"] = linear_kernel(resolve_kernel("onednn", "t"))
    res["auto"] = linear_kernel(resolve_kernel("auto", "t"))
    try:
        prepare_linear(QArray(jnp.ones((4, 2), jnp.int8), QParams(0.1, 0, QuantSpec())),
                       kernel="onednn")
        res["prepare"] = "accepted"
    except RuntimeError as e:
        res["prepare"] = str(e)
    # the layer as a model-level call prepares it: codes vs the XLA path
    rng = np.random.default_rng(0)
    xs = QuantSpec(signed=False)
    x = QArray(jnp.asarray(rng.integers(0, 256, (64, 512)), jnp.uint8), QParams(0.02, 7, xs))
    w = QArray(jnp.asarray(rng.integers(-128, 128, (512, 96)), jnp.int8),
               QParams(0.003, 0, QuantSpec(signed=True, symmetric=True)))
    out = QParams(0.4, 128, xs)
    a = quantized_linear(x, prepare_linear(w, kernel=res["kernel"]), None, out).values
    b = quantized_linear(x, prepare_linear(w), None, out).values
    res["codes"] = int(a.size)
    res["differ"] = int((np.asarray(a) != np.asarray(b)).sum())
    print("RESULT " + json.dumps(res))
    """
)


@pytest.mark.skipif(
    isinstance(_native._onednn.onednn_install(), str),
    reason="the PyPI onednn wheel (the matmul provider, which loads at AVX2) is not installed; "
    "the ukernel at AVX2: tests/test_native_onednn_ukernel.py",
)
def test_avx2_level_stays_on_xla_with_identical_codes():
    env = dict(os.environ, ONEDNN_MAX_CPU_ISA="AVX2", JAX_PLATFORMS="cpu")
    proc = subprocess.run(
        [sys.executable, "-c", _AVX2_SCRIPT], env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")][-1]
    res = json.loads(line[len("RESULT ") :])
    print(f"\nONEDNN_MAX_CPU_ISA=AVX2: {json.dumps(res, indent=1)}")
    assert res["status"][0] is True  # the library loads ...
    assert res["exact"][0] is False and "ISA avx2 has no VNNI" in res["exact"][1]  # ... inexact
    assert "not an exact" in res["impl"]  # the shim refuses the saturating primitive
    assert res["kernel"] == res["auto"] == "xla"  # every layer recorded (and run) on XLA
    assert "kernel='onednn' was requested" in res["prepare"]
    assert res["codes"] == 64 * 96 and res["differ"] == 0
