"""Requantization's entry point: :func:`requantize`, and the activation clamps on codes.

Every integer layer (linear, conv) ends with :func:`requantize`: it checks the
accumulator and the qparams, lays per-channel scales and bias along ``channel_axis``,
takes the clamp bounds of the fused activation (:func:`activation_bounds`) and runs the
named scheme of :data:`~qjax.kernels.SCHEMES`. The schemes themselves, one formula
each with the reasons their roundings survive compilation, are
:mod:`qjax.kernels._schemes`; :func:`clamp_activation` applies torch's quantized
``relu6`` / ``hardtanh`` to the codes afterwards.
"""

from __future__ import annotations

from typing import Literal

import jax
import jax.numpy as jnp

from .._float import mul_f32, opaque_one
from .._primitives import quantize
from .._spec import QParams
from ._schemes import SCHEMES, Scheme

__all__ = [
    "Activation",
    "activation_bounds",
    "clamp_activation",
    "dequantize_accumulator",
    "requantize",
]

Activation = Literal["relu"] | None


def _i32(v) -> jax.Array:
    return jnp.asarray(v, jnp.int32)


_ACTIVATIONS = (None, "relu")


def activation_bounds(out: QParams, activation: Activation = None) -> tuple[jax.Array, jax.Array]:
    """Clamp bounds ``(lo, hi)`` of a fused activation on output codes, int32.

    ``None``: ``[qmin, qmax]``; ``"relu"``: ``[max(qmin, zp_out), qmax]``.

    >>> from qjax import QuantSpec, QParams
    >>> activation_bounds(QParams(0.1, 100, QuantSpec(signed=False)), "relu")
    (Array(100, dtype=int32), Array(255, dtype=int32))
    """
    if activation not in _ACTIVATIONS:
        raise ValueError(f"unsupported fused activation {activation!r}; supported: {_ACTIVATIONS}")
    spec = out.spec
    lo, hi = _i32(spec.qmin), _i32(spec.qmax)
    if activation == "relu":
        lo = jnp.maximum(lo, _zero_point_scalar(out.zero_point))
    return lo, hi


def clamp_activation(codes, out: QParams, activation, bounds=None) -> jax.Array:
    """Apply a fused ``"relu6"`` / ``"hardtanh"`` to requantized codes (others: unchanged).

    As torch's quantized ``relu6`` / ``hardtanh`` on the layer output: the codes are
    clamped to ``[q(lo), q(hi)]`` with ``q`` torch's quantize (rule 1) of the real bounds
    (``(0, 6)`` for relu6, whose lower bound is the zero point itself; ``bounds=(min,
    max)`` for hardtanh). ``codes`` keep their dtype.

    >>> from qjax import QuantSpec, QParams
    >>> out = QParams(0.05, 10, QuantSpec(signed=False))
    >>> clamp_activation(jnp.array([0, 50, 200], jnp.uint8), out, "relu6")
    Array([ 10,  50, 130], dtype=uint8)
    """
    if activation not in ("relu6", "hardtanh"):
        return codes
    if activation == "relu6":
        lo_r, hi_r = 0.0, 6.0
    else:
        if bounds is None:
            raise ValueError("activation='hardtanh' needs bounds=(min, max)")
        lo_r, hi_r = (float(b) for b in bounds)
        if not lo_r <= hi_r:
            raise ValueError(f"hardtanh bounds must have min <= max, got {bounds}")
    q = quantize(jnp.array([lo_r, hi_r], jnp.float32), out, compat="torch").astype(jnp.int32)
    lo = _zero_point_scalar(out.zero_point) if activation == "relu6" else q[0]
    return jnp.clip(codes.astype(jnp.int32), lo, q[1]).astype(codes.dtype)


def _zero_point_scalar(z) -> jax.Array:
    z = jnp.asarray(z)
    if jnp.issubdtype(z.dtype, jnp.floating):
        raise TypeError(f"output zero point must be an integer, got dtype {z.dtype}")
    return z.astype(jnp.int32).reshape(())


