"""Integer linear layer: bit-exact against PyTorch's quantized engines at run time.

* fbgemm / x86 / qnnpack engines: 0 mismatches over >= 1M outputs each (random shapes and
  qparams, tie-heavy power-of-two scales, per-tensor and per-channel weights, with and
  without bias and fused ReLU, quint8 activations with any zero point and full-range
  codes), each compared with the accumulation the engine table gives for this machine's
  CPU level (qjax.kernels._levels);
* onednn: at most 1 code apart on at most 2 outputs per million (rule 13);
* each lower CPU level (int16 pair saturation, rule 14) against torch forced to it by its
  own switches in a subprocess (``level_env``): 0 mismatches for fbgemm, x86 and onednn,
  while exact accumulation differs;
* the TFLite schemes against an independent NumPy int64 implementation;
* the program: only int8 x int8 -> int32 ``dot_general``, no float dot, one trace per
  shape, the same codes with and without ``jit`` and for any batch split.

Mismatch counts are printed (``pytest -s``).
"""

from __future__ import annotations

import functools
import math
import os
import platform
import subprocess
import sys
import warnings

import jax
import jax.extend as jex
import jax.numpy as jnp
import numpy as np
import pytest

from qjax import QParams, QuantSpec
from qjax.kernels import (
    LEVELS,
    PreparedLinear,
    QArray,
    host_level,
    level_env,
    prepare_linear,
    quantized_linear,
)
from qjax.kernels import engine as qengine

try:
    import torch
except ImportError:  # the program and NumPy-reference tests still run
    torch = None
needs_torch = pytest.mark.skipif(torch is None, reason="needs torch (the [torch] extra)")

XSPEC = QuantSpec(signed=False)  # quint8 activations
OSPEC = QuantSpec(signed=False)
WSPEC_T = QuantSpec(signed=True)  # qint8 per-tensor (any zero point)
WSPEC_C = QuantSpec(signed=True, symmetric=True, axis=1)  # per output channel, zp 0
ENGINES = {"fbgemm": "fbgemm", "x86": "fbgemm", "qnnpack": "qnnpack", "onednn": "onednn"}
OUTPUTS_PER_ENGINE = 1_050_000


# Full-range activation codes on every CPU: below VNNI torch saturates u8·s8 pairs (rule
# 14) and the comparison takes the table's accumulation for this machine's level.
X_CODE_MAX = 255


def _choice(engine, isa=None):
    """``(scheme, accumulate)`` torch's ``engine`` computes a linear layer with at ``isa``
    (this machine's level when ``None``): the one table, qjax.kernels._levels."""
    e = qengine(engine, isa)
    return e.linear, e.linear_accumulate


# ----------------------------------------------------------------------------------------
# cases


def _group(rng, n_out, *, per_channel, has_bias, relu, tie_share=0.5, wzp=False):
    """B stacked random cases of one random shape, about ``n_out`` outputs in all.

    A share ``tie_share`` of the cases is tie-heavy: power-of-two scales, small codes and
    bias on multiples of ``s_x·s_w/2``, so ``y·M`` lands on ``.5`` often; the others have
    random scales, with the output scale set so codes spread over the output range.
    """
    m, k, n = int(rng.integers(1, 49)), int(rng.integers(1, 257)), int(rng.integers(4, 97))
    b = max(4, math.ceil(n_out / (m * n)))
    nch = n if per_channel else 1
    tie = rng.random(b) < tie_share
    # random cases
    x = rng.integers(0, X_CODE_MAX + 1, (b, m, k))
    zx = rng.integers(0, 256, b)
    w = rng.integers(-128, 128, (b, k, n))
    sx = np.exp(rng.uniform(-6, -1, b))
    sw = np.exp(rng.uniform(-8, -3, (b, 1))) * np.exp(rng.uniform(-1, 1, (b, nch)))
    acc_std = np.sqrt(k) * (x - zx[:, None, None]).std(axis=(1, 2)) * 74.0 + 1.0
    so = sx * np.median(sw, axis=1) * acc_std / rng.uniform(10, 90, b)
    bias = rng.normal(0, 1, (b, n)) * so[:, None] * 30
    # tie-heavy cases
    tzx = rng.integers(3, min(X_CODE_MAX, 252) + 1, b)
    tx = rng.integers(-3, 4, (b, m, k)) + tzx[:, None, None]
    tw = rng.integers(-3, 4, (b, k, n))
    tsx = 2.0 ** -rng.integers(2, 9, b)
    tsw = 2.0 ** -rng.integers(4, 11, (b, nch))
    tso = tsx * np.median(tsw, axis=1) * 2.0 ** rng.integers(1, 5, b)  # M = 2^-j
    tbias = rng.integers(-40, 41, (b, n)) * np.broadcast_to(tsx[:, None] * tsw / 2, (b, n))
    pick = lambda t, r: np.where(tie.reshape((b,) + (1,) * (np.ndim(r) - 1)), t, r)
    zw = np.zeros((b, nch), np.int64)
    if wzp:
        zw = rng.integers(-20, 21, (b, 1))
    return dict(
        x=pick(tx, x).astype(np.uint8),
        zx=pick(tzx, zx),
        w=pick(tw, w).astype(np.int8),
        sx=pick(tsx, sx).astype(np.float32),
        sw=pick(tsw, sw).astype(np.float32),
        zw=zw,
        bias=pick(tbias, bias).astype(np.float32) if has_bias else None,
        so=pick(tso, so).astype(np.float32),
        zo=rng.integers(0, 256, b),
        per_channel=per_channel,
        relu=relu,
        b=b,
        shape=(m, k, n),
    )


