"""Import a torchao pt2e quantized program (``convert_pt2e``, ``torch.export``) into JAX.

A pt2e program is an ATen graph in which quantized tensors are explicit
``quantize_per_tensor -> dequantize_per_tensor`` pairs (``quantized_decomposed`` ops,
NUMERICS.md rule 5) around float ops, and weights are int8 buffers with
``dequantize_per_channel`` (or ``_per_tensor``). :func:`import_pt2e` walks the graph
node by node and returns a :class:`~qjax.program.Program`:
``program(*inputs)`` runs it, ``program.trace(*inputs)`` returns ``{q node name:
QArray}`` — the integer codes of every ``quantize_per_tensor`` node of the graph, named
as in the graph (``quantize_per_tensor_default_1``, ...), ``program.layers`` what each
step is (op, torch target, scheme, qparams, source module).

Formulas (``s``, ``zp`` a q/dq node's literals, ``f32`` float32 rounding):

=================================  =======================================================
graph node                         qjax
=================================  =======================================================
``quantize_per_tensor(x)``         ``clamp(rint(x·f32(1/s)) + zp, quant_min, quant_max)``
                                   (:func:`qjax.quantize`, ``compat="qjax"``, rule 5)
``dequantize_per_tensor(q)``       ``f32(q - zp)·s`` (:func:`qjax.dequantize`)
``dequantize_per_channel(w)``      the same per channel, folded at import
=================================  =======================================================

Two modes:

* ``mode="reference"``: every node as the graph says it: dequantize, float op,
  quantize — what torch computes when it runs the converted program. Codes are
  bit-exact with torch wherever the float ops between a dq and a q are elementwise or
  data movement (add, mul, relu, clamp, max pool, cat, reshape, ...); conv, linear,
  matmul and other reductions differ from torch only by float32 summation order, which
  moves a code by 1 when the sum lands next to a rounding tie.
* ``mode="integer"`` (the int8 program): ``dq -> op -> q`` patterns run on the integer
  kernels of :mod:`qjax.kernels` — conv1d/conv2d and linear (optionally with a fused
  ``relu``/``hardtanh`` before the q: int8 x int8 -> int32 and the requantization
  ``scheme``), add (``add_scheme``; ``add -> relu`` fused), mul, cat, max pool,
  avg / adaptive-avg pool and spatial mean (``pool_scheme``, when the q keeps the
  input's qparams), relu and data movement on codes (when the q keeps the input's
  qparams: exact). Everything else between a dq and a q (batch norm, layer norm, gelu,
  softmax, matmul of activations, chains of several ops) runs as JAX float ops on the
  dequantized values, as in ``"reference"``; ``program.layers`` says which.
"""

from __future__ import annotations

from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np
from torch.fx.node import Node, map_aggregate

import qjax
from qjax import QArray, QParams
from qjax.flax._aten import FLOAT_OPS
from qjax.flax._pt2e_steps import make_pt2e_step, qp_params
from qjax.flax._torch_steps import Ref
from qjax.kernels._choice import kernels_of, resolve_kernel
from qjax.program import Layer, Program, Step

from . import _pt2e_graph as G
from ._pt2e_int import lower

__all__ = ["import_pt2e"]

Mode = Literal["integer", "reference"]
_MODES = ("integer", "reference")


