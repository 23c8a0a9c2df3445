"""Elementwise integer kernels: add, mul, concat, clamps, reshapes, boundaries.

Notation as in ``shared/NUMERICS.md``: ``f32(e)`` rounds to float32 (nearest even),
``rint`` rounds half to even, ``inv(s) = f32(1/f32(s))``, ``fma(a, b, c)`` is ``a·b + c``
rounded once; ``clamp`` is to the output range (raised to ``zp_o`` by a fused ReLU).

``quantized_add(a, b, out)`` (``c`` is the float sum, computed as written):

===========================  =================================================================
scheme                       output code
===========================  =================================================================
``"fbgemm"``, ``"x86"``,     ATen's ``qadd_kernel`` (rule 15). Vector body:
``"onednn"``                 ``c = f32(fma(s_a, a, f32(-zp_a·s_a)) + fma(s_b, b, f32(-zp_b·s_b)))``,
                             ``clamp(rint(f32(c·inv(s_o))) + zp_o)``. The last ``n mod 64``
                             elements (``n`` = element count, positions in the row-major
                             order of the output, i.e. torch's memory order) take the scalar
                             path: ``c = f32(f32(s_a·(a-zp_a)) + f32(s_b·(b-zp_b)))``,
                             ``clamp(rint(f32(f32(c·inv(s_o)) + zp_o)))``. ReLU: ``c = max(c, 0)``.
``"qnnpack"`` (rule 16)      QNNPACK fixed point: ``r_a = f32(s_a/s_o)``, ``r_b = f32(s_b/s_o)``,
                             ``shift = 21 - floor(log2 max(r_a, r_b))``,
                             ``m_x = rint(r_x·2^shift)``;
                             ``acc = m_a·(a-zp_a) + m_b·(b-zp_b)`` (int32);
                             ``clamp(round_half_away(acc / 2^shift) + zp_o)`` (QNNPACK's
                             remainder/threshold rounding); quint8 only
``"exact"``                  ``clamp(rint((s_a(a-zp_a) + s_b(b-zp_b))/s_o) + zp_o)`` in
                             float64 (the sum is exact while the scales are within 2^20 of
                             each other; a reference, not an engine)
===========================  =================================================================

The ATen rule is verified with torch on one thread (the test suite). With several
threads and 32768 or more elements torch splits the range, and each chunk could end in
its own scalar tail; a check with 2 threads (10 tensors of 100,003 elements, random and
tie-heavy qparams, 1,000,030 outputs) gave 0 mismatches with the single-tail rule, but
that case is not covered by the tests. torch takes the *output* scale as a float64; here
it is a float32 (pass float32-representable scales to torch to compare). The position of
the scalar tail is a static function of the shape; ``tail`` (default 64,
``2·Vectorized<quint8>::size()`` of the AVX2 kernel that torch 2.13 runs ``qadd`` with
on this AVX512 CPU, measured) can be changed.

Clamps on codes (rule 17): ``relu(q) = max(q, zp)``; ``hardtanh(q, lo, hi) =
clamp(q, quantize_val(lo), quantize_val(hi))`` with torch's scalar ``quantize_val(v) =
clamp(rint(f32(f32(v·inv(s)) + zp)))``; ``relu6 = hardtanh(0, 6)``.

``quantized_mul(a, b, out)`` is torch's ``quantized::mul`` (ATen ``qmul_kernel``, every
engine): ``M = f32(f64(s_a)·f64(s_b)/f64(s_o))``, ``clamp(rint(f32((a-zp_a)(b-zp_b)·M)) +
zp_o)``, ReLU as ``max(·, zp_o)``.

``quantized_mul_scalar(q, c)`` is torch's ``quantized::mul_scalar``: no arithmetic on the
codes, only new qparams: ``c > 0``: scale ``s·c``, codes unchanged; ``c == 0``: scale 1,
zero point 0, codes 0 (clamped into range); ``c < 0``: scale ``s·|c|``, zero point
``qmax - (zp - qmin)``, codes ``qmax - (q - qmin)``. The new scale is ``f32(f64(s)·c)``.

``quantized_cat(xs, axis, out)`` is torch's generic ``quantized::cat``: every input is
dequantized (rule 3, ``f32(q-zp)·s``), concatenated, and quantized with
``torch.quantize_per_tensor`` (rule 1, ``clamp(rint(fma(x, inv(s_o), zp_o)))``); inputs
whose qparams already equal the output's pass unchanged (that is what rule 1 ∘ rule 3
gives for them too). torch's channels-last fast path (``dim=1`` on 4-d channels-last
tensors, ``qcat_nhwc_kernel``) rounds differently: ``nhwc_fast_path=True`` (see
:func:`quantized_cat`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np

from .._float import div_f32 as _div
from .._float import div_ieee as _div_ieee
from .._float import fma_f32 as _fma_f32
from .._float import materialize as _m
from .._primitives import _rounded_zp
from .._primitives import dequantize as _dequantize
from .._primitives import quantize as _quantize
from .._qarray import QArray
from .._spec import QParams
from ._native._quantize import dequantize_native as _dequantize_native
from ._native._quantize import quantize_fma as _quantize_fma
from ._native._quantize import quantize_status as _quantize_status
from ._native._quantize import relu_native as _relu_native

__all__ = [
    "AddScheme",
    "dequantize_output",
    "flatten",
    "hardtanh",
    "quantize_input",
    "quantized_add",
    "quantized_cat",
    "quantized_mul",
    "quantized_mul_scalar",
    "relu",
    "relu6",
    "reshape",
]

AddScheme = Literal["fbgemm", "x86", "onednn", "qnnpack", "exact"]
_ATEN = ("fbgemm", "x86", "onednn")
_ADD_SCHEMES = (*_ATEN, "qnnpack", "exact")


def _f32(v) -> jax.Array:
    return jnp.asarray(v, jnp.float32)


def _i32(v) -> jax.Array:
    return jnp.asarray(v, jnp.int32)


def _per_tensor(x: QArray, what: str) -> tuple[jax.Array, jax.Array]:
    if not isinstance(x, QArray):
        raise TypeError(f"{what}: expected a QArray, got {type(x).__name__}")
    if x.spec.granularity != "tensor":
        raise ValueError(f"{what}: needs per-tensor qparams, got axis={x.spec.axis}")
    return _f32(x.scale).reshape(()), _i32(x.zero_point).reshape(())


def _out_params(out: QParams, what: str) -> tuple[jax.Array, jax.Array]:
    if not isinstance(out, QParams):
        raise TypeError(f"{what}: out_qparams must be a QParams, got {type(out).__name__}")
    if out.spec.granularity != "tensor":
        raise ValueError(f"{what}: output qparams must be per-tensor")
    z = jnp.asarray(out.zero_point)
    if jnp.issubdtype(z.dtype, jnp.floating):
        raise TypeError(f"{what}: output zero point must be an integer")
    return _f32(out.scale).reshape(()), z.astype(jnp.int32).reshape(())


def _bounds(out: QParams, zo, activation, what):
    if activation not in (None, "relu"):
        raise ValueError(f"{what}: unsupported activation {activation!r}; use None or 'relu'")
    lo, hi = _i32(out.spec.qmin), _i32(out.spec.qmax)
    if activation == "relu":
        lo = jnp.maximum(lo, zo)
    return lo, hi


def _clamp_float_codes(v: jax.Array, lo, hi) -> jax.Array:
    """float32 holding an integer code -> int32 in ``[lo, hi]`` (saturating)."""
    return jnp.clip(v, lo.astype(jnp.float32), hi.astype(jnp.float32)).astype(jnp.int32)


def _tail_mask(shape: tuple[int, ...], tail: int) -> np.ndarray:
    n = int(np.prod(shape, dtype=np.int64))
    start = n - n % tail if tail > 0 else n
    return (np.arange(n) >= start).reshape(shape)


def quantized_add(
    a: QArray,
    b: QArray,
    out_qparams: QParams,
    *,
    scheme: AddScheme = "fbgemm",
    activation: Literal["relu"] | None = None,
    tail: int = 64,
) -> QArray:
    """``a + b`` requantized to ``out_qparams``: torch's ``quantized::add`` / ``add_relu``.

    Formulas per scheme in the module docstring (rules 15 and 16). ``a`` and ``b`` are
    per-tensor QArrays of the same shape (``"qnnpack"``: both ``uint8``); the result has
    ``out_qparams``' dtype. ``activation="relu"`` is ``add_relu``.

    Args:
      a, b: per-tensor QArrays of one shape.
      out_qparams: per-tensor output qparams.
      scheme: ``"fbgemm"``/``"x86"``/``"onednn"`` (ATen kernel), ``"qnnpack"`` or
        ``"exact"``.
      activation: ``None`` or ``"relu"``.
      tail: ATen schemes: the last ``n mod tail`` elements take the scalar path.

    >>> from qjax import QuantSpec, QParams
    >>> u8 = QuantSpec(signed=False)
    >>> a = QArray(jnp.array([0, 100, 200, 255], jnp.uint8), QParams(0.1, 128, u8))
    >>> b = QArray(jnp.array([10, 20, 30, 40], jnp.uint8), QParams(0.05, 0, u8))
    >>> quantized_add(a, b, QParams(0.2, 64, u8)).values
    Array([  2,  55, 108, 138], dtype=uint8)
    >>> quantized_add(a, b, QParams(0.2, 64, u8), scheme="qnnpack", activation="relu").values
    Array([ 64,  64, 108, 138], dtype=uint8)
    """
    if scheme not in _ADD_SCHEMES:
        raise ValueError(f"quantized_add: unknown scheme {scheme!r}; known: {_ADD_SCHEMES}")
    sa, za = _per_tensor(a, "quantized_add")
    sb, zb = _per_tensor(b, "quantized_add")
    so, zo = _out_params(out_qparams, "quantized_add")
    if a.shape != b.shape:
        raise ValueError(f"quantized_add: shapes differ: {a.shape} vs {b.shape}")
    lo, hi = _bounds(out_qparams, zo, activation, "quantized_add")
    av, bv = _i32(a.values), _i32(b.values)
    if scheme in _ATEN:
        codes = _add_aten(av, bv, sa, za, sb, zb, so, zo, lo, hi, activation, tail)
    elif scheme == "qnnpack":
        if a.dtype != np.uint8 or b.dtype != np.uint8:
            raise TypeError("quantized_add: scheme 'qnnpack' takes uint8 (quint8) inputs")
        codes = _add_qnnpack(av, bv, sa, za, sb, zb, so, zo, lo, hi)
    else:
        codes = _add_exact(av, bv, sa, za, sb, zb, so, zo, lo, hi, activation)
    return QArray(codes.astype(out_qparams.spec.dtype), out_qparams)


def _add_aten(av, bv, sa, za, sb, zb, so, zo, lo, hi, activation, tail):
    inv = _m(_div(1.0, so))
    # vector body: fma dequantize with the premultiplied zero point
    pa = _m(sa * (-za).astype(jnp.float32))
    pb = _m(sb * (-zb).astype(jnp.float32))
    da = _fma_f32(jnp.broadcast_to(sa, av.shape), av.astype(jnp.float32), pa)
    db = _fma_f32(jnp.broadcast_to(sb, bv.shape), bv.astype(jnp.float32), pb)
    cv = _m(da + db)
    # scalar tail: f32(s·(q - zp))
    ea = _m(sa * (av - za).astype(jnp.float32))
    eb = _m(sb * (bv - zb).astype(jnp.float32))
    cs = _m(ea + eb)
    if activation == "relu":
        cv = jnp.maximum(cv, jnp.float32(0.0))
        cs = jnp.maximum(cs, jnp.float32(0.0))
    # vector: rint(f32(c·inv)) + zp, in float (exact: |rint| < 2^24 or clamped anyway)
    vv = jnp.round(_m(cv * inv)) + zo.astype(jnp.float32)
    # scalar: rint(f32(f32(c·inv) + zp)); fma(p, 1, zp) is the separately rounded sum
    ps = _m(cs * inv)
    vs = jnp.round(
        _fma_f32(ps, jnp.float32(1.0), jnp.broadcast_to(zo, ps.shape).astype(jnp.float32))
    )
    v = jnp.where(_tail_mask(av.shape, tail), vs, vv)
    return _clamp_float_codes(v, lo, hi)


def _add_qnnpack(av, bv, sa, za, sb, zb, so, zo, lo, hi):
    ra = _m(_div(sa, so))
    rb = _m(_div(sb, so))
    rmax = jnp.maximum(ra, rb)
    _, e = jnp.frexp(rmax)  # rmax = f·2^e, f in [1/2, 1): floor(log2) = e - 1
    shift = _i32(21) - (e.astype(jnp.int32) - 1)
    pw = jax.lax.bitcast_convert_type((shift + 127) << 23, jnp.float32)  # 2^shift, exact
    ma = jnp.round(ra * pw).astype(jnp.int32)
    mb = jnp.round(rb * pw).astype(jnp.int32)
    # products fit int32: multipliers < 2^22, |q - zp| <= 255
    acc = ma * (av - za) + mb * (bv - zb)
    mask = (_i32(1) << shift) - 1
    rem = (acc & mask) - (acc < 0).astype(jnp.int32)
    q = (acc >> shift) + (rem > (mask >> 1)).astype(jnp.int32)
    return jnp.clip(q + zo, lo, hi)


def _add_exact(av, bv, sa, za, sb, zb, so, zo, lo, hi, activation):
    with jax.enable_x64(True):
        f64 = jnp.float64
        c = sa.astype(f64) * (av - za).astype(f64) + sb.astype(f64) * (bv - zb).astype(f64)
        if activation == "relu":
            c = jnp.maximum(c, 0.0)
        v = jnp.round(c / so.astype(f64)) + zo.astype(f64)
        v = jnp.clip(v, lo.astype(f64), hi.astype(f64))
        return v.astype(jnp.int32)


# ---------------------------------------------------------------------------------------
# mul of two tensors


def quantized_mul(
    a: QArray,
    b: QArray,
    out_qparams: QParams,
    *,
    activation: Literal["relu"] | None = None,
) -> QArray:
    """``a · b`` requantized to ``out_qparams``: torch's ``quantized::mul`` / ``mul_relu``.

    ATen's ``qmul_kernel`` (the same for every engine; its vector and scalar paths agree):
    ``M = f32(f64(s_a)·f64(s_b)/f64(s_o))``, ``c = (a - zp_a)(b - zp_b)`` (int32),
    ``out = clamp(rint(f32(c·M)) + zp_o)``; ``"relu"`` then takes ``max(out, zp_o)``.

    >>> from qjax import QuantSpec, QParams
    >>> u8 = QuantSpec(signed=False)
    >>> a = QArray(jnp.array([0, 100, 200, 255], jnp.uint8), QParams(0.1, 128, u8))
    >>> b = QArray(jnp.array([10, 20, 30, 40], jnp.uint8), QParams(0.05, 0, u8))
    >>> quantized_mul(a, b, QParams(0.2, 64, u8)).values
    Array([ 32,  50, 118, 191], dtype=uint8)
    """
    sa, za = _per_tensor(a, "quantized_mul")
    sb, zb = _per_tensor(b, "quantized_mul")
    so, zo = _out_params(out_qparams, "quantized_mul")
    if a.shape != b.shape:
        raise ValueError(f"quantized_mul: shapes differ: {a.shape} vs {b.shape}")
    lo, hi = _bounds(out_qparams, zo, activation, "quantized_mul")
    with jax.enable_x64(True):
        p = _m(sa.astype(jnp.float64) * sb.astype(jnp.float64))  # exact
        mult = _m(_div_ieee(p, so.astype(jnp.float64)).astype(jnp.float32))
    c = (_i32(a.values) - za) * (_i32(b.values) - zb)
    v = jnp.round(_m(c.astype(jnp.float32) * mult)) + zo.astype(jnp.float32)
    codes = _clamp_float_codes(v, lo, hi)
    return QArray(codes.astype(out_qparams.spec.dtype), out_qparams)


# ---------------------------------------------------------------------------------------
# mul by a scalar


def quantized_mul_scalar(x: QArray, c: float) -> QArray:
    """``x · c`` for a Python float ``c``: torch's ``quantized::mul_scalar`` (new qparams).

    See the module docstring: codes are unchanged (``c > 0``), mirrored
    (``c < 0``: ``q' = qmax - (q - qmin)``, ``zp' = qmax - (zp - qmin)``) or zero
    (``c == 0``); the scale becomes ``f32(s·|c|)`` (1 for ``c == 0``).

    >>> from qjax import QuantSpec, QParams
    >>> x = QArray(jnp.array([0, 10, 255], jnp.uint8), QParams(0.5, 10, QuantSpec(signed=False)))
    >>> y = quantized_mul_scalar(x, -2.0)
    >>> y.values, y.scale, y.zero_point
    (Array([255, 245,   0], dtype=uint8), Array(1., dtype=float32), Array(245, dtype=int32))
    """
    s, z = _per_tensor(x, "quantized_mul_scalar")
    c = float(c)
    spec = x.spec
    qmin, qmax = spec.qmin, spec.qmax
    if c > 0:
        with jax.enable_x64(True):
            ns = (s.astype(jnp.float64) * c).astype(jnp.float32)
        return QArray(x.values, QParams(ns, z, spec))
    if c == 0:
        zero = jnp.clip(_i32(0), qmin, qmax)
        vals = jnp.full(x.shape, zero, spec.dtype)
        return QArray(vals, QParams(jnp.float32(1.0), zero, spec))
    with jax.enable_x64(True):
        ns = (s.astype(jnp.float64) * abs(c)).astype(jnp.float32)
    vals = (_i32(qmax) - (_i32(x.values) - qmin)).astype(spec.dtype)
    return QArray(vals, QParams(ns, _i32(qmax) - (z - qmin), spec))


# ---------------------------------------------------------------------------------------
# concat


def quantized_cat(
    xs: Sequence[QArray], axis: int, out_qparams: QParams, *, nhwc_fast_path: bool = False
) -> QArray:
    """Concatenate per-tensor QArrays along ``axis``, requantized to ``out_qparams``.

    torch's generic ``quantized::cat``: ``quantize_per_tensor(cat(dequantize(x_i)))``
    (rules 3 and 1); see the module docstring.

    ``nhwc_fast_path=True`` emulates torch's channels-last kernel (``qcat_nhwc_kernel``,
    taken for 4-d channels-last inputs concatenated along ``dim=1``): the inputs are then
    ``(N, H, W, C_i)`` QArrays and ``axis`` must be the last one. Per input and pixel,
    channels ``c < C_i - C_i mod 8`` take the vector path
    ``rint(f32(fma(s_i, q, f32(-zp_i·s_i))·inv(s_o))) + zp_o``, the last ``C_i mod 8`` the
    scalar one ``rint(f32(f32(f32(s_i·(q - zp_i))·inv(s_o)) + zp_o))``.

    >>> from qjax import QuantSpec, QParams
    >>> u8 = QuantSpec(signed=False)
    >>> x = QArray(jnp.array([0, 3, 255], jnp.uint8), QParams(0.5, 3, u8))
    >>> y = QArray(jnp.array([7, 9], jnp.uint8), QParams(0.25, 8, u8))
    >>> quantized_cat([x, y], 0, QParams(0.5, 3, u8)).values
    Array([  0,   3, 255,   2,   4], dtype=uint8)
    """
    xs = list(xs)
    if not xs:
        raise ValueError("quantized_cat: needs at least one input")
    so, zo = _out_params(out_qparams, "quantized_cat")
    parts = []
    for x in xs:
        s, z = _per_tensor(x, "quantized_cat")
        if not nhwc_fast_path:
            real = _dequantize(x.values, x.qparams)
            parts.append(_quantize(real, out_qparams, compat="torch"))
            continue
        if x.ndim != 4 or axis % 4 != 3:
            raise ValueError("quantized_cat: nhwc_fast_path takes 4-d NHWC inputs and axis=-1")
        qmin, qmax = out_qparams.spec.qmin, out_qparams.spec.qmax
        lo, hi = _i32(qmin), _i32(qmax)
        inv = _m(_div(1.0, so))
        qi = _i32(x.values)
        pre = _m(s * (-z).astype(jnp.float32))
        vec = _fma_f32(jnp.broadcast_to(s, qi.shape), qi.astype(jnp.float32), pre)
        vv = jnp.round(_m(vec * inv)) + zo.astype(jnp.float32)
        sc = _m(s * (qi - z).astype(jnp.float32))
        zf = jnp.broadcast_to(zo.astype(jnp.float32), qi.shape)
        vs = jnp.round(_fma_f32(_m(sc * inv), jnp.float32(1.0), zf))
        c = x.shape[3]
        mask = (np.arange(c) < c - c % 8).reshape(1, 1, 1, c)
        codes = _clamp_float_codes(jnp.where(mask, vv, vs), lo, hi)
        parts.append(codes.astype(out_qparams.spec.dtype))
    return QArray(jnp.concatenate(parts, axis=axis), out_qparams)


# ---------------------------------------------------------------------------------------
# clamps on codes


def relu(x: QArray, kernel: str = "xla") -> QArray:
    """Quantized ReLU on codes: ``max(q, zp)`` (rule 17), qparams unchanged.

    ``kernel``: ``"xla"`` (default) or ``"auto"``: one native call for per-tensor 8-bit
    codes where :func:`qjax.kernels._native._quantize.quantize_status` says it runs (the
    same codes, not ``jax.export``-able), there for the reason of
    :func:`dequantize_output`'s: between native layers it keeps the program on the
    calling thread.

    >>> from qjax import QuantSpec, QParams
    >>> u8 = QuantSpec(signed=False)
    >>> x = QArray(jnp.array([0, 99, 100, 250], jnp.uint8), QParams(0.1, 100, u8))
    >>> relu(x).values
    Array([100, 100, 100, 250], dtype=uint8)
    >>> relu(x, kernel="auto").values
    Array([100, 100, 100, 250], dtype=uint8)
    """
    _, z = _per_tensor(x, "relu")

    def xla(v):
        return jnp.maximum(_i32(v), z).astype(v.dtype)

    spec = _native_spec("relu", kernel, x.qparams)
    if spec is not None and x.values.dtype == jnp.dtype(spec.dtype):
        return QArray(_relu_native(x.values, z.astype(x.dtype), xla), x.qparams)
    return QArray(xla(x.values), x.qparams)


def _quantize_val(v: float, s: jax.Array, z: jax.Array, qmin: int, qmax: int) -> jax.Array:
    """torch's scalar ``quantize_val``: ``clamp(rint(f32(f32(v·inv(s)) + zp)))``, int32."""
    inv = _m(_div(1.0, s))
    p = _m(_f32(v) * inv)
    r = jnp.round(_fma_f32(p, jnp.float32(1.0), z.astype(jnp.float32)))
    return jnp.clip(r, jnp.float32(qmin), jnp.float32(qmax)).astype(jnp.int32)