def _groups(seed, total):
    rng = np.random.default_rng(seed)
    combos = [
        dict(per_channel=pc, has_bias=hb, relu=r)
        for pc in (False, True)
        for hb in (False, True)
        for r in (False, True)
    ]
    per = total / len(combos)
    return [_group(rng, per, **c) for c in combos]


# ----------------------------------------------------------------------------------------
# torch and jax runners


def _torch_linear(engine, g, i):
    torch.backends.quantized.engine = engine
    x = torch._make_per_tensor_quantized_tensor(
        torch.from_numpy(g["x"][i]), float(g["sx"][i]), int(g["zx"][i])
    )
    wt = torch.from_numpy(np.ascontiguousarray(g["w"][i].T))  # (in, out) -> (out, in)
    if g["per_channel"]:
        w = torch._make_per_channel_quantized_tensor(
            wt,
            torch.from_numpy(g["sw"][i].astype(np.float64)),
            torch.from_numpy(g["zw"][i].astype(np.int64)),
            0,
        )
    else:
        w = torch._make_per_tensor_quantized_tensor(wt, float(g["sw"][i, 0]), int(g["zw"][i, 0]))
    bias = None if g["bias"] is None else torch.from_numpy(g["bias"][i])
    packed = torch.ops.quantized.linear_prepack(w, bias)
    op = torch.ops.quantized.linear_relu if g["relu"] else torch.ops.quantized.linear
    return op(x, packed, float(g["so"][i]), int(g["zo"][i])).int_repr().numpy()


def _torch_group(engine, g):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return np.stack([_torch_linear(engine, g, i) for i in range(g["b"])])


@functools.partial(jax.jit, static_argnames=("schemes", "relu", "per_channel", "wzp", "accumulate"))
def _jax_batched(
    xv, sx, zx, wv, sw, zw, bias, so, zo, *, schemes, relu, per_channel, wzp, accumulate="exact"
):
    """Codes of every scheme in ``schemes``, stacked on axis 1: one compile per case shape
    serves all schemes (the sweep is compile-bound, not compute-bound)."""
    wspec = WSPEC_C if per_channel else (WSPEC_T if wzp else WSPEC_T.replace(symmetric=True))

    def one(xv, sx, zx, wv, sw, zw, bias, so, zo):
        x = QArray(xv, QParams(sx, zx, XSPEC))
        if not per_channel:
            sw, zw = sw[0], zw[0]
        w = prepare_linear(QArray(wv, QParams(sw, zw, wspec)), name="case")
        out = QParams(so, zo, OSPEC)
        ys = [
            quantized_linear(
                x,
                w,
                bias,
                out,
                scheme=scheme,
                activation="relu" if relu else None,
                accumulate=accumulate,
            ).values
            for scheme in schemes
        ]
        return jnp.stack(ys)

    return jax.vmap(one)(xv, sx, zx, wv, sw, zw, bias, so, zo)


def _jax_schemes(schemes, g, accumulate="exact"):
    """``{scheme: codes}`` of group ``g`` for every scheme, from one jitted program."""
    out = _jax_batched(
        jnp.asarray(g["x"]),
        jnp.asarray(g["sx"]),
        jnp.asarray(g["zx"], jnp.int32),
        jnp.asarray(g["w"]),
        jnp.asarray(g["sw"]),
        jnp.asarray(g["zw"], jnp.int32),
        None if g["bias"] is None else jnp.asarray(g["bias"]),
        jnp.asarray(g["so"]),
        jnp.asarray(g["zo"], jnp.int32),
        schemes=tuple(schemes),
        relu=g["relu"],
        per_channel=g["per_channel"],
        wzp=bool(np.any(g["zw"])),
        accumulate=accumulate,
    )
    return {s: np.asarray(out[:, i]) for i, s in enumerate(schemes)}


