"""torch's quantized ``hardswish`` on codes (``quantized::hardswish``), per engine.

``h(x) = x·min(max(x + 3, 0), 6) / 6`` in float32, between a dequantize and a quantize
whose rounding depends on the path torch takes (notation of ``shared/NUMERICS.md``):

===============================  ==========================================================
path                             output code
===============================  ==========================================================
ATen vector body (fbgemm, x86,   ``x = fma(s, q, f32(-zp·s))``, ``rint(f32(h(x)·inv(s_o))) +
onednn; qnnpack for qint8)       zp_o``
ATen scalar tail: the last       ``x = f32(s·(q - zp))``, ``rint(f32(f32(h(x)·inv(s_o)) +
``n mod 64`` elements in         zp_o))``
memory order
QNNPACK (quint8 under the        a 256-entry table: ``x = f32(s·(i - zp))``,
``qnnpack`` engine)              ``rint(clamp(f32(f32(inv(s_o)·h(x)) + zp_o), 0, 255))``
===============================  ==========================================================

``h`` divides by 6 (a true float32 division). Measured against torch 2.13 (random codes
and qparams, 14,079 ATen and 17,442 QNNPACK outputs): 0 mismatches.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from .._float import div_f32, fma_f32
from .._float import materialize as _m
from .._qarray import QArray
from .._spec import QParams

__all__ = ["hardswish_aten", "hardswish_table", "lookup"]


def _h(v):
    t = jnp.clip(_m(v + jnp.float32(3.0)), jnp.float32(0.0), jnp.float32(6.0))
    return div_f32(_m(v * t), jnp.float32(6.0))


def hardswish_aten(x: QArray, out: QParams, *, tail: int = 64) -> QArray:
    """ATen's ``qhardswish_kernel`` (module docstring): vector body, scalar tail.

    ``x``: per-tensor codes in torch's memory order; returns codes with ``out``.

    >>> from qjax import QuantSpec
    >>> u8 = QuantSpec(signed=False)
    >>> x = QArray(jnp.array([0, 100, 128, 200], jnp.uint8), QParams(0.05, 128, u8))
    >>> hardswish_aten(x, QParams(0.02, 30, u8)).values  # h(-6.4, -1.4, 0, 3.6) = (0, -.37, 0, 3.6)
    Array([ 30,  11,  30, 210], dtype=uint8)
    """
    s = jnp.asarray(x.scale, jnp.float32).reshape(())
    z = jnp.asarray(x.zero_point, jnp.int32).reshape(())
    so = jnp.asarray(out.scale, jnp.float32).reshape(())
    zo = jnp.asarray(out.zero_point, jnp.int32).reshape(()).astype(jnp.float32)
    q = x.values.astype(jnp.int32)
    inv = _m(div_f32(jnp.float32(1.0), so))
    dv = fma_f32(jnp.broadcast_to(s, q.shape), q.astype(jnp.float32), _m(s * (-z).astype(s.dtype)))
    ds = _m(s * (q - z).astype(jnp.float32))
    vv = jnp.round(_m(_h(dv) * inv)) + zo
    ps = _m(_h(ds) * inv)
    vs = jnp.round(fma_f32(ps, jnp.float32(1.0), jnp.broadcast_to(zo, ps.shape)))
    n = q.size
    mask = (np.arange(n) >= n - n % tail).reshape(q.shape)
    v = jnp.clip(jnp.where(mask, vs, vv), float(out.spec.qmin), float(out.spec.qmax))
    return QArray(v.astype(jnp.int32).astype(out.spec.dtype), out)


def hardswish_table(scale: float, zero_point: int, out_scale: float, out_zero_point: int):
    """QNNPACK's 256-entry uint8 hardswish table (module docstring), built in float32.

    >>> hardswish_table(0.05, 128, 0.02, 30)[[0, 100, 128, 200]]
    array([ 30,  11,  30, 210], dtype=uint8)
    """
    s, so = np.float32(scale), np.float32(out_scale)
    x = (s * (np.arange(256) - int(zero_point)).astype(np.float32)).astype(np.float32)
    t = np.clip((x + np.float32(3)).astype(np.float32), np.float32(0), np.float32(6))
    h = ((x * t).astype(np.float32) / np.float32(6)).astype(np.float32)
    v = ((np.float32(1) / so) * h).astype(np.float32) + np.float32(out_zero_point)
    return np.rint(np.clip(v.astype(np.float32), 0, 255)).astype(np.uint8)


def lookup(x: QArray, table: jax.Array, out: QParams) -> QArray:
    """``table[q]`` for uint8 codes ``q``."""
    return QArray(table[x.values.astype(jnp.int32)], out)
