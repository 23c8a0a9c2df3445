"""The one walk over quantized layers: which modules of a model are quantized, of what
kind, and where their statistics are.

Kinds: ``"linear"``, ``"conv"``, ``"conv_bn"``, ``"act"`` (``ActQuant`` and its
subclasses: ``QuantStub``, ``QuantAdd``, ``QuantCat``), ``"learnable_linear"`` (LSQ /
PACT layers), ``"linear_general"``, ``"einsum"``, ``"embed"`` (hooked
``LinearGeneral``/``DenseGeneral``, ``Einsum``, ``Embed``: fake-quant only, no int8
serving) and ``"hook"`` (a hook that is not inside the stock layer it belongs to). A
stock ``nnx.Linear`` / ``nnx.Conv`` / ... carrying a qjax hook is a ``"linear"`` /
``"conv"`` / ... layer whose statistics live in the hook.

- NNX: :func:`nnx_classify` looks at one module, :func:`nnx_quantized` walks a model
  and gives one :class:`QuantLayer` per module that holds statistics (the lifecycle
  functions of :mod:`qjax.flax.nnx`, :mod:`qjax.debug`, the QAT importer and
  ``qjax.convert`` all read models through it).
- Linen keeps statistics in variables, not modules: :func:`linen_holders` walks a
  ``quant_stats`` collection, :func:`linen_holder` finds the statistics of one module
  path, :func:`linen_params_kind` tells the kind from its ``params``, and
  :func:`linen_kind` from the module itself when there is one.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import numpy as np
from flax import nnx

from ._paths import join_path
from .linen import _layers as _ll
from .linen import _learnable as _llearn
from .linen import _transformer as _ltx
from .nnx import _layers as _nl
from .nnx import _learnable as _nlearn
from .nnx import _transformer as _ntx

__all__ = [
    "QuantLayer",
    "linen_holder",
    "linen_holders",
    "linen_kind",
    "linen_params_kind",
    "nnx_classify",
    "nnx_quantized",
]

# (stock layer, hook attribute, hook class, kind); nnx.Linear is no LinearGeneral
_NNX_HOOKS = (
    (nnx.Linear, "dot_general", _nl.QuantDotGeneral, "linear"),
    (nnx.LinearGeneral, "dot_general", _nl.QuantDotGeneral, "linear_general"),
    (nnx.Einsum, "einsum_op", _ntx.QuantEinsum, "einsum"),
    (nnx.Embed, "promote_dtype", _ntx.QuantEmbed, "embed"),
    (nnx.Conv, "conv_general_dilated", _nl.QuantConvGeneralDilated, "conv"),
)
# first match decides (QuantConvBn before QuantConv, ActQuant covers its subclasses)
_NNX_KINDS = (
    (_nl.QuantConvBn, "conv_bn"),
    (_nl.QuantLinear, "linear"),
    (_nl.QuantConv, "conv"),
    (_nl.ActQuant, "act"),
    (_nlearn.LearnableQuantLinear, "learnable_linear"),
    ((_nl.QuantDotGeneral, _nl.QuantConvGeneralDilated, _ntx.QuantEinsum, _ntx.QuantEmbed), "hook"),
)
_LINEN_KINDS = (
    (_ll.QuantConvBn, "conv_bn"),
    (_ll.QuantDense, "linear"),
    (_ll.QuantConv, "conv"),
    (_ll.ActQuant, "act"),
    (_llearn.LearnableQuantDense, "learnable_linear"),
    ((_ll.QuantDotGeneral, _ll.QuantConvGeneralDilated, _ltx.QuantEinsum, _ltx.QuantEmbed), "hook"),
)


@dataclasses.dataclass(frozen=True)
class QuantLayer:
    """One quantized NNX layer and the module holding its statistics."""

    path: str  # the layer's path ("layers/0", "<root>")
    module: Any  # the layer: a qjax layer, or a stock nnx.Linear/nnx.Conv with a hook
    kind: str
    holder: Any  # config, mode, switches and quant_stats: the layer itself or its hook
    holder_path: str  # "layers/0", or "layers/0/dot_general" for a hook


def nnx_classify(module) -> tuple[str, Any, str] | None:
    """``(kind, holder, hook attribute)`` of one NNX module (the attribute is ``""``
    when the module holds its own statistics), or ``None`` if it holds no quantizer.

    >>> from flax import nnx
    >>> from qjax.flax import nnx as qn, qjax_recommended
    >>> hook = qn.QuantDotGeneral(qjax_recommended(), kernel_shape=(3, 2))
    >>> kind, holder, attr = nnx_classify(nnx.Linear(3, 2, dot_general=hook, rngs=nnx.Rngs(0)))
    >>> kind, holder is hook, attr, nnx_classify(nnx.Linear(3, 2, rngs=nnx.Rngs(0)))
    ('linear', True, 'dot_general', None)
    """
    for stock, attr, hook, kind in _NNX_HOOKS:
        if isinstance(module, stock) and isinstance(getattr(module, attr, None), hook):
            return kind, getattr(module, attr), attr
    for cls, kind in _NNX_KINDS:
        if isinstance(module, cls):
            return kind, module, ""
    if isinstance(module, _nl._QuantModule):  # a subclass of the shared state only
        return "other", module, ""
    return None


def nnx_quantized(model, root: str = "<root>") -> list[QuantLayer]:
    """One :class:`QuantLayer` per module of ``model`` that holds statistics, in
    ``nnx.iter_modules`` order; paths are joined with ``root`` for the model itself.

    >>> from flax import nnx
    >>> from qjax.flax import nnx as qn, qjax_recommended
    >>> cfg = qjax_recommended()
    >>> model = nnx.Sequential(qn.QuantStub(cfg), qn.QuantLinear(2, 2, config=cfg,
    ...                        rngs=nnx.Rngs(0)))
    >>> [(q.path, q.kind, q.holder_path) for q in nnx_quantized(model)]
    [('layers/0', 'act', 'layers/0'), ('layers/1', 'linear', 'layers/1')]
    """
    mods = dict(nnx.iter_modules(model))
    out = []
    for path, m in mods.items():
        if not isinstance(m, _nl._QuantModule):
            continue
        hpath = join_path(path, root)
        if path and (parent := mods.get(path[:-1])) is not None:
            c = nnx_classify(parent)
            if c is not None and c[1] is m:  # the hook of a stock layer
                out.append(QuantLayer(join_path(path[:-1], root), parent, c[0], m, hpath))
                continue
        out.append(QuantLayer(hpath, m, nnx_classify(m)[0], m, hpath))
    return out


def linen_kind(module) -> str | None:
    """The kind of a Linen module (its class), or ``None`` if it holds no quantizer."""
    for cls, kind in _LINEN_KINDS:
        if isinstance(module, cls):
            return kind
    return None


def linen_params_kind(params, holder: str = "") -> str:
    """The kind of a Linen quantized module from its ``params`` (BN parameters:
    ``conv_bn``; an ``embedding``: ``embed``; a 2-D ``kernel``: ``linear``; another
    kernel: ``conv``; none: ``act``), or from its hook's name when ``holder`` (the
    statistics' path, as :func:`linen_holder` gives) names one: ``QuantEinsum_0`` is an
    ``einsum``, ``QuantEmbed_0`` an ``embed``, ``QuantDotGeneral_0`` with a kernel that
    is not 2-D a ``linear_general``.

    >>> import numpy as np
    >>> linen_params_kind({"kernel": np.zeros((4, 2, 3))}, "attn/query/QuantDotGeneral_0")
    'linear_general'
    >>> linen_params_kind({"embedding": np.zeros((10, 4))})
    'embed'
    """
    p = params if isinstance(params, Mapping) else {}
    hook = holder.rpartition("/")[2]
    if hook.startswith("QuantEinsum"):
        return "einsum"
    if hook.startswith("QuantEmbed") or "embedding" in p:
        return "embed"
    if "bn_scale" in p:
        return "conv_bn"
    if "kernel" in p:
        if np.ndim(p["kernel"]) == 2:
            return "linear"
        return "linear_general" if hook.startswith("QuantDotGeneral") else "conv"
    return "act"


def linen_holders(quant_stats, root: str = "") -> list[tuple[str, Mapping]]:
    """``[(path, node)]`` of every node of a ``quant_stats`` collection that holds a
    ``stats`` entry (one per quantized module, a hook's under its layer's path).

    >>> linen_holders({"fc1": {"QuantDotGeneral_0": {"stats": 1}}, "act": {"stats": 2}})
    [('fc1/QuantDotGeneral_0', {'stats': 1}), ('act', {'stats': 2})]
    """
    out = []

    def walk(node, path):
        if isinstance(node, Mapping):
            if "stats" in node:
                out.append((join_path(path, root), node))
            for k, v in node.items():
                if k != "stats":
                    walk(v, path + [k])

    walk(quant_stats, [])
    return out


def linen_holder(quant_stats, path: str) -> tuple[str, Mapping]:
    """``(holder path, node)`` of the statistics of the Linen module at ``path``: its
    own ``stats``, or those of its one hook (``<path>/QuantDotGeneral_0``).

    >>> linen_holder({"fc1": {"QuantDotGeneral_0": {"stats": 1}}}, "fc1")
    ('fc1/QuantDotGeneral_0', {'stats': 1})
    """
    node = quant_stats
    for part in [p for p in path.split("/") if p]:
        node = node.get(part) if isinstance(node, Mapping) else None
    if not isinstance(node, Mapping):
        raise ValueError(f"qjax variables have no 'quant_stats/{path}'")
    if "stats" in node:
        return path, node
    hooks = [k for k, v in node.items() if isinstance(v, Mapping) and "stats" in v]
    if len(hooks) != 1:
        raise ValueError(f"qjax variables: 'quant_stats/{path}' holds no 'stats'")
    return f"{path}/{hooks[0]}", node[hooks[0]]
