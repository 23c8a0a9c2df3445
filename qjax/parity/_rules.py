"""The parity rulebook: why a quantized layer's integers differ from a reference.

Each rule is a small predicate over one layer's :class:`LayerEvidence` that returns a
:class:`Cause` (or ``None``). Rule numbers are those of NUMERICS.md (what PyTorch 2.13
computes). A predicate answers in one of three strengths:

* ``"confirmed"``: the mismatches have exactly the signature the rule predicts (e.g.
  every mismatch sits on an exact rounding tie);
* ``"likely"``: the layer has the property the rule needs and the mismatches fit it;
* ``"risk"``: no reference to compare with (``qjax inspect``), but the layer has the
  property, so some platform or conversion path will see the difference.

Programs traced from a Flax model (:func:`qjax.convert`, ``LayerEvidence.origin ==
"flax"``) have no torch engine or CPU level, hold the model's own weights and qparams,
and accumulate exactly in int32: the rules about what torch's ``convert()`` stores (9)
and what torch's kernels do on a given CPU (13, 14) do not apply to them, and neither do
the engine and level rules (no engine). The others read only the codes and qparams.

=====================  =====  ========================================================
predicate              rule   signature
=====================  =====  ========================================================
weight_at_clamp_bound  9, 6   symmetric int8 weight whose largest positive code is 127
                              with no -128 in the channel: convert's ``amax/127.5``
                              scale put it at 127.5 and clamped it; QAT (fused
                              fake-quant) trained it exact
int16_saturation       14     uint8 activation codes > 127 into an FBGEMM/oneDNN
                              linear/conv imported for a VNNI CPU: without VNNI,
                              adjacent products are summed in int16 and saturate
level_mismatch         14     the program emulates one CPU level, torch ran at another
                              (qjax.kernels._levels): accumulation (int16 pairs or
                              exact) or the x86 conv routing differ
zero_point_tie         1, 4   quantize with an odd zero point: at exact ties ``x/s = k+½``
                              ``rint(x/s + zp)`` and ``rint(x/s) + zp`` differ by 1
reduce_range_clamp     18     reference clamped at 127 (QAT ``reduce_range`` /
                              ``quant_max=127``) where the converted op clamps at 255
onednn_epilogue        13     oneDNN conv (x86 engine on VNNI CPUs, onednn engine):
                              1-2 outputs per million differ by 1 LSB (kernel f32 order)
bias_rounding          11,12  ±1 LSB where one side rounds the bias to int32 (QNNPACK,
                              hand simulations) and the other keeps it float (FBGEMM)
engine_mismatch        11-17  the program was imported for one torch engine, torch ran
                              another: requantization (11-13), add (15, 16) and
                              pooling (17) formulas differ between engines
=====================  =====  ========================================================
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from .._qarray import QArray  # noqa: F401 (the doctests build weights with it)
from ..kernels._levels import SATURATING_ENGINES, SATURATING_LEVELS, engine_family
from ._evidence import Cause, LayerEvidence, Strength

__all__ = ["RULES", "Cause", "LayerEvidence", "diagnose"]

_ONEDNN_RATE = 1e-4  # rule 13 measures 1-2 per million; allow two orders of slack
_I16_MAX = 2**15 - 1
_MAX_ROWS = 4096  # rows of input used to count saturating pairs (bounded memory)


def _mismatch_stats(ev: LayerEvidence) -> tuple[int, int, float]:
    mask, diff = ev.mismatch()
    n = int(mask.sum())
    return n, int(np.abs(diff).max(initial=0)), n / max(mask.size, 1)


def _is_weighted(kind: str) -> bool:
    return kind.startswith(("linear", "conv"))


def _torch_kernels(ev: LayerEvidence) -> bool:
    """The layer's weights came from torch's ``convert()`` and its reference kernels are
    torch's (an imported program, or one of unknown origin): not a traced Flax program."""
    return ev.origin != "flax"


# schemes that round the bias to int32 before requantizing (the others add it in float)
_INT32_BIAS_SCHEMES = ("qnnpack", "tflite", "tflite_single_rounding", "litert_ref", "litert")


# ---- the rules ----------------------------------------------------------------------


