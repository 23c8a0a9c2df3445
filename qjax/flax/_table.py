"""Embedding tables in a converted program: the mark an ``Embed`` hook's table carries
(:func:`table_mark`) and its int8 codes (:func:`table_codes`), for the ``embed`` step of
:mod:`qjax.flax._lower`.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from .._qarray import QArray
from .._spec import QParams
from . import _record
from ._config import Mode, QuantConfig, as_mode
from ._intsim import fake_quant_codes

__all__ = ["table_codes", "table_mark"]


def table_mark(
    table_q: jax.Array, table: jax.Array, state: Any, config: QuantConfig, mode: Mode,
    fake_quant: bool, name: str,
) -> jax.Array:  # fmt: skip
    """An ``Embed`` hook's fake-quantized table ``table_q``, marked
    (:class:`~qjax.flax._record.TableMark`) while ``qjax.convert`` records, so a lookup
    is served from the int8 codes (:func:`table_codes`); otherwise ``table_q`` itself.

    >>> from qjax.flax import qjax_recommended
    >>> t = jnp.ones((3, 2))
    >>> table_mark(t, t, None, qjax_recommended(), Mode.FROZEN, True, "emb") is t
    True
    """
    if not (_record.active() and as_mode(mode).fake_quantizes and fake_quant):
        return table_q
    info = _record.TableMark(name, config)
    return _record.mark(table_q, {"x": table, "stats": state}, info)


def table_codes(info: _record.TableMark, table, state) -> QArray:
    """The int8 codes of an embedding table ``(num_embeddings, features)`` and their
    qparams, one scale per row (spec ``axis=0``) or per tensor, from the weight
    observer's ``state`` (seen as :func:`~qjax.flax._core.embed_view`):
    ``dequantize(codes) == fake_quant(table)``, bit for bit.

    >>> from qjax.flax import qjax_recommended
    >>> from qjax.flax._core import init_layer_stats
    >>> cfg = qjax_recommended()
    >>> obs = cfg.weight_observer(cfg.weight, cfg.compat)
    >>> t = jnp.array([[0.5, -1.0], [2.0, 1.0], [0.1, 0.2]])
    >>> q = table_codes(_record.TableMark("emb", cfg), t, obs.update(obs.init(t.T), t.T))
    >>> q.values, q.spec.axis
    (Array([[  64, -127],
           [ 127,   64],
           [  64,  127]], dtype=int8), 0)
    """
    cfg = info.config
    spec = cfg.weight
    if spec.granularity == "group":
        raise ValueError(f"{info.name}: a per-group embedding table is served in float")
    qp = cfg.weight_observer(spec, cfg.compat).qparams(state)
    codes = fake_quant_codes(jnp.transpose(jnp.asarray(table, jnp.float32)), qp,
                             cfg.fake_quant_compat).T  # fmt: skip
    if spec.granularity == "axis":  # the view's output axis is the table's rows
        spec = spec.replace(axis=0)
    return QArray(codes, QParams(qp.scale, qp.zero_point, spec))
