"""Pooling and flatten layers for NNX and Linen (in a ``Sequential`` or any model).

They compute in float (``flax.linen.max_pool``; the window sum over the window size; a
reshape). :func:`qjax.convert` traces them like any op: max pooling and flatten commute
with dequantization (``dequantize`` is monotone), so on per-tensor codes they run on the
integer values (the same op) and serve exactly the trained values; average pooling runs
as the model computes it, the float mean of the dequantized codes (a float step, listed
in ``program.float_ops``), up to the next quantizer. Channels-last 2-D input
``(N, H, W, C)``; padding ``"VALID"`` or ``((p, p), (p, p))``.

(torch's quantized ``avg_pool2d`` rounds the mean of the codes instead:
:func:`qjax.kernels.avg_pool2d`, which imported torch programs use.)
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import flax.linen as nn
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax import lax

__all__ = ["AvgPool", "Flatten", "LinenAvgPool", "LinenFlatten", "LinenMaxPool", "MaxPool"]


def _pool_args(window, strides, padding):
    window = tuple(window)
    strides = window if strides is None else tuple(strides)
    if not isinstance(padding, str):
        padding = tuple(tuple(int(v) for v in p) for p in padding)
    return window, strides, padding


def _float_pool(kind, x, window, strides, padding):
    if kind == "max":
        return nn.max_pool(x, window, strides=strides, padding=padding)
    # flax's avg_pool divides by an int32 count (not strict-promotion clean): same sum,
    # padding counted, divided by the float32 window size. A numpy zero (concrete) makes
    # it the reduce_window_sum primitive, which a saved program may run (a traced jnp zero
    # gives the generic reduce_window, whose reducer is a function)
    total = nn.pool(x, np.asarray(0, x.dtype), lax.add, window, strides, padding)
    return total / jnp.asarray(math.prod(window), x.dtype)


class _PoolMixin:
    kind = "max"

    def _pool(self, x):
        return _float_pool(self.kind, x, self.window_shape, self.strides, self.padding)


class MaxPool(nnx.Module, _PoolMixin):
    """2-D max pooling over ``(N, H, W, C)`` (``flax.linen.max_pool``).

    >>> import jax.numpy as jnp
    >>> MaxPool((2, 2))(jnp.arange(16.0).reshape(1, 4, 4, 1))[0, :, :, 0]
    Array([[ 5.,  7.],
           [13., 15.]], dtype=float32)
    """

    kind = "max"

    def __init__(self, window_shape: Sequence[int], strides=None, padding="VALID"):
        self.window_shape, self.strides, self.padding = _pool_args(window_shape, strides, padding)

    def __call__(self, x):
        return self._pool(x)


class AvgPool(MaxPool):
    """2-D average pooling over ``(N, H, W, C)`` (``flax.linen.avg_pool``, padding
    counted); served by the integer kernel (within a rounding step, module docstring).

    >>> import jax.numpy as jnp
    >>> AvgPool((2, 2))(jnp.arange(16.0).reshape(1, 4, 4, 1))[0, :, :, 0]
    Array([[ 2.5,  4.5],
           [10.5, 12.5]], dtype=float32)
    """

    kind = "avg"


class Flatten(nnx.Module):
    """``x.reshape(N, -1)`` (channels-last order, as ``flax`` CNN examples flatten).

    >>> import jax.numpy as jnp
    >>> Flatten()(jnp.zeros((2, 3, 3, 4))).shape
    (2, 36)
    """

    def __call__(self, x):
        return x.reshape(x.shape[0], -1)


class LinenMaxPool(nn.Module, _PoolMixin):
    """Linen :class:`MaxPool` (exported as ``qjax.flax.linen.MaxPool``).

    >>> import jax, jax.numpy as jnp
    >>> LinenMaxPool((2, 2)).apply({}, jnp.ones((1, 4, 4, 1))).shape
    (1, 2, 2, 1)
    """

    window_shape: Sequence[int]
    strides: Sequence[int] | None = None
    padding: str | Sequence = "VALID"
    kind = "max"

    def __call__(self, x):
        window, strides, padding = _pool_args(self.window_shape, self.strides, self.padding)
        return _float_pool(self.kind, x, window, strides, padding)


class LinenAvgPool(LinenMaxPool):
    """Linen :class:`AvgPool` (exported as ``qjax.flax.linen.AvgPool``).

    >>> import jax, jax.numpy as jnp
    >>> float(LinenAvgPool((2, 2)).apply({}, jnp.ones((1, 4, 4, 1))).mean())
    1.0
    """

    kind = "avg"


class LinenFlatten(nn.Module):
    """Linen :class:`Flatten` (exported as ``qjax.flax.linen.Flatten``).

    >>> import jax, jax.numpy as jnp
    >>> LinenFlatten().apply({}, jnp.zeros((2, 3, 3, 4))).shape
    (2, 36)
    """

    def __call__(self, x):
        return x.reshape(x.shape[0], -1)
