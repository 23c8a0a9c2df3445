"""quantize, dequantize, fake_quant: pure functions with custom gradients.

Formulas (``s`` scale, ``z`` zero point, ``inv = f32(1/s)``, ``clamp`` to the spec's
``[qmin, qmax]``, ``f32`` = round to float32):

=====================  ==========================================================
``compat``             integer code ``q`` of a float ``x``
=====================  ==========================================================
``"qjax"``             ``clamp(round(x·inv) + z)``, ``round`` by ``spec.rounding``
``"torch"``            quantize per-tensor ``clamp(rint(fma(x, inv, z)))`` (rule 1);
                       per-axis ``clamp(rint(f32(f32(x·inv) + z)))`` (rule 2);
                       fake-quant ``clamp(rint(f32(x·inv)) + z)`` (rule 4)
``"tflite"``           ``clamp(round_half_away(x / s) + z)``
=====================  ==========================================================

``"qjax"`` multiplies by the float32 reciprocal, as torch's fake-quant does, so its
codes equal torch's fake-quant codes; it is also what XLA computes for any
division by a broadcast scale under ``jit``, so the rule does not depend on whether
a function is jitted. ``"tflite"``'s ``x / s`` is the IEEE float32 quotient (formed in
float64 and rounded once, since XLA would otherwise multiply by the reciprocal).
``dequantize(q) = f32(q - z) · s`` in every mode
(rule 3); ``fake_quant(x) = dequantize(q)``. In ``"qjax"`` mode ``fake_quant(x) ==
dequantize(quantize(x))`` bit for bit, which is what makes QAT and int8 serving agree.
``±inf`` go to the bounds. NaN codes to ``qmax`` in ``"qjax"``/``"tflite"`` modes; with
``compat="torch"`` NaN gives what torch gives: ``qmax`` from per-tensor ``quantize``,
code ``0`` from per-axis ``quantize`` (the float->int conversion of NaN), ``qmin``
from ``fake_quant`` (``fmax(NaN, qmin)``; per-axis fake-quant also sends codes
``>= 2^63``, e.g. ``+inf``, to ``qmin``: torch casts them to int64 first).

Gradients of :func:`fake_quant` (``grad=``), ``m = [qmin <= q_unclamped <= qmax]``:

==================  =========================================================================
``"ste"``           ``dx = g·m`` (PyTorch's inclusive mask on the unclamped code)
``"clipped_ste"``   ``dx = g·[s(qmin-z) <= x <= s(qmax-z)]`` (mask on the real range)
``"identity"``      ``dx = g``
``"lsq"``           ``dx = g·m``; ``ds = g·(fq(x)-x)/s`` inside, ``g·(qmin-z)`` below,
                    ``g·(qmax-z)`` above; ``dz = -g·s`` outside, 0 inside; ``ds, dz``
                    times ``grad_scale`` (``"auto"``: ``1/sqrt(N·qmax)``), as torch's
                    ``_LearnableFakeQuantize`` (rule 10). With ``compat="torch"`` the
                    backward recomputes the code as torch's CPU kernel does (compiled
                    with FMA contraction): ``q = rint(fma(x, inv, zb))``, ``zb =
                    int(z + 0.5)`` per-tensor, ``rint(z)`` per-axis (both clamped);
                    ``m``, below/above from that ``q`` (NaN and ``q >= 2^63`` count
                    as below); ``ds = g·fma(clamp(q) - zb, s, -x)·inv`` inside
``"pact"``          ``dx = g·m``; ``ds = g·(qmax-z)`` above, ``g·(qmin-z)`` below, 0 inside
                    (the PACT clip gradient, with ``alpha = s·(qmax-z)``)
==================  =========================================================================
"""

from __future__ import annotations

import functools
from typing import Literal

import jax
import jax.numpy as jnp

from ._float import div_f32, fma_f32
from ._rounding import apply_rounding, round_half_away
from ._spec import QParams, broadcast_qparam, group_view, reduction_axes

QCompat = Literal["qjax", "torch", "tflite"]
Grad = Literal["ste", "clipped_ste", "identity", "lsq", "pact"]
_QCOMPATS = ("qjax", "torch", "tflite")
_GRADS = ("ste", "clipped_ste", "identity", "lsq", "pact")


