"""Values of the torch importer: memory layouts, qparams and weights, fx argument binding.

Torch tensors that are channels-last in memory are stored channels-last
(:func:`relayout` moves codes between that and the logical order); activation qparams
are per-tensor with a float32 scale; weights are int8 :class:`~qjax.QArray`; constants go
to the device with ``jax.device_put`` (``jnp.asarray`` would compile once per shape).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import torch
from torch import fx

from qjax import QArray, QParams, QuantSpec

__all__ = [
    "Ref",
    "act_qparams",
    "bias_array",
    "bind",
    "device_array",
    "fill",
    "pick",
    "qparams_of",
    "relayout",
    "weight_qarray",
]


# ---------------------------------------------------------------------------------------
# layouts, qparams, weights


def device_array(a, dtype) -> jax.Array:
    """numpy -> device array without a compile (``jnp.asarray`` compiles one per shape)."""
    return jax.device_put(np.array(a, dtype=dtype, order="C"))


def relayout(v, src: bool, dst: bool):
    """Move a stored value between logical (``False``) and channels-last (``True``) order."""
    if src == dst or not isinstance(v, QArray) or v.ndim < 3:
        return v
    vals = jnp.moveaxis(v.values, -1, 1) if src else jnp.moveaxis(v.values, 1, -1)
    return QArray(vals, v.qparams)


def act_qparams(scale, zero_point, dtype) -> QParams:
    """Per-tensor activation qparams of a torch ``quint8``/``qint8`` tensor (f32 scale)."""
    if dtype not in (torch.quint8, torch.qint8):
        raise NotImplementedError(f"activation dtype {dtype} (only quint8 and qint8)")
    spec = QuantSpec(signed=dtype == torch.qint8)
    return QParams(
        device_array(float(scale), np.float32), device_array(int(zero_point), np.int32), spec
    )


def qparams_of(t: torch.Tensor) -> QParams:
    """The :class:`~qjax.QParams` of a per-tensor quantized torch tensor."""
    if t.qscheme() != torch.per_tensor_affine:
        raise NotImplementedError(f"activation qscheme {t.qscheme()} (only per-tensor affine)")
    return act_qparams(t.q_scale(), t.q_zero_point(), t.dtype)


def weight_qarray(w: torch.Tensor, where: str, *, transpose: bool = False) -> QArray:
    """A torch qint8 weight ``(out, ...)`` as a QArray (per-tensor, or per-channel along the
    output axis); ``transpose``: a linear weight ``(out, in) -> (in, out)``."""
    if w.dtype != torch.qint8:
        raise NotImplementedError(f"{where}: weight dtype {w.dtype} (only qint8)")
    vals = w.int_repr().numpy()
    vals = device_array(vals.T if transpose else vals, np.int8)
    axis = 1 if transpose else 0
    if w.qscheme() in (torch.per_tensor_affine, torch.per_tensor_symmetric):
        qp = QParams(
            device_array(w.q_scale(), np.float32),
            device_array(w.q_zero_point(), np.int32),
            QuantSpec(signed=True),
        )
    elif w.qscheme() in (torch.per_channel_affine, torch.per_channel_symmetric):
        if w.q_per_channel_axis() != 0:
            raise NotImplementedError(f"{where}: per-channel weight axis {w.q_per_channel_axis()}")
        qp = QParams(
            device_array(w.q_per_channel_scales().numpy(), np.float32),
            device_array(w.q_per_channel_zero_points().numpy(), np.int32),
            QuantSpec(signed=True, axis=axis),
        )
    else:
        raise NotImplementedError(f"{where}: weight qscheme {w.qscheme()}")
    return QArray(vals, qp)


def bias_array(b) -> Any:
    return None if b is None else device_array(b.detach().numpy(), np.float32)


# ---------------------------------------------------------------------------------------
# argument binding: fx args -> (value names, template), filled at run time


class Ref:
    def __init__(self, i: int):
        self.i = i


def bind(ctx, args, kwargs=None):
    """Split fx ``args``/``kwargs`` into value names (Nodes) and a template of constants."""
    names: list[str] = []

    def conv(a):
        if isinstance(a, fx.Node):
            if a.name in ctx.consts:
                return ctx.consts[a.name]
            names.append(a.name)
            return Ref(len(names) - 1)
        if isinstance(a, (list, tuple)):
            return type(a)(conv(b) for b in a)
        if isinstance(a, dict):
            return {k: conv(b) for k, b in a.items()}
        return a

    return names, conv(tuple(args)), conv(dict(kwargs or {}))


def fill(t, vals):
    if isinstance(t, Ref):
        return vals[t.i]
    if isinstance(t, (list, tuple)):
        return type(t)(fill(b, vals) for b in t)
    if isinstance(t, dict):
        return {k: fill(b, vals) for k, b in t.items()}
    return t


def pick(args, kwargs, names_defaults):
    """Positional-or-keyword arguments after the first (the input) by name."""
    out = {}
    for i, (n, d) in enumerate(names_defaults):
        if i + 1 < len(args):
            out[n] = args[i + 1]
        else:
            out[n] = kwargs.get(n, d)
    return out
