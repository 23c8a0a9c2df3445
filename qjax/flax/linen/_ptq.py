"""Post-training quantized ``flax.linen`` dense layers: quantized weights, no observers.

- :class:`DynamicQuantDense` / :class:`WeightOnlyDense`: quantized weights live in the
  ``quantized`` collection (:data:`QUANTIZED`, not ``params``); :func:`dynamic_variables`
  / :func:`weight_only_variables` build that collection from a trained float kernel.

Same numbers as :mod:`qjax.flax.nnx._ptq` from the same weights.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from .. import _ptq
from .._paths import join_path

QUANTIZED = "quantized"


def dynamic_variables(kernel, bias=None, *, weight_spec=_ptq.DYNAMIC_WEIGHT, compat="torch"):
    """The ``quantized`` collection entry of a :class:`DynamicQuantDense` from a float
    ``(in, out)`` kernel and bias: ``{"weight": PreparedLinear, "bias": bias}``.

    >>> sorted(dynamic_variables(jnp.ones((3, 2)), jnp.zeros(2)))
    ['bias', 'weight']
    """
    out = {"weight": _ptq.prepare_dynamic_weight(kernel, weight_spec, compat)}
    if bias is not None:
        out["bias"] = jnp.asarray(bias, jnp.float32)
    return out


def weight_only_variables(kernel, bias=None, *, spec=_ptq.INT4_WEIGHT, compat="qjax"):
    """The ``quantized`` collection entry of a :class:`WeightOnlyDense`:
    ``{"weight": PackedWeight, "bias": bias}``.

    >>> weight_only_variables(jnp.ones((4, 2)))["weight"].codes.shape
    (2, 2)
    """
    out = {"weight": _ptq.pack_weight(kernel, spec, compat)}
    if bias is not None:
        out["bias"] = jnp.asarray(bias, jnp.float32)
    return out


def _quantized_vars(module: nn.Module, init):
    """``quantized/weight`` and ``quantized/bias`` (``None`` without bias), made by one
    call of ``init`` when the model is initialised."""
    made = []

    def get(key):
        if not made:
            made.append(init())
        return made[0][key]

    w = module.variable(QUANTIZED, "weight", get, "weight").value
    b = module.variable(QUANTIZED, "bias", get, "bias").value if module.use_bias else None
    return w, b


class DynamicQuantDense(nn.Module):
    """Dynamically quantized ``nn.Dense`` (torch ``quantize_dynamic``), see
    :class:`qjax.flax.nnx.DynamicQuantLinear`. ``init`` quantizes a ``kernel_init``
    kernel; a trained one goes in with :func:`dynamic_variables`.

    >>> layer = DynamicQuantDense(2)
    >>> v = {QUANTIZED: dynamic_variables(jnp.array([[1.0, -1.0], [0.5, 0.0]]), jnp.zeros(2))}
    >>> layer.apply(v, jnp.array([[2.0, 1.0]]))
    Array([[ 2.4980702, -1.992157 ]], dtype=float32)
    """

    features: int
    use_bias: bool = True
    weight_spec: Any = _ptq.DYNAMIC_WEIGHT
    compat: str = "torch"
    act_spec: Any = _ptq.DYNAMIC_ACTIVATION
    act_compat: str = "torch_fused"
    recipe: str = "fbgemm"
    accumulate: str = "exact"
    kernel_init: Any = nn.initializers.lecun_normal()

    @nn.compact
    def __call__(self, x):
        def init():
            k = self.kernel_init(self.make_rng("params"), (x.shape[-1], self.features))
            b = jnp.zeros((self.features,), jnp.float32) if self.use_bias else None
            return dynamic_variables(k, b, weight_spec=self.weight_spec, compat=self.compat)

        w, b = _quantized_vars(self, init)
        return _ptq.dynamic_linear(
            x,
            w,
            b,
            act_spec=self.act_spec,
            compat=self.act_compat,
            recipe=self.recipe,
            accumulate=self.accumulate,
            name=join_path(self.path),
        )


class WeightOnlyDense(nn.Module):
    """``nn.Dense`` with int8 / packed int4 weight-only storage, see
    :class:`qjax.flax.nnx.WeightOnlyLinear`.

    >>> v = {QUANTIZED: weight_only_variables(jnp.ones((8, 4)))}
    >>> WeightOnlyDense(4, use_bias=False).apply(v, jnp.ones((1, 8)))
    Array([[8., 8., 8., 8.]], dtype=float32)
    """

    features: int
    use_bias: bool = True
    spec: Any = _ptq.INT4_WEIGHT
    compat: str = "qjax"
    kernel_init: Any = nn.initializers.lecun_normal()

    @nn.compact
    def __call__(self, x):
        def init():
            k = self.kernel_init(self.make_rng("params"), (x.shape[-1], self.features))
            b = jnp.zeros((self.features,), jnp.float32) if self.use_bias else None
            return weight_only_variables(k, b, spec=self.spec, compat=self.compat)

        w, b = _quantized_vars(self, init)
        return _ptq.weight_only_linear(x, w, self.spec, b, name=join_path(self.path))