def requantize(
    acc: jax.Array,
    *,
    scale_x: jax.Array,
    scale_w: jax.Array,
    out: QParams,
    bias: jax.Array | None = None,
    activation: Activation = None,
    scheme: Scheme = "fbgemm",
    channel_axis: int = -1,
) -> jax.Array:
    """Turn an exact int32 accumulator into output codes with a named scheme.

    ``acc = Σ (x - zp_x)(w - zp_w)`` over the reduction axes; the result approximates
    ``(s_x·s_w·acc + b) / s_out + zp_out``, rounded and clamped as the scheme says (see
    :mod:`qjax.kernels._schemes` and :data:`SCHEMES`), with the fused ``activation`` clamp.

    Args:
      acc: int32 accumulator, any shape.
      scale_x: per-tensor input scale (0-d float32).
      scale_w: weight scale: 0-d (per-tensor) or ``(C,)`` per output channel.
      out: output :class:`~qjax.QParams` (per-tensor; its spec gives dtype and range).
      bias: float32 ``(C,)`` (or 0-d) bias, or ``None``.
      activation: ``None`` or ``"relu"`` (clamp below at the output zero point).
      scheme: a key of :data:`SCHEMES`.
      channel_axis: axis of ``acc`` that ``(C,)`` vectors run along.

    Returns:
      codes of ``out.spec.dtype``, shape of ``acc``.

    >>> from qjax import QuantSpec, QParams
    >>> out = QParams(0.05, 128, QuantSpec(signed=False))
    >>> acc = jnp.array([[-300, 0], [7, 10_000]], jnp.int32)
    >>> requantize(acc, scale_x=0.02, scale_w=jnp.array([0.01, 0.02]), out=out,
    ...            activation="relu", scheme="tflite")
    Array([[128, 128],
           [128, 208]], dtype=uint8)
    """
    if scheme not in SCHEMES:
        raise ValueError(f"unknown requantization scheme {scheme!r}; known: {sorted(SCHEMES)}")
    if not isinstance(out, QParams):
        raise TypeError(f"requantize: out must be a QParams, got {type(out).__name__}")
    if out.spec.granularity != "tensor":
        raise ValueError(
            f"requantize: output qparams must be per-tensor, got axis={out.spec.axis}, "
            f"group_size={out.spec.group_size}"
        )
    acc, sx, sw, b = _operands("requantize", acc, scale_x, scale_w, bias, channel_axis)
    lo, hi = activation_bounds(out, activation)
    so = jnp.asarray(out.scale, jnp.float32).reshape(())
    zo = _zero_point_scalar(out.zero_point)
    codes = SCHEMES[scheme](acc, b, sx.reshape(()), sw, so, zo, lo, hi)
    return codes.astype(out.spec.dtype)


def _along(v: jax.Array, ndim: int, axis: int) -> jax.Array:
    shape = [1] * ndim
    shape[axis] = v.shape[0]
    return v.reshape(shape)


def _operands(fn: str, acc, scale_x, scale_w, bias, channel_axis: int):
    """``(acc, s_x, s_w, b)`` checked, with ``(C,)`` vectors laid along ``channel_axis``."""
    acc = jnp.asarray(acc)
    if acc.dtype != jnp.int32:
        raise TypeError(f"{fn}: acc must be int32, got {acc.dtype}")
    sx = jnp.asarray(scale_x, jnp.float32)
    if sx.size != 1:
        raise ValueError(f"{fn}: scale_x must be per-tensor, got shape {sx.shape}")
    sw = jnp.asarray(scale_w, jnp.float32)
    if sw.ndim > 1:
        raise ValueError(f"{fn}: scale_w must be 0-d or (C,), got shape {sw.shape}")
    ax = channel_axis % max(acc.ndim, 1)
    if sw.ndim == 1:
        if acc.ndim == 0 or acc.shape[ax] != sw.shape[0]:
            raise ValueError(
                f"{fn}: {sw.shape[0]} weight scales for acc of shape {acc.shape} "
                f"along axis {channel_axis}"
            )
        sw = _along(sw, acc.ndim, ax)
    b = None
    if bias is not None:
        b = jnp.asarray(bias)
        if not jnp.issubdtype(b.dtype, jnp.floating):
            raise TypeError(f"{fn}: bias must be floating, got {b.dtype}")
        b = b.astype(jnp.float32)
        if b.ndim == 1:
            if acc.ndim == 0 or acc.shape[ax] != b.shape[0]:
                raise ValueError(
                    f"{fn}: bias of shape {b.shape} does not fit acc of shape "
                    f"{acc.shape} along axis {channel_axis}"
                )
            b = _along(b, acc.ndim, ax)
        elif b.ndim > 1:
            raise ValueError(f"{fn}: bias must be 0-d or (C,), got shape {b.shape}")
    return acc, sx.reshape(()), sw, b


def dequantize_accumulator(
    acc: jax.Array,
    *,
    scale_x: jax.Array,
    scale_w: jax.Array,
    bias: jax.Array | None = None,
    channel_axis: int = -1,
) -> jax.Array:
    """A float output from an exact int32 accumulator (a layer with no output quantizer).

    ``y = f32(acc)·f32(s_x·s_w) + b``: the product rounded to float32 before the bias is
    added (never contracted into an fma, so the value is the same eagerly, under ``jit``
    and in the served program). Scales and bias as in :func:`requantize`; int32 in,
    float32 out.

    >>> dequantize_accumulator(jnp.array([[3, -4]], jnp.int32), scale_x=0.5,
    ...                        scale_w=jnp.array([0.25, 1.0]), bias=jnp.array([0.0, 1.0]))
    Array([[ 0.375, -1.   ]], dtype=float32)
    """
    acc, sx, sw, b = _operands("dequantize_accumulator", acc, scale_x, scale_w, bias, channel_axis)
    y = mul_f32(acc.astype(jnp.float32), sx * sw, opaque_one(sx))
    return y if b is None else y + b
