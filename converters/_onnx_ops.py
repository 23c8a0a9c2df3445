"""Op table of the ONNX exporter (:mod:`qjax.converters.onnx`): one handler per qjax step
kind, writing QDQ nodes into a :class:`Builder` (nodes, initializers, and the
``{value name: ONNX tensor}`` environment). Steps of a traced Flax program that run a jax
primitive (``float`` steps, layout ops on codes) are written from their jaxprs by
:func:`jaxpr_step` (:mod:`qjax.converters._onnx_jax`)."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from qjax import QArray, QParams
from qjax.kernels import PreparedConv, PreparedLinear
from qjax.kernels._conv import _pads
from qjax.program import Step

from ._onnx_jax import leaves_of, translate

__all__ = ["ALIASES", "HANDLERS", "STATIC", "Builder", "jaxpr_step", "value_info"]

ALIASES = ("identity",)
STATIC = ("size", "getitem")
_I32 = np.iinfo(np.int32)


class Builder:
    """Nodes, initializers and the ``{value name: ONNX tensor}`` environment."""

    def __init__(
        self, trace: dict[str, QArray], layout: str = "NCHW", opset: int = 13, values=None
    ):
        self.trace = trace
        self.layout = layout  # "NCHW" (channels first) or "NHWC" (channels last)
        self.opset = opset
        self.values = values if values is not None else {}  # abstract value of each step
        self.jaxprs: dict = {}  # step name -> its jaxpr (jaxpr_step)
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.env: dict[str, str | list[str]] = {}  # qjax value -> ONNX tensor name(s)
        self.kind: dict[str, str] = {}  # qjax value -> "float" | "codes" | "static" | "multi"
        self.qp: dict[str, QParams] = {}  # codes values -> their qparams
        self.shape: dict[str, tuple[int, ...]] = {}
        self.dtype: dict[str, np.dtype] = {}  # non-float32 "float" values (bool, int)
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

    def narrow_range(self, qp: QParams) -> tuple[str | None, str | None]:
        """Clip bounds (code initializers) for qparams whose ``[qmin, qmax]`` is narrower
        than the 8-bit dtype's (``reduce_range``, ``quant_max=127``): ``QuantizeLinear``
        saturates to the dtype only, the qjax step clamps to the spec's range."""
        spec = qp.spec
        dt = np.int8 if spec.signed else np.uint8
        info = np.iinfo(dt)
        if (spec.qmin, spec.qmax) == (info.min, info.max):
            return None, None
        tag = f"{np.dtype(dt).name}_{spec.qmin}_{spec.qmax}"
        lo = self.const(f"clip/{tag}/min", np.asarray(spec.qmin, dt))
        hi = self.const(f"clip/{tag}/max", np.asarray(spec.qmax, dt))
        return lo, hi

    def dq(self, value: str, consumer: str, perm=None) -> str:
        """A float tensor for ``value``: a fresh ``DQ`` of codes (one per consumer, as the
        QDQ format wants), or the float tensor itself; ``perm``: transposed first (the
        codes, before the ``DQ``, so ``DQ -> op`` stays fusable)."""
        if self.kind.get(value) == "float":
            x = self.env[value]
            return x if perm is None else self.transpose(x, perm, f"{consumer}/in")
        if self.kind.get(value) != "codes":
            raise NotImplementedError(f"input {value!r} is not a tensor")
        codes = self.env[value]
        if perm is not None:
            codes = self.transpose(codes, perm, f"{consumer}/in_codes")
        s, z = self.qparams_consts(f"{value}/q", self.qp[value])
        out = self.fresh(f"{consumer}/dq/{value}")
        return self.node("DequantizeLinear", [codes, s, z], [out], out)[0]

    def transpose(self, x: str, perm, stem: str) -> str:
        out = self.fresh(f"{stem}/transpose")
        return self.node("Transpose", [x], [out], out, perm=[int(p) for p in perm])[0]

    def q(self, step: Step, x: str, qp: QParams | None = None, perm=None) -> None:
        """``Q`` of float ``x`` with the qparams the step produced (from the trace);
        ``perm``: the codes transposed after the ``Q`` (a channels-last program's
        channels-first conv or pool)."""
        if step.name not in self.trace:
            raise NotImplementedError("its result is not a traced quantized activation")
        qa = self.trace[step.name]
        qp = qa.qparams if qp is None else qp
        s, z = self.qparams_consts(f"{step.name}/q", qp)
        out = step.name if perm is None else f"{step.name}/q_channels_first"
        lo, hi = self.narrow_range(qp)
        q = f"{step.name}/q_wide" if lo is not None else out
        self.node("QuantizeLinear", [x, s, z], [q], f"{step.name}/QuantizeLinear")
        if lo is not None:  # a range narrower than the dtype's: clamp the codes
            self.node("Clip", [q, lo, hi], [out], f"{step.name}/Clip")
        if perm is not None:
            self.node("Transpose", [out], [step.name], f"{step.name}/Transpose", perm=list(perm))
        self.env[step.name] = step.name
        self.kind[step.name] = "codes"
        self.qp[step.name] = qp
        self.shape[step.name] = tuple(qa.shape)

    def float_out(self, step: Step, y: str, perm=None) -> None:
        """Float ``y`` as the step's value (a layer without an output quantizer)."""
        if step.export is not None:
            raise NotImplementedError("a float result stored in another layout (step.export)")
        if step.name not in self.values:
            raise NotImplementedError("its float result has no known shape")
        self.node(
            "Transpose" if perm is not None else "Identity", [y], [step.name],
            f"{step.name}/{'Transpose' if perm is not None else 'Identity'}",
            **({"perm": list(perm)} if perm is not None else {}),
        )  # fmt: skip
        self.env[step.name], self.kind[step.name] = step.name, "float"
        self.shape[step.name] = tuple(self.values[step.name].shape)

    def leaves(self, value: str) -> list:
        """ONNX tensor names (or, for qparams, numpy arrays) of ``value``'s pytree
        leaves, in jax's order: a float tensor, codes with their scale and zero point, or
        the results of a multi-output step."""
        kind = self.kind.get(value)
        if kind == "float":
            return [self.env[value]]
        if kind == "codes":
            qp = self.qp[value]
            return [self.env[value], np.asarray(qp.scale), np.asarray(qp.zero_point)]
        if kind == "multi":
            return list(self.env[value])
        raise NotImplementedError(f"input {value!r} is not a tensor")


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
    p = step.params  # (weights, bias), or (weights, bias, out qparams) in a Flax program
    if not (isinstance(p, tuple) and len(p) in (2, 3) and isinstance(p[0], cls)):
        raise NotImplementedError(f"params are not ({cls.__name__}, bias[, out qparams])")
    return p[0], (None if p[1] is None else np.asarray(p[1], np.float32))


