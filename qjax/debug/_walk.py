"""How the debugging views find a model's quantizers and run it layer by layer.

Every quantized tensor of a qjax NNX model is one observer state inside a
:class:`qjax.flax.nnx.QuantStat`: a layer's ``LayerStats`` has ``input``/``weight``/
``output`` roles, an ``ActQuant`` (``QuantStub``, ``QuantAdd``, ...) one ``output``.
Its qparams are read as its fake-quant reads them (``factory(spec, compat).qparams``,
:func:`qjax.flax._intsim.layer_qparams`), never re-derived.

Views that need the values *between* layers run an ``nnx.Sequential`` one element at a
time on a clone of the model (``nnx.clone``) put in the mode they need, so the user's
model (modes, switches, statistics, BN running statistics) is never touched.
"""

from __future__ import annotations

import dataclasses
import functools
import re
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from .._primitives import dequantize
from ..flax import nnx as qnnx
from ..flax._config import Mode
from ..flax._core import LayerStats
from ..flax._intsim import fold_bn
from ..flax._learnable import tensor_qparams
from ..flax._walk import nnx_quantized

_PASS_THROUGH = (qnnx.MaxPool, qnnx.Flatten)  # keep the qparams of what they receive


@dataclasses.dataclass
class Quantizer:
    """One quantized tensor: where it sits and the state its qparams come from."""

    path: str  # module path of the quantized module ("layers/1", "layers/0/dot_general")
    role: str  # "input", "weight" or "output"
    module: Any
    state: Any
    spec: Any
    factory: Any
    learned: Any = None  # LearnableQuantLinear: this tensor's qparams parameters

    def qparams(self):
        """The qparams this tensor's fake-quant uses (same factory, spec and compat; the
        learned parameters of an LSQ/PACT layer)."""
        if self.learned is not None:
            return tensor_qparams(self.learned, self.spec, self.module.config.grad)
        args = (self.factory, self.spec, self.module.config.compat)
        try:
            hash(args)
        except TypeError:  # an unhashable observer factory: computed eagerly
            return _qparams(*args, self.state)
        return _qparams_jit(*args, self.state)


def _qparams(factory, spec, compat, state):
    return factory(spec, compat).qparams(state)


# One compiled program per (observer, spec, shape) instead of one per eager op.
_qparams_jit = jax.jit(_qparams, static_argnums=(0, 1, 2))


def quant_modules(model) -> list[tuple[str, Any]]:
    """``[(path, module)]`` of every quantized module, in path order; ``ValueError`` if none."""
    if not isinstance(model, nnx.Module):
        raise TypeError(f"expects a flax.nnx.Module, got {type(model).__name__}")
    out = [(q.holder_path, q.holder) for q in nnx_quantized(model)]
    if not out:
        raise ValueError(
            "the model has no qjax quantized modules (QuantLinear, QuantConv, QuantConvBn, "
            "ActQuant/QuantStub, or stock layers hooked by qjax.flax.nnx.quantize_model)"
        )
    return out


def quantizers(path: str, m) -> list[Quantizer]:
    """The quantized tensors of one quantized module, in input/weight/output order."""
    cfg = m.config
    st = m.quant_stats.get_value()
    learned = {}
    if isinstance(getattr(m, "qparams", None), nnx.Param):  # LSQ/PACT: params, not stats
        st, learned = st.layer, m.qparams.get_value()
    if isinstance(st, LayerStats):
        roles = (
            ("input", st.input, cfg.activation, cfg.activation_observer),
            ("weight", st.weight, cfg.weight, cfg.weight_observer),
            ("output", st.output, cfg.activation, cfg.activation_observer),
        )
        return [
            Quantizer(path, r, m, s, sp, f, learned.get(r))
            for r, s, sp, f in roles
            if s is not None and sp
        ]
    return [Quantizer(path, "output", m, st, cfg.activation, cfg.activation_observer)]


def all_quantizers(model) -> list[Quantizer]:
    return [q for p, m in quant_modules(model) for q in quantizers(p, m)]


@dataclasses.dataclass
class Unit:
    """One element of an ``nnx.Sequential`` and the quantized modules it holds."""

    index: int
    path: str
    layer: Any
    quant: list[tuple[str, Any]]  # (path, module): the layer itself or its hook


