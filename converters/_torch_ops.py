"""Op table of the torch importer: one handler per quantized torch op / module.

A handler gets the import context and an ``fx.Node`` and returns a :class:`~qjax.Step`
built by :func:`qjax.flax._torch_steps.make_torch_step` from a kind and plain attributes
(what :func:`qjax.save_served` writes).
Values are stored in *torch's memory order*: a tensor that torch keeps channels-last
(every quantized conv output is) is stored ``(N, *spatial, C)``, any other tensor in its
logical shape. Step functions receive stored values and the static layout of each
input, so layout-sensitive kernels (average pools, ``cat``, the scalar tail of ``add``)
run the same path torch runs; :func:`relayout` moves codes between the two orders.
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.ao.nn.intrinsic.quantized as nniq
import torch.ao.nn.quantized as nnq
import torch.nn.functional as F
from torch import fx, nn

from qjax.flax._torch_steps import make_torch_step
from qjax.kernels import prepare_conv, prepare_linear
from qjax.kernels._choice import conv_kernel, linear_kernel, quantize_kernel
from qjax.kernels._hardswish import hardswish_table
from qjax.kernels._levels import fbgemm_depthwise_fast_path
from qjax.program import Layer

from ._torch_values import (
    Ref,
    act_qparams,
    bias_array,
    bind,
    device_array,
    fill,
    pick,
    qparams_of,
    relayout,
    weight_qarray,
)

__all__ = ["HANDLERS", "bind", "device_array", "fill", "qparams_of", "relayout", "target_name"]


def _boundary(ctx) -> str:
    """The kernel of the program's ops on codes with a native call (boundary quantize and
    dequantize, max pool, ReLU): native where its layers are (:func:`quantize_kernel`)."""
    return quantize_kernel(ctx.kernel, ctx.engine.linear_accumulate)


def _step(ctx, node, kind, attrs, inputs, *, params=None, layer):
    """The step of ``kind`` (:mod:`qjax.flax._torch_steps`) storing torch's order."""
    attrs = {**attrs, "want": ctx.cl.get(node.name, False)}
    return make_torch_step(node.name, kind, attrs, tuple(inputs), params, layer)


def _unary(ctx, node, op, value=None):
    """An op on one quantized input that keeps its layout (identity, relu, mul_scalar)."""
    src = node.args[0]
    cl = ctx.cl.get(src.name, False)
    layer = Layer(op, target_name(node), None, None, None)
    attrs = {"op": op, "value": value, "cl": cl, "kernel": _boundary(ctx)}
    return _step(ctx, node, "torch_unary", attrs, [src.name], layer=layer)


# ---------------------------------------------------------------------------------------
# handlers


def h_quantize(ctx, node, mod=None):
    if mod is not None:  # nnq.Quantize
        qp = act_qparams(
            mod.scale.item(), mod.zero_point.item(), mod.dtype, f"layer {node.target!r} input"
        )
        src = node.args[0]
        target = "torch.ao.nn.quantized.Quantize"
    else:
        names, a, kw = bind(ctx, node.args, node.kwargs)
        if names[1:]:
            raise NotImplementedError("quantize_per_tensor with computed scale / zero point")
        sc, zp, dt = (
            pick(a, kw, [("scale", None), ("zero_point", None), ("dtype", None)])
        ).values()
        qp = act_qparams(float(sc), int(zp), dt, "input")
        src = node.args[0]
        target = "torch.quantize_per_tensor"
    attrs = {"qp": qp, "cl": ctx.cl.get(src.name, False), "kernel": _boundary(ctx)}
    layer = Layer("quantize", target, None, None, qp)
    return _step(ctx, node, "torch_quantize", attrs, [src.name], layer=layer)


def h_dequantize(ctx, node, mod=None):
    src = node.args[0]
    attrs = {"cl": ctx.cl.get(src.name, False), "kernel": _boundary(ctx)}
    layer = Layer("dequantize", "dequantize", None, None, None)
    return make_torch_step(node.name, "torch_dequantize", attrs, (src.name,), None, layer)


