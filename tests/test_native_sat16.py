"""The native AVX2 int16-saturating kernel (``kernel="sat16"``) gives the XLA formulation's
integers, and torch's forced to AVX2.

* linear: ``sat16_dot`` vs ``_sat16_pair_dot`` (the XLA formulation) over every M tail
  (register blocks of 4 rows), K tail (groups of 4, K odd, K = 1) and N tail (blocks of
  16 columns), random and extreme codes (x in {0, 1, 127, 128, 254, 255}, w in {-128,
  -127, -1, 0, 1, 127}), leading / vmapped dims and the two-thread split;
* conv: ``_sat16_conv(native=True)`` vs the XLA im2col formulation: groups, depthwise,
  odd channels per group, stride, dilation, 1-D and 2-D, both pairings (FBGEMM across
  taps, oneDNN per tap) and whole ``quantized_conv`` layers;
* kernel choice: ``import_model``'s default puts saturating layers on ``"sat16"``,
  ``kernel="xla"`` keeps them on XLA (exportable), ``jax.export`` of the native program
  is refused with a message naming ``kernel='xla'``;
* fused conv: a saturating conv with one group in one call (FBGEMM's pairs, the patches
  read in place where C % 4 == 0; oneDNN's, read in place, the zero-point term over the
  valid taps), folded or not, every code path and under vmap == the XLA formulation;
* end to end: a torch int8 MLP and CNN (the CNN on fbgemm only in the default run) run
  by torch forced to AVX2 (``level_env``) in a subprocess, imported with ``isa=None``
  (the level the switches set, the x86 conv routing of this CPU's flags): the native
  program's codes == torch's (oneDNN: rule 13's 1-LSB epilogue differences, at most
  1e-4 of the codes).

Counts are printed (``-s``).
"""

from __future__ import annotations

import functools
import os
import platform
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import qjax
from qjax import QParams, QuantSpec
from qjax.kernels import (
    LEVELS,
    QArray,
    _native,
    host_level,
    level_env,
    prepare_conv,
    prepare_linear,
    quantized_conv,
    quantized_linear,
    sat16_status,
)
from qjax.kernels._accumulate import _sat16_conv, _sat16_pair_dot, _u8_dot, sat16_exact_max_x
from qjax.kernels._native import _sat16

pytestmark = pytest.mark.skipif(not sat16_status()[0], reason=sat16_status()[1])

X_EXTREME = np.array([0, 1, 127, 128, 254, 255], np.uint8)
W_EXTREME = np.array([-128, -127, -1, 0, 1, 127], np.int8)
XSPEC = QuantSpec(signed=False)
WSPEC = QuantSpec(signed=True, symmetric=True, axis=1)


@pytest.fixture
def rng():
    return np.random.default_rng(1612)


def _codes(rng, shape_x, shape_w, extreme):
    if extreme:
        return rng.choice(X_EXTREME, shape_x), rng.choice(W_EXTREME, shape_w)
    x = rng.integers(0, 256, shape_x).astype(np.uint8)
    w = rng.integers(-128, 128, shape_w).astype(np.int8)
    return x, w


_xla_pair_dot = jax.jit(_sat16_pair_dot)


def _native_dot(x, w, threads=None):
    packed = _sat16.pack_sat16_weight(jnp.asarray(w))
    return _sat16.sat16_dot(jnp.asarray(x), packed, jnp.asarray(w), _sat16_pair_dot, threads)


def _sweep(rng, ks, ns, ms):
    n = mism = 0
    for i, k in enumerate(ks):
        for j, nn in enumerate(ns):
            m = ms[(i + j) % len(ms)]
            x, w = _codes(rng, (m, k), (k, nn), extreme=(i + j) % 2 == 0)
            got = np.asarray(_native_dot(x, w))
            want = np.asarray(_xla_pair_dot(x, w))
            n += want.size
            mism += int((got != want).sum())
    return n, mism


def test_linear_every_tail_matches_xla(rng):
    # K mod 4 = 1, 3, 0, 2 (K odd, K = 1); N mod 16 = 1, 15, 0, 1; M mod 4 = 1, 2, 3, 0
    ks, ns, ms = (1, 3, 4, 6, 33), (1, 15, 16, 17), (1, 2, 3, 4, 5, 7)
    n, mism = _sweep(rng, ks, ns, ms)
    # saturation happened (a sanity check on the inputs): exact sums differ somewhere
    x, w = _codes(rng, (4, 64), (64, 16), extreme=True)
    exact = x.astype(np.int64) @ w.astype(np.int64)
    assert (exact != np.asarray(_native_dot(x, w))).any()
    print(f"\nlinear sat16 native vs XLA: {len(ks) * len(ns)} shapes, {n} values, {mism} differ")
    assert mism == 0


@pytest.mark.slow
def test_linear_every_tail_matches_xla_full(rng):
    ks = (1, 2, 3, 4, 5, 6, 7, 8, 33, 130, 785)
    ns = (1, 7, 8, 9, 15, 16, 17, 31, 33)
    ms = (1, 2, 3, 4, 5, 6, 7, 8, 9, 13)
    n, mism = _sweep(rng, ks, ns, ms)
    print(f"\nlinear sat16 native vs XLA: {len(ks) * len(ns)} shapes, {n} values, {mism} differ")
    assert mism == 0