class _Builder:
    """Walks the graph once, in order, turning nodes into Program steps."""

    def __init__(self, gm, mode, scheme, add_scheme, pool_scheme):
        self.gm = gm
        self.mode = mode
        self.scheme, self.add_scheme, self.pool_scheme = scheme, add_scheme, pool_scheme
        self.kernel = "xla"  # "amx" or "xla" (resolved, qjax.kernels._choice)
        self.consts: dict[str, np.ndarray] = {}
        self.weights: dict[str, QArray] = {}  # dq of constant codes: the weight's QArray
        self.qparams: dict[str, QParams] = {}  # runtime q nodes
        self.dq_src: dict[str, tuple[str, QParams]] = {}  # runtime dq -> (q node, qparams)
        self.kinds: dict[str, str] = {}  # "f" float (or a tuple of them), "q" QArray
        self.steps: list[Step] = []
        self.inputs: list[str] = []

    # ---- queries used by the integer lowering ----------------------------------------

    def runtime_q(self, node) -> tuple[str, QParams] | None:
        """``(q node name, qparams)`` if ``node`` dequantizes a run-time q node unchanged."""
        if not isinstance(node, Node) or node.name not in self.dq_src:
            return None
        qname, qp = self.dq_src[node.name]
        return (qname, qp) if G.same_qparams(qp, self.qparams[qname]) else None

    def weight(self, node) -> QArray | None:
        return self.weights.get(node.name) if isinstance(node, Node) else None

    def const(self, node):
        if node is None:
            return None
        if isinstance(node, Node):
            return self.consts.get(node.name)
        return None

    # ---- node handlers -----------------------------------------------------------------

    def add(self, node) -> None:
        if node.op == "placeholder":
            self.inputs.append(node.name)
            self.kinds[node.name] = "f"
        elif node.op == "get_attr":
            self.consts[node.name] = G.get_attr(self.gm, node.target)
        elif node.op == "call_module":
            if node.users:  # torch.export's _guards_fn has none
                raise ValueError(
                    f"pt2e import: node {node.name!r} calls module {node.target!r}; a pt2e "
                    "program is a flat ATen graph (export it with torch.export first)"
                )
        elif node.op == "call_function":
            self._call(node)
        elif node.op != "output":
            raise ValueError(f"pt2e import: node {node.name!r} has unsupported op {node.op!r}")

    def _call(self, node) -> None:
        t = G.target_name(node)
        if t in G.Q_TENSOR:
            self._quantize(node)
        elif t in G.DQ_TENSOR or t in G.DQ_CHANNEL:
            self._dequantize(node, per_channel=t in G.DQ_CHANNEL)
        elif t in G.Q_CHANNEL:
            self._quantize_channel(node)
        elif t in FLOAT_OPS:
            self._float(node, t)
        else:
            raise ValueError(
                f"pt2e import: node {node.name!r} calls {t}, which qjax cannot import "
                f"(module {G.module_path(node)!r}); supported ops: quantized_decomposed "
                f"q/dq and {sorted(FLOAT_OPS)}"
            )

    def _layer(self, node, op, **kw) -> Layer:
        extra = dict(kw.pop("extra", {}))
        extra.setdefault("module", G.module_path(node))
        return Layer(op=op, target=G.target_name(node), extra=extra, **kw)

    def _quantize(self, node) -> None:
        qp = G.per_tensor_qparams(node, self.gm)
        src = node.args[0]
        name = node.name
        if src.name in self.consts:  # a weight quantized in the graph: fold
            self.consts[name] = np.asarray(qjax.quantize(jnp.asarray(self.consts[src.name]), qp))
            return
        self.qparams[name] = qp
        self.kinds[name] = "q"
        if self.mode == "integer":
            step = lower(node, qp, self)
            if step is not None:
                self.steps.append(step)
                return
        if self.kinds.get(src.name) != "f":
            raise ValueError(
                f"pt2e import: node {name!r} quantizes {src.name!r}, which is not a float tensor"
            )
        layer = self._layer(node, "quantize", out=qp, extra={"source": src.name})
        attrs = {"spec": qp.spec}
        self.steps.append(
            make_pt2e_step(name, "pt2e_quantize", attrs, (src.name,), qp_params(qp), layer)
        )

    def _quantize_channel(self, node) -> None:
        src = node.args[0]
        if src.name not in self.consts:
            raise ValueError(
                f"pt2e import: node {node.name!r} quantizes a run-time tensor per channel; "
                "only constant weights are quantized per channel"
            )
        w = self.consts[src.name]
        qp = G.per_channel_qparams(node, self.gm, w.ndim)
        self.consts[node.name] = np.asarray(qjax.quantize(jnp.asarray(w), qp))

    def _dequantize(self, node, per_channel: bool) -> None:
        src = node.args[0]
        name = node.name
        if src.name in self.consts:  # constant codes: a weight
            codes = self.consts[src.name]
            if per_channel:
                qp = G.per_channel_qparams(node, self.gm, codes.ndim)
            else:
                qp = G.per_tensor_qparams(node, self.gm)
            if codes.dtype != qp.spec.dtype:
                raise TypeError(
                    f"pt2e import: node {name!r} dequantizes {codes.dtype} codes as {qp.spec.dtype}"
                )
            w = QArray(jnp.asarray(codes), qp)
            self.weights[name] = w
            self.consts[name] = np.asarray(w.dequantize())
            return
        if per_channel or self.kinds.get(src.name) != "q":
            raise ValueError(
                f"pt2e import: node {name!r} ({G.target_name(node)}) dequantizes {src.name!r}, "
                "which is not a run-time quantize_per_tensor output"
            )
        qp = G.per_tensor_qparams(node, self.gm)
        self.dq_src[name] = (src.name, qp)
        self.kinds[name] = "f"
        layer = self._layer(node, "dequantize", out=qp, extra={"source": src.name})
        attrs = {"spec": qp.spec}
        self.steps.append(
            make_pt2e_step(name, "pt2e_dequantize", attrs, (src.name,), qp_params(qp), layer)
        )

    def _float(self, node, t: str) -> None:
        inputs: list[str] = []
        params: dict[str, jax.Array] = {}

        def ref(a):
            if not isinstance(a, Node):
                return a
            if a.name in self.consts:
                key = f"c{len(params)}"
                params[key] = jnp.asarray(self.consts[a.name])
                return Ref(key=key)
            if a.name not in self.kinds:
                raise ValueError(f"pt2e import: node {node.name!r} reads unknown value {a.name!r}")
            inputs.append(a.name)
            return Ref(i=len(inputs) - 1)

        targs = map_aggregate(node.args, ref)
        tkw = map_aggregate(dict(node.kwargs), ref)
        attrs = {"op": t, "args": targs, "kwargs": tkw}
        layer = self._layer(node, "float", extra={"op": t.split(".")[1] if "." in t else t})
        step = make_pt2e_step(node.name, "pt2e_float", attrs, tuple(inputs), params, layer)
        if not inputs:  # every operand is constant: fold at import
            try:
                out = step.fn(params)
            except (TypeError, ValueError) as e:
                raise type(e)(f"pt2e import: node {node.name!r} ({t}): {e}") from e
            if isinstance(out, jax.Array):
                self.consts[node.name] = np.asarray(out)
                return
        self.kinds[node.name] = "f"
        self.steps.append(step)

    # ---- finishing ---------------------------------------------------------------------

    def program(self, output_node) -> Program:
        outs = output_node.args[0]
        flat = list(outs) if isinstance(outs, (list, tuple)) else [outs]
        names = []
        for o in flat:
            if not isinstance(o, Node) or o.name in self.consts:
                raise ValueError(f"pt2e import: graph output {o!r} is a constant, not computed")
            names.append(o.name)
        live = set(names)
        kept = []
        for s in reversed(self.steps):  # drop float steps the integer kernels replaced
            if s.name in live or self.kinds.get(s.name) == "q":
                live.update(s.inputs)
                kept.append(s)
        output = names[0] if len(names) == 1 else tuple(names)
        return Program(list(reversed(kept)), self.inputs, output)