def hardtanh(x: QArray, min_val: float = -1.0, max_val: float = 1.0) -> QArray:
    """Quantized hardtanh on codes: ``clamp(q, quantize_val(min), quantize_val(max))``.

    As torch's ``hardtanh`` / ``clamp`` on a quantized tensor (``qclamp_kernel``); the
    bounds are quantized with torch's scalar ``quantize_val`` (module docstring).

    >>> from qjax import QuantSpec, QParams
    >>> u8 = QuantSpec(signed=False)
    >>> x = QArray(jnp.array([0, 90, 128, 200], jnp.uint8), QParams(0.05, 128, u8))
    >>> hardtanh(x).values
    Array([108, 108, 128, 148], dtype=uint8)
    """
    s, z = _per_tensor(x, "hardtanh")
    lo = _quantize_val(min_val, s, z, x.spec.qmin, x.spec.qmax)
    hi = _quantize_val(max_val, s, z, x.spec.qmin, x.spec.qmax)
    v = jnp.minimum(jnp.maximum(_i32(x.values), lo), hi)
    return QArray(v.astype(x.dtype), x.qparams)


def relu6(x: QArray) -> QArray:
    """Quantized ReLU6: ``clamp(q, zp, quantize_val(6))`` (torch's ``quantized::relu6``).

    >>> from qjax import QuantSpec, QParams
    >>> u8 = QuantSpec(signed=False)
    >>> x = QArray(jnp.array([0, 90, 128, 255], jnp.uint8), QParams(0.05, 100, u8))
    >>> relu6(x).values
    Array([100, 100, 128, 220], dtype=uint8)
    """
    return hardtanh(x, 0.0, 6.0)