def test_linear_leading_dims_vmap_and_threads(rng):
    x, w = _codes(rng, (2, 3, 5, 37), (37, 40), extreme=True)
    want = np.asarray(_xla_pair_dot(x, w))
    assert (np.asarray(_native_dot(x, w)) == want).all()  # leading dims fold into M
    packed = _sat16.pack_sat16_weight(jnp.asarray(w))
    f = jax.vmap(lambda xi: _sat16.sat16_dot(xi, packed, jnp.asarray(w), _sat16_pair_dot))
    assert (np.asarray(f(jnp.asarray(x))) == want).all()
    # large enough for the two-thread split; one thread gives the same integers
    x, w = _codes(rng, (130, 515), (515, 257), extreme=False)
    before = _sat16.parallel_calls()
    two = np.asarray(_native_dot(x, w, threads=2))
    assert _sat16.parallel_calls() == before + 1
    one = np.asarray(_native_dot(x, w, threads=1))
    assert _sat16.parallel_calls() == before + 1
    want = np.asarray(_xla_pair_dot(x, w))
    assert (two == want).all() and (one == want).all()
    print(f"\nthreads 1 / 2 vs XLA: 0 of {want.size} differ")


def _pair_sums(x, w):
    """int64 ``(M, K/2, N)`` pair sums before saturation (K even)."""
    x, w = x.astype(np.int64), w.astype(np.int64)
    return x[:, 0::2, None] * w[None, 0::2] + x[:, 1::2, None] * w[None, 1::2]


def test_every_isa_path_matches_xla(rng):
    # each code path this CPU has (AVX2; AVX-512BW with vpmaddwd + vpaddd; AVX-512 VNNI
    # with vpdpwssd), forced per call: M over the 4-row blocks and tails, N over odd and
    # even counts of 16-column blocks (the AVX-512 path takes two at a time) and partial
    # blocks, K tails; full-range random codes, so many pair sums saturate
    isas = _sat16.sat16_isas()
    assert isas[0] == "avx2"
    print(f"\ncode paths here: {isas}")
    n = sat = 0
    for m, k, nn in [(1, 64, 16), (3, 66, 33), (5, 130, 50), (9, 7, 31)]:
        x = rng.integers(0, 256, (m, k)).astype(np.uint8)
        w = rng.integers(-128, 128, (k, nn)).astype(np.int8)
        want = np.asarray(_xla_pair_dot(x, w))
        if k % 2 == 0:
            sat += int((np.abs(_pair_sums(x, w)) > 32767).sum())
        packed = _sat16.pack_sat16_weight(jnp.asarray(w))
        for isa in isas:
            got = _sat16.sat16_dot(jnp.asarray(x), packed, jnp.asarray(w), _sat16_pair_dot, isa=isa)
            assert (np.asarray(got) == want).all(), (isa, m, k, nn)
        n += want.size
    # the operands did saturate: the exact sums differ from the saturated ones
    assert sat > 500
    print(f"every path == XLA on {n} values ({sat} pair sums saturated)")


def test_isa_switch_and_refusal(monkeypatch):
    isas = _sat16.sat16_isas()
    monkeypatch.setenv(_sat16.ISA_ENV, "avx2")
    assert _sat16.sat16_isa() == "avx2"
    monkeypatch.setenv(_sat16.ISA_ENV, "avx512_vnni")  # never above what the CPU has
    assert _sat16.sat16_isa() == isas[-1]
    monkeypatch.setenv(_sat16.ISA_ENV, "sse2")
    with pytest.raises(ValueError, match="QJAX_SAT16_ISA='sse2'"):
        _sat16.sat16_isa()
    missing = [i for i in _sat16.SAT16_ISAS if i not in isas]
    if missing:  # the library refuses a path the CPU lacks
        w = jnp.ones((4, 16), jnp.int8)
        with pytest.raises(Exception, match="not supported by this CPU"):
            x = jnp.ones((1, 4), jnp.uint8)
            packed = _sat16.pack_sat16_weight(w)
            _sat16.sat16_dot(x, packed, w, _sat16_pair_dot, isa=missing[0]).block_until_ready()


def test_quantized_linear_layer_matches_xla(rng):
    k, nn = 45, 33
    x = QArray(jnp.asarray(rng.integers(96, 256, (3, 7, k)), jnp.uint8), QParams(0.02, 131, XSPEC))
    wv = jnp.asarray(rng.choice(W_EXTREME, (k, nn)))
    wz = QArray(wv, QParams(jnp.full((nn,), 0.01), jnp.zeros((nn,), jnp.int32), WSPEC))
    aff = QuantSpec(signed=True, axis=1)  # per-channel affine: the zp_w terms too
    wa = QArray(wv, QParams(jnp.full((nn,), 0.01), jnp.asarray(rng.integers(-5, 5, nn)), aff))
    out = QParams(jnp.float32(0.4), jnp.int32(120), XSPEC)
    bias = jnp.asarray(rng.normal(0, 3, nn), jnp.float32)
    n = 0
    for w in (wz, wa):
        xla, nat = prepare_linear(w), prepare_linear(w, kernel="sat16")
        assert nat.kernel == "sat16" and prepare_linear(xla, kernel="sat16").kernel == "sat16"
        for acc in ("fbgemm_sat16", "onednn_sat16"):
            want = quantized_linear(x, xla, bias, out, accumulate=acc, activation="relu").values
            got = jax.jit(
                lambda x, p, acc=acc: quantized_linear(x, p, bias, out, accumulate=acc).values
            )(x, nat)
            want = quantized_linear(x, xla, bias, out, accumulate=acc).values
            assert (np.asarray(got) == np.asarray(want)).all()
            n += want.size
        # exact accumulation with a sat16-prepared weight stays on XLA, same codes
        same = quantized_linear(x, nat, bias, out).values
        assert (np.asarray(same) == np.asarray(quantized_linear(x, xla, bias, out).values)).all()
    # the pytree round-trips with the kernel and its packed leaf
    leaves, tree = jax.tree_util.tree_flatten(nat)
    assert len(leaves) == 5 and jax.tree_util.tree_unflatten(tree, leaves).kernel == "sat16"
    print(f"\nquantized_linear sat16 vs xla: 0 of {n} codes differ")


