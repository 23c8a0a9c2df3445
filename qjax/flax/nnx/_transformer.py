"""Hooks for the ``flax.nnx`` layers transformers are written with (fake-quant / QAT).

``nnx.LinearGeneral`` (and so ``nnx.MultiHeadAttention``'s query/key/value/out
projections) takes :class:`~qjax.flax.nnx.QuantDotGeneral` with ``out_ndim``; this
module adds the two layers that have no ``dot_general``:

- :class:`QuantEinsum` replaces ``nnx.Einsum.einsum_op`` (flax calls
  ``einsum_op(einsum_str, inputs, kernel, precision=..., out_sharding=...)``);
- :class:`QuantEmbed` replaces ``nnx.Embed.promote_dtype``, the one function both
  ``Embed.__call__`` (``promote_dtype((embedding,), ...)``) and ``Embed.attend``
  (``promote_dtype((query, embedding), ...)``) pass the table through: weight-only.

``qjax.convert`` serves ``LinearGeneral`` hooks (:class:`QuantDotGeneral`) and Einsum
hooks whose equation is a contraction with the kernel (:func:`qjax.flax._intsim.
einsum_layout`) in int8 (with ``QuantConfig(scheme=...)`` the frozen forward computes
the int8 value itself); other equations stay float, listed with the reason in
``program.float_ops``. An ``Embed`` lookup is served as a gather of the table's int8
codes, then a dequantize (the same floats as the gather of the fake-quantized table);
``attend`` stays a float dot on the dequantized table.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax.numpy as jnp
from flax.nnx.nn import dtypes

from .. import _core, _table
from .._config import Mode, QuantConfig
from ._layers import _QuantModule, _refuse_output_quant


class QuantEinsum(_QuantModule):
    """An ``einsum_op`` hook for ``nnx.Einsum``: input and kernel fake-quantized.

    ``y = jnp.einsum(eq, fq_in(x), fq_w(kernel))`` where ``fq_w`` quantizes the kernel
    per channel along its axes that appear in the result (flattened; one scale per
    tensor if the weight spec is per-tensor), as :func:`~qjax.flax._core.einsum_kernel_view`.
    With ``config.scheme`` (QAT / FROZEN) the value is the int8 linear's
    ``f32(acc)·f32(s_x·s_w)`` (:func:`~qjax.flax._intsim.einsum_layout`), the gradient
    the float einsum's; an equation that is no such contraction keeps the float value.

    Args:
      config: a :class:`~qjax.flax.QuantConfig` with ``quantize_output=False``.
      kernel_shape: the layer's kernel shape.
      einsum_str: the layer's equation (a call with another equation must give the
        weight statistics the same shape).
      input_shape: an example input shape, needed only for per-axis activation specs.
      mode: initial :class:`~qjax.flax.Mode`.

    >>> from flax import nnx
    >>> from qjax.flax import qjax_recommended
    >>> hook = QuantEinsum(qjax_recommended(), (3, 2, 4), "bd,dnh->bnh")
    >>> layer = nnx.Einsum("bd,dnh->bnh", (3, 2, 4), einsum_op=hook, rngs=nnx.Rngs(0))
    >>> layer(jnp.ones((5, 3))).shape, hook.quant_stats.get_value().weight.min_val.shape
    ((5, 2, 4), (8,))
    """

    def __init__(
        self,
        config: QuantConfig,
        kernel_shape: Sequence[int],
        einsum_str: str,
        *,
        input_shape: Sequence[int] | None = None,
        mode: Mode = Mode.QAT,
        name: str = "QuantEinsum",
    ):
        _refuse_output_quant(config, name)
        view = _core.einsum_kernel_view(einsum_str, kernel_shape, name)
        self.view_shape = view.shape
        stats = _core.init_layer_stats(config, view.shape, input_shape=input_shape)
        self._setup(config, mode, stats, name)

    def __call__(self, subscripts, lhs, rhs, *, precision=None, **einsum_kwargs):
        view = _core.einsum_kernel_view(subscripts, rhs.shape, self.name)
        if view.shape != self.view_shape:
            raise ValueError(
                f"{self.name}: einsum {subscripts!r} sees the kernel as a {view.shape} "
                f"(contracted, output) matrix; the weight statistics were made for "
                f"{self.view_shape} (the layer's einsum_str)"
            )
        x, w = self._hook_operands(lhs, rhs, view)
        y = jnp.einsum(subscripts, x, w, precision=precision, **einsum_kwargs)
        kw = {"subscripts": subscripts}
        return self._hook_value(y, lhs, rhs, "einsum", kw, "flax.nnx.Einsum")


class QuantEmbed(_QuantModule):
    """A ``promote_dtype`` hook for ``nnx.Embed``: weight-only fake-quant of the table.

    ``nnx.Embed`` passes its table through ``promote_dtype`` in ``__call__`` and
    ``attend``; this hook promotes as flax does, then fake-quantizes the table (the
    last array) with the weight quantizer, one scale per row (embedding vector) for a
    per-channel spec, or per tensor::

        table_q = fake_quant(table, qparams(observer(table)))   # rows = output channels
        Embed(ids) = table_q[ids];   Embed.attend(q) = q @ table_q.T

    The input (token ids, or ``attend``'s query) is not quantized: the statistics have
    no ``input`` entry whatever ``config.quantize_input`` says.

    >>> from flax import nnx
    >>> from qjax.flax import qjax_recommended
    >>> hook = QuantEmbed(qjax_recommended(), (10, 4))
    >>> emb = nnx.Embed(10, 4, promote_dtype=hook, rngs=nnx.Rngs(0))
    >>> emb(jnp.array([1, 2])).shape, hook.quant_stats.get_value().weight.min_val.shape
    ((2, 4), (10,))
    >>> emb.attend(jnp.ones((3, 4))).shape, int(hook.quant_stats.get_value().weight.count)
    ((3, 10), 2)
    """

    def __init__(
        self,
        config: QuantConfig,
        table_shape: Sequence[int],
        *,
        mode: Mode = Mode.QAT,
        name: str = "QuantEmbed",
    ):
        _refuse_output_quant(config, name)
        if isinstance(config, QuantConfig) and config.weight is None:
            raise ValueError(f"{name}: config.weight is None; nothing to quantize")
        self.table_shape = tuple(int(d) for d in table_shape)
        stats = _core.init_layer_stats(config, _core.embed_view(self.table_shape).shape)
        self._setup(config, mode, _core.LayerStats(weight=stats.weight), name)

    def __call__(self, args, /, *, dtype=None, inexact=True):
        out = list(dtypes.promote_dtype(args, dtype=dtype, inexact=inexact))
        st = self.quant_stats.get_value()
        if tuple(out[-1].shape) != self.table_shape:
            raise ValueError(
                f"{self.name}: promote_dtype got a last array of shape {out[-1].shape}, not "
                f"the embedding table {self.table_shape}"
            )
        table = out[-1]
        out[-1], w = _core.quantize_weight(
            table,
            st.weight,
            self.config,
            self.mode,
            self.switches,
            name=self.name,
            kernel_view=_core.embed_view(self.table_shape),
        )
        self.quant_stats.set_value(st._replace(weight=w))
        out[-1] = _table.table_mark(
            out[-1], table, w, self.config, self.mode, self.fake_quant, self.name
        )
        return tuple(out)