# ---------------------------------------------------------------------------------------
# shape ops and boundaries


def reshape(x: QArray, shape: Sequence[int]) -> QArray:
    """Reshape the codes (per-tensor qparams, unchanged).

    >>> from qjax import QuantSpec, QParams
    >>> x = QArray(jnp.arange(6, dtype=jnp.uint8), QParams(0.1, 0, QuantSpec(signed=False)))
    >>> reshape(x, (2, 3)).shape
    (2, 3)
    """
    _per_tensor(x, "reshape")
    return QArray(jnp.reshape(x.values, tuple(shape)), x.qparams)


def flatten(x: QArray, start_dim: int = 1, end_dim: int = -1) -> QArray:
    """``torch.flatten`` on codes (per-tensor qparams, unchanged).

    >>> from qjax import QuantSpec, QParams
    >>> x = QArray(jnp.zeros((2, 3, 4, 5), jnp.uint8), QParams(0.1, 0, QuantSpec(signed=False)))
    >>> flatten(x).shape
    (2, 60)
    """
    _per_tensor(x, "flatten")
    nd = x.ndim
    s, e = start_dim % max(nd, 1), end_dim % max(nd, 1)
    if s > e:
        raise ValueError(f"flatten: start_dim {start_dim} after end_dim {end_dim}")
    shp = x.shape
    new = shp[:s] + (int(np.prod(shp[s : e + 1], dtype=np.int64)),) + shp[e + 1 :]
    return QArray(jnp.reshape(x.values, new), x.qparams)


