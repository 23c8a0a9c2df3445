"""Where imported QAT state goes: a qjax.flax NNX module or Linen variables, behind one
small interface (parameters by name, observer statistics by slot).

=============================  ============================================  ==========
qjax target                    parameters / statistics                       kind
=============================  ============================================  ==========
NNX ``QuantLinear``,           ``kernel``, ``bias``; ``quant_stats``          ``linear``
``nnx.Linear`` + hook          (hook's ``quant_stats``)
NNX ``QuantConv``,             same                                          ``conv``
``nnx.Conv`` + hook
NNX ``QuantConvBn``            ``kernel``, ``bias``, ``bn_scale``,           ``conv_bn``
                               ``bn_bias`` (Param), ``bn_mean``, ``bn_var``
                               (BatchStat)
NNX ``ActQuant``/``QuantStub``  ``quant_stats`` (one observer state)         ``act``
Linen variables at ``path``    ``params/path/*``, ``batch_stats/path/*``,    inferred
                               ``quant_stats/path/stats`` (or a hook's
                               ``quant_stats/path/<Hook>_0/stats``)
=============================  ============================================  ==========
"""

from __future__ import annotations

from collections.abc import Mapping

import jax.numpy as jnp
import numpy as np

from qjax.flax import QuantConfig, _walk

# the kinds an imported torch QAT module can go into (no LSQ/PACT layers)
_KINDS = ("linear", "conv", "conv_bn", "act", "hook")


class Target:
    """One qjax module: ``kind``, ``config``, ``holder`` (path of its statistics)."""

    path: str
    holder: str
    kind: str
    config: QuantConfig

    def param(self, name: str):  # pragma: no cover - interface
        raise NotImplementedError

    def set_param(self, name: str, value, source: str) -> None:  # pragma: no cover
        raise NotImplementedError

    def stats(self):  # pragma: no cover - interface
        raise NotImplementedError

    def set_stats(self, value) -> None:  # pragma: no cover - interface
        raise NotImplementedError

    def check_layer(self, torch_module, where: str) -> None:
        """Attribute checks that only the NNX shell can make (Linen attributes are not
        stored in variables)."""

    def set_switches(self, observe: bool, fake_quant: bool) -> None:
        """NNX: set the module's switches; Linen keeps them as module attributes."""


def _checked(old, value, where: str):
    value = np.asarray(value)
    if old is None:
        raise ValueError(f"{where}: the qjax module has no such variable")
    old_shape = tuple(np.shape(old))
    if value.shape != old_shape:
        raise ValueError(f"{where}: torch gives shape {value.shape}, qjax has {old_shape}")
    if not np.issubdtype(value.dtype, np.floating):
        raise TypeError(f"{where}: torch gives dtype {value.dtype}, expected floating")
    return jnp.array(value, dtype=jnp.asarray(old).dtype, copy=True)


class NnxTarget(Target):
    """A module of an NNX model, found by its ``/``-separated path."""

    def __init__(self, model, path: str):
        module = model
        for part in [p for p in path.split("/") if p]:
            try:
                module = getattr(module, part) if not part.isdigit() else module[int(part)]
            except (AttributeError, IndexError, KeyError, TypeError):
                raise ValueError(f"qjax model has no module {path!r} (no {part!r})") from None
        self.path, self.module = path, module
        c = _walk.nnx_classify(module)
        if c is None or c[0] not in _KINDS:
            raise TypeError(
                f"qjax module {path!r} is a {type(module).__name__}, not a quantized module "
                "(QuantLinear, QuantConv, QuantConvBn, ActQuant/QuantStub, or nnx.Linear/"
                "nnx.Conv with a quantization hook)"
            )
        self.kind, self.holder_module, attr = c
        self.holder = f"{path}/{attr}" if attr else path
        self.config = self.holder_module.config

    def param(self, name):
        var = getattr(self.module, name, None)
        return None if var is None else var[...]

    def set_param(self, name, value, source):
        where = f"{source} -> qjax '{self.path}/{name}'"
        getattr(self.module, name).set_value(_checked(self.param(name), value, where))

    def stats(self):
        return self.holder_module.quant_stats.get_value()

    def set_stats(self, value):
        self.holder_module.quant_stats.set_value(value)

    def set_switches(self, observe, fake_quant):
        self.holder_module.observe = observe
        self.holder_module.fake_quant = fake_quant

    def check_layer(self, tm, where):
        m = self.module
        problems = []
        if self.kind == "conv_bn":
            from torch.ao.nn.intrinsic.qat import ConvBnReLU1d, ConvBnReLU2d, ConvBnReLU3d

            relu = isinstance(tm, (ConvBnReLU1d, ConvBnReLU2d, ConvBnReLU3d))
            if m.relu != relu:
                problems.append(f"torch {type(tm).__name__} vs qjax relu={m.relu}")
            if tm.bn.momentum is None or float(tm.bn.momentum) != float(m.momentum):
                problems.append(f"BN momentum torch {tm.bn.momentum} vs qjax {m.momentum}")
            if float(tm.bn.eps) != float(m.epsilon):
                problems.append(f"BN eps torch {tm.bn.eps} vs qjax {m.epsilon}")
        if self.kind in ("conv", "conv_bn") and hasattr(m, "strides"):
            if tuple(tm.stride) != tuple(m.strides):
                problems.append(f"stride torch {tuple(tm.stride)} vs qjax {tuple(m.strides)}")
            ks = tuple(tm.kernel_size)
            tp, qp = _pairs(tm.padding, ks, tm.stride), _pairs(m.padding, ks, m.strides)
            if tp is None or tp != qp:
                problems.append(f"padding torch {tm.padding!r} vs qjax {m.padding!r}")
        if self.kind in ("conv", "conv_bn"):
            if tm.groups != 1 or any(d != 1 for d in tm.dilation):
                problems.append("groups/dilation other than 1 are not supported")
            if tm.padding_mode != "zeros":
                problems.append(f"padding_mode {tm.padding_mode!r} is not supported")
        if problems:
            raise ValueError(f"{where}: " + "; ".join(problems))


