"""Reading a torchao pt2e graph: q/dq nodes, their qparams, constants, arguments.

A ``convert_pt2e`` program is an ATen FX graph in which every quantized tensor appears
as ``quantize_per_tensor -> (int8/uint8 codes) -> dequantize_per_tensor`` with its
qparams as literal arguments (``scale`` a Python float, ``zero_point``, ``quant_min``,
``quant_max`` ints, ``dtype``), and every weight as an int8 buffer (a ``get_attr``)
followed by ``dequantize_per_channel`` (scales and zero points as buffers, an ``axis``)
or ``dequantize_per_tensor``. This module turns those arguments into
:class:`~qjax.QParams` and resolves ``get_attr`` buffers to numpy arrays. torch is
imported lazily: only a caller that already holds a torch graph gets here.
"""

from __future__ import annotations

import numpy as np

from qjax import QParams, QuantSpec

Q_TENSOR = (
    "quantized_decomposed.quantize_per_tensor.default",
    "quantized_decomposed.quantize_per_tensor.tensor",
    "quantized_decomposed.quantize_per_tensor.tensor2",
)
DQ_TENSOR = (
    "quantized_decomposed.dequantize_per_tensor.default",
    "quantized_decomposed.dequantize_per_tensor.tensor",
    "quantized_decomposed.dequantize_per_tensor.tensor2",
)
Q_CHANNEL = ("quantized_decomposed.quantize_per_channel.default",)
DQ_CHANNEL = ("quantized_decomposed.dequantize_per_channel.default",)


def target_name(node) -> str:
    """``"aten.conv2d.default"``-style name of a node's target (``operator.getitem`` too)."""
    t = node.target
    if isinstance(t, str):
        return t
    if hasattr(t, "_schema"):  # an OpOverload: str() is "aten.conv2d.default"
        return str(t)
    mod = getattr(t, "__module__", "") or ""
    return f"{mod}.{getattr(t, '__name__', repr(t))}"


def module_path(node) -> str | None:
    """The torch module a node came from (``nn_module_stack``'s innermost path), if known."""
    stack = node.meta.get("nn_module_stack") if hasattr(node, "meta") else None
    if not stack:
        return None
    path = list(stack.values())[-1][0]
    return str(path) if path else None


def get_attr(gm, target: str) -> np.ndarray:
    """The buffer/parameter/constant a ``get_attr`` node names, as a numpy array."""
    obj = gm
    for part in target.split("."):
        if not hasattr(obj, part):
            raise ValueError(f"pt2e import: get_attr target {target!r} is not in the module")
        obj = getattr(obj, part)
    if not hasattr(obj, "detach"):
        raise TypeError(f"pt2e import: get_attr {target!r} is a {type(obj).__name__}, not a tensor")
    t = obj.detach().cpu()
    if t.is_quantized:
        raise TypeError(f"pt2e import: get_attr {target!r} is a quantized torch tensor")
    return t.numpy().copy()


def _spec(qmin: int, qmax: int, dtype, what: str, axis=None) -> QuantSpec:
    name = str(dtype).replace("torch.", "")
    table = {"uint8": (8, False), "int8": (8, True), "uint16": (16, False), "int16": (16, True)}
    if name not in table:
        raise TypeError(f"pt2e import: {what} uses dtype {name}; qjax imports int8/uint8/16-bit")
    bits, signed = table[name]
    full = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)
    if (int(qmin), int(qmax)) == full:
        return QuantSpec(bits=bits, signed=signed, axis=axis)
    return QuantSpec(bits=bits, signed=signed, quant_min=int(qmin), quant_max=int(qmax), axis=axis)


def _scalar(v, gm, what: str):
    """A literal, or a one-element tensor behind a ``get_attr`` node."""
    if hasattr(v, "op"):
        if v.op != "get_attr":
            raise ValueError(
                f"pt2e import: {what} is computed at run time by node {v.name!r}; qjax needs "
                "constant qparams"
            )
        a = get_attr(gm, v.target)
        if a.size != 1:
            raise ValueError(f"pt2e import: {what} has {a.size} elements, expected 1")
        return a.reshape(()).item()
    return v