def quantize_input(x: jax.Array, qparams: QParams, kernel: str = "xla") -> QArray:
    """Float input -> QArray, as ``torch.quantize_per_tensor`` does (rule 1, ``compat="torch"``):
    ``q = NaN(r) ? qmax : clamp(r, qmin, qmax)``, ``r = rint(fma(x, f32(1/s), z))`` per
    tensor (per axis ``rint(f32(f32(x·inv(s)) + z))``, NaN -> 0).

    ``x`` float (computed in float32), codes in ``qparams.spec.dtype``. ``kernel``:
    ``"xla"`` (default) computes it in XLA, emulating the fma's single rounding in
    float64; ``"auto"`` uses the native AVX2+FMA call for per-tensor int8/uint8 specs
    where :func:`qjax.kernels._native._quantize.quantize_status` says it runs (the same
    codes, a single pass; not ``jax.export``-able), XLA otherwise.

    >>> from qjax import QuantSpec, QParams
    >>> u8 = QuantSpec(signed=False)
    >>> quantize_input(jnp.array([-1.0, 0.26, 1.0]), QParams(0.5, 128, u8)).values
    Array([126, 129, 130], dtype=uint8)
    >>> quantize_input(jnp.array([-1.0, 0.26, 1.0]), QParams(0.5, 128, u8), "auto").values
    Array([126, 129, 130], dtype=uint8)
    """
    codes = native_quantize(x, qparams, "torch", kernel, "quantize_input")
    if codes is None:
        codes = _quantize(x, qparams, compat="torch")
    return QArray(codes, qparams)