def _jax_group(scheme, g, accumulate="exact"):
    return _jax_schemes((scheme,), g, accumulate)[scheme]


# ----------------------------------------------------------------------------------------
# run every engine once per session


@pytest.fixture(scope="module")
def torch_one_thread():
    # Small ops: torch's thread pool spinning against XLA's costs 10-50x in wall time.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def engine_results(torch_one_thread):
    groups = _groups(seed=20260513, total=OUTPUTS_PER_ENGINE)
    # Non-zero per-tensor weight zero points (fbgemm, x86 and qnnpack accept them).
    rng = np.random.default_rng(7)
    wzp_groups = [
        _group(rng, 40_000, per_channel=False, has_bias=hb, relu=r, wzp=True)
        for hb, r in ((True, False), (False, True))
    ]
    supported = set(torch.backends.quantized.supported_engines)
    choice = {e: _choice(e) for e in ENGINES if e in supported}
    jax_out = {}
    results = {}
    for engine in choice:
        gs = groups + (wzp_groups if engine != "onednn" else [])
        n = mism = maxd = 0
        spread = []
        for g in gs:
            if id(g) not in jax_out:
                # every (scheme, accumulation) this group is compared under, one program each
                wzp = any(g is w for w in wzp_groups)  # oneDNN takes no weight zp
                by_acc: dict[str, set] = {}
                for s, a in choice.values():
                    if not (wzp and s == "onednn"):
                        by_acc.setdefault(a, set()).add(s)
                jax_out[id(g)] = {
                    (s, a): v
                    for a, ss in by_acc.items()
                    for s, v in _jax_schemes(sorted(ss), g, a).items()
                }
            ref = _torch_group(engine, g)
            d = np.abs(jax_out[id(g)][choice[engine]].astype(np.int64) - ref.astype(np.int64))
            n += d.size
            mism += int((d > 0).sum())
            maxd = max(maxd, int(d.max()))
            spread.append(np.mean((ref > 0) & (ref < 255)))
        results[engine] = dict(n=n, mismatches=mism, max_diff=maxd, unsaturated=np.mean(spread))
    print(f"\nint8 linear vs torch at level {host_level()} (outputs, mismatches, max |diff|):")
    for e, r in results.items():
        print(
            f"  {e:8s} {'/'.join(choice[e]):20s} n={r['n']:,} mismatches={r['mismatches']} "
            f"max_diff={r['max_diff']} unclamped={r['unsaturated']:.2f}"
        )
    return results


@needs_torch
@pytest.mark.parametrize("engine", ["fbgemm", "x86", "qnnpack"])
def test_bit_exact_with_torch_engine(engine, engine_results):
    if engine not in engine_results:
        pytest.skip(f"torch engine {engine} not available")
    r = engine_results[engine]
    assert r["n"] >= 1_000_000
    assert r["unsaturated"] > 0.5  # the comparison is not dominated by clamped codes
    assert r["mismatches"] == 0, r


@needs_torch
def test_onednn_within_its_bound(engine_results):
    if "onednn" not in engine_results:
        pytest.skip("torch engine onednn not available")
    r = engine_results["onednn"]
    assert r["n"] >= 1_000_000
    assert r["max_diff"] <= 1, r
    assert r["mismatches"] <= math.ceil(2e-6 * r["n"]), r


# ----------------------------------------------------------------------------------------
# FBGEMM int16 saturation (rule 14), in a subprocess forced to AVX2