def _layer_name(node) -> str:
    return node.target if node.op == "call_module" else node.name


def h_linear(ctx, node, mod):
    relu = isinstance(mod, nniq.LinearReLU)
    where = f"layer {_layer_name(node)!r}"
    w = weight_qarray(mod.weight(), where, transpose=True)
    scheme, acc = ctx.engine.linear, ctx.engine.linear_accumulate
    kernel = linear_kernel(ctx.kernel, acc)
    pw = prepare_linear(w, name=_layer_name(node), kernel=kernel)
    out = act_qparams(mod.scale, mod.zero_point, torch.quint8, f"{where} output")
    src = node.args[0]
    cl = ctx.cl.get(src.name, False)
    act = "relu" if relu else None
    attrs = {"scheme": scheme, "activation": act, "accumulate": acc, "out": out, "cl": cl}
    layer = Layer(
        "linear", type(mod).__module__ + "." + type(mod).__name__, scheme, w.qparams, out,
        {"activation": act, "accumulate": acc, "kernel": kernel},
    )  # fmt: skip
    params = (pw, bias_array(mod.bias(), where))
    return _step(ctx, node, "torch_linear", attrs, [src.name], params=params, layer=layer)


def h_conv(ctx, node, mod):
    relu = isinstance(mod, (nniq.ConvReLU1d, nniq.ConvReLU2d))
    nsp = 1 if isinstance(mod, (nnq.Conv1d, nniq.ConvReLU1d)) else 2
    name = _layer_name(node)
    if mod.padding_mode != "zeros":
        raise NotImplementedError(f"conv {name!r}: padding_mode={mod.padding_mode!r}")
    w = weight_qarray(mod.weight(), f"layer {name!r}")
    zp_zero = bool(np.all(np.asarray(w.zero_point) == 0))
    fast = nsp == 2 and fbgemm_depthwise_fast_path(
        mod.groups, mod.in_channels, mod.out_channels, mod.kernel_size, mod.stride,
        mod.dilation, mod.padding,
    )  # fmt: skip
    scheme, acc = ctx.engine.conv_scheme(
        zp_zero, mod.groups, mod.in_channels, mod.out_channels, depthwise_fast_path=fast
    )
    kernel = conv_kernel(ctx.kernel, nsp, mod.groups, tuple(mod.dilation), acc)
    pw = prepare_conv(
        w, name=name, groups=mod.groups, weight_layout="OIHW" if nsp == 2 else "OIW",
        kernel=kernel,
    )  # fmt: skip
    out = act_qparams(mod.scale, mod.zero_point, torch.quint8, f"layer {name!r} output")
    src = node.args[0]
    cl = ctx.cl.get(src.name, False)
    layout = ("NHWC" if nsp == 2 else "NWC") if cl else ("NCHW" if nsp == 2 else "NCW")
    opts = dict(
        stride=tuple(mod.stride), padding=tuple(mod.padding), dilation=tuple(mod.dilation),
        groups=mod.groups, layout=layout, scheme=scheme, accumulate=acc,
        activation="relu" if relu else None,
    )  # fmt: skip
    layer = Layer(
        f"conv{nsp}d", type(mod).__module__ + "." + type(mod).__name__, scheme, w.qparams, out,
        {k: v for k, v in opts.items() if k not in ("layout", "scheme")} | {"kernel": kernel},
    )  # fmt: skip
    params = (pw, bias_array(mod.bias(), f"layer {name!r}"))
    attrs = {**opts, "out": out, "cl": cl}
    return _step(ctx, node, "torch_conv", attrs, [src.name], params=params, layer=layer)


def h_identity(ctx, node, mod=None):
    return _unary(ctx, node, "identity")


def h_relu(ctx, node, mod=None):
    return _unary(ctx, node, "relu")