def units(model, fn: str) -> list[Unit]:
    """The elements of an ``nnx.Sequential``; ``TypeError`` for anything else, and for
    quantized modules nested deeper than a hooked ``nnx.Linear``/``nnx.Conv``."""
    if not isinstance(model, nnx.Sequential):
        raise TypeError(
            f"debug.{fn}: per-layer capture runs an nnx.Sequential one element at a time; got "
            f"{type(model).__name__}. Supported: an nnx.Sequential of qjax layers (QuantStub/"
            "ActQuant, QuantLinear, QuantConv, QuantConvBn, DeQuantStub, MaxPool/AvgPool/"
            "Flatten, activation functions) and hooked nnx.Linear/nnx.Conv; qparams_table "
            "and observer_health work on any model"
        )
    out = []
    for i, layer in enumerate(model.layers):
        path = f"layers/{i}"
        quant = []
        for q in nnx_quantized(layer) if isinstance(layer, nnx.Module) else ():
            if q.holder is layer:
                quant.append((path, layer))
                continue
            sp = f"{path}/{q.holder_path}"
            if q.module is not layer:  # only the layer itself or its own hook
                raise TypeError(
                    f"debug.{fn}: {sp} is a quantized module nested inside "
                    f"{path} ({type(layer).__name__}); per-layer capture supports qjax "
                    "layers as Sequential elements and hooks of nnx.Linear/nnx.Conv"
                )
            quant.append((sp, q.holder))
        out.append(Unit(i, path, layer, quant))
    return out


def clone_in(model, mode: Mode, *, float_at: list[str] = ()):
    """A clone of ``model`` in ``mode``; the quantized modules at paths ``float_at`` in
    ``Mode.FLOAT``. ``set_mode(FROZEN)`` checks every observer saw finite data. BN of
    ``QuantConvBn`` normalises with the running statistics (as served) in every clone,
    so float and quantized runs see the same BN and the batch does not change it."""
    c = nnx.clone(model)
    qnnx.set_mode(c, mode)
    for q in nnx_quantized(c):
        if q.kind == "conv_bn":
            q.holder.freeze_bn = True
    if float_at:
        qnnx.set_mode(c, Mode.FLOAT, where="|".join(re.escape(p) for p in float_at))
    return c


@nnx.jit
def _call_module(layer, h):
    return layer(h)


def call_layer(layer, h):
    """``layer(h)``, jitted per module: clones that differ in one layer's mode share the
    compiled programs of all the others (a whole-model jit would recompile each)."""
    return _call_module(layer, h) if isinstance(layer, nnx.Module) else layer(h)


def run_layers(seq, x) -> tuple[list, list]:
    """``(inputs, outputs)`` of every element of ``seq`` on ``x``."""
    ins, outs = [], []
    h = jnp.asarray(x)
    for layer in seq.layers:
        ins.append(h)
        h = call_layer(layer, h)
        outs.append(h)
    return ins, outs


def weight_values(q: Quantizer, layer) -> np.ndarray:
    """The float weight the quantizer sees: the kernel, BN-folded with the running
    statistics for ``QuantConvBn`` (what ``FROZEN`` with frozen BN and serving use)."""
    m = q.module
    if isinstance(m, qnnx.QuantConvBn):
        b = None if m.bias is None else m.bias[...]
        w, _ = _fold_jit(
            m.kernel[...], b, m.bn_scale[...], m.bn_bias[...], m.bn_mean[...], m.bn_var[...],
            m.epsilon,
        )  # fmt: skip
        return np.asarray(w)
    owner = m if hasattr(m, "kernel") else layer
    return np.asarray(owner.kernel[...])


_fold_jit = jax.jit(fold_bn, static_argnums=6)


@functools.partial(jax.jit, static_argnums=1)
def bounds(qp, shape):
    """``dequantize(qmin)``, ``dequantize(qmax)`` broadcast to ``shape``: the range each
    element of a tensor of ``shape`` can be represented in (per channel where it applies)."""
    spec = qp.spec
    lo = dequantize(jnp.full(shape, spec.qmin, spec.dtype), qp)
    return lo, dequantize(jnp.full(shape, spec.qmax, spec.dtype), qp)


def output_qparams(us: list[Unit], i: int):
    """The qparams the output of element ``i`` is quantized with: its own output
    quantizer, else the next quantizer after activations/pooling/flatten (as convert)."""
    for path, m in us[i].quant:
        own = [q for q in quantizers(path, m) if q.role == "output"]
        if own:
            return own[0].qparams()
    for u in us[i + 1 :]:
        if u.quant:
            path, m = u.quant[0]
            first = quantizers(path, m)[0]
            return first.qparams() if first.role in ("input", "output") else None
        relu = any(u.layer is r for r in (jax.nn.relu, nnx.relu))
        if not (relu or isinstance(u.layer, _PASS_THROUGH)):
            return None
    return None