def _epilogue(rng, n, kind, signed):
    """Random epilogue vectors of ``n`` columns: ``kind`` 0 (fbgemm / qnnpack: clamp (2,))
    or 1 (onednn: clamp (5,)); NaN, infinite and huge bias terms among them."""
    ivec = jnp.asarray(rng.integers(-40_000, 40_000, n), jnp.int32)
    fvec = rng.normal(0, 300, n).astype(np.float32)
    fvec[: min(n, 3)] = [np.nan, np.inf, -np.inf][: min(n, 3)]
    fvec[3:5] = [3e38, -3e38][: max(0, min(n, 5) - 3)]
    mult = jnp.asarray(rng.uniform(1e-5, 2e-3, n), jnp.float32)
    lo, hi = (-128.0, 127.0) if signed else (0.0, 255.0)
    if kind == 0:
        zp = 3 if signed else 77
        clamp, zpv = jnp.array([lo - zp, hi - zp], jnp.float32), jnp.array([zp], jnp.int32)
    else:  # (lo, hi, s_x', f32(1/s_out), zp): y = (a·s_x')·mult + b, rint(y·inv_so + zp)
        clamp, zpv = jnp.array([lo, hi, 0.02, 4.0, 9.0], jnp.float32), jnp.zeros(1, jnp.int32)
    return ivec, jnp.asarray(fvec), mult, clamp, zpv


def test_fused_epilogue_every_isa_matches_xla(rng):
    # qjax_sat16_q8_gemm: the sums of every code path through the requantize epilogue
    # (AVX-512 registers on the AVX-512 paths, AVX2 ones on the AVX2 path) == the same
    # epilogue in XLA on the XLA pair sums: M tails of the 4-row blocks, N tails of the
    # 8- (AVX2) and 16-column blocks and of the AVX-512 two-block pairs, K tails; both
    # epilogue kinds, int8 and uint8 codes, NaN / inf / huge bias terms
    from qjax.kernels._native._onednn import portable_codes

    def xla(x, w, *vecs, dt):
        return portable_codes(_sat16_pair_dot(x, w), *vecs).astype(dt)

    n = 0
    cases = [(1, 64, 16, 0, True), (3, 66, 33, 1, False), (5, 130, 50, 0, False)]
    for m, k, nn, kind, signed in cases + [(9, 7, 31, 1, True)]:
        x = jnp.asarray(rng.integers(0, 256, (m, k)), jnp.uint8)
        w = jnp.asarray(rng.integers(-128, 128, (k, nn)), jnp.int8)
        packed = _sat16.pack_sat16_weight(w)
        dt = jnp.int8 if signed else jnp.uint8
        vecs = _epilogue(rng, nn, kind, signed)
        portable = functools.partial(xla, dt=dt)
        want = np.asarray(jax.jit(portable)(x, w, *vecs))
        for isa in _sat16.sat16_isas():
            q8 = functools.partial(_sat16.sat16_linear_q8, out_dtype=dt, portable=portable, isa=isa)
            got = jax.jit(q8)(x, packed, w, vecs)
            assert got.dtype == dt and (np.asarray(got) == want).all(), (isa, m, k, nn, kind)
            n += want.size
    print(f"\nfused sat16 epilogue, every code path == XLA on {n} codes")


def test_folded_layers_match_xla_and_check_their_calls(rng):
    # fold_requant on a "sat16" linear weight (every scheme, both saturating
    # accumulations, int8 / uint8 outputs, ReLU): one native call, the XLA kernel's codes;
    # the folded weight round-trips as a pytree and refuses a call it was not folded for
    from qjax.kernels import fold_requant

    k, nn = 66, 40
    x = QArray(jnp.asarray(rng.integers(0, 256, (7, k)), jnp.uint8), QParams(0.02, 131, XSPEC))
    wv = jnp.asarray(rng.integers(-128, 128, (k, nn)), jnp.int8)
    w = QArray(wv, QParams(jnp.asarray(rng.uniform(0.005, 0.02, nn)), jnp.zeros(nn, int), WSPEC))
    bias = jnp.asarray(rng.normal(0, 3, nn), jnp.float32)
    xla, nat = prepare_linear(w), prepare_linear(w, kernel="sat16")
    n = 0
    for i, scheme in enumerate(("fbgemm", "qnnpack", "onednn")):
        for acc in ("fbgemm_sat16", "onednn_sat16"):
            signed = (i + (acc == "onednn_sat16")) % 2 == 0
            out = QParams(0.4, 5, QuantSpec(signed=True)) if signed else QParams(0.3, 120, XSPEC)
            act = "relu" if i else None
            kw = dict(scheme=scheme, accumulate=acc, activation=act)
            folded = fold_requant(nat, x.qparams, bias, out, **kw)
            f = jax.jit(lambda x, p, kw=kw, out=out: quantized_linear(x, p, bias, out, **kw).values)
            want = quantized_linear(x, xla, bias, out, **kw).values
            assert (np.asarray(f(x, folded)) == np.asarray(want)).all(), (scheme, acc)
            text = f.lower(x, folded).as_text()
            assert text.count("custom_call @qjax_sat16_q8_gemm") == 1 and "sat16_gemm" not in text
            n += want.size
    leaves, tree = jax.tree_util.tree_flatten(folded)
    back = jax.tree_util.tree_unflatten(tree, leaves)
    assert len(leaves) == 10 and back.folded == folded.folded
    assert back.sat16_max_x == nat.sat16_max_x < 255
    # 8-bit codes could saturate this weight's pairs: an exact call on the fold (its
    # epilogue does not depend on the accumulation) and an exact fold run the kernel's
    # widened exact products, XLA's exact codes
    kw = dict(scheme="onednn", activation="relu")
    g = jax.jit(lambda x, p: quantized_linear(x, p, bias, out, **kw).values)
    want = np.asarray(quantized_linear(x, xla, bias, out, **kw).values)
    for pw in (folded, fold_requant(nat, x.qparams, bias, out, **kw)):
        assert (np.asarray(g(x, pw)) == want).all() and "exact = 1 : i64" in g.lower(
            x, pw
        ).as_text()
    print(f"\nfolded sat16 layers == XLA on {n} codes")