def _clamp(ctx, node, op, lo=None, hi=None):
    """relu6 / hardtanh. torch 2.13's QNNPACK clamp (``qnnpack_clamp``, taken under the
    ``qnnpack`` engine for quint8) clamps a channels-last input's buffer but returns it as
    a *contiguous* tensor of the same sizes: the NHWC codes reinterpreted in NCHW order
    (measured; a torch bug). The ``"qnnpack"`` engine reproduces that."""
    src = node.args[0]
    cl = ctx.cl.get(src.name, False)
    bug = (
        ctx.engine.name == "qnnpack"
        and cl
        and ctx.ndim(src) == 4
        and ctx.dtype_of(src) == torch.quint8
    )
    layer = Layer(op, target_name(node), None, None, None, {"qnnpack_layout_bug": bug})
    attrs = {"op": op, "lo": lo, "hi": hi, "bug": bug, "cl": cl}
    return _step(ctx, node, "torch_clamp", attrs, [src.name], layer=layer)


def h_relu6(ctx, node, mod=None):
    return _clamp(ctx, node, "relu6")


def h_hardtanh(ctx, node, mod=None):
    if mod is not None:
        lo, hi = mod.min_val, mod.max_val
    else:
        _, a, kw = bind(ctx, node.args, node.kwargs)
        lo, hi, _ = pick(a, kw, [("min_val", -1.0), ("max_val", 1.0), ("inplace", False)]).values()
    return _clamp(ctx, node, "hardtanh", float(lo), float(hi))


def h_hardswish(ctx, node, mod=None):
    """``quantized::hardswish`` (``nnq.Hardswish``): QNNPACK's table for quint8 under the
    ``qnnpack`` engine, ATen's kernel otherwise (:mod:`qjax.kernels._hardswish`)."""
    if mod is not None:
        sc, zp = float(mod.scale), int(mod.zero_point)
    else:
        names, a, kw = bind(ctx, node.args, node.kwargs)
        o = pick(a, kw, [("output_scale", None), ("output_zero_point", None)])
        sc, zp = float(o["output_scale"]), int(o["output_zero_point"])
    src = node.args[0]
    dtype = ctx.dtype_of(src)
    out = act_qparams(sc, zp, dtype)
    cl = ctx.cl.get(src.name, False)
    qnn = ctx.engine.name == "qnnpack" and dtype == torch.quint8
    params = None
    if qnn:
        t = ctx.values[src.name]
        params = device_array(hardswish_table(t.q_scale(), t.q_zero_point(), sc, zp), np.uint8)
    attrs = {"out": out, "qnnpack": qnn, "cl": cl}
    layer = Layer("hardswish", target_name(node), "qnnpack" if qnn else "aten", None, out)
    return _step(ctx, node, "torch_hardswish", attrs, [src.name], params=params, layer=layer)


def _binary_qparams(ctx, node, a, kw, what):
    """``(a, b, scale, zero_point)`` of ``torch.ops.quantized.add/mul`` (args or kwargs)."""
    o = pick(a, kw, [("other", None), ("scale", None), ("zero_point", None)])
    if isinstance(o["scale"], Ref) or isinstance(o["zero_point"], Ref):
        raise NotImplementedError(f"{what} with computed output scale / zero point")
    return act_qparams(float(o["scale"]), int(o["zero_point"]), ctx.dtype_of(node.args[0]))


def h_add(ctx, node, mod=None, relu=False, op="add"):
    names, a, kw = bind(ctx, node.args, node.kwargs)
    if len(names) != 2:
        raise NotImplementedError(f"quantized.{op} needs two quantized tensors, got {node.args}")
    out = _binary_qparams(ctx, node, a, kw, f"quantized.{op}")
    want = ctx.cl.get(node.name, False)
    cls = [ctx.cl.get(n, False) for n in names]
    act = "relu" if relu else None
    scheme = ctx.engine.add if op == "add" else None
    attrs = {"op": op, "activation": act, "scheme": scheme, "out": out, "cls": tuple(cls)}
    attrs["want"] = want
    layer = Layer(op + ("_relu" if relu else ""), target_name(node), scheme, None, out)
    return _step(ctx, node, "torch_binary", attrs, names, layer=layer)


