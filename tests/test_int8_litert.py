"""qjax's TFLite-family schemes against the real LiteRT interpreter: int8 FULLY_CONNECTED.

The ``.tflite`` flatbuffer is written in memory (the ``tflite`` package's generated
schema builders on ``flatbuffers``; no TensorFlow, nothing downloaded) and run by
``ai_edge_litert`` on the same int8 inputs as ``quantized_linear(..., scheme=...)``:
signed int8 activations with any zero point, int8 weights with zero point 0 (per tensor
and per output channel), TFLite's int32 bias of scale ``f32(s_x·s_w)`` and zero point 0,
with and without a fused RELU; random qparams and tie-heavy power-of-two ones (``acc·M``
on ``.5``), multipliers below and above 1. Two LiteRT CPU kernels, no delegate (XNNPACK
would requantize in float):

* ``BUILTIN_REF`` (reference kernels): single rounding, ties away from zero,
  ``round_half_away(acc·qm·2^(shift-31))``;
* ``BUILTIN_WITHOUT_DEFAULT_DELEGATES`` (optimized kernels, ruy on x86): double rounding
  with ties upward in both steps, ``t = (x·2^left·qm + 2^30) >> 31``, then
  ``(t + 2^(right-1)) >> right``.

Found with ``ai-edge-litert`` 2.3.0 on x86-64; each kernel is checked bit-exactly against
an independent NumPy int64 model of it. qjax's ``scheme="litert_ref"`` equals the
reference kernel and ``scheme="litert"`` the optimized kernel (x86-64 only) exactly.
Neither kernel is gemmlowp's double rounding (ties away from zero in
``RoundingDivideByPOT``), which is qjax's ``"tflite"``: the two agree exactly except on
rounding-boundary outputs (ties), where they differ by one code; so does
``"tflite_single_rounding"`` (ties upward, one rounding). Mismatch counts are printed
(``pytest -s``).
"""

from __future__ import annotations

import functools
import platform

import jax
import jax.numpy as jnp
import numpy as np
import pytest

litert = pytest.importorskip("ai_edge_litert.interpreter")
tfl = pytest.importorskip("tflite")
flatbuffers = pytest.importorskip("flatbuffers")

from qjax import QParams, QuantSpec  # noqa: E402
from qjax.kernels import QArray, prepare_linear, quantized_linear  # noqa: E402

I8 = QuantSpec(signed=True)
W_T = QuantSpec(signed=True, symmetric=True)
W_C = QuantSpec(signed=True, symmetric=True, axis=1)
FULLY_CONNECTED = 9


# ----------------------------------------------------------------------------------------
# the model


def _vec_bytes(b, data: bytes):
    """A ubyte vector, 16-byte aligned (buffers hold int32 bias data)."""
    b.StartVector(1, len(data), 16)
    b.head = b.head - len(data)
    b.Bytes[b.head : b.head + len(data)] = data
    return b.EndVector()


def _vec(b, start, values, kind):
    values = list(values)
    start(b, len(values))
    prepend = {"i32": b.PrependInt32, "f32": b.PrependFloat32, "i64": b.PrependInt64}[kind]
    prepend_off = b.PrependUOffsetTRelative
    for v in reversed(values):
        (prepend_off if kind == "off" else prepend)(v)
    return b.EndVector()


def _vec_off(b, start, offsets):
    start(b, len(offsets))
    for o in reversed(offsets):
        b.PrependUOffsetTRelative(o)
    return b.EndVector()


def _quant(b, scales, zero_points, axis=0):
    s = _vec(b, tfl.QuantizationParametersStartScaleVector, scales, "f32")
    z = _vec(b, tfl.QuantizationParametersStartZeroPointVector, zero_points, "i64")
    tfl.QuantizationParametersStart(b)
    tfl.QuantizationParametersAddScale(b, s)
    tfl.QuantizationParametersAddZeroPoint(b, z)
    tfl.QuantizationParametersAddQuantizedDimension(b, axis)
    return tfl.QuantizationParametersEnd(b)


def _tensor(b, name, shape, ttype, buffer, quant):
    nm = b.CreateString(name)
    sh = _vec(b, tfl.TensorStartShapeVector, shape, "i32")
    tfl.TensorStart(b)
    tfl.TensorAddShape(b, sh)
    tfl.TensorAddType(b, ttype)
    tfl.TensorAddBuffer(b, buffer)
    tfl.TensorAddName(b, nm)
    tfl.TensorAddQuantization(b, quant)
    return tfl.TensorEnd(b)


