"""Hooking the stock layers of an existing ``flax.nnx`` model by path rules.

:func:`quantize_model` installs a qjax hook into every matched stock layer
(:data:`SUPPORTED`; Linen's counterpart: :class:`qjax.flax.linen.QuantRules`):

=====================  ======================  ===================================
layer                  hook (attribute)        what is fake-quantized
=====================  ======================  ===================================
``nnx.Linear``         ``QuantDotGeneral``     input (per tensor), kernel
                       (``dot_general``)
``nnx.LinearGeneral``  ``QuantDotGeneral``     input, kernel as a ``(prod(in),
                       (``dot_general``)       prod(out))`` matrix
``nnx.Einsum``         ``QuantEinsum``         input, kernel per its axes that
                       (``einsum_op``)         appear in the result
``nnx.Embed``          ``QuantEmbed``          the table only (per row or tensor)
                       (``promote_dtype``)
``nnx.Conv``           ``QuantConvGeneral``    input, kernel
                       ``Dilated``
=====================  ======================  ===================================

``nnx.MultiHeadAttention`` is a container: its query/key/value/out projections are
``nnx.LinearGeneral`` layers, hooked when a rule matches them or the container.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from flax import nnx

from .._config import Mode, QuantConfig
from .._paths import join_path
from ._layers import QuantConvGeneralDilated, QuantDotGeneral, _QuantModule
from ._transformer import QuantEinsum, QuantEmbed

# the stock layers quantize_model hooks (nnx.Linear is not a LinearGeneral subclass)
SUPPORTED = (nnx.Linear, nnx.LinearGeneral, nnx.Einsum, nnx.Embed, nnx.Conv)
_SUPPORTED_NAMES = ", ".join(f"nnx.{c.__name__}" for c in SUPPORTED)


def _install(m, cfg, mode: Mode, p: str) -> None:
    if isinstance(m, nnx.Linear):
        m.dot_general = nnx.data(QuantDotGeneral(cfg, m.kernel.shape, mode=mode, name=p))
    elif isinstance(m, nnx.LinearGeneral):
        if m.batch_axis:
            raise TypeError(
                f"quantize_model: {p!r} is an nnx.LinearGeneral with batch_axis "
                f"{dict(m.batch_axis)}; only batch_axis={{}} kernels can be hooked"
            )
        if m.dot_general_cls is not None:
            raise TypeError(f"quantize_model: {p!r} already has a dot_general_cls")
        hook = QuantDotGeneral(cfg, m.kernel.shape, mode=mode, name=p, out_ndim=len(m.out_features))
        m.dot_general = nnx.data(hook)
    elif isinstance(m, nnx.Einsum):
        if m.einsum_str is None:
            raise TypeError(
                f"quantize_model: {p!r} is an nnx.Einsum without an einsum_str; the hook "
                "needs the equation to know the kernel's output axes"
            )
        hook = QuantEinsum(cfg, m.kernel.shape, m.einsum_str, mode=mode, name=p)
        m.einsum_op = nnx.data(hook)
    elif isinstance(m, nnx.Embed):
        m.promote_dtype = nnx.data(QuantEmbed(cfg, m.embedding.shape, mode=mode, name=p))
    else:
        hook = QuantConvGeneralDilated(cfg, m.kernel.shape, mode=mode, name=p)
        m.conv_general_dilated = nnx.data(hook)


def quantize_model(
    model: nnx.Module,
    rules: Sequence[tuple[str, QuantConfig]],
    *,
    mode: Mode = Mode.QAT,
) -> dict[str, str]:
    """Install quantization hooks into the stock layers of ``model``, in place.

    ``rules`` is a sequence of ``(regex, config)``. A stock layer of :data:`SUPPORTED`
    (``nnx.Linear``, ``nnx.LinearGeneral``, ``nnx.Einsum``, ``nnx.Embed``,
    ``nnx.Conv``) takes the config of the first rule that fully matches its path
    (``"layers/0"``, ``"attn/query"``) or the path of a container above it
    (``"attn"`` covers an ``nnx.MultiHeadAttention``'s four projections). Hooks:
    :class:`QuantDotGeneral` (``Linear``; ``LinearGeneral`` with ``out_ndim``, weight
    per flattened output feature), :class:`QuantEinsum`, :class:`QuantEmbed` (weight
    only) and :class:`QuantConvGeneralDilated`; each computes
    ``op(fq_in(x), fq_w(kernel))`` (no output quantizer, so configs must have
    ``quantize_output=False``). ``qjax.convert`` serves the Linear, LinearGeneral
    and Conv hooks as int8 layers (exactly, with ``QuantConfig(scheme=...)``), the
    Einsum hooks too where the equation contracts the input with the kernel (others
    stay float, listed with the reason), and Embed lookups from the int8 table.

    Raises ``TypeError`` when a rule fully matches the path of a leaf module of
    another type (naming it and the supported layers), and ``ValueError`` when a rule
    quantizes nothing. Returns ``{path: regex}``.

    >>> from flax import nnx
    >>> from qjax.flax import qjax_recommended
    >>> class MLP(nnx.Module):
    ...     def __init__(self, rngs):
    ...         self.fc1 = nnx.Linear(4, 8, rngs=rngs)
    ...         self.fc2 = nnx.Linear(8, 2, rngs=rngs)
    >>> model = MLP(nnx.Rngs(0))
    >>> quantize_model(model, [(r"fc\\d", qjax_recommended())])
    {'fc1': 'fc\\\\d', 'fc2': 'fc\\\\d'}
    >>> class Block(nnx.Module):
    ...     def __init__(self, rngs):
    ...         self.attn = nnx.MultiHeadAttention(2, 8, decode=False, rngs=rngs)
    >>> sorted(quantize_model(Block(nnx.Rngs(0)), [(r"attn", qjax_recommended())]))
    ['attn/key', 'attn/out', 'attn/query', 'attn/value']
    """
    rules = list(rules)
    for pat, cfg in rules:
        if not isinstance(cfg, QuantConfig):
            raise TypeError(
                f"quantize_model: rule {pat!r} needs a QuantConfig, got {type(cfg).__name__}"
            )
    hits = {pat: 0 for pat, _ in rules}
    targets = []
    for path, m in nnx.iter_modules(model):
        if isinstance(m, _QuantModule) or not path:
            continue
        p = join_path(path)
        supported = isinstance(m, SUPPORTED)
        # Containers (a module with a child module) are walked, not quantized.
        has_child = any(isinstance(v, nnx.Module) and v is not m for _, v in nnx.iter_children(m))
        if has_child and not supported:
            continue
        ancestors = [join_path(path[:i]) for i in range(len(path) - 1, 0, -1)]
        for pat, cfg in rules:
            if re.fullmatch(pat, p):
                targets.append((p, m, pat, cfg))
                break
            if supported and any(re.fullmatch(pat, a) for a in ancestors):
                targets.append((p, m, pat, cfg))
                break
    for p, m, pat, _ in targets:
        if not isinstance(m, SUPPORTED):
            raise TypeError(
                f"quantize_model: rule {pat!r} matches {p!r}, a {type(m).__name__}, which has "
                f"no quantization hook (supported: {_SUPPORTED_NAMES}); narrow the pattern"
            )
        hits[pat] += 1
    unused = [pat for pat, n in hits.items() if n == 0]
    if unused:
        raise ValueError(
            f"quantize_model: rules {unused} matched no module; paths are like "
            f"{[join_path(p) for p, _ in list(nnx.iter_modules(model))[:5] if p]}"
        )
    used: dict[str, str] = {}
    for p, m, pat, cfg in targets:
        _install(m, cfg, mode, p)
        used[p] = pat
    return used