_SUBPROCESS = r"""
import sys, warnings
import numpy as np
import torch
warnings.simplefilter("ignore")
torch.set_num_threads(1)
data = dict(np.load(sys.argv[1], allow_pickle=False))
out = {}
for engine in ("fbgemm", "x86", "onednn"):
    if engine not in torch.backends.quantized.supported_engines:
        continue
    torch.backends.quantized.engine = engine
    for g in range(int(data["n_groups"])):
        p = f"g{g}_"
        per_channel = bool(data[p + "per_channel"])
        relu = bool(data[p + "relu"])
        ys = []
        for i in range(data[p + "x"].shape[0]):
            x = torch._make_per_tensor_quantized_tensor(
                torch.from_numpy(data[p + "x"][i]), float(data[p + "sx"][i]),
                int(data[p + "zx"][i]))
            wt = torch.from_numpy(np.ascontiguousarray(data[p + "w"][i].T))
            if per_channel:
                w = torch._make_per_channel_quantized_tensor(
                    wt, torch.from_numpy(data[p + "sw"][i].astype(np.float64)),
                    torch.zeros(wt.shape[0], dtype=torch.int64), 0)
            else:
                w = torch._make_per_tensor_quantized_tensor(wt, float(data[p + "sw"][i, 0]), 0)
            packed = torch.ops.quantized.linear_prepack(w, torch.from_numpy(data[p + "bias"][i]))
            op = torch.ops.quantized.linear_relu if relu else torch.ops.quantized.linear
            ys.append(op(x, packed, float(data[p + "so"][i]), int(data[p + "zo"][i]))
                      .int_repr().numpy())
        out[f"{engine}_{g}"] = np.stack(ys)
np.savez(sys.argv[2], **out)
"""