def quantize(
    x: jax.Array, qp: QParams, *, compat: QCompat = "qjax", key: jax.Array | None = None
) -> jax.Array:
    """Quantize a float array to integer codes.

    ``q = clamp(round(x · f32(1/s)) + z, qmin, qmax)`` (``compat="qjax"``); the torch and
    tflite formulas are in the module docstring.

    Args:
      x: floating array (any float dtype; computed in float32).
      qp: :class:`QParams` whose shape fits ``x`` under ``qp.spec``.
      compat: ``"qjax"``, ``"torch"`` (``torch.quantize_per_tensor`` /
        ``quantize_per_channel``, bit-exact) or ``"tflite"``.
      key: PRNG key, required when ``qp.spec.rounding == "stochastic"``.

    Returns:
      integer array of ``qp.spec.dtype`` (int8, uint8, int16 or uint16), shape of ``x``.

    >>> from qjax import QuantSpec, QParams
    >>> qp = QParams(scale=0.5, zero_point=10, spec=QuantSpec(signed=False))
    >>> quantize(jnp.array([-1.0, 0.25, 0.75, 200.0]), qp)
    Array([  8,  10,  12, 255], dtype=uint8)
    """
    _check_float(x, "quantize")
    _check_compat(qp, compat, "quantize")
    spec = qp.spec
    xg, s, z = _operands(x, qp, "quantize")
    xg = xg.astype(jnp.float32)
    zf = _rounded_zp(z, spec)
    nan_code = spec.qmax
    if compat == "torch":
        inv = jnp.float32(1.0) / s
        if spec.granularity == "tensor":
            v = fma_f32(xg, inv, zf)
        else:
            # Two roundings, f32(f32(x·inv) + z): XLA contracts a plain x * inv + z
            # into an fma, so the sum is rounded explicitly (fma(p, 1, z) == f32(p + z)).
            v = fma_f32(xg * inv, jnp.float32(1.0), zf)
            nan_code = 0  # torch: clamp(NaN) stays NaN, then float->int gives 0
        r = jnp.round(v)
    else:
        r = _round_codes(xg, s, spec, compat, key) + zf
    q = jnp.where(jnp.isnan(r), nan_code, jnp.clip(r, spec.qmin, spec.qmax))
    return q.astype(spec.dtype).reshape(x.shape)


def dequantize(q: jax.Array, qp: QParams, *, dtype=jnp.float32) -> jax.Array:
    """Map integer codes back to real values: ``x = f32(q - z) · s``.

    Bit-exact with torch's ``dequantize`` per-tensor and per-channel (rule 3) for
    float32 scales.

    Args:
      q: integer array (any integer dtype).
      qp: :class:`QParams` fitting ``q``.
      dtype: output float dtype (computed in float32, then cast).

    Returns:
      float array of ``dtype``, shape of ``q``.

    >>> from qjax import QuantSpec, QParams
    >>> qp = QParams(scale=0.5, zero_point=10, spec=QuantSpec(signed=False))
    >>> dequantize(jnp.array([8, 10, 255], jnp.uint8), qp)
    Array([ -1. ,   0. , 122.5], dtype=float32)
    """
    codes = jnp.dtype(qp.spec.dtype).name if isinstance(qp, QParams) else "int8"
    _refuse_sequence(q, "dequantize", codes)
    q = jnp.asarray(q)
    if not jnp.issubdtype(q.dtype, jnp.integer):
        raise TypeError(
            f"dequantize expects integer codes, got dtype {q.dtype}; "
            "for float input use fake_quant (or quantize first)"
        )
    qg, s, z = _operands(q, qp, "dequantize")
    zf = _rounded_zp(z, qp.spec)
    y = (qg.astype(jnp.int32) - zf.astype(jnp.int32)).astype(jnp.float32) * s
    return y.astype(dtype).reshape(q.shape)


