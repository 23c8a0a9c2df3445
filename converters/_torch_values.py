"""Values of the torch importer: memory layouts, qparams and weights, fx argument binding.

Torch tensors that are channels-last in memory are stored channels-last
(:func:`relayout` moves codes between that and the logical order); activation qparams
are per-tensor with a float32 scale; weights are int8 :class:`~qjax.QArray`; constants go
to the device with ``jax.device_put`` (``jnp.asarray`` would compile once per shape).
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
import torch
from torch import fx

from qjax import QArray, QParams, QuantSpec
from qjax._spec import check_qparam_values
from qjax.flax._torch_steps import Ref, fill, pick, relayout

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


def _checked(scale, zero_point, spec: QuantSpec, what: str) -> tuple[np.ndarray, np.ndarray]:
    """float32 scales and int32 zero points, checked as every qjax loader checks qparams
    (:func:`qjax._spec.check_qparam_values`: scale finite and > 0 after the float32 cast,
    zero point in the spec's range, before the int32 cast that would wrap a large one);
    torch keeps NaN, zero or negative scales and out-of-range zero points in a module."""
    with np.errstate(over="ignore"):  # a float64 scale beyond float32 becomes inf: refused
        s = np.asarray(scale, np.float64).astype(np.float32)
    z = np.asarray(zero_point)
    check_qparam_values(QParams.tree_unflatten(spec, (s, z)), what)
    return s, z.astype(np.int32)


def act_qparams(scale, zero_point, dtype, where: str = "output") -> QParams:
    """Per-tensor activation qparams of a torch ``quint8``/``qint8`` tensor (f32 scale),
    checked (``ValueError`` naming ``where``: NaN, zero or negative scale, zero point out
    of the dtype's range)."""
    if dtype not in (torch.quint8, torch.qint8):
        raise NotImplementedError(f"activation dtype {dtype} (only quint8 and qint8)")
    spec = QuantSpec(signed=dtype == torch.qint8)
    s, z = _checked(float(scale), int(zero_point), spec, f"{where} qparams")
    return QParams(device_array(s, np.float32), device_array(z, np.int32), spec)


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
        spec = QuantSpec(signed=True)
        s, z = _checked(w.q_scale(), w.q_zero_point(), spec, f"{where}: weight")
        qp = QParams(device_array(s, np.float32), device_array(z, np.int32), spec)
    elif w.qscheme() in (torch.per_channel_affine, torch.per_channel_symmetric):
        if w.q_per_channel_axis() != 0:
            raise NotImplementedError(f"{where}: per-channel weight axis {w.q_per_channel_axis()}")
        spec = QuantSpec(signed=True, axis=axis)
        s, z = _checked(
            w.q_per_channel_scales().numpy(),
            w.q_per_channel_zero_points().numpy(),
            spec,
            f"{where}: weight",
        )
        qp = QParams(device_array(s, np.float32), device_array(z, np.int32), spec)
    else:
        raise NotImplementedError(f"{where}: weight qscheme {w.qscheme()}")
    return QArray(vals, qp)


def bias_array(b, where: str = "layer") -> Any:
    """A quantized layer's float bias on the device; ``ValueError`` naming ``where`` if
    any entry is NaN or infinite."""
    if b is None:
        return None
    a = b.detach().numpy()
    if not np.isfinite(a).all():
        raise ValueError(f"{where}: bias must be finite, got {a[~np.isfinite(a)].reshape(-1)[0]}")
    return device_array(a, np.float32)


# ---------------------------------------------------------------------------------------
# argument binding: fx args -> (value names, template), filled at run time


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
