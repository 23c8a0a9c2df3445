"""Learnable qparams (LSQ, PACT) as parameters: the functional core.

A config with ``grad="lsq"`` or ``grad="pact"`` makes the qparams of each quantized
tensor of a layer (``"input"``, ``"weight"``, ``"output"``, as the config says)
*parameters* (``nnx.Param`` / Linen ``params``, under the name ``qparams``), trained by
the optimizer with the gradients of :func:`qjax.fake_quant`:

=========  ==========================================  =====================================
grad       parameters of a tensor                       qparams used by the fake-quant
=========  ==========================================  =====================================
``lsq``    ``scale`` (and ``zero_point``, float,        ``s = max(scale, eps)``; ``z =
           for affine specs)                            clamp(rint(zero_point))`` or the
                                                        symmetric zero point; LSQ gradients
                                                        with ``grad_scale = 1/sqrt(N·qmax)``
``pact``   ``alpha`` (the clipping level: the real      ``z`` = symmetric zero point, or
           value of the top code)                       ``qmin`` for affine specs (range
                                                        ``[0, alpha]``); ``s = max(alpha,
                                                        eps) / (qmax - z)``; PACT gradient
=========  ==========================================  =====================================

Observers still run where the mode observes (``CALIBRATE``, ``QAT``), and their
statistics stay in ``quant_stats`` (never in params). Each observing step also stores,
next to the observer states, the learnable parameters that the observers' qparams
correspond to (:class:`LearnableStats` ``init``): LSQ ``scale = s``, ``zero_point = z``
of the observer; PACT ``alpha = s·(qmax - z)``. After calibration,
``init_qparams_from_stats`` (both shells) copies them into the parameters; from then on
the optimizer owns them. In ``QAT`` and ``FROZEN`` the fake-quant uses the parameters.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from .._primitives import fake_quant
from .._qparams import EPS
from .._spec import QParams, QuantSpec
from . import _core
from ._config import Mode, QuantConfig, as_mode

__all__ = [
    "LEARNABLE_GRADS",
    "LearnableStats",
    "check_learnable",
    "init_learnable_params",
    "learnable_op",
    "learnable_output",
    "tensor_qparams",
]

LEARNABLE_GRADS = ("lsq", "pact")
_ALL_ON = _core.Switches()


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class LearnableStats:
    """Statistics of a learnable layer (a pytree): ``layer`` (observer states,
    :class:`~qjax.flax.LayerStats`) and ``init`` (the learnable parameters the observers'
    qparams give, refreshed at every observing step). Not a tuple, so code that looks
    for an observer's ``count`` field does not mistake it for one."""

    layer: _core.LayerStats
    init: Any


def check_learnable(config, name: str) -> None:
    """``TypeError``/``ValueError`` unless ``config`` is a QuantConfig with a learnable grad.

    >>> from qjax.flax import qjax_recommended
    >>> check_learnable(qjax_recommended(), "fc1")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
      ...
    ValueError: fc1: learnable qparams need config.grad in ('lsq', 'pact'), got 'ste'; ...
    """
    if not isinstance(config, QuantConfig):
        raise TypeError(f"{name}: config must be a qjax.flax.QuantConfig, got {type(config)}")
    if config.grad not in LEARNABLE_GRADS:
        raise ValueError(
            f"{name}: learnable qparams need config.grad in {LEARNABLE_GRADS}, got "
            f"{config.grad!r}; use QuantLinear/QuantDense for observer-driven qparams"
        )


def _pact_zero_point(spec: QuantSpec) -> int:
    return spec.symmetric_zero_point() if spec.symmetric else spec.qmin


def _tensor_init(spec: QuantSpec, grad: str, shape) -> dict:
    f32 = jnp.float32
    if grad == "pact":
        return {"alpha": jnp.full(shape, spec.qmax - _pact_zero_point(spec), f32)}
    out = {"scale": jnp.ones(shape, f32)}
    if not spec.symmetric:
        out["zero_point"] = jnp.zeros(shape, f32)
    return out


def _tensors(config: QuantConfig, kernel_shape):
    """(name, spec, observer factory, qparams shape) of each quantized tensor."""
    act, out = config.activation, []
    if act is not None and act.granularity != "tensor":
        raise ValueError(f"learnable qparams: the activation spec must be per-tensor, got {act}")
    if act is not None and config.quantize_input:
        out.append(("input", act, config.activation_observer, act.qparams_shape(())))
    if config.weight is not None:
        w = config.weight
        out.append(("weight", w, config.weight_observer, w.qparams_shape(tuple(kernel_shape))))
    if act is not None and config.quantize_output:
        out.append(("output", act, config.activation_observer, act.qparams_shape(())))
    return out


def init_learnable_params(config: QuantConfig, kernel_shape) -> tuple[dict, LearnableStats]:
    """Parameters (before calibration: scale 1, zero point 0 / alpha ``qmax - z``) and
    statistics of a learnable layer with a kernel of ``kernel_shape``.

    Activation specs must be per-tensor (one learnable qparam per tensor).

    >>> from qjax.flax import qjax_recommended
    >>> params, st = init_learnable_params(qjax_recommended().replace(grad="lsq"), (3, 2))
    >>> sorted(params), params["weight"]["scale"].shape, sorted(params["input"])
    (['input', 'weight'], (2,), ['scale', 'zero_point'])
    """
    params = {n: _tensor_init(s, config.grad, sh) for n, s, _, sh in _tensors(config, kernel_shape)}
    stats = _core.init_layer_stats(config, kernel_shape)
    return params, LearnableStats(layer=stats, init=params)


