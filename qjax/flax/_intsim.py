"""The int8 server's layer formula, shared by QAT (``QuantConfig.scheme``) and serving.

One implementation, two callers: the Flax layers (when ``config.scheme`` is set, their
forward *value* in ``QAT``/``FROZEN`` is this formula) and :func:`qjax.convert` (the
served program calls the same :func:`apply_layer` on the same prepared weights). For a
layer with input qparams ``qp_x``, weight qparams ``qp_w``, output qparams ``qp_y``::

    x_q  = fake_quant_codes(x, qp_x)                # codes with dequantize == fake_quant
    w_q  = fake_quant_codes(w, qp_w)                # int8 kernel (BN folded first)
    y_q  = requant_scheme(Σ (x_q - zp_x)(w_q - zp_w), b)   # qjax.kernels, int32 acc
    y    = dequantize(y_q, qp_y)

``fake_quant_codes`` are the codes whose dequantization *is* ``qjax.fake_quant(x, qp,
compat)`` (torch's fake-quant rounds ``x·inv`` then adds the zero point, which is
``compat="qjax"``'s quantize with half-even rounding; they differ only for NaN).

BN folding (:func:`fold_bn`, torch's ``fuse_conv_bn_weights`` with the running
statistics): ``f = gamma / sqrt(var + eps)``, ``w' = w·f``, ``b' = (b - mean)·f + beta``,
each formed in float64 and rounded once to float32, so the folded weights are the same
numbers eagerly and under ``jit`` (where XLA may otherwise turn ``a / sqrt(v)`` into
``a·rsqrt(v)`` or contract ``a·f + beta`` into an fma).

Which schemes keep the promise (frozen forward == served output, bit for bit): all of
:data:`qjax.kernels.SCHEMES`, because both sides call the same kernel on the same codes
and qparams. The float schemes (``"fbgemm"``, ``"qnnpack"``, ``"onednn"``) are guarded
against XLA's rewrites (:mod:`qjax._float`), so they round identically in the training
program, the served program and eagerly; the fixed-point ones (``"tflite"``,
``"tflite_single_rounding"``, ``"litert_ref"``, ``"litert"``) are integer-only.
``"exact"`` runs on the host (``jax.pure_callback``): it works under ``jit`` in both
paths (and under ``grad``: its value sits behind ``stop_gradient``), but is slow and
cannot be serialized by ``jax.export`` (host callbacks are not). What the promise does
not cover: ``scheme=None`` layers (a float simulation, within one output step),
``AvgPool`` (float mean vs the kernel's rounded integer mean), and ``QuantConvBn``
while BN trains on batch statistics (the integer formula uses the running ones).

In QAT the float straight-through path still gives the gradient:
``y = y_int + (y_float - stop_gradient(y_float))``, whose value is ``y_int`` exactly
(``y_float - y_float = 0`` for the finite fake-quant outputs).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from .. import kernels
from .._float import div_ieee, materialize
from .._primitives import QCompat, dequantize, quantize
from .._qarray import QArray
from .._spec import QParams
from ..kernels._choice import conv_kernel, linear_kernel
from ._config import Mode, QuantConfig, as_mode

__all__ = [
    "apply_layer",
    "conv_geometry",
    "fake_quant_codes",
    "fold_bn",
    "integer_override",
    "layer_qparams",
    "prepare_weight",
]


def fake_quant_codes(x: jax.Array, qp: QParams, compat: QCompat = "qjax") -> jax.Array:
    """Integer codes ``q`` with ``dequantize(q, qp) == fake_quant(x, qp, compat=compat)``.

    ``q = clamp(round(x·f32(1/s)) + z)`` (``"qjax"`` and ``"torch"``: torch's fake-quant
    rule 4 is the qjax quantize with half-even rounding), ``clamp(round_half_away(x/s) +
    z)`` for ``"tflite"``. Float in, ``qp.spec.dtype`` out.

    >>> from qjax import QuantSpec, QParams, fake_quant
    >>> qp = QParams(0.1, 3, QuantSpec(signed=False))
    >>> x = jnp.array([-0.35, 0.05, 0.25, 30.0])
    >>> q = fake_quant_codes(x, qp, "torch")
    >>> q, bool((dequantize(q, qp) == fake_quant(x, qp, compat="torch")).all())
    (Array([  0,   3,   5, 255], dtype=uint8), True)
    """
    if compat not in ("qjax", "torch", "tflite"):
        raise ValueError(f"fake_quant_codes: unknown compat {compat!r}")
    return quantize(x, qp, compat="qjax" if compat == "torch" else compat)


def layer_qparams(stats, config: QuantConfig) -> tuple[QParams | None, QParams, QParams | None]:
    """``(input, weight, output)`` qparams of a layer from its observer states (the same
    qparams its fake-quant uses; ``None`` where the config has no such quantizer).

    >>> from qjax.flax import qjax_recommended
    >>> from qjax.flax._core import init_layer_stats
    >>> qx, qw, qy = layer_qparams(init_layer_stats(qjax_recommended(), (3, 2)),
    ...                            qjax_recommended())
    >>> qw.scale.shape, qy is None
    ((2,), True)
    """

    def qp(state, spec, factory):
        if state is None or spec is None:
            return None
        return factory(spec, config.compat).qparams(state)

    act, aobs = config.activation, config.activation_observer
    return (
        qp(stats.input, act, aobs),
        qp(stats.weight, config.weight, config.weight_observer),
        qp(stats.output, act, aobs),
    )


def fold_bn(kernel, conv_bias, gamma, beta, mean, var, eps: float):
    """BN folded into a channels-last conv: ``(w·f, (b - mean)·f + beta)``,
    ``f = gamma/sqrt(var + eps)``, formed in float64 and rounded once to float32.

    >>> w, b = fold_bn(jnp.ones((1, 1, 1, 2)), None, jnp.array([2.0, 1.0]),
    ...                jnp.array([0.5, 0.0]), jnp.array([1.0, 0.0]), jnp.array([4.0, 1.0]), 0.0)
    >>> w.ravel(), b
    (Array([1., 1.], dtype=float32), Array([-0.5,  0. ], dtype=float32))
    """
    with jax.enable_x64(True):
        f64 = jnp.float64
        std = jnp.sqrt(jnp.asarray(var, f64) + f64(eps))
        factor = div_ieee(jnp.asarray(gamma, f64), std)
        w = (jnp.asarray(kernel, f64) * factor).astype(jnp.float32)
        b = -jnp.asarray(mean, f64)
        if conv_bias is not None:
            b = jnp.asarray(conv_bias, f64) + b
        # materialize: no fma contraction of (b·f) + beta, the same sum eager and jitted
        b = (materialize(b * factor) + jnp.asarray(beta, f64)).astype(jnp.float32)
    return w, b


def conv_geometry(conv_kwargs: dict, name: str) -> dict:
    """``qjax.kernels.quantized_conv`` keywords from ``lax.conv_general_dilated``'s
    (channels-last 1-D/2-D only).

    >>> conv_geometry(dict(window_strides=(1, 2), padding="SAME",
    ...                    dimension_numbers=("NHWC", "HWIO", "NHWC")), "c")
    {'stride': (1, 2), 'padding': 'SAME', 'layout': 'NHWC'}
    """
    dn = conv_kwargs.get("dimension_numbers")
    layout = dn[0] if dn else None
    if layout not in ("NHWC", "NWC"):
        raise ValueError(
            f"{name}: the int8 conv serves channels-last 1-D/2-D convolutions (NWC, NHWC), "
            f"got dimension_numbers={dn}"
        )
    pad = conv_kwargs["padding"]
    if not isinstance(pad, str):
        pad = tuple(tuple(int(v) for v in p) for p in pad)
    return {
        "stride": tuple(int(s) for s in conv_kwargs["window_strides"]),
        "padding": pad,
        "layout": layout,
    }


def prepare_weight(
    kind: str, kernel, w_qp: QParams, compat: QCompat, name: str, *, native: str = "xla"
):
    """Quantize a Flax kernel (``(in, out)`` or ``HWIO``) to int8 codes and prepare it:
    a :class:`~qjax.kernels.PreparedLinear` (``kind="linear"``) or
    :class:`~qjax.kernels.PreparedConv` (``"conv"``).

    ``native``: ``"xla"`` or ``"amx"`` (already resolved, :mod:`qjax.kernels._choice`);
    ``"amx"`` prepares linear layers and 2-D convs for the native AMX kernel, 1-D convs
    keep XLA (the prepared weight's ``kernel`` says which).

    >>> from qjax import QuantSpec, QParams
    >>> qp = QParams(jnp.array([0.1, 0.2]), jnp.array([0, 0]), QuantSpec(symmetric=True, axis=-1))
    >>> prepare_weight("linear", jnp.array([[0.1, -0.4], [0.3, 0.2]]), qp, "qjax", "fc").col_sum
    Array([ 4, -1], dtype=int32)
    """
    spec = w_qp.spec
    if spec.dtype != jnp.int8:
        raise TypeError(f"{name}: the int8 server needs int8 weights, got a {spec} weight spec")
    codes = fake_quant_codes(jnp.asarray(kernel, jnp.float32), w_qp, compat)
    if spec.granularity == "axis":  # the kernels want the output axis spelled positively
        spec = spec.replace(axis=kernel.ndim - 1)
    wq = QArray(codes, QParams(w_qp.scale, w_qp.zero_point, spec))
    if kind == "linear":
        return kernels.prepare_linear(wq, name=name, kernel=linear_kernel(native))
    if kind == "conv":
        layout = "HWIO" if kernel.ndim == 4 else "WIO"
        k = conv_kernel(native, kernel.ndim - 2)
        return kernels.prepare_conv(wq, name=name, weight_layout=layout, kernel=k)
    raise ValueError(f"{name}: unknown layer kind {kind!r}")


def apply_layer(
    kind: str,
    x: QArray,
    prepared,
    bias,
    out_qp: QParams,
    *,
    scheme: str,
    relu: bool = False,
    geometry: dict | None = None,
    name: str = "layer",
) -> QArray:
    """The int8 layer: :func:`qjax.kernels.quantized_linear` or
    :func:`qjax.kernels.quantized_conv` (``geometry`` from :func:`conv_geometry`), with
    ReLU fused into the requantization clamp.

    >>> from qjax import QuantSpec, QParams
    >>> qp = QParams(jnp.array([0.1, 0.2]), jnp.array([0, 0]), QuantSpec(symmetric=True, axis=-1))
    >>> pw = prepare_weight("linear", jnp.array([[0.1, -0.4], [0.3, 0.2]]), qp, "qjax", "fc")
    >>> x = QArray(jnp.array([[10, -20]], jnp.int8), QParams(0.05, 0, QuantSpec()))
    >>> out = QParams(0.01, 0, QuantSpec())
    >>> apply_layer("linear", x, pw, None, out, scheme="fbgemm", relu=True).values
    Array([[0, 0]], dtype=int8)
    """
    act = "relu" if relu else None
    if kind == "linear":
        return kernels.quantized_linear(
            x, prepared, bias, out_qp, scheme=scheme, activation=act, name=name
        )
    g = geometry or {}
    return kernels.quantized_conv(
        x,
        prepared,
        bias,
        out_qp,
        stride=g.get("stride", 1),
        padding=g.get("padding", 0),
        layout=g.get("layout", "NHWC"),
        scheme=scheme,
        activation=act,
        name=name,
    )


def integer_override(
    y: jax.Array,
    x: jax.Array,
    kernel: jax.Array,
    bias: jax.Array | None,
    stats: Any,
    config: QuantConfig,
    mode: Mode,
    fake_quant: bool,
    *,
    kind: str,
    conv_kwargs: dict | None = None,
    relu: bool = False,
    name: str = "layer",
    active: bool = True,
) -> jax.Array:
    """``y`` (the float simulation) with its value replaced by the integer formula.

    Applies when ``config.scheme`` is set, the mode fake-quantizes and the layer's
    ``fake_quant`` switch is on (and ``active``: Linen's ``init`` and BN in training
    mode pass ``False``); otherwise returns ``y``. The gradient is ``y``'s.

    >>> from qjax.flax import Mode, default_qat_qconfig
    >>> from qjax.flax._core import init_layer_stats, quantize_tensor
    >>> cfg = default_qat_qconfig("x86").replace(quantize_input=True, scheme="fbgemm")
    >>> st = init_layer_stats(cfg, (2, 2))
    >>> x, w = jnp.array([[0.5, -1.0]]), jnp.eye(2)
    >>> y = integer_override(x, x, w, None, st, cfg, Mode.FLOAT, True, kind="linear")
    >>> bool((y == x).all())   # FLOAT mode: untouched
    True
    """
    mode = as_mode(mode)
    if config.scheme is None or not (active and mode.fake_quantizes and fake_quant):
        return y
    qx, qw, qy = layer_qparams(stats, config)
    compat = config.fake_quant_compat
    geometry = conv_geometry(conv_kwargs, name) if kind == "conv" else None
    xq = QArray(fake_quant_codes(x, qx, compat), qx)
    pw = prepare_weight(kind, kernel, qw, compat, name)
    yq = apply_layer(
        kind, xq, pw, bias, qy, scheme=config.scheme, relu=relu, geometry=geometry, name=name
    )
    y_int = dequantize(yq.values, yq.qparams).astype(y.dtype)
    return y_int + (y - lax.stop_gradient(y))
