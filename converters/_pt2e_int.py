"""Integer lowering of pt2e ``dq -> op -> q`` patterns onto :mod:`qjax.kernels`.

:func:`lower` looks at one ``quantize_per_tensor`` node and the op feeding it. When every
tensor operand of that op is a ``dequantize_per_tensor`` of a run-time quantized tensor
(with the same qparams) or a constant int8 weight, and :mod:`qjax.kernels` has the op,
the q node becomes one integer step:

=====================================  ==================================================
pattern (``act``: relu / hardtanh)     kernel
=====================================  ==================================================
conv1d / conv2d [-> act] -> q          :func:`~qjax.kernels.quantized_conv` (``scheme``)
linear [-> act] -> q                   :func:`~qjax.kernels.quantized_linear` (``scheme``)
add [-> relu] -> q                     :func:`~qjax.kernels.quantized_add` (``add_scheme``)
mul [-> relu] -> q                     :func:`~qjax.kernels.quantized_mul`
cat -> q                               :func:`~qjax.kernels.quantized_cat`
max_pool2d -> q, relu -> q,            :func:`~qjax.kernels.max_pool2d`,
data movement -> q (same qparams)      :func:`~qjax.kernels.relu`, the move on codes
avg_pool2d / adaptive_avg_pool2d /     :func:`~qjax.kernels.avg_pool2d`,
mean over H, W -> q (same qparams)     :func:`~qjax.kernels.adaptive_avg_pool2d`
=====================================  ==================================================

Anything else returns ``None``, and the importer quantizes the float result instead.
The op node itself may have other (float) users; they keep their float step.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from torch.fx.node import Node

from qjax import QArray, QParams
from qjax import kernels as K
from qjax.flax._aten import MOVEMENT_OPS
from qjax.flax._pt2e_steps import make_pt2e_step, qp_params
from qjax.kernels._choice import conv_kernel, linear_kernel
from qjax.program import Layer, Step

from . import _pt2e_graph as G

__all__ = ["lower"]

_ACT = {
    "aten.relu.default": "relu",
    "aten.relu_.default": "relu",
    "aten.hardtanh.default": "hardtanh",
    "aten.hardtanh_.default": "hardtanh",
}
_CONV = ("aten.conv1d.default", "aten.conv2d.default", "aten.conv2d.padding")
_LINEAR = ("aten.linear.default",)
_RELU_ONLY = ("aten.add.Tensor", "aten.mul.Tensor")


def _arg(node, i, name, default):
    if len(node.args) > i:
        return node.args[i]
    return node.kwargs.get(name, default)


def _outp(qp: QParams):
    return qp_params(qp)


def lower(qnode, qp: QParams, b) -> Step | None:
    """An integer :class:`Step` computing ``qnode``'s codes, or ``None`` (module docstring)."""
    src = qnode.args[0]
    if not isinstance(src, Node) or src.op != "call_function":
        return None
    op, act, bounds, nodes = src, None, None, [src.name]
    t = G.target_name(src)
    inner = src.args[0] if src.args else None
    if t in _ACT and isinstance(inner, Node) and inner.op == "call_function":
        it = G.target_name(inner)
        if it in _CONV + _LINEAR + _RELU_ONLY:
            act = _ACT[t]
            if act == "hardtanh":
                bounds = (float(_arg(src, 1, "min_val", -1.0)), float(_arg(src, 2, "max_val", 1.0)))
                if bounds == (0.0, 6.0):
                    act, bounds = "relu6", None
            if it in _RELU_ONLY and act != "relu":
                return None
            op, nodes = inner, [inner.name, src.name]
    t = G.target_name(op)
    handler = _HANDLERS.get(t)
    if handler is None and t in MOVEMENT_OPS:
        handler = _movement
    if handler is None:
        return None
    return handler(qnode, qp, op, act, bounds, b, nodes)


def _layer(qnode, op, kind, qp, nodes, scheme=None, weight=None, **extra) -> Layer:
    extra = {"nodes": tuple(nodes), "module": G.module_path(op), **extra}
    return Layer(kind, G.target_name(op), scheme=scheme, weight=weight, out=qp, extra=extra)


