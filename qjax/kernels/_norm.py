"""torch's quantized batch norm on codes (``quantized::batch_norm2d`` / ``batch_norm2d_relu``).

torch (``qbatch_norm.cpp`` ``compute_fused_params``, then ``q_batch_norm_kernel`` in
``kernels/QuantizedOpKernels.cpp``) folds the per-channel statistics into a float32
multiplier ``alpha_c`` and offset ``beta_c`` once, then maps every code with one fma.
Notation of ``shared/NUMERICS.md`` (``f32``, ``f64``, ``fma``, ``rint``); ``w_c`` = 1 and
``b_c`` = 0 when the module has no affine parameters:

=========================  ===================================================================
step                       torch 2.13 (CPU, every engine: the op has no QNNPACK variant)
=========================  ===================================================================
``inv_sigma_c``            ``f32(1.0 / f64(sqrtf(f32(var_c + f32(eps)))))``
``alpha_c``                ``f32(f64(f32(inv_sigma_c·w_c)) · f64(s_in / s_out))`` (the ratio
                           of the two scales in float64)
``beta_c``                 ``f32(f64(f32(b_c − f32(f32(mean_c·inv_sigma_c)·w_c))) / s_out)``
``y``                      ``fma(alpha_c, f32(q − zp_in), beta_c)`` (one rounding; the vector
                           body and the scalar channel tail both fuse: measured)
code                       ``clamp(rint(y) + zp_out, qmin, qmax)``, then ``max(·, zp_out)``
                           with ``relu`` (zero point added *after* rounding)
=========================  ===================================================================

``y`` beyond the int32 range follows the AVX-512 vector body: ``min(y, 2147483520)``,
``rint``, out-of-range to ``INT32_MIN``, then an int32 (wrapping) zero-point add (NaN
parameters, e.g. ``var + eps < 0``, are not emulated: torch's paths disagree there). torch
reads the input channels-last and returns a channels-last tensor, but the formula is the
same for every element, so the layout only says which axis holds the channels. Scales are
float32 here (torch keeps them in float64; the two agree for every scale an observer
produces). Measured against ``torch.ops.quantized.batch_norm2d`` in
``tests/test_converters_torch_bn.py``.
"""

from __future__ import annotations

from typing import Literal

import jax
import jax.numpy as jnp

from .._float import div_ieee, fma_f32, materialize, mul_f32, opaque_one
from .._qarray import QArray
from .._spec import QParams

__all__ = ["NormLayout", "batch_norm_params", "quantized_batch_norm"]

NormLayout = Literal["NCHW", "NHWC"]
_INT32_FLOAT_MAX = 2147483520.0  # the largest float32 below 2^31 (torch's vector clip)


def _per_channel(v, c: int, name: str, default: float) -> jax.Array:
    if v is None:
        return jnp.full((c,), default, jnp.float32)
    a = jnp.asarray(v)
    if not jnp.issubdtype(a.dtype, jnp.floating):
        raise TypeError(f"quantized_batch_norm: {name} must be floating, got dtype {a.dtype}")
    if a.shape != (c,):
        raise ValueError(f"quantized_batch_norm: {name} has shape {a.shape}, expected ({c},)")
    return a.astype(jnp.float32)


def batch_norm_params(weight, bias, mean, var, eps: float, in_scale, out_scale):
    """torch's fused batch-norm parameters ``(alpha, beta)``, float32 ``(C,)`` each.

    ``alpha = f32(f64(f32(inv_sigma·w)) · f64(s_in/s_out))``, ``beta = f32(f64(f32(b −
    f32(f32(mean·inv_sigma)·w))) / s_out)`` with ``inv_sigma = f32(1/sqrtf(f32(var +
    f32(eps))))`` (module docstring). ``weight`` / ``bias`` may be ``None`` (1 / 0); the
    others are float ``(C,)``; the scales float32 scalars.

    >>> a, b = batch_norm_params(None, None, jnp.array([0.5]), jnp.array([4.0]), 0.0, 0.1, 0.2)
    >>> a, b
    (Array([0.25], dtype=float32), Array([-1.25], dtype=float32))
    """
    mean = jnp.asarray(mean)
    if mean.ndim != 1:
        raise ValueError(f"quantized_batch_norm: mean must be 1-d, got shape {mean.shape}")
    c = mean.shape[0]
    mean = _per_channel(mean, c, "mean", 0.0)
    var = _per_channel(var, c, "var", 1.0)
    w = _per_channel(weight, c, "weight", 1.0)
    b = _per_channel(bias, c, "bias", 0.0)
    s_in = jnp.asarray(in_scale, jnp.float32).reshape(())
    s_out = jnp.asarray(out_scale, jnp.float32).reshape(())
    one = opaque_one(var)
    with jax.enable_x64(True):
        f64 = jnp.float64
        # sqrtf and 1.0/x (float64) of float32 values: rounding through float64 once more
        # is innocuous for sqrt and division (53 >= 2·24 + 2 bits)
        vpe = materialize(var + jnp.float32(eps))
        sd = jnp.sqrt(vpe.astype(f64)).astype(jnp.float32)
        inv = div_ieee(jnp.ones((c,), f64), sd.astype(f64)).astype(jnp.float32)
        aw = materialize(inv * w)
        ratio = div_ieee(s_in.astype(f64), s_out.astype(f64))
        alpha = (aw.astype(f64) * ratio).astype(jnp.float32)
        # mul_f32 keeps mean·inv·w rounded before the subtraction (no fused fnma)
        mw = mul_f32(materialize(mean * inv), w, one)
        num = materialize(b - mw)
        beta = div_ieee(num.astype(f64), jnp.broadcast_to(s_out.astype(f64), (c,)))
        beta = beta.astype(jnp.float32)
    return alpha, beta