def native_quantize(x, qparams: QParams, compat: str, kernel: str, who: str):
    """``qjax.quantize(x, qparams, compat=compat)``'s codes from one native call, or
    ``None`` where that call does not apply (``kernel="xla"``; not a per-tensor 8-bit
    half-even spec, float input and the native library here): ``compat="torch"`` is
    ``rint(fma(x, f32(1/s), z))`` (:func:`quantize_input`), ``"qjax"``
    ``rint(f32(x·f32(1/s))) + z`` (a converted Flax model's quantize step); NaN gives
    ``qmax`` in both."""
    if compat not in ("torch", "qjax"):
        raise ValueError(f"{who}: the native quantize computes compat 'torch' or 'qjax'")
    spec = _native_spec(who, kernel, qparams)
    if (
        spec is None
        or spec.rounding != "half_even"  # else the XLA path names the problem
        or not jnp.issubdtype(jnp.result_type(x), jnp.floating)
    ):
        return None
    x = jnp.asarray(x)
    qparams.check(x.shape)
    inv = jnp.float32(1.0) / jnp.asarray(qparams.scale, jnp.float32)
    zf = _rounded_zp(jnp.asarray(qparams.zero_point), spec)
    return _quantize_fma(
        x, inv, zf, spec.qmin, spec.qmax, spec.qmax, spec.dtype,
        portable=lambda v: _quantize(v, qparams, compat=compat), fma=compat == "torch",
    )  # fmt: skip


