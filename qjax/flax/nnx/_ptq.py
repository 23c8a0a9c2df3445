"""Post-training quantized ``flax.nnx`` linear layers: quantized weights, no observers.

- :class:`DynamicQuantLinear`: int8 weights, activations quantized per call from their
  own range, int8 engine (PyTorch's ``quantize_dynamic``; :mod:`qjax.flax._ptq`).
- :class:`WeightOnlyLinear`: int8 or packed int4 weights (per-channel or per-group
  scales), ``x @ dequantize(w)`` in float.

Same numbers as the Linen layers of :mod:`qjax.flax.linen._ptq` from the same weights.
Quantized weights are :class:`QuantWeight` variables: not parameters (the optimizer
never sees them) and not statistics.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from .. import _ptq


class QuantWeight(nnx.Variable):
    """Quantized (frozen) weights: integer codes, scales, float bias of a PTQ layer."""


class DynamicQuantLinear(nnx.Module):
    """Dynamically quantized linear layer (torch ``quantize_dynamic`` for ``Linear``).

    Built from a float ``(in, out)`` kernel (and bias): the kernel is quantized once with
    ``weight_spec``/``compat`` (default int8 symmetric per output channel, torch's
    ``/127.5`` rule); each call quantizes ``x`` from its own min/max, per tensor or per
    token (:func:`qjax.flax._ptq.dynamic_linear`), and runs an int8 x int8 -> int32 dot.
    ``recipe="torchao"`` with ``act_spec=TORCHAO_ACTIVATION, act_compat="torch"`` computes
    torchao's ``Int8DynamicActivationInt8WeightConfig`` bit for bit.
    :meth:`from_linear` converts an ``nnx.Linear`` or :class:`~qjax.flax.nnx.QuantLinear`.

    >>> layer = DynamicQuantLinear(jnp.array([[1.0, -1.0], [0.5, 0.0]]), jnp.zeros(2))
    >>> layer(jnp.array([[2.0, 1.0]]))
    Array([[ 2.4980702, -1.992157 ]], dtype=float32)
    """

    def __init__(
        self,
        kernel: jax.Array,
        bias: jax.Array | None = None,
        *,
        weight_spec=_ptq.DYNAMIC_WEIGHT,
        compat="torch",
        act_spec=_ptq.DYNAMIC_ACTIVATION,
        act_compat="torch_fused",
        recipe="fbgemm",
        accumulate="exact",
        name: str = "DynamicQuantLinear",
    ):
        pw = _ptq.prepare_dynamic_weight(kernel, weight_spec, compat, name=name)
        self.weight = QuantWeight(pw)
        self.bias = nnx.data(None if bias is None else QuantWeight(jnp.asarray(bias, jnp.float32)))
        self.act_spec = act_spec
        self.act_compat = act_compat
        self.recipe = recipe
        self.accumulate = accumulate

    @classmethod
    def from_linear(cls, linear, **kwargs) -> DynamicQuantLinear:
        """From a trained ``nnx.Linear`` (or anything with ``kernel`` and ``bias``)."""
        bias = None if getattr(linear, "bias", None) is None else linear.bias[...]
        return cls(linear.kernel[...], bias, **kwargs)

    def __call__(self, x):
        bias = None if self.bias is None else self.bias[...]
        return _ptq.dynamic_linear(
            x,
            self.weight.get_value(),
            bias,
            act_spec=self.act_spec,
            compat=self.act_compat,
            recipe=self.recipe,
            accumulate=self.accumulate,
        )


class WeightOnlyLinear(nnx.Module):
    """Linear layer with weight-only quantized storage: int8 codes, or int4 codes packed
    two per byte (:func:`~qjax.flax._ptq.pack_int4`), plus scales (per output channel,
    or per group of ``in`` rows with a per-group ``spec``); computes
    ``x @ dequantize(w) + b`` in float. ``nbytes`` is the stored weight size.

    >>> k = jnp.ones((8, 4))
    >>> layer = WeightOnlyLinear(k)                      # int4 per channel
    >>> layer.nbytes, k.nbytes                           # 16 B codes + 32 B qparams
    (48, 128)
    >>> layer(jnp.ones((1, 8)))
    Array([[8., 8., 8., 8.]], dtype=float32)
    """

    def __init__(
        self,
        kernel: jax.Array,
        bias: jax.Array | None = None,
        *,
        spec=_ptq.INT4_WEIGHT,
        compat="qjax",
        name: str = "WeightOnlyLinear",
    ):
        self.weight = QuantWeight(_ptq.pack_weight(kernel, spec, compat, name=name))
        self.bias = nnx.data(None if bias is None else QuantWeight(jnp.asarray(bias, jnp.float32)))
        self.spec = spec
        self.name = name

    @classmethod
    def from_linear(cls, linear, **kwargs) -> WeightOnlyLinear:
        """From a trained ``nnx.Linear`` (or anything with ``kernel`` and ``bias``)."""
        bias = None if getattr(linear, "bias", None) is None else linear.bias[...]
        return cls(linear.kernel[...], bias, **kwargs)

    @property
    def nbytes(self) -> int:
        """Bytes of the stored weight (codes + scales + zero points), without the bias."""
        return self.weight.get_value().nbytes

    def __call__(self, x):
        bias = None if self.bias is None else self.bias[...]
        return _ptq.weight_only_linear(x, self.weight.get_value(), self.spec, bias, name=self.name)