def import_pt2e(
    model,
    example_inputs=None,
    *,
    mode: Mode = "integer",
    scheme: str = "fbgemm",
    add_scheme: str = "fbgemm",
    pool_scheme: str = "fbgemm",
    kernel: str = "xla",
) -> Program:
    """Import a pt2e quantized program (``convert_pt2e`` output) as a qjax Program.

    Formulas and modes: module docstring. q nodes use ``clamp(rint(x·f32(1/s)) + zp)``,
    dq nodes ``f32(q - zp)·s``; in ``mode="integer"`` conv/linear run int8 x int8 ->
    int32 and requantize with ``scheme`` (:data:`qjax.kernels.SCHEMES`), add with
    ``add_scheme``, average pools with ``pool_scheme``.

    Args:
      model: the ``convert_pt2e`` result (``torch.fx.GraphModule``), or a
        ``torch.export.ExportedProgram`` of it.
      example_inputs: optional tuple of inputs; when given, the program is traced once
        (``jax.eval_shape``) so shape errors surface at import.
      mode: ``"integer"`` (integer kernels where a pattern has one) or ``"reference"``
        (dequantize -> float op -> quantize, as the graph says).
      scheme, add_scheme, pool_scheme: schemes of the integer kernels.
      kernel: ``"xla"`` (default), ``"amx"`` or ``"auto"``: the int32 dot/conv kernel of
        the integer conv/linear steps, as in :func:`qjax.converters.torch.import_model`
        (:mod:`qjax.kernels._choice`; grouped / dilated / 1-D convs keep XLA).

    Returns:
      a :class:`~qjax.program.Program`: float32 inputs in the graph's
      placeholder order; output(s) as the graph returns them (one name: a single array;
      several: a tuple); ``trace`` keys are the graph's quantize node names;
      ``program.kernels`` is ``{step name: "amx" | "xla"}`` for the integer conv/linear
      steps.

    Raises:
      TypeError: ``model`` is not a GraphModule / ExportedProgram.
      ValueError: an op qjax cannot import (the message names the node, its target and
        source module), non-constant qparams, an unknown mode.

    >>> import torch
    >>> from torchao.quantization.pt2e.quantize_pt2e import prepare_pt2e, convert_pt2e
    >>> from torchao.testing.pt2e._xnnpack_quantizer import (
    ...     XNNPACKQuantizer, get_symmetric_quantization_config)
    >>> _ = torch.manual_seed(0)
    >>> m = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU()).eval()
    >>> x = (torch.randn(2, 4),)
    >>> gm = prepare_pt2e(torch.export.export(m, x).module(),
    ...                   XNNPACKQuantizer().set_global(get_symmetric_quantization_config()))
    >>> _ = gm(*x)
    >>> gm = convert_pt2e(gm)
    >>> program = import_pt2e(gm, x)
    >>> sorted(program.trace(*x))  # every quantize node of the graph
    ['quantize_per_tensor_default_1', 'quantize_per_tensor_default_2']
    >>> bool(jnp.array_equal(program(*x), gm(*x).detach().numpy()))
    True
    """
    if mode not in _MODES:
        raise ValueError(f"import_pt2e: mode must be one of {_MODES}, got {mode!r}")
    wish = resolve_kernel(kernel, "qjax.converters.pt2e.import_pt2e")
    gm = G.graph_module(model)
    b = _Builder(gm, mode, scheme, add_scheme, pool_scheme)
    b.kernel = wish
    output = None
    for node in gm.graph.nodes:
        b.add(node)
        if node.op == "output":
            output = node
    if output is None:
        raise ValueError("pt2e import: the graph has no output node")
    program = b.program(output)
    program.kernels = kernels_of(program.params)
    if example_inputs is not None:
        args = tuple(example_inputs)
        if len(args) != len(program.inputs):
            raise TypeError(
                f"import_pt2e: the graph takes {len(program.inputs)} input(s) "
                f"{program.inputs}, got {len(args)} example input(s)"
            )
        arrays = [np.asarray(a.detach().cpu().numpy()) if hasattr(a, "detach") else a for a in args]
        jax.eval_shape(program.__call__, *arrays)
        program.example_shapes = tuple((np.shape(a), np.asarray(a).dtype.name) for a in arrays)
    return program
