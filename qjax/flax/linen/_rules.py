"""Hooking the stock layers of a Linen model by path rules: :class:`QuantRules`.

PyTorch-style ``[(regex, config)]`` rules for the stock layers of any Linen model
(:data:`SUPPORTED`: ``nn.Dense``, ``nn.Conv``, ``nn.DenseGeneral``, ``nn.Einsum``,
``nn.Embed``; ``nn.MultiHeadDotProductAttention``'s projections are ``nn.DenseGeneral``),
by module path (NNX's counterpart: :func:`qjax.flax.nnx.quantize_model`).
"""

from __future__ import annotations

import functools
import re
from collections.abc import Sequence

import flax.linen as nn
from flax.linen.dtypes import promote_dtype

from .._config import Mode, QuantConfig, as_mode
from .._paths import join_path
from ._layers import QuantConvGeneralDilated, QuantDotGeneral
from ._transformer import QuantEinsum, QuantEmbed, einsum_call

# the stock layers QuantRules hooks (exact types, as flax defines them)
SUPPORTED = (nn.Dense, nn.Conv, nn.DenseGeneral, nn.Einsum, nn.Embed)
_SUPPORTED_NAMES = ", ".join(f"nn.{c.__name__}" for c in SUPPORTED)


class QuantRules:
    """``[(regex, config)]`` rules that quantize the stock layers of a Linen model, by
    module path (NNX's ``quantize_model`` for Linen).

    Used as a context manager around ``init``/``apply``: through Flax's documented
    ``nn.intercept_methods``, every stock layer of :data:`SUPPORTED` takes the config
    of the first rule that fully matches its path (``"/".join(module.path)``, e.g.
    ``"Dense_0"``, ``"attn/query"``) or the path of a container above it (``"attn"``
    covers an ``nn.MultiHeadDotProductAttention``'s four projections), and is called
    with its hook, exactly as if the model had been built with it:

    - ``nn.Dense`` / ``nn.DenseGeneral``: ``dot_general_cls`` =
      :class:`~qjax.flax.linen.QuantDotGeneral` (``DenseGeneral``: ``out_ndim =
      len(features)``, the kernel quantized per flattened output feature);
    - ``nn.Conv``: ``conv_general_dilated_cls`` = :class:`~qjax.flax.linen.QuantConvGeneralDilated`;
    - ``nn.Einsum``: the call runs as flax's with its einsum in
      :class:`~qjax.flax.linen.QuantEinsum` (:func:`~qjax.flax.linen._transformer.einsum_call`;
      ``nn.Einsum`` has no hook attribute around its einsum);
    - ``nn.Embed``: ``promote_dtype`` = :class:`~qjax.flax.linen.QuantEmbed` (weight only).

    Each computes ``op(fq_in(x), fq_w(kernel))`` with the numbers of the NNX hooks. The
    module tree, parameter names and the model's code are unchanged; statistics appear
    in ``quant_stats`` under ``<layer path>/QuantDotGeneral_0`` (``QuantEinsum_0``,
    ``QuantEmbed_0``, ...). Configs must quantize the input, not the output (the hook
    sees no bias). On leaving the context, a rule that hooked nothing raises
    ``ValueError`` listing the paths seen; a rule that fully matches a leaf module of
    another type raises ``TypeError`` naming it and the supported layers; a matched
    layer that already has a hook raises ``TypeError``. :meth:`with_mode` gives the
    same rules in another mode (e.g. ``Mode.FROZEN`` for evaluation). The
    ``Dense`` / ``DenseGeneral`` / ``Conv`` / ``Einsum`` hooks serve as int8 layers
    through ``qjax.convert`` (an einsum that contracts the input with the kernel),
    ``Embed`` lookups from the int8 table.

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
    ValueError: QuantRules: rules ['conv.*'] matched no nn.Dense/nn.Conv/...; paths seen: ...
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

    def _rule_for_layer(self, path: tuple[str, ...]):
        """The first rule that fully matches the layer's path or a container's above it."""
        names = [join_path(path[:i], root="") for i in range(len(path), 0, -1)]
        for pat, cfg in self.rules:
            if any(re.fullmatch(pat, n) for n in names):
                return pat, cfg
        return None

    def _interceptor(self, next_fun, args, kwargs, context):
        m, method = context.module, context.method_name
        if type(m) not in SUPPORTED:
            y = next_fun(*args, **kwargs)
            if method == "__call__":
                self._refuse_leaf(m)
            return y
        path = join_path(m.path, root="")
        if type(m) is nn.Embed:
            return self._embed(m, method, path, next_fun, args, kwargs)
        if method != "__call__":
            return next_fun(*args, **kwargs)
        if path not in self._seen:
            self._seen.append(path)
        hit = self._rule_for_layer(m.path)
        if hit is None:
            return next_fun(*args, **kwargs)
        pat, cfg = hit
        attr, hook = self._hook_for(m, pat, path, cfg, args, kwargs)
        self.matched[path] = pat
        if attr is None:
            return einsum_call(m, hook, *args, **kwargs)
        # The module is frozen; give it the hook for this call only (the attribute is
        # what the layer reads inside __call__), then restore it.
        old = getattr(m, attr)
        object.__setattr__(m, attr, hook)
        try:
            return next_fun(*args, **kwargs)
        finally:
            object.__setattr__(m, attr, old)

    def _hook_for(self, m, pat, path, cfg, args, kwargs):
        t = type(m)
        if t is nn.Einsum:  # no hook attribute around its einsum: the call is run here
            mode = self.mode

            def einsum_hook(eq):  # built inside nn.Einsum's compact scope
                return QuantEinsum(config=cfg, einsum_str=eq, mode=mode)

            return None, einsum_hook
        attr = "conv_general_dilated_cls" if t is nn.Conv else "dot_general_cls"
        plain = attr[: -len("_cls")]
        if getattr(m, attr) is not None or getattr(m, plain, None) is not None:
            raise TypeError(
                f"QuantRules: rule {pat!r} matches {path!r}, which already has a "
                f"{attr}/{plain}; narrow the pattern"
            )
        if t is nn.Conv:
            return attr, functools.partial(QuantConvGeneralDilated, config=cfg, mode=self.mode)
        if t is nn.Dense:
            return attr, functools.partial(QuantDotGeneral, config=cfg, mode=self.mode)
        if m.batch_dims:
            raise TypeError(
                f"QuantRules: {path!r} is an nn.DenseGeneral with batch_dims "
                f"{m.batch_dims}; only batch_dims=() kernels can be hooked"
            )
        n_out = len(m.features) if isinstance(m.features, (tuple, list)) else 1
        hook = functools.partial(QuantDotGeneral, config=cfg, mode=self.mode, out_ndim=n_out)
        return attr, hook

    def _embed(self, m, method, path, next_fun, args, kwargs):
        # nn.Embed makes its table in setup (no compact method to build a hook in):
        # the hook is attached there, then lent as promote_dtype to __call__/attend.
        if method == "setup":
            y = next_fun(*args, **kwargs)
            if path not in self._seen:
                self._seen.append(path)
            hit = self._rule_for_layer(m.path)
            if hit is not None:
                pat, cfg = hit
                if m.promote_dtype is not promote_dtype:
                    raise TypeError(
                        f"QuantRules: rule {pat!r} matches {path!r}, an nn.Embed with its "
                        "own promote_dtype (where the hook goes); narrow the pattern"
                    )
                self.matched[path] = pat
                shape = (m.num_embeddings, m.features)
                m.QuantEmbed_0 = QuantEmbed(config=cfg, table_shape=shape, mode=self.mode)
            return y
        hook = getattr(m, "QuantEmbed_0", None) if method in ("__call__", "attend") else None
        if hook is None:
            return next_fun(*args, **kwargs)
        object.__setattr__(m, "promote_dtype", hook)
        try:
            return next_fun(*args, **kwargs)
        finally:
            object.__setattr__(m, "promote_dtype", promote_dtype)

    def _refuse_leaf(self, m) -> None:
        """A rule that fully matches a leaf module no hook fits is an error (as NNX)."""
        kids = m._state.children.values()  # variables map to their collection names
        if not m.path or any(isinstance(c, nn.Module) for c in kids):  # root, container
            return
        if type(m).__module__.startswith("qjax."):  # qjax's own layers and hooks
            return
        path = join_path(m.path, root="")
        for pat, _ in self.rules:
            if re.fullmatch(pat, path):
                raise TypeError(
                    f"QuantRules: rule {pat!r} matches {path!r}, a {type(m).__name__}, which "
                    f"has no quantization hook (supported: {_SUPPORTED_NAMES}); narrow the "
                    "pattern"
                )

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
                f"QuantRules: rules {unused} matched no {'/'.join(_SUPPORTED_NAMES.split(', '))}; "
                f"paths seen: "
                f"{self._seen[:12]}"
            )
        return False
