"""Hooking the stock layers of an existing ``flax.nnx`` model by path rules.

:func:`quantize_model` installs a :class:`~qjax.flax.nnx.QuantDotGeneral` into every
matched ``nnx.Linear`` and a :class:`~qjax.flax.nnx.QuantConvGeneralDilated` into every
matched ``nnx.Conv`` (Linen's counterpart: :class:`qjax.flax.linen.QuantRules`).
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from flax import nnx

from .._config import Mode, QuantConfig
from .._paths import join_path
from ._layers import QuantConvGeneralDilated, QuantDotGeneral, _QuantModule


def quantize_model(
    model: nnx.Module,
    rules: Sequence[tuple[str, QuantConfig]],
    *,
    mode: Mode = Mode.QAT,
) -> dict[str, str]:
    """Install quantization hooks into the stock layers of ``model``, in place.

    ``rules`` is a sequence of ``(regex, config)``; the first regex that fully matches a
    module's path (``"layers/0"``, ``"encoder/fc1"``) decides. Matched ``nnx.Linear``
    layers get a :class:`QuantDotGeneral`, ``nnx.Conv`` a
    :class:`QuantConvGeneralDilated` (so configs must quantize inputs, not outputs).
    Containers (modules with children) are walked, not quantized. Raises ``TypeError``
    naming the path when a rule matches a leaf module of another type, and
    ``ValueError`` when a rule matches nothing. Returns ``{path: regex}``.

    >>> from flax import nnx
    >>> from qjax.flax import qjax_recommended
    >>> class MLP(nnx.Module):
    ...     def __init__(self, rngs):
    ...         self.fc1 = nnx.Linear(4, 8, rngs=rngs)
    ...         self.fc2 = nnx.Linear(8, 2, rngs=rngs)
    >>> model = MLP(nnx.Rngs(0))
    >>> quantize_model(model, [(r"fc\\d", qjax_recommended())])
    {'fc1': 'fc\\\\d', 'fc2': 'fc\\\\d'}
    """
    rules = list(rules)
    for pat, cfg in rules:
        if not isinstance(cfg, QuantConfig):
            raise TypeError(
                f"quantize_model: rule {pat!r} needs a QuantConfig, got {type(cfg).__name__}"
            )
    used: dict[str, str] = {}
    hits = {pat: 0 for pat, _ in rules}
    targets = []
    for path, m in nnx.iter_modules(model):
        if isinstance(m, _QuantModule) or not path:
            continue
        p = join_path(path)
        # Skip containers: any module with a child module.
        has_child = any(isinstance(v, nnx.Module) and v is not m for _, v in nnx.iter_children(m))
        if has_child and not isinstance(m, (nnx.Linear, nnx.Conv)):
            continue
        for pat, cfg in rules:
            if re.fullmatch(pat, p):
                hits[pat] += 1
                targets.append((p, m, pat, cfg))
                break
    for p, m, pat, _ in targets:
        if not isinstance(m, (nnx.Linear, nnx.Conv)):
            raise TypeError(
                f"quantize_model: rule {pat!r} matches {p!r}, a {type(m).__name__}, which has "
                "no quantization hook (supported: nnx.Linear, nnx.Conv); narrow the pattern"
            )
    unused = [pat for pat, n in hits.items() if n == 0]
    if unused:
        raise ValueError(
            f"quantize_model: rules {unused} matched no module; paths are like "
            f"{[join_path(p) for p, _ in list(nnx.iter_modules(model))[:5] if p]}"
        )
    for p, m, pat, cfg in targets:
        if isinstance(m, nnx.Linear):
            hook = QuantDotGeneral(cfg, m.kernel.shape, mode=mode, name=p)
            m.dot_general = nnx.data(hook)
        else:
            hook = QuantConvGeneralDilated(cfg, m.kernel.shape, mode=mode, name=p)
            m.conv_general_dilated = nnx.data(hook)
        used[p] = pat
    return used