def h_add_relu(ctx, node, mod=None):
    return h_add(ctx, node, relu=True)


def h_mul(ctx, node, mod=None):
    return h_add(ctx, node, op="mul")


def h_mul_relu(ctx, node, mod=None):
    return h_add(ctx, node, relu=True, op="mul")


def h_mul_scalar(ctx, node, mod=None):
    names, a, kw = bind(ctx, node.args, node.kwargs)
    if len(names) != 1 or isinstance(a[1], Ref):
        raise NotImplementedError("quantized.mul_scalar with a computed scalar")
    return _unary(ctx, node, "mul_scalar", float(a[1]))


def h_cat(ctx, node, mod=None):
    """``quantized.cat(xs, dim, scale, zero_point)`` or ``torch.cat`` on quantized tensors
    (output qparams of the first input, as torch's ``cat_quantized_cpu``)."""
    names, a, kw = bind(ctx, node.args, node.kwargs)
    srcs = node.args[0] if node.args else node.kwargs.get("tensors")
    if not isinstance(srcs, (list, tuple)) or not all(isinstance(t, fx.Node) for t in srcs):
        raise NotImplementedError("cat of non-tensor arguments")
    o = pick(a, kw, [("dim", 0), ("scale", None), ("zero_point", None)])
    out = None
    if o["scale"] is not None:
        out = act_qparams(float(o["scale"]), int(o["zero_point"]), ctx.dtype_of(srcs[0]))
    dim = int(o["dim"]) % ctx.ndim(srcs[0])
    cls = [ctx.cl.get(n.name, False) for n in srcs]
    # torch's channels-last kernel: 4-d channels-last inputs joined along channels
    fast = dim == 1 and ctx.ndim(srcs[0]) == 4 and all(cls)
    attrs = {"out": out, "dim": dim, "fast": fast, "cls": tuple(cls)}
    layer = Layer("cat", target_name(node), None, None, out, {"dim": dim, "nhwc_fast_path": fast})
    return _step(ctx, node, "torch_cat", attrs, [n.name for n in srcs], layer=layer)


# shape ops: run on logical codes (torch copies channels-last tensors into logical order)


def _logical(ctx, node, op, a=None, kw=None):
    names, args, kwargs = bind(ctx, node.args, node.kwargs)
    cl = ctx.cl.get(node.args[0].name, False)
    attrs = {"op": op, "args": args if a is None else a, "kwargs": kwargs if kw is None else kw}
    attrs["cl"] = cl
    return _step(ctx, node, "torch_shape", attrs, names, layer=Layer(op, target_name(node)))


def h_flatten(ctx, node, mod=None):
    if mod is not None:  # nn.Flatten(start_dim, end_dim) on its one input
        return _logical(ctx, node, "flatten", (Ref(0), mod.start_dim, mod.end_dim), {})
    return _logical(ctx, node, "flatten")


def h_reshape(ctx, node, mod=None):
    return _logical(ctx, node, "reshape")


def h_size(ctx, node, mod=None):
    """``x.size()`` / ``x.size(d)``: static Python ints from the stored value's shape."""
    names, a, kw = bind(ctx, node.args, node.kwargs)
    attrs = {"args": a, "kwargs": kw, "cl": ctx.cl.get(node.args[0].name, False)}
    layer = Layer("size", "size")
    return make_torch_step(node.name, "torch_size", attrs, tuple(names), None, layer)