def weight_at_clamp_bound(ev: LayerEvidence) -> Cause | None:
    """Rule 9 vs 6: convert's symmetric scale cannot store the largest weight.

    Signature: a signed symmetric weight (zero points 0) on a range with an odd number of
    steps (``qmax - qmin`` odd, e.g. -128..127) where a channel's largest ``|code|`` is
    ``qmax`` and no code reaches ``qmin``. Under ``calculate_qparams`` (rule 6, what
    ``convert()`` stores) ``s = amax/127.5``, so the largest magnitude lands on ±127.5
    steps and is stored as 127 (+127.5 rounds to 128 and is clamped; with torch's
    reciprocal ``x·inv(s)`` is just below 127.5 and rounds down), i.e. ``0.996·amax``;
    the fused QAT fake-quant (rule 9: ``max(|min|/128, max/127)``, affine when min >= 0)
    trained it exact.
    A converted model compared with itself cannot show this (both sides store the same
    weight), so it is named only against a fake-quant or hand reference, or as a risk.
    Not for a traced Flax program: its weights are its model's own fake-quant codes
    (whatever the qparams formula), not a torch ``convert()``'s.

    >>> from qjax import QuantSpec, QParams
    >>> w = QArray(np.array([[127, 0], [0, 127]], np.int8),
    ...            QParams(2 / 255, 0, QuantSpec(symmetric=True)))
    >>> weight_at_clamp_bound(LayerEvidence("conv", "conv2d", weight=w)).rule
    '9'
    """
    w = ev.weight
    if w is None or not w.spec.signed or not _torch_kernels(ev):
        return None
    spec = w.spec
    if (spec.qmax - spec.qmin) % 2 == 0:  # narrow range: amax/127 puts amax on a code
        return None
    codes = np.asarray(w.values, np.int64)
    zp = np.asarray(w.zero_point)
    if np.any(zp != 0):
        return None
    flat = codes.reshape(-1, codes.shape[-1]) if codes.ndim > 1 else codes.reshape(-1, 1)
    if spec.granularity == "tensor":
        flat = flat.reshape(-1, 1)
    hit = (np.abs(flat).max(axis=0) == spec.qmax) & (flat.min(axis=0) > spec.qmin)
    if not hit.any():
        return None
    if ev.compared:
        if ev.reference_kind == "torch" or not ev.mismatch()[0].any():
            return None
        strength: Strength = "likely"
    else:
        strength = "risk"
    scale = np.asarray(w.scale, np.float64).reshape(-1)
    s0 = float(scale[int(np.argmax(hit))] if scale.size > 1 else scale[0])
    lost = _lost_bins(ev)
    half = (spec.qmax - spec.qmin) / 2
    msg = (
        f"largest |weight| stored as {spec.qmax} with no {spec.qmin} in {int(hit.sum())} of "
        f"{hit.size} {'channels' if hit.size > 1 else 'tensor'}: convert() set the scale to "
        f"amax/{half} = {s0:.6g} (rule 6), so amax = {half} steps could only be stored as "
        f"{spec.qmax}·s = {spec.qmax * s0:.6g} = {spec.qmax / half:.4f}·amax; "
        + (
            "QAT's fused fake-quant (rule 9) trained it exact"
            if strength != "risk"
            else "if the model was trained with QAT's fused fake-quant (rule 9), training saw "
            "amax exactly and the converted outputs can differ by 1 LSB"
        )
    )
    if lost:
        msg += f"; {lost}"
    fix = (
        f"narrow symmetric weight range [{spec.qmin + 1}, {spec.qmax}] (quant_min="
        f"{spec.qmin + 1}: scale amax/{spec.qmax}) or an affine weight qscheme"
    )
    return Cause("9", "weight_at_clamp_bound", strength, msg, fix)


def _lost_bins(ev: LayerEvidence) -> str:
    """Codes the reference uses that qjax's output never takes, and merged codes."""
    if not ev.compared:
        return ""
    ref = np.asarray(ev.ref_codes, np.int64).reshape(-1)
    got = np.asarray(ev.codes, np.int64).reshape(-1)
    lost = np.setdiff1d(np.unique(ref), np.unique(got))
    pairs = np.unique(np.stack([got, ref]), axis=1)  # (got, ref) pairs that occur
    vals, counts = np.unique(pairs[0], return_counts=True)
    dup = vals[counts > 1]
    parts = []
    if dup.size:
        d = int(dup[0])
        srcs = pairs[1][pairs[0] == d].tolist()
        parts.append(f"code {d} appears for reference codes {srcs} (duplicate)")
    if lost.size:
        parts.append(f"reference codes never produced: {_short_list(lost)}")
    return "; ".join(parts)


def _short_list(a: np.ndarray, n: int = 6) -> str:
    vals = [int(v) for v in np.asarray(a).reshape(-1)]
    return "[" + ", ".join(map(str, vals[:n])) + (", ...]" if len(vals) > n else "]")


