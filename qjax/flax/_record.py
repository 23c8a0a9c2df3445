"""Marks in a traced forward: where :func:`qjax.convert` finds the quantized ops.

While :func:`recording` is on (only inside ``qjax.convert``'s trace), every activation
quantizer and every quantized layer of :mod:`qjax.flax` wraps the value it computed in
one ``qjax_mark`` equation::

    y' = qjax_mark(y, *operands; info)      # y' is y: the mark changes no number

``operands`` are what the int8 program needs to compute ``y`` itself (the layer's
input, its kernel, bias and observer states; an activation's input and qparams), and
``info`` says what the mark is (:class:`QuantizeMark`, :class:`LayerMark`). The
lowering (:mod:`qjax.flax._lower`) replaces a mark by its integer step; the float
equations that computed ``y`` in the model are then unused and dropped. A mark it does
not lower keeps ``y``: that value stays float, exactly as the model computed it, and
is listed as such.

Outside :func:`recording` nothing is marked, so training and the frozen forward trace
to the same programs as before.
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Any

import jax
from jax.extend.core import Primitive
from jax.interpreters import mlir

from ._config import RECORDING, QuantConfig

__all__ = [
    "DynamicMark",
    "LayerMark",
    "QuantizeMark",
    "TableMark",
    "WeightOnlyMark",
    "active",
    "mark",
    "mark_p",
    "recording",
]


@contextlib.contextmanager
def recording():
    """Mark the quantized ops of every forward traced inside this block, with every
    qjax layer in ``Mode.FROZEN`` (:func:`qjax.flax._config.as_mode`)."""
    token = RECORDING.set(True)
    try:
        yield
    finally:
        RECORDING.reset(token)


def active() -> bool:
    """Whether the current forward is being recorded for ``qjax.convert``.

    >>> active()
    False
    """
    return RECORDING.get()


@dataclasses.dataclass(frozen=True, eq=False)
class QuantizeMark:
    """An activation quantizer: ``y = fake_quant(x, qp, compat)``; operands ``(x, qp)``."""

    name: str
    compat: str


@dataclasses.dataclass(frozen=True, eq=False)
class LayerMark:
    """A quantized dot or conv: operands ``{"x", "kernel", "bias", "stats"}``.

    ``op``: ``"linear"`` (``x (..., *in) · kernel (*in, *out)``, contracted over
    ``in_ndim`` trailing axes of ``x``) or ``"conv"`` (channels-last, ``geometry`` the
    :func:`qjax.flax._intsim.conv_geometry` keywords). ``relu``: fused into the
    requantization clamp. ``source``: the module type, for reports. ``out_dims``: the
    kernel's output axes (a multi-axis ``LinearGeneral`` kernel). ``perm``: an
    ``Einsum`` as a linear layer, ``(x_perm, kernel_perm, y_perm)``: the input transposed
    by ``x_perm`` (contracted axes last, in the kernel's order), the kernel by
    ``kernel_perm`` (contracted axes first), the ``(..., *out_dims)`` result by
    ``y_perm`` (the equation's output order). ``unsupported``: why the int8 kernels
    cannot run this layer (it then stays float). A layer without an output quantizer
    produces floats (``dequantize_accumulator``).
    """

    op: str
    name: str
    config: QuantConfig
    source: str
    relu: bool = False
    geometry: Any = None
    in_ndim: int = 1
    out_dims: tuple | None = None
    unsupported: str | None = None
    perm: tuple | None = None


@dataclasses.dataclass(frozen=True, eq=False)
class TableMark:
    """A weight-only embedding table ``fake_quant(table)`` (one scale per row, or per
    tensor); operands ``{"x": table, "stats": weight observer state}``. A gather of it
    is served as a gather of its int8 codes (:func:`qjax.flax._steps.embed_lookup`)."""

    name: str
    config: QuantConfig


@dataclasses.dataclass(frozen=True, eq=False)
class DynamicMark:
    """A dynamic int8 linear (:func:`qjax.flax._ptq.dynamic_linear`); operands
    ``{"x", "weight": PreparedLinear, "bias"}``."""

    name: str
    act_spec: Any
    compat: str
    recipe: str = "fbgemm"
    accumulate: str = "exact"


@dataclasses.dataclass(frozen=True, eq=False)
class WeightOnlyMark:
    """A weight-only linear (:func:`qjax.flax._ptq.weight_only_linear`); operands
    ``{"x", "weight": PackedWeight, "bias"}``."""

    name: str
    spec: Any


mark_p = Primitive("qjax_mark")


def _value(y, *operands, info, treedef):
    del operands, info, treedef
    return y


mark_p.def_impl(_value)
mark_p.def_abstract_eval(_value)
mlir.register_lowering(mark_p, mlir.lower_fun(_value, multiple_results=False))


def mark(y: jax.Array, operands: Any, info) -> jax.Array:
    """``y`` as one ``qjax_mark`` equation carrying ``operands`` (a pytree) and ``info``.

    >>> import jax.numpy as jnp
    >>> y = jnp.ones(2)
    >>> bool((mark(y, {"x": y}, None) == y).all())
    True
    """
    leaves, treedef = jax.tree_util.tree_flatten(operands)
    return mark_p.bind(y, *leaves, info=info, treedef=treedef)