def per_tensor_qparams(node, gm) -> QParams:
    """QParams of a ``quantize_per_tensor`` / ``dequantize_per_tensor`` node.

    The scale must be a float32 number: torch computes ``x·f32(1/s)`` from the float64
    literal and dequantizes with ``f32(s)``; both equal qjax's float32 formulas exactly
    when ``s`` is float32-representable, which is what torchao's observers produce.
    """
    args = list(node.args) + [None] * 6
    what = f"node {node.name!r} ({target_name(node)})"
    s = float(_scalar(args[1], gm, f"{what} scale"))
    z = int(_scalar(args[2], gm, f"{what} zero_point"))
    qmin = int(_scalar(args[3], gm, f"{what} quant_min"))
    qmax = int(_scalar(args[4], gm, f"{what} quant_max"))
    dtype = args[5] if args[5] is not None else node.kwargs.get("dtype")
    if float(np.float32(s)) != s:
        raise ValueError(
            f"pt2e import: {what} has scale {s!r}, which is not a float32 number; torch's "
            "quantize and dequantize then use different scales"
        )
    if not (np.isfinite(s) and s > 0):
        raise ValueError(f"pt2e import: {what} has scale {s!r}; must be finite and > 0")
    spec = _spec(qmin, qmax, dtype, what)
    return QParams(np.float32(s), np.int32(z), spec)


def per_channel_qparams(node, gm, ndim: int) -> QParams:
    """QParams of a ``dequantize_per_channel`` node (scales/zero points are buffers)."""
    what = f"node {node.name!r} ({target_name(node)})"
    _, s_node, z_node, axis, qmin, qmax, dtype = list(node.args)[:7]
    for v, name in ((s_node, "scales"), (z_node, "zero points")):
        if not (hasattr(v, "op") and v.op == "get_attr"):
            raise ValueError(f"pt2e import: {what} {name} must be constant buffers")
    s = get_attr(gm, s_node.target)
    z = get_attr(gm, z_node.target) if z_node is not None else np.zeros_like(s)
    if s.dtype == np.float64 and not np.array_equal(s.astype(np.float32).astype(np.float64), s):
        raise ValueError(f"pt2e import: {what} scales are not float32 numbers")
    spec = _spec(qmin, qmax, dtype, what, axis=int(axis) % ndim)
    return QParams(s.astype(np.float32), z.astype(np.int32), spec)


def same_qparams(a: QParams, b: QParams) -> bool:
    """Equal per-tensor qparams (scale, zero point and spec), compared as numbers."""
    return (
        a.spec == b.spec
        and np.array_equal(np.asarray(a.scale), np.asarray(b.scale))
        and np.array_equal(np.asarray(a.zero_point), np.asarray(b.zero_point))
    )


def shape_of(node) -> tuple[int, ...] | None:
    """Static shape recorded by ``torch.export`` (``meta['val']``), or ``None``.

    The q/dq nodes ``convert_pt2e`` inserts carry no ``val``; their shape is their
    input's.
    """
    v = node.meta.get("val") if hasattr(node, "meta") else None
    shape = getattr(v, "shape", None)
    if shape is None:
        if target_name(node) in Q_TENSOR + DQ_TENSOR + Q_CHANNEL + DQ_CHANNEL:
            return shape_of(node.args[0])
        return None
    try:
        return tuple(int(d) for d in shape)
    except TypeError:  # symbolic sizes
        return None


def graph_module(model):
    """The ATen ``GraphModule`` behind what a pt2e user holds.

    Accepts the ``convert_pt2e`` result (a ``torch.fx.GraphModule``), a
    ``torch.export.ExportedProgram`` of it (its ``.module()`` is taken), or the
    unlifted module of one.
    """
    import torch

    if isinstance(model, torch.export.ExportedProgram):
        model = model.module()
    if not isinstance(model, torch.fx.GraphModule):
        raise TypeError(
            "import_pt2e expects the convert_pt2e result (a torch.fx.GraphModule) or a "
            f"torch.export.ExportedProgram, got {type(model).__name__}"
        )
    return model


def is_pt2e(model) -> bool:
    """Whether ``model`` is a pt2e program: an ExportedProgram, or a GraphModule with
    ``quantized_decomposed`` quantize nodes (an eager/FX converted model has none)."""
    import torch

    if isinstance(model, torch.export.ExportedProgram):
        return True
    if not isinstance(model, torch.fx.GraphModule):
        return False
    return any(target_name(n) in Q_TENSOR for n in model.graph.nodes)


def pt2e_trace(model, *inputs) -> dict[str, np.ndarray]:
    """torch's integer codes of every ``quantize_per_tensor`` node of a pt2e program,
    ``{node name: int array}`` (the names :meth:`Program.trace` of an
    :func:`~qjax.converters.pt2e.import_pt2e` program uses), from one run of the graph."""
    import torch

    gm = graph_module(model)
    xs = tuple(torch.as_tensor(np.asarray(x)) if not hasattr(x, "detach") else x for x in inputs)
    out: dict[str, np.ndarray] = {}

    class Recorder(torch.fx.Interpreter):
        def run_node(self, n):
            v = super().run_node(n)
            if target_name(n) in Q_TENSOR and isinstance(v, torch.Tensor):
                out[n.name] = v.detach().cpu().numpy().copy()
            return v

    with torch.no_grad():
        Recorder(gm).run(*xs)
    return out