def int16_saturation(ev: LayerEvidence) -> Cause | None:
    """Rule 14: FBGEMM and oneDNN without VNNI saturate pair sums of uint8 x int8 products.

    Applies to linear/conv layers of a program that accumulates exactly (imported for a
    VNNI or AMX level, or of unknown level) on an FBGEMM or oneDNN path (schemes
    ``"fbgemm"``/``"onednn"``, engines fbgemm, x86, onednn) with unsigned activations
    whose codes exceed 127: on a CPU without VNNI ``x[2j]·w[2j] + x[2j+1]·w[2j+1]`` is
    summed in int16 (``vpmaddubsw``) before int32 accumulation. For a linear layer
    with its input codes at hand the saturating pairs are counted exactly (pairs along K,
    the first ``4096`` input rows); for conv, the weight pairs along K = (kh, kw, c_in)
    that some input with codes up to ``max(x)`` drives past int16 are counted.
    ``reduce_range=True`` (codes <= 127) or signed activations avoid it. Not for a
    traced Flax program (qjax's kernels accumulate exactly in int32; no torch CPU path).

    >>> from qjax import QuantSpec, QParams
    >>> w = QArray(np.full((2, 1), 127, np.int8), QParams(0.1, 0, QuantSpec(symmetric=True)))
    >>> ev = LayerEvidence("fc1", "linear", "x86", weight=w,
    ...                    input_codes=np.array([[209, 147]], np.uint8),
    ...                    input_qparams=QParams(0.1, 128, QuantSpec(signed=False)))
    >>> int16_saturation(ev).message.split(":")[0]
    'activation codes up to 209 (> 127) into FBGEMM/oneDNN'
    """
    if not _is_weighted(ev.kind) or ev.weight is None or ev.input_codes is None:
        return None
    if not _torch_kernels(ev):
        return None
    if ev.input_qparams is not None and ev.input_qparams.spec.signed:
        return None
    if ev.compared and ev.level is not None and ev.reference_level is not None:
        return None  # both levels known: level_mismatch says it, or the levels agree
    on_lib = ev.scheme in ("fbgemm", "onednn") or ev.engine in SATURATING_ENGINES
    if not on_lib and (ev.engine is not None or ev.scheme is not None):
        return None
    x = np.asarray(ev.input_codes, np.int64)
    if x.size == 0 or x.max() <= 127:
        return None
    w = np.asarray(ev.weight.values, np.int64)
    if ev.kind.startswith("linear") and w.ndim == 2 and x.shape[-1] == w.shape[0]:
        rows = x.reshape(-1, w.shape[0])[:_MAX_ROWS]
        if w.shape[0] % 2:
            rows = np.pad(rows, ((0, 0), (0, 1)))
            w = np.pad(w, ((0, 1), (0, 0)))
        pair = rows[:, 0::2, None] * w[None, 0::2] + rows[:, 1::2, None] * w[None, 1::2]
        n_sat = int((np.abs(pair) > _I16_MAX).sum())
        if n_sat == 0:
            return None
        seen = f"{n_sat} of {pair.size} int16 pair sums saturate with these inputs"
    else:
        # K runs (kh, kw, c_in): the HWIO weight flattened to (K, C_out). A pair saturates
        # for some input in [0, max x] iff max x times its same-sign weights exceeds int16.
        wk = w.reshape(-1, w.shape[-1])
        if wk.shape[0] % 2:
            wk = np.pad(wk, ((0, 1), (0, 0)))
        pos = np.maximum(wk[0::2], 0) + np.maximum(wk[1::2], 0)
        neg = np.maximum(-wk[0::2], 0) + np.maximum(-wk[1::2], 0)
        xmax = int(x.max())
        n_sat = int(((xmax * pos > _I16_MAX) | (xmax * neg > _I16_MAX + 1)).sum())
        if n_sat == 0:
            return None
        seen = f"{n_sat} of {pos.size} weight pairs can saturate int16 with codes up to {xmax}"
    if ev.compared:
        if not ev.mismatch()[0].any():
            return None
        strength: Strength = "likely"
    else:
        strength = "risk"
    msg = (
        f"activation codes up to {int(x.max())} (> 127) into FBGEMM/oneDNN: on CPUs "
        f"without VNNI {seen} (rule 14); torch's result depends on the CPU"
    )
    fix = (
        "import with isa='avx2' (or 'avx512') to reproduce a CPU without VNNI (isa=None "
        "follows this machine), or use reduce_range=True / signed activations so codes "
        "stay <= 127"
    )
    return Cause("14", "int16_saturation", strength, msg, fix)


