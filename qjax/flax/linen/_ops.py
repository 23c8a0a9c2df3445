"""Quantized ``flax.linen`` tensor ops: :class:`QuantAdd` and :class:`QuantCat`, one
observer and fake-quant on the result (PyTorch's ``FloatFunctional`` under QAT).
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp

from .._config import Mode
from .._paths import join_path
from ._layers import ActQuant


class QuantAdd(ActQuant):
    """``a + b`` with one observer and fake-quant on the sum (see
    :class:`qjax.flax.nnx.QuantAdd`); statistics in ``quant_stats/stats``.

    >>> import jax
    >>> from qjax.flax import Mode, qjax_recommended
    >>> add = QuantAdd(qjax_recommended(), mode=Mode.CALIBRATE)
    >>> a, b = jnp.array([1.0, -2.0]), jnp.array([0.5, 0.5])
    >>> _, upd = add.apply(add.init(jax.random.key(0), a, b), a, b, mutable=["quant_stats"])
    >>> float(upd["quant_stats"]["stats"].min_val)
    -1.5
    """

    def __call__(self, a, b, mode: Mode | None = None):
        return super().__call__(jnp.add(a, b), mode)


class QuantCat(ActQuant):
    """``concatenate(xs, axis)`` with one observer and fake-quant on the result (see
    :class:`qjax.flax.nnx.QuantCat`).

    >>> import jax
    >>> from qjax.flax import qjax_recommended
    >>> cat = QuantCat(qjax_recommended())
    >>> xs = [jnp.zeros((1, 2)), jnp.ones((1, 3))]
    >>> cat.apply(cat.init(jax.random.key(0), xs), xs, mutable=["quant_stats"])[0].shape
    (1, 5)
    """

    axis: int = -1

    def __call__(self, xs: Sequence[jax.Array], mode: Mode | None = None):
        xs = list(xs)
        if not xs:
            raise ValueError(f"{join_path(self.path)}: nothing to concatenate")
        return super().__call__(jnp.concatenate(xs, axis=self.axis), mode)
