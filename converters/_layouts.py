"""PyTorch -> Flax weight layouts: one declarative table, one transpose.

=============  ==========================================  ==================
layout         PyTorch -> Flax                              axes permutation
=============  ==========================================  ==================
``none``       unchanged (biases, BN parameters, stats)     identity
``linear``     ``[out, in] -> [in, out]``                   ``(1, 0)``
``conv1d``     ``[out, in, k] -> [k, in, out]``             ``(2, 1, 0)``
``conv2d``     ``[out, in, kh, kw] -> [kh, kw, in, out]``   ``(2, 3, 1, 0)``
``conv3d``     ``[out, in, kd, kh, kw] ->                   ``(2, 3, 4, 1, 0)``
               [kd, kh, kw, in, out]``
=============  ==========================================  ==================

A per-channel quantized weight keeps its channel: PyTorch's ``ch_axis=0`` (``out``)
becomes the Flax kernel's last axis (``-1``).
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

__all__ = ["LAYOUTS", "Layout", "conv_layout", "flip_axis", "get_layout", "to_flax"]


class Layout(NamedTuple):
    """A named layout flip: ``flax = transpose(torch, perm)`` (``perm=None``: unchanged)."""

    name: str
    rule: str
    perm: tuple[int, ...] | None


LAYOUTS: dict[str, Layout] = {
    "none": Layout("none", "unchanged", None),
    "linear": Layout("linear", "[out, in] -> [in, out]", (1, 0)),
    "conv1d": Layout("conv1d", "[out, in, k] -> [k, in, out]", (2, 1, 0)),
    "conv2d": Layout("conv2d", "[out, in, kh, kw] -> [kh, kw, in, out]", (2, 3, 1, 0)),
    "conv3d": Layout("conv3d", "[out, in, kd, kh, kw] -> [kd, kh, kw, in, out]", (2, 3, 4, 1, 0)),
}


def get_layout(name) -> Layout:
    """The :class:`Layout` called ``name``; ``ValueError`` listing the known ones.

    >>> get_layout("conv2d").rule
    '[out, in, kh, kw] -> [kh, kw, in, out]'
    """
    if isinstance(name, Layout):
        return name
    if name not in LAYOUTS:
        raise ValueError(f"unknown layout {name!r}; known layouts: {sorted(LAYOUTS)}")
    return LAYOUTS[name]


def conv_layout(ndim: int, where: str) -> Layout:
    """The conv layout for a PyTorch conv weight of ``ndim`` dimensions (3, 4 or 5).

    >>> conv_layout(4, "conv").name
    'conv2d'
    """
    names = {3: "conv1d", 4: "conv2d", 5: "conv3d"}
    if ndim not in names:
        raise ValueError(f"{where}: a conv weight has 3-5 dimensions, got {ndim}")
    return LAYOUTS[names[ndim]]


def to_flax(x: np.ndarray, layout, where: str) -> np.ndarray:
    """``x`` (PyTorch layout) in the Flax layout: ``np.transpose(x, layout.perm)``.

    Raises ``ValueError`` naming ``where`` when the rank does not fit the layout.

    >>> to_flax(np.zeros((4, 3, 2, 2)), "conv2d", "conv.weight").shape
    (2, 2, 3, 4)
    >>> to_flax(np.zeros((4, 3)), "conv2d", "fc.weight")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
      ...
    ValueError: fc.weight: layout conv2d (...) needs a 4-D tensor, got shape (4, 3)
    """
    lay = get_layout(layout)
    x = np.asarray(x)
    if lay.perm is None:
        return x
    if x.ndim != len(lay.perm):
        raise ValueError(
            f"{where}: layout {lay.name} ({lay.rule}) needs a {len(lay.perm)}-D tensor, got "
            f"shape {tuple(x.shape)}"
        )
    return np.ascontiguousarray(np.transpose(x, lay.perm))


def flip_axis(axis: int, ndim: int, layout) -> int:
    """Where PyTorch axis ``axis`` of an ``ndim``-D tensor goes under ``layout``, as a
    negative index (so ``out`` of a linear or conv weight is ``-1``).

    >>> flip_axis(0, 2, "linear"), flip_axis(0, 4, "conv2d"), flip_axis(0, 1, "none")
    (-1, -1, -1)
    """
    lay = get_layout(layout)
    axis = axis % ndim
    new = axis if lay.perm is None else lay.perm.index(axis)
    return new - ndim