def _out_qparams(b: Builder, step: Step) -> bool:
    """Whether the layer requantizes (codes out) or, without output qparams, returns the
    float ``f32(acc)·f32(s_x·s_w) + b`` of a Flax layer without an output quantizer."""
    return step.name in b.trace or step.layer.out is not None


def _linear(b: Builder, step: Step) -> None:
    pw, bias = _prepared(step, PreparedLinear)
    src = step.inputs[0]
    x = b.dq(src, step.name)
    w = np.asarray(pw.weight.values)  # (in, out)
    qp = pw.weight.qparams
    per_channel = qp.spec.granularity == "axis"
    codes_out = _out_qparams(b, step)
    if codes_out:
        bq = _bias(b, step, bias, b.qp[src].scale, qp.scale, per_channel)
    else:  # float output: the bias is added in float, as the layer does
        bq = None if bias is None else b.const(f"{step.name}/bias", bias)
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
    y = _act(b, step, y, step.layer.extra.get("activation"))
    b.q(step, y) if codes_out else b.float_out(step, y)


def _conv(b: Builder, step: Step) -> None:
    """``Conv`` in ONNX's channels-first layout; a channels-last program's codes are
    transposed before the ``DQ`` and after the ``Q`` (``Builder.layout``)."""
    pw, bias = _prepared(step, PreparedConv)
    ex = step.layer.extra
    src = step.inputs[0]
    w = np.asarray(pw.weight.values)  # (*kernel, in/groups, out)
    nsp = w.ndim - 2
    groups = int(ex.get("groups", 1))
    in_shape = tuple(b.shape[src])
    last = b.layout == "NHWC"
    c_at = -1 if last else 1
    if len(in_shape) != nsp + 2 or in_shape[c_at] != w.shape[-2] * groups:
        other = in_shape[1 if last else -1] if len(in_shape) == nsp + 2 else None
        hint = ""
        if other == w.shape[-2] * groups:
            want = "None (channels first)" if last else "'NHWC' (channels last)"
            looks = "first" if last else "last"
            hint = f"; the input looks channels-{looks}: set program.layout = {want}"
        raise ValueError(
            f"input {src!r} of shape {in_shape} does not have the conv's "
            f"{w.shape[-2] * groups} input channels on axis {c_at} of a program of layout "
            f"{b.layout}{hint}"
        )
    w = np.ascontiguousarray(np.transpose(w, (nsp + 1, nsp, *range(nsp))))  # -> (O, I, *k)
    to_first = [0, nsp + 1, *range(1, nsp + 1)] if last else None
    to_last = [0, *range(2, nsp + 2), 1] if last else None
    x = b.dq(src, step.name, perm=to_first)
    qp = pw.weight.qparams
    per_channel = qp.spec.granularity == "axis"
    wt = _weight(b, step, w, qp, 0)
    codes_out = _out_qparams(b, step)
    if codes_out:
        bq = _bias(b, step, bias, b.qp[src].scale, qp.scale, per_channel)
    else:
        bq = None if bias is None else b.const(f"{step.name}/bias", bias)
    stride = _ints(ex.get("stride", 1), nsp, "stride")
    dil = _ints(ex.get("dilation", 1), nsp, "dilation")
    if last:  # Flax: VALID / SAME / ints / (lo, hi) pairs, as the int8 conv reads them
        spatial = in_shape[1:-1]
        pairs = _pads(ex.get("padding", 0), nsp, w.shape[2:], stride, dil, spatial, step.name)
        if any(lo < 0 or hi < 0 for lo, hi in pairs):
            raise NotImplementedError(f"negative padding {pairs}")
        pad = [lo for lo, _ in pairs] + [hi for _, hi in pairs]
    else:
        pad = _ints(ex.get("padding", 0), nsp, "padding")
        pad = pad + pad
    y = b.node(
        "Conv", [x, wt] + ([bq] if bq else []), [f"{step.name}/conv"], f"{step.name}/Conv",
        kernel_shape=list(w.shape[2:]), strides=stride, pads=pad, dilations=dil, group=groups,
    )[0]  # fmt: skip
    y = _act(b, step, y, ex.get("activation"))
    b.q(step, y, perm=to_last) if codes_out else b.float_out(step, y, perm=to_last)


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
    """``Q`` of a float tensor; codes in other qparams (a traced Flax program's
    re-quantization) are dequantized first: ``DQ -> Q``."""
    src = step.inputs[0]
    if b.kind.get(src) not in ("float", "codes"):
        raise NotImplementedError(f"quantize of {src!r}, which is not a tensor")
    b.q(step, b.dq(src, step.name))


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