def tensor_qparams(p: dict, spec: QuantSpec, grad: str) -> QParams:
    """The :class:`~qjax.QParams` a tensor's learnable parameters stand for (table above).

    >>> qp = tensor_qparams({"alpha": jnp.float32(6.0)}, QuantSpec(signed=False), "pact")
    >>> float(qp.scale), int(qp.zero_point)
    (0.0235294122248888, 0)
    """
    f32 = jnp.float32
    if grad == "pact":
        z = _pact_zero_point(spec)
        scale = jnp.maximum(p["alpha"], f32(EPS)) / f32(spec.qmax - z)
        return QParams(scale, jnp.full(jnp.shape(scale), z, jnp.int32), spec)
    scale = jnp.maximum(p["scale"], f32(EPS))
    if "zero_point" in p:
        return QParams(scale, p["zero_point"], spec)
    return QParams(scale, jnp.full(jnp.shape(scale), spec.symmetric_zero_point(), jnp.int32), spec)


def _from_observer(qp: QParams, spec: QuantSpec, grad: str) -> dict:
    s = jnp.asarray(qp.scale, jnp.float32)
    z = jnp.asarray(qp.zero_point).astype(jnp.float32)
    if grad == "pact":
        return {"alpha": s * (jnp.float32(spec.qmax) - z)}
    out = {"scale": s}
    if not spec.symmetric:
        out["zero_point"] = z
    return out


def _learnable_tensor(x, which, params, stats, spec, factory, config, mode, switches, name):
    """Observe ``x`` (updating stats and their ``init``), then fake-quantize it with
    the learnable parameters ``params[which]``."""
    layer, init = stats.layer, stats.init
    st = getattr(layer, which)
    if mode.observes and switches.observe:
        _, st = _core.quantize_tensor(
            x, st, spec, factory, config, Mode.CALIBRATE, switches, name=f"{name} ({which})"
        )
        qp = factory(spec, config.compat).qparams(st)
        init = {**init, which: jax.lax.stop_gradient(_from_observer(qp, spec, config.grad))}
        layer = layer._replace(**{which: st})
    if mode.fake_quantizes and switches.fake_quant:
        qp = tensor_qparams(params[which], spec, config.grad)
        gs = "auto" if config.grad == "lsq" else None
        x = fake_quant(x, qp, grad=config.grad, compat=config.fake_quant_compat, grad_scale=gs)
    return x, LearnableStats(layer, init)


def learnable_op(
    op,
    lhs: jax.Array,
    rhs: jax.Array,
    params: dict,
    stats: LearnableStats,
    config: QuantConfig,
    mode: Mode,
    switches: _core.Switches = _ALL_ON,
    *,
    name: str = "layer",
    **op_kwargs,
) -> tuple[jax.Array, LearnableStats]:
    """``op(fq(lhs), fq(rhs), **op_kwargs)`` with learnable qparams; new statistics.

    >>> from jax import lax
    >>> from qjax.flax import qjax_recommended
    >>> cfg = qjax_recommended().replace(grad="lsq")
    >>> params, st = init_learnable_params(cfg, (2, 3))
    >>> y, st = learnable_op(lax.dot_general, jnp.ones((1, 2)), jnp.ones((2, 3)), params,
    ...                      st, cfg, Mode.CALIBRATE,
    ...                      dimension_numbers=(((1,), (0,)), ((), ())))
    >>> y.tolist(), int(st.layer.input.count), st.init["weight"]["scale"].tolist()
    ([[2.0, 2.0, 2.0]], 1, [0.007874015718698502, 0.007874015718698502, 0.007874015718698502])
    """
    mode = as_mode(mode)
    if not isinstance(stats, LearnableStats):
        raise TypeError(f"{name}: stats must be LearnableStats, got {type(stats).__name__}")
    rest = (config, mode, switches, name)
    x = lhs
    if config.quantize_input and config.activation is not None:
        spec, fac = config.activation, config.activation_observer
        x, stats = _learnable_tensor(x, "input", params, stats, spec, fac, *rest)
    w = rhs
    if config.weight is not None:
        spec, fac = config.weight, config.weight_observer
        w, stats = _learnable_tensor(w, "weight", params, stats, spec, fac, *rest)
    return op(x.astype(lhs.dtype), w.astype(rhs.dtype), **op_kwargs), stats


def learnable_output(y, params, stats, config, mode, switches=_ALL_ON, *, name="layer"):
    """The output quantizer (``config.quantize_output``) with learnable qparams.

    >>> from qjax.flax import default_qat_qconfig
    >>> cfg = default_qat_qconfig("x86").replace(grad="pact")
    >>> params, st = init_learnable_params(cfg, (2, 3))
    >>> sorted(params)
    ['output', 'weight']
    """
    if not (config.quantize_output and config.activation is not None):
        return y, stats
    mode = as_mode(mode)
    spec, fac = config.activation, config.activation_observer
    rest = (config, mode, switches, name)
    out, stats = _learnable_tensor(y, "output", params, stats, spec, fac, *rest)
    return out.astype(y.dtype), stats
