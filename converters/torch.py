"""Import converted PyTorch int8 models (eager ``convert``, FX ``convert_fx``) as qjax programs.

``import_model(model, example_inputs, engine)`` traces the model with ``torch.fx`` (eager
models with ``torch.fx.symbolic_trace``; FX-converted models already are GraphModules),
maps every node to a qjax int8 kernel (:mod:`qjax.kernels`) and returns a jitted
:class:`~qjax.program.Program`: ``program(x)`` returns what the torch model
returns (float after a ``DeQuantStub``), ``program.trace(x)`` every quantized activation
``{fx node name: QArray}`` in graph order, with the codes in torch's logical (NCHW)
layout. :func:`torch_trace` gives torch's own activations under the same names.

Weights are unpacked once at import (``weight()`` / ``bias()`` of the quantized modules)
and prepared with :func:`~qjax.kernels.prepare_linear` / :func:`~qjax.kernels.prepare_conv`.
Values are stored in torch's memory order (channels-last after every quantized conv),
so convolutions run NHWC and layout-dependent kernels take the path torch takes; the
example inputs are run through torch once at import to record those layouts.

``engine`` and ``isa`` pick the arithmetic: torch's integers depend on the quantized
engine *and* the CPU level it runs at (:mod:`qjax.kernels._levels`, the one table).
``isa=None`` reproduces torch as it runs on this machine
(:func:`qjax.kernels.host_level`); ``isa="avx2" | "avx512" | "vnni" | "amx"`` another
machine. In short:

=================  ========================  ===============================  ===========
engine             linear                    conv                             add / pools
=================  ========================  ===============================  ===========
``"fbgemm"``       ``fbgemm``                ``fbgemm`` (3x3 depthwise fast    ``fbgemm``
                                             path: ``fbgemm_sat16``, rule 14)
``"x86"``          ``fbgemm`` (rule 11)      ``onednn`` when every weight      ``x86``
                                             zero point is 0 and groups <=
                                             100 on VNNI/AMX, else as
                                             ``"fbgemm"``
``"onednn"``       ``onednn``                ``onednn`` (rule 13)              ``onednn``
``"qnnpack"``      ``qnnpack`` (rule 12)     ``qnnpack``                       ``qnnpack``
``"tflite"``       ``tflite``                ``tflite``                        ``exact`` /
                                                                              ``fbgemm``
``"exact"``        ``exact``                 ``exact``                         ``exact`` /
                                                                              ``fbgemm``
=================  ========================  ===============================  ===========

On ``"avx2"`` and ``"avx512"`` FBGEMM and oneDNN accumulate with int16 pair saturation
(``fbgemm_sat16`` / ``onednn_sat16``; rule 14) and ATen's NHWC average pool uses an
8-channel block. ``"fbgemm_avx2"`` is ``engine="fbgemm", isa="avx2"``.

``mul``, ``cat``, clamps and max pooling are the same integers on every engine, except
torch's QNNPACK clamp (relu6 / hardtanh of a channels-last quint8 tensor under
``"qnnpack"``), which returns the channels-last buffer read in NCHW order: reproduced.
Supported nodes: ``quantize_per_tensor`` / ``QuantStub``, ``dequantize`` /
``DeQuantStub``, quantized ``Linear``/``LinearReLU``, ``Conv1d``/``Conv2d``/
``ConvReLU1d``/``ConvReLU2d`` (per-tensor or per-channel weights), ReLU, ReLU6,
Hardtanh, Hardswish (ATen kernel, or QNNPACK's table under ``"qnnpack"``), BatchNorm2d /
``BNReLU2d`` / ``quantized.batch_norm2d[_relu]`` (:func:`~qjax.kernels.quantized_batch_norm`),
``quantized.add``/``add_relu``/``mul``/``mul_relu``/``mul_scalar``/``cat``
(``FloatFunctional``/``QFunctional``), ``torch.cat``, flatten/reshape/view/size,
max/avg/adaptive-avg 2-D pools, dropout and identity. Any other node raises
``NotImplementedError`` naming the node, its op and its target.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import fx

from qjax import QArray
from qjax.flax._fold import fold_program
from qjax.flax._torch_steps import make_torch_step
from qjax.kernels._choice import kernels_of, resolve_kernel
from qjax.kernels._levels import ENGINE_CHOICES, Engine
from qjax.kernels._levels import engine as engine_at
from qjax.program import Layer, Program, Step

from . import _torch_ops as ops
from ._torch_values import act_qparams

__all__ = ["ENGINES", "Engine", "import_model", "torch_trace"]


ENGINES = ENGINE_CHOICES
"""Engine names :func:`import_model` accepts."""


def _graph_module(model) -> fx.GraphModule:
    if isinstance(model, fx.GraphModule):
        return model
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"expected a torch.nn.Module, got {type(model).__name__}")
    try:
        return fx.symbolic_trace(model)
    except Exception as e:  # torch.fx raises many types; name the model and re-raise as one
        raise ValueError(
            f"torch.fx.symbolic_trace failed on {type(model).__name__}: {e}; convert the model "
            "with FX (convert_fx) or make its forward symbolically traceable"
        ) from e


class _Recorder(fx.Interpreter):
    """Runs the graph once, keeping every node's result (for layouts, dtypes, traces)."""

    def __init__(self, gm):
        super().__init__(gm)
        self.values: dict[str, Any] = {}

    def run_node(self, n):
        try:
            out = super().run_node(n)
        except RuntimeError as e:  # torch's own failure: say which node it was
            first = next((ln for ln in str(e).splitlines() if ln.strip()), "")
            raise RuntimeError(
                f"torch failed running node {n.name!r} (op={n.op}, target="
                f"{ops.target_name(n)}) of the model during import: {first}"
            ) from e
        if n.op != "output":
            self.values[n.name] = out
        return out