def jaxpr_step(b: Builder, step: Step) -> None:
    """A step that runs jax primitives (a traced Flax program's ``float`` step, or a
    layout op / max pool on codes), written from its jaxpr (``b.jaxprs``) by
    :func:`qjax.converters._onnx_jax.translate`: on float tensors or directly on the
    codes (which keep their qparams), in the program's own layout."""
    if step.name not in b.jaxprs:
        raise NotImplementedError("no jaxpr of the step was recorded")
    args = [leaf for v in step.inputs for leaf in b.leaves(v)]
    start = len(b.nodes)
    outs = translate(b, step.name, b.jaxprs[step.name], args)
    made = {o for n in b.nodes[start:] for o in n.output}
    value = b.values[step.name]
    codes = isinstance(value, QArray)
    leaves = leaves_of(value)
    if len(outs) != len(leaves):
        raise NotImplementedError(f"{len(outs)} jaxpr outputs for {len(leaves)} values")
    names, renamed = [], {}
    for i, (o, leaf) in enumerate(zip(outs, leaves, strict=True)):
        if codes and i > 0:
            break  # the qparams: unchanged by a layout op
        want = step.name if len(leaves) == 1 or codes else f"{step.name}:{i}"
        if isinstance(o, str) and o in made and o not in renamed:
            _rename(b.nodes[start:], o, want)  # the node of this step that made it
            renamed[o] = want
        else:  # an input passed through, a repeated output, or a constant: name it
            src = (
                renamed.get(o, o)
                if isinstance(o, str)
                else b.const(b.fresh(f"{step.name}/value"), o)
            )
            b.node("Identity", [src], [want], f"{want}/Identity")
        names.append(want)
        if not codes and np.dtype(leaf.dtype) != np.float32:
            b.dtype[want] = np.dtype(leaf.dtype)
        b.shape[want] = tuple(leaf.shape)
    if codes:
        src_codes = [v for v in step.inputs if b.kind.get(v) == "codes"]
        if not src_codes:
            raise NotImplementedError("codes out of a step without codes in")
        b.env[step.name], b.kind[step.name] = step.name, "codes"
        b.qp[step.name] = step.layer.out if step.layer.out is not None else b.qp[src_codes[0]]
    elif len(leaves) == 1:
        b.env[step.name], b.kind[step.name] = step.name, "float"
    else:
        b.env[step.name], b.kind[step.name] = names, "multi"
    b.shape[step.name] = tuple(leaves[0].shape)
    if not codes and len(leaves) == 1 and np.dtype(leaves[0].dtype) != np.float32:
        b.dtype[step.name] = np.dtype(leaves[0].dtype)


def _rename(nodes, old: str, new: str) -> None:
    for n in nodes:
        for seq in (n.input, n.output):
            for i, v in enumerate(seq):
                if v == old:
                    seq[i] = new


def value_info(b: Builder, name: str) -> onnx.ValueInfoProto:
    """Graph input/output declaration of a value: float32 (or a float step's own dtype),
    or the codes' int8/uint8."""
    if b.kind[name] == "float":
        dt = helper.np_dtype_to_tensor_dtype(b.dtype.get(name, np.dtype(np.float32)))
    else:
        dt = TensorProto.INT8 if b.qp[name].spec.signed else TensorProto.UINT8
    return helper.make_tensor_value_info(b.env[name], dt, list(b.shape[name]))
