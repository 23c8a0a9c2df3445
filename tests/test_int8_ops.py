"""Elementwise and pooling int8 kernels: bit-exact against PyTorch's quantized ops at run time.

Every op is compared with torch (pinned to one thread) on many small random cases, half of
them tie-heavy (power-of-two scales, codes near the zero point), stacked and run through
``jax.vmap`` per shape:

* ``quantized::add`` / ``add_relu``: engines fbgemm, x86, onednn (ATen kernel, rule 15;
  sizes 37, 1000, 2047, 3001, none a multiple of 64, so the scalar tail is exercised)
  and qnnpack (rule 16), quint8; qint8 on the ATen engines;
* ``quantized::mul`` / ``mul_relu`` (all four engines), ``quantized::mul_scalar``;
* ``quantized::cat``: the generic path (contiguous inputs, every axis) and the
  channels-last fast path (``dim=1``, ``nhwc_fast_path=True``);
* ``max_pool2d`` (engines fbgemm, qnnpack) / ``avg_pool2d`` / ``adaptive_avg_pool2d``
  (fbgemm, x86, onednn: ATen kernels; qnnpack) on contiguous and channels-last tensors
  (rule 17);
* ``relu`` / ``hardtanh`` (also ``(0, 6)``, ReLU6) on codes.

Negative controls show the emulated engine details matter: the add scalar tail, the
NHWC avg-pool channel split, the NHWC adaptive-pool fma path (1,314 of 507,656 outputs
differ from torch without it) and the channels-last cat kernel (the generic formula
misses 11,048 of 1,201,200).

Mismatch counts are printed (``pytest -s``); every count asserted is 0.
"""

from __future__ import annotations

import functools
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qjax import QParams, QuantSpec
from qjax.kernels import QArray
from qjax.kernels import engine as qengine
from qjax.kernels._elementwise import (
    dequantize_output,
    flatten,
    hardtanh,
    quantize_input,
    quantized_add,
    quantized_cat,
    quantized_mul,
    quantized_mul_scalar,
    relu,
    relu6,
    reshape,
)
from qjax.kernels._pool import adaptive_avg_pool2d, avg_pool2d, max_pool2d

torch = pytest.importorskip("torch")

U8 = QuantSpec(signed=False)
I8 = QuantSpec(signed=True)
COUNTS: dict[tuple[str, str], list[int]] = {}


@pytest.fixture(scope="module", autouse=True)
def torch_one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
    if COUNTS:
        print("\nint8 ops vs torch (outputs, mismatches):")
        for (op, eng), (n_out, mism) in sorted(COUNTS.items()):
            print(f"  {op:22s} {eng:8s} n={n_out:>9,} mismatches={mism}")


def _record(op, engine, out, ref):
    out, ref = np.asarray(out).astype(np.int64), np.asarray(ref).astype(np.int64)
    assert out.shape == ref.shape, (op, engine, out.shape, ref.shape)
    c = COUNTS.setdefault((op, engine), [0, 0])
    c[0] += out.size
    c[1] += int((out != ref).sum())
    return int((out != ref).sum())


def _qt(q, s, z, channels_last=False):
    t = torch._make_per_tensor_quantized_tensor(torch.from_numpy(np.ascontiguousarray(q)), s, z)
    return t.contiguous(memory_format=torch.channels_last) if channels_last else t


def _scales(rng, b, tie, lo=-6.0, hi=0.0):
    r = np.exp(rng.uniform(lo, hi, b))
    t = 2.0 ** rng.integers(int(lo), int(hi) + 1, b).astype(np.float64)
    return np.where(tie, t, r).astype(np.float32)


# ----------------------------------------------------------------------------------------
# add


@functools.partial(jax.jit, static_argnames=("scheme", "relu_", "spec"))
def _jax_add(av, bv, sa, za, sb, zb, so, zo, *, scheme, relu_, spec=U8):
    def one(av, bv, sa, za, sb, zb, so, zo):
        y = quantized_add(
            QArray(av, QParams(sa, za, spec)),
            QArray(bv, QParams(sb, zb, spec)),
            QParams(so, zo, spec),
            scheme=scheme,
            activation="relu" if relu_ else None,
        )
        return y.values

    return jax.vmap(one)(av, bv, sa, za, sb, zb, so, zo)