def _record(gm, inputs) -> dict[str, Any]:
    rec = _Recorder(gm)
    with torch.no_grad():
        rec.run(*inputs)
    return rec.values


def _as_tuple(example_inputs) -> tuple:
    if isinstance(example_inputs, (tuple, list)):
        return tuple(example_inputs)
    return (example_inputs,)


def _torch_inputs(inputs) -> tuple:
    out = []
    for x in inputs:
        if isinstance(x, torch.Tensor):
            out.append(x)
        else:
            out.append(torch.from_numpy(np.array(x, dtype=np.float32)))
    return tuple(out)


def _channels_last(t) -> bool:
    """Whether torch stores ``t`` channels-last (strides of ``channels_last`` /
    ``channels_last_1d`` order, and not also the contiguous ones)."""
    if not isinstance(t, torch.Tensor) or t.dim() < 3:
        return False
    shape = t.shape
    c = 1
    cl = [0] * t.dim()
    for d in [1] + list(range(t.dim() - 1, 1, -1)) + [0]:
        cl[d] = c
        c *= max(shape[d], 1)
    contig = []
    c = 1
    for d in range(t.dim() - 1, -1, -1):
        contig.insert(0, c)
        c *= max(shape[d], 1)
    st = list(t.stride())

    def same(a):
        return all(x == y for x, y, n in zip(st, a, shape, strict=True) if n > 1)

    return same(cl) and not same(contig)


class _Ctx:
    def __init__(self, gm, engine: Engine, values, kernel: str = "xla"):
        self.gm = gm
        self.engine = engine
        self.kernel = kernel  # "amx", "xla" or "default", resolved (qjax.kernels._choice)
        self.values = values
        self.modules = dict(gm.named_modules())
        self.consts: dict[str, Any] = {}
        self.cl = {k: _channels_last(v) for k, v in values.items()}

    def dtype_of(self, node):
        return self.values[node.name].dtype

    def ndim(self, node) -> int:
        return self.values[node.name].dim()


def _fetch_attr(gm, target: str):
    obj = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    if isinstance(obj, torch.Tensor) and obj.numel() == 1 and not obj.is_quantized:
        return obj.item()
    return obj


def _unsupported(node, mod=None) -> NotImplementedError:
    what = type(mod).__module__ + "." + type(mod).__qualname__ if mod is not None else None
    tgt = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", None)
    return NotImplementedError(
        f"unsupported node {node.name!r}: op={node.op}, target={tgt or node.target!r}"
        + (f" ({what})" if what else "")
        + "; supported ops are listed in qjax.converters.torch"
    )


