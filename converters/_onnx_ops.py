"""Op table of the ONNX exporter (:mod:`qjax.converters.onnx`): one handler per qjax step
kind, writing QDQ nodes into a :class:`Builder` (nodes, initializers, and the
``{value name: ONNX tensor}`` environment)."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from qjax import QArray, QParams
from qjax.kernels import PreparedConv, PreparedLinear
from qjax.program import Step

__all__ = ["ALIASES", "HANDLERS", "STATIC", "Builder", "value_info"]

ALIASES = ("identity",)
STATIC = ("size", "getitem")
_I32 = np.iinfo(np.int32)


class Builder:
    """Nodes, initializers and the ``{value name: ONNX tensor}`` environment."""

    def __init__(self, trace: dict[str, QArray]):
        self.trace = trace
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.env: dict[str, str] = {}  # qjax value -> ONNX tensor name
        self.kind: dict[str, str] = {}  # qjax value -> "float" | "codes" | "static"
        self.qp: dict[str, QParams] = {}  # codes values -> their qparams
        self.shape: dict[str, tuple[int, ...]] = {}
        self._n = 0
        self._consts: set[str] = set()

    def const(self, name: str, array) -> str:
        """An initializer; a name seen before is reused (a value's qparams are shared by
        its Q and all its DQs)."""
        if name not in self._consts:
            self._consts.add(name)
            self.inits.append(numpy_helper.from_array(np.asarray(array), name))
        return name

    def node(self, op: str, inputs, outputs, name: str, **attrs) -> list[str]:
        self.nodes.append(helper.make_node(op, list(inputs), list(outputs), name=name, **attrs))
        return list(outputs)

    def fresh(self, stem: str) -> str:
        self._n += 1
        return f"{stem}#{self._n}"

    def qparams_consts(self, stem: str, qp: QParams) -> tuple[str, str]:
        spec = qp.spec
        if spec.bits != 8:
            raise NotImplementedError(f"{spec.bits}-bit activations (ONNX Q/DQ: 8-bit only)")
        zdt = np.int8 if spec.signed else np.uint8
        if spec.granularity != "tensor":
            raise NotImplementedError(f"per-{spec.granularity} activation qparams")
        s = self.const(f"{stem}/scale", _scalar(qp.scale, np.float32))
        z = self.const(f"{stem}/zero_point", _scalar(qp.zero_point, zdt))
        return s, z

    def dq(self, value: str, consumer: str) -> str:
        """A float tensor for ``value``: a fresh ``DQ`` of codes (one per consumer, as the
        QDQ format wants), or the float tensor itself."""
        if self.kind.get(value) == "float":
            return self.env[value]
        if self.kind.get(value) != "codes":
            raise NotImplementedError(f"input {value!r} is not a tensor")
        s, z = self.qparams_consts(f"{value}/q", self.qp[value])
        out = self.fresh(f"{consumer}/dq/{value}")
        return self.node("DequantizeLinear", [self.env[value], s, z], [out], out)[0]

    def q(self, step: Step, x: str, qp: QParams | None = None) -> None:
        """``Q`` of float ``x`` with the qparams the step produced (from the trace)."""
        if step.name not in self.trace:
            raise NotImplementedError("its result is not a traced quantized activation")
        qa = self.trace[step.name]
        qp = qa.qparams if qp is None else qp
        s, z = self.qparams_consts(f"{step.name}/q", qp)
        self.node("QuantizeLinear", [x, s, z], [step.name], f"{step.name}/QuantizeLinear")
        self.env[step.name] = step.name
        self.kind[step.name] = "codes"
        self.qp[step.name] = qp
        self.shape[step.name] = tuple(qa.shape)


def _act(b: Builder, step: Step, y: str, activation) -> str:
    if activation is None:
        return y
    if activation == "relu":
        return b.node("Relu", [y], [f"{step.name}/relu"], f"{step.name}/Relu")[0]
    if activation in ("relu6", "hardtanh"):
        lo, hi = (0.0, 6.0) if activation == "relu6" else _hardtanh_bounds(step)
        lo_c = b.const(f"{step.name}/min", np.float32(lo))
        hi_c = b.const(f"{step.name}/max", np.float32(hi))
        return b.node("Clip", [y, lo_c, hi_c], [f"{step.name}/clip"], f"{step.name}/Clip")[0]
    raise NotImplementedError(f"fused activation {activation!r}")


def _bias(b: Builder, step: Step, bias, s_x, w_scale, per_channel: bool) -> str | None:
    """int32 bias ``rint(f32(b) / f32(s_x·s_w))`` and its ``DQ`` (module docstring)."""
    if bias is None:
        return None
    s_b = (_scalar(s_x, np.float32) * np.asarray(w_scale, np.float32)).astype(np.float32)
    with np.errstate(divide="ignore", invalid="ignore"):
        r = np.rint(np.asarray(bias, np.float32) / s_b)
    b_q = np.clip(np.nan_to_num(r), _I32.min, _I32.max).astype(np.int32)
    n = b_q.shape[0]
    scale = s_b if per_channel else np.full((n,), s_b, np.float32)
    qb = b.const(f"{step.name}/bias_q", b_q)
    sc = b.const(f"{step.name}/bias_scale", scale)
    zp = b.const(f"{step.name}/bias_zero_point", np.zeros((n,), np.int32))
    out = f"{step.name}/bias"
    return b.node("DequantizeLinear", [qb, sc, zp], [out], out, axis=0)[0]


def _weight(b: Builder, step: Step, codes: np.ndarray, qp: QParams, axis: int) -> str:
    """int8 initializer ``codes`` and its ``DQ`` (per channel along ``axis``)."""
    w = b.const(f"{step.name}/weight_q", codes.astype(np.int8))
    if qp.spec.granularity == "axis":
        s = np.asarray(qp.scale, np.float32).reshape(-1)
        z = np.asarray(qp.zero_point).astype(np.int8).reshape(-1)
        attrs = {"axis": axis}
    elif qp.spec.granularity == "tensor":
        s, z, attrs = _scalar(qp.scale, np.float32), _scalar(qp.zero_point, np.int8), {}
    else:
        raise NotImplementedError(f"per-{qp.spec.granularity} weight qparams")
    s = b.const(f"{step.name}/weight_scale", s)
    z = b.const(f"{step.name}/weight_zero_point", z)
    out = f"{step.name}/weight"
    return b.node("DequantizeLinear", [w, s, z], [out], out, **attrs)[0]


def _scalar(v, dtype) -> np.ndarray:
    """A per-tensor scale or zero point as a 0-d array (ONNX Q/DQ and the QLinear ops
    want scalars; qparams may hold them as shape ``(1,)``)."""
    a = np.asarray(v)
    if a.size != 1:
        raise NotImplementedError(f"per-tensor qparams of shape {a.shape}")
    return a.reshape(()).astype(dtype)


def _prepared(step: Step, cls):
    p = step.params
    if not (isinstance(p, tuple) and len(p) == 2 and isinstance(p[0], cls)):
        raise NotImplementedError(f"params are not ({cls.__name__}, bias)")
    return p[0], (None if p[1] is None else np.asarray(p[1], np.float32))


def _linear(b: Builder, step: Step) -> None:
    pw, bias = _prepared(step, PreparedLinear)
    src = step.inputs[0]
    x = b.dq(src, step.name)
    w = np.asarray(pw.weight.values)  # (in, out)
    qp = pw.weight.qparams
    per_channel = qp.spec.granularity == "axis"
    bq = _bias(b, step, bias, b.qp[src].scale, qp.scale, per_channel)
    if len(b.shape[src]) == 2:
        wt = _weight(b, step, np.ascontiguousarray(w.T), qp, 0)  # (out, in), ONNX Gemm B
        y = b.node(
            "Gemm", [x, wt] + ([bq] if bq else []), [f"{step.name}/gemm"], f"{step.name}/Gemm",
            transB=1,
        )[0]  # fmt: skip
    else:
        wt = _weight(b, step, w, qp, 1)
        y = b.node("MatMul", [x, wt], [f"{step.name}/matmul"], f"{step.name}/MatMul")[0]
        if bq:
            y = b.node("Add", [y, bq], [f"{step.name}/add"], f"{step.name}/Add")[0]
    b.q(step, _act(b, step, y, step.layer.extra.get("activation")))


def _conv(b: Builder, step: Step) -> None:
    pw, bias = _prepared(step, PreparedConv)
    ex = step.layer.extra
    src = step.inputs[0]
    x = b.dq(src, step.name)
    w = np.asarray(pw.weight.values)  # (*kernel, in/groups, out)
    nsp = w.ndim - 2
    w = np.ascontiguousarray(np.transpose(w, (nsp + 1, nsp, *range(nsp))))  # -> (O, I, *k)
    qp = pw.weight.qparams
    per_channel = qp.spec.granularity == "axis"
    wt = _weight(b, step, w, qp, 0)
    bq = _bias(b, step, bias, b.qp[src].scale, qp.scale, per_channel)
    pad = _ints(ex.get("padding", 0), nsp, "padding")
    y = b.node(
        "Conv", [x, wt] + ([bq] if bq else []), [f"{step.name}/conv"], f"{step.name}/Conv",
        kernel_shape=list(w.shape[2:]), strides=_ints(ex.get("stride", 1), nsp, "stride"),
        pads=pad + pad, dilations=_ints(ex.get("dilation", 1), nsp, "dilation"),
        group=int(ex.get("groups", 1)),
    )[0]  # fmt: skip
    b.q(step, _act(b, step, y, ex.get("activation")))


def _ints(v, n: int, what: str) -> list[int]:
    if isinstance(v, str):
        raise NotImplementedError(f"{what}={v!r} (only integer {what})")
    if isinstance(v, (int, np.integer)):
        return [int(v)] * n
    v = [int(t) for t in v]
    return v * n if len(v) == 1 else v


def _binary(b: Builder, step: Step) -> None:
    op = step.layer.op
    xs = [b.dq(v, step.name) for v in step.inputs]
    onnx_op = "Mul" if op.startswith("mul") else "Add"
    y = b.node(onnx_op, xs, [f"{step.name}/{onnx_op.lower()}"], f"{step.name}/{onnx_op}")[0]
    b.q(step, _act(b, step, y, "relu" if op.endswith("_relu") else None))


def _clamp(b: Builder, step: Step) -> None:
    x = b.dq(step.inputs[0], step.name)
    op = step.layer.op
    if op == "relu":
        y = b.node("Relu", [x], [f"{step.name}/relu"], f"{step.name}/Relu")[0]
    else:
        # torch's relu6/hardtanh clamp codes at the codes of the bounds; a float clamp
        # then Q gives the same codes unless a bound's code is a near-tie of Q's rounding
        y = _act(b, step, x, op)
        if step.layer.extra.get("qnnpack_layout_bug"):
            y = _nhwc_buffer_as_nchw(b, step, y, b.shape[step.inputs[0]])
    b.q(step, y)


def _nhwc_buffer_as_nchw(b: Builder, step: Step, y: str, shape) -> str:
    """torch's QNNPACK clamp on a channels-last tensor returns its NHWC buffer read in
    NCHW order (the importer reproduces it; ``converters/_torch_ops.py``): the same
    reinterpretation as ``Transpose(0, 2, 3, 1)`` then ``Reshape`` to the NCHW sizes."""
    n, c, h, w = shape
    t = b.node("Transpose", [y], [f"{step.name}/nhwc"], f"{step.name}/Transpose", perm=[0, 2, 3, 1])
    shp = b.const(f"{step.name}/shape", np.asarray([n, c, h, w], np.int64))
    return b.node("Reshape", [t[0], shp], [f"{step.name}/as_nchw"], f"{step.name}/Reshape")[0]


def _hardtanh_bounds(step: Step) -> tuple[float, float]:
    ex = step.layer.extra
    if ex.get("bounds") is not None:
        return float(ex["bounds"][0]), float(ex["bounds"][1])
    if "min_val" in ex and "max_val" in ex:
        return float(ex["min_val"]), float(ex["max_val"])
    raise NotImplementedError(
        "hardtanh bounds are not in Layer.extra ('bounds', or 'min_val' and 'max_val')"
    )


def _pool(b: Builder, step: Step) -> None:
    op, ex = step.layer.op, step.layer.extra
    src = step.inputs[0]
    x = b.dq(src, step.name)
    if op == "adaptive_avg_pool2d":
        out_hw = _ints(ex.get("output_size"), 2, "output_size")
        in_hw = list(b.shape[src][2:])
        if out_hw == [1, 1]:
            y = b.node("GlobalAveragePool", [x], [f"{step.name}/gap"], f"{step.name}/GAP")[0]
            return b.q(step, y)
        if any(i % o for i, o in zip(in_hw, out_hw, strict=True)):
            raise NotImplementedError(
                f"adaptive_avg_pool2d from {in_hw} to {out_hw} (sizes must divide)"
            )
        k = [i // o for i, o in zip(in_hw, out_hw, strict=True)]
        y = b.node(
            "AveragePool", [x], [f"{step.name}/pool"], f"{step.name}/AveragePool",
            kernel_shape=k, strides=k,
        )[0]  # fmt: skip
        return b.q(step, y)
    k = _ints(ex["kernel_size"], 2, "kernel_size")
    stride = ex.get("stride")
    s = k if stride is None or stride == [] or stride == () else _ints(stride, 2, "stride")
    p = _ints(ex.get("padding", 0), 2, "padding")
    attrs = dict(kernel_shape=k, strides=s, pads=p + p, ceil_mode=int(bool(ex.get("ceil_mode"))))
    if op == "max_pool2d":
        attrs["dilations"] = _ints(ex.get("dilation", 1), 2, "dilation")
        y = b.node("MaxPool", [x], [f"{step.name}/pool"], f"{step.name}/MaxPool", **attrs)[0]
    else:
        if ex.get("divisor_override") is not None:
            raise NotImplementedError("avg_pool2d with divisor_override (no ONNX equivalent)")
        attrs["count_include_pad"] = int(bool(ex.get("count_include_pad", True)))
        y = b.node("AveragePool", [x], [f"{step.name}/pool"], f"{step.name}/AveragePool", **attrs)
        y = y[0]
    b.q(step, y)


def _cat(b: Builder, step: Step) -> None:
    xs = [b.dq(v, step.name) for v in step.inputs]
    axis = int(step.layer.extra.get("dim", 1))
    y = b.node("Concat", xs, [f"{step.name}/concat"], f"{step.name}/Concat", axis=axis)[0]
    b.q(step, y)


def _reshape(b: Builder, step: Step) -> None:
    src = step.inputs[0]
    x = b.dq(src, step.name)
    if step.name not in b.trace:
        raise NotImplementedError("its result is not a traced quantized activation")
    shp, in_shp = tuple(b.trace[step.name].shape), b.shape[src]
    if len(shp) == 2 and shp[0] == in_shp[0] and step.layer.op == "flatten":
        y = b.node("Flatten", [x], [f"{step.name}/flatten"], f"{step.name}/Flatten", axis=1)[0]
    else:
        c = b.const(f"{step.name}/shape", np.asarray(shp, np.int64))
        y = b.node("Reshape", [x, c], [f"{step.name}/reshape"], f"{step.name}/Reshape")[0]
    b.q(step, y)


def _quantize(b: Builder, step: Step) -> None:
    src = step.inputs[0]
    if b.kind.get(src) != "float":
        raise NotImplementedError(f"quantize of {src!r}, which is not a float tensor")
    b.q(step, b.env[src])


def _dequantize(b: Builder, step: Step) -> None:
    src = step.inputs[0]
    if b.kind.get(src) != "codes":
        raise NotImplementedError(f"dequantize of {src!r}, which is not quantized")
    s, z = b.qparams_consts(f"{src}/q", b.qp[src])
    b.node("DequantizeLinear", [b.env[src], s, z], [step.name], f"{step.name}/DequantizeLinear")
    b.env[step.name], b.kind[step.name] = step.name, "float"
    b.shape[step.name] = b.shape[src]


HANDLERS = {
    "quantize": _quantize,
    "dequantize": _dequantize,
    "linear": _linear,
    "conv1d": _conv,
    "conv2d": _conv,
    "add": _binary,
    "add_relu": _binary,
    "mul": _binary,
    "mul_relu": _binary,
    "relu": _clamp,
    "relu6": _clamp,
    "hardtanh": _clamp,
    "max_pool2d": _pool,
    "avg_pool2d": _pool,
    "adaptive_avg_pool2d": _pool,
    "cat": _cat,
    "flatten": _reshape,
    "reshape": _reshape,
}


def value_info(b: Builder, name: str) -> onnx.ValueInfoProto:
    """Graph input/output declaration of a value: float32, or the codes' int8/uint8."""
    if b.kind[name] == "float":
        dt = TensorProto.FLOAT
    else:
        dt = TensorProto.INT8 if b.qp[name].spec.signed else TensorProto.UINT8
    return helper.make_tensor_value_info(b.env[name], dt, list(b.shape[name]))