def _buffer(b, data: bytes | None):
    d = None if data is None else _vec_bytes(b, data)
    tfl.BufferStart(b)
    if d is not None:
        tfl.BufferAddData(b, d)
    return tfl.BufferEnd(b)


def fc_model(m, w_nk, bias_q, sx, zx, sw, so, zo, relu) -> bytes:
    """Model bytes: ``out[m, n] = FULLY_CONNECTED(x[m, k], w[n, k], bias_q[n])``, int8.

    ``sw`` a float32 scalar (per tensor) or ``(n,)`` (per output channel, axis 0);
    ``bias_q`` int32 ``(n,)`` of scale ``f32(sx·sw)``, or ``None`` (no bias input).
    """
    n, k = w_nk.shape
    sws = np.atleast_1d(np.asarray(sw, np.float32))
    b = flatbuffers.Builder(1024)
    buffers = [
        _buffer(b, None),  # buffer 0: the empty sentinel
        _buffer(b, None),  # input
        _buffer(b, np.ascontiguousarray(w_nk, np.int8).tobytes()),
        _buffer(b, None if bias_q is None else np.asarray(bias_q, "<i4").tobytes()),
        _buffer(b, None),  # output
    ]
    tensors = [
        _tensor(b, "x", [m, k], tfl.TensorType.INT8, 1, _quant(b, [sx], [zx])),
        _tensor(b, "w", [n, k], tfl.TensorType.INT8, 2, _quant(b, sws, [0] * sws.size)),
    ]
    if bias_q is not None:
        sb = (np.float32(sx) * sws).astype(np.float32)
        tensors.append(_tensor(b, "b", [n], tfl.TensorType.INT32, 3, _quant(b, sb, [0] * sb.size)))
    tensors.append(_tensor(b, "y", [m, n], tfl.TensorType.INT8, 4, _quant(b, [so], [zo])))
    out_idx = len(tensors) - 1

    tfl.FullyConnectedOptionsStart(b)
    act = tfl.ActivationFunctionType.RELU if relu else tfl.ActivationFunctionType.NONE
    tfl.FullyConnectedOptionsAddFusedActivationFunction(b, act)
    opts = tfl.FullyConnectedOptionsEnd(b)
    op_in = _vec(b, tfl.OperatorStartInputsVector, [0, 1, 2 if bias_q is not None else -1], "i32")
    op_out = _vec(b, tfl.OperatorStartOutputsVector, [out_idx], "i32")
    tfl.OperatorStart(b)
    tfl.OperatorAddOpcodeIndex(b, 0)
    tfl.OperatorAddInputs(b, op_in)
    tfl.OperatorAddOutputs(b, op_out)
    tfl.OperatorAddBuiltinOptionsType(b, tfl.BuiltinOptions.FullyConnectedOptions)
    tfl.OperatorAddBuiltinOptions(b, opts)
    op = tfl.OperatorEnd(b)

    t_vec = _vec_off(b, tfl.SubGraphStartTensorsVector, tensors)
    in_vec = _vec(b, tfl.SubGraphStartInputsVector, [0], "i32")
    out_vec = _vec(b, tfl.SubGraphStartOutputsVector, [out_idx], "i32")
    ops_vec = _vec_off(b, tfl.SubGraphStartOperatorsVector, [op])
    sg_name = b.CreateString("main")
    tfl.SubGraphStart(b)
    tfl.SubGraphAddTensors(b, t_vec)
    tfl.SubGraphAddInputs(b, in_vec)
    tfl.SubGraphAddOutputs(b, out_vec)
    tfl.SubGraphAddOperators(b, ops_vec)
    tfl.SubGraphAddName(b, sg_name)
    sg = tfl.SubGraphEnd(b)

    tfl.OperatorCodeStart(b)
    tfl.OperatorCodeAddDeprecatedBuiltinCode(b, FULLY_CONNECTED)
    tfl.OperatorCodeAddBuiltinCode(b, FULLY_CONNECTED)
    tfl.OperatorCodeAddVersion(b, 4)
    opcode = tfl.OperatorCodeEnd(b)

    codes_vec = _vec_off(b, tfl.ModelStartOperatorCodesVector, [opcode])
    sgs_vec = _vec_off(b, tfl.ModelStartSubgraphsVector, [sg])
    bufs_vec = _vec_off(b, tfl.ModelStartBuffersVector, buffers)
    desc = b.CreateString("qjax test_int8_litert")
    tfl.ModelStart(b)
    tfl.ModelAddVersion(b, 3)
    tfl.ModelAddOperatorCodes(b, codes_vec)
    tfl.ModelAddSubgraphs(b, sgs_vec)
    tfl.ModelAddDescription(b, desc)
    tfl.ModelAddBuffers(b, bufs_vec)
    model = tfl.ModelEnd(b)
    b.Finish(model, file_identifier=b"TFL3")
    return bytes(b.Output())