def _add_group(rng, n, b, signed=False):
    tie = rng.random(b) < 0.5
    sa = _scales(rng, b, tie)
    sb = _scales(rng, b, tie)
    # output scale within QNNPACK's limits: s_x/s_o in [2^-14, 2^8)
    so = (
        np.maximum(sa, sb)
        * np.where(tie, 2.0 ** rng.integers(-4, 3, b), np.exp(rng.uniform(-3, 2, b)))
    ).astype(np.float32)
    small = rng.random(b) < 0.3  # small codes around the zero point: many exact ties
    za, zb = rng.integers(0, 256, b), rng.integers(0, 256, b)
    a = np.where(
        small[:, None],
        np.clip(za[:, None] + rng.integers(-4, 5, (b, n)), 0, 255),
        rng.integers(0, 256, (b, n)),
    )
    bb = np.where(
        small[:, None],
        np.clip(zb[:, None] + rng.integers(-4, 5, (b, n)), 0, 255),
        rng.integers(0, 256, (b, n)),
    )
    zo = rng.integers(0, 255, b)
    if signed:  # the same cases shifted to qint8
        a, bb, za, zb, zo = a - 128, bb - 128, za - 128, zb - 128, zo - 128
    dt = np.int8 if signed else np.uint8
    return dict(a=a.astype(dt), b=bb.astype(dt), sa=sa, za=za, sb=sb, zb=zb, so=so, zo=zo)


ADD_GROUPS = [(37, 700), (1000, 130), (2047, 130), (3001, 60)]  # n mod 64 = 37, 40, 63, 57


@pytest.fixture(scope="module")
def add_groups():
    rng = np.random.default_rng(15)
    return [_add_group(rng, n, b) for n, b in ADD_GROUPS]


@pytest.mark.parametrize("engine", ["fbgemm", "x86", "onednn", "qnnpack"])
def test_add_matches_torch(engine, add_groups):
    if engine not in torch.backends.quantized.supported_engines:
        pytest.skip(f"engine {engine} not available")
    torch.backends.quantized.engine = engine
    total = 0
    for g in add_groups:
        for relu_ in (False, True):
            op = torch.ops.quantized.add_relu if relu_ else torch.ops.quantized.add
            ref = np.stack(
                [
                    op(
                        _qt(g["a"][i], float(g["sa"][i]), int(g["za"][i])),
                        _qt(g["b"][i], float(g["sb"][i]), int(g["zb"][i])),
                        float(g["so"][i]),
                        int(g["zo"][i]),
                    )
                    .int_repr()
                    .numpy()
                    for i in range(len(g["sa"]))
                ]
            )
            out = _jax_add(
                jnp.asarray(g["a"]),
                jnp.asarray(g["b"]),
                jnp.asarray(g["sa"]),
                jnp.asarray(g["za"], jnp.int32),
                jnp.asarray(g["sb"]),
                jnp.asarray(g["zb"], jnp.int32),
                jnp.asarray(g["so"]),
                jnp.asarray(g["zo"], jnp.int32),
                scheme=engine,
                relu_=relu_,
            )
            total += _record("add", engine, out, ref)
    n_out, _ = COUNTS[("add", engine)]
    assert n_out >= 1_000_000
    assert total == 0, COUNTS[("add", engine)]


