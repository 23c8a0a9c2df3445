"""Requantization folded into a prepared weight: the coefficients of static qparams
computed once, at prepare time, instead of in every call of the served program.

A native layer with the fused epilogue (``kernel="onednn"`` on the brgemm ukernel or
``kernel="amx"``, schemes ``"fbgemm"``/``"qnnpack"``, and ``"onednn"`` on the ukernel;
``kernel="sat16"`` linear layers and convs with one group, their int16 pair saturation
or exact, all three schemes; weight zero points 0) needs, per output channel, ``ivec``
(int32: the zero-point correction ``-zp_x·Σw``, plus ``b_q`` for ``"qnnpack"``),
``fvec`` (float32 bias term), ``mult`` (float32 multiplier) and the clamp bounds (and
for ``"onednn"`` its scalars), all from the scheme's own coefficient function
(:func:`~qjax.kernels._native.epilogue_vectors`). When the qparams and the bias are
jit arguments these are a dozen small XLA passes per layer and call (measured on the
int8 MLP at batch 1, AMD EPYC VNNI, 2 cores under load: about half of the call).
:func:`fold_requant` computes them once, with the same functions compiled the same way,
and stores them in the prepared weight; ``quantized_linear`` / ``quantized_conv`` then
run the layer as one native call with those vectors and nothing else. A call must pass
the qparams and bias the weight was folded with: the scheme, ReLU, dtypes and (where
concrete) scales and zero points are checked at trace time, a mismatch is an error.
"""

from __future__ import annotations

import dataclasses
import functools
import types

import jax
import jax.numpy as jnp
import numpy as np

from .._spec import QParams
from . import _native
from ._conv import PreparedConv
from ._linear import PreparedLinear
from ._native._fused import _layer_vectors, fold_key

__all__ = ["fold_requant"]


def fold_requant(
    w: PreparedLinear | PreparedConv,
    x_qparams: QParams,
    bias,
    out_qparams: QParams,
    *,
    scheme: str = "fbgemm",
    activation: str | None = None,
    accumulate: str = "exact",
) -> PreparedLinear | PreparedConv:
    """``w`` with its layer's requantization folded in: per output channel ``n``,
    ``ivec[n] = -(zp_x + shift)·Σw[n]`` (+ ``b_q[n]`` for ``"qnnpack"``), ``fvec[n]`` the
    scheme's float bias term, ``mult[n]`` its multiplier, ``clamp = (lo - zp_out, hi -
    zp_out)`` (``lo = zp_out`` with ``activation="relu"``), computed now (int32 /
    float32, the epilogue of :func:`~qjax.kernels._native.epilogue_vectors`; ``shift``
    128 where oneDNN's or the sat16 kernel takes int8 codes shifted to uint8).

    Needs a native prepared weight whose layer the fused kernel runs
    (:func:`~qjax.kernels._native.fusable`: ``kernel="onednn"`` on the brgemm ukernel or
    ``"amx"`` with exact accumulation, or a ``kernel="sat16"`` linear weight (any
    accumulation), or a ``kernel="sat16"`` conv weight with one group (saturating
    accumulation, or exact on uint8 codes);
    ``scheme``
    ``"fbgemm"`` or ``"qnnpack"``, ``"onednn"`` except on AMX; weight zero points 0,
    per-tensor 8-bit input and output qparams) and concrete (static) qparams and bias:
    ``ValueError`` / ``TypeError`` otherwise. The codes are the unfolded call's, bit for
    bit.

    Args:
      w: a :class:`PreparedLinear` or :class:`PreparedConv`.
      x_qparams: the input activations' qparams.
      bias: float32 ``(N,)`` or ``None``.
      out_qparams: the output qparams.
      scheme: ``"fbgemm"``, ``"qnnpack"`` or (``kernel="onednn"``/``"sat16"``)
        ``"onednn"``.
      activation: ``None``, ``"relu"`` (folded into the clamp), ``"relu6"`` or
        ``"hardtanh"`` (their clamp still runs after the call).
      accumulate: the layer's accumulation (``quantized_linear``'s argument); the calls
        must pass the same kind.

    >>> from qjax import QuantSpec
    >>> from qjax.kernels import QArray, prepare_linear, quantized_linear
    >>> u8 = QuantSpec(signed=False)
    >>> w = QArray(jnp.array([[1, -1], [2, 1]], jnp.int8),
    ...            QParams(0.5, 0, QuantSpec(symmetric=True)))
    >>> xq, oq = QParams(0.1, 3, u8), QParams(0.2, 128, u8)
    >>> x = QArray(jnp.array([[200, 3]], jnp.uint8), xq)
    >>> if _native.onednn_fused():
    ...     pw = fold_requant(prepare_linear(w, kernel="onednn"), xq, None, oq)
    ...     print(quantized_linear(x, pw, None, oq).values)
    ... else:
    ...     print(quantized_linear(x, prepare_linear(w), None, oq).values)
    [[177  79]]
    """
    if not isinstance(w, (PreparedLinear, PreparedConv)):
        raise TypeError(f"fold_requant needs a prepared weight, got {type(w).__name__}")
    values = (x_qparams.scale, x_qparams.zero_point, out_qparams.scale, out_qparams.zero_point)
    if any(isinstance(v, jax.core.Tracer) for v in values + (bias,)):
        raise TypeError(
            f"layer {w.name!r}: fold_requant needs concrete (static) qparams and bias, "
            "not traced ones; call it once at prepare time, outside jit"
        )
    xs = types.SimpleNamespace(
        spec=x_qparams.spec,
        values=np.zeros(0, x_qparams.spec.dtype),
        scale=jnp.asarray(x_qparams.scale),
        zero_point=jnp.asarray(x_qparams.zero_point),
    )
    b = None if bias is None else jnp.asarray(bias)
    if not _native.fusable(w, xs, b, out_qparams, scheme, accumulate):
        raise ValueError(
            f"layer {w.name!r}: nothing to fold: the fused native call does not run this "
            f"layer (kernel {w.kernel!r}, scheme {scheme!r}, accumulate {accumulate!r}, "
            f"weight zero points known 0: {w.zero_point_is_zero}; it needs kernel 'onednn' "
            "(brgemm ukernel) or 'amx' (exact), or 'sat16' (a linear layer, or a conv with "
            "one group: saturating, or exact on uint8 codes), zero weight zero points, "
            "per-tensor 8-bit qparams)"
        )
    signed = np.dtype(x_qparams.spec.dtype) == np.int8
    shift = 128 if w.kernel in ("onednn", "sat16") and signed else 0
    relu = activation == "relu"
    w_sum = w.col_sum if isinstance(w, PreparedLinear) else w.w_sum

    vecs = _vectors(xs.scale, xs.zero_point, w.weight, w_sum, b, out_qparams, scheme, relu, shift)
    key = fold_key(x_qparams, out_qparams, scheme, relu)
    return dataclasses.replace(w, epilogue=tuple(vecs), folded=key)


@functools.partial(jax.jit, static_argnames=("scheme", "relu", "shift"))
def _vectors(sx, zx, wq, w_sum, b, out, scheme, relu, shift):
    """The layer's epilogue vectors, one compiled program per scheme, ReLU, shift and
    shapes (a program folding again after an edit reuses it)."""
    x = types.SimpleNamespace(scale=sx, zero_point=zx)
    return _layer_vectors(x, wq, w_sum, b, out, scheme, relu, shift)
