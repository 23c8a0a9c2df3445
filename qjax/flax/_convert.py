"""``qjax.convert``: a calibrated or QAT-trained Flax model -> one int8 :class:`~qjax.Program`.

The model is traced (``jax.make_jaxpr``) with every qjax layer in ``Mode.FROZEN`` while
:func:`qjax.flax._record.recording` marks its quantizers and quantized layers, and the
jaxpr is lowered by :mod:`qjax.flax._lower`: quantized dots and convolutions become
int8 x int8 -> int32 kernels with the scheme's requantization (weights quantized and
prepared once, here), ReLU, max pooling and layout ops run on the codes, and everything
else (LayerNorm, softmax, GELU, an unfolded BatchNorm, residual adds, average pools)
stays float between a ``dequantize`` and the next quantizer, computed exactly as the model
computes it. What stays float is listed in ``program.float_ops``.

Models: an ``nnx.Sequential`` / Linen ``nn.Sequential`` of qjax layers goes to
:mod:`qjax.flax._sequential` (the saveable :class:`~qjax.flax._serve.ServedModel`); any
other ``nnx.Module`` (a copy is traced in ``eval()`` mode: Dropout is the
identity, BatchNorm uses its running statistics; the model itself is not changed), a
Linen ``(module, variables)`` (``module.apply(variables, *args)``; pass a function for
other ``apply`` arguments such as ``train=False``), or a function of the inputs that
calls such models. Layers are named by their module paths (``"block/conv1"``).

Errors name the module path and the fix: observers that never saw data, non-finite
statistics, a float tensor reaching a layer without an input quantizer, a
``config.scheme`` that differs from ``scheme``, a model with nothing quantized.
"""

from __future__ import annotations

import contextlib

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import nnx

from ..kernels._choice import kernels_of, resolve_kernel
from ..program import Program
from . import _record
from ._lower import lower
from ._sequential import convert_sequential, is_sequential
from ._serve import ServedModel
from ._walk import nnx_quantized

__all__ = ["convert"]


@contextlib.contextmanager
def _named_by_path(model: nnx.Module):
    """Every quantized layer's ``name`` set to its path while the forward is traced (errors
    and steps are named by path, whatever the user named them); restored afterwards."""
    layers = nnx_quantized(model)
    names = [q.holder.name for q in layers]
    try:
        for q in layers:
            q.holder.name = q.path
        yield
    finally:
        for q, n in zip(layers, names, strict=True):
            q.holder.name = n


def _nnx_forward(model: nnx.Module):
    copy = nnx.clone(model)  # the user's model keeps its flags (eval() below)
    copy.eval()
    graphdef, state = nnx.split(copy)
    # the state goes in as arguments: NNX variables cannot be written from inside a trace
    return (lambda st, *a: nnx.merge(graphdef, st)(*a)), state


def _forward(model):
    """``(fn, known)``: the forward ``fn(known, *inputs)`` and its fixed first argument."""
    if isinstance(model, nnx.Module):
        return _nnx_forward(model)
    if isinstance(model, tuple) and len(model) == 2 and isinstance(model[0], nn.Module):
        module, variables = model
        return (lambda v, *a: module.apply(v, *a)), variables
    if callable(model) and not isinstance(model, nn.Module):
        return (lambda _, *a: model(*a)), ()
    raise TypeError(
        f"convert: expects an nnx.Module, a (linen Module, variables) pair or a function, "
        f"got {type(model).__name__}"
    )