@pytest.mark.parametrize("engine", ["fbgemm", "x86", "onednn"])
def test_add_qint8_matches_torch(engine):
    """qint8 inputs and output (ATen kernel; torch's qnnpack engine does not take them)."""
    torch.backends.quantized.engine = engine
    rng = np.random.default_rng(151)
    total = 0
    for n, b in ((37, 200), (1000, 40), (2047, 40)):
        g = _add_group(rng, n, b, signed=True)
        for relu_ in (False, True):
            op = torch.ops.quantized.add_relu if relu_ else torch.ops.quantized.add
            ref = np.stack(
                [
                    op(
                        _qt(g["a"][i], float(g["sa"][i]), int(g["za"][i])),
                        _qt(g["b"][i], float(g["sb"][i]), int(g["zb"][i])),
                        float(g["so"][i]),
                        int(g["zo"][i]),
                    )
                    .int_repr()
                    .numpy()
                    for i in range(b)
                ]
            )
            out = _jax_add(
                *(jnp.asarray(g[k]) for k in ("a", "b", "sa")),
                jnp.asarray(g["za"], jnp.int32),
                jnp.asarray(g["sb"]),
                jnp.asarray(g["zb"], jnp.int32),
                jnp.asarray(g["so"]),
                jnp.asarray(g["zo"], jnp.int32),
                scheme=engine,
                relu_=relu_,
                spec=I8,
            )
            total += _record("add[qint8]", engine, out, ref)
    assert COUNTS[("add[qint8]", engine)][0] >= 250_000
    assert total == 0, COUNTS[("add[qint8]", engine)]


def test_add_scalar_tail_matters(add_groups):
    """The ATen tail emulation is needed: with every element on the vector path
    (``tail=1``) or on the scalar path (``tail`` above the size) codes differ."""
    g = add_groups[1]
    args = [jnp.asarray(g[k]) for k in ("a", "b", "sa")] + [jnp.asarray(g["za"], jnp.int32)]
    args += [jnp.asarray(g["sb"]), jnp.asarray(g["zb"], jnp.int32), jnp.asarray(g["so"])]
    args += [jnp.asarray(g["zo"], jnp.int32)]

    def run(tail):
        def one(av, bv, sa, za, sb, zb, so, zo):
            return quantized_add(
                QArray(av, QParams(sa, za, U8)),
                QArray(bv, QParams(sb, zb, U8)),
                QParams(so, zo, U8),
                tail=tail,
            ).values

        return np.asarray(jax.jit(jax.vmap(one))(*args))

    default = run(64)
    assert (default != run(1)).sum() > 0
    assert (default != run(1 << 30)).sum() > 0


@functools.partial(jax.jit, static_argnames=("relu_",))
def _jax_mul(av, bv, sa, za, sb, zb, so, zo, *, relu_):
    def one(av, bv, sa, za, sb, zb, so, zo):
        return quantized_mul(
            QArray(av, QParams(sa, za, U8)),
            QArray(bv, QParams(sb, zb, U8)),
            QParams(so, zo, U8),
            activation="relu" if relu_ else None,
        ).values

    return jax.vmap(one)(av, bv, sa, za, sb, zb, so, zo)


@pytest.mark.parametrize("engine", ["fbgemm", "x86", "onednn", "qnnpack"])
def test_mul_matches_torch(engine, add_groups):
    torch.backends.quantized.engine = engine
    rng = np.random.default_rng(152)
    total = 0
    spread = []
    for g in add_groups:
        b = len(g["sa"])
        tie = g["sa"] == 2.0 ** np.round(np.log2(g["sa"]))
        grow = np.where(tie, 2.0 ** rng.integers(3, 12, b), np.exp(rng.uniform(2, 8, b)))
        so = (g["sa"] * g["sb"] * grow).astype(np.float32)
        for relu_ in (False, True):
            op = torch.ops.quantized.mul_relu if relu_ else torch.ops.quantized.mul
            ref = np.stack(
                [
                    op(
                        _qt(g["a"][i], float(g["sa"][i]), int(g["za"][i])),
                        _qt(g["b"][i], float(g["sb"][i]), int(g["zb"][i])),
                        float(so[i]),
                        int(g["zo"][i]),
                    )
                    .int_repr()
                    .numpy()
                    for i in range(b)
                ]
            )
            out = _jax_mul(
                *(jnp.asarray(g[k]) for k in ("a", "b", "sa")),
                jnp.asarray(g["za"], jnp.int32),
                jnp.asarray(g["sb"]),
                jnp.asarray(g["zb"], jnp.int32),
                jnp.asarray(so),
                jnp.asarray(g["zo"], jnp.int32),
                relu_=relu_,
            )
            total += _record("mul", engine, out, ref)
            spread.append(np.mean((ref > 0) & (ref < 255)))
    assert np.mean(spread) > 0.5, spread  # not dominated by clamped codes
    assert COUNTS[("mul", engine)][0] >= 1_000_000
    assert total == 0, COUNTS[("mul", engine)]