@needs_torch
@pytest.mark.skipif(platform.machine().lower() not in ("x86_64", "amd64"), reason="x86 only")
@pytest.mark.parametrize("level", ["avx2", "avx512"])
def test_lower_level_matches_torch_forced_to_it(level, tmp_path):
    """torch forced to a lower CPU level by its own switches (a subprocess with
    ``level_env(level)``): the table's accumulation for that level (int16 pair saturation,
    rule 14) gives torch's codes for fbgemm, x86 and onednn; exact accumulation does not."""
    here = host_level()
    if here is None or LEVELS.index(here) < LEVELS.index(level):
        pytest.skip(f"this CPU ({here}) cannot run level {level}")
    rng = np.random.default_rng(14)
    groups = []
    for pc, relu in ((False, False), (True, True), (True, False)):
        g = _group(rng, 40_000, per_channel=pc, has_bias=True, relu=relu, tie_share=0.0)
        # Large activation codes and weights: pairs overflow int16 (e.g. 209·127+147·127).
        g["x"] = rng.integers(96, 256, g["x"].shape).astype(np.uint8)
        g["w"] = np.where(
            rng.random(g["w"].shape) < 0.7,
            rng.integers(90, 128, g["w"].shape) * rng.choice([-1, 1], g["w"].shape),
            rng.integers(-128, 128, g["w"].shape),
        ).astype(np.int8)
        g["zx"] = rng.integers(100, 256, g["b"])
        k = g["shape"][1]
        g["so"] = (g["sx"] * np.median(g["sw"], axis=1) * np.sqrt(k) * 3000).astype(np.float32)
        g["bias"] = (rng.normal(0, 20, (g["b"], g["shape"][2])) * g["so"][:, None]).astype(
            np.float32
        )
        groups.append(g)
    arrays = {"n_groups": np.array(len(groups))}
    for gi, g in enumerate(groups):
        for key in ("x", "sx", "zx", "w", "sw", "bias", "so", "zo"):
            arrays[f"g{gi}_{key}"] = np.asarray(g[key])
        arrays[f"g{gi}_per_channel"] = np.array(g["per_channel"])
        arrays[f"g{gi}_relu"] = np.array(g["relu"])
    src, dst = tmp_path / "cases.npz", tmp_path / "torch.npz"
    np.savez(src, **arrays)
    env = dict(os.environ, OMP_NUM_THREADS="1", **level_env(level))
    proc = subprocess.run(
        [sys.executable, "-c", _SUBPROCESS, str(src), str(dst)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    ref = dict(np.load(dst))
    n = mism = exact_mism = exact_maxd = 0
    for gi, g in enumerate(groups):
        exact = _jax_schemes(("fbgemm", "onednn"), g)
        for engine in ("fbgemm", "x86", "onednn"):
            if f"{engine}_{gi}" not in ref:
                continue
            scheme, acc = _choice(engine, level)
            assert acc != "exact"
            r = ref[f"{engine}_{gi}"].astype(np.int64)
            got = _jax_group(scheme, g, accumulate=acc)
            n += r.size
            mism += int((got != r).sum())
            d = np.abs(exact[scheme].astype(np.int64) - r)
            exact_mism += int((d > 0).sum())
            exact_maxd = max(exact_maxd, int(d.max()))
    print(
        f"\nlinear at level {level} (fbgemm, x86, onednn) vs torch: n={n:,} mismatches={mism}; "
        f"exact accumulation: mismatches={exact_mism} max_diff={exact_maxd}"
    )
    assert n >= 300_000
    assert mism == 0
    assert exact_mism > 0.01 * n and exact_maxd > 5  # saturation really happened


# ----------------------------------------------------------------------------------------
# TFLite fixed point against an independent NumPy int64 implementation


def _np_round_half_away(v):
    return np.sign(v) * np.floor(np.abs(v) + 0.5)  # exact for |v| < 2^52 in float64


def _np_quantize_multiplier(m: float, single: bool):
    if m == 0.0:
        return 0, 0
    q, shift = math.frexp(m)
    qf = int(_np_round_half_away(q * 2.0**31))
    if qf == 2**31:
        qf //= 2
        shift += 1
    if shift < -31:
        return 0, 0
    if single and shift > 30:
        return 2**31 - 1, 30
    return qf, shift


def _np_srdhm(a, b):
    ab = a.astype(np.int64) * np.int64(b)
    nudge = np.where(ab >= 0, 1 << 30, 1 - (1 << 30))
    n = ab + nudge
    q = np.abs(n) // (1 << 31) * np.sign(n)  # C++ division truncates
    return np.where((a == -(2**31)) & (b == -(2**31)), 2**31 - 1, q)


def _np_rdbpot(x, e):
    mask = (1 << e) - 1
    rem = x & mask
    thr = (mask >> 1) + (x < 0)
    return (x >> e) + (rem > thr)


def _np_mbqm(x, qm, shift, single):
    if single:
        t = 31 - shift
        return (x.astype(np.int64) * qm + (1 << (t - 1))) >> t
    left, right = max(shift, 0), max(-shift, 0)
    xl = ((x.astype(np.int64) << left) + 2**31) % 2**32 - 2**31  # int32 wrap
    return _np_rdbpot(_np_srdhm(xl, qm), right)


def _np_tflite_linear(x, zx, sx, w, sw, bias, so, zo, relu, single):
    acc = (x.astype(np.int64) - zx) @ w.astype(np.int64)
    n = w.shape[1]
    sw = np.broadcast_to(np.asarray(sw, np.float32), (n,))
    out = np.empty_like(acc)
    for c in range(n):
        a = acc[:, c]
        if bias is not None:
            sf = np.float32(sx) * sw[c]  # float32 product, as TFLite's converter
            inv = np.float32(1.0 / np.float64(sf))
            bq = _np_round_half_away(np.float32(bias[c]) * inv)
            a = a + int(np.clip(bq, -(2**31 - 1), 2**31 - 1))
        m = float(np.float64(sx) * np.float64(sw[c]) / np.float64(so))
        qm, shift = _np_quantize_multiplier(m, single)
        out[:, c] = _np_mbqm(a, qm, shift, single)
    lo = max(0, zo) if relu else 0
    return np.clip(out + zo, lo, 255)


@pytest.mark.parametrize("single", [False, True])
def test_tflite_linear_matches_numpy_int64_reference(single):
    rng = np.random.default_rng(19 + single)
    scheme = "tflite_single_rounding" if single else "tflite"
    n_out = 0
    for i in range(6):
        g = _group(rng, 25_000, per_channel=bool(i % 2), has_bias=i % 3 > 0, relu=i < 3)
        got = _jax_group(scheme, g)
        for j in range(g["b"]):
            sw = g["sw"][j] if g["per_channel"] else g["sw"][j, 0]
            bias = None if g["bias"] is None else g["bias"][j]
            want = _np_tflite_linear(
                g["x"][j],
                int(g["zx"][j]),
                g["sx"][j],
                g["w"][j],
                sw,
                bias,
                g["so"][j],
                int(g["zo"][j]),
                g["relu"],
                single,
            )
            np.testing.assert_array_equal(got[j], want)
            n_out += want.size
    assert n_out >= 100_000


# ----------------------------------------------------------------------------------------
# the accumulator on its own (unit output scale: codes = acc)


def _acc_via_unit_scales(x: QArray, w: QArray):
    out = QParams(1.0, 0, QuantSpec(bits=16, signed=True))
    ones = QParams(jnp.ones_like(w.scale), w.zero_point, w.spec)
    x1 = QArray(x.values, QParams(1.0, x.zero_point, x.spec))
    return quantized_linear(x1, QArray(w.values, ones), None, out, scheme="fbgemm").values


@pytest.mark.parametrize("signed_x", [False, True])
@pytest.mark.parametrize("wkind", ["sym_tensor", "zp_tensor", "zp_channel"])
def test_accumulator_is_exact(signed_x, wkind, rng):
    k, n = 37, 9  # odd K
    xs = QuantSpec(signed=signed_x)
    xv = rng.integers(xs.qmin, xs.qmax + 1, (2, 3, k)).astype(xs.dtype)  # batch dims
    zx = int(rng.integers(xs.qmin, xs.qmax + 1))
    wv = rng.integers(-128, 128, (k, n)).astype(np.int8)
    if wkind == "sym_tensor":
        wqp = QParams(1.0, 0, QuantSpec(symmetric=True))
        zw = np.zeros(n, np.int64)
    elif wkind == "zp_tensor":
        wqp = QParams(1.0, -17, QuantSpec())
        zw = np.full(n, -17)
    else:
        zw = rng.integers(-128, 128, n)
        wqp = QParams(jnp.ones(n), jnp.asarray(zw, jnp.int32), QuantSpec(axis=1))
    x = QArray(jnp.asarray(xv), QParams(1.0, zx, xs))
    w = QArray(jnp.asarray(wv), wqp)
    want = (xv.astype(np.int64) - zx) @ (wv.astype(np.int64) - zw)
    want = np.clip(want, -32768, 32767)
    got = np.asarray(_acc_via_unit_scales(x, w))
    np.testing.assert_array_equal(got, want)


# ----------------------------------------------------------------------------------------
# the program


def _eqns(jaxpr):
    for eqn in jaxpr.eqns:
        yield eqn
        for sub in jex.core.jaxprs_in_params(eqn.params):
            yield from _eqns(sub)


def _small_layer(signed_x=False, per_channel=True, k=16, n=8):
    rng = np.random.default_rng(0)
    xs = QuantSpec(signed=signed_x)
    x = QArray(
        jnp.asarray(rng.integers(xs.qmin, xs.qmax + 1, (4, k)).astype(xs.dtype)),
        QParams(0.05, 3, xs),
    )
    wspec = QuantSpec(symmetric=True, axis=1 if per_channel else None)
    ws = jnp.asarray(rng.uniform(0.01, 0.02, n), jnp.float32) if per_channel else 0.02
    wz = jnp.zeros(n, jnp.int32) if per_channel else 0
    w = prepare_linear(
        QArray(
            jnp.asarray(rng.integers(-127, 128, (k, n)).astype(np.int8)), QParams(ws, wz, wspec)
        ),
        name="fc",
    )
    b = jnp.asarray(rng.normal(0, 0.1, n), jnp.float32)
    return x, w, b, QParams(0.1, 128, QuantSpec(signed=False))


@pytest.mark.parametrize("scheme", ["fbgemm", "qnnpack", "onednn", "tflite"])
@pytest.mark.parametrize("signed_x", [False, True])
@pytest.mark.parametrize("per_channel", [False, True])
def test_program_has_only_int8_dots(scheme, signed_x, per_channel):
    x, w, b, out = _small_layer(signed_x, per_channel)
    fn = jax.jit(lambda x, w, b: quantized_linear(x, w, b, out, scheme=scheme, activation="relu"))
    eqns = list(_eqns(jax.make_jaxpr(fn)(x, w, b).jaxpr))
    dots = [e for e in eqns if e.primitive.name in ("dot_general", "conv_general_dilated")]
    assert len(dots) == 1
    for e in dots:
        assert [v.aval.dtype for v in e.invars] == [jnp.int8, jnp.int8], e
        assert e.outvars[0].aval.dtype == jnp.int32, e


def test_one_trace_per_shape_and_jit_equals_eager():
    x, w, b, out = _small_layer()
    traces = []

    def f(x, w, b):
        return quantized_linear(x, w, b, out, scheme="fbgemm")

    def counted(x, w, b):
        traces.append(x.shape)
        return f(x, w, b)

    jf = jax.jit(counted)
    y1 = jf(x, w, b)
    x2 = QArray(x.values[::-1], QParams(0.07, 200, x.spec))  # new values, same shape
    y2 = jf(x2, w, b)
    assert len(traces) == 1
    np.testing.assert_array_equal(y1.values, f(x, w, b).values)
    np.testing.assert_array_equal(y2.values, f(x2, w, b).values)
    jf(QArray(x.values[:2], x.qparams), w, b)
    assert len(traces) == 2


@pytest.mark.parametrize("scheme", ["fbgemm", "qnnpack", "onednn", "tflite"])
@pytest.mark.parametrize("per_channel", [False, True])
def test_constant_weights_give_the_same_codes(scheme, per_channel):
    # Weights and qparams baked into the program as constants let XLA/LLVM fold and
    # fuse float steps (reassociation, FMA); the codes must not change. A 16-bit output
    # with a small scale makes every rounding visible.
    rng = np.random.default_rng(8)
    k, n = 64, 64
    wspec = QuantSpec(symmetric=True, axis=1 if per_channel else None)
    ws = rng.uniform(0.002, 0.02, n).astype(np.float32) if per_channel else np.float32(0.013)
    wz = np.zeros(n, np.int32) if per_channel else np.int32(0)
    w = prepare_linear(
        QArray(
            jnp.asarray(rng.integers(-127, 128, (k, n)).astype(np.int8)),
            QParams(jnp.asarray(ws), jnp.asarray(wz), wspec),
        )
    )
    b = jnp.asarray(rng.normal(0, 0.3, n).astype(np.float32))
    out = QParams(np.float32(0.00123), -7, QuantSpec(bits=16))
    xq = QParams(np.float32(0.0371), 131, XSPEC)
    xv = jnp.asarray(rng.integers(0, 256, (512, k)).astype(np.uint8))

    def f(xv, w, b, xs, xz, os, oz):
        x = QArray(xv, QParams(xs, xz, XSPEC))
        o = QParams(os, oz, out.spec)
        return quantized_linear(x, w, b, o, scheme=scheme, activation="relu").values

    as_args = jax.jit(f)(xv, w, b, xq.scale, xq.zero_point, out.scale, out.zero_point)
    consts = jax.jit(lambda xv: f(xv, w, b, xq.scale, xq.zero_point, out.scale, out.zero_point))
    np.testing.assert_array_equal(consts(xv), as_args)
    assert np.unique(np.asarray(as_args)).size > 1000


@pytest.mark.parametrize("scheme", ["fbgemm", "qnnpack", "tflite"])
def test_batch_split_does_not_change_codes(scheme):
    rng = np.random.default_rng(3)
    _, w, b, out = _small_layer(k=40, n=12)
    xv = jnp.asarray(rng.integers(0, 256, (64, 40)).astype(np.uint8))
    xq = QParams(0.03, 131, XSPEC)
    run = jax.jit(lambda v: quantized_linear(QArray(v, xq), w, b, out, scheme=scheme).values)
    full = np.asarray(run(xv))
    parts = np.concatenate([np.asarray(run(xv[i : i + s])) for i, s in ((0, 1), (1, 7), (8, 56))])
    np.testing.assert_array_equal(full, parts)
    batched = np.asarray(run(xv.reshape(8, 8, 40))).reshape(64, 12)
    np.testing.assert_array_equal(full, batched)


def test_exact_scheme_within_one_code_of_fbgemm():
    g = _group(np.random.default_rng(5), 20_000, per_channel=True, has_bias=True, relu=False)
    exact = _jax_group("exact", g).astype(np.int64)
    fb = _jax_group("fbgemm", g).astype(np.int64)
    assert np.abs(exact - fb).max() <= 1


def test_export_roundtrip_with_qarray_and_prepared_weights():
    x, w, b, out = _small_layer()

    def f(x, w, b):
        return quantized_linear(x, w, b, out, scheme="tflite")

    exp = jax.export.export(jax.jit(f))(x, w, b)
    restored = jax.export.deserialize(exp.serialize())
    y = restored.call(x, w, b)
    assert isinstance(y, QArray) and y.spec == out.spec
    np.testing.assert_array_equal(y.values, f(x, w, b).values)


# ----------------------------------------------------------------------------------------
# bad input


def test_overflow_prone_layer_is_named():
    wv = jnp.full((70_000, 2), -128, jnp.int8)
    w = QArray(wv, QParams(0.1, 0, QuantSpec(symmetric=True)))
    with pytest.raises(ValueError, match=r"layer 'encoder.fc2'.*overflow.*K=70000"):
        prepare_linear(w, name="encoder.fc2")
    # a narrower activation range makes it safe
    assert isinstance(prepare_linear(w, name="ok", max_abs_x=128), PreparedLinear)


def test_bad_inputs_raise_with_names():
    x, w, b, out = _small_layer()
    uw = QArray(jnp.zeros((16, 8), jnp.uint8), QParams(0.1, 0, QuantSpec(signed=False)))
    with pytest.raises(TypeError, match=r"layer 'fc9'.*int8 weights, got uint8"):
        prepare_linear(uw, name="fc9")
    row = QArray(
        w.weight.values, QParams(jnp.ones(16), jnp.zeros(16, jnp.int32), QuantSpec(axis=0))
    )
    with pytest.raises(ValueError, match="per output channel"):
        prepare_linear(row)
    w15 = prepare_linear(QArray(w.weight.values[:15], w.weight.qparams), name="fc")
    with pytest.raises(ValueError, match=r"layer 'fc'.*shape \(4, 16\).*\(15, 8\)"):
        quantized_linear(x, w15, b, out)
    xc = QArray(
        x.values, QParams(jnp.ones(4), jnp.zeros(4, jnp.int32), QuantSpec(signed=False, axis=0))
    )
    with pytest.raises(ValueError, match="activation qparams must be per-tensor"):
        quantized_linear(xc, w, b, out)
    xi = QArray(x.values.astype(jnp.int8), QParams(0.1, 0, QuantSpec()))
    with pytest.raises(ValueError, match="fbgemm_sat16"):
        quantized_linear(xi, w, b, out, accumulate="fbgemm_sat16")
    with pytest.raises(ValueError, match="layer 'fc': unknown requantization scheme"):
        quantized_linear(x, w, b, out, scheme="float")
    with pytest.raises(ValueError, match="layer 'fc': unsupported fused activation 'gelu'"):
        quantized_linear(x, w, b, out, activation="gelu")
    with pytest.raises(TypeError, match="layer 'fc': requantize: bias must be floating"):
        quantized_linear(x, w, jnp.zeros(8, jnp.int32), out)
    with pytest.raises(TypeError, match="x must be a QArray"):
        quantized_linear(x.values, w, b, out)


@needs_torch
@pytest.mark.parametrize("act", ["relu6", "hardtanh"])
def test_linear_relu6_and_hardtanh_match_torch(act, torch_one_thread):
    """Fused relu6 / hardtanh == torch's quantized relu6 / hardtanh on the linear output."""
    import torch.ao.nn.quantized.functional as qF

    bounds = (-0.37, 0.81) if act == "hardtanh" else None
    rng = np.random.default_rng(66 + (act == "hardtanh"))
    n = mism = clamped = 0
    for i in range(40):
        # a few shapes (eager ops compile once per shape), fresh values and qparams each time
        k, m, nout = ((8, 1, 5), (37, 15, 23), (63, 4, 1), (16, 9, 12))[i % 4]
        xq = rng.integers(0, X_CODE_MAX + 1, (m, k)).astype(np.uint8)
        wq = rng.integers(-127, 128, (k, nout)).astype(np.int8)
        sx, sw = np.float32(rng.uniform(0.005, 0.05)), np.float32(rng.uniform(0.002, 0.02))
        so, zx, zo = (
            np.float32(rng.uniform(0.005, 0.03)),
            int(rng.integers(0, 256)),
            int(rng.integers(0, 256)),
        )
        b = (rng.standard_normal(nout) * 0.3).astype(np.float32)
        torch.backends.quantized.engine = "fbgemm"
        xt = torch._make_per_tensor_quantized_tensor(torch.from_numpy(xq), float(sx), zx)
        wt = torch._make_per_tensor_quantized_tensor(
            torch.from_numpy(np.ascontiguousarray(wq.T)), float(sw), 0
        )
        y = torch.ops.quantized.linear(
            xt, torch.ops.quantized.linear_prepack(wt, torch.from_numpy(b)), float(so), zo
        )
        ref = torch.ops.quantized.relu6(y) if act == "relu6" else qF.hardtanh(y, *bounds)
        ref = ref.int_repr().numpy()
        got = quantized_linear(
            QArray(jnp.asarray(xq), QParams(sx, zx, QuantSpec(signed=False))),
            QArray(jnp.asarray(wq), QParams(sw, 0, QuantSpec(signed=True, symmetric=True))),
            jnp.asarray(b),
            QParams(so, zo, QuantSpec(signed=False)),
            activation=act,
            bounds=bounds,
            accumulate=_choice("fbgemm")[1],  # torch's accumulation at this CPU level
        ).values
        n += ref.size
        mism += int((np.asarray(got) != ref).sum())
        clamped += int((ref != y.int_repr().numpy()).sum())
    assert mism == 0 and clamped > n // 10, (mism, clamped, n)


def test_linear_rejects_unknown_activation():
    x = QArray(jnp.zeros((1, 2), jnp.uint8), QParams(0.1, 0, QuantSpec(signed=False)))
    w = QArray(jnp.ones((2, 2), jnp.int8), QParams(0.1, 0, QuantSpec(symmetric=True)))
    with pytest.raises(ValueError, match=r"layer 'fc': unsupported fused activation 'gelu'"):
        quantized_linear(
            x, w, None, QParams(0.1, 0, QuantSpec(signed=False)), activation="gelu", name="fc"
        )
