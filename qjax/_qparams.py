"""Scale and zero point from a real range, in every compat mode qjax supports.

One function, :func:`qparams_from_minmax`; the modes are written out below so that each
formula exists exactly once. ``min⁻ = min(min, 0)``, ``max⁺ = max(max, 0)``,
``amax = max(-min⁻, max⁺)``, ``zs`` = the spec's symmetric zero point.

=============  ==========================================  ==============================
compat         symmetric                                   affine
=============  ==========================================  ==============================
``"qjax"``     ``s = amax / min(qmax - zs, zs - qmin)``,    ``s = (max⁺ - min⁻)/(qmax-qmin)``
               ``zp = zs`` (max maps *exactly* to a code)  ``zp = clamp(qmin - rint(min⁻/s))``
``"torch"``    ``s = max(amax / ((qmax-qmin)/2), eps)``;    ``s = max((max⁺-min⁻)/(qmax-qmin),
               zp 0, 128 for default-range uint8,         eps)``, ``zp = clamp(qmin -
               ``(qmin+qmax)//2`` custom range              rint(f32(min⁻/s)))``
``"torch_      FBGEMM ``ChooseQuantizationParams``: ``s = max(|min|/128, max/127)`` when
fused"``       ``min < 0 < max``, else ``s = f32((max⁺-min⁻)/(qmax-qmin))`` (float64
               quotient) and zp from the smaller-error end, divided by that float32
               ``s`` in float64; ``s >= 6.1e-5`` (NUMERICS.md rule 9)
``"tflite"``   as ``"qjax"``                                 float64 affine with nudged zp
=============  ==========================================  ==============================

All arithmetic is float32 except where a mode says float64 (evaluated exactly under
``jax.enable_x64`` inside the function, so it is jit-able). ``eps = 2**-23``. In every
mode ``/`` is a correctly rounded division, also under ``jit`` (XLA would otherwise
multiply by the rounded reciprocal of a constant divisor; see ``qjax._float.div_ieee``).

Degenerate ranges never produce NaN or infinite scales: a range that is empty
(``min > max``, as from an observer that saw nothing) or non-finite gives
``scale = 1.0`` and the zero point of 0 (torch's "never observed" answer); an all-zero
range gives ``eps`` (torch), ``0.1`` (torch_fused, FBGEMM's fallback) or ``1.0`` (qjax,
tflite). Report such conditions
with :func:`qjax.observers.health`.

A finite range whose float32 width overflows (``max - min > 3.4e38``, e.g. ``[-3e38,
3e38]``) is a valid range and gets its own finite scale in every mode: the width is taken
in float64 and the quotient rounded to float32 once (qjax, torch affine; tflite and
torch_fused affine compute in float64 anyway), and torch_fused symmetric, whose widened
ends ``ms·-128`` / ``ms·127`` overflow, takes ``s = ms = max(|min|/128, max/127)``, the
step of that widened range. Wherever the width is finite the formulas above are
unchanged, bit for bit. Here qjax deliberately differs from torch 2.13, which gives no
usable answer: ``MinMaxObserver`` (affine) returns ``scale = inf``, ``zero_point = 0``
for ``[-3e38, 3e38]``, and ``FusedMovingAvgObsFakeQuantize`` (symmetric) ``scale = inf``
for ``[-3.4e38, 3.4e38]``; fake-quant with an infinite scale outputs NaN everywhere.
(Before, qjax's own affine formula fell back to ``scale = 1.0``, zero point ``qmax``:
every output garbage.) Dequantized end codes of a range touching ``±3.4e38`` may still
round to ``±inf``: the grid's end lies beyond float32.
"""

from __future__ import annotations

from typing import Literal

import jax
import jax.numpy as jnp

from ._float import div_ieee
from ._rounding import round_half_away
from ._spec import QParams, QuantSpec

Compat = Literal["qjax", "torch", "torch_fused", "tflite"]
COMPATS = ("qjax", "torch", "torch_fused", "tflite")
EPS = float(jnp.finfo(jnp.float32).eps)  # 1.1920929e-07, torch's observer eps
FBGEMM_SMALL_SCALE = 6.1e-5  # fbgemm's SMALL_SCALE_THRESHOLD (fp16 min normal)