# ----------------------------------------------------------------------------------------
# cat, mul_scalar, clamps


@functools.partial(jax.jit, static_argnames=("axis",))
def _jax_cat(vs, ss, zs, so, zo, *, axis):
    def one(vs, ss, zs, so, zo):
        xs = [QArray(v, QParams(s, z, U8)) for v, s, z in zip(vs, ss, zs, strict=True)]
        return quantized_cat(xs, axis, QParams(so, zo, U8)).values

    return jax.vmap(one)(vs, ss, zs, so, zo)


def test_cat_matches_torch():
    rng = np.random.default_rng(16)
    torch.backends.quantized.engine = "fbgemm"
    mism = 0
    for axis, b in ((0, 70), (1, 70), (2, 70), (3, 70)):
        shapes = []
        for _ in range(3):
            sh = [3, 5, 9, 11]
            sh[axis] = int(rng.integers(1, 9))
            shapes.append(tuple(sh))
        tie = rng.random((3, b)) < 0.5
        ss = [_scales(rng, b, tie[i]) for i in range(3)]
        zs = [rng.integers(0, 256, b) for _ in range(3)]
        vs = [rng.integers(0, 256, (b, *sh)).astype(np.uint8) for sh in shapes]
        # some inputs share the output qparams (torch's pass-through case)
        so = np.where(rng.random(b) < 0.2, ss[0], _scales(rng, b, tie[0])).astype(np.float32)
        zo = np.where(so == ss[0], zs[0], rng.integers(0, 256, b))
        ref = np.stack(
            [
                torch.ops.quantized.cat(
                    [_qt(vs[j][i], float(ss[j][i]), int(zs[j][i])) for j in range(3)],
                    axis,
                    float(so[i]),
                    int(zo[i]),
                )
                .int_repr()
                .numpy()
                for i in range(b)
            ]
        )
        out = _jax_cat(
            [jnp.asarray(v) for v in vs],
            [jnp.asarray(s) for s in ss],
            [jnp.asarray(z, jnp.int32) for z in zs],
            jnp.asarray(so),
            jnp.asarray(zo, jnp.int32),
            axis=axis,
        )
        mism += _record("cat", "any", out, ref)
    assert COUNTS[("cat", "any")][0] >= 1_000_000
    assert mism == 0


@jax.jit
def _jax_cat_nhwc(vs, ss, zs, so, zo):
    def one(vs, ss, zs, so, zo):
        xs = [QArray(v, QParams(s, z, U8)) for v, s, z in zip(vs, ss, zs, strict=True)]
        return quantized_cat(xs, -1, QParams(so, zo, U8), nhwc_fast_path=True).values

    return jax.vmap(one)(vs, ss, zs, so, zo)


def test_cat_channels_last_matches_torch():
    """torch's channels-last fast path (dim=1 of 4-d channels-last tensors)."""
    rng = np.random.default_rng(161)
    torch.backends.quantized.engine = "fbgemm"
    mism = 0
    for b in (50, 50, 50, 50):
        cs = [int(rng.integers(1, 41)) for _ in range(3)]
        tie = rng.random((3, b)) < 0.5
        ss = [_scales(rng, b, tie[i]) for i in range(3)]
        zs = [rng.integers(0, 256, b) for _ in range(3)]
        vs = [rng.integers(0, 256, (b, 2, c, 6, 7)).astype(np.uint8) for c in cs]
        same = rng.random(b) < 0.2  # input 0 shares the output qparams: copied
        so = np.where(same, ss[0], _scales(rng, b, tie[0])).astype(np.float32)
        zo = np.where(same, zs[0], rng.integers(0, 256, b))
        ref = np.stack(
            [
                torch.ops.quantized.cat(
                    [
                        _qt(vs[j][i], float(ss[j][i]), int(zs[j][i]), channels_last=True)
                        for j in range(3)
                    ],
                    1,
                    float(so[i]),
                    int(zo[i]),
                )
                .int_repr()
                .numpy()
                for i in range(b)
            ]
        )
        out = _jax_cat_nhwc(
            [jnp.asarray(v.transpose(0, 1, 3, 4, 2)) for v in vs],
            [jnp.asarray(s) for s in ss],
            [jnp.asarray(z, jnp.int32) for z in zs],
            jnp.asarray(so),
            jnp.asarray(zo, jnp.int32),
        )
        out = np.asarray(out).transpose(0, 1, 4, 2, 3)
        mism += _record("cat[channels_last]", "any", out, ref)
        generic = np.asarray(
            _jax_cat(
                [jnp.asarray(v) for v in vs],
                [jnp.asarray(s) for s in ss],
                [jnp.asarray(z, jnp.int32) for z in zs],
                jnp.asarray(so),
                jnp.asarray(zo, jnp.int32),
                axis=1,
            )
        )
        _record("cat[channels_last]-generic-control", "any", generic, ref)
    assert COUNTS[("cat[channels_last]", "any")][0] >= 1_000_000
    assert mism == 0
    assert COUNTS[("cat[channels_last]-generic-control", "any")][1] > 0


