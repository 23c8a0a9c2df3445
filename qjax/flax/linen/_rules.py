"""Hooking the stock layers of a Linen model by path rules: :class:`QuantRules`.

PyTorch-style ``[(regex, config)]`` rules for the ``nn.Dense`` / ``nn.Conv`` layers of
any Linen model, by module path (NNX's counterpart: :func:`qjax.flax.nnx.quantize_model`).
"""

from __future__ import annotations

import functools
import re
from collections.abc import Sequence

import flax.linen as nn

from .._config import Mode, QuantConfig, as_mode
from .._paths import join_path
from ._layers import QuantConvGeneralDilated, QuantDotGeneral


class QuantRules:
    """``[(regex, config)]`` rules that quantize the stock ``nn.Dense`` / ``nn.Conv``
    layers of a Linen model, by module path (NNX's ``quantize_model`` for Linen).

    Used as a context manager around ``init``/``apply``: through Flax's documented
    ``nn.intercept_methods``, every ``nn.Dense`` (``nn.Conv``) whose path (``"/".join(
    module.path)``, e.g. ``"Dense_0"``, ``"encoder/fc1"``) fully matches a rule's regex
    (the first that matches decides) is called with ``dot_general_cls``
    (``conv_general_dilated_cls``) set to :class:`~qjax.flax.linen.QuantDotGeneral`
    (:class:`~qjax.flax.linen.QuantConvGeneralDilated`) with that config and ``mode``,
    exactly as if the model had been built with that hook; the module tree, parameter
    names and the model's code are unchanged, and statistics appear in ``quant_stats``
    under ``<layer path>/QuantDotGeneral_0``. Configs must quantize the input, not the
    output (the hook sees no bias). On leaving the context, a rule that matched no
    ``nn.Dense``/``nn.Conv`` raises ``ValueError`` listing the paths seen; a matched
    layer that already has a hook raises ``TypeError``. :meth:`with_mode` gives the
    same rules in another mode (e.g. ``Mode.FROZEN`` for evaluation).

    >>> import jax, jax.numpy as jnp
    >>> from qjax.flax import qjax_recommended
    >>> model = nn.Sequential([nn.Dense(4), nn.relu, nn.Dense(2)])
    >>> rules = QuantRules([(r"layers_0", qjax_recommended())])
    >>> with rules:
    ...     v = model.init(jax.random.key(0), jnp.ones((1, 3)))
    >>> sorted(v["quant_stats"]["layers_0"])
    ['QuantDotGeneral_0']
    >>> with QuantRules([(r"conv.*", qjax_recommended())]):  # doctest: +ELLIPSIS
    ...     v = model.init(jax.random.key(0), jnp.ones((1, 3)))
    Traceback (most recent call last):
      ...
    ValueError: QuantRules: rules ['conv.*'] matched no nn.Dense/nn.Conv; paths seen: ...
    """

    def __init__(self, rules: Sequence[tuple[str, QuantConfig]], *, mode: Mode = Mode.QAT):
        rules = list(rules)
        for item in rules:
            if not (isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], str)):
                raise TypeError(f"QuantRules: each rule is (regex, QuantConfig), got {item!r}")
            if not isinstance(item[1], QuantConfig):
                raise TypeError(
                    f"QuantRules: rule {item[0]!r} needs a QuantConfig, got "
                    f"{type(item[1]).__name__}"
                )
            if item[1].quantize_output:
                raise ValueError(
                    f"QuantRules: rule {item[0]!r}: the dot_general/conv hook cannot quantize "
                    "the output; use config.replace(quantize_input=True, quantize_output=False)"
                )
        self.rules = rules
        self.mode = as_mode(mode)
        self.matched: dict[str, str] = {}
        self._seen: list[str] = []
        self._ctx = None

    def with_mode(self, mode: Mode) -> QuantRules:
        """The same rules, with hooks in ``mode``."""
        return QuantRules(self.rules, mode=mode)

    def _rule_for(self, path: str):
        for pat, cfg in self.rules:
            if re.fullmatch(pat, path):
                return pat, cfg
        return None

    def _interceptor(self, next_fun, args, kwargs, context):
        m = context.module
        if context.method_name != "__call__" or type(m) not in (nn.Dense, nn.Conv):
            return next_fun(*args, **kwargs)
        path = join_path(m.path, root="")
        if path not in self._seen:
            self._seen.append(path)
        hit = self._rule_for(path)
        if hit is None:
            return next_fun(*args, **kwargs)
        pat, cfg = hit
        attr = "dot_general_cls" if type(m) is nn.Dense else "conv_general_dilated_cls"
        plain = "dot_general" if type(m) is nn.Dense else "conv_general_dilated"
        if getattr(m, attr) is not None or getattr(m, plain, None) is not None:
            raise TypeError(
                f"QuantRules: rule {pat!r} matches {path!r}, which already has a "
                f"{attr}/{plain}; narrow the pattern"
            )
        hook = QuantDotGeneral if type(m) is nn.Dense else QuantConvGeneralDilated
        self.matched[path] = pat
        # The module is frozen; give it the hook for this call only (the attribute is
        # what nn.Dense/nn.Conv read inside __call__), then restore it.
        object.__setattr__(m, attr, functools.partial(hook, config=cfg, mode=self.mode))
        try:
            return next_fun(*args, **kwargs)
        finally:
            object.__setattr__(m, attr, None)

    def __enter__(self) -> QuantRules:
        self._seen = []
        self.matched = {}
        self._ctx = nn.intercept_methods(self._interceptor)
        self._ctx.__enter__()
        return self

    def __exit__(self, exc_type, exc, tb):
        self._ctx.__exit__(exc_type, exc, tb)
        self._ctx = None
        if exc_type is not None:
            return False
        used = set(self.matched.values())
        unused = [pat for pat, _ in self.rules if pat not in used]
        if unused:
            raise ValueError(
                f"QuantRules: rules {unused} matched no nn.Dense/nn.Conv; paths seen: "
                f"{self._seen[:12]}"
            )
        return False