_CONV_CASES = [
    # (N, C, spatial, O, kernel, stride, dilation, groups)
    (2, 3, (7, 6), 5, (3, 3), (1, 1), (1, 1), 1),
    (1, 8, (6, 5), 8, (3, 3), (2, 1), (1, 1), 8),  # depthwise
    (1, 8, (6, 6), 16, (3, 3), (1, 1), (1, 1), 8),  # depthwise, multiplier 2
    (2, 6, (5, 7), 9, (2, 3), (1, 2), (1, 1), 3),  # Cg = 2
    (1, 9, (8, 8), 6, (3, 3), (1, 1), (2, 2), 3),  # Cg = 3 (odd), dilated
    (1, 5, (9, 4), 17, (1, 1), (1, 1), (1, 1), 1),  # pointwise, odd C
    (3, 7, (11,), 4, (3,), (2,), (1,), 1),  # 1-D
    (1, 4, (13,), 8, (5,), (1,), (2,), 2),  # 1-D, groups, dilated
]


# one group: (N, C, spatial, O, kernel, stride, dilation, padding); C % 4 == 0 reads the
# patches in place (qjax_sat16_q8_conv), odd C has XLA build them (qjax_sat16_q8_gemm)
_FUSED_CONV_CASES = [
    (2, 8, (7, 6), 20, (3, 3), (1, 1), (1, 1), 1),  # O tail: one block and a part
    (1, 12, (9, 8), 33, (2, 3), (2, 1), (1, 2), 0),  # strides, dilation, O = 2 + 1 blocks
    (3, 4, (5, 5), 16, (1, 1), (1, 1), (1, 1), 0),  # pointwise
    (4, 8, (16, 16), 24, (3, 3), (1, 1), (1, 1), 1),  # 1,024 rows: chunks of 128 rows
    (2, 8, (11,), 9, (3,), (2,), (1,), 1),  # 1-D, as height 1
    (1, 8, (6, 7), 12, (3, 3), (1, 2), (2, 1), 2),  # wide padding: taps all in it
    (2, 3, (7, 6), 5, (3, 3), (1, 1), (1, 1), 1),  # odd C: XLA's im2col / zero channels
    (2, 1, (9, 8), 6, (3, 3), (1, 1), (1, 1), 1),  # C = 1 (a first layer)
]


@pytest.mark.parametrize("acc", ["fbgemm_sat16", "onednn_sat16"])
def test_fused_conv_every_isa_matches_xla(rng, monkeypatch, acc):
    # a saturating conv with one group on a "sat16" weight: one fused native call (sums
    # over FBGEMM's im2col, or oneDNN's per-tap pairs on zeros with the zero-point term
    # over the valid taps, then requantize), unfolded and folded, on every code path ==
    # the XLA formulation's codes; schemes, ReLU, int8 / uint8 out
    from qjax.kernels import fold_requant

    n = 0
    for i, (b, c, sp, o, kern, stride, dil, pad) in enumerate(_FUSED_CONV_CASES):
        xv, wv = _codes(rng, (b, c, *sp), (o, c, *kern), extreme=i % 2 == 0)
        scale_w = jnp.asarray(rng.uniform(0.002, 0.01, o), jnp.float32)
        spec = QuantSpec(signed=True, symmetric=True, axis=0)
        w = QArray(jnp.asarray(wv), QParams(scale_w, jnp.zeros(o, jnp.int32), spec))
        x = QArray(jnp.asarray(xv), QParams(0.02, 120 + i, XSPEC))
        bias = jnp.asarray(rng.normal(0, 2, o), jnp.float32)
        scheme = ("fbgemm", "qnnpack", "onednn")[i % 3]
        out = QParams(0.5, 7, QuantSpec(signed=True)) if i % 2 else QParams(0.4, 110, XSPEC)
        kw = dict(stride=stride, dilation=dil, padding=pad, scheme=scheme,
                  activation="relu" if i % 2 == 0 else None, accumulate=acc)  # fmt: skip
        lay = "OIHW" if len(sp) == 2 else "OIW"
        conv = functools.partial(quantized_conv, bias=bias, out_qparams=out, **kw)
        # a new jit per isa: the path is read when a call is traced (a reused jit keeps
        # its first trace); one trace and compile per program
        program = lambda conv=conv: jax.jit(lambda xa, p: conv(xa, p).values)
        want = np.asarray(program()(x, prepare_conv(w, weight_layout=lay)))
        nat = prepare_conv(w, weight_layout=lay, kernel="sat16")
        # FBGEMM's pairs cross taps for odd C: XLA's patches; oneDNN's channels padded
        target = "qjax_sat16_q8_gemm" if c % 4 and acc == "fbgemm_sat16" else "qjax_sat16_q8_conv"
        folded = fold_requant(nat, x.qparams, bias, out, **{k: kw[k] for k in list(kw)[3:]})
        for isa in _sat16.sat16_isas():
            monkeypatch.setenv(_sat16.ISA_ENV, isa)
            g = program()
            for pw in (nat, folded):
                lowered = g.lower(x, pw)  # the text and the program run
                compiled = lowered.compile()
                got = compiled(x, pw)
                assert got.dtype == want.dtype and (np.asarray(got) == want).all(), (i, isa)
                text = lowered.as_text()
                assert text.count(f"custom_call @{target}") == 1, (i, text.count("custom_call"))
                assert f"isa = {_sat16.SAT16_ISAS.index(isa)} : i64" in text  # this path
                assert "qjax_sat16_gemm" not in text  # no int32 sums
                if target == "qjax_sat16_q8_conv":  # the weight packed once, by prepare_conv
                    assert _operand_ops(compiled.as_text(), target)[1] == "parameter"
                n += want.size
    print(f"\nfused sat16 conv ({acc}), every code path, folded and not == XLA on {n} codes")