def dequantize_output(x: QArray, dtype=jnp.float32, kernel: str = "xla") -> jax.Array:
    """QArray -> float, as torch's ``dequantize`` (rule 3): ``f32(q - zp)·s``.

    ``x`` integer codes, out ``dtype`` (computed in float32). ``kernel``: ``"xla"``
    (default) or ``"auto"``: one native call for per-tensor int8/uint8 codes and a
    float32 output where :func:`qjax.kernels._native._quantize.quantize_status` says it
    runs (the same floats, not ``jax.export``-able), XLA otherwise. The native call is
    there for XLA's CPU client, which runs a program of fewer than 1000 XLA flops on the
    calling thread and hands others to its pool (a thread wake-up per call): after
    native layers and a native :func:`quantize_input`, it keeps the program on the caller.

    >>> from qjax import QuantSpec, QParams
    >>> u8 = QuantSpec(signed=False)
    >>> dequantize_output(QArray(jnp.array([126, 130], jnp.uint8), QParams(0.5, 128, u8)))
    Array([-1.,  1.], dtype=float32)
    >>> q = QArray(jnp.array([126, 130], jnp.uint8), QParams(0.5, 128, u8))
    >>> dequantize_output(q, kernel="auto")
    Array([-1.,  1.], dtype=float32)
    """
    if not isinstance(x, QArray):
        raise TypeError(f"dequantize_output: expected a QArray, got {type(x).__name__}")
    spec = _native_spec("dequantize_output", kernel, x.qparams)
    if (
        spec is not None
        and jnp.dtype(dtype) == jnp.dtype(jnp.float32)
        and x.values.dtype == jnp.dtype(spec.dtype)
    ):
        qp = x.qparams
        qp.check(x.values.shape)
        zp = _rounded_zp(jnp.asarray(qp.zero_point), spec).astype(jnp.int32)
        return _dequantize_native(
            x.values, qp.scale, zp, portable=lambda v: _dequantize(v, qp, dtype=dtype)
        )
    return _dequantize(x.values, x.qparams, dtype=dtype)


def _native_spec(who: str, kernel: str, qparams):
    """The spec of ``qparams`` when an op on 8-bit codes (boundary quantize / dequantize,
    ReLU) may run natively (``kernel="auto"``, per-tensor 8-bit codes, the native library
    here), else ``None``."""
    if kernel not in ("xla", "auto"):
        raise ValueError(f"{who}: kernel must be 'xla' or 'auto', got {kernel!r}")
    spec = qparams.spec if isinstance(qparams, QParams) else None
    if (
        kernel == "auto"
        and spec is not None
        and spec.granularity == "tensor"
        and jnp.dtype(spec.dtype) in (jnp.dtype(jnp.int8), jnp.dtype(jnp.uint8))
        and _quantize_status()[0]
    ):
        return spec
    return None
