"""Export a qjax int8 :class:`~qjax.converters._program.Program` as an ONNX model in QDQ form.

``export_onnx(program, example_inputs)`` writes every step as float ONNX ops between
``QuantizeLinear`` / ``DequantizeLinear`` pairs (the "QDQ" format that onnxruntime and
other runtimes turn back into integer kernels), opset 13 or later:

=====================================  ==================================================
qjax step (``Layer.op``)               ONNX nodes (``DQ`` = DequantizeLinear, ``Q`` =
                                       QuantizeLinear)
=====================================  ==================================================
``quantize`` / ``dequantize``          ``Q`` / ``DQ`` (per-tensor, 8-bit)
``linear`` (2-d input)                 ``DQ(x)``, ``DQ(w int8, axis 0)``, ``DQ(b int32)``
                                       -> ``Gemm(transB=1)`` [-> ``Relu``] -> ``Q``
``linear`` (other ranks)               the same with ``MatMul`` (weight ``(in, out)``,
                                       axis 1) and ``Add``
``conv1d`` / ``conv2d``                ``DQ(x)``, ``DQ(w int8, axis 0)``, ``DQ(b int32)``
                                       -> ``Conv`` [-> ``Relu``] -> ``Q``
``add`` / ``add_relu`` / ``mul``       ``DQ``, ``DQ`` -> ``Add`` / ``Mul`` [-> ``Relu``]
                                       -> ``Q``
``relu`` / ``relu6`` / ``hardtanh``    ``DQ`` -> ``Relu`` / ``Clip`` -> ``Q`` (torch's
                                       QNNPACK layout bug, where the program reproduces
                                       it: ``Transpose`` + ``Reshape`` before ``Q``)
``max_pool2d`` / ``avg_pool2d``        ``DQ`` -> ``MaxPool`` / ``AveragePool`` -> ``Q``
``adaptive_avg_pool2d``                ``DQ`` -> ``GlobalAveragePool`` (output 1x1) or
                                       ``AveragePool`` (sizes divide) -> ``Q``
``cat``                                ``DQ`` each -> ``Concat`` -> ``Q``
``flatten`` / ``reshape``              ``DQ`` -> ``Flatten`` / ``Reshape`` -> ``Q``
``identity``, ``size``, ``getitem``    no node (an alias; static shapes)
=====================================  ==================================================

Everything is in the logical (NCHW) layout, whatever order the program stores values in;
shapes are the static shapes of ``example_inputs``. Every activation's scale and zero
point comes from ``program.trace(*example_inputs)`` (so the Q after a step carries
exactly the qparams the qjax step produced), the weights from the step's prepared
``params``. A step with any other op raises ``NotImplementedError`` naming the step, its
op and its source target.

**Bias.** The bias is stored as int32 ``b_q = clamp(rint(f32(b) / f32(s_x·s_w)))`` with a
``DQ`` of scale ``f32(s_x·s_w)`` (per channel with the weight) and zero point 0 — the
rule of onnxruntime's own quantization tool. A float bias would be closer to torch's
FBGEMM (rule 11: float bias) but onnxruntime fuses ``DQ -> Conv/Gemm -> Q`` into an
integer kernel only when the bias is an int32 ``DQ`` (its QDQ selectors check the
dtype), so a float bias would leave the layer in float.

**What onnxruntime computes** (1.32, CPU EP; sources ``mlas/lib/quantize.cpp``,
``requantize`` in MLAS, ``qlinearconv.cc``; behaviour measured in
``tests/test_converters_onnx.py``):

* ``QuantizeLinear``: ``clamp(rint(x / s) + zp)`` — an IEEE float32 *division*, round
  half to even, zero point added *after* rounding (torch's ``quantize_per_tensor``,
  rule 1, is ``rint(fma(x, 1/s, zp))``: the two differ only at near-ties).
* graph optimizations ON: ``DQ -> Conv -> Q`` becomes ``QLinearConv`` and ``DQ -> Gemm
  -> Q`` ``QGemm``: exact int32 ``acc = Σ (x - zp_x)(w - zp_w)``, then
  ``clamp(rint(f32(f32(acc + b_q)·M)) + zp_y)`` with the float32 multiplier
  ``M = f32(f32(s_x·s_w) / s_y)`` (per output channel), round half to even, zero point
  after rounding. That is QNNPACK's requantization (rule 12) except that QNNPACK's
  multiplier is ``f32(f32(s_x·s_w)·f32(1/s_y))`` (the two differ by an ulp for some
  scales) and its bias uses the reciprocal ``f32(b·f32(1/f32(s_x·s_w)))``.
* graph optimizations OFF: the float reference of the same graph — dequantize
  ``f32(q - zp)·s``, float32 Conv/Gemm (summation order of MLAS's SGEMM), float bias
  ``b_q·f32(s_x·s_w)``, then ``QuantizeLinear``; codes can differ by one LSB from any
  integer scheme where the float result lies within rounding error of a half.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from qjax import QArray, QParams
from qjax.kernels import PreparedConv, PreparedLinear

from ._program import Layer, Program, Step

__all__ = ["export_onnx"]

_ALIASES = ("identity",)
_STATIC = ("size", "getitem")
_I32 = np.iinfo(np.int32)


class _Builder:
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
        s = self.const(f"{stem}/scale", np.asarray(qp.scale, np.float32))
        z = self.const(f"{stem}/zero_point", np.asarray(qp.zero_point).astype(zdt))
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


def _act(b: _Builder, step: Step, y: str, activation) -> str:
    if activation is None:
        return y
    if activation == "relu":
        return b.node("Relu", [y], [f"{step.name}/relu"], f"{step.name}/Relu")[0]
    raise NotImplementedError(f"fused activation {activation!r}")


def _bias(b: _Builder, step: Step, bias, s_x, w_scale, per_channel: bool) -> str | None:
    """int32 bias ``rint(f32(b) / f32(s_x·s_w))`` and its ``DQ`` (module docstring)."""
    if bias is None:
        return None
    s_b = (np.float32(s_x) * np.asarray(w_scale, np.float32)).astype(np.float32)
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


def _weight(b: _Builder, step: Step, codes: np.ndarray, qp: QParams, axis: int) -> str:
    """int8 initializer ``codes`` and its ``DQ`` (per channel along ``axis``)."""
    w = b.const(f"{step.name}/weight_q", codes.astype(np.int8))
    s = b.const(f"{step.name}/weight_scale", np.asarray(qp.scale, np.float32))
    z = b.const(f"{step.name}/weight_zero_point", np.asarray(qp.zero_point).astype(np.int8))
    attrs = {"axis": axis} if qp.spec.granularity == "axis" else {}
    out = f"{step.name}/weight"
    return b.node("DequantizeLinear", [w, s, z], [out], out, **attrs)[0]


def _prepared(step: Step, cls):
    p = step.params
    if not (isinstance(p, tuple) and len(p) == 2 and isinstance(p[0], cls)):
        raise NotImplementedError(f"params are not ({cls.__name__}, bias)")
    return p[0], (None if p[1] is None else np.asarray(p[1], np.float32))


def _linear(b: _Builder, step: Step) -> None:
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


def _conv(b: _Builder, step: Step) -> None:
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


def _binary(b: _Builder, step: Step) -> None:
    op = step.layer.op
    xs = [b.dq(v, step.name) for v in step.inputs]
    onnx_op = "Mul" if op.startswith("mul") else "Add"
    y = b.node(onnx_op, xs, [f"{step.name}/{onnx_op.lower()}"], f"{step.name}/{onnx_op}")[0]
    b.q(step, _act(b, step, y, "relu" if op.endswith("_relu") else None))


def _clamp(b: _Builder, step: Step) -> None:
    x = b.dq(step.inputs[0], step.name)
    op = step.layer.op
    if op == "relu":
        y = b.node("Relu", [x], [f"{step.name}/relu"], f"{step.name}/Relu")[0]
    else:
        # torch's relu6/hardtanh on codes clamp at the codes of the bounds; the float
        # clamp then Q gives those codes because Q rounds the bounds the same way.
        lo, hi = (0.0, 6.0) if op == "relu6" else _hardtanh_bounds(step)
        lo_c = b.const(f"{step.name}/min", np.float32(lo))
        hi_c = b.const(f"{step.name}/max", np.float32(hi))
        y = b.node("Clip", [x, lo_c, hi_c], [f"{step.name}/clip"], f"{step.name}/Clip")[0]
        if step.layer.extra.get("qnnpack_layout_bug"):
            y = _nhwc_buffer_as_nchw(b, step, y, b.shape[step.inputs[0]])
    b.q(step, y)


def _nhwc_buffer_as_nchw(b: _Builder, step: Step, y: str, shape) -> str:
    """torch's QNNPACK clamp on a channels-last tensor returns its NHWC buffer read in
    NCHW order (the importer reproduces it; ``converters/_torch_ops.py``): the same
    reinterpretation as ``Transpose(0, 2, 3, 1)`` then ``Reshape`` to the NCHW sizes."""
    n, c, h, w = shape
    t = b.node("Transpose", [y], [f"{step.name}/nhwc"], f"{step.name}/Transpose", perm=[0, 2, 3, 1])
    shp = b.const(f"{step.name}/shape", np.asarray([n, c, h, w], np.int64))
    return b.node("Reshape", [t[0], shp], [f"{step.name}/as_nchw"], f"{step.name}/Reshape")[0]


def _hardtanh_bounds(step: Step) -> tuple[float, float]:
    ex = step.layer.extra
    if "min_val" not in ex or "max_val" not in ex:
        raise NotImplementedError(
            "hardtanh bounds are not in Layer.extra (need 'min_val' and 'max_val')"
        )
    return float(ex["min_val"]), float(ex["max_val"])


def _pool(b: _Builder, step: Step) -> None:
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


def _cat(b: _Builder, step: Step) -> None:
    xs = [b.dq(v, step.name) for v in step.inputs]
    axis = int(step.layer.extra.get("dim", 1))
    y = b.node("Concat", xs, [f"{step.name}/concat"], f"{step.name}/Concat", axis=axis)[0]
    b.q(step, y)


def _reshape(b: _Builder, step: Step) -> None:
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


def _quantize(b: _Builder, step: Step) -> None:
    src = step.inputs[0]
    if b.kind.get(src) != "float":
        raise NotImplementedError(f"quantize of {src!r}, which is not a float tensor")
    b.q(step, b.env[src])


def _dequantize(b: _Builder, step: Step) -> None:
    src = step.inputs[0]
    if b.kind.get(src) != "codes":
        raise NotImplementedError(f"dequantize of {src!r}, which is not quantized")
    s, z = b.qparams_consts(f"{src}/q", b.qp[src])
    b.node("DequantizeLinear", [b.env[src], s, z], [step.name], f"{step.name}/DequantizeLinear")
    b.env[step.name], b.kind[step.name] = step.name, "float"
    b.shape[step.name] = b.shape[src]


_HANDLERS = {
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


def _value_info(b: _Builder, name: str) -> onnx.ValueInfoProto:
    if b.kind[name] == "float":
        dt = TensorProto.FLOAT
    else:
        dt = TensorProto.INT8 if b.qp[name].spec.signed else TensorProto.UINT8
    return helper.make_tensor_value_info(b.env[name], dt, list(b.shape[name]))


def export_onnx(
    program: Program,
    example_inputs: Sequence,
    path: str | None = None,
    *,
    opset: int = 13,
    intermediates: bool = False,
) -> onnx.ModelProto:
    """Write an int8 qjax program as an ONNX QDQ model (float ops between Q/DQ pairs).

    The table of ops, the bias rule ``b_q = rint(f32(b) / f32(s_x·s_w))`` (int32) and what
    onnxruntime computes from the model (``rint(f32(f32(acc + b_q)·f32(f32(s_x·s_w)/s_y)))
    + zp`` with graph optimizations on) are in the module docstring. Inputs are float32
    with the static shapes of ``example_inputs``; outputs are what the program returns
    (float32 after a ``dequantize`` step, uint8/int8 codes otherwise).

    Args:
      program: a :class:`~qjax.converters._program.Program` (e.g. from
        ``qjax.converters.torch.import_model``).
      example_inputs: one array per program input (a single array is taken as one
        input); run once through ``program.trace`` for the activations' qparams and shapes.
      path: if given, the model is also saved there.
      opset: ONNX opset, 13 or later (per-axis ``DequantizeLinear`` needs 13).
      intermediates: also make every quantized activation (codes, NCHW) a graph output
        named after its step (aliases such as ``identity`` steps are not repeated).

    Returns:
      the checked ``onnx.ModelProto``.

    >>> import jax.numpy as jnp, onnxruntime as ort
    >>> from qjax import QParams, QuantSpec
    >>> from qjax.kernels import quantize_input, relu, dequantize_output
    >>> qp = QParams(0.5, 128, QuantSpec(signed=False))
    >>> p = Program(
    ...     [Step("q", lambda _, x: quantize_input(x, qp), ("x",), layer=Layer("quantize", "q")),
    ...      Step("relu", lambda _, q: relu(q), ("q",), layer=Layer("relu", "relu")),
    ...      Step("out", lambda _, q: dequantize_output(q), ("relu",), traced=False,
    ...           layer=Layer("dequantize", "dq"))],
    ...     inputs=("x",), output="out")
    >>> x = np.array([-1.0, 0.26, 1.0], np.float32)
    >>> model = export_onnx(p, (x,))
    >>> [n.op_type for n in model.graph.node]
    ['QuantizeLinear', 'DequantizeLinear', 'Relu', 'QuantizeLinear', 'DequantizeLinear']
    >>> sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    >>> sess.run(None, {"x": x})[0], np.asarray(p(x))
    (array([0. , 0.5, 1. ], dtype=float32), array([0. , 0.5, 1. ], dtype=float32))
    """
    if not isinstance(program, Program):
        raise TypeError(f"export_onnx: expected a Program, got {type(program).__name__}")
    if not isinstance(opset, int) or opset < 13:
        raise ValueError(f"export_onnx: opset must be an int >= 13, got {opset!r}")
    if not isinstance(example_inputs, (tuple, list)):
        example_inputs = (example_inputs,)
    if len(example_inputs) != len(program.inputs):
        raise ValueError(
            f"export_onnx: the program takes {len(program.inputs)} input(s) {program.inputs}, "
            f"got {len(example_inputs)} example input(s)"
        )
    b = _Builder(program.trace(*example_inputs))
    graph_inputs = []
    for name, x in zip(program.inputs, example_inputs, strict=True):
        shp = tuple(int(d) for d in np.shape(x.detach() if hasattr(x, "detach") else x))
        b.env[name], b.kind[name], b.shape[name] = name, "float", shp
        graph_inputs.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, list(shp)))
    outputs: list[str] = []
    for step in program.steps:
        op, target = _describe(step.layer)
        try:
            if op == "output":
                outputs = list(step.inputs)
            elif op in _ALIASES:
                src = step.inputs[0]
                for d in (b.env, b.kind, b.qp, b.shape):
                    if src in d:
                        d[step.name] = d[src]
            elif op in _STATIC:
                b.kind[step.name] = "static"
            elif op in _HANDLERS:
                _HANDLERS[op](b, step)
            else:
                raise NotImplementedError("no ONNX export for this op")
        except (NotImplementedError, ValueError, TypeError, KeyError) as e:
            msg = e.args[0] if isinstance(e, KeyError) and e.args else e
            raise NotImplementedError(
                f"export_onnx: step {step.name!r} (op={op!r}, target={target}): {msg}"
            ) from e
    if not outputs:
        outputs = [n for n in _leaves(program.output)]
    for name in outputs:
        if b.kind.get(name) not in ("float", "codes"):
            raise NotImplementedError(f"export_onnx: program output {name!r} is not a tensor")
    out_names = [b.env[n] for n in outputs]
    if len(set(out_names)) != len(out_names):
        raise NotImplementedError(f"export_onnx: outputs {outputs} repeat one tensor")
    graph_outputs = [_value_info(b, n) for n in outputs]
    if intermediates:
        seen = set(out_names)
        for s in program.steps:
            if b.kind.get(s.name) == "codes" and b.env[s.name] == s.name and s.name not in seen:
                graph_outputs.append(_value_info(b, s.name))
                seen.add(s.name)
    graph = helper.make_graph(b.nodes, "qjax_program", graph_inputs, graph_outputs, b.inits)
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", opset)], producer_name="qjax"
    )
    model.ir_version = min(model.ir_version, 10)  # readable by older onnxruntime releases
    onnx.checker.check_model(model)
    if path is not None:
        onnx.save(model, path)
    return model


def _describe(layer: Layer | None) -> tuple[str | None, str]:
    return (layer.op, layer.target) if layer is not None else (None, "?")


def _leaves(output) -> list[str]:
    if isinstance(output, str):
        return [output]
    if isinstance(output, dict):
        return [n for v in output.values() for n in _leaves(v)]
    return [n for v in output for n in _leaves(v)]