def _operand_ops(hlo: str, target: str) -> list[str]:
    """The ops (``parameter``, ``fusion``, ...) defining the operands of the one custom
    call to ``target`` in optimized HLO text."""
    ops = dict(re.findall(r"^\s*(?:ROOT )?%(\S+) = \S+ ([\w-]+)\(", hlo, re.M))
    (line,) = [ln for ln in hlo.splitlines() if f'custom_call_target="{target}"' in ln]
    args = line.split("custom-call(", 1)[1].split(")", 1)[0]
    return [ops[a] for a in re.findall(r"%([\w.-]+)", args)]


def test_conv_tree_saved_before_the_pack_still_runs(rng):
    # a "sat16" conv tree from before prepare_conv packed the weight (no packed child,
    # as a jax.export program may hold): read back with packed None, the fused call
    # packs in the call, the same codes
    from qjax.kernels import PreparedConv

    spec = QuantSpec(signed=True, symmetric=True, axis=0)
    w = QArray(jnp.asarray(rng.integers(-128, 128, (6, 3, 3, 3)), jnp.int8),
               QParams(jnp.full(6, 0.01), jnp.zeros(6, jnp.int32), spec))  # fmt: skip
    x = QArray(jnp.asarray(rng.integers(0, 256, (2, 3, 7, 7)), jnp.uint8),
               QParams(0.02, 120, XSPEC))  # fmt: skip
    nat = prepare_conv(w, kernel="sat16")
    children, aux = nat.tree_flatten()
    assert len(children) == 3 and nat.packed is not None
    old = PreparedConv.tree_unflatten(aux, children[:2])
    assert old.packed is None and old.kernel == "sat16"
    f = jax.jit(lambda pw: quantized_conv(x, pw, None, QParams(0.3, 100, XSPEC), padding=1,
                                          accumulate="onednn_sat16").values)  # fmt: skip
    assert "qjax_sat16_q8_conv" in f.lower(old).as_text()
    assert (np.asarray(f(old)) == np.asarray(f(nat))).all()


@pytest.mark.parametrize("acc", ["fbgemm_sat16", "onednn_sat16"])
def test_fused_conv_under_vmap(rng, acc):
    # vmap over inputs: the fused conv runs once per element, the XLA path's codes
    spec = QuantSpec(signed=True, symmetric=True, axis=0)
    wv = jnp.asarray(rng.integers(-128, 128, (8, 8, 3, 3)), jnp.int8)
    w = QArray(wv, QParams(jnp.full(8, 0.01), jnp.zeros(8, jnp.int32), spec))
    xs = jnp.asarray(rng.integers(0, 256, (3, 2, 8, 6, 6)), jnp.uint8)
    out = QParams(0.4, 100, XSPEC)

    def f(v, pw):
        x = QArray(v, QParams(0.02, 120, XSPEC))
        return quantized_conv(x, pw, None, out, padding=1, accumulate=acc).values

    nat = prepare_conv(w, kernel="sat16")
    want = jax.vmap(lambda v: f(v, prepare_conv(w)))(xs)
    fn = jax.jit(jax.vmap(lambda v: f(v, nat)))
    assert "qjax_sat16_q8_conv" in fn.lower(xs).as_text()
    assert (np.asarray(fn(xs)) == np.asarray(want)).all()


def test_exact_linear_on_sat16_saturating_where_provable_else_widened(rng):
    # a "sat16" weight records the largest uint8 code its pair sums cannot saturate at;
    # exact accumulation runs the saturating instructions for activation specs within it
    # and the kernel's widened exact products (attribute exact = 1) beyond it, one fused
    # call either way, the XLA kernel's codes
    k, nn = 66, 40
    full = jnp.asarray(rng.integers(-128, 128, (k, nn)), jnp.int8)
    full = full.at[0:2, 0].set(127)  # one pair 127 + 127: 8-bit codes can saturate it
    small = jnp.asarray(rng.integers(-64, 65, (k, nn)), jnp.int8)
    extreme = jnp.asarray(rng.choice(W_EXTREME, (k, nn)), jnp.int8)
    assert sat16_exact_max_x(full) == 32767 // 254 == 129 and sat16_exact_max_x(small) == 255
    seven = QuantSpec(signed=False, reduce_range=True)  # codes 0..127
    signed8 = QuantSpec(signed=True)  # -128..127: fed shifted up, 0..255
    out = QParams(jnp.float32(0.3), jnp.int32(128), XSPEC)
    bias = jnp.asarray(rng.normal(0, 3, nn), jnp.float32)
    n = 0
    for wv, spec, widened in [
        (full, seven, False),
        (full, XSPEC, True),
        (full, signed8, True),
        (extreme, XSPEC, True),
        (small, XSPEC, False),
        (small, signed8, False),
    ]:
        w = QArray(wv, QParams(jnp.full((nn,), 0.01), jnp.zeros((nn,), jnp.int32), WSPEC))
        xv = rng.integers(spec.qmin, spec.qmax + 1, (9, k))
        if wv is extreme:  # the widening's bounds: codes 0 / 255 against -128 / 127
            xv = rng.choice(np.array([spec.qmin, spec.qmax]), (9, k))
        x = QArray(jnp.asarray(xv, spec.dtype), QParams(0.02, 3 if spec.signed else 60, spec))
        xla, nat = prepare_linear(w), prepare_linear(w, kernel="sat16")
        for q in (out, None):  # codes (one fused call); the float output of the sums
            act = "relu" if q is out else None
            f = jax.jit(lambda x, p, q=q, a=act: quantized_linear(x, p, bias, q, activation=a))
            values = (lambda y: y.values) if q is out else (lambda y: y)
            want, got = values(f(x, xla)), values(f(x, nat))
            assert (np.asarray(got) == np.asarray(want)).all(), (spec, q is out)
            text = f.lower(x, nat).as_text()
            assert text.count("qjax_sat16_q8_gemm" if q is out else "qjax_sat16_gemm") == 1
            assert ("exact = 1 : i64" in text) == widened, spec
            n += want.size
    # what the proof guards against: 8-bit codes through the saturating kernel do differ
    xv = jnp.asarray(rng.integers(128, 256, (64, k)), jnp.uint8)
    exact = np.asarray(xv, np.int64) @ np.asarray(full, np.int64)
    assert (np.asarray(_native_dot(xv, full)) != exact).any()
    print(f"\nexact linear on sat16 / XLA: 0 of {n} values differ")