def zero_point_tie(ev: LayerEvidence) -> Cause | None:
    """Rules 1 vs 4: zero point added before or after rounding, at (near) ties.

    ``torch.quantize_per_tensor`` computes ``rint(fma(x, inv(s), zp))`` (rule 1),
    fake-quant and pt2e ``rint(f32(x·inv(s))) + zp`` (rules 4, 5). They differ by one
    code only at rounding ties: at an exact tie ``x·inv(s) = k + ½`` when ``zp`` is odd
    (half-to-even picks the other neighbour), and, for any zero point, within one float32
    ulp of a tie, where the fused sum is rounded once at the magnitude of ``v + zp`` and
    lands on the tie. With the float input at hand every mismatch is checked to sit within
    ``spacing(f32(|v| + |zp|))`` of ``k + ½`` (float32 products are exact in float64): if
    all do, the cause is ``"confirmed"``. Without a reference, odd zero points are a risk.

    >>> from qjax import QuantSpec, QParams
    >>> qp = QParams(0.5, 3, QuantSpec(signed=False))
    >>> ev = LayerEvidence("quant", "quantize", codes=np.array([4, 5], np.uint8),
    ...                    ref_codes=np.array([4, 4], np.uint8), out_qparams=qp,
    ...                    float_input=np.array([0.5, 0.75], np.float32),
    ...                    reference_kind="fake_quant")
    >>> zero_point_tie(ev).strength
    'confirmed'
    """
    if ev.kind != "quantize" or ev.out_qparams is None:
        return None
    zp = np.asarray(ev.out_qparams.zero_point, np.int64)
    if not ev.compared:
        if not np.any(zp % 2):
            return None
        return Cause(
            "1,4",
            "zero_point_tie",
            "risk",
            f"odd zero point {_short_list(zp)}: inputs on exact ties x = (k+½)·s quantize "
            "one code apart in torch.quantize_per_tensor (zp before rounding, rule 1) and "
            "in fake-quant / pt2e (zp after rounding, rules 4, 5)",
            "an even zero point, or the same quantize rule on both sides",
        )
    mask, diff = ev.mismatch()
    if not mask.any() or np.abs(diff).max() != 1:
        return None
    strength: Strength = "likely"
    ties = ""
    if ev.float_input is not None and np.shape(ev.float_input) == mask.shape:
        s = np.asarray(ev.out_qparams.scale, np.float32)
        inv = (np.float32(1) / s).astype(np.float64)
        v = np.asarray(ev.float_input, np.float32).astype(np.float64) * inv
        ulp = np.spacing((np.abs(v) + np.abs(zp)).astype(np.float32)).astype(np.float64)
        near = np.abs(v - np.floor(v) - 0.5) <= ulp
        n_tie, n = int((near & mask).sum()), int(mask.sum())
        ties = f"; {n_tie} of {n} mismatches are within a float32 ulp of a tie"
        if n_tie == n:
            strength = "confirmed"
        elif n_tie == 0:
            return None
    return Cause(
        "1,4",
        "zero_point_tie",
        strength,
        f"every mismatch is 1 LSB (zero point {_short_list(zp)}){ties}: "
        "quantize_per_tensor adds zp before rounding (rule 1), fake-quant after (rule 4)",
        "quantize with the reference's rule on both sides (qjax.quantize compat='torch' is "
        "rule 1; fake_quant is rule 4); odd zero points make exact ties differ",
    )


def reduce_range_clamp(ev: LayerEvidence) -> Cause | None:
    """Rule 18: converted ops clamp quint8 outputs to [0, 255], whatever QAT used.

    Signature: every mismatch has the reference at its largest code (127 for a QAT
    ``reduce_range`` / ``quant_max=127`` activation, 63 for signed) and qjax above it.
    The converted model computes codes the QAT model never produced.

    >>> ev = LayerEvidence("fc1", "linear", codes=np.array([100, 140, 200], np.uint8),
    ...                    ref_codes=np.array([100, 127, 127], np.uint8),
    ...                    reference_kind="fake_quant")
    >>> reduce_range_clamp(ev).rule
    '18'
    """
    if not ev.compared:
        return None
    mask, diff = ev.mismatch()
    if not mask.any():
        return None
    ref = np.asarray(ev.ref_codes, np.int64)
    top = int(ref.max())
    if top not in (63, 127) or not np.all((ref[mask] == top) & (diff[mask] > 0)):
        return None
    return Cause(
        "18",
        "reduce_range_clamp",
        "confirmed",
        f"{int(mask.sum())} outputs where the reference sits at its clamp {top} and qjax "
        f"goes up to {int(ref[mask].max() + diff[mask].max())}: the QAT range was "
        f"[.., {top}] (reduce_range / quant_max) but converted ops clamp to the dtype range",
        "train without reduce_range on the output activation, or clamp the QAT reference "
        "as the converted model does",
    )


