"""The steps of an imported pt2e program as descriptions: ``(kind, attributes)``.

:func:`qjax.converters.pt2e.import_pt2e` builds every step with :func:`make_pt2e_step`
from a *kind* of :data:`PT2E_KINDS` and plain attributes; the arrays (qparams as
``{"scale", "zp"}``, prepared weights, biases, float constants) go in the step's params.
The same function rebuilds the steps of a program read from a file
(:mod:`qjax.flax._imported_io`). ``spec`` is the :class:`~qjax.QuantSpec` of the step's
quantize / dequantize node (output codes). Float ops are ATen ops of
:data:`qjax.flax._aten.FLOAT_OPS` (by name: nothing else runs).

===================  ================================================  ======================
kind                 computes (``p``: the step's params)               attributes
===================  ================================================  ======================
``pt2e_quantize``    ``clamp(rint(x·f32(1/s)) + zp)`` (rule 5)         ``spec``
``pt2e_dequantize``  ``f32(q - zp)·s``                                 ``spec``
``pt2e_float``       the ATen op ``op`` on float values; ``args`` /     ``op``, ``args``,
                     ``kwargs`` templates (:class:`~qjax.flax.          ``kwargs``
                     _torch_steps.Ref`` ``i``: input ``i``, ``key``:
                     ``p[key]``)
``pt2e_conv``        :func:`~qjax.kernels.quantized_conv`,             ``spec``, ``stride``,
                     ``p = {w, b, out}``                               ``padding``,
                                                                       ``dilation``,
                                                                       ``layout``,
                                                                       ``scheme``,
                                                                       ``activation``,
                                                                       ``bounds``
``pt2e_linear``      :func:`~qjax.kernels.quantized_linear`,           ``spec``, ``scheme``,
                     ``p = {w, b, out}``                               ``activation``,
                                                                       ``bounds``
``pt2e_binary``      :func:`~qjax.kernels.quantized_add` /             ``op``, ``spec``,
                     ``quantized_mul``                                 ``scheme``,
                                                                       ``activation``
``pt2e_cat``         :func:`~qjax.kernels.quantized_cat`               ``spec``, ``dim``
``pt2e_pool``        max / avg / adaptive-avg pool, mean over H, W     ``op``, ``args``,
                     on codes                                          ``scheme``
``pt2e_relu``        ``max(q, zp)`` on codes                           --
``pt2e_move``        a data-movement ATen op on codes                  ``op``, ``args``,
                     (:data:`~qjax.flax._aten.MOVEMENT_OPS`)           ``kwargs``
===================  ================================================  ======================
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp

from .. import kernels as K
from .._float import materialize
from .._primitives import dequantize, quantize
from .._qarray import QArray
from .._spec import QParams
from ..program import Layer, Step
from ._aten import FLOAT_OPS, MOVEMENT_OPS
from ._torch_steps import Ref

__all__ = ["PT2E_KINDS", "make_pt2e_step", "qp_params"]

PT2E_KINDS = (
    "pt2e_quantize",
    "pt2e_dequantize",
    "pt2e_float",
    "pt2e_conv",
    "pt2e_linear",
    "pt2e_binary",
    "pt2e_cat",
    "pt2e_pool",
    "pt2e_relu",
    "pt2e_move",
)
_UNTRACED = ("pt2e_dequantize", "pt2e_float")


def qp_params(qp: QParams) -> dict:
    """``{"scale": f32, "zp": int}``: a per-tensor qparams' arrays, as step params."""
    return {"scale": jnp.asarray(qp.scale, jnp.float32), "zp": jnp.asarray(qp.zero_point)}


def _qp(spec, p) -> QParams:
    return QParams(p["scale"], p["zp"], spec)


def _fill(t, params, vals):
    if isinstance(t, Ref):
        v = vals[t.i] if t.i is not None else params[t.key]
        return v.values if isinstance(v, QArray) else v
    if isinstance(t, (list, tuple)):
        return type(t)(_fill(a, params, vals) for a in t)
    if isinstance(t, dict):
        return {k: _fill(a, params, vals) for k, a in t.items()}
    return t


def _materialize(v):
    """Stop XLA from fusing a float value into its consumer (an fma would skip a rounding)."""
    if isinstance(v, jax.Array) and jnp.issubdtype(v.dtype, jnp.floating):
        return materialize(v)
    if isinstance(v, tuple):
        return tuple(_materialize(a) for a in v)
    return v


def _quantize(a):
    spec = a["spec"]

    def fn(p, x):
        return QArray(quantize(x, _qp(spec, p)), _qp(spec, p))

    return fn


