"""Hooks for the ``flax.linen`` layers transformers are written with (fake-quant / QAT).

``nn.DenseGeneral`` (and so ``nn.MultiHeadDotProductAttention``'s projections) takes
:class:`~qjax.flax.linen.QuantDotGeneral` with ``out_ndim``. ``nn.Einsum`` calls
``jnp.einsum`` itself and ``nn.Embed`` has no ``dot_general``: both pass their operands
through the ``promote_dtype`` attribute first, which is where these hooks go (the same
numbers as NNX's :class:`~qjax.flax.nnx.QuantEinsum` / :class:`~qjax.flax.nnx.QuantEmbed`).
:class:`~qjax.flax.linen.QuantRules` installs them. ``qjax.convert`` serves an
``nn.Embed`` lookup from the table's int8 codes (as NNX's); ``nn.Einsum`` computes
``jnp.einsum`` itself after this hook, so its value is the float einsum of the
fake-quantized operands and it is served in float (``attend`` likewise).
"""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
from flax.linen.dtypes import promote_dtype

from .. import _core, _table
from .._config import Mode, QuantConfig, as_mode
from .._paths import join_path
from ._layers import (
    _check_config,
    _hook_operands,
    _refuse_output_quant,
    _stats_variable,
    _store,
    _switches,
)


class QuantEinsum(nn.Module):
    """A ``promote_dtype`` hook for ``nn.Einsum``: promotes ``(inputs, kernel, bias)``
    as flax does, then fake-quantizes the input (per the config) and the kernel, per
    channel along its axes that appear in the result of ``einsum_str`` (flattened), so
    ``nn.Einsum`` computes ``jnp.einsum(einsum_str, fq_in(x), fq_w(kernel)) + bias``.

    >>> import functools, jax, jax.numpy as jnp
    >>> from qjax.flax import qjax_recommended
    >>> hook = functools.partial(QuantEinsum, config=qjax_recommended(), einsum_str="bd,dh->bh")
    >>> layer = nn.Einsum((3, 4), "bd,dh->bh", promote_dtype=lambda *a, **k: hook()(*a, **k))
    >>> v = layer.init(jax.random.key(0), jnp.ones((2, 3)))
    >>> v["quant_stats"]["QuantEinsum_0"]["stats"].weight.min_val.shape
    (4,)
    """

    config: QuantConfig
    einsum_str: str
    mode: Mode = Mode.QAT
    observe: bool = True
    fake_quant: bool = True
    input_shape: Sequence[int] | None = None

    @nn.compact
    def __call__(self, *args, dtype=None, inexact=True):
        inputs, kernel, *rest = promote_dtype(*args, dtype=dtype, inexact=inexact)
        view = _core.einsum_kernel_view(self.einsum_str, kernel.shape, join_path(self.path))
        x, w, _ = _hook_operands(self, inputs, kernel, view)
        return [x, w, *rest]


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