def onednn_epilogue(ev: LayerEvidence) -> Cause | None:
    """Rule 13: oneDNN's requantization epilogue has a shape-dependent float order.

    Applies to layers that ran the ``"onednn"`` scheme, conv on the x86 engine (oneDNN
    on VNNI CPUs) and linear/conv on the onednn engine: a few outputs per million differ
    by exactly 1 LSB. Named when the worst difference is 1 LSB and the mismatch rate is
    at most ``1e-4``.

    >>> codes = np.zeros(100_000, np.uint8)
    >>> ref = codes.copy(); ref[7] = 1
    >>> onednn_epilogue(LayerEvidence("conv1", "conv2d", "x86", codes, ref)).strength
    'likely'
    """
    if not _is_weighted(ev.kind) or not _torch_kernels(ev):
        return None
    x86_conv = ev.engine == "x86" and ev.kind.startswith("conv")
    if not (ev.scheme == "onednn" or ev.engine == "onednn" or x86_conv):
        return None
    if not ev.compared:
        return Cause(
            "13",
            "onednn_epilogue",
            "risk",
            "oneDNN conv/linear: about 1-2 outputs per million may differ by 1 LSB "
            "(kernel-dependent float32 order of the requantization epilogue)",
            "none needed within 1 LSB; engine='fbgemm' is bit-exact",
        )
    n, worst, rate = _mismatch_stats(ev)
    if n == 0 or worst != 1 or rate > _ONEDNN_RATE:
        return None
    return Cause(
        "13",
        "onednn_epilogue",
        "likely",
        f"{n} outputs ({rate:.2g}) off by 1 LSB on oneDNN: its epilogue's float32 order "
        "depends on the kernel chosen for the shape",
        "none needed within 1 LSB; engine='fbgemm' is bit-exact",
    )


def bias_rounding(ev: LayerEvidence) -> Cause | None:
    """Rules 11 vs 12: float bias (FBGEMM) against a bias rounded to int32.

    FBGEMM adds ``f32(b/(s_x·s_w))`` in float before rounding (rule 11); QNNPACK and most
    hand simulations add ``rint(b/(s_x·s_w))`` to the int32 accumulator (rule 12). The two
    differ by at most 1 LSB, only where the fraction of the bias moves a rounding.
    Named for a biased linear/conv layer against a hand reference, or across engines,
    when every mismatch is 1 LSB. The message says which side rounds: a layer whose
    scheme (or engine) rounds the bias to int32 (``"qnnpack"``, the TFLite/LiteRT
    schemes) is the rounding side, and the reference then kept it in float.

    >>> ev = LayerEvidence("fc1", "linear", "fbgemm", np.array([5, 7]), np.array([5, 6]),
    ...                    has_bias=True, reference_kind="hand")
    >>> bias_rounding(ev).rule
    '11,12'
    """
    if not _is_weighted(ev.kind) or not ev.has_bias or not ev.compared:
        return None
    if ev.reference_kind != "hand":
        return None
    n, worst, _ = _mismatch_stats(ev)
    if n == 0 or worst != 1:
        return None
    rounds = ev.scheme in _INT32_BIAS_SCHEMES or (
        ev.scheme is None
        and ev.engine is not None
        and engine_family(ev.engine) in _INT32_BIAS_SCHEMES
    )
    if rounds:
        what = (
            f"the bias is rounded to int32 here (scheme {ev.scheme or ev.engine!r}, rules 12, "
            "19) and kept in float before rounding in the reference (FBGEMM, rule 11)"
        )
        fix = "keep the bias in float like the reference: a float-bias scheme ('fbgemm')"
    else:
        what = (
            "the bias is kept in float before rounding here (FBGEMM, rule 11) and rounded "
            "to int32 first in the reference (rule 12)"
        )
        fix = "add the bias as f32(b·f32(1/(s_x·s_w))) to f32(acc) before requantizing"
    return Cause("11,12", "bias_rounding", "likely", f"{n} outputs off by 1 LSB: {what}", fix)