def h_getitem(ctx, node, mod=None):
    names, a, _ = bind(ctx, node.args, node.kwargs)
    layer = Layer("getitem", "getitem")
    return make_torch_step(node.name, "torch_getitem", {"args": a}, tuple(names), None, layer)


def _pool(ctx, node, mod, op, fields):
    if mod is not None:
        o = {n: getattr(mod, n, d) for n, d in fields}
    else:
        _, a, kw = bind(ctx, node.args, node.kwargs)
        o = pick(a, kw, fields)
    src = node.args[0]
    cl = ctx.cl.get(src.name, False)
    if ctx.ndim(src) != 4:
        raise NotImplementedError(f"{op} of a {ctx.ndim(src)}-d tensor (only 4-d)")
    layout = "NHWC" if cl else "NCHW"
    scheme = None if op == "max_pool2d" else ctx.engine.pool
    kw2 = {k: v for k, v in o.items() if k != "return_indices"}
    if o.get("return_indices"):
        raise NotImplementedError(f"{op} with return_indices=True")
    if scheme is not None:
        kw2["scheme"] = scheme
    if op == "avg_pool2d" and layout == "NHWC":
        kw2["nhwc_block"] = ctx.engine.avg_pool_block  # ATen's vector width (CPU level)
    layer = Layer(op, target_name(node), scheme, None, None, dict(o))
    attrs = {"op": op, "options": kw2, "layout": layout, "cl": cl}
    attrs["kernel"] = _boundary(ctx)  # the max pool's native call
    return _step(ctx, node, "torch_pool", attrs, [src.name], layer=layer)


def h_max_pool(ctx, node, mod=None):
    fields = [("kernel_size", None), ("stride", None), ("padding", 0), ("dilation", 1),
              ("ceil_mode", False), ("return_indices", False)]  # fmt: skip
    return _pool(ctx, node, mod, "max_pool2d", fields)


def h_avg_pool(ctx, node, mod=None):
    fields = [("kernel_size", None), ("stride", None), ("padding", 0), ("ceil_mode", False),
              ("count_include_pad", True), ("divisor_override", None)]  # fmt: skip
    return _pool(ctx, node, mod, "avg_pool2d", fields)


def h_adaptive_avg_pool(ctx, node, mod=None):
    return _pool(ctx, node, mod, "adaptive_avg_pool2d", [("output_size", None)])


def _bn_array(v, c: int):
    """A BN statistic / affine tensor (or a one-channel scalar from ``get_attr``) as (C,)."""
    if v is None:
        return None
    a = v.detach().numpy() if isinstance(v, torch.Tensor) else np.asarray(v)
    return device_array(np.broadcast_to(np.asarray(a, np.float32).reshape(-1), (c,)), np.float32)


_BN_FIELDS = [("weight", None), ("bias", None), ("mean", None), ("var", None), ("eps", 1e-5),
              ("output_scale", None), ("output_zero_point", None)]  # fmt: skip


def h_batch_norm(ctx, node, mod=None):
    """``nnq.BatchNorm2d`` / ``nniq.BNReLU2d`` or ``quantized.batch_norm2d[_relu]``:
    :func:`~qjax.kernels.quantized_batch_norm` (same integers on every engine)."""
    src = node.args[0]
    if ctx.ndim(src) != 4:
        raise NotImplementedError(f"batch_norm of a {ctx.ndim(src)}-d tensor (only 4-d)")
    c = ctx.values[src.name].shape[1]
    if mod is not None:
        relu = isinstance(mod, nniq.BNReLU2d)
        ts = (mod.weight, mod.bias, mod.running_mean, mod.running_var)
        eps, sc, zp = float(mod.eps), float(mod.scale), int(mod.zero_point)
    else:
        relu = node.target in (_q.batch_norm2d_relu, _q.batch_norm2d_relu.default)
        names, a, kw = bind(ctx, node.args, node.kwargs)
        if names[1:]:
            raise NotImplementedError("batch_norm2d with computed parameters")
        o = pick(a, kw, _BN_FIELDS)
        ts = (o["weight"], o["bias"], o["mean"], o["var"])
        eps, sc, zp = float(o["eps"]), float(o["output_scale"]), int(o["output_zero_point"])
    out = act_qparams(sc, zp, ctx.dtype_of(src))
    cl = ctx.cl.get(src.name, False)
    layout = "NHWC" if cl else "NCHW"
    params = tuple(_bn_array(t, c) for t in ts)
    attrs = {"eps": eps, "out": out, "relu": relu, "layout": layout, "cl": cl}
    op = "batch_norm2d" + ("_relu" if relu else "")
    layer = Layer(op, target_name(node), None, None, out, {"eps": eps})
    return _step(ctx, node, "torch_batch_norm", attrs, [src.name], params=params, layer=layer)