def test_mul_scalar_matches_torch():
    rng = np.random.default_rng(17)
    torch.backends.quantized.engine = "fbgemm"
    for c in (2.5, 0.37, 0.0, -1.0, -0.3):
        for spec, dt in ((U8, np.uint8), (I8, np.int8)):
            q = rng.integers(spec.qmin, spec.qmax + 1, 20_000).astype(dt)
            s, z = float(np.float32(0.03)), int(rng.integers(spec.qmin, spec.qmax + 1))
            ref = torch.ops.quantized.mul_scalar(_qt(q, s, z), c)
            y = quantized_mul_scalar(QArray(jnp.asarray(q), QParams(s, z, spec)), c)
            assert _record("mul_scalar", "any", y.values, ref.int_repr().numpy()) == 0
            assert int(y.zero_point) == ref.q_zero_point()
            assert np.float32(y.scale) == np.float32(ref.q_scale())


def test_relu_hardtanh_match_torch():
    rng = np.random.default_rng(18)
    for it in range(60):
        spec, dt = (U8, np.uint8) if it % 2 else (I8, np.int8)
        q = rng.integers(spec.qmin, spec.qmax + 1, (4, 4200)).astype(dt)
        tie = it % 3 == 0
        s = float(
            2.0 ** -int(rng.integers(1, 8)) if tie else np.float32(np.exp(rng.uniform(-6, 0)))
        )
        z = int(rng.integers(spec.qmin, spec.qmax + 1))
        t = _qt(q, s, z)
        x = QArray(jnp.asarray(q), QParams(s, z, spec))
        _record("relu", "any", relu(x).values, torch.nn.functional.relu(t).int_repr().numpy())
        lo, hi = sorted(rng.uniform(-3, 3, 2).tolist())
        if tie:
            lo, hi = (rng.integers(-40, 0) + 0.5) * s, (rng.integers(0, 40) + 0.5) * s
        ref = torch.nn.functional.hardtanh(t, lo, hi).int_repr().numpy()
        _record("hardtanh", "any", hardtanh(x, lo, hi).values, ref)
        ref6 = torch.nn.functional.hardtanh(t, 0.0, 6.0).int_repr().numpy()
        _record("relu6", "any", relu6(x).values, ref6)
    for op in ("relu", "hardtanh", "relu6"):
        assert COUNTS[(op, "any")][0] >= 1_000_000
        assert COUNTS[(op, "any")][1] == 0, (op, COUNTS[(op, "any")])


# ----------------------------------------------------------------------------------------
# pooling

POOL_CONFIGS = [  # (shape NCHW, kwargs)
    ((2, 37, 13, 11), dict(kernel_size=3, stride=2, padding=1, ceil_mode=True)),
    ((2, 37, 13, 11), dict(kernel_size=(2, 3), stride=(1, 2), padding=(1, 0))),
    ((2, 21, 8, 9), dict(kernel_size=2, stride=2, count_include_pad=False, padding=1)),
    ((2, 21, 8, 9), dict(kernel_size=3, stride=1, padding=1, divisor_override=5)),
    ((1, 45, 9, 10), dict(kernel_size=(3, 2), stride=(2, 1), padding=(1, 1))),
]
# C = 45: channels 32..39 are "vector" for the adaptive kernel (block 8), scalar for avg (16)
ADAPTIVE_CONFIGS = [
    ((2, 45, 13, 11), (7, 6)),
    ((2, 21, 8, 9), (4, 3)),
    ((2, 37, 16, 12), (8, 6)),
    ((4, 40, 7, 10), (3, 4)),  # small uneven windows: where fma and two roundings differ
    ((4, 40, 11, 5), (4, 2)),
]