def _dequantize(a):
    spec = a["spec"]

    def fn(p, q):
        return materialize(dequantize(q.values, _qp(spec, p)))

    return fn


def _float(a):
    fop, targs, tkw = FLOAT_OPS[a["op"]], a["args"], a["kwargs"]

    def fn(p, *vals):
        return _materialize(fop(*_fill(targs, p, vals), **_fill(tkw, p, vals)))

    return fn


def _conv(a):
    spec, name = a["spec"], a["name"]
    opts = {k: a[k] for k in ("stride", "padding", "dilation", "layout", "scheme", "bounds")}
    opts["activation"] = a["activation"]

    def fn(p, xq):
        return K.quantized_conv(xq, p["w"], p["b"], _qp(spec, p["out"]), **opts, name=name)

    return fn


def _linear(a):
    spec, name, scheme, act, bounds = (
        a["spec"],
        a["name"],
        a["scheme"],
        a["activation"],
        a["bounds"],
    )

    def fn(p, xq):
        out = _qp(spec, p["out"])
        return K.quantized_linear(
            xq, p["w"], p["b"], out, scheme=scheme, activation=act, bounds=bounds, name=name
        )

    return fn


def _binary(a):
    spec, scheme, act = a["spec"], a["scheme"], a["activation"]
    if a["op"] == "add":
        return lambda p, qa, qb: K.quantized_add(
            qa, qb, _qp(spec, p), scheme=scheme, activation=act
        )
    return lambda p, qa, qb: K.quantized_mul(qa, qb, _qp(spec, p), activation=act)


def _cat(a):
    spec, dim = a["spec"], a["dim"]
    return lambda p, *qs: K.quantized_cat(qs, dim, _qp(spec, p))


def _pool(a):
    op, args, scheme = a["op"], a["args"], a["scheme"]
    if op == "max_pool2d":
        k, s, pad, dil, ceil = args
        return lambda p, xq: K.max_pool2d(xq, k, s, pad, dil, bool(ceil))
    if op == "avg_pool2d":
        k, s, pad, ceil, cip, div = args
        return lambda p, xq: K.avg_pool2d(xq, k, s, pad, bool(ceil), bool(cip), div, scheme=scheme)
    if op == "adaptive_avg_pool2d":
        (size,) = args
        return lambda p, xq: K.adaptive_avg_pool2d(xq, size, scheme=scheme)
    (keep,) = args  # mean over H and W

    def mean(p, xq):
        y = K.adaptive_avg_pool2d(xq, 1, scheme=scheme)
        return y if keep else K.reshape(y, y.shape[:2])

    return mean


def _move(a):
    move, rest, kwargs = MOVEMENT_OPS[a["op"]], a["args"], dict(a["kwargs"])

    def fn(p, xq):
        return QArray(move(xq.values, *rest, **kwargs), xq.qparams)

    return fn


_BUILDERS = {
    "pt2e_quantize": _quantize,
    "pt2e_dequantize": _dequantize,
    "pt2e_float": _float,
    "pt2e_conv": _conv,
    "pt2e_linear": _linear,
    "pt2e_binary": _binary,
    "pt2e_cat": _cat,
    "pt2e_pool": _pool,
    "pt2e_relu": lambda a: lambda p, xq: K.relu(xq),
    "pt2e_move": _move,
}


def make_pt2e_step(
    name: str,
    kind: str,
    attrs: Mapping[str, Any],
    inputs: tuple[str, ...],
    params: Any = None,
    layer: Layer | None = None,
) -> Step:
    """The :class:`~qjax.Step` of ``kind`` (module docstring) reading ``inputs``;
    ``Step.spec`` keeps ``(kind, attrs)``. Dequantize and float steps are not traced.

    >>> from qjax import QuantSpec
    >>> qp = QParams(0.5, 0, QuantSpec())
    >>> s = make_pt2e_step("q", "pt2e_quantize", {"spec": qp.spec}, ("x",), qp_params(qp))
    >>> s.fn(s.params, jnp.array([0.3, -9.0])).values
    Array([  1, -18], dtype=int8)
    """
    if kind not in _BUILDERS:
        raise ValueError(f"unknown pt2e step kind {kind!r}; known: {PT2E_KINDS}")
    attrs = dict(attrs)
    fn = _BUILDERS[kind](attrs)
    traced = kind not in _UNTRACED
    return Step(name, fn, tuple(inputs), params, traced, None, layer, (kind, attrs))