def _pairs(padding, kernel_size, strides):
    """Explicit ``(lo, hi)`` padding pairs from a torch or Flax padding, or ``None``."""
    if isinstance(padding, str):
        if padding.upper() == "VALID":
            return tuple((0, 0) for _ in kernel_size)
        if padding.upper() == "SAME" and all(s == 1 for s in strides):
            return tuple(((k - 1) // 2, k - 1 - (k - 1) // 2) for k in kernel_size)
        return None
    return tuple(tuple(p) if isinstance(p, (tuple, list)) else (p, p) for p in padding)


def nnx_holders(model) -> list[str]:
    """Paths of every module of ``model`` that holds observer statistics."""
    return [q.holder_path for q in _walk.nnx_quantized(model, root="") if q.kind in _KINDS]


def copy_tree(tree):
    """A copy of the nested dicts of a Linen variables tree (leaves shared)."""
    if isinstance(tree, Mapping):
        return {k: copy_tree(v) for k, v in tree.items()}
    return tree


def _node(tree, path: str):
    node = tree
    for part in [p for p in path.split("/") if p]:
        if not isinstance(node, Mapping) or part not in node:
            return None
        node = node[part]
    return node


def linen_holders(variables) -> list[str]:
    """Paths of every ``quant_stats`` node holding ``stats`` (one per quantized module)."""
    return [p for p, _ in _walk.linen_holders(variables.get("quant_stats", {}))]


class LinenTarget(Target):
    """The variables of a Linen module at ``path`` (``variables`` is mutated: pass a copy)."""

    def __init__(self, variables, path: str, config):
        self.path, self.vars = path, variables
        self.holder, self._qs = _walk.linen_holder(variables.get("quant_stats", {}), path)
        cfg = config
        if isinstance(config, Mapping):
            cfg = config.get(path, config.get(self.holder.rpartition("/")[0]))
        if not isinstance(cfg, QuantConfig):
            raise TypeError(
                f"config for qjax module {path!r} must be a qjax.flax.QuantConfig (pass one "
                f"config, or a dict keyed by module path), got {type(cfg).__name__}"
            )
        self.config = cfg
        self._params = _node(variables.get("params", {}), path)
        self._bstats = _node(variables.get("batch_stats", {}), path)
        self.kind = _walk.linen_params_kind(self._params)

    def _where(self, name):
        if name in ("bn_mean", "bn_var"):
            return self._bstats, "batch_stats"
        return self._params, "params"

    def param(self, name):
        node, _ = self._where(name)
        return node.get(name) if isinstance(node, Mapping) else None

    def set_param(self, name, value, source):
        node, coll = self._where(name)
        where = f"{source} -> qjax '{coll}/{self.path}/{name}'"
        node[name] = _checked(self.param(name), value, where)

    def stats(self):
        return self._qs["stats"]

    def set_stats(self, value):
        self._qs["stats"] = value