def run_litert(model: bytes, x: np.ndarray, resolver: str) -> np.ndarray:
    interp = litert.Interpreter(
        model_content=model,
        num_threads=1,
        experimental_op_resolver_type=getattr(litert.OpResolverType, resolver),
    )
    interp.allocate_tensors()
    interp.set_tensor(interp.get_input_details()[0]["index"], x)
    interp.invoke()
    return interp.get_tensor(interp.get_output_details()[0]["index"]).copy()


KERNELS = {"ref": "BUILTIN_REF", "opt": "BUILTIN_WITHOUT_DEFAULT_DELEGATES"}
# The optimized kernels' rounding was established on x86-64 (ruy's x86 paths); other
# architectures run other code, so only the reference kernel is pinned there.
X86 = platform.machine().lower() in ("x86_64", "amd64")


# ----------------------------------------------------------------------------------------
# independent NumPy int64 models (acc includes the int32 bias)


def _np_quantize_multiplier(m: float) -> tuple[int, int]:
    """TFLite's QuantizeMultiplier in float64 (no flush needed for these multipliers)."""
    q, shift = np.frexp(np.float64(m))
    qm = int(np.sign(q) * np.floor(np.abs(q) * 2.0**31 + 0.5))
    if qm == 2**31:
        qm, shift = qm // 2, shift + 1
    return qm, int(shift)


def _np_ref_kernel(acc, qm, shift):
    """Single rounding, ties away from zero: round_half_away(acc·qm / 2^(31-shift))."""
    p = acc * qm
    ts = 31 - shift
    mag = (np.abs(p) + (1 << (ts - 1))) >> ts
    return np.sign(p) * mag


def _np_opt_kernel(acc, qm, shift):
    """Left shift; (x·qm + 2^30) >> 31; rounding right shift with ties upward."""
    left, right = max(shift, 0), max(-shift, 0)
    t = ((acc << left) * qm + (1 << 30)) >> 31
    return (t + ((1 << right) >> 1)) >> right


def _np_gemmlowp(acc, qm, shift):
    """gemmlowp/TFLite double rounding: SaturatingRoundingDoublingHighMul (ties upward)
    then RoundingDivideByPOT (ties away from zero)."""
    left, right = max(shift, 0), max(-shift, 0)
    t = ((acc << left) * qm + (1 << 30)) >> 31
    if right == 0:
        return t
    mask = (1 << right) - 1
    return (t >> right) + ((t & mask) > (mask >> 1) + (t < 0))


def _np_requant(model, c, acc):
    n = acc.shape[1]
    sw = np.broadcast_to(c["sw"], (n,))
    out = np.empty_like(acc)
    for ch in range(n):
        m = float(np.float64(c["sx"]) * np.float64(sw[ch]) / np.float64(c["so"]))
        qm, shift = _np_quantize_multiplier(m)
        out[:, ch] = model(acc[:, ch], qm, shift)
    lo = max(-128, c["zo"]) if c["relu"] else -128
    return np.clip(out + c["zo"], lo, 127)


# qjax


@functools.partial(jax.jit, static_argnames=("relu", "per_channel", "has_bias", "scheme"))
def _qjax_fc(xv, sx, zx, wv_kn, sw, bias, so, zo, *, relu, per_channel, has_bias, scheme):
    x = QArray(xv, QParams(sx, zx, I8))
    w = prepare_linear(
        QArray(wv_kn, QParams(sw, jnp.zeros_like(sw, jnp.int32), W_C if per_channel else W_T))
    )
    y = quantized_linear(
        x,
        w,
        bias if has_bias else None,
        QParams(so, zo, I8),
        scheme=scheme,
        activation="relu" if relu else None,
    )
    return y.values


def _round_half_away(v):
    return np.sign(v) * np.floor(np.abs(v) + 0.5)


