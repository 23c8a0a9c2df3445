"""``qjax.convert`` of a Flax ``Sequential``: the served program of :mod:`qjax.flax._serve`.

(:func:`qjax.convert` hands a ``Sequential`` here, so its result can be saved with
:func:`qjax.save_served`; any other model is traced and lowered to a :class:`~qjax.Program`
by :mod:`qjax.flax._convert`.)

The model is an ``nnx.Sequential`` (or a Linen ``nn.Sequential`` with its variables,
passed as ``(module, variables)``) of qjax layers: ``QuantStub``/``ActQuant``,
``QuantLinear``/``QuantDense``, ``QuantConv``, ``QuantConvBn`` (BN folded with the
running statistics, as torch's ``convert``), ``DeQuantStub``, ReLU (``nnx.relu`` /
``nn.relu``, fused into the preceding layer's requantization clamp), ``MaxPool``,
``AvgPool``, ``Flatten`` (:mod:`qjax.flax._pooling`). Each layer's qparams are read from
its observer statistics exactly as its fake-quant reads them, and the weights are
prepared with :mod:`qjax.flax._intsim`, the formula ``QuantConfig(scheme=...)`` layers
train with, so those layers serve exactly what they computed in ``Mode.FROZEN``.

Where a layer's output qparams come from: its own output quantizer
(``quantize_output=True``), else the next quantizer in the sequence (an ``ActQuant`` or
the next layer's input quantizer; a ReLU in between is fused). A layer whose input
quantizer differs from the codes it receives re-quantizes them (elementwise).

Errors name the module path and the fix: unknown layers, observers that never saw data
(``count == 0``), non-finite statistics, a float tensor reaching an integer layer, a
layer without output qparams, a ``config.scheme`` that differs from ``scheme``.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import nnx

from ..kernels._choice import resolve_kernel
from . import _pooling
from . import linen as qlinen
from . import nnx as qnnx
from ._config import QuantConfig
from ._intsim import conv_geometry, fold_bn, layer_qparams, prepare_weight
from ._lower import check_stats
from ._serve import ServedModel, _freeze
from ._walk import linen_kind, nnx_classify

__all__ = ["NotServable", "convert_sequential", "is_sequential"]

_RELUS = (jax.nn.relu, nnx.relu, nn.relu)


@dataclasses.dataclass
class _View:
    """One element of the sequence, framework-independent."""

    kind: str  # quant, dequant, linear, conv, relu, max_pool, avg_pool, flatten
    path: str
    config: QuantConfig | None = None
    stats: Any = None
    kernel: Any = None
    bias: Any = None
    bn: tuple | None = None  # (gamma, beta, mean, var, eps)
    relu: bool = False
    conv_kwargs: dict | None = None
    pool: dict | None = None


def _conv_kw(kernel, strides, padding) -> dict:
    n = kernel.ndim - 2
    strides = (strides,) * n if isinstance(strides, int) else tuple(strides)
    sp = "HWD"[:n]
    return dict(
        window_strides=strides,
        padding=padding if isinstance(padding, str) else tuple(map(tuple, padding)),
        dimension_numbers=("N" + sp + "C", sp + "IO", "N" + sp + "C"),
    )


def _pool_view(m, path) -> _View:
    pad = m.padding
    if isinstance(pad, str):
        if pad.upper() != "VALID":
            raise ValueError(f"{path}: served pooling supports padding 'VALID' or ((p, p), (p, p))")
        pad = 0
    else:
        pairs = [tuple(p) for p in pad]
        if len(pairs) != 2 or any(lo != hi for lo, hi in pairs):
            raise ValueError(f"{path}: served pooling needs symmetric 2-D padding, got {pad}")
        pad = [pairs[0][0], pairs[1][0]]
    window = list(m.window_shape)
    strides = list(window if m.strides is None else m.strides)
    kind = "max_pool" if m.kind == "max" else "avg_pool"
    return _View(kind, path, pool={"window": window, "strides": strides, "padding": pad})


class NotServable(ValueError):
    """A Sequential element the Sequential server does not know (``qjax.convert`` then
    traces the model instead)."""


def _unknown(m, path) -> ValueError:
    return NotServable(
        f"convert: {path} is a {type(m).__name__}, which the int8 server cannot run; use "
        "QuantStub/ActQuant, QuantLinear (QuantDense), QuantConv, QuantConvBn, "
        "DeQuantStub, relu, qjax.flax MaxPool/AvgPool/Flatten"
    )


def _nnx_views(model) -> list[_View]:
    if not isinstance(model, nnx.Sequential):
        raise TypeError(
            f"convert: expects an nnx.Sequential (or (linen nn.Sequential, variables)), "
            f"got {type(model).__name__}"
        )
    views = []
    for i, m in enumerate(model.layers):
        path = f"layers/{i}"
        c = nnx_classify(m)
        kind = c[0] if c is not None and c[1] is m else None  # a hooked stock layer: unknown
        if kind == "act":
            views.append(_View("quant", path, m.config, m.quant_stats.get_value()))
        elif isinstance(m, qnnx.DeQuantStub):
            views.append(_View("dequant", path))
        elif kind == "linear":
            b = None if m.bias is None else m.bias[...]
            views.append(
                _View("linear", path, m.config, m.quant_stats.get_value(), m.kernel[...], b)
            )
        elif kind in ("conv", "conv_bn"):
            k = m.kernel[...]
            v = _View("conv", path, m.config, m.quant_stats.get_value(), k)
            v.bias = None if m.bias is None else m.bias[...]
            v.conv_kwargs = _conv_kw(k, m.strides, m.padding)
            if kind == "conv_bn":
                v.bn = (m.bn_scale[...], m.bn_bias[...], m.bn_mean[...], m.bn_var[...])
                v.bn += (m.epsilon,)
                v.relu = m.relu
            views.append(v)
        elif any(m is r for r in _RELUS):
            views.append(_View("relu", path))
        elif isinstance(m, _pooling.MaxPool):
            views.append(_pool_view(m, path))
        elif isinstance(m, _pooling.Flatten):
            views.append(_View("flatten", path))
        else:
            raise _unknown(m, path)
    return views


def _linen_views(module, variables) -> list[_View]:
    if not isinstance(module, nn.Sequential):
        raise TypeError(
            f"convert: (module, variables) needs a linen nn.Sequential, got {type(module).__name__}"
        )
    params = variables.get("params", {})
    qstats = variables.get("quant_stats", {})
    bstats = variables.get("batch_stats", {})
    views = []
    for i, m in enumerate(module.layers):
        name = f"layers_{i}"
        p = params.get(name, {})

        def stats(m=m, name=name):
            if name not in qstats:
                raise ValueError(
                    f"convert: {name} ({type(m).__name__}) has no 'quant_stats' in the "
                    "variables; pass the variables returned by init/calibrate (all collections)"
                )
            return qstats[name]["stats"]

        kind = linen_kind(m)
        if kind == "act":
            views.append(_View("quant", name, m.config, stats()))
        elif isinstance(m, qlinen.DeQuantStub):
            views.append(_View("dequant", name))
        elif kind == "linear":
            b = p["bias"] if m.use_bias else None
            views.append(_View("linear", name, m.config, stats(), p["kernel"], b))
        elif kind in ("conv", "conv_bn"):
            k = p["kernel"]
            v = _View("conv", name, m.config, stats(), k, p.get("bias") if m.use_bias else None)
            v.conv_kwargs = _conv_kw(k, m.strides, m.padding)
            if kind == "conv_bn":
                bs = bstats[name]
                v.bn = (p["bn_scale"], p["bn_bias"], bs["bn_mean"], bs["bn_var"], m.epsilon)
                v.relu = m.relu
            views.append(v)
        elif any(m is r for r in _RELUS):
            views.append(_View("relu", name))
        elif isinstance(m, _pooling.LinenMaxPool):
            views.append(_pool_view(m, name))
        elif isinstance(m, _pooling.LinenFlatten):
            views.append(_View("flatten", name))
        else:
            raise _unknown(m, name)
    return views


def _check_stats(v: _View) -> None:
    check_stats(v.stats, v.path)


def _act_qp(v: _View):
    cfg = v.config
    return cfg.activation_observer(cfg.activation, cfg.compat).qparams(v.stats)


@jax.jit
def _fold(kernel, bias, gamma, beta, mean, var, eps):
    return fold_bn(kernel, bias, gamma, beta, mean, var, eps)


def _layer_step(views, i, scheme, stream, consumed, native) -> tuple[dict, dict, int]:
    """The step for the layer ``views[i]``; returns (step, params, next index)."""
    v = views[i]
    cfg = v.config
    _check_stats(v)
    if cfg.scheme is not None and cfg.scheme != scheme:
        raise ValueError(
            f"convert: {v.path} trained with QuantConfig(scheme={cfg.scheme!r}); convert with "
            f"scheme={cfg.scheme!r} to serve what it trained"
        )
    if cfg.weight is None or cfg.activation is None:
        raise ValueError(f"convert: {v.path} has a float weight or activation (config {cfg})")
    qx, qw, qy = layer_qparams(v.stats, cfg)
    in_qp = None if i in consumed else qx
    if in_qp is None and stream != "codes":
        raise ValueError(
            f"convert: {v.path} receives a float tensor but has no input quantizer; put a "
            "QuantStub before it or use a config with quantize_input=True"
        )
    kernel, bias = jnp.asarray(v.kernel, jnp.float32), v.bias
    if v.bn is not None:
        kernel, bias = _fold(kernel, bias, *v.bn[:4], v.bn[4])
    relu, j = v.relu, i + 1
    if j < len(views) and views[j].kind == "relu":
        relu, j = True, j + 1
    if qy is None:  # the output qparams are the next quantizer's
        nxt = views[j] if j < len(views) else None
        if nxt is not None and nxt.kind == "quant":
            _check_stats(nxt)
            qy, j = _act_qp(nxt), j + 1
        elif nxt is not None and nxt.kind in ("linear", "conv") and nxt.config.quantize_input:
            _check_stats(nxt)
            qy = layer_qparams(nxt.stats, nxt.config)[0]
            consumed.add(j)
        else:
            raise ValueError(
                f"convert: {v.path} has no output quantizer (quantize_output=False) and is "
                "not followed by one; add an ActQuant after it or use quantize_output=True"
            )
    name = v.path
    pw = prepare_weight(v.kind, kernel, qw, cfg.fake_quant_compat, name, native=native)
    step = {"op": v.kind, "name": name, "scheme": scheme, "relu": bool(relu)}
    step["compat"] = cfg.fake_quant_compat
    if v.kind == "conv":
        step["geometry"] = conv_geometry(v.conv_kwargs, name)
    b = None if bias is None else jnp.asarray(bias, jnp.float32)
    return step, {"in_qp": in_qp, "w": pw, "b": b, "out_qp": qy}, j


def is_sequential(model) -> bool:
    """Whether ``model`` is an ``nnx.Sequential`` or a ``(linen nn.Sequential, variables)``."""
    if isinstance(model, tuple) and len(model) == 2:
        return isinstance(model[0], nn.Sequential)
    return isinstance(model, nnx.Sequential)


def convert_sequential(
    model, example_input, *, scheme: str = "fbgemm", kernel: str = "xla"
) -> ServedModel:
    """Convert a calibrated / QAT-trained qjax ``Sequential`` into an int8 program.

    ``y = served(x)``: float32 ``(batch, *example_input.shape[1:])`` in, float32 out (the
    dequantized output codes); every dot/conv inside is int8 x int8 -> int32 followed by
    :func:`qjax.kernels.requantize` with ``scheme`` (module docstring of
    :mod:`qjax.flax._serve`). Layers trained with ``QuantConfig(scheme=scheme)`` serve
    exactly their ``Mode.FROZEN`` outputs (frozen BN); with ``scheme=None`` configs the
    float simulation can differ from the served codes by one step at rounding ties.

    ``kernel`` picks the int32 dot/conv kernel (:mod:`qjax.kernels._choice`): ``"xla"``
    (default; ``jax.export``-able), ``"amx"`` (the native AMX kernel of
    :func:`qjax.kernels.native_status` for linear layers and 2-D convs; 1-D convs keep
    XLA; ``RuntimeError`` with the reason when it cannot run here) or ``"auto"`` (AMX
    where available, else XLA). The codes are the same; ``served.kernels`` records
    ``{layer: "amx" | "xla"}``. A model with AMX layers cannot be ``jax.export``-ed.

    Args:
      model: an ``nnx.Sequential`` or ``(linen nn.Sequential, variables)``.
      example_input: a float array with the served input's shape (batch may differ).
      scheme: a key of :data:`qjax.kernels.SCHEMES`.
      kernel: ``"xla"``, ``"amx"`` or ``"auto"``.

    >>> from flax import nnx
    >>> from qjax.flax import default_qat_qconfig, nnx as qnnx
    >>> cfg = default_qat_qconfig("x86")
    >>> model = nnx.Sequential(qnnx.QuantStub(cfg), qnnx.QuantLinear(3, 2, config=cfg,
    ...                        rngs=nnx.Rngs(0)), nnx.relu, qnnx.DeQuantStub())
    >>> x = jnp.linspace(-1, 1, 12).reshape(4, 3)
    >>> qnnx.calibrate(model, [x], progress=False)
    1
    >>> served = convert_sequential(model, x)
    >>> [s["op"] for s in served.steps], served(x).shape
    (['quantize', 'linear', 'dequantize'], (4, 2))
    >>> served.kernels
    {'layers/1': 'xla'}
    >>> bool((convert_sequential(model, x, kernel="auto")(x) == served(x)).all())
    True
    """
    from ..kernels import SCHEMES

    if scheme not in SCHEMES:
        raise ValueError(f"convert: unknown scheme {scheme!r}; known: {sorted(SCHEMES)}")
    native = resolve_kernel(kernel, "qjax.convert")
    if isinstance(model, tuple) and len(model) == 2:
        views = _linen_views(*model)
    else:
        views = _nnx_views(model)
    x = jnp.asarray(example_input)
    if not jnp.issubdtype(x.dtype, jnp.floating) or x.ndim < 1:
        raise TypeError(
            f"convert: example_input must be a float array (batch, ...), got {x.dtype} {x.shape}"
        )
    steps, params = [], []
    stream, consumed, i = "float", set(), 0
    while i < len(views):
        v = views[i]
        if v.kind == "quant":
            _check_stats(v)
            compat = v.config.fake_quant_compat
            steps.append({"op": "quantize", "name": v.path, "compat": compat})
            params.append({"qp": _act_qp(v)})
            stream, i = "codes", i + 1
            continue
        if v.kind in ("linear", "conv"):
            step, p, i = _layer_step(views, i, scheme, stream, consumed, native)
            steps.append(step)
            params.append(p)
            stream = "codes"
            continue
        if v.kind == "dequant":
            if stream == "codes":
                steps.append({"op": "dequantize", "name": v.path})
                params.append({})
            stream, i = "float", i + 1
            continue
        if stream != "codes":
            raise ValueError(
                f"convert: {v.path} ({v.kind}) runs on a float tensor; the int8 server runs it "
                "on codes: put it after a QuantStub/quantized layer (before the DeQuantStub)"
            )
        step = {"op": v.kind, "name": v.path}
        if v.pool is not None:
            step.update(v.pool)
            step["scheme"] = scheme if scheme in ("fbgemm", "onednn", "qnnpack") else "fbgemm"
        steps.append(step)
        params.append({})
        i += 1
    served = ServedModel(_freeze(json.loads(json.dumps(steps))), tuple(params), x.shape[1:])
    served(x)  # traces once: shape errors surface now, with the module path
    return served