def _conv(qnode, qp, op, act, bounds, b, nodes):
    x, w = b.runtime_q(op.args[0]), b.weight(op.args[1])
    bias_node = _arg(op, 2, "bias", None)
    bias = b.const(bias_node)
    if (
        x is None
        or w is None
        or w.spec.dtype != np.int8
        or (bias_node is not None and bias is None)
    ):
        return None
    nsp = w.ndim - 2
    if nsp not in (1, 2) or w.spec.granularity == "group":
        return None
    if w.spec.granularity == "axis" and w.spec.normalized_axes(w.ndim) != (0,):
        return None
    stride = _arg(op, 3, "stride", 1)
    padding = _arg(op, 4, "padding", 0)
    dilation = _arg(op, 5, "dilation", 1)
    groups = int(_arg(op, 6, "groups", 1))
    layout = "NCHW" if nsp == 2 else "NCW"
    kernel = conv_kernel(b.kernel, nsp, groups, dilation)
    pw = K.prepare_conv(
        w, name=qnode.name, groups=groups, weight_layout="OI" + "HW"[-nsp:], kernel=kernel
    )
    pad = padding.upper() if isinstance(padding, str) else padding
    attrs = dict(
        spec=qp.spec, stride=stride, padding=pad, dilation=dilation, layout=layout,
        scheme=b.scheme, activation=act, bounds=bounds, name=qnode.name,
    )  # fmt: skip
    params = {"w": pw, "b": None if bias is None else jnp.asarray(bias), "out": _outp(qp)}
    layer = _layer(qnode, op, f"conv{nsp}d", qp, nodes, b.scheme, w.qparams, activation=act)
    return make_pt2e_step(qnode.name, "pt2e_conv", attrs, (x[0],), params, layer)


def _linear(qnode, qp, op, act, bounds, b, nodes):
    x, w = b.runtime_q(op.args[0]), b.weight(op.args[1])
    bias_node = _arg(op, 2, "bias", None)
    bias = b.const(bias_node)
    if x is None or w is None or w.spec.dtype != np.int8 or w.ndim != 2:
        return None
    if bias_node is not None and bias is None:
        return None
    spec_w = w.spec
    if spec_w.granularity == "group":
        return None
    if spec_w.granularity == "axis":
        if spec_w.normalized_axes(2) != (0,):
            return None
        spec_w = spec_w.replace(axis=1)
    # torch's (out, in) weight -> qjax's (in, out)
    wt = QArray(w.values.T, QParams(w.scale, w.zero_point, spec_w))
    pw = K.prepare_linear(wt, name=qnode.name, kernel=linear_kernel(b.kernel))
    scheme = b.scheme
    attrs = dict(spec=qp.spec, scheme=scheme, activation=act, bounds=bounds, name=qnode.name)
    params = {"w": pw, "b": None if bias is None else jnp.asarray(bias), "out": _outp(qp)}
    layer = _layer(qnode, op, "linear", qp, nodes, scheme, w.qparams, activation=act)
    return make_pt2e_step(qnode.name, "pt2e_linear", attrs, (x[0],), params, layer)


def _two_operands(op, b):
    """Both operands run-time quantized, same known shape (no broadcasting), or None."""
    if len(op.args) < 2:
        return None
    xa, xb = b.runtime_q(op.args[0]), b.runtime_q(op.args[1])
    if xa is None or xb is None:
        return None
    sa, sb = G.shape_of(op.args[0]), G.shape_of(op.args[1])
    if sa is None or sa != sb:
        return None
    return xa, xb


def _add(qnode, qp, op, act, bounds, b, nodes):
    ab = _two_operands(op, b)
    if ab is None or op.kwargs.get("alpha", 1) != 1:
        return None
    scheme = b.add_scheme
    attrs = {"op": "add", "spec": qp.spec, "scheme": scheme, "activation": act}
    layer = _layer(qnode, op, "add", qp, nodes, scheme, activation=act)
    inputs = (ab[0][0], ab[1][0])
    return make_pt2e_step(qnode.name, "pt2e_binary", attrs, inputs, _outp(qp), layer)


