"""More ``flax.linen`` layers over the functional cores: PTQ, learnable qparams,
add/cat, model rules, statistics health. Re-exported by :mod:`qjax.flax.linen`; same
numbers as :mod:`qjax.flax.nnx_extras` from the same weights.

- :class:`DynamicQuantDense` / :class:`WeightOnlyDense`: quantized weights live in the
  ``quantized`` collection (not ``params``); :func:`dynamic_variables` /
  :func:`weight_only_variables` build that collection from a trained float kernel.
- :class:`LearnableQuantDense`: LSQ / PACT qparams in ``params/qparams``; observer
  statistics in ``quant_stats``; :func:`init_qparams_from_stats` after calibration.
- :class:`QuantAdd`, :class:`QuantCat`: one observer and fake-quant on the result.
- :class:`QuantRules`: PyTorch-style ``[(regex, config)]`` rules for stock ``nn.Dense``
  / ``nn.Conv`` layers of any Linen model, by module path.
- :func:`check_statistics`: non-finite observer ranges, by module path.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from . import _core, _health, _learnable, _ptq
from ._config import Mode, QuantConfig, as_mode
from .linen import (
    COLLECTION,
    ActQuant,
    QuantConvGeneralDilated,
    QuantDotGeneral,
    _stats_variable,
    _store,
    _switches,
)
from .linen import _path as _module_path

__all__ = [
    "QUANTIZED",
    "DynamicQuantDense",
    "LearnableQuantDense",
    "QuantAdd",
    "QuantCat",
    "QuantRules",
    "WeightOnlyDense",
    "check_statistics",
    "dynamic_variables",
    "init_qparams_from_stats",
    "weight_only_variables",
]

QUANTIZED = "quantized"


def dynamic_variables(kernel, bias=None, *, weight_spec=_ptq.DYNAMIC_WEIGHT, compat="torch"):
    """The ``quantized`` collection entry of a :class:`DynamicQuantDense` from a float
    ``(in, out)`` kernel and bias: ``{"weight": PreparedLinear, "bias": bias}``.

    >>> sorted(dynamic_variables(jnp.ones((3, 2)), jnp.zeros(2)))
    ['bias', 'weight']
    """
    out = {"weight": _ptq.prepare_dynamic_weight(kernel, weight_spec, compat)}
    if bias is not None:
        out["bias"] = jnp.asarray(bias, jnp.float32)
    return out


def weight_only_variables(kernel, bias=None, *, spec=_ptq.INT4_WEIGHT, compat="qjax"):
    """The ``quantized`` collection entry of a :class:`WeightOnlyDense`:
    ``{"weight": PackedWeight, "bias": bias}``.

    >>> weight_only_variables(jnp.ones((4, 2)))["weight"].codes.shape
    (2, 2)
    """
    out = {"weight": _ptq.pack_weight(kernel, spec, compat)}
    if bias is not None:
        out["bias"] = jnp.asarray(bias, jnp.float32)
    return out


def _quantized_vars(module: nn.Module, init):
    """``quantized/weight`` and ``quantized/bias`` (``None`` without bias), made by one
    call of ``init`` when the model is initialised."""
    made = []

    def get(key):
        if not made:
            made.append(init())
        return made[0][key]

    w = module.variable(QUANTIZED, "weight", get, "weight").value
    b = module.variable(QUANTIZED, "bias", get, "bias").value if module.use_bias else None
    return w, b


class DynamicQuantDense(nn.Module):
    """Dynamically quantized ``nn.Dense`` (torch ``quantize_dynamic``), see
    :class:`qjax.flax.nnx.DynamicQuantLinear`. ``init`` quantizes a ``kernel_init``
    kernel; a trained one goes in with :func:`dynamic_variables`.

    >>> layer = DynamicQuantDense(2)
    >>> v = {QUANTIZED: dynamic_variables(jnp.array([[1.0, -1.0], [0.5, 0.0]]), jnp.zeros(2))}
    >>> layer.apply(v, jnp.array([[2.0, 1.0]]))
    Array([[ 2.4980702, -1.992157 ]], dtype=float32)
    """

    features: int
    use_bias: bool = True
    weight_spec: Any = _ptq.DYNAMIC_WEIGHT
    compat: str = "torch"
    act_spec: Any = _ptq.DYNAMIC_ACTIVATION
    act_compat: str = "torch_fused"
    kernel_init: Any = nn.initializers.lecun_normal()

    @nn.compact
    def __call__(self, x):
        def init():
            k = self.kernel_init(self.make_rng("params"), (x.shape[-1], self.features))
            b = jnp.zeros((self.features,), jnp.float32) if self.use_bias else None
            return dynamic_variables(k, b, weight_spec=self.weight_spec, compat=self.compat)

        w, b = _quantized_vars(self, init)
        return _ptq.dynamic_linear(x, w, b, act_spec=self.act_spec, compat=self.act_compat)


class WeightOnlyDense(nn.Module):
    """``nn.Dense`` with int8 / packed int4 weight-only storage, see
    :class:`qjax.flax.nnx.WeightOnlyLinear`.

    >>> v = {QUANTIZED: weight_only_variables(jnp.ones((8, 4)))}
    >>> WeightOnlyDense(4, use_bias=False).apply(v, jnp.ones((1, 8)))
    Array([[8., 8., 8., 8.]], dtype=float32)
    """

    features: int
    use_bias: bool = True
    spec: Any = _ptq.INT4_WEIGHT
    compat: str = "qjax"
    kernel_init: Any = nn.initializers.lecun_normal()

    @nn.compact
    def __call__(self, x):
        def init():
            k = self.kernel_init(self.make_rng("params"), (x.shape[-1], self.features))
            b = jnp.zeros((self.features,), jnp.float32) if self.use_bias else None
            return weight_only_variables(k, b, spec=self.spec, compat=self.compat)

        w, b = _quantized_vars(self, init)
        return _ptq.weight_only_linear(x, w, self.spec, b)


class LearnableQuantDense(nn.Module):
    """``nn.Dense`` with learnable qparams (``config.grad`` ``"lsq"``/``"pact"``), see
    :class:`qjax.flax.nnx.LearnableQuantLinear`. Params ``kernel``, ``bias``,
    ``qparams``; statistics (:class:`~qjax.flax._learnable.LearnableStats`) in
    ``quant_stats/stats``.

    >>> import jax
    >>> from qjax.flax import qjax_recommended
    >>> layer = LearnableQuantDense(2, config=qjax_recommended().replace(grad="pact"))
    >>> v = layer.init(jax.random.key(0), jnp.ones((1, 3)))
    >>> sorted(v["params"]), sorted(v["params"]["qparams"]["weight"])
    (['bias', 'kernel', 'qparams'], ['alpha'])
    """

    features: int
    config: QuantConfig
    use_bias: bool = True
    mode: Mode = Mode.QAT
    observe: bool = True
    fake_quant: bool = True
    kernel_init: Any = nn.initializers.lecun_normal()
    bias_init: Any = nn.initializers.zeros_init()

    @nn.compact
    def __call__(self, x, mode: Mode | None = None):
        name = _module_path(self)
        _learnable.check_learnable(self.config, name)
        mode = as_mode(self.mode if mode is None else mode)
        kshape = (jnp.shape(x)[-1], self.features)
        kernel = self.param("kernel", self.kernel_init, kshape, jnp.float32)
        bias = self.param("bias", self.bias_init, (self.features,), jnp.float32)
        qparams = self.param(
            "qparams", lambda _: _learnable.init_learnable_params(self.config, kshape)[0]
        )
        var = _stats_variable(
            self, lambda: _learnable.init_learnable_params(self.config, kshape)[1]
        )
        args = (self.config, mode, _switches(self))
        x, kernel = _core.promote_operands(x, kernel, name)
        y, st = _learnable.learnable_op(
            lax.dot_general,
            x,
            kernel,
            qparams,
            var.value,
            *args,
            name=name,
            dimension_numbers=(((x.ndim - 1,), (0,)), ((), ())),
        )
        if self.use_bias:
            y = y + bias.astype(y.dtype)
        y, st = _learnable.learnable_output(y, qparams, st, *args, name=name)
        _store(self, var, st, mode, self.observe)
        return y


class QuantAdd(ActQuant):
    """``a + b`` with one observer and fake-quant on the sum (see
    :class:`qjax.flax.nnx.QuantAdd`); statistics in ``quant_stats/stats``.

    >>> import jax
    >>> from qjax.flax import Mode, qjax_recommended
    >>> add = QuantAdd(qjax_recommended(), mode=Mode.CALIBRATE)
    >>> a, b = jnp.array([1.0, -2.0]), jnp.array([0.5, 0.5])
    >>> _, upd = add.apply(add.init(jax.random.key(0), a, b), a, b, mutable=["quant_stats"])
    >>> float(upd["quant_stats"]["stats"].min_val)
    -1.5
    """

    def __call__(self, a, b, mode: Mode | None = None):
        return super().__call__(jnp.add(a, b), mode)


class QuantCat(ActQuant):
    """``concatenate(xs, axis)`` with one observer and fake-quant on the result (see
    :class:`qjax.flax.nnx.QuantCat`).

    >>> import jax
    >>> from qjax.flax import qjax_recommended
    >>> cat = QuantCat(qjax_recommended())
    >>> xs = [jnp.zeros((1, 2)), jnp.ones((1, 3))]
    >>> cat.apply(cat.init(jax.random.key(0), xs), xs, mutable=["quant_stats"])[0].shape
    (1, 5)
    """

    axis: int = -1

    def __call__(self, xs: Sequence[jax.Array], mode: Mode | None = None):
        xs = list(xs)
        if not xs:
            raise ValueError(f"{_module_path(self)}: nothing to concatenate")
        return super().__call__(jnp.concatenate(xs, axis=self.axis), mode)


def init_qparams_from_stats(variables) -> dict:
    """New variables whose learnable ``params/.../qparams`` are the observers' qparams
    (stored in ``quant_stats``; after calibration). Raises ``ValueError`` naming the
    module path of observers that never saw data or hold non-finite ranges.

    >>> import jax
    >>> from qjax.flax import Mode, qjax_recommended
    >>> layer = LearnableQuantDense(2, config=qjax_recommended().replace(grad="lsq"))
    >>> v = layer.init(jax.random.key(0), jnp.ones((1, 3)))
    >>> _, upd = layer.apply(v, jnp.ones((1, 3)), mode=Mode.CALIBRATE, mutable=["quant_stats"])
    >>> v = init_qparams_from_stats({**v, **upd})
    >>> float(v["params"]["qparams"]["input"]["scale"])
    0.003921568859368563
    """
    variables = dict(variables)
    if COLLECTION not in variables or "params" not in variables:
        raise ValueError(
            f"init_qparams_from_stats: need 'params' and {COLLECTION!r}, got {sorted(variables)}"
        )
    found = []

    def walk(stats, params, path):
        if isinstance(stats, _learnable.LearnableStats):
            p = "/".join(path[:-1]) or "<root>"
            never = [k for k, v in stats.layer._asdict().items() if v is not None and not v.count]
            if never:
                raise ValueError(
                    f"init_qparams_from_stats: {p}: observers {never} never saw data; apply "
                    "the model in Mode.CALIBRATE (mutable=['quant_stats']) first"
                )
            _health.check_statistics(stats.layer, where="init_qparams_from_stats", prefix=p)
            if "qparams" not in params:
                raise ValueError(f"init_qparams_from_stats: {p}: no params/qparams next to it")
            found.append(p)
            return {**params, "qparams": jax.tree.map(jnp.asarray, stats.init)}
        if hasattr(stats, "items") and not hasattr(stats, "_fields"):
            out = dict(params)
            for k, v in stats.items():
                if k == "stats" and isinstance(v, _learnable.LearnableStats):
                    out = walk(v, out, path + (k,))
                elif k in params:
                    out[k] = walk(v, params[k], path + (k,))
            return out
        return params

    new_params = walk(variables[COLLECTION], variables["params"], ())
    if not found:
        raise ValueError("init_qparams_from_stats: no LearnableQuantDense statistics found")
    variables["params"] = new_params
    return variables


def check_statistics(quant_stats, *, where: str = "check_statistics") -> None:
    """Raise ``ValueError`` naming every module path whose observer ranges are not
    finite (and the fix); warn about NaN/inf inputs the observers ignored. For arrays
    returned from ``jit``, use :func:`qjax.flax._health.stats_health` inside and
    :func:`qjax.flax._health.raise_if_unhealthy` outside.

    >>> import jax
    >>> from qjax.flax import linen as ql, qjax_recommended
    >>> v = ql.QuantDense(2, config=qjax_recommended()).init(jax.random.key(0), jnp.ones((1, 3)))
    >>> check_statistics(v["quant_stats"])
    """
    _health.check_statistics(quant_stats, where=where, prefix=COLLECTION)


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

    >>> import jax
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
        path = "/".join(m.path)
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
