"""The steps of an imported torch eager / FX program as descriptions: ``(kind, attributes)``.

:func:`qjax.converters.torch.import_model` builds every step with :func:`make_torch_step`
from a *kind* of :data:`TORCH_KINDS` and plain attributes (numbers, strings, tuples,
activation :class:`~qjax.QParams`, argument templates with :class:`Ref`); the arrays
(prepared weights, biases, tables, batch-norm statistics) go in the step's params. The
same function rebuilds the steps of a program read from a file
(:mod:`qjax.flax._imported_io`), so a loaded program runs the code the imported one ran.

Values are stored in torch's memory order: ``want`` says whether a step stores its value
channels-last (``(N, *spatial, C)``, every quantized conv output is), ``cl`` / ``cls``
whether its input(s) are; :func:`relayout` moves codes between the two orders and
``Step.export`` gives :meth:`~qjax.Program.trace` the logical (NCHW) codes.

=====================  ==============================================  ====================
kind                   computes (``p``: the step's params)             attributes
=====================  ==============================================  ====================
``torch_quantize``     :func:`~qjax.kernels.quantize_input`            ``qp`` (``kernel``:
                                                                       the program's,
                                                                       not stored)
``torch_dequantize``   :func:`~qjax.kernels.dequantize_output` (NCHW)  (``kernel``: as
                                                                       above)
``torch_linear``       :func:`~qjax.kernels.quantized_linear`,         ``scheme``,
                       ``p = (prepared weight, bias)``                 ``activation``,
                                                                       ``accumulate``,
                                                                       ``out``
``torch_conv``         :func:`~qjax.kernels.quantized_conv`,           ``stride``,
                       ``p = (prepared weight, bias)``                 ``padding``,
                                                                       ``dilation``,
                                                                       ``groups``,
                                                                       ``layout``,
                                                                       ``scheme``,
                                                                       ``accumulate``,
                                                                       ``activation``,
                                                                       ``out``
``torch_unary``        identity, ``relu``, ``mul_scalar`` on codes      ``op``, ``value``
                                                                       (``kernel``: as
                                                                       above, relu)
``torch_clamp``        ``relu6`` / ``hardtanh`` on codes (``bug``:      ``op``, ``lo``,
                       QNNPACK's NHWC buffer read as NCHW)             ``hi``, ``bug``
``torch_hardswish``    ATen's kernel, or QNNPACK's 256-entry table     ``out``, ``qnnpack``
                       ``p`` (:mod:`qjax.kernels._hardswish`)
``torch_binary``       :func:`~qjax.kernels.quantized_add` /           ``op``,
                       :func:`~qjax.kernels.quantized_mul`             ``activation``,
                                                                       ``scheme``, ``out``
``torch_cat``          :func:`~qjax.kernels.quantized_cat`             ``dim``, ``fast``,
                                                                       ``out`` (or null)
``torch_shape``        :func:`~qjax.kernels.flatten` /                 ``op``, ``args``,
                       :func:`~qjax.kernels.reshape` on logical codes  ``kwargs``
``torch_size``         ``x.size()`` / ``x.size(d)``: Python ints       ``args``, ``kwargs``
``torch_getitem``      ``seq[i]`` of a non-tensor value                ``args``
``torch_pool``         :func:`~qjax.kernels.max_pool2d` /              ``op``, ``options``,
                       ``avg_pool2d`` / ``adaptive_avg_pool2d``        ``layout``
                                                                       (``kernel``: as
                                                                       above, max pool)
``torch_batch_norm``   :func:`~qjax.kernels.quantized_batch_norm`,     ``eps``, ``relu``,
                       ``p = (weight, bias, mean, var)``               ``out``, ``layout``
``torch_output``       the model's return structure, logical order     ``template``,
                                                                       ``cls``
=====================  ==============================================  ====================

Every kind but ``torch_dequantize``, ``torch_size``, ``torch_getitem`` and
``torch_output`` also has ``cl`` (or ``cls``) and ``want``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp

from .. import kernels as K
from .._qarray import QArray
from ..kernels._hardswish import hardswish_aten, lookup
from ..program import Layer, Step

__all__ = [
    "TORCH_KERNEL_KINDS",
    "TORCH_KINDS",
    "Ref",
    "fill",
    "make_torch_step",
    "pick",
    "relayout",
]

TORCH_KINDS = (
    "torch_quantize",
    "torch_dequantize",
    "torch_linear",
    "torch_conv",
    "torch_unary",
    "torch_clamp",
    "torch_hardswish",
    "torch_binary",
    "torch_cat",
    "torch_shape",
    "torch_size",
    "torch_getitem",
    "torch_pool",
    "torch_batch_norm",
    "torch_output",
)
# the kinds whose ops on codes may be a native call: they take the program's ``kernel``
# (set by the importer and the loader, never stored)
TORCH_KERNEL_KINDS = ("torch_quantize", "torch_dequantize", "torch_pool", "torch_unary")


@dataclasses.dataclass(frozen=True)
class Ref:
    """A placeholder in an argument template: the step's input ``i`` (``key``: the
    params entry ``key``, in a pt2e float step)."""

    i: int | None = None
    key: str | None = None


def fill(t, vals):
    """The template ``t`` with each ``Ref(i)`` replaced by ``vals[i]``.

    >>> fill((Ref(0), [1, Ref(1)], {"k": 2}), ("a", "b"))
    ('a', [1, 'b'], {'k': 2})
    """
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


def relayout(v, src: bool, dst: bool):
    """Move a stored value between logical (``False``) and channels-last (``True``) order.

    >>> from qjax import QParams, QuantSpec
    >>> x = QArray(jnp.zeros((1, 2, 3, 4), jnp.int8), QParams(1.0, 0, QuantSpec()))
    >>> relayout(x, False, True).shape, relayout(x, True, False).shape
    ((1, 3, 4, 2), (1, 4, 2, 3))
    """
    if src == dst or not isinstance(v, QArray) or v.ndim < 3:
        return v
    vals = jnp.moveaxis(v.values, -1, 1) if src else jnp.moveaxis(v.values, 1, -1)
    return QArray(vals, v.qparams)


# --------------------------------------------------------------------------------------
# one builder per kind: fn(params, *stored values) -> (value, channels_last)


def _quantize(a):
    qp, cl, kernel = a["qp"], a["cl"], a.get("kernel", "xla")

    def f(_, x):
        x = jnp.asarray(x, jnp.float32)
        return K.quantize_input(x if not cl else jnp.moveaxis(x, 1, -1), qp, kernel), cl

    return f


def _linear(a):
    cl, out, scheme, act, acc = a["cl"], a["out"], a["scheme"], a["activation"], a["accumulate"]

    def f(p, x):
        x = relayout(x, cl, False)
        y = K.quantized_linear(x, p[0], p[1], out, scheme=scheme, activation=act, accumulate=acc)
        return y, False

    return f


_CONV_OPTS = ("stride", "padding", "dilation", "groups", "layout", "scheme", "accumulate")


def _conv(a):
    cl, out = a["cl"], a["out"]
    opts = {k: a[k] for k in _CONV_OPTS} | {"activation": a["activation"]}

    def f(p, x):
        return K.quantized_conv(x, p[0], p[1], out, **opts), cl

    return f


def _unary(a):
    cl, op, c, kernel = a["cl"], a["op"], a["value"], a.get("kernel", "xla")
    if op == "identity":
        g = lambda x: x  # noqa: E731
    elif op == "relu":
        g = lambda x: K.relu(x, kernel=kernel)  # noqa: E731
    else:  # mul_scalar
        g = lambda x: K.quantized_mul_scalar(x, c)  # noqa: E731
    return lambda _, x: (g(x), cl)


def _clamp(a):
    cl, bug = a["cl"], a["bug"]
    if a["op"] == "relu6":
        g = K.relu6
    else:
        lo, hi = float(a["lo"]), float(a["hi"])
        g = lambda x: K.hardtanh(x, lo, hi)  # noqa: E731

    def f(_, x):
        y = g(x)
        if bug:  # (N, H, W, C) memory read as (N, C, H, W)
            n, h, w, c = y.shape
            return QArray(jnp.reshape(y.values, (n, c, h, w)), y.qparams), False
        return y, cl

    return f


def _hardswish(a):
    cl, out, qnn = a["cl"], a["out"], a["qnnpack"]

    def f(p, x):
        return (lookup(x, p, out) if qnn else hardswish_aten(x, out)), cl

    return f


def _binary(a):
    cls, want, out, act, scheme, op = (
        a["cls"], a["want"], a["out"], a["activation"], a["scheme"], a["op"]
    )  # fmt: skip

    def f(_, x, y):
        x, y = relayout(x, cls[0], want), relayout(y, cls[1], want)
        if op == "add":
            return K.quantized_add(x, y, out, scheme=scheme, activation=act), want
        return K.quantized_mul(x, y, out, activation=act), want

    return f


def _cat(a):
    out, fast, dim, cls = a["out"], a["fast"], a["dim"], a["cls"]

    def f(_, *xs):
        qo = out if out is not None else xs[0].qparams
        if fast:
            return K.quantized_cat(xs, 3, qo, nhwc_fast_path=True), True
        xs = [relayout(x, c, False) for x, c in zip(xs, cls, strict=True)]
        return K.quantized_cat(xs, dim, qo), False

    return f


def _flatten(x, a, kw):
    o = pick((None, *a), kw, [("start_dim", 0), ("end_dim", -1)])
    return K.flatten(x, int(o["start_dim"]), int(o["end_dim"]))


def _reshape(x, a, kw):
    shape = a[0] if len(a) == 1 and isinstance(a[0], (list, tuple)) else a
    shape = kw.get("shape", shape)
    return K.reshape(x, tuple(int(s) for s in shape))


def _shape(a):
    targs, tkw, cl = a["args"], a["kwargs"], a["cl"]
    op = _flatten if a["op"] == "flatten" else _reshape

    def g(_, *vals):
        args = fill(targs, vals)
        x = relayout(args[0], cl, False)
        return op(x, args[1:], fill(tkw, vals)), False

    return g


def _size(a):
    targs, tkw, cl = a["args"], a["kwargs"], a["cl"]

    def run(_, x, *rest):
        shp = relayout(x, cl, False).shape
        dim = fill(targs, (x, *rest))[1:] or [tkw.get("dim")]
        return shp if dim[0] is None else shp[int(dim[0])]

    return run


def _getitem(a):
    targs = a["args"]

    def run(_, *vals):
        seq, idx = fill(targs, vals)
        if isinstance(seq, QArray):
            raise NotImplementedError("indexing a quantized tensor")
        return seq[idx]

    return run


_POOLS = {
    "max_pool2d": K.max_pool2d,
    "avg_pool2d": K.avg_pool2d,
    "adaptive_avg_pool2d": K.adaptive_avg_pool2d,
}


def _pool(a):
    kernel_fn, layout, kw2, cl = _POOLS[a["op"]], a["layout"], dict(a["options"]), a["cl"]
    if a["op"] == "max_pool2d":
        kw2["kernel"] = a.get("kernel", "xla")
    return lambda _, x: (kernel_fn(x, layout=layout, **kw2), cl)


def _batch_norm(a):
    eps, out, relu, layout, cl = a["eps"], a["out"], a["relu"], a["layout"], a["cl"]

    def f(p, x):
        return K.quantized_batch_norm(x, *p, eps, out, relu=relu, layout=layout), cl

    return f


def _dequantize(a):
    cl, kernel = a["cl"], a.get("kernel", "xla")

    def run(_, x):
        if not isinstance(x, QArray):
            raise TypeError(f"dequantize of a non-quantized value {type(x).__name__}")
        return K.dequantize_output(relayout(x, cl, False), kernel=kernel)

    return run


def _output(a):
    template, cls = a["template"], a["cls"]

    def run(_, *vals):
        vals = [relayout(v, c, False) for v, c in zip(vals, cls, strict=True)]
        return fill(template, vals)[0]

    return run


_STORING = {  # kinds whose builder returns (value, channels_last): stored as `want`
    "torch_quantize": _quantize,
    "torch_linear": _linear,
    "torch_conv": _conv,
    "torch_unary": _unary,
    "torch_clamp": _clamp,
    "torch_hardswish": _hardswish,
    "torch_binary": _binary,
    "torch_cat": _cat,
    "torch_shape": _shape,
    "torch_pool": _pool,
    "torch_batch_norm": _batch_norm,
}
_PLAIN = {  # kinds whose builder returns the value itself (not traced)
    "torch_dequantize": _dequantize,
    "torch_size": _size,
    "torch_getitem": _getitem,
    "torch_output": _output,
}


def _export_nchw(v):
    return relayout(v, True, False)


def make_torch_step(
    name: str,
    kind: str,
    attrs: Mapping[str, Any],
    inputs: tuple[str, ...],
    params: Any = None,
    layer: Layer | None = None,
) -> Step:
    """The :class:`~qjax.Step` of ``kind`` (module docstring) reading ``inputs``;
    ``Step.spec`` keeps ``(kind, attrs)``. Steps of ``torch_dequantize``, ``torch_size``,
    ``torch_getitem`` and ``torch_output`` are not traced; the others are, through
    ``export`` to logical order when ``want`` (channels-last storage).

    >>> from qjax import QParams, QuantSpec
    >>> qp = QParams(0.5, 128, QuantSpec(signed=False))
    >>> s = make_torch_step("q", "torch_quantize", {"qp": qp, "cl": False, "want": False},
    ...                     ("x",))
    >>> s.fn(None, jnp.array([-1.0, 2.0])).values, s.spec[0]
    (Array([126, 132], dtype=uint8), 'torch_quantize')
    """
    attrs = dict(attrs)
    if kind in _STORING:
        f, want = _STORING[kind](attrs), attrs["want"]

        def run(p, *vals):
            v, cl = f(p, *vals)
            return relayout(v, cl, want)

        export = _export_nchw if want else None
        return Step(name, run, tuple(inputs), params, True, export, layer, (kind, attrs))
    if kind in _PLAIN:
        fn = _PLAIN[kind](attrs)
        return Step(name, fn, tuple(inputs), params, False, None, layer, (kind, attrs))
    raise ValueError(f"unknown torch step kind {kind!r}; known: {TORCH_KINDS}")