def _float_bias_for(bias_q, sx, sw):
    """A float32 bias whose TFLite quantization ``round_half_away(f32(b·f32(1/f32(sx·sw))))``
    is exactly ``bias_q`` (checked), so both sides add the same int32 bias."""
    sf = (np.float32(sx) * np.asarray(sw, np.float32)).astype(np.float32)
    b = (bias_q.astype(np.float64) * sf.astype(np.float64)).astype(np.float32)
    inv = np.float32(1.0) / sf
    back = _round_half_away((b * inv).astype(np.float32))
    np.testing.assert_array_equal(back.astype(np.int64), bias_q)
    return b


# ----------------------------------------------------------------------------------------
# cases

SHAPES = [(16, 64, 24), (9, 200, 40)]  # (m, k, n)


def _case(rng, shape, *, tie, per_channel, has_bias, relu):
    m, k, n = shape
    zx = int(rng.integers(-128, 128))
    zo = int(rng.integers(-128, 128))
    if tie:
        # power-of-two scales, small codes: M = 2^-j (or 3·2^-j, or up to 4), acc·M on .5
        r = int(rng.integers(1, 4))
        lo, hi = max(-128, zx - r), min(127, zx + r)
        x = rng.integers(lo, hi + 1, (m, k))
        w = rng.integers(-r, r + 1, (n, k))
        sx = np.float32(2.0 ** -int(rng.integers(3, 9)))
        ew = rng.integers(3, 9, n if per_channel else 1)
        sw = (2.0 ** -ew.astype(np.float64)).astype(np.float32)
        j = rng.integers(-2, 6, n if per_channel else 1)  # M = f·2^-j
        f = np.where(rng.random(j.shape) < 0.3, 3.0, 1.0)
        # so chosen so s_x·s_w/s_o = f·2^-j exactly: so = sx·sw·2^j / f (exact for f=1)
        so = np.float32(np.float64(sx) * np.float64(sw[0]) * 2.0 ** float(j[0]) / f[0])
        bias_q = rng.integers(-4 * r * r, 4 * r * r + 1, n)
    else:
        x = rng.integers(-128, 128, (m, k))
        w = rng.integers(-127, 128, (n, k))
        sx = np.float32(rng.uniform(0.002, 0.1))
        sw = rng.uniform(0.0005, 0.02, n if per_channel else 1).astype(np.float32)
        # spread the codes over the range: sd(acc) ~ sqrt(k)·74·73
        sd = np.sqrt(k) * 74.0 * 73.0
        so = np.float32(np.float64(sx) * float(np.median(sw)) * sd * rng.uniform(0.005, 0.05))
        bias_q = rng.integers(-int(3 * sd), int(3 * sd) + 1, n)
    sw = sw if per_channel else sw[:1]
    return dict(
        x=x.astype(np.int8),
        zx=zx,
        sx=sx,
        w=w.astype(np.int8),
        sw=sw,
        so=so,
        zo=zo,
        bias_q=bias_q.astype(np.int64) if has_bias else None,
        relu=relu,
        per_channel=per_channel,
    )


def _qjax(c, scheme):
    per_channel = c["per_channel"]
    sw_model = c["sw"] if per_channel else c["sw"][0]
    n = c["w"].shape[0]
    has_bias = c["bias_q"] is not None
    bias = _float_bias_for(c["bias_q"], c["sx"], sw_model) if has_bias else np.zeros(n)
    return np.asarray(
        _qjax_fc(
            jnp.asarray(c["x"]),
            jnp.float32(c["sx"]),
            jnp.int32(c["zx"]),
            jnp.asarray(c["w"].T),
            jnp.asarray(c["sw"]) if per_channel else jnp.float32(c["sw"][0]),
            jnp.asarray(np.broadcast_to(bias, (n,)).astype(np.float32)),
            jnp.float32(c["so"]),
            jnp.int32(c["zo"]),
            relu=c["relu"],
            per_channel=per_channel,
            has_bias=has_bias,
            scheme=scheme,
        )
    ).astype(np.int64)