def _handler(ctx, node):
    if node.op == "call_module":
        mod = ctx.modules[node.target]
        h = ops.HANDLERS["module"].get(type(mod))
        if h is None:
            raise _unsupported(node, mod)
        return h, mod
    if node.op == "call_function":
        try:
            h = ops.HANDLERS["function"].get(node.target)
        except TypeError:  # unhashable target
            h = None
        if h is None:
            raise _unsupported(node)
        return h, None
    if node.op == "call_method":
        h = ops.HANDLERS["method"].get(node.target)
        if h is None:
            raise _unsupported(node)
        return h, None
    raise _unsupported(node)


def _output_step(ctx, node) -> tuple[Step, Any]:
    names, template, _ = ops.bind(ctx, node.args[:1])
    attrs = {"template": template, "cls": tuple(ctx.cl.get(n, False) for n in names)}
    layer = Layer("output", "output")
    return make_torch_step("output", "torch_output", attrs, tuple(names), None, layer), "output"


def import_model(
    model,
    example_inputs,
    engine: str = "x86",
    kernel: str | None = None,
    *,
    isa: str | None = None,
) -> Program:
    """Import a converted torch int8 model as a jitted qjax :class:`Program`.

    ``program(*xs)`` computes, on integer codes, what ``model(*xs)`` computes under the
    torch quantized ``engine`` (the table in the module docstring; NUMERICS.md rules
    1, 3, 11-18), float32 in and out where the model has ``QuantStub``/``DeQuantStub``.

    Args:
      model: an eager model after ``torch.ao.quantization.convert`` or a GraphModule from
        ``convert_fx``, in eval mode.
      example_inputs: a tensor or a tuple of them (float); run through torch once.
      engine: ``"x86"``, ``"fbgemm"``, ``"fbgemm_avx2"``, ``"qnnpack"``, ``"onednn"``,
        ``"tflite"`` or ``"exact"``.
      isa: the CPU level torch ran at: ``None`` (this machine's, as torch detects it,
        :func:`qjax.kernels.host_level`), ``"avx2"``, ``"avx512"``, ``"vnni"`` or
        ``"amx"`` (:mod:`qjax.kernels._levels`).
      kernel: the int32 dot/conv kernel (:mod:`qjax.kernels._choice`): ``None``
        (default: XLA for exactly accumulated layers; the layers that saturate int16
        pairs, at levels without VNNI (``isa="avx2"``/``"avx512"``, engine
        ``fbgemm_avx2``, FBGEMM's depthwise 3x3 path), on the native AVX2 ``"sat16"``
        kernel when :func:`qjax.kernels.sat16_status` says it runs, else XLA);
        ``"xla"`` (every layer on XLA; ``jax.export``-able), ``"amx"`` (the native AMX
        kernel of :func:`qjax.kernels.native_status` for linear layers and 2-D convs
        with ``groups=1``, dilation 1, exact accumulation, saturating layers as under
        ``None``, XLA elsewhere; ``RuntimeError`` with the reason when it cannot run
        here) or ``"auto"`` (AMX where available, else as ``None``). Same codes either
        way. A program with native layers cannot be ``jax.export``-ed (the custom call
        is refused; import with ``kernel="xla"`` to export).

    Returns:
      a :class:`~qjax.program.Program` with ``__call__``, ``trace``,
      ``layers``, ``engine`` / ``level`` (what it emulates) and ``kernels`` (``{layer
      name: "amx" | "sat16" | "xla"}`` for every linear and conv step).

    >>> import torch, warnings
    >>> from torch.ao.quantization import QuantStub, DeQuantStub, get_default_qconfig
    >>> from torch.ao.quantization import prepare, convert
    >>> _ = torch.manual_seed(0)
    >>> m = torch.nn.Sequential(QuantStub(), torch.nn.Linear(4, 3), DeQuantStub()).eval()
    >>> m.qconfig = get_default_qconfig("fbgemm")
    >>> with warnings.catch_warnings():
    ...     warnings.simplefilter("ignore")
    ...     p = prepare(m); _ = p(torch.randn(8, 4)); qm = convert(p)
    ...     x = torch.randn(2, 4)
    ...     program = import_model(qm, (x,), engine="fbgemm")
    ...     want = qm(x).numpy()
    >>> bool((np.asarray(program(x)) == want).all())
    True
    >>> list(program.trace(x))
    ['_0', '_1']
    >>> from qjax.kernels import host_level
    >>> program.level == host_level(), list(program.kernels)  # this CPU's level
    (True, ['_1'])
    """
    eng = engine_at(engine, isa)
    wish = resolve_kernel(kernel, "qjax.converters.torch.import_model")
    gm = _graph_module(model)
    _check_module_qparams(gm)  # before torch runs the model (it fails late, or not at all)
    inputs = _torch_inputs(_as_tuple(example_inputs))
    ctx = _Ctx(gm, eng, _record(gm, inputs), wish)
    steps: list[Step] = []
    input_names: list[str] = []
    output = None
    for node in gm.graph.nodes:
        if node.op == "placeholder":
            input_names.append(node.name)
        elif node.op == "get_attr":
            ctx.consts[node.name] = _fetch_attr(gm, node.target)
        elif node.op == "output":
            step, output = _output_step(ctx, node)
            steps.append(step)
        else:
            h, mod = _handler(ctx, node)
            try:
                steps.append(h(ctx, node, mod) if mod is not None else h(ctx, node))
            except (NotImplementedError, ValueError, TypeError) as e:
                raise type(e)(
                    f"node {node.name!r} (op={node.op}, target={ops.target_name(node)}): {e}"
                ) from e
    if len(input_names) != len(inputs):
        raise ValueError(f"the model takes {len(input_names)} inputs, got {len(inputs)} examples")
    program = Program(steps, input_names, output, engine=eng.name, level=eng.level)
    program.kernels = kernels_of(program.params)
    # layers on a fused native kernel get their requantization folded before the first
    # call, and again after an edit of program.params (Program.refresh)
    program.refresh = fold_program
    program.example_shapes = tuple(
        (tuple(x.shape), str(x.dtype).removeprefix("torch.")) for x in inputs
    )  # what qjax.load_served traces a saved program at
    return program