_MAX_KW = ("kernel_size", "stride", "padding", "ceil_mode")


def _pool_cases(rng, shape, b, signed):
    spec = I8 if signed else U8
    tie = rng.random(b) < 0.5
    s = _scales(rng, b, tie)
    z = rng.integers(spec.qmin, spec.qmax + 1, b)
    q = rng.integers(spec.qmin, spec.qmax + 1, (b, *shape)).astype(spec.dtype)
    return spec, q, s, z


@functools.partial(jax.jit, static_argnames=("fn", "spec", "layout", "kw"))
def _jax_pool(q, s, z, *, fn, spec, layout, kw):
    kwargs = dict(kw)

    def one(q, s, z):
        return fn(QArray(q, QParams(s, z, spec)), layout=layout, **kwargs).values

    return jax.vmap(one)(q, s, z)


def _run_pool(op, fn, torch_fn, configs, engines, b, seed):
    rng = np.random.default_rng(seed)
    for ci, (shape, kw) in enumerate(configs):
        for cl in (False, True):
            for engine in engines:
                torch.backends.quantized.engine = engine
                signed = engine != "qnnpack" and ci % 2 == 1
                spec, q, s, z = _pool_cases(rng, shape, b, signed)
                ref = []
                for i in range(b):
                    t = _qt(q[i], float(s[i]), int(z[i]), channels_last=cl)
                    ref.append(torch_fn(t, kw).int_repr().numpy())
                ref = np.stack(ref)
                layout = "NHWC" if cl else "NCHW"
                qj = jnp.asarray(q.transpose(0, 1, 3, 4, 2) if cl else q)
                kwj = dict(kw) if isinstance(kw, dict) else dict(output_size=kw)
                if fn is max_pool2d:
                    kwj = {k: v for k, v in kwj.items() if k in _MAX_KW}
                else:
                    kwj["scheme"] = engine
                if fn is avg_pool2d and cl:  # ATen's channel block: this CPU's vector width
                    kwj["nhwc_block"] = qengine(engine).avg_pool_block
                out = np.asarray(
                    _jax_pool(
                        qj,
                        jnp.asarray(s),
                        jnp.asarray(z, jnp.int32),
                        fn=fn,
                        spec=spec,
                        layout=layout,
                        kw=tuple(sorted(kwj.items())),
                    )
                )
                if cl:
                    out = out.transpose(0, 1, 4, 2, 3)
                _record(f"{op}[{layout}]", engine, out, ref)
                if cl and fn is adaptive_avg_pool2d and engine == "fbgemm":
                    # negative control: every channel on the scalar path (no fma)
                    kwj["nhwc_block"] = 1 << 20
                    alt = _jax_pool(
                        qj,
                        jnp.asarray(s),
                        jnp.asarray(z, jnp.int32),
                        fn=fn,
                        spec=spec,
                        layout=layout,
                        kw=tuple(sorted(kwj.items())),
                    )
                    alt = np.asarray(alt).transpose(0, 1, 4, 2, 3)
                    _record(f"{op}-one-path-control", engine, alt, ref)


def _assert_pool(op, n_min):
    for (o, e), (n, m) in COUNTS.items():
        if o.startswith(op + "["):
            assert n >= n_min, (o, e, n)
            assert m == 0, (o, e, n, m)


def test_max_pool2d_matches_torch():
    def tf(t, kw):
        kw = {k: v for k, v in kw.items() if k in _MAX_KW}
        return torch.nn.functional.max_pool2d(t, **kw)

    _run_pool("max_pool2d", max_pool2d, tf, POOL_CONFIGS, ["fbgemm", "qnnpack"], 45, 20)
    _assert_pool("max_pool2d", 500_000)