@functools.cache
def _results(per_channel: bool):
    """48 cases, each run by both LiteRT kernels, the NumPy models and qjax."""
    rng = np.random.default_rng(20260519 + per_channel)
    rows = []
    for i in range(48):
        c = _case(
            rng,
            SHAPES[i % len(SHAPES)],
            tie=i % 2 == 0,
            per_channel=per_channel,
            has_bias=i % 3 != 0,
            relu=i % 4 < 2,
        )
        sw_model = c["sw"] if per_channel else c["sw"][0]
        model = fc_model(
            c["x"].shape[0],
            c["w"],
            c["bias_q"],
            c["sx"],
            c["zx"],
            sw_model,
            c["so"],
            c["zo"],
            c["relu"],
        )
        acc = (c["x"].astype(np.int64) - c["zx"]) @ c["w"].T.astype(np.int64)
        if c["bias_q"] is not None:
            acc = acc + c["bias_q"]
        row = {"tie": c.get("tie", i % 2 == 0)}
        for k, resolver in KERNELS.items():
            y = run_litert(model, c["x"], resolver)
            assert y.dtype == np.int8 and y.shape == acc.shape
            row[k] = y.astype(np.int64)
        row["np_ref"] = _np_requant(_np_ref_kernel, c, acc)
        row["np_opt"] = _np_requant(_np_opt_kernel, c, acc)
        row["np_gemmlowp"] = _np_requant(_np_gemmlowp, c, acc)
        row["tflite"] = _qjax(c, "tflite")
        row["tflite_single_rounding"] = _qjax(c, "tflite_single_rounding")
        row["litert_ref"] = _qjax(c, "litert_ref")
        row["litert"] = _qjax(c, "litert")
        rows.append(row)
    return {
        key: np.concatenate([r[key].ravel() for r in rows]) for key in rows[0] if key != "tie"
    } | {"tie": np.concatenate([np.full(r["ref"].size, r["tie"]) for r in rows])}


GRAN = pytest.mark.parametrize("per_channel", [False, True], ids=["per_tensor", "per_channel"])


@GRAN
def test_litert_kernels_match_independent_numpy_models(per_channel):
    r = _results(per_channel)
    n = r["ref"].size
    assert n >= 15_000
    assert np.sum((r["ref"] > -128) & (r["ref"] < 127)) > n // 2  # mostly unsaturated
    np.testing.assert_array_equal(r["ref"], r["np_ref"])
    # the tie-heavy cases do tell the roundings apart
    assert np.sum(r["np_gemmlowp"] != r["ref"]) > 50
    if X86:
        np.testing.assert_array_equal(r["opt"], r["np_opt"])
        assert np.sum(r["ref"] != r["opt"]) > 50
        assert np.sum(r["np_gemmlowp"] != r["opt"]) > 50


@GRAN
def test_tflite_scheme_vs_litert(per_channel):
    r = _results(per_channel)
    n = r["ref"].size
    counts = {
        (scheme, k): int(np.sum(r[scheme] != r[k]))
        for scheme in ("tflite", "tflite_single_rounding")
        for k in KERNELS
    }
    rand = ~r["tie"]
    print(
        f"\nLiteRT FULLY_CONNECTED ({'per-channel' if per_channel else 'per-tensor'}), "
        f"{n} outputs ({int(rand.sum())} from random qparams): mismatches "
        + ", ".join(f"qjax {s} vs LiteRT {k}: {v}" for (s, k), v in counts.items())
        + f"; random-qparam cases: tflite vs ref {int(np.sum((r['tflite'] != r['ref']) & rand))}"
        f", vs opt {int(np.sum((r['tflite'] != r['opt']) & rand))}"
    )
    # qjax "tflite" is gemmlowp's double rounding, exactly
    np.testing.assert_array_equal(r["tflite"], r["np_gemmlowp"])
    # ... so it equals each LiteRT kernel except where that kernel rounds a boundary
    # case differently from gemmlowp, and there by one code
    for k in KERNELS if X86 else ["ref"]:
        bad = r["tflite"] != r[k]
        assert not np.any(bad & (r["np_gemmlowp"] == r["np_" + k]))
        assert np.all(np.abs(r["tflite"] - r[k]) <= 1)
        assert np.all(np.abs(r["tflite_single_rounding"] - r[k]) <= 1)


# qjax scheme that reproduces each LiteRT kernel
LITERT_SCHEME = {"ref": "litert_ref", "opt": "litert"}


@GRAN
@pytest.mark.parametrize("kernel", list(KERNELS))
def test_litert_scheme_equals_litert_exactly(per_channel, kernel):
    if kernel == "opt" and not X86:
        pytest.skip("optimized-kernel rounding pinned on x86-64 only")
    r = _results(per_channel)
    scheme = LITERT_SCHEME[kernel]
    np.testing.assert_array_equal(r[scheme], r["np_" + kernel])
    np.testing.assert_array_equal(r[scheme], r[kernel])
    tie = r["tie"]
    print(
        f"\nqjax {scheme} == LiteRT {kernel} "
        f"({'per-channel' if per_channel else 'per-tensor'}): all {r[kernel].size} outputs "
        f"({int(tie.sum())} from tie-heavy qparams)"
    )