def qparams_from_minmax(
    min_val: jax.Array, max_val: jax.Array, spec: QuantSpec, compat: Compat = "qjax"
) -> QParams:
    """Scale and zero point that map ``[min_val, max_val]`` onto the spec's codes.

    Formulas per ``compat`` are tabled in this module's docstring; the range is always
    widened to include 0 so that 0 is exactly representable.

    Args:
      min_val, max_val: float arrays of the spec's qparams shape (scalars per-tensor).
      spec: the :class:`QuantSpec` (bits, signedness, symmetric, range).
      compat: ``"qjax"`` (default), ``"torch"``, ``"torch_fused"`` or ``"tflite"``.

    Returns:
      :class:`QParams` with float32 ``scale`` and int32 ``zero_point`` of the same shape.

    >>> spec = QuantSpec(bits=8, signed=True, symmetric=True)
    >>> qp = qparams_from_minmax(-1.0, 2.54, spec)
    >>> float(qp.scale), int(qp.zero_point)   # 2.54 / 127
    (0.019999999552965164, 0)
    >>> float(qparams_from_minmax(-1.0, 2.55, spec, compat="torch").scale)  # / 127.5
    0.019999999552965164
    """
    if compat not in COMPATS:
        raise ValueError(f"compat must be one of {COMPATS}, got {compat!r}")
    if not isinstance(spec, QuantSpec):
        raise TypeError(f"spec must be a QuantSpec, got {type(spec).__name__}")
    mn = _as_float(min_val, "min_val")
    mx = _as_float(max_val, "max_val")
    if mn.shape != mx.shape:
        raise ValueError(f"min_val shape {mn.shape} != max_val shape {mx.shape}")
    valid = jnp.isfinite(mn) & jnp.isfinite(mx) & (mn <= mx)
    # Compute on a sanitized range so invalid entries cannot leak NaN into gradients.
    mn_s = jnp.where(valid, mn, 0.0)
    mx_s = jnp.where(valid, mx, 0.0)
    fn = {"qjax": _qjax, "torch": _torch, "torch_fused": _torch_fused, "tflite": _tflite}
    scale, zp = fn[compat](mn_s, mx_s, spec)
    default_zp = 0 if compat != "qjax" else _zero_code(spec)
    scale = jnp.where(valid, scale, jnp.float32(1.0)).astype(jnp.float32)
    zp = jnp.where(valid, zp, default_zp).astype(jnp.int32)
    return QParams(scale=scale, zero_point=zp, spec=spec)


def _as_float(v, name: str) -> jax.Array:
    v = jnp.asarray(v)
    if not jnp.issubdtype(v.dtype, jnp.floating):
        if jnp.issubdtype(v.dtype, jnp.integer):
            return v.astype(jnp.float32)
        raise TypeError(f"{name} must be a float array, got dtype {v.dtype}")
    return v.astype(jnp.float32)


def _zero_code(spec: QuantSpec) -> int:
    if spec.symmetric:
        return spec.symmetric_zero_point()
    return min(max(0, spec.qmin), spec.qmax)


def _width_div(hi, lo, n: int) -> jax.Array:
    """``(hi - lo) / n`` correctly rounded in float32; where the float32 width
    ``hi - lo`` overflows (a finite range wider than 3.4e38), the float64 width divided
    in float64 and rounded to float32 once: finite. Wherever the float32 width is finite
    this is the float32 formula itself (bit for bit what it was)."""
    w = hi - lo
    ok = jnp.isfinite(w)
    with jax.enable_x64(True):
        f64 = jnp.float64
        wide = div_ieee(hi.astype(f64) - lo.astype(f64), n).astype(jnp.float32)
    return jnp.where(ok, div_ieee(jnp.where(ok, w, 0.0), n), wide)


def _qjax(mn, mx, spec: QuantSpec):
    qmin, qmax = spec.qmin, spec.qmax
    mn_neg = jnp.minimum(mn, 0.0)
    mx_pos = jnp.maximum(mx, 0.0)
    if spec.symmetric:
        zs = spec.symmetric_zero_point()
        amax = jnp.maximum(-mn_neg, mx_pos)
        scale = div_ieee(amax, min(qmax - zs, zs - qmin))
        zp = jnp.full(scale.shape, zs, jnp.int32)
    else:
        scale = _width_div(mx_pos, mn_neg, qmax - qmin)
        safe = jnp.where(scale > 0, scale, 1.0)
        zp = jnp.clip(qmin - jnp.round(mn_neg / safe), qmin, qmax).astype(jnp.int32)
    # A zero range is represented exactly by any scale; 1.0 keeps 1/scale finite.
    scale = jnp.where(scale > 0, jnp.maximum(scale, jnp.finfo(jnp.float32).tiny), 1.0)
    return scale, zp


def _torch(mn, mx, spec: QuantSpec):
    qmin, qmax = spec.qmin, spec.qmax
    mn_neg = jnp.minimum(mn, 0.0)
    mx_pos = jnp.maximum(mx, 0.0)
    if spec.symmetric:
        amax = jnp.maximum(-mn_neg, mx_pos)
        scale = jnp.maximum(div_ieee(amax, (qmax - qmin) / 2), EPS)
        if spec.signed:
            zs = 0
        elif spec.has_custom_range or spec.bits not in (8, 16):
            zs = (qmin + qmax) // 2
        else:  # torch: 128 for quint8 even under reduce_range (codes 0..127)
            zs = 2 ** (spec.bits - 1)
        zp = jnp.full(scale.shape, zs, jnp.int32)
    else:
        scale = jnp.maximum(_width_div(mx_pos, mn_neg, qmax - qmin), EPS)
        zp = jnp.clip(qmin - jnp.round(mn_neg / scale), qmin, qmax).astype(jnp.int32)
    return scale, zp