def fake_quant(
    x: jax.Array,
    qp: QParams,
    *,
    grad: Grad = "ste",
    compat: QCompat = "qjax",
    key: jax.Array | None = None,
    grad_scale: float | Literal["auto"] | None = None,
) -> jax.Array:
    """Quantize and dequantize in one differentiable step: ``dequantize(quantize(x))``.

    ``y = (clamp(round(x · f32(1/s)) + z) - z) · s`` (``compat="qjax"``); with
    ``compat="torch"`` it is bit-exact with ``torch.fake_quantize_per_{tensor,channel}
    _affine`` (rule 4: zero point added after rounding ``x·inv``). Gradient rules
    (``grad``) are tabled in the module docstring; ``"lsq"`` and ``"pact"`` give
    gradients to ``qp.scale`` (and ``qp.zero_point`` for LSQ, which may be float).

    Args:
      x: floating array.
      qp: :class:`QParams` fitting ``x``.
      grad: ``"ste"``, ``"clipped_ste"``, ``"identity"``, ``"lsq"`` or ``"pact"``.
      compat: ``"qjax"``, ``"torch"`` or ``"tflite"``.
      key: PRNG key for stochastic rounding.
      grad_scale: LSQ gradient factor for scale/zero point: a float, ``"auto"``
        (``1/sqrt(x.size·qmax)``, torch's ``use_grad_scaling``) or ``None`` (1).

    Returns:
      float32 array of ``x``'s shape.

    >>> from qjax import QuantSpec, QParams
    >>> qp = QParams(scale=0.5, zero_point=0, spec=QuantSpec(bits=4))
    >>> fake_quant(jnp.array([0.3, 1.0, 9.0]), qp)
    Array([0.5, 1. , 3.5], dtype=float32)
    >>> jax.grad(lambda x: fake_quant(x, qp).sum())(jnp.array([0.3, 1.0, 9.0]))
    Array([1., 1., 0.], dtype=float32)
    """
    _check_float(x, "fake_quant")
    _check_compat(qp, compat, "fake_quant")
    if grad not in _GRADS:
        raise ValueError(f"fake_quant grad must be one of {_GRADS}, got {grad!r}")
    if grad_scale is not None and grad_scale != "auto" and not isinstance(grad_scale, float):
        raise TypeError(f"grad_scale must be a float, 'auto' or None, got {grad_scale!r}")
    if grad_scale is not None and grad not in ("lsq",):
        raise ValueError(f"grad_scale applies to grad='lsq' only, got grad={grad!r}")
    qp.check(jnp.shape(x))
    x = jnp.asarray(x)
    gs = 1.0 if grad_scale is None else grad_scale
    if gs == "auto":
        gs = 1.0 / float(x.size * qp.spec.qmax) ** 0.5
    static = (qp.spec, compat, grad, float(gs))
    return _fq(static, x.astype(jnp.float32), qp.scale, qp.zero_point, key)


# --------------------------------------------------------------------------------------
# internals


def _refuse_sequence(x, fn: str, dtype: str) -> None:
    if isinstance(x, (list, tuple)):  # as jax.numpy functions do: no implicit conversion
        raise TypeError(
            f"{fn} requires an array or a scalar, got a {type(x).__name__}; "
            f"pass jnp.asarray(x, jnp.{dtype})"
        )


def _check_float(x, fn: str) -> None:
    _refuse_sequence(x, fn, "float32")
    dt = jnp.result_type(x)
    if not jnp.issubdtype(dt, jnp.floating):
        raise TypeError(
            f"{fn} expects a floating array, got dtype {dt}"
            + ("; integer codes go to dequantize" if fn == "quantize" else "")
        )


def _check_compat(qp: QParams, compat: str, fn: str) -> None:
    if not isinstance(qp, QParams):
        raise TypeError(f"{fn}: qp must be a QParams, got {type(qp).__name__}")
    if compat not in _QCOMPATS:
        raise ValueError(f"{fn}: compat must be one of {_QCOMPATS}, got {compat!r}")
    spec = qp.spec
    if compat != "qjax" and spec.rounding == "stochastic":
        raise ValueError(f"{fn}: stochastic rounding exists only with compat='qjax'")
    if compat == "torch":
        if spec.rounding != "half_even":
            raise ValueError(
                f"{fn}: compat='torch' rounds half to even; got spec.rounding={spec.rounding!r}"
            )
        if spec.granularity == "group":
            raise ValueError(
                f"{fn}: torch has no per-group {fn}; use compat='qjax' for group_size="
                f"{spec.group_size}"
            )


def _operands(x, qp: QParams, fn: str):
    x = jnp.asarray(x)
    try:
        qp.check(x.shape)
    except ValueError as e:
        raise ValueError(f"{fn}: {e}") from None
    xg = group_view(x, qp.spec)
    s = broadcast_qparam(jnp.asarray(qp.scale, jnp.float32), qp.spec, xg.shape)
    z = broadcast_qparam(jnp.asarray(qp.zero_point), qp.spec, xg.shape)
    return xg, s, z


def _rounded_zp(z, spec):
    """Integer-valued float32 zero point: float (learnable) zero points round half-even."""
    if jnp.issubdtype(z.dtype, jnp.floating):
        return jnp.clip(jnp.round(z), spec.qmin, spec.qmax).astype(jnp.float32)
    return z.astype(jnp.float32)


def _round_codes(xg, s, spec, compat, key):
    """``round(x·inv)`` (``round(x/s)`` for tflite) before the zero point, by compat."""
    if compat == "tflite":
        return round_half_away(div_f32(xg, s))
    v = xg * (jnp.float32(1.0) / s)
    return jnp.round(v) if compat == "torch" else apply_rounding(v, spec.rounding, key)


