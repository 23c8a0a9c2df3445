"""``kernel="onednn"`` through oneDNN's brgemm ukernel (the ``"ukernel"`` provider, the
oneDNN build inside PyTorch's CPU wheel) and its fallback, the PyPI wheel's matmul
primitive (``"matmul"``): exact, checked at run time.

* the fused layer (:func:`qjax.kernels._native.onednn_linear_q8`: brgemm + the
  requantize epilogue in one call) == the XLA path's codes over M, K and N tails of the
  64x64 blocks, uint8 and int8 activations (shifted by 128), per-tensor and per-channel
  weights, schemes ``"fbgemm"``/``"qnnpack"``, with and without bias and ReLU; the
  program holds the fused custom call and no separate dot;
* the multi-thread paths (qjax's helper threads, a task on XLA's pool) give the same
  integers as one thread;
* the ``"matmul"`` provider (``QJAX_ONEDNN_PROVIDER=matmul``, a subprocess): exact dots
  and codes equal to the XLA path, and ``ONEDNN_MAX_CPU_ISA=AVX2`` makes the ukernel
  refuse (torch's own check), with the reason, and every layer (linear and conv) stays
  on XLA with the same codes;
* :func:`qjax.kernels.fold_requant`: the folded layer == the XLA path, one call.

The tests of :mod:`tests.test_native_onednn` run on whichever provider this process got
(:func:`qjax.kernels._native.onednn_provider`). Skipped, with the reason, where the
ukernel is not the provider (torch missing, or a CPU below AVX-512-VNNI).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qjax import QParams, QuantSpec
from qjax.kernels import QArray, _native, onednn_status, prepare_linear, quantized_linear
from qjax.kernels._native import _onednn, _threads

_OK = onednn_status()[0] and _native.onednn_provider() == "ukernel"
pytestmark = pytest.mark.skipif(
    not _OK, reason=f"oneDNN brgemm ukernel is not the provider: {onednn_status()[1]}"
)

WSPEC_C = QuantSpec(signed=True, symmetric=True, axis=1)
WSPEC_T = QuantSpec(signed=True, symmetric=True)

# M, K and N each below, at and above the kernel's 64-row / 64-column blocks and K % 4
SHAPES = [
    (1, 1, 1),
    (3, 10, 70),
    (37, 200, 45),
    (64, 64, 64),
    (65, 129, 130),
    (130, 784, 10),
    (200, 256, 200),
]


def _layers(rng, m, k, n, signed, per_channel):
    lo, hi = (-128, 127) if signed else (0, 255)
    xv = jnp.asarray(rng.integers(lo, hi + 1, (m, k)), jnp.int8 if signed else jnp.uint8)
    x = QArray(
        xv, QParams(jnp.float32(0.02), jnp.int32(-3 if signed else 121), QuantSpec(signed=signed))
    )
    wv = jnp.asarray(rng.integers(-127, 128, (k, n)), jnp.int8)
    if per_channel:
        qp = QParams(
            jnp.asarray(rng.uniform(0.001, 0.01, n), jnp.float32), jnp.zeros(n, jnp.int32), WSPEC_C
        )
    else:
        qp = QParams(jnp.float32(0.004), jnp.int32(0), WSPEC_T)
    w = QArray(wv, qp)
    return x, prepare_linear(w, name="fc"), prepare_linear(w, name="fc", kernel="onednn")


def _both(x, pw_xla, pw_dnn, b, out, scheme, act):
    f = jax.jit(
        lambda x, a, c: [
            quantized_linear(x, p, b, out, scheme=scheme, activation=act).values for p in (a, c)
        ]
    )
    return f(x, pw_xla, pw_dnn)


def test_fused_layer_equals_xla_over_block_tails():
    rng = np.random.default_rng(0)
    compared = bad = cases = 0
    for i, (m, k, n) in enumerate(SHAPES):
        for signed in (False, True):
            x, pw_xla, pw_dnn = _layers(rng, m, k, n, signed, per_channel=i % 2 == 0)
            b = jnp.asarray(rng.normal(0, 0.5, n), jnp.float32) if i % 3 else None
            out = QParams(
                jnp.float32(0.05 * (1 + k) ** 0.5),
                jnp.int32(5 if signed else 128),
                QuantSpec(signed=signed),
            )
            scheme = ("fbgemm", "qnnpack")[(i + signed) % 2]
            act = "relu" if (i + signed) % 3 == 0 else None
            assert _native.fusable(pw_dnn, x, b, out, scheme)
            got, want = _both(x, pw_xla, pw_dnn, b, out, scheme, act)
            compared += want.size
            bad += int((np.asarray(got) != np.asarray(want)).sum())
            cases += 1
            assert want.size < 50 or len(np.unique(np.asarray(want))) > 10  # not all clamped
    print(f"\nfused oneDNN ukernel layer vs xla: {cases} cases, {compared:,} codes, {bad} differ")
    assert bad == 0 and compared > 50_000


def test_program_holds_the_fused_call_only():
    rng = np.random.default_rng(1)
    x, _, pw = _layers(rng, 8, 96, 40, False, per_channel=True)
    out = QParams(jnp.float32(0.3), jnp.int32(128), QuantSpec(signed=False))
    f = jax.jit(lambda x: quantized_linear(x, pw, None, out, activation="relu").values)
    hlo = f.lower(x).as_text()
    assert _onednn.UKERNEL_Q8_TARGET in hlo and _onednn.UKERNEL_TARGET + "(" not in hlo
    assert "dot_general" not in hlo  # the dot is the kernel's, not XLA's


def test_two_threads_give_the_same_integers():
    rng = np.random.default_rng(2)
    m, k, n = 200, 300, 260
    x = jnp.asarray(rng.integers(0, 256, (m, k)), jnp.uint8)
    w = jnp.asarray(rng.integers(-128, 128, (k, n)), jnp.int8)
    p = _native.pack_onednn_weight(w)
    ref = np.asarray(x, np.int64) @ np.asarray(w, np.int64)
    lib = _onednn._LIB
    before = lib.qjax_onednn_uk_parallel_calls()
    old = lib.qjax_onednn_uk_parallel_macs(1)  # every call with more than one item
    dot = jax.jit(_native.onednn_dot)
    spin = lib.qjax_onednn_uk_spin_us(-1)
    assert spin == _threads.spin_us()  # QJAX_SPIN_US (default 100) reached the library
    try:
        # qjax's helper threads sleeping at once, spinning for the next call, then a task
        # on XLA's pool
        for helpers, spin_us in ((1, 0), (1, 1000), (0, 0)):
            was = lib.qjax_onednn_uk_use_helpers(helpers)
            lib.qjax_onednn_uk_spin_us(spin_us)
            try:
                for _ in range(3):
                    np.testing.assert_array_equal(np.asarray(dot(x, p, w)), ref)
            finally:
                lib.qjax_onednn_uk_use_helpers(was)
    finally:
        lib.qjax_onednn_uk_parallel_macs(old)
        lib.qjax_onednn_uk_spin_us(spin)
    assert lib.qjax_onednn_uk_parallel_calls() >= before + 9


_PROVIDER_SCRIPT = textwrap.dedent(
    """
    import json
    import jax.numpy as jnp, numpy as np
    from qjax import QParams, QuantSpec
    from qjax.kernels import QArray, _native, prepare_linear, quantized_linear
    from qjax.kernels._choice import linear_kernel, resolve_kernel

    res = {"status": _native.onednn_status(), "provider": _native.onednn_provider()}
    res["kernel"] = linear_kernel(resolve_kernel("auto", "t"))
    rng = np.random.default_rng(0)
    bad = values = 0
    if res["kernel"] == "onednn":
        for m, k, n in ((1, 3, 5), (37, 200, 45), (65, 784, 130)):
            x = jnp.asarray(rng.integers(0, 256, (m, k)), jnp.uint8)
            w = jnp.asarray(rng.integers(-128, 128, (k, n)), jnp.int8)
            got = np.asarray(_native.onednn_dot(x, _native.pack_onednn_weight(w), w))
            bad += int((got != np.asarray(x, np.int64) @ np.asarray(w, np.int64)).sum())
            values += got.size
    res["dot_values"], res["dot_differ"] = values, bad
    xs = QuantSpec(signed=False)
    x = QArray(jnp.asarray(rng.integers(0, 256, (64, 512)), jnp.uint8), QParams(0.02, 7, xs))
    w = QArray(jnp.asarray(rng.integers(-128, 128, (512, 96)), jnp.int8),
               QParams(0.003, 0, QuantSpec(signed=True, symmetric=True)))
    out = QParams(0.4, 128, xs)
    a = quantized_linear(x, prepare_linear(w, kernel=res["kernel"]), None, out).values
    b = quantized_linear(x, prepare_linear(w), None, out).values
    res["codes"], res["differ"] = int(a.size), int((np.asarray(a) != np.asarray(b)).sum())
    # convolutions (tests/test_native_onednn_conv.py): the kernel 'auto' gives them, and codes
    from qjax.kernels import prepare_conv, quantized_conv
    from qjax.kernels._choice import conv_kernel

    wish = resolve_kernel("auto", "t")
    res["conv_kernels"] = [conv_kernel(wish, *c) for c in ((2, 1, 1), (2, 4, 2), (1, 1, 1))]
    x = QArray(jnp.asarray(rng.integers(0, 256, (4, 10, 10, 16)), jnp.uint8), QParams(0.02, 7, xs))
    w = QArray(jnp.asarray(rng.integers(-128, 128, (3, 3, 16, 24)), jnp.int8),
               QParams(0.003, 0, QuantSpec(signed=True, symmetric=True)))
    pc = [prepare_conv(w, weight_layout="HWIO", kernel=k) for k in (res["conv_kernels"][0], "xla")]
    a, b = (quantized_conv(x, p, None, out, padding=1, layout="NHWC").values for p in pc)
    res["conv_codes"] = int(a.size)
    res["conv_differ"] = int((np.asarray(a) != np.asarray(b)).sum())
    try:
        prepare_conv(w, weight_layout="HWIO", kernel="onednn")
        res["conv_refused"] = ""
    except RuntimeError as e:
        res["conv_refused"] = str(e)
    print("RESULT " + json.dumps(res))
    """
)


def _run(**env):
    env = dict(os.environ, JAX_PLATFORMS="cpu", **env)
    proc = subprocess.run(
        [sys.executable, "-c", _PROVIDER_SCRIPT],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")][-1]
    res = json.loads(line[len("RESULT ") :])
    print(f"\n{env.get('QJAX_ONEDNN_PROVIDER')}, {env.get('ONEDNN_MAX_CPU_ISA')}: {res}")
    return res


def test_matmul_provider_is_exact_and_equal_to_xla():
    found = _onednn.onednn_install()
    if isinstance(found, str):
        pytest.skip(found)
    res = _run(QJAX_ONEDNN_PROVIDER="matmul")
    if not res["status"][0]:
        pytest.skip(f"matmul provider unavailable: {res['status'][1]}")
    assert res["provider"] == "matmul" and res["kernel"] == "onednn"
    assert res["dot_values"] > 10_000 and res["dot_differ"] == 0
    assert res["codes"] == 64 * 96 and res["differ"] == 0


def test_ukernel_refuses_below_vnni_and_layers_stay_on_xla():
    res = _run(QJAX_ONEDNN_PROVIDER="ukernel", ONEDNN_MAX_CPU_ISA="AVX2")
    assert res["status"][0] is False and "refused" in res["status"][1]
    assert res["provider"] is None and res["kernel"] in ("xla", "amx")
    assert res["codes"] == 64 * 96 and res["differ"] == 0
    # convolutions stay on XLA too (kernel='onednn' asked outright: the reason), same codes
    assert set(res["conv_kernels"]) <= {"xla", "amx"} and "refused" in res["conv_refused"]
    assert res["conv_codes"] == 4 * 10 * 10 * 24 and res["conv_differ"] == 0


def test_folded_layer_equals_xla_with_one_call():
    """fold_requant: coefficients computed at prepare time; with the folded weight and the
    qparams passed as jit arguments the program is the native call and nothing else on the
    layer's side (the unfolded one computes the coefficients in ~5 XLA passes per call)."""
    from qjax.kernels import fold_requant

    rng = np.random.default_rng(3)
    compared = bad = 0
    for i, (m, k, n) in enumerate(SHAPES[1:]):
        signed = i % 2 == 1
        x, pw_xla, pw = _layers(rng, m, k, n, signed, per_channel=i % 3 != 0)
        b = jnp.asarray(rng.normal(0, 0.5, n), jnp.float32) if i % 2 else None
        out = QParams(jnp.float32(0.05 * k**0.5), jnp.int32(7), QuantSpec(signed=not signed))
        scheme, act = ("fbgemm", "qnnpack", "onednn")[i % 3], ("relu", None)[i % 2]
        folded = fold_requant(pw, x.qparams, b, out, scheme=scheme, activation=act)

        def f(x, p, b, out, scheme=scheme, act=act):
            return quantized_linear(x, p, b, out, scheme=scheme, activation=act).values

        want = np.asarray(jax.jit(f)(x, pw_xla, b, out))
        got = np.asarray(jax.jit(f)(x, folded, b, out))
        # the off-CPU path of the fused call: the same epilogue in XLA on the exact sums
        xu = np.asarray(x.values, np.int64) + (128 if signed else 0)
        acc = jnp.asarray(xu @ np.asarray(pw.weight.values, np.int64), jnp.int32)
        port = _onednn.portable_codes(acc, *folded.epilogue).astype(out.spec.dtype)
        compared += 2 * want.size
        bad += int((got != want).sum()) + int((np.asarray(port) != want).sum())
        ops = jax.jit(f).lower(x, folded, b, out).compile().as_text().count("fusion(")
        assert ops == (1 if signed else 0)  # int8 codes: the shift to uint8
    print(f"\nfolded oneDNN ukernel layer vs xla: {compared:,} codes, {bad} differ")
    assert bad == 0 and compared > 20_000
