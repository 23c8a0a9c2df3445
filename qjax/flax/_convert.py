"""``qjax.convert``: a calibrated or QAT-trained Flax model -> one int8 :class:`~qjax.Program`.

The model is traced (``jax.make_jaxpr``) with every qjax layer in ``Mode.FROZEN`` while
:func:`qjax.flax._record.recording` marks its quantizers and quantized layers, and the
jaxpr is lowered by :mod:`qjax.flax._lower`: quantized dots and convolutions become
int8 x int8 -> int32 kernels with the scheme's requantization (weights quantized and
prepared once, here), ReLU, max pooling and layout ops run on the codes, and everything
else (LayerNorm, softmax, GELU, an unfolded BatchNorm, residual adds, average pools)
stays float between a ``dequantize`` and the next quantizer, computed exactly as the model
computes it. What stays float is listed in ``program.float_ops``.

Models: any ``nnx.Module``, a ``nnx.Sequential`` included (a copy is traced in
``eval()`` mode: Dropout is the identity, BatchNorm uses its running statistics; the model
itself is not changed), a Linen ``(module, variables)``, an ``nn.Sequential`` included
(``module.apply(variables, *args)``; pass a function for other ``apply`` arguments such as
``train=False``), or a function of the inputs that calls such models. Layers are named by
their module paths (``"block/conv1"``; ``"layers/1"`` in an ``nnx.Sequential``,
``"layers_1"`` in a Linen one).

Errors name the module path and the fix: observers that never saw data, non-finite
statistics, a float tensor reaching a layer without an input quantizer, a
``config.scheme`` that differs from ``scheme``, a model with nothing quantized.
"""

from __future__ import annotations

import contextlib
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import errors as flax_errors
from flax import nnx

from ..kernels._choice import kernels_of, resolve_kernel
from ..program import Program
from . import _record, _steps
from ._fold import fold_program
from ._lower import lower
from ._paths import join_path
from ._walk import nnx_quantized
from .nnx._ptq import WeightOnlyLinear

__all__ = ["TracedProgram", "convert"]


@contextlib.contextmanager
def _named_by_path(model: nnx.Module):
    """Every quantized layer's ``name`` set to its path while the forward is traced (errors
    and steps are named by path, whatever the user named them); restored afterwards."""
    holders = [(q.holder, q.path) for q in nnx_quantized(model)]
    # the weight-only layers hold no statistics: named by their own path too
    holders += [
        (m, join_path(path))
        for path, m in nnx.iter_modules(model)
        if isinstance(m, WeightOnlyLinear)
    ]
    names = [h.name for h, _ in holders]
    try:
        for h, path in holders:
            h.name = path
        yield
    finally:
        for (h, _), n in zip(holders, names, strict=True):
            h.name = n


def _nnx_forward(model: nnx.Module):
    copy = nnx.clone(model)  # the user's model keeps its flags (eval() below)
    copy.eval()
    graphdef, state = nnx.split(copy)
    # the state goes in as arguments: NNX variables cannot be written from inside a trace
    return (lambda st, *a: nnx.merge(graphdef, st)(*a)), state


def _forward(model):
    """``(fn, known)`` of a Linen pair or a function (NNX: :func:`_nnx_forward`): the
    forward ``fn(known, *inputs)`` and its fixed first argument."""
    if isinstance(model, tuple) and len(model) == 2 and isinstance(model[0], nn.Module):
        module, variables = model
        return (lambda v, *a: module.apply(v, *a)), variables
    if callable(model) and not isinstance(model, (nn.Module, nnx.Module)):
        return (lambda _, *a: model(*a)), ()
    raise TypeError(
        f"convert: expects an nnx.Module, a (linen Module, variables) pair or a function, "
        f"got {type(model).__name__}"
    )