def target_name(node) -> str:
    t = node.target
    if node.op == "call_module":
        return str(t)
    if node.op == "call_method":
        return f"Tensor.{t}"
    return getattr(t, "__qualname__", None) or getattr(t, "__name__", None) or str(t)


_q = torch.ops.quantized
HANDLERS: dict[str, dict[Any, Callable]] = {
    "module": {
        nnq.Quantize: h_quantize,
        nnq.DeQuantize: h_dequantize,
        nnq.Linear: h_linear,
        nniq.LinearReLU: h_linear,
        nnq.BatchNorm2d: h_batch_norm,
        nniq.BNReLU2d: h_batch_norm,
        nnq.Conv1d: h_conv,
        nnq.Conv2d: h_conv,
        nniq.ConvReLU1d: h_conv,
        nniq.ConvReLU2d: h_conv,
        nn.Identity: h_identity,
        nn.Dropout: h_identity,
        nnq.Dropout: h_identity,
        nn.ReLU: h_relu,
        nn.ReLU6: h_relu6,
        nnq.ReLU6: h_relu6,
        nn.Hardtanh: h_hardtanh,
        nnq.Hardswish: h_hardswish,
        nn.Flatten: h_flatten,
        nn.MaxPool2d: h_max_pool,
        nn.AvgPool2d: h_avg_pool,
        nn.AdaptiveAvgPool2d: h_adaptive_avg_pool,
    },
    "function": {
        torch.quantize_per_tensor: h_quantize,
        torch.dequantize: h_dequantize,
        _q.add: h_add,
        _q.add.default: h_add,
        _q.add_relu: h_add_relu,
        _q.add_relu.default: h_add_relu,
        _q.mul: h_mul,
        _q.mul.default: h_mul,
        _q.mul_relu: h_mul_relu,
        _q.mul_relu.default: h_mul_relu,
        _q.mul_scalar: h_mul_scalar,
        _q.batch_norm2d: h_batch_norm,
        _q.batch_norm2d.default: h_batch_norm,
        _q.batch_norm2d_relu: h_batch_norm,
        _q.batch_norm2d_relu.default: h_batch_norm,
        _q.cat: h_cat,
        _q.cat.default: h_cat,
        _q.relu6: h_relu6,
        _q.hardswish: h_hardswish,
        torch.cat: h_cat,
        torch.relu: h_relu,
        F.relu: h_relu,
        F.relu6: h_relu6,
        F.hardtanh: h_hardtanh,
        torch.flatten: h_flatten,
        torch.reshape: h_reshape,
        F.max_pool2d: h_max_pool,
        F.avg_pool2d: h_avg_pool,
        torch._C._nn.avg_pool2d: h_avg_pool,
        F.adaptive_avg_pool2d: h_adaptive_avg_pool,
        F.dropout: h_identity,
        operator.getitem: h_getitem,
    },
    "method": {
        "dequantize": h_dequantize,
        "relu": h_relu,
        "flatten": h_flatten,
        "view": h_reshape,
        "reshape": h_reshape,
        "contiguous": h_identity,
        "size": h_size,
    },
}