def _own_torch_mismatch(ev: LayerEvidence) -> bool:
    """A torch reference was compared and the layer's own input agrees with it (a layer
    fed differing input inherits its difference instead)."""
    return ev.reference_kind == "torch" and ev.compared and not ev.input_differs


def engine_mismatch(ev: LayerEvidence) -> Cause | None:
    """Rules 11-17: the program was imported for one torch engine and torch ran another.

    Engines requantize differently (fbgemm: float bias, f32 multiplier, rule 11; qnnpack:
    int32 bias, reciprocal multiplier, rule 12; onednn: rule 13) and compute add (15, 16)
    and pools (17) differently, so an import for the wrong engine differs by an LSB here
    and there. Named for a layer whose own input agrees with the reference (a layer fed
    differing input inherits its difference instead).

    >>> ev = LayerEvidence("fc1", "linear", "qnnpack", np.array([5, 7]), np.array([5, 6]),
    ...                    reference_engine="fbgemm")
    >>> c = engine_mismatch(ev)
    >>> c.name, c.fix
    ('engine_mismatch', "import with engine='fbgemm', the engine torch ran")
    """
    if not _own_torch_mismatch(ev) or ev.engine is None or ev.reference_engine is None:
        return None
    if engine_family(ev.engine) == engine_family(ev.reference_engine):
        return None
    n, worst, _ = _mismatch_stats(ev)
    if n == 0:
        return None
    return Cause(
        "11-17",
        "engine_mismatch",
        "likely",
        f"{n} outputs differ (up to {worst} LSB): the program was imported for engine "
        f"{ev.engine!r} (scheme {ev.scheme or 'n/a'}) but torch ran {ev.reference_engine!r}; "
        "the engines requantize (rules 11-13), add (15, 16) and pool (17) differently",
        f"import with engine={ev.reference_engine!r}, the engine torch ran",
    )


def level_mismatch(ev: LayerEvidence) -> Cause | None:
    """Rule 14: the program emulates one CPU level and torch ran at another.

    FBGEMM and oneDNN accumulate exactly on VNNI/AMX CPUs and in saturating int16 pairs
    on AVX2 / AVX-512 CPUs without VNNI, and the x86 engine routes convs by the CPU
    (:mod:`qjax.kernels._levels`). Named for a linear/conv layer of an fbgemm, x86 or
    onednn program whose level (``program.level``) falls on the other side of VNNI from
    torch's (:func:`qjax.kernels.host_level` when the reference ran), when the layer's
    own input agrees with the reference.

    >>> ev = LayerEvidence("fc1", "linear", "x86", np.array([5, 7]), np.array([5, 9]),
    ...                    level="vnni", reference_level="avx2")
    >>> c = level_mismatch(ev)
    >>> c.name, c.fix
    ('level_mismatch', "import with isa='avx2', the CPU level torch ran at")
    """
    if not _own_torch_mismatch(ev):
        return None
    if not _is_weighted(ev.kind) or ev.engine not in SATURATING_ENGINES:
        return None
    if ev.level is None or ev.reference_level is None:
        return None
    if (ev.level in SATURATING_LEVELS) == (ev.reference_level in SATURATING_LEVELS):
        return None
    n, worst, _ = _mismatch_stats(ev)
    if n == 0:
        return None
    return Cause(
        "14",
        "level_mismatch",
        "likely",
        f"{n} outputs differ (up to {worst} LSB): the program emulates engine "
        f"{ev.engine!r} on a {ev.level!r} CPU but torch ran at level {ev.reference_level!r}; "
        "FBGEMM/oneDNN accumulate in saturating int16 pairs without VNNI and exactly with "
        "it, and x86 convs run oneDNN only on VNNI CPUs",
        f"import with isa={ev.reference_level!r}, the CPU level torch ran at",
    )


RULES: tuple[Callable[[LayerEvidence], Cause | None], ...] = (
    engine_mismatch,
    level_mismatch,
    weight_at_clamp_bound,
    int16_saturation,
    zero_point_tie,
    reduce_range_clamp,
    onednn_epilogue,
    bias_rounding,
)


def diagnose(ev: LayerEvidence) -> list[Cause]:
    """Run every rule of :data:`RULES` on one layer; the causes that apply, in order.

    >>> diagnose(LayerEvidence("relu", "relu"))
    []
    """
    return [c for c in (rule(ev) for rule in RULES) if c is not None]