def _check_module_qparams(gm) -> None:
    """Every quantized module's output qparams (``scale``, ``zero_point``), checked as every
    loader checks qparams (``ValueError`` naming the layer)."""
    for name, mod in gm.named_modules():
        scale, zp = getattr(mod, "scale", None), getattr(mod, "zero_point", None)
        if scale is None or zp is None or isinstance(scale, torch.nn.Module):
            continue
        dtype = getattr(mod, "dtype", torch.quint8)
        side = "input" if isinstance(mod, torch.ao.nn.quantized.Quantize) else "output"
        if dtype in (torch.quint8, torch.qint8):
            act_qparams(scale, zp, dtype, where=f"layer {name!r} {side}")


def torch_trace(model, *inputs) -> dict[str, QArray]:
    """torch's quantized activations ``{fx node name: QArray}`` (keys of ``program.trace``).

    Runs the model's fx graph with a ``torch.fx.Interpreter`` and keeps every node whose
    result is a per-tensor quantized tensor: codes ``int_repr()`` in logical layout,
    qparams ``(f32(q_scale), q_zero_point)``.

    >>> import torch
    >>> from torch.ao.quantization import QuantStub
    >>> m = torch.nn.Sequential(QuantStub(), torch.nn.ReLU())
    >>> m[0] = torch.ao.nn.quantized.Quantize(0.5, 128, torch.quint8)
    >>> {k: v.values.tolist() for k, v in torch_trace(m, torch.tensor([-1.0, 2.0])).items()}
    {'_0': [126, 132], '_1': [128, 132]}
    """
    gm = _graph_module(model)
    values = _record(gm, _torch_inputs(inputs))
    out = {}
    for name, v in values.items():
        if isinstance(v, torch.Tensor) and v.is_quantized:
            codes = np.ascontiguousarray(v.int_repr().numpy())
            out[name] = QArray(ops.device_array(codes, codes.dtype), ops.qparams_of(v))
    return out