def convert(model, *example_args, scheme: str = "fbgemm", kernel: str = "xla") -> Program:
    """Convert a calibrated / QAT-trained Flax model into an int8 :class:`~qjax.Program`.

    Every model (a class, an ``nnx.Sequential`` or ``(linen nn.Sequential, variables)``,
    a function) is traced and lowered as follows; :func:`qjax.save_served` saves the
    program.

    ``program(*args)`` takes the inputs the model takes (float or integer arrays, any batch size)
    and returns what the model returns: quantized values come out dequantized
    (``f32(q - zp)·s``). Every quantized dot/conv inside is int8 x int8 -> int32 followed
    by :func:`qjax.kernels.requantize` with ``scheme`` (or the float
    ``dequantize_accumulator`` for a layer without an output quantizer). Layers trained
    with ``QuantConfig(scheme=scheme)`` serve exactly their ``Mode.FROZEN`` outputs; with
    ``scheme=None`` configs the float simulation can differ from the integer result by
    one step at rounding ties. ``program.trace(*args)`` returns every quantized
    activation by layer path; ``program.float_ops`` lists what stays float.

    The program is traced at the example's shapes; inputs of other shapes (another batch
    size) are traced and lowered again on first use, reusing the prepared weights
    (:class:`TracedProgram`).

    ``kernel`` picks the int32 dot/conv kernel (:mod:`qjax.kernels._choice`): ``"xla"``
    (default; ``jax.export``-able), ``"amx"`` (the native AMX kernel of
    :func:`qjax.kernels.native_status`; ``RuntimeError`` with the reason when it cannot
    run here), ``"onednn"`` (oneDNN's brgemm ukernel where it is exact) or ``"auto"``
    (AMX where available, else oneDNN where exact, else XLA); ``program.kernels`` records
    ``{layer: "amx" | "onednn" | "xla"}``; the codes are the same. On a native kernel a
    layer with an output quantizer gets its requantization coefficients folded in once
    (:mod:`qjax.flax._fold`), folded again before the next call whenever an entry of
    ``program.params`` is replaced.

    Args:
      model: an ``nnx.Module``, ``(linen Module, variables)`` or a function.
      *example_args: arrays (float, or integer token ids) with the inputs' shapes and dtypes.
      scheme: a key of :data:`qjax.kernels.SCHEMES`.
      kernel: ``"xla"``, ``"amx"``, ``"onednn"`` or ``"auto"``.

    >>> from flax import nnx
    >>> from qjax.flax import default_qat_qconfig, nnx as qnnx
    >>> cfg = default_qat_qconfig("x86")
    >>> class Net(nnx.Module):
    ...     def __init__(self, rngs):
    ...         self.stub = qnnx.QuantStub(cfg)
    ...         self.fc = qnnx.QuantLinear(3, 2, config=cfg, rngs=rngs)
    ...     def __call__(self, x):
    ...         return nnx.relu(self.fc(self.stub(x)))
    >>> model = Net(nnx.Rngs(0))
    >>> x = jnp.linspace(-1, 1, 12).reshape(4, 3)
    >>> qnnx.calibrate(model, [x], progress=False)
    1
    >>> served = convert(model, x)
    >>> [layer.op for layer in served.layers.values()]
    ['quantize', 'linear', 'relu', 'dequantize']
    >>> served(x).shape, served.kernels
    ((4, 2), {'fc': 'xla'})
    """
    from ..kernels import SCHEMES

    if scheme not in SCHEMES:
        raise ValueError(f"convert: unknown scheme {scheme!r}; known: {sorted(SCHEMES)}")
    native = resolve_kernel(kernel, "qjax.convert")
    if not example_args:
        raise TypeError("convert: pass example inputs (arrays) after the model")
    what = type(model[0] if isinstance(model, tuple) else model).__name__
    args = []
    for i, a in enumerate(example_args):
        a = jnp.asarray(a)
        numeric = jnp.issubdtype(a.dtype, jnp.floating) or jnp.issubdtype(a.dtype, jnp.integer)
        if not numeric or a.ndim < 1:
            raise TypeError(
                f"convert: example input {i} must be a float or integer array (batch, ...) "
                f"(integers: token ids), got {a.dtype} {a.shape}"
            )
        args.append(a)
    if isinstance(model, nnx.Module):
        with _named_by_path(model):  # the clone keeps the path names
            fn, known = _nnx_forward(model)
    else:
        fn, known = _forward(model)
    names = ("x",) if len(args) == 1 else tuple(f"x{i}" for i in range(len(args)))
    prepared: dict = {}  # layer name -> prepared weights, shared by every input shape

    def build(shapes) -> tuple[Program, Any]:
        avals = [jax.ShapeDtypeStruct(sh, dt) for sh, dt in shapes]
        with _record.recording():
            try:
                closed, out_shape = jax.make_jaxpr(fn, return_shape=True)(known, *avals)
            except flax_errors.TraceContextError as e:
                raise TypeError(
                    f"convert: {what} writes NNX variables from inside the trace ({e}); a "
                    "function calling an NNX model cannot be traced: pass the nnx.Module "
                    "itself (or a module class wrapping it)"
                ) from None
        out_tree = jax.tree_util.tree_structure(out_shape)
        leaves = jax.tree_util.tree_leaves(known)
        return lower(
            closed, leaves, names, out_tree, scheme=scheme, native=native, prepared=prepared
        )

    shapes = _shapes(args)
    program, low = build(shapes)
    if low.marked == 0:
        raise ValueError(
            f"convert: {what} has no quantized layer or quantizer in its forward; hook it "
            "(qjax.flax.nnx.quantize_model / linen.QuantRules) or use qjax layers, then "
            "calibrate or train it"
        )

    def describe():
        """The program lowered with a symbolic batch size (what a file holds), or at the
        example shapes when the model cannot be traced that way."""
        (b,) = jax.export.symbolic_shape(_steps.BATCH)
        n = shapes[0][0][0]
        sym = tuple(((b, *sh[1:]) if sh[0] == n else sh, dt) for sh, dt in shapes)
        try:
            sym_program, sym_low = build(sym)
        except Exception as e:  # any failure of the symbolic trace: fixed shapes instead
            why = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            return program, shapes, n, why, low.float_ops
        return sym_program, sym, n, None, sym_low.float_ops

    served = TracedProgram(program, low.float_ops, shapes, lambda sh: build(sh)[0], describe)
    served(*args)  # compiles once: shape errors surface now, with the step's layer
    return served


