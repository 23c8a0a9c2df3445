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

__all__ = ["LayerMark", "QuantizeMark", "active", "mark", "mark_p", "recording"]


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
    kernel's output axes (a multi-axis ``LinearGeneral`` kernel). ``unsupported``: why
    the int8 kernels cannot run this layer (it then stays float). A layer without an
    output quantizer produces floats (``dequantize_accumulator``).
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