def test_exact_widened_sums_every_isa_and_tail(rng):
    # the kernel's exact mode (uint8 codes widened to int16 pairs) on every code path ==
    # the int64 sums over M / K / N tails and extreme codes, where the saturating mode
    # differs
    n = bad = 0
    for i, (m, k, nn) in enumerate(
        [(1, 1, 1), (5, 7, 3), (9, 66, 40), (3, 13, 16), (130, 300, 70)]
    ):
        x, w = _codes(rng, (m, k), (k, nn), extreme=i % 2 == 0)
        want = np.asarray(x, np.int64) @ np.asarray(w, np.int64)
        xj, wj = jnp.asarray(x), jnp.asarray(w)
        packed = _sat16.pack_sat16_weight(wj)
        for isa in _sat16.sat16_isas():
            dot = functools.partial(_sat16.sat16_dot, packed=packed, w=wj, portable=_u8_dot)
            f = jax.jit(functools.partial(dot, isa=isa, exact=True))
            got = np.asarray(f(xj))
            n += got.size
            bad += int((got != want).sum())
    assert bad == 0, bad
    x = jnp.full((4, 8), 255, jnp.uint8)
    w = jnp.full((8, 3), 127, jnp.int8)
    sat = _sat16.sat16_dot(x, _sat16.pack_sat16_weight(w), w, _sat16_pair_dot)
    assert (np.asarray(sat) == 4 * 32767).all()  # 255·127·2 saturates each pair
    print(f"\nexact sat16 sums, every code path: 0 of {n} differ")


def test_exact_conv_on_sat16_saturating_where_provable_else_widened(rng):
    # the same for a conv with one group (a bound for FBGEMM's pairs along the im2col K
    # and for pairs per tap): uint8 codes take the fused kernel (the patches in place,
    # odd C with zero channels), folded or not: the saturating instructions within the
    # bound, the widened exact products beyond it; a float output takes the unfused
    # native sums within the bound, XLA's exact conv beyond it; int8 codes XLA's conv;
    # XLA's values
    from qjax.kernels import fold_requant

    seven = QuantSpec(signed=False, reduce_range=True)
    wspec = QuantSpec(signed=True, symmetric=True, axis=0)
    out = QParams(jnp.float32(0.3), jnp.int32(100), XSPEC)
    n = 0
    for i in (0, 4, 6, 7):  # 2-D padded, 1-D, C = 3, C = 1
        b, c, sp, o, kern, stride, dil, pad = _FUSED_CONV_CASES[i]
        full = rng.integers(-128, 128, (o, c, *kern)).astype(np.int8)
        small = rng.integers(-64, 65, (o, c, *kern)).astype(np.int8)
        bias = jnp.asarray(rng.normal(0, 3, o), jnp.float32)
        scheme = ("fbgemm", "qnnpack")[i % 2]
        conv = functools.partial(quantized_conv, bias=bias, stride=stride, dilation=dil,
                                 padding=pad, scheme=scheme)  # fmt: skip
        lay = "OIHW" if len(sp) == 2 else "OIW"
        for wv, spec, mode in [
            (full, seven, "sat"),
            (full, XSPEC, "wide"),
            (small, XSPEC, "sat"),
            (small, QuantSpec(signed=True), "xla"),  # int8 codes: XLA's conv
        ]:
            w = QArray(
                jnp.asarray(wv), QParams(jnp.full((o,), 0.01), jnp.zeros(o, jnp.int32), wspec)
            )
            xv = rng.integers(spec.qmin, spec.qmax + 1, (b, c, *sp))
            x = QArray(jnp.asarray(xv, spec.dtype), QParams(0.02, 3 if spec.signed else 60, spec))
            xla = prepare_conv(w, weight_layout=lay)
            nat = prepare_conv(w, weight_layout=lay, kernel="sat16")
            assert (nat.sat16_max_x == 255) == (wv is small), nat.sat16_max_x
            fold = functools.partial(fold_requant, nat, x.qparams, bias, out, scheme=scheme,
                                     activation="relu")  # fmt: skip
            if mode != "xla":  # the requantization folded at prepare time: the same codes
                pws = [nat, fold()]
            else:
                pws = [nat]
                with pytest.raises(ValueError, match="nothing to fold"):
                    fold()
            for q in (out, None):  # codes; the float output of the sums
                act = "relu" if q is out else None
                f = jax.jit(
                    lambda x, p, q=q, a=act, conv=conv: conv(x, p, out_qparams=q, activation=a)
                )
                values = (lambda y: y.values) if q is out else (lambda y: y)
                want = np.asarray(values(f(x, xla)))
                for pw in pws if q is out else [nat]:
                    assert (np.asarray(values(f(x, pw))) == want).all(), (i, spec, q is out)
                    text = f.lower(x, pw).as_text()
                    sums = "qjax_sat16_q8_conv" if q is out else "qjax_sat16_gemm"
                    native = mode == "sat" or (mode == "wide" and q is out)
                    assert (sums in text) == native and text.count("qjax_sat16") <= 1, i
                    assert ("exact = 1 : i64" in text) == (native and mode == "wide"), i
                    n += want.size
    print(f"\nexact conv on sat16 / XLA: 0 of {n} values differ")


