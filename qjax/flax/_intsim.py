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
import numpy as np
from jax import lax

from .. import kernels
from .._float import div_ieee, materialize
from .._primitives import QCompat, dequantize, quantize
from .._qarray import QArray
from .._spec import QParams
from ..kernels._choice import conv_kernel, linear_kernel
from . import _record
from ._config import Mode, QuantConfig, as_mode

__all__ = [
    "apply_layer",
    "conv_geometry",
    "fake_quant_codes",
    "fold_bn",
    "hook_override",
    "integer_override",
    "einsum_layout",
    "layer_mark",
    "prepare_layer",
    "run_layer",
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
    (channels-last 1-D/2-D only; ``dimension_numbers`` as strings or as the
    ``ConvDimensionNumbers`` that ``nnx.Conv`` passes its hook).

    >>> conv_geometry(dict(window_strides=(1, 2), padding="SAME",
    ...                    dimension_numbers=("NHWC", "HWIO", "NHWC")), "c")
    {'stride': (1, 2), 'padding': 'SAME', 'layout': 'NHWC', 'dilation': (1, 1), 'groups': 1}
    """
    dn = conv_kwargs.get("dimension_numbers")
    strides = tuple(int(v) for v in conv_kwargs["window_strides"])
    n = len(strides)
    layout = {1: "NWC", 2: "NHWC"}.get(n)
    if isinstance(dn, lax.ConvDimensionNumbers):
        channels_last = tuple(dn.lhs_spec) == (0, n + 1, *range(1, n + 1))
        hwio = tuple(dn.rhs_spec) == (n + 1, n, *range(n))
        ok = channels_last and hwio and tuple(dn.out_spec) == tuple(dn.lhs_spec)
    else:
        ok = dn is not None and tuple(dn) == (layout, "HWIO"[2 - n :], layout)
    if layout is None or not ok:
        raise ValueError(
            f"{name}: the int8 conv serves channels-last 1-D/2-D convolutions (NWC, NHWC "
            f"with WIO/HWIO kernels), got dimension_numbers={dn}"
        )
    lhs_dil = conv_kwargs.get("lhs_dilation") or (1,) * n
    if any(int(v) != 1 for v in lhs_dil) or conv_kwargs.get("batch_group_count", 1) != 1:
        raise ValueError(
            f"{name}: the int8 conv has no input dilation or batch groups (got "
            f"lhs_dilation={lhs_dil}, batch_group_count={conv_kwargs.get('batch_group_count')})"
        )
    pad = conv_kwargs["padding"]
    if not isinstance(pad, str):
        pad = tuple(tuple(int(v) for v in p) for p in pad)
    dil = conv_kwargs.get("rhs_dilation") or (1,) * n
    return {
        "stride": strides,
        "padding": pad,
        "layout": layout,
        "dilation": tuple(int(v) for v in dil),
        "groups": int(conv_kwargs.get("feature_group_count", 1)),
    }


def prepare_weight(
    kind: str,
    kernel,
    w_qp: QParams,
    compat: QCompat,
    name: str,
    *,
    native: str = "xla",
    groups: int = 1,
    dilation=1,
    x_spec=None,
):
    """Quantize a Flax kernel (``(in, out)`` or ``HWIO``) to int8 codes and prepare it:
    a :class:`~qjax.kernels.PreparedLinear` (``kind="linear"``) or
    :class:`~qjax.kernels.PreparedConv` (``"conv"``).

    ``native``: the resolved wish (:func:`qjax.kernels._choice.resolve_kernel`);
    ``"amx"`` prepares linear layers and 2-D convs for the native AMX kernel, 1-D convs
    keep XLA (the prepared weight's ``kernel`` says which). ``x_spec``: the input's
    activation spec, with which a layer may take the ``"sat16"`` kernel below VNNI
    (:func:`qjax.kernels._choice.exact_on_sat16`).

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
        k = linear_kernel(native, x_spec=x_spec, w=codes)
        return kernels.prepare_linear(wq, name=name, kernel=k)
    if kind == "conv":
        layout = "HWIO" if kernel.ndim == 4 else "WIO"
        k = conv_kernel(native, kernel.ndim - 2, groups, dilation, x_spec=x_spec, w=codes)
        return kernels.prepare_conv(wq, name=name, groups=groups, weight_layout=layout, kernel=k)
    raise ValueError(f"{name}: unknown layer kind {kind!r}")


def apply_layer(
    kind: str,
    x: QArray,
    prepared,
    bias,
    out_qp: QParams | None,
    *,
    scheme: str,
    relu: bool = False,
    geometry: dict | None = None,
    name: str = "layer",
) -> QArray | jax.Array:
    """The int8 layer: :func:`qjax.kernels.quantized_linear` or
    :func:`qjax.kernels.quantized_conv` (``geometry`` from :func:`conv_geometry`), with
    ReLU fused into the requantization clamp; ``out_qp=None``: the float output
    (:func:`qjax.kernels.dequantize_accumulator`, no ReLU).

    >>> from qjax import QuantSpec, QParams
    >>> qp = QParams(jnp.array([0.1, 0.2]), jnp.array([0, 0]), QuantSpec(symmetric=True, axis=-1))
    >>> pw = prepare_weight("linear", jnp.array([[0.1, -0.4], [0.3, 0.2]]), qp, "qjax", "fc")
    >>> x = QArray(jnp.array([[10, -20]], jnp.int8), QParams(0.05, 0, QuantSpec()))
    >>> out = QParams(0.01, 0, QuantSpec())
    >>> apply_layer("linear", x, pw, None, out, scheme="fbgemm", relu=True).values
    Array([[0, 0]], dtype=int8)
    """
    act = "relu" if relu and out_qp is not None else None
    if kind == "linear":
        y = kernels.quantized_linear(
            x, prepared, bias, out_qp, scheme=scheme, activation=act, name=name
        )
        return jnp.maximum(y, 0.0) if relu and out_qp is None else y
    g = geometry or {}
    y = kernels.quantized_conv(
        x,
        prepared,
        bias,
        out_qp,
        stride=g.get("stride", 1),
        padding=g.get("padding", 0),
        dilation=g.get("dilation", 1),
        groups=prepared.groups,
        layout=g.get("layout", "NHWC"),
        scheme=scheme,
        activation=act,
        name=name,
    )
    return jnp.maximum(y, 0.0) if relu and out_qp is None else y


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
    source: str = "qjax.flax",
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
    if not (active and mode.fake_quantizes and fake_quant):
        return y
    info = layer_mark(kind, name, config, source, relu=relu, conv_kwargs=conv_kwargs)
    return _marked_value(y, x, kernel, bias, stats, info)


def layer_mark(
    kind: str,
    name: str,
    config: QuantConfig,
    source: str,
    *,
    relu: bool = False,
    conv_kwargs: dict | None = None,
    dimension_numbers=None,
    shapes=None,
    subscripts: str | None = None,
) -> _record.LayerMark:
    """The :class:`~qjax.flax._record.LayerMark` of a layer: ``kind`` ``"linear"``
    (``dimension_numbers`` and ``shapes=(x.shape, kernel.shape)`` of a ``dot_general``
    hook, or none for ``x @ kernel``; an ``Einsum``'s ``subscripts`` and ``shapes``,
    :func:`einsum_layout`) or ``"conv"`` (``conv_kwargs`` of
    ``lax.conv_general_dilated``). A layer the int8 kernels cannot run gets
    ``unsupported`` (the reason) instead of raising: it stays float when served.

    >>> from qjax.flax import qjax_recommended
    >>> dn = (((2,), (0,)), ((), ()))
    >>> layer_mark("linear", "fc", qjax_recommended(), "nnx.Linear", dimension_numbers=dn,
    ...            shapes=((2, 3, 4), (4, 5))).unsupported is None
    True
    >>> layer_mark("linear", "mix", qjax_recommended(), "nnx.Einsum", subscripts="bnd,ndh->bnh",
    ...            shapes=((2, 3, 4), (3, 4, 5))).unsupported  # doctest: +ELLIPSIS
    "mix: einsum 'bnd,ndh->bnh': axis 'n' of the kernel is a batch axis ..."
    """
    geometry, in_ndim, out_dims, why, perm = None, 1, None, None, None
    if kind == "conv":
        try:
            geometry = conv_geometry(conv_kwargs, name)
        except ValueError as e:
            why = str(e)
    elif subscripts is not None:
        try:
            in_ndim, out_dims, perm = einsum_layout(subscripts, *shapes, name=name)
        except ValueError as e:
            why = str(e)
    elif dimension_numbers is not None:
        (lc, rc), (lb, rb) = dimension_numbers
        (xs, ks), n = shapes, len(lc)
        if (
            lb
            or rb
            or tuple(lc) != tuple(range(len(xs) - n, len(xs)))
            or tuple(rc) != tuple(range(n))
        ):
            why = (
                f"{name}: dot_general dimension_numbers {dimension_numbers}: the int8 linear "
                "contracts the trailing input axes with the leading kernel axes, no batch axes"
            )
        in_ndim, out_dims = n, tuple(ks[n:])
    return _record.LayerMark(
        kind, name, config, source, relu, geometry, in_ndim, out_dims, why, perm
    )


def einsum_layout(subscripts: str, x_shape, kernel_shape, *, name: str = "Einsum"):
    """``(in_ndim, out_dims, perm)``: an ``Einsum`` ``y = einsum(eq, x, kernel)`` as the
    int8 linear layer of :func:`run_layer`::

        y = transpose(reshape(linear(reshape(transpose(x, x_perm), (..., K)),
                                     reshape(transpose(kernel, k_perm), (K, N))),
                              (..., *out_dims)), y_perm)

    ``perm = (x_perm, k_perm, y_perm)`` (``None`` when all three are the identity). The
    kernel's axes are contracted (in ``x`` too, not in the result) or output axes (in the
    result, not in ``x``); ``x``'s other axes go to the result. ``ValueError`` (the
    reason) for what the int8 linear cannot run: a kernel axis also in ``x`` and the
    result (a batch axis), an axis summed over one operand only, a repeated index, no
    contracted axis. ``...`` in ``x`` and the result stands for ``x``'s leading axes.

    >>> einsum_layout("btd,dnh->btnh", (2, 3, 8), (8, 2, 4))
    (1, (2, 4), None)
    >>> einsum_layout("bd,ndh->bnh", (5, 8), (2, 8, 3))
    (1, (2, 3), ((0, 1), (1, 0, 2), (0, 1, 2)))
    >>> einsum_layout("btnh,hnd->bdt", (2, 3, 2, 4), (4, 2, 8))
    (2, (8,), ((0, 1, 3, 2), (0, 1, 2), (0, 2, 1)))
    """
    eq = subscripts.replace(" ", "")
    where = f"{name}: einsum {subscripts!r}"
    if eq.count(",") != 1 or eq.count("->") != 1:
        raise ValueError(f"{where} must be explicit 'x,kernel->out'")
    ops, out = eq.split("->")
    lhs, rhs = ops.split(",")
    if "." in rhs:
        raise ValueError(f"{where}: the kernel operand must name each axis (no '...')")
    if "..." in lhs:  # x's leading axes, under letters the equation does not use
        n = len(x_shape) - (len(lhs) - 3)
        free = [c for c in "ABCDEFGHIJKLMNOPQRSTUVWXYZ" if c not in eq][:n]
        if n < 0 or len(free) < n or out.count("...") != 1:
            raise ValueError(f"{where}: '...' must stand for x's leading axes in x and out")
        lhs, out = lhs.replace("...", "".join(free)), out.replace("...", "".join(free))
    if "." in lhs + out or len(lhs) != len(x_shape) or len(rhs) != len(kernel_shape):
        raise ValueError(
            f"{where} does not fit x {tuple(x_shape)} and kernel {tuple(kernel_shape)}"
        )
    for term in (lhs, rhs, out):
        if len(set(term)) != len(term):
            raise ValueError(f"{where}: a repeated index (a diagonal) is not a linear layer")
    for c in rhs:
        if c in lhs and c in out:
            raise ValueError(
                f"{where}: axis {c!r} of the kernel is a batch axis (in x, the kernel and "
                "the result); the int8 linear has one weight matrix"
            )
        if c not in lhs and c not in out:
            raise ValueError(f"{where}: kernel axis {c!r} is summed over the kernel alone")
    for c in lhs:
        if c not in rhs and c not in out:
            raise ValueError(f"{where}: input axis {c!r} is summed over the input alone")
    contracted = [c for c in rhs if c in lhs]
    k_out = [c for c in rhs if c in out]
    if not contracted:
        raise ValueError(f"{where}: no contracted axis (an outer product)")
    free = [c for c in lhs if c not in rhs]
    x_perm = tuple(lhs.index(c) for c in free + contracted)
    k_perm = tuple(rhs.index(c) for c in contracted + k_out)
    result = free + k_out
    y_perm = tuple(result.index(c) for c in out)
    perm = (x_perm, k_perm, y_perm)
    if all(p == tuple(range(len(p))) for p in perm):
        perm = None
    out_dims = tuple(int(kernel_shape[rhs.index(c)]) for c in k_out)
    return len(contracted), out_dims, perm


# one compile per config and shapes instead of one per small op when the states are concrete
# (the qparams formulas guard their roundings against XLA's rewrites: the same values)
_layer_qparams_jit = jax.jit(layer_qparams, static_argnums=1)


def prepare_layer(info: _record.LayerMark, kernel, stats, *, native: str = "xla", codes_spec=None):
    """``(input qparams, prepared weight, output qparams or None)`` of a marked layer,
    from its float kernel (BN folded) and observer states (:func:`layer_qparams`).
    ``codes_spec``: the spec of the codes the layer reads when it has no input quantizer
    (its kernel choice, :func:`prepare_weight`'s ``x_spec``; a program file loaded back
    derives the same from its steps)."""
    cfg = info.config
    qx, qw, qy = _layer_qparams_jit(stats, cfg)
    g = info.geometry or {}
    if info.perm is not None:  # an Einsum kernel: contracted axes first, as its KernelView
        kernel = jnp.transpose(kernel, info.perm[1])
    if info.op == "linear" and kernel.ndim != 2:  # (*in, *out) -> (prod(in), prod(out))
        k = int(np.prod(kernel.shape[: info.in_ndim], dtype=np.int64))
        kernel = jnp.reshape(kernel, (k, -1))
    pw = prepare_weight(
        info.op, kernel, qw, cfg.fake_quant_compat, info.name, native=native,
        groups=g.get("groups", 1), dilation=g.get("dilation", 1),
        x_spec=codes_spec if qx is None else qx.spec,
    )  # fmt: skip
    return qx, pw, qy


def run_layer(info: _record.LayerMark, xq: QArray, pw, bias, qy, scheme: str):
    """The int8 layer on input codes ``xq``: :func:`apply_layer`, with the input's
    contracted axes flattened (and the output's unflattened) for a multi-axis kernel, and
    an ``Einsum``'s transposes (``info.perm``, :func:`einsum_layout`)."""
    if info.perm is not None:
        xq = QArray(jnp.transpose(xq.values, info.perm[0]), xq.qparams)
    lead = xq.shape[: xq.ndim - info.in_ndim]
    if info.op == "linear" and (info.in_ndim != 1 or len(info.out_dims or (0,)) != 1):
        xq = QArray(jnp.reshape(xq.values, lead + (-1,)), xq.qparams)
    y = apply_layer(
        info.op, xq, pw, bias, qy, scheme=scheme, relu=info.relu, geometry=info.geometry,
        name=info.name,
    )  # fmt: skip
    if info.op == "linear" and info.out_dims is not None and len(info.out_dims) != 1:
        shape = lead + tuple(info.out_dims)
        y = QArray(jnp.reshape(y.values, shape), y.qparams) if qy else jnp.reshape(y, shape)
    if info.perm is not None:
        yp = info.perm[2]
        y = QArray(jnp.transpose(y.values, yp), y.qparams) if qy else jnp.transpose(y, yp)
    return y


def _marked_value(y, x, kernel, bias, stats, info: _record.LayerMark):
    """``y``, or its integer value when the config has a scheme, marked when recording."""
    cfg = info.config
    if cfg.scheme is not None:
        if info.unsupported:
            raise ValueError(f"QuantConfig(scheme={cfg.scheme!r}): {info.unsupported}")
        qx, pw, qy = prepare_layer(info, kernel, stats)
        xq = QArray(fake_quant_codes(x, qx, cfg.fake_quant_compat), qx)
        y_int = run_layer(info, xq, pw, bias, qy, cfg.scheme)
        y_int = y_int if qy is None else dequantize(y_int.values, y_int.qparams)
        y = y_int.astype(y.dtype) + (y - lax.stop_gradient(y))
    if _record.active():
        y = _record.mark(y, {"x": x, "kernel": kernel, "bias": bias, "stats": stats}, info)
    return y


def hook_override(
    y: jax.Array,
    lhs: jax.Array,
    rhs: jax.Array,
    stats: Any,
    config: QuantConfig,
    mode: Mode,
    fake_quant: bool,
    *,
    kind: str,
    op_kwargs: dict,
    name: str,
    source: str,
) -> jax.Array:
    """A ``dot_general`` / conv / einsum hook's value: ``y`` (the float op on
    fake-quantized operands), or with ``config.scheme`` the int8 formula with a float
    output (:func:`qjax.kernels.dequantize_accumulator` ``f32(acc)·f32(s_x·s_w)``; the
    stock layer adds its bias after the hook), with ``y``'s gradient.

    ``kind``: ``"linear"`` (``op_kwargs``: ``dimension_numbers``), ``"conv"``
    (``lax.conv_general_dilated``'s keywords) or ``"einsum"`` (``subscripts``; an
    equation :func:`einsum_layout` refuses keeps ``y``, the float einsum, even with a
    scheme: ``qjax.convert`` then serves it in float and lists the reason).

    >>> from qjax.flax import Mode, qjax_recommended
    >>> from qjax.flax._core import init_layer_stats
    >>> st = init_layer_stats(qjax_recommended(), (2, 2))
    >>> x = jnp.array([[0.5, -1.0]])
    >>> y = hook_override(x, x, jnp.eye(2), st, qjax_recommended(), Mode.FLOAT, True,
    ...                   kind="linear", op_kwargs={}, name="fc", source="nnx.Linear")
    >>> bool((y == x).all())   # FLOAT mode: untouched
    True
    """
    mode = as_mode(mode)
    if not (mode.fake_quantizes and fake_quant):
        return y
    if kind == "einsum":
        info = layer_mark(
            "linear", name, config, source, subscripts=op_kwargs["subscripts"],
            shapes=(lhs.shape, rhs.shape),
        )  # fmt: skip
        if info.unsupported:  # served in float, as computed here (listed with the reason)
            ops = {"x": lhs, "kernel": rhs, "bias": None, "stats": stats}
            return _record.mark(y, ops, info) if _record.active() else y
    elif kind == "linear":
        dn = op_kwargs["dimension_numbers"]
        info = layer_mark(
            kind, name, config, source, dimension_numbers=dn, shapes=(lhs.shape, rhs.shape)
        )
    else:
        info = layer_mark(kind, name, config, source, conv_kwargs=op_kwargs)
    return _marked_value(y, lhs, rhs, None, stats, info)