def test_avg_pool2d_matches_torch():
    _run_pool(
        "avg_pool2d",
        avg_pool2d,
        lambda t, kw: torch.nn.functional.avg_pool2d(t, **kw),
        POOL_CONFIGS,
        ["fbgemm", "x86", "onednn", "qnnpack"],
        40,
        21,
    )
    _assert_pool("avg_pool2d", 500_000)


def test_adaptive_avg_pool2d_matches_torch():
    _run_pool(
        "adaptive_avg_pool2d",
        adaptive_avg_pool2d,
        lambda t, o: torch.nn.functional.adaptive_avg_pool2d(t, o),
        ADAPTIVE_CONFIGS,
        ["fbgemm", "x86", "onednn", "qnnpack"],
        46,
        22,
    )
    _assert_pool("adaptive_avg_pool2d", 500_000)
    n_alt, m_alt = COUNTS[("adaptive_avg_pool2d-one-path-control", "fbgemm")]
    assert m_alt > 0, "the NHWC fma path was not exercised"


# ----------------------------------------------------------------------------------------
# shape ops and boundaries


def test_reshape_flatten_and_boundaries():
    rng = np.random.default_rng(23)
    x = rng.normal(0, 2, (3, 4, 5, 6)).astype(np.float32)
    qp = QParams(np.float32(0.037), 131, U8)
    q = quantize_input(jnp.asarray(x), qp)
    t = torch.quantize_per_tensor(torch.from_numpy(x), 0.037, 131, torch.quint8)
    assert np.array_equal(np.asarray(q.values), t.int_repr().numpy())
    assert np.array_equal(np.asarray(dequantize_output(q)), t.dequantize().numpy())
    f = flatten(q)
    assert f.shape == (3, 120)
    assert np.array_equal(np.asarray(f.values), torch.flatten(t, 1).int_repr().numpy())
    assert reshape(q, (12, 30)).shape == (12, 30)
    with pytest.raises(ValueError):
        quantized_add(q, reshape(q, (12, 30)), qp)


