"""Export a qjax int8 :class:`~qjax.program.Program` as an ONNX model in QDQ form.

``export_onnx(program, example_inputs)`` writes every step as float ONNX ops between
``QuantizeLinear`` / ``DequantizeLinear`` pairs (the "QDQ" format that onnxruntime and
other runtimes turn back into integer kernels), opset 13 or later:

=====================================  ==================================================
qjax step (``Layer.op``)               ONNX nodes (``DQ`` = DequantizeLinear, ``Q`` =
                                       QuantizeLinear)
=====================================  ==================================================
``quantize`` / ``dequantize``          ``Q`` / ``DQ`` (per-tensor, 8-bit); a quantize
                                       of codes (re-quantization): ``DQ`` -> ``Q``
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
``float`` (a traced Flax program)      the jax primitive on float tensors, written from
                                       the step's jaxpr (:mod:`qjax.converters._onnx_jax`:
                                       ``Add``, ``Tanh``, ``ReduceSum``, ``Einsum``, ...)
layout ops and ``max_pool`` on codes   the same ops on the integer codes (``Reshape``,
(a traced Flax program)                ``Transpose``, ``Slice``, ``Concat``, ``MaxPool``)
=====================================  ==================================================

Everything is in the program's logical layout, whatever order it stores values in:
channels-first (NCHW, torch's) by default, channels-last when ``program.layout`` is
``"NHWC"`` (a Flax model traced by :func:`qjax.convert`, which is channels-last whether
or not it says so). A channels-last program keeps its NHWC inputs, outputs and
intermediates; only the ops ONNX defines channels-first get ``Transpose`` nodes around
them: a conv's codes are transposed before its ``DQ`` and after its ``Q`` (onnxruntime
still fuses ``DQ -> Conv -> Q`` and removes the transposes), a pool's around it. A conv
whose input does not have its channels where the layout says raises, naming the layout
to set. Shapes are the static shapes of ``example_inputs`` (a traced Flax program is
exported as lowered for them). Every activation's scale and zero point comes from
``program.trace(*example_inputs)`` (so the Q after a step carries exactly the qparams
the qjax step produced), the weights from the step's prepared ``params``. Qparams whose
range is narrower than the 8-bit dtype's (``reduce_range``: codes 0..127) get a
``Clip`` of the codes after their ``Q`` (``QuantizeLinear`` saturates to the dtype
only). A linear/conv layer without output qparams (a Flax layer without an output
quantizer) ends in float: ``DQ(x)``, ``DQ(w)``, float bias, no ``Q``. A step with any
other op, or a float step with a primitive outside :mod:`qjax.converters._onnx_jax`'s
table, raises ``NotImplementedError`` naming the step, its op and its source target
(the primitive).

Float steps compute the same float32 operations as the program, up to summation order
(reductions, dot products) and the last ulp of transcendental functions (``exp``,
``tanh``): a quantizer after one can differ by one code at near-ties.

**Bias.** The bias is stored as int32 ``b_q = clamp(rint(f32(b) / f32(s_x·s_w)))`` with a
``DQ`` of scale ``f32(s_x·s_w)`` (per channel with the weight) and zero point 0 — the
rule of onnxruntime's own quantization tool. A float bias would be closer to torch's
FBGEMM (rule 11: float bias) but onnxruntime fuses ``DQ -> Conv/Gemm -> Q`` into an
integer kernel only when the bias is an int32 ``DQ`` (its QDQ selectors check the
dtype), so a float bias would leave the layer in float.

**What onnxruntime computes** (1.32, CPU EP, x86-64 with AVX512-VNNI; sources
``mlas/lib/quantize.cpp``, MLAS ``requantize``, ``qlinearconv.cc``,
``contrib_ops/cpu/quantization/qlinear_pool.cc``, ``mlas/lib/qlgavgpool.cpp``; behaviour
measured in ``tests/test_converters_onnx.py``):

* ``QuantizeLinear``: ``clamp(rint(x / s) + zp)`` — an IEEE float32 *division*, round
  half to even, zero point added *after* rounding (torch's ``quantize_per_tensor``,
  rule 1, is ``rint(fma(x, 1/s, zp))``: the two differ only at near-ties).
* graph optimizations ON: ``DQ -> Conv -> Q`` becomes ``QLinearConv`` and ``DQ -> Gemm
  -> Q`` ``QGemm``: exact int32 ``acc = Σ (x - zp_x)(w - zp_w)``, then
  ``clamp(rint(f32(f32(acc + b_q)·M)) + zp_y)`` with the float32 multiplier
  ``M = f32(f32(s_x·s_w) / s_y)`` (per output channel; a division), round half to even,
  zero point *after* rounding. Checked at constructed ties (every odd ``acc`` a tie):
  0 of 1,024 codes differ from this rule, for QGemm and QLinearConv (1-d, 2-d). It is
  QNNPACK's requantization (rule 12, the ``"qnnpack"`` scheme) except for the
  multiplier: QNNPACK's is ``f32(f32(s_x·s_w)·f32(1/s_y))`` (107 of the 1,024 tie codes
  differ where the two multipliers differ by an ulp; on random data the ``"qnnpack"``
  program equals ORT in every conv, linear, add, mul, cat and global-average-pool code
  measured) and its bias ``rint(f32(b·f32(1/f32(s_x·s_w))))`` (a reciprocal).
* ``QLinearAveragePool`` (ON) dequantizes, sums and divides in float and rounds
  ``rint(f32(y / s_y + zp))`` (zero point *before* rounding): up to 1 LSB from torch's
  integer average pools. ``QLinearGlobalAveragePool`` requantizes ``Σ q - N·zp_x`` with
  ``f32(f32(s_x / N) / s_y)`` like the conv.
* graph optimizations OFF: the float reference of the same graph — dequantize
  ``f32(q - zp)·s``, float32 Conv/Gemm (summation order of MLAS's SGEMM), float bias
  ``b_q·f32(s_x·s_w)``, then ``QuantizeLinear``; codes can differ by one LSB from any
  integer scheme where the float result lies within rounding error of a half (50 of the
  1,024 tie codes).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

import jax
import numpy as np
import onnx
from onnx import TensorProto, helper

from qjax.program import Program, Step

from ._onnx_ops import ALIASES, HANDLERS, STATIC, Builder, jaxpr_step, value_info

__all__ = ["export_onnx"]


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
      program: a :class:`~qjax.program.Program` (e.g. from
        ``qjax.converters.torch.import_model``, or ``qjax.convert`` of a Flax model:
        channels-last, ``program.layout``).
      example_inputs: one array per program input (a single array is taken as one
        input); run once through ``program.trace`` for the activations' qparams and shapes.
      path: if given, the model is also saved there.
      opset: ONNX opset, 13 or later (per-axis ``DequantizeLinear`` needs 13).
      intermediates: also make every quantized activation (codes, in the program's
        layout) a graph output named after its step (aliases such as ``identity`` steps
        are not repeated).

    Returns:
      the checked ``onnx.ModelProto``.

    >>> import jax.numpy as jnp, onnxruntime as ort
    >>> from qjax import QParams, QuantSpec
    >>> from qjax.kernels import quantize_input, relu, dequantize_output
    >>> qp = QParams(0.5, 128, QuantSpec(signed=False))
    >>> from qjax.program import Layer
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
    layout = _layout(program)
    run = _at_shapes(program, example_inputs)
    trace = program.trace(*example_inputs)
    generic = [s for s in run.steps if _from_jaxpr(s, layout)]
    values, jaxprs = {}, {}
    if generic or layout == "NHWC":  # shapes of untraced values, jaxprs of generic steps
        values, jaxprs = _abstract(run, example_inputs, {s.name for s in generic})
    b = Builder(trace, layout=layout, opset=opset, values=values)
    b.jaxprs = jaxprs
    graph_inputs = []
    for name, x in zip(program.inputs, example_inputs, strict=True):
        shp = tuple(int(d) for d in np.shape(x.detach() if hasattr(x, "detach") else x))
        b.env[name], b.kind[name], b.shape[name] = name, "float", shp
        graph_inputs.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, list(shp)))
    outputs: list[str] = []
    for step in run.steps:
        op, target = _describe(step)
        try:
            if op == "output":
                outputs = list(step.inputs)
            elif step.name in jaxprs:
                jaxpr_step(b, step)
            elif op in ALIASES and b.kind.get(step.inputs[0]) == "multi":
                raise NotImplementedError("an alias of a multi-output step's results")
            elif op in ALIASES:
                src = step.inputs[0]
                for d in (b.env, b.kind, b.qp, b.shape):
                    if src in d:
                        d[step.name] = d[src]
            elif op in STATIC:
                b.kind[step.name] = "static"
            elif op in HANDLERS:
                HANDLERS[op](b, step)
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
    graph_outputs = [value_info(b, n) for n in outputs]
    if intermediates:
        seen = set(out_names)
        for s in run.steps:
            if b.kind.get(s.name) == "codes" and b.env[s.name] == s.name and s.name not in seen:
                graph_outputs.append(value_info(b, s.name))
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


# ops of a traced Flax program that are jax primitives on codes (qjax.flax._lower)
_JAX_LAYOUT = {"reshape", "transpose", "squeeze", "expand_dims", "broadcast_in_dim", "slice",
               "rev", "copy", "copy_p", "max_pool", "concatenate"}  # fmt: skip
_FLAX_OUTPUTS = {"constant", "identity"}  # a constant output, one result of a multi-output step


def _layout(program: Program) -> str:
    """``"NHWC"`` for a channels-last program (``program.layout``; a traced Flax program
    is one whether or not it says so), else ``"NCHW"`` (torch's logical order)."""
    layout = getattr(program, "layout", None)
    if layout is not None:
        return layout
    mod = sys.modules.get("qjax.flax._convert")  # loaded wherever such a program exists
    traced = getattr(mod, "TracedProgram", None)
    return "NHWC" if traced is not None and isinstance(program, traced) else "NCHW"


def _at_shapes(program: Program, inputs) -> Program:
    """The program that runs ``inputs``: a traced Flax program is lowered once per input
    shape (``TracedProgram.programs``); its steps at these shapes are the ones exported."""
    at = getattr(program, "_at", None)
    if callable(at) and hasattr(program, "programs"):
        return at(tuple(inputs))[0]
    return program


def _from_jaxpr(step: Step, layout: str) -> bool:
    """Steps written from their jaxprs: float steps (any program) and a channels-last
    program's layout ops on codes (jax primitives; torch's keep their own handlers)."""
    op = step.layer.op if step.layer is not None else None
    if op == "float":
        return True
    return layout == "NHWC" and step.export is None and op in _JAX_LAYOUT | _FLAX_OUTPUTS


def _portable_fn(step: Step):
    """The step's function with its native calls off (``kernel="xla"``), whose jaxpr is
    what the step computes: a traced Flax program's max pool on codes may be a native call
    (:func:`qjax.flax._steps.on_xla`; that module is loaded wherever such a step exists)."""
    mod = sys.modules.get("qjax.flax._steps")
    return step.fn if mod is None else mod.on_xla(step).fn


def _abstract(program: Program, inputs, want: set[str]) -> tuple[dict, dict]:
    """``({step name: abstract value}, {step name in want: its jaxpr})`` from one
    abstract run of the program at the inputs' shapes (no arithmetic is done)."""
    jaxprs: dict = {}

    def run(args):
        env = dict(zip(program.inputs, args, strict=True))
        for s in program.steps:
            ins = [env[i] for i in s.inputs]
            if s.name in want:
                fn = _portable_fn(s)
                jaxprs[s.name] = jax.make_jaxpr(lambda *v, s=s, fn=fn: fn(s.params, *v))(*ins)
            env[s.name] = s.fn(s.params, *ins)
        return {s.name: env[s.name] for s in program.steps}

    args = tuple(
        np.asarray(x.detach().cpu().numpy() if hasattr(x, "detach") else x) for x in inputs
    )
    return jax.eval_shape(run, args), jaxprs


def _describe(step: Step) -> tuple[str | None, str]:
    """``(op, target)`` of a step for error messages (``Layer``s are optional)."""
    layer = step.layer
    return (layer.op, layer.target) if layer is not None else (None, "?")


def _leaves(output) -> list[str]:
    if isinstance(output, str):
        return [output]
    if isinstance(output, dict):
        return [n for v in output.values() for n in _leaves(v)]
    return [n for v in output for n in _leaves(v)]
