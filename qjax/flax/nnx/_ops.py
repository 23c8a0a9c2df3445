"""Quantized ``flax.nnx`` tensor ops: :class:`QuantAdd` and :class:`QuantCat`, one
observer and fake-quant on the result (PyTorch's ``FloatFunctional`` under QAT).
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp

from .._config import Mode
from ._layers import ActQuant


class QuantAdd(ActQuant):
    """``a + b`` with one observer and fake-quant on the sum (torch
    ``FloatFunctional.add`` under QAT): :class:`~qjax.flax.nnx.ActQuant` of the sum.

    >>> from qjax.flax import Mode, qjax_recommended
    >>> add = QuantAdd(qjax_recommended(), mode=Mode.CALIBRATE)
    >>> _ = add(jnp.array([1.0, -2.0]), jnp.array([0.5, 0.5]))
    >>> float(add.quant_stats.get_value().min_val)
    -1.5
    """

    def __init__(self, config, *, mode=Mode.QAT, name="QuantAdd"):
        super().__init__(config, mode=mode, name=name)

    def __call__(self, a, b):
        return super().__call__(jnp.add(a, b))


class QuantCat(ActQuant):
    """``concatenate(xs, axis)`` with one observer and fake-quant on the result (torch
    ``FloatFunctional.cat`` under QAT), so every input ends up on one output range.

    >>> from qjax.flax import Mode, qjax_recommended
    >>> cat = QuantCat(qjax_recommended(), mode=Mode.CALIBRATE)
    >>> cat([jnp.zeros((1, 2)), jnp.ones((1, 3))], axis=-1).shape
    (1, 5)
    """

    def __init__(self, config, *, mode=Mode.QAT, name="QuantCat"):
        super().__init__(config, mode=mode, name=name)

    def __call__(self, xs: Sequence[jax.Array], axis: int = -1):
        xs = list(xs)
        if not xs:
            raise ValueError(f"{self.name}: nothing to concatenate")
        return super().__call__(jnp.concatenate(xs, axis=axis))