def _shapes(args) -> tuple:
    return tuple((tuple(np.shape(a)), np.dtype(jnp.result_type(a))) for a in args)


class TracedProgram(Program):
    """The :class:`~qjax.Program` of a traced Flax model (:func:`convert`), or of one read
    back from a file (:func:`qjax.load_served`).

    It holds the steps lowered at the example's input shapes (what ``steps``, ``layers``,
    ``float_ops``, ``kernels`` and exports describe); called with other shapes (another
    batch size), it lowers the model again for them on first use (a loaded program:
    evaluates its batch-size expressions), with the same prepared weights, and keeps that
    program (``programs``: one per shape). :func:`qjax.save_served` writes it."""

    def __init__(self, program: Program, float_ops, shapes, build, describe):
        super().__init__(program.steps, program.inputs, program.output)
        self.float_ops = dict(float_ops)
        self.kernels = kernels_of(self.params)
        self.layout = "NHWC"  # a Flax model's images are channels-last
        self.programs = {shapes: self}
        self._build = build
        self.describe = describe  # -> (program, shapes, example batch, fixed_because, float_ops)
        self.refresh = fold_program  # native layers' requantization folded from the params
        self._ready()

    def _at(self, inputs) -> tuple[Program, tuple]:
        args = self._args(inputs)
        shapes = _shapes(args)
        program = self.programs.get(shapes)
        if program is None:
            program = self.programs[shapes] = self._build(shapes)
            program.refresh = fold_program
        return program, args