@pytest.mark.parametrize("per_tap", [False, True], ids=["fbgemm", "onednn"])
def test_conv_accumulator_matches_xla(rng, per_tap):
    n = mism = 0
    for i, (b, c, sp, o, kern, stride, dil, g) in enumerate(_CONV_CASES):
        x, w = _codes(rng, (b, *sp, c), (*kern, c // g, o), extreme=i % 2 == 0)
        args = (jnp.asarray(x), jnp.asarray(w), stride, dil, g)
        want = np.asarray(
            jax.jit(lambda x, w, a=args: _sat16_conv(x, w, *a[2:], per_tap))(*args[:2])
        )
        got = np.asarray(
            jax.jit(lambda x, w, a=args: _sat16_conv(x, w, *a[2:], per_tap, native=True))(*args[:2])
        )
        assert got.shape == want.shape
        n += want.size
        mism += int((got != want).sum())
    print(
        f"\nconv sat16 ({'per tap' if per_tap else 'fbgemm'}) native vs XLA: {n} values, "
        f"{mism} differ"
    )
    assert mism == 0


@pytest.mark.slow
def test_quantized_conv_layers_match_xla(rng):
    n = 0
    for b, c, sp, o, kern, stride, dil, g in _CONV_CASES[:6]:
        wv = rng.choice(W_EXTREME, (o, c // g, *kern))
        spec = QuantSpec(signed=True, symmetric=True, axis=0)
        w = QArray(jnp.asarray(wv), QParams(jnp.full((o,), 0.01), jnp.zeros((o,), jnp.int32), spec))
        x = QArray(
            jnp.asarray(rng.integers(90, 256, (b, c, *sp)), jnp.uint8), QParams(0.02, 140, XSPEC)
        )
        out = QParams(jnp.float32(0.3), jnp.int32(100), XSPEC)
        xla = prepare_conv(w, groups=g)
        nat = prepare_conv(w, groups=g, kernel="sat16")
        assert nat.kernel == "sat16"
        for acc in ("fbgemm_sat16", "onednn_sat16"):
            kw = dict(stride=stride, dilation=dil, padding=1, accumulate=acc)
            want = quantized_conv(x, xla, None, out, **kw).values
            got = quantized_conv(x, nat, None, out, **kw).values
            assert (np.asarray(got) == np.asarray(want)).all(), (c, g, acc)
            n += want.size
    print(f"\nquantized_conv sat16 vs xla: 0 of {n} codes differ")


def test_unavailable_is_named(monkeypatch):
    w = QArray(jnp.ones((4, 2), jnp.int8), QParams(0.1, 0, QuantSpec(symmetric=True)))
    monkeypatch.setattr(_native, "sat16_status", lambda: (False, "CPU lacks avx2 (test)"))
    monkeypatch.setattr(_native, "require_sat16", _sat16.require_sat16)
    monkeypatch.setattr(_sat16, "sat16_status", lambda: (False, "CPU lacks avx2 (test)"))
    with pytest.raises(RuntimeError, match=r"layer 'fc'.*kernel='sat16'.*CPU lacks avx2"):
        prepare_linear(w, name="fc", kernel="sat16")
    from qjax.kernels._choice import linear_kernel

    assert linear_kernel("default", "fbgemm_sat16") == "xla"


# ---------------------------------------------------------------------------------------
# torch: kernel choice, export, and torch forced to AVX2

torch = pytest.importorskip("torch")

_TORCH_MODELS = r"""
import warnings
import numpy as np
import torch
from torch import nn
from torch.ao.quantization import QuantStub, DeQuantStub, get_default_qconfig, prepare, convert


def models(engine):
    torch.manual_seed(0)
    torch.backends.quantized.engine = engine
    mlp = nn.Sequential(QuantStub(), nn.Linear(64, 96), nn.ReLU(), nn.Linear(96, 48),
                        nn.ReLU(), nn.Linear(48, 10), DeQuantStub()).eval()
    cnn = nn.Sequential(QuantStub(), nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(),
                        nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.ReLU(),
                        nn.Conv2d(8, 12, 3, padding=1, groups=2), nn.ReLU(),
                        nn.Conv2d(12, 16, 3, padding=1), DeQuantStub()).eval()
    out = []
    for m, shape in ((mlp, (64,)), (cnn, (3, 9, 9))):
        for mod in m.modules():  # weights of magnitude 0.6-1: codes 76-127 per channel
            if isinstance(mod, (nn.Linear, nn.Conv2d)):
                w = mod.weight.data
                w.copy_(torch.sign(torch.randn(w.shape)) * (0.6 + 0.4 * torch.rand(w.shape)))
        m.qconfig = get_default_qconfig(engine)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            p = prepare(m)
            # calibrate on small inputs, run on large ones: codes near 255 saturate pairs
            p(torch.rand(64, *shape) * 0.5)
            q = convert(p)
        x = torch.rand(16, *shape) * 3.0
        out.append((q, x))
    return out
"""

_SUBPROCESS = (
    _TORCH_MODELS
    + r"""
import sys
import jax
from qjax.converters.torch import import_model, torch_trace

results = {}
full = sys.argv[1] == "full"
for engine in ("fbgemm", "x86", "onednn") if full else ("fbgemm", "onednn"):
    # quick: the MLP, and the CNN on fbgemm (its fused sat16 convs, 3 and 12 channels)
    for mi, (q, x) in enumerate(models(engine)[: 2 if full or engine == "fbgemm" else 1]):
        ref = torch_trace(q, x)
        # isa=None: the level torch's switches set here (avx2) and the x86 conv routing of
        # this CPU's flags, which the switches do not reach (qjax.kernels._levels)
        progs = {"default": import_model(q, (x,), engine=engine),
                 "xla": import_model(q, (x,), engine=engine, kernel="xla"),
                 "vnni": import_model(q, (x,), engine=engine, isa="vnni", kernel="xla")}
        xla_tr = progs["xla"].trace(x)
        for name, prog in progs.items():
            tr = prog.trace(x)
            n = d = dx = mx = 0
            for k, v in ref.items():
                if k in tr:
                    a = np.asarray(tr[k].values).astype(np.int64)
                    b = np.asarray(v.values).astype(np.int64)
                    n += a.size
                    d += int((a != b).sum())
                    mx = max(mx, int(np.abs(a - b).max(initial=0)))
                    dx += int((a != np.asarray(xla_tr[k].values)).sum())
            results[f"{engine}/{mi}/{name}"] = (n, d, dx, sorted(set(prog.kernels.values())), mx)
print(repr(results))
"""
)


def _forced_avx2(which):
    here = host_level()
    if platform.machine().lower() not in ("x86_64", "amd64"):
        pytest.skip("x86 only")
    if here is None or LEVELS.index(here) < LEVELS.index("avx2"):
        pytest.skip(f"this CPU ({here}) cannot run level avx2")
    env = dict(os.environ, OMP_NUM_THREADS="1", **level_env("avx2"))
    proc = subprocess.run(
        [sys.executable, "-c", _SUBPROCESS, which],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return eval(proc.stdout.strip().splitlines()[-1])  # a dict literal we printed


def _check_forced(results, claimed):
    total = vnni_diff = onednn_1lsb = 0
    for key, (n, d, dx, kernels, mx) in results.items():
        engine, model, name = key.split("/")
        assert n > 0, key
        if name == "default":
            assert "sat16" in kernels, key
            assert dx == 0, (key, n, dx)  # the native program == the pure-XLA one
            if (engine, model) in claimed and engine == "onednn":
                assert mx <= 1 and d <= 1e-4 * n, (key, n, d, mx)  # rule 13's epilogue
                total += n
                onednn_1lsb += d
            elif (engine, model) in claimed:
                assert d == 0, (key, n, d)
                total += n
            else:
                print(f"\n{key}: {d} of {n} codes differ from torch (the XLA import too)")
        elif name == "xla":
            assert kernels == ["xla"], key
        else:
            vnni_diff += d
    print(
        f"\ntorch forced to AVX2 vs native sat16 programs: {total} codes, {onednn_1lsb} "
        "differ, each by 1 LSB on oneDNN (rule 13); "
        f"exact (vnni) import: {vnni_diff} differ"
    )
    assert vnni_diff > 0  # the inputs do saturate


def test_torch_forced_to_avx2_matches_native_program():
    _check_forced(_forced_avx2("quick"), {("fbgemm", "0"), ("fbgemm", "1"), ("onednn", "0")})


@pytest.mark.slow
def test_torch_forced_to_avx2_matches_native_program_cnn():
    claimed = {(e, m) for e in ("fbgemm", "x86", "onednn") for m in ("0", "1")}
    _check_forced(_forced_avx2("full"), claimed)


def test_default_import_uses_sat16_and_export_names_kernel_xla(tmp_path):
    ns = {}
    exec(_TORCH_MODELS, ns)
    from qjax.converters.torch import import_model

    q, x = ns["models"]("fbgemm")[0]
    program = import_model(q, (x,), engine="fbgemm", isa="avx2")
    assert set(program.kernels.values()) == {"sat16"}
    plain = import_model(q, (x,), engine="fbgemm", isa="avx2", kernel="xla")
    assert set(plain.kernels.values()) == {"xla"}
    exact = import_model(q, (x,), engine="fbgemm", isa="vnni")  # exact layers: XLA
    assert set(exact.kernels.values()) == {"xla"}
    assert (np.asarray(program(x)) == np.asarray(plain(x))).all()
    spec = (jax.ShapeDtypeStruct(tuple(x.shape), jnp.float32),)
    # every layer one call, its requantization folded in (qjax.flax._fold); the boundary
    # and the model's unfused ReLUs native too (the program is native anyway), also as
    # loaded from its file
    text = jax.jit(program._run).lower(program.params, spec).as_text()
    assert text.count("custom_call @qjax_sat16_q8_gemm") == 3
    assert text.count("custom_call @qjax_relu_codes") == 2
    assert "@qjax_quantize_fma" in text and "@qjax_dequantize" in text
    assert "custom_call" not in jax.jit(plain._run).lower(plain.params, spec).as_text()
    path = tmp_path / "m.safetensors"
    qjax.save_served(path, program)
    xla = qjax.load_served(path)  # load_served's default: pure XLA
    assert "custom_call" not in jax.jit(xla._run).lower(xla.params, spec).as_text()
    for kernel in (None, "auto"):  # None: as import_model's default, native where saturating
        loaded = qjax.load_served(path, kernel=kernel)
        assert (np.asarray(loaded(x)) == np.asarray(plain(x))).all()
        text = jax.jit(loaded._run).lower(loaded.params, spec).as_text()
        assert text.count("custom_call @qjax_sat16_q8_gemm") == 3
        assert "@qjax_quantize_fma" in text and text.count("@qjax_relu_codes") == 2
    with pytest.raises(ValueError, match=r"qjax_sat16_q8_gemm(.|\n)*kernel='xla'"):
        jax.export.export(program._run)(program.params, spec)
    jax.export.export(plain._run)(plain.params, spec)  # the pure-XLA program exports
