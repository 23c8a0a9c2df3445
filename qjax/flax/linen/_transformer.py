"""Hooks for the ``flax.linen`` layers transformers are written with (fake-quant / QAT).

``nn.DenseGeneral`` (and so ``nn.MultiHeadDotProductAttention``'s projections) takes
:class:`~qjax.flax.linen.QuantDotGeneral` with ``out_ndim``. ``nn.Einsum`` calls
``jnp.einsum`` itself, with no hook attribute around it: :class:`~qjax.flax.linen.QuantRules`
runs an hooked ``nn.Einsum``'s call itself (:func:`einsum_call`: flax's parameters and
bias, the einsum in :class:`QuantEinsum`). ``nn.Embed`` has no ``dot_general``: it
passes its table through the ``promote_dtype`` attribute, where :class:`QuantEmbed`
goes. The numbers are NNX's :class:`~qjax.flax.nnx.QuantEinsum` /
:class:`~qjax.flax.nnx.QuantEmbed`'s, and ``qjax.convert`` serves both as NNX's: the
einsum as an int8 layer when it contracts the input with the kernel, an ``nn.Embed``
lookup from the table's int8 codes (``attend`` stays float).
"""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax.numpy as jnp
from flax.linen.dtypes import promote_dtype
from flax.linen.module import merge_param

from .. import _core, _table
from .._config import Mode, QuantConfig, as_mode
from .._paths import join_path
from ._layers import (
    _check_config,
    _hook_operands,
    _hook_value,
    _refuse_output_quant,
    _stats_variable,
    _store,
    _switches,
)


class QuantEinsum(nn.Module):
    """The einsum of a hooked ``nn.Einsum``: input and kernel fake-quantized, the kernel
    per channel along its axes that appear in the result of ``einsum_str`` (flattened),
    as NNX's :class:`~qjax.flax.nnx.QuantEinsum`::

        y = jnp.einsum(einsum_str, fq_in(x), fq_w(kernel))

    With ``QuantConfig(scheme=...)`` in FROZEN the value is the int8 layer's
    ``f32(acc)·f32(s_x·s_w)`` (:func:`qjax.flax._intsim.hook_override`), which
    ``qjax.convert`` serves in int8. :func:`einsum_call` (what
    :class:`~qjax.flax.linen.QuantRules` runs for an ``nn.Einsum``) makes the layer's
    parameters as flax does and adds the bias after this.

    >>> import jax, jax.numpy as jnp
    >>> from qjax.flax import qjax_recommended
    >>> hook = QuantEinsum(config=qjax_recommended(), einsum_str="bd,dh->bh")
    >>> v = hook.init(jax.random.key(0), jnp.ones((2, 3)), jnp.ones((3, 4)))
    >>> v["quant_stats"]["stats"].weight.min_val.shape
    (4,)
    """

    config: QuantConfig
    einsum_str: str
    mode: Mode = Mode.QAT
    observe: bool = True
    fake_quant: bool = True
    input_shape: Sequence[int] | None = None

    @nn.compact
    def __call__(self, inputs, kernel, *, precision=None, preferred_element_type=None):
        view = _core.einsum_kernel_view(self.einsum_str, kernel.shape, join_path(self.path))
        x, w, st = _hook_operands(self, inputs, kernel, view)
        y = jnp.einsum(
            self.einsum_str,
            x,
            w,
            precision=precision,
            preferred_element_type=preferred_element_type,
        )
        kw = {"subscripts": self.einsum_str}
        return _hook_value(self, y, inputs, kernel, st, "einsum", kw, "flax.linen.Einsum")


def einsum_call(m: nn.Einsum, hook, inputs, einsum_str=None):
    """``nn.Einsum.__call__`` (flax 0.12) with the einsum computed by ``hook(einsum_str)``,
    a :class:`QuantEinsum` factory: the same checks, parameters (``kernel``, ``bias``),
    dtype promotion and bias add as flax; called in ``m``'s scope by an interceptor."""
    einsum_str = merge_param("einsum_str", m.einsum_str, einsum_str).replace(" ", "")
    if "->" not in einsum_str:
        raise ValueError('`einsum_str` equation must be explicit and include "->".')
    if einsum_str.count(",") != 1:
        raise ValueError(
            "`einsum_str` equation must have exactly two operands and therefore, exactly one "
            f"comma character, instead of {einsum_str.count(',')}"
        )
    kernel = m.param("kernel", m.kernel_init, m.shape, m.param_dtype)
    bias = None
    if m.use_bias:
        bias_shape, broadcasted_bias_shape = m._get_bias_shape(einsum_str, inputs, kernel)
        bias = m.param("bias", m.bias_init, bias_shape, m.param_dtype)
    inputs, kernel, bias = m.promote_dtype(inputs, kernel, bias, dtype=m.dtype)
    y = hook(einsum_str)(
        inputs, kernel, precision=m.precision, preferred_element_type=m.preferred_element_type
    )
    if bias is not None:
        y += jnp.reshape(bias, broadcasted_bias_shape)
    return y


class QuantEmbed(nn.Module):
    """A ``promote_dtype`` hook for ``nn.Embed``: weight-only fake-quant of the table
    (the last array ``nn.Embed.__call__`` / ``attend`` promote), one scale per row
    (embedding vector) or per tensor, as NNX's :class:`~qjax.flax.nnx.QuantEmbed`::

        table_q = fake_quant(table, qparams(observer(table)));  Embed(ids) = table_q[ids]

    ``nn.Embed`` builds its table in ``setup``, so :class:`~qjax.flax.linen.QuantRules`
    attaches this hook there (as ``QuantEmbed_0``) and hands it to ``__call__`` /
    ``attend``.

    >>> import jax, jax.numpy as jnp
    >>> from qjax.flax import qjax_recommended
    >>> from qjax.flax.linen import QuantRules
    >>> model = nn.Sequential([nn.Embed(10, 4)])
    >>> with QuantRules([("layers_0", qjax_recommended())]):
    ...     v = model.init(jax.random.key(0), jnp.array([1, 2]))
    >>> v["quant_stats"]["layers_0"]["QuantEmbed_0"]["stats"].weight.min_val.shape
    (10,)
    """

    config: QuantConfig
    table_shape: Sequence[int]
    mode: Mode = Mode.QAT
    observe: bool = True
    fake_quant: bool = True

    @nn.compact
    def __call__(self, *args, dtype=None, inexact=True):
        _check_config(self, self.config)
        _refuse_output_quant(self, self.config)
        mode = as_mode(self.mode)
        out = list(promote_dtype(*args, dtype=dtype, inexact=inexact))
        shape = tuple(self.table_shape)
        view = _core.embed_view(shape)
        name = join_path(self.path)
        if tuple(out[-1].shape) != shape:
            raise ValueError(
                f"{name}: promote_dtype got a last array of shape {out[-1].shape}, not the "
                f"embedding table {shape}"
            )
        var = _stats_variable(
            self,
            lambda: _core.LayerStats(weight=_core.init_layer_stats(self.config, view.shape).weight),
        )
        table = out[-1]
        out[-1], w = _core.quantize_weight(
            table,
            var.value.weight,
            self.config,
            mode,
            _switches(self),
            name=name,
            require_stats=not self.is_initializing(),
            kernel_view=view,
        )
        _store(self, var, var.value._replace(weight=w), mode, self.observe)
        out[-1] = _table.table_mark(out[-1], table, w, self.config, mode, self.fake_quant, name)
        return out