def _mul(qnode, qp, op, act, bounds, b, nodes):
    ab = _two_operands(op, b)
    if ab is None:
        return None
    attrs = {"op": "mul", "spec": qp.spec, "scheme": None, "activation": act}
    layer = _layer(qnode, op, "mul", qp, nodes, "aten", activation=act)
    inputs = (ab[0][0], ab[1][0])
    return make_pt2e_step(qnode.name, "pt2e_binary", attrs, inputs, _outp(qp), layer)


def _cat(qnode, qp, op, act, bounds, b, nodes):
    xs = [b.runtime_q(a) for a in op.args[0]]
    if not xs or any(x is None for x in xs):
        return None
    attrs = {"spec": qp.spec, "dim": int(_arg(op, 1, "dim", 0))}
    layer = _layer(qnode, op, "cat", qp, nodes, "aten")
    inputs = tuple(x[0] for x in xs)
    return make_pt2e_step(qnode.name, "pt2e_cat", attrs, inputs, _outp(qp), layer)


def _same_q_input(op, qp, b, ndim=None):
    """The run-time input of a qparams-preserving op, when the q keeps its qparams."""
    x = b.runtime_q(op.args[0])
    if x is None or not G.same_qparams(x[1], qp):
        return None
    if ndim is not None and len(G.shape_of(op.args[0]) or ()) != ndim:
        return None
    return x


def _pool(kind):
    def handler(qnode, qp, op, act, bounds, b, nodes):
        x = _same_q_input(op, qp, b, ndim=4)
        if x is None:
            return None
        a = list(op.args[1:])
        scheme = b.pool_scheme
        if kind == "max_pool2d":
            k, s, pad, dil, ceil = (a + [None, [], 0, 1, False][len(a) :])[:5]
            args = (k, None if not s else s, pad, dil, ceil)
            scheme = None
        elif kind == "avg_pool2d":
            k, s, pad, ceil, cip, div = (a + [None, [], 0, False, True, None][len(a) :])[:6]
            args = (k, None if not s else s, pad, ceil, cip, div)
        elif kind == "adaptive_avg_pool2d":
            args = (tuple(a[0]),)
        else:  # mean over H and W
            dims = sorted(int(d) % 4 for d in np.atleast_1d(_arg(op, 1, "dim", [])))
            if dims != [2, 3] or _arg(op, 3, "dtype", None) is not None:
                return None
            args = (bool(_arg(op, 2, "keepdim", False)),)
        layer = _layer(qnode, op, kind, qp, nodes, scheme)
        attrs = {"op": kind, "args": args, "scheme": scheme}
        return make_pt2e_step(qnode.name, "pt2e_pool", attrs, (x[0],), None, layer)

    return handler


def _relu(qnode, qp, op, act, bounds, b, nodes):
    x = _same_q_input(op, qp, b)
    if x is None:
        return None
    layer = _layer(qnode, op, "relu", qp, nodes)
    return make_pt2e_step(qnode.name, "pt2e_relu", {}, (x[0],), None, layer)


def _movement(qnode, qp, op, act, bounds, b, nodes):
    x = _same_q_input(op, qp, b)
    rest = op.args[1:]
    if x is None or any(isinstance(a, Node) for a in list(rest) + list(op.kwargs.values())):
        return None
    attrs = {"op": G.target_name(op), "args": tuple(rest), "kwargs": dict(op.kwargs)}
    layer = _layer(qnode, op, "move", qp, nodes)
    return make_pt2e_step(qnode.name, "pt2e_move", attrs, (x[0],), None, layer)


_HANDLERS = {
    **dict.fromkeys(_CONV, _conv),
    "aten.linear.default": _linear,
    "aten.add.Tensor": _add,
    "aten.mul.Tensor": _mul,
    "aten.cat.default": _cat,
    "aten.relu.default": _relu,
    "aten.relu_.default": _relu,
    "aten.max_pool2d.default": _pool("max_pool2d"),
    "aten.avg_pool2d.default": _pool("avg_pool2d"),
    "aten.adaptive_avg_pool2d.default": _pool("adaptive_avg_pool2d"),
    "aten.mean.dim": _pool("mean"),
}