def test_jit_equals_eager_and_bad_input():
    rng = np.random.default_rng(24)
    a = QArray(jnp.asarray(rng.integers(0, 256, 333).astype(np.uint8)), QParams(0.02, 100, U8))
    b = QArray(jnp.asarray(rng.integers(0, 256, 333).astype(np.uint8)), QParams(0.03, 90, U8))
    out = QParams(0.05, 128, U8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for scheme in ("fbgemm", "qnnpack", "exact"):
            e = quantized_add(a, b, out, scheme=scheme).values
            j = jax.jit(functools.partial(quantized_add, scheme=scheme))(a, b, out).values
            assert np.array_equal(np.asarray(e), np.asarray(j))
    with pytest.raises(ValueError, match="unknown scheme"):
        quantized_add(a, b, out, scheme="nope")
    with pytest.raises(TypeError, match="qnnpack"):
        s8 = QArray(jnp.zeros(333, jnp.int8), QParams(0.1, 0, I8))
        quantized_add(s8, s8, out, scheme="qnnpack")
    with pytest.raises(ValueError, match="layout"):
        avg_pool2d(QArray(jnp.zeros((1, 1, 2, 2), jnp.uint8), QParams(0.1, 0, U8)), 2, layout="HWC")


def test_pool_rounding_paths_matter():
    """Negative control: the per-channel path split of the NHWC avg-pool kernel is needed
    (with every channel on one path the codes differ), and NCHW and NHWC round differently.
    (The adaptive kernel's control runs against torch in its own test.)"""
    rng = np.random.default_rng(25)
    q = rng.integers(0, 256, (2, 13, 11, 45)).astype(np.uint8)
    x = QArray(jnp.asarray(q), QParams(0.1, 77, U8))  # odd zero point: ties differ
    kw = dict(kernel_size=2, stride=2, padding=1, count_include_pad=False)  # ties: d = 2, 4
    nhwc = np.asarray(avg_pool2d(x, layout="NHWC", **kw).values)
    one_path = np.asarray(avg_pool2d(x, layout="NHWC", nhwc_block=1 << 20, **kw).values)
    xc = QArray(jnp.asarray(q.transpose(0, 3, 1, 2)), x.qparams)
    nchw = np.asarray(avg_pool2d(xc, **kw).values).transpose(0, 2, 3, 1)
    assert (nhwc != one_path).sum() > 0
    assert (nhwc != nchw).sum() > 0


_POOL_SUBPROCESS = r"""
import sys
import numpy as np
import torch
torch.set_num_threads(1)
data = dict(np.load(sys.argv[1]))
out = {}
for ci in range(int(data["n"])):
    q, s, z = data[f"q{ci}"], data[f"s{ci}"], data[f"z{ci}"]
    kw = dict(kernel_size=3, stride=2, padding=1, count_include_pad=bool(ci % 2))
    ys = []
    for i in range(q.shape[0]):
        t = torch._make_per_tensor_quantized_tensor(torch.from_numpy(q[i]), float(s[i]), int(z[i]))
        t = t.contiguous(memory_format=torch.channels_last)
        ys.append(torch.nn.functional.avg_pool2d(t, **kw).int_repr().contiguous().numpy())
    out[f"y{ci}"] = np.stack(ys)
np.savez(sys.argv[2], **out)
"""


def test_avg_pool2d_nhwc_at_lower_levels_matches_torch_forced_to_them(tmp_path):
    """ATen's NHWC average pool takes its channel block from the vector width: torch forced
    to each lower level (``level_env`` in a subprocess) against the table's block; the
    other block differs (channel counts 21, 37, 45 put channels in one block only)."""
    import os
    import subprocess
    import sys

    from qjax.kernels import LEVELS, host_level, level_env

    here = host_level()
    if here is None:
        pytest.skip("x86 only")
    rng = np.random.default_rng(31)
    shapes = [(2, 21, 8, 9), (2, 37, 13, 11), (1, 45, 9, 10), (2, 21, 8, 9)]
    arrays = {"n": np.array(len(shapes))}
    cases = []
    for ci, shape in enumerate(shapes):
        spec, q, s, z = _pool_cases(rng, shape, 24, signed=bool(ci % 2))
        cases.append((spec, q, s, z))
        arrays.update({f"q{ci}": q, f"s{ci}": s, f"z{ci}": z})
    src = tmp_path / "cases.npz"
    np.savez(src, **arrays)
    checked = 0
    for level in ("avx2", "avx512"):
        if LEVELS.index(here) < LEVELS.index(level):
            continue  # this CPU cannot run it
        dst = tmp_path / f"{level}.npz"
        env = dict(os.environ, OMP_NUM_THREADS="1", **level_env(level))
        proc = subprocess.run(
            [sys.executable, "-c", _POOL_SUBPROCESS, str(src), str(dst)],
            env=env, capture_output=True, text=True, timeout=300,
        )  # fmt: skip
        assert proc.returncode == 0, proc.stderr[-3000:]
        ref = dict(np.load(dst))
        block = qengine("fbgemm", level).avg_pool_block
        n = mism = other_mism = 0
        for ci, (spec, q, s, z) in enumerate(cases):
            kw = dict(kernel_size=3, stride=2, padding=1, count_include_pad=bool(ci % 2))
            r = ref[f"y{ci}"].astype(np.int64)
            for b, count in ((block, "mine"), (24 - block, "other")):
                kwj = tuple(sorted({**kw, "scheme": "fbgemm", "nhwc_block": b}.items()))
                got = _jax_pool(jnp.asarray(q.transpose(0, 1, 3, 4, 2)), jnp.asarray(s),
                                jnp.asarray(z, jnp.int32), fn=avg_pool2d, spec=spec,
                                layout="NHWC", kw=kwj)  # fmt: skip
                got = np.asarray(got).transpose(0, 1, 4, 2, 3).astype(np.int64)
                if count == "mine":
                    n += r.size
                    mism += int((got != r).sum())
                else:
                    other_mism += int((got != r).sum())
        print(f"\navg_pool2d NHWC at {level} (block {block}): {n} codes, {mism} mismatches; "
              f"block {24 - block}: {other_mism} mismatches")  # fmt: skip
        assert n > 50_000 and mism == 0
        assert other_mism > 0  # the block matters: the check can fail
        checked += 1
    assert checked >= 1