def convert(
    model, *example_args, scheme: str = "fbgemm", kernel: str = "xla"
) -> Program | ServedModel:
    """Convert a calibrated / QAT-trained Flax model into an int8 :class:`~qjax.Program`.

    An ``nnx.Sequential`` (or ``(linen nn.Sequential, variables)``) of qjax layers still
    converts to the :class:`~qjax.flax._serve.ServedModel` of
    :mod:`qjax.flax._sequential` (same codes; it can be saved with
    :func:`qjax.save_served`); every other model is traced and lowered as follows.

    ``program(*args)`` takes the inputs the model takes (float arrays, any batch size)
    and returns what the model returns: quantized values come out dequantized
    (``f32(q - zp)·s``). Every quantized dot/conv inside is int8 x int8 -> int32 followed
    by :func:`qjax.kernels.requantize` with ``scheme`` (or the float
    ``dequantize_accumulator`` for a layer without an output quantizer). Layers trained
    with ``QuantConfig(scheme=scheme)`` serve exactly their ``Mode.FROZEN`` outputs; with
    ``scheme=None`` configs the float simulation can differ from the integer result by
    one step at rounding ties. ``program.trace(*args)`` returns every quantized
    activation by layer path; ``program.float_ops`` lists what stays float.

    The program is traced at the example's shapes: another batch size runs where no step
    bakes the batch into its shape (max pools, means, convs and linear layers do not; a
    ``reshape`` or ``h[:, 0]`` of activations does, and then fails with the step's name:
    convert again with an example of the serving shape).

    ``kernel`` picks the int32 dot/conv kernel (:mod:`qjax.kernels._choice`): ``"xla"``
    (default; ``jax.export``-able), ``"amx"`` (the native AMX kernel of
    :func:`qjax.kernels.native_status`; ``RuntimeError`` with the reason when it cannot
    run here) or ``"auto"`` (AMX where available, else XLA); ``program.kernels`` records
    ``{layer: "amx" | "xla"}``; the codes are the same.

    Args:
      model: an ``nnx.Module``, ``(linen Module, variables)`` or a function.
      *example_args: float arrays with the inputs' shapes and dtypes.
      scheme: a key of :data:`qjax.kernels.SCHEMES`.
      kernel: ``"xla"``, ``"amx"`` or ``"auto"``.

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

    if is_sequential(model):
        if len(example_args) != 1:
            raise TypeError("convert: a Sequential takes one example input")
        return convert_sequential(model, example_args[0], scheme=scheme, kernel=kernel)
    if scheme not in SCHEMES:
        raise ValueError(f"convert: unknown scheme {scheme!r}; known: {sorted(SCHEMES)}")
    native = resolve_kernel(kernel, "qjax.convert")
    if not example_args:
        raise TypeError("convert: pass example inputs (float arrays) after the model")
    fn, known = _forward(model)
    what = type(model[0] if isinstance(model, tuple) else model).__name__
    args = []
    for i, a in enumerate(example_args):
        a = jnp.asarray(a)
        if not jnp.issubdtype(a.dtype, jnp.floating) or a.ndim < 1:
            raise TypeError(
                f"convert: example input {i} must be a float array (batch, ...), got "
                f"{a.dtype} {a.shape}"
            )
        args.append(a)
    named = _named_by_path(model) if isinstance(model, nnx.Module) else contextlib.nullcontext()
    with named, _record.recording():
        if isinstance(model, nnx.Module):
            fn, known = _nnx_forward(model)
        closed, out_shape = jax.make_jaxpr(fn, return_shape=True)(known, *args)
    out_tree = jax.tree_util.tree_structure(out_shape)
    names = ("x",) if len(args) == 1 else tuple(f"x{i}" for i in range(len(args)))
    known = jax.tree_util.tree_leaves(known)
    program, low = lower(closed, known, names, out_tree, scheme=scheme, native=native)
    if low.marked == 0:
        raise ValueError(
            f"convert: {what} has no quantized layer or quantizer in its forward; hook it "
            "(qjax.flax.nnx.quantize_model / linen.QuantRules) or use qjax layers, then "
            "calibrate or train it"
        )
    program.float_ops = low.float_ops
    program.kernels = kernels_of(program.params)  # as the torch importers record it
    program(*args)  # compiles once: shape errors surface now, with the step's layer
    return program