def quantized_batch_norm(
    x: QArray,
    weight,
    bias,
    mean,
    var,
    eps: float,
    out_qparams: QParams,
    *,
    relu: bool = False,
    layout: NormLayout = "NCHW",
) -> QArray:
    """Inference batch norm on per-tensor codes, bit-exact with torch's quantized kernel.

    ``y = fma(alpha_c, f32(q − zp_in), beta_c)``, ``out = clamp(rint(y) + zp_out, qmin,
    qmax)`` (``max(out, zp_out)`` with ``relu``), ``alpha``/``beta`` from
    :func:`batch_norm_params` (the table in the module docstring).

    Args:
      x: 4-d uint8 or int8 codes, per-tensor qparams; channels on axis 1 (``"NCHW"``) or
        the last axis (``"NHWC"``).
      weight, bias: float ``(C,)`` affine parameters, or ``None`` (1 and 0).
      mean, var: float ``(C,)`` running statistics.
      eps: the module's ``eps`` (rounded to float32 before it is added, as torch does).
      out_qparams: per-tensor output qparams; the output dtype is theirs.
      relu: ``batch_norm2d_relu`` (``BNReLU2d``).
      layout: ``"NCHW"`` or ``"NHWC"``; the output keeps it.

    Returns:
      a :class:`QArray` of the same shape with ``out_qparams``.

    >>> from qjax import QuantSpec
    >>> u8 = QuantSpec(signed=False)
    >>> x = QArray(jnp.array([0, 9, 11, 13, 250], jnp.uint8).reshape(1, 1, 1, 5),
    ...            QParams(0.1, 10, u8))
    >>> y = quantized_batch_norm(x, jnp.array([2.0]), jnp.array([0.5]), jnp.array([0.5]),
    ...                          jnp.array([4.0]), 0.0, QParams(0.2, 128, u8))
    >>> y.values.ravel()  # y = 0.5·(q − 10): rint(-5, -0.5, 0.5, 1.5, 120) + 128
    Array([123, 128, 128, 130, 248], dtype=uint8)
    """
    what = "quantized_batch_norm"
    if not isinstance(x, QArray):
        raise TypeError(f"{what}: expected a QArray, got {type(x).__name__}")
    if not isinstance(out_qparams, QParams):
        raise TypeError(f"{what}: out_qparams must be a QParams, got {type(out_qparams).__name__}")
    if x.spec.granularity != "tensor" or out_qparams.spec.granularity != "tensor":
        raise ValueError(f"{what}: needs per-tensor input and output qparams")
    if x.ndim != 4:
        raise ValueError(f"{what}: expected a 4-d input, got shape {x.shape}")
    if layout not in ("NCHW", "NHWC"):
        raise ValueError(f"{what}: unknown layout {layout!r}; use 'NCHW' or 'NHWC'")
    zo = jnp.asarray(out_qparams.zero_point)
    if jnp.issubdtype(zo.dtype, jnp.floating):
        raise TypeError(f"{what}: output zero point must be an integer")
    axis = 1 if layout == "NCHW" else 3
    c = x.shape[axis]
    if jnp.asarray(mean).shape != (c,):
        raise ValueError(
            f"{what}: mean has shape {jnp.asarray(mean).shape}, expected ({c},) for input "
            f"shape {x.shape} ({layout})"
        )
    alpha, beta = batch_norm_params(weight, bias, mean, var, eps, x.scale, out_qparams.scale)
    bshape = (1, c, 1, 1) if axis == 1 else (1, 1, 1, c)
    zi = jnp.asarray(x.zero_point, jnp.int32).reshape(())
    zo = zo.astype(jnp.int32).reshape(())
    d = (x.values.astype(jnp.int32) - zi).astype(jnp.float32)
    y = fma_f32(
        jnp.broadcast_to(alpha.reshape(bshape), d.shape), d,
        jnp.broadcast_to(beta.reshape(bshape), d.shape),
    )  # fmt: skip
    # _mm512_cvtps_epi32 after torch's clip: values outside int32 become INT32_MIN
    y = jnp.minimum(y, jnp.float32(_INT32_FLOAT_MAX))
    ok = y >= jnp.float32(-2147483648.0)
    r = jnp.where(ok, jnp.round(jnp.where(ok, y, 0.0)), 0.0).astype(jnp.int32)
    r = jnp.where(ok, r, jnp.int32(-2147483648)) + zo
    spec = out_qparams.spec
    lo = jnp.maximum(jnp.int32(spec.qmin), zo) if relu else jnp.int32(spec.qmin)
    v = jnp.clip(r, lo, jnp.int32(spec.qmax))
    return QArray(v.astype(spec.dtype), out_qparams)