def _fq_forward(static, x, scale, zp, key):
    spec, compat, grad, gs = static
    xg, s, z = _operands(x, QParams.tree_unflatten(spec, (scale, zp)), "fake_quant")
    zf = _rounded_zp(z, spec)
    r = _round_codes(xg, s, spec, compat, key) + zf
    if compat == "torch":
        # fmax(NaN, qmin) = qmin; per-channel casts the code to int64 first, and NaN
        # or a code >= 2^63 becomes INT64_MIN, clamped to qmin.
        low = jnp.isnan(r)
        if spec.granularity != "tensor":
            low = low | (r >= jnp.float32(2.0**63))
        q = jnp.where(low, spec.qmin, jnp.clip(r, spec.qmin, spec.qmax))
    else:
        q = jnp.where(jnp.isnan(r), spec.qmax, jnp.clip(r, spec.qmin, spec.qmax))
    y = (q - zf) * s
    return y.reshape(x.shape), (xg, s, z, r)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _fq(static, x, scale, zp, key):
    return _fq_forward(static, x, scale, zp, key)[0]


def _fq_fwd(static, x, scale, zp, key):
    y, res = _fq_forward(static, x, scale, zp, key)
    return y, (res, scale, zp)


def _fq_bwd(static, res, g):
    spec, compat, grad, gs = static
    (xg, s, z, r), scale, zp = res
    qmin, qmax = spec.qmin, spec.qmax
    gg = g.reshape(xg.shape)
    if grad == "identity":
        return g, None, None, None
    if grad == "clipped_ste":
        zf = _rounded_zp(z, spec)
        inside = (xg >= (qmin - zf) * s) & (xg <= (qmax - zf) * s)
        return jnp.where(inside, gg, 0.0).reshape(g.shape), None, None, None
    mask = (r >= qmin) & (r <= qmax)
    # torch computes dY * mask: -0.0 (and NaN for an infinite dY) where masked. XLA
    # rewrites a multiply by a converted mask into a select, so spell out dY * 0.
    dx = jnp.where(mask, gg, gg * 0.0).reshape(g.shape)
    if grad == "ste":
        return dx, None, None, None
    red = reduction_axes(spec, xg.ndim - (spec.granularity == "group"))

    def to_qparam_shape(d, like):
        return jnp.sum(d, axis=red).reshape(jnp.shape(like)).astype(jnp.result_type(like))

    if grad == "pact":
        zf = _rounded_zp(z, spec)
        ds = jnp.where(r > qmax, gg * (qmax - zf), jnp.where(r < qmin, gg * (qmin - zf), 0.0))
        return dx, to_qparam_shape(ds, scale), None, None
    # LSQ, torch's formulas (rule 10), also used for the qjax/tflite roundings.
    inv = jnp.float32(1.0) / s
    if compat == "torch":
        if spec.granularity == "tensor":  # backward zp: int(zp + 0.5), clamped
            zb = jnp.clip(jnp.trunc(z.astype(jnp.float32) + 0.5), qmin, qmax)
        else:
            zb = _rounded_zp(z.astype(jnp.float32), spec)
        # torch's kernel is compiled with FMA contraction: xqi = rint(fma(x, inv, zp))
        # and xfqi - x = fma(clamp(xqi) - zp, s, -x); NaN and codes >= 2^63 convert
        # to INT64_MIN (below).
        xq = jnp.round(fma_f32(xg, inv, zb))
        below = (xq < qmin) | jnp.isnan(xq) | (xq >= jnp.float32(2.0**63))
        above = (xq > qmax) & ~below
        err = fma_f32(jnp.clip(xq, qmin, qmax) - zb, s, -xg)
    else:
        zb = _rounded_zp(z, spec)
        xq = r
        below, above = xq < qmin, xq > qmax
        err = (jnp.clip(xq, qmin, qmax) - zb) * s - xg
    gsf = jnp.float32(gs)
    ds_in = gg * err * inv * gsf
    ds_out = jnp.where(below, gg * (qmin - zb), gg * (qmax - zb)) * gsf
    ds = jnp.where(below | above, ds_out, ds_in)
    dz = jnp.where(below | above, gg * -1.0 * s * gsf, 0.0)
    dx = jnp.where(below | above, gg * 0.0, gg).reshape(g.shape)
    dzp = None
    if jnp.issubdtype(jnp.result_type(zp), jnp.floating):
        dzp = to_qparam_shape(dz, zp)
    return dx, to_qparam_shape(ds, scale), dzp, None


_fq.defvjp(_fq_fwd, _fq_bwd)