def _torch_fused(mn, mx, spec: QuantSpec):
    """FBGEMM/ATen ``ChooseQuantizationParams`` as used by the fused QAT fake-quant."""
    qmin, qmax = spec.qmin, spec.qmax
    f32 = jnp.float32
    if spec.symmetric:
        sq_min = -((qmax - qmin) // 2 + 1)
        sq_max = (qmax - qmin) // 2
        both = (mn < 0) & (mx > 0)
        # float32 arithmetic, as the C++ (float / int, fabs(float)).
        ms = jnp.maximum(jnp.abs(div_ieee(mn, sq_min)), jnp.abs(div_ieee(mx, sq_max)))
        mn = jnp.where(both, ms * f32(sq_min), mn)
        mx = jnp.where(both, ms * f32(sq_max), mx)
        # ms·sq_min overflows float32 when |min| or max is near 3.4e38 (FBGEMM: scale inf,
        # NaN outputs); the widened range is exactly ms per step, so ms is the scale there
        wide = both & ~(jnp.isfinite(mn) & jnp.isfinite(mx))
        mn = jnp.where(wide, f32(-1.0), mn)
        mx = jnp.where(wide, f32(1.0), mx)
    else:
        ms = None
        both = wide = jnp.zeros(mn.shape, bool)
    mn = jnp.minimum(mn, f32(0.0))
    mx = jnp.maximum(mx, f32(0.0))
    with jax.enable_x64(True):
        f64 = jnp.float64
        # FBGEMM keeps the scale as a float32 ("float scale = double expr"): the zero
        # point below divides by the float32 scale (f64(s32)), not by the float64
        # quotient; with min = -max this decides 127 vs 128.
        scale = div_ieee(mx.astype(f64) - mn.astype(f64), qmax - qmin).astype(f32)
        bad = (scale == 0) | jnp.isinf(f32(1.0) / scale)
        scale = jnp.where(bad, f32(0.1), scale)
        thr = f32(FBGEMM_SMALL_SCALE)
        small = scale < thr
        amp = thr / jnp.where(small, scale, f32(1.0))
        mn_new = jnp.where(mn == 0, mn, jnp.where(mx == 0, -thr * f32(qmax - qmin), mn * amp))
        mx_new = jnp.where(mn == 0, thr * f32(qmax - qmin), jnp.where(mx == 0, mx, mx * amp))
        mn = jnp.where(small, mn_new, mn)
        mx = jnp.where(small, mx_new, mx)
        scale = jnp.where(small, thr, scale)
        s64 = scale.astype(f64)
        zmin = qmin - mn.astype(f64) / s64
        zmax = qmax - mx.astype(f64) / s64
        emin = abs(qmin) - jnp.abs(mn.astype(f64) / s64)
        emax = abs(qmax) - jnp.abs(mx.astype(f64) / s64)
        z0 = jnp.where(emin < emax, zmin, zmax)
        z0 = jnp.where(both, f64(qmin + qmax) / 2, z0)
        zp = jnp.where(z0 < qmin, qmin, jnp.where(z0 > qmax, qmax, jnp.round(z0)))
        zp = zp.astype(jnp.int32)
    if ms is not None:
        scale = jnp.where(wide, ms, scale)
    return scale, zp


def _tflite(mn, mx, spec: QuantSpec):
    if spec.symmetric:
        return _qjax(mn, mx, spec)
    qmin, qmax = spec.qmin, spec.qmax
    with jax.enable_x64(True):
        f64 = jnp.float64
        rmin = jnp.minimum(mn, 0.0).astype(f64)
        rmax = jnp.maximum(mx, 0.0).astype(f64)
        scale = div_ieee(rmax - rmin, qmax - qmin)
        safe = jnp.where(scale > 0, scale, 1.0)
        zmin = qmin - rmin / safe
        zmax = qmax - rmax / safe
        z0 = jnp.where(
            abs(qmin) + jnp.abs(rmin / safe) < abs(qmax) + jnp.abs(rmax / safe), zmin, zmax
        )
        rounded = round_half_away(z0)  # std::round (floor(|z| + 0.5) errs at 0.5 - 2^-54)
        zp = jnp.where(z0 < qmin, qmin, jnp.where(z0 > qmax, qmax, rounded))
        # A point range: TFLite answers zero point 0 (and scale 0, made 1.0 here).
        zp = jnp.where(scale > 0, zp, min(max(0, qmin), qmax)).astype(jnp.int32)
        scale = jnp.where(scale > 0, scale, 1.0).astype(jnp.float32)
    return scale, zp
