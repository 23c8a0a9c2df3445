"""Prepared weights as pytrees: one registration for :class:`PreparedLinear` and
:class:`PreparedConv`.

A prepared weight (:mod:`qjax.kernels._linear`, :mod:`qjax.kernels._conv`) is a frozen
dataclass with array leaves (the weight and its precomputed sums), static fields (name,
geometry, overflow bound) and the ``kernel`` it was packed for, plus a ``packed`` leaf
for the kernels that pack the weight. :func:`register_prepared` writes the pytree
methods and the ``jax.export`` serialization once, from the field names.

Pytree layout, which saved ``jax.export`` programs depend on (keep it): children are the
leaves in order, then ``packed`` when the kernel has one (every native kernel; a
``"sat16"`` conv has it since 2026-12 and is read back without it from older trees),
then the five ``epilogue`` vectors when the requantization is folded in
(:func:`qjax.kernels.fold_requant`); aux
data is the static fields in order, then ``kernel`` unless it is ``"xla"`` (so the XLA
kernel keeps the aux of the versions before native kernels existed), then the fold key
``folded`` when folded (a native kernel, so ``kernel`` is there), serialized as a JSON
list. Before the fold key, a ``"sat16"`` weight of a class with a ``sat16_max_x`` field
(:class:`~qjax.kernels.PreparedLinear`) has it: the largest uint8 activation code for
which its pair sums cannot saturate (absent: 128, which holds for every int8 weight).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Literal

import jax
import numpy as np

__all__ = ["Kernel", "register_prepared"]


def _key(v):
    """A fold key back from JSON (lists) as the hashable tuple it was."""
    return tuple(_key(a) for a in v) if isinstance(v, (list, tuple)) else v


# The uint8 activation codes up to which no int16 pair sum of any int8 weight saturates
# (|w_a| + |w_b| <= 256 and w_a + w_b <= 254): a "sat16" weight's ``sat16_max_x`` at least.
SAT16_SAFE_X = 128


def sat16_exact_codes(x_spec) -> int | None:
    """The largest uint8 code the exact path feeds the sat16 kernel for activations of
    ``x_spec``: ``qmax`` for unsigned codes, ``qmax + 128`` for signed ones (shifted up by
    128, as for oneDNN); ``None`` when they are not 8-bit.

    >>> from qjax import QuantSpec
    >>> sat16_exact_codes(QuantSpec(signed=False, quant_min=0, quant_max=127))
    127
    """
    if np.dtype(x_spec.dtype) == np.uint8:
        return int(x_spec.qmax)
    if np.dtype(x_spec.dtype) == np.int8:
        return int(x_spec.qmax) + 128
    return None


def sat16_exact(x_spec, max_x: int) -> bool:
    """Whether the sat16 kernel computes the exact ``Σ x·w`` for activations of ``x_spec``
    and a weight whose pair sums are exact up to code ``max_x``
    (:func:`~qjax.kernels._accumulate.sat16_exact_max_x`): the largest code they feed it
    (:func:`sat16_exact_codes`) is at most ``max_x``.

    >>> from qjax import QuantSpec
    >>> sat16_exact(QuantSpec(signed=False, reduce_range=True), 128)
    True
    >>> sat16_exact(QuantSpec(signed=False), 128)
    False
    """
    hi = sat16_exact_codes(x_spec)
    return hi is not None and hi <= max_x


def sat16_widened(x_spec, max_x: int, accumulate: str) -> bool:
    """Whether a call on a ``"sat16"`` weight runs the kernel's exact (widened) mode: exact
    accumulation where its saturating instructions are not provably exact
    (:func:`sat16_exact`).

    >>> from qjax import QuantSpec
    >>> sat16_widened(QuantSpec(signed=False), 128, "exact")
    True
    >>> sat16_widened(QuantSpec(signed=False), 128, "fbgemm_sat16")
    False
    """
    return accumulate == "exact" and not sat16_exact(x_spec, max_x)


Kernel = Literal["xla", "amx", "sat16", "onednn"]
_KERNELS = ("xla", "amx", "sat16", "onednn")


def register_prepared(
    *,
    leaves: tuple[str, ...],
    static: tuple[str, ...],
    packed_when: Callable[[str], bool],
    serialized_name: str,
):
    """Class decorator: register a prepared-weight dataclass as a pytree with keys and
    for ``jax.export`` serialization under ``serialized_name``.

    Args:
      leaves: the array fields, in child order.
      static: the static fields, in aux order (``kernel`` follows unless ``"xla"``).
      packed_when: ``packed_when(kernel)`` says whether the ``packed`` field is a child
        (unflattening counts the children: older trees may lack it).
      serialized_name: the name ``jax.export`` records for the node type.

    The class gets ``tree_flatten_with_keys``, ``tree_flatten`` and ``tree_unflatten``.
    """
    n_leaves, n_static = len(leaves), len(static)

    def wrap(cls):
        def _aux(self):
            aux = tuple(getattr(self, f) for f in static)
            aux = aux + (self.kernel,) if self.kernel != "xla" else aux
            if self.kernel == "sat16" and hasattr(self, "sat16_max_x"):
                aux = aux + (self.sat16_max_x,)
            return aux + (self.folded,) if self.folded is not None else aux

        def tree_flatten_with_keys(self):
            ga = jax.tree_util.GetAttrKey
            kids = tuple((ga(f), getattr(self, f)) for f in leaves)
            if packed_when(self.kernel):
                kids += ((ga("packed"), self.packed),)
            if self.folded is not None:
                kids += ((ga("epilogue"), self.epilogue),)
            return kids, self._aux()

        def tree_flatten(self):
            kids = tuple(getattr(self, f) for f in leaves)
            kids = kids + (self.packed,) if packed_when(self.kernel) else kids
            return (kids + (self.epilogue,) if self.folded is not None else kids), self._aux()

        def tree_unflatten(cls, aux, children):
            obj = object.__new__(cls)
            for f, v in zip(leaves, children[:n_leaves], strict=True):
                object.__setattr__(obj, f, v)
            for f, v in zip(static, aux[:n_static], strict=True):
                object.__setattr__(obj, f, v)
            kernel = aux[n_static] if len(aux) > n_static else "xla"
            # after kernel: a sat16 linear weight's sat16_max_x, then the fold key
            tail = list(aux[n_static + 1 :])
            if "sat16_max_x" in cls.__dataclass_fields__:
                max_x = tail.pop(0) if kernel == "sat16" and tail else SAT16_SAFE_X
                object.__setattr__(obj, "sat16_max_x", max_x)
            folded = _key(tail[0]) if tail and tail[0] is not None else None
            rest = list(children[n_leaves:])
            # packed when one child more than the fold needs: a "sat16" conv tree saved
            # before its weight was packed at prepare time has none
            has_packed = len(rest) > (1 if folded else 0)
            object.__setattr__(obj, "packed", rest.pop(0) if has_packed else None)
            object.__setattr__(obj, "kernel", kernel)
            object.__setattr__(obj, "epilogue", rest.pop(0) if folded else None)
            object.__setattr__(obj, "folded", folded)
            return obj

        cls._aux = _aux
        cls.tree_flatten_with_keys = tree_flatten_with_keys
        cls.tree_flatten = tree_flatten
        cls.tree_unflatten = classmethod(tree_unflatten)
        jax.tree_util.register_pytree_with_keys_class(cls)
        jax.export.register_pytree_node_serialization(
            cls,
            serialized_name=serialized_name,
            serialize_auxdata=lambda aux: json.dumps(list(aux)).encode(),
            deserialize_auxdata=lambda data: tuple(json.loads(data.decode())),
        )
        return cls

    return wrap
