"""Post-training quantization without calibration data: dynamic and weight-only layers.

The functional core of :class:`~qjax.flax.nnx.DynamicQuantLinear` /
:class:`~qjax.flax.linen.DynamicQuantDense` and :class:`~qjax.flax.nnx.WeightOnlyLinear`
/ :class:`~qjax.flax.linen.WeightOnlyDense`; both shells call these functions only.

**Dynamic quantization**: the weight is quantized once (int8, per output channel by
default); each call quantizes the activation from *its own* range, per tensor or per
token (``act_spec`` with ``axis=0``: one qparams per row of ``x.reshape(-1, K)``), and
runs the int8 engine. Two recipes, each bit-exact with the system it names.

``recipe="fbgemm"`` (default; PyTorch's ``quantize_dynamic`` for ``Linear``)::

    qp_x = qparams_from_minmax(min(x), max(x), act_spec, "torch_fused")   # per call
    x_q  = clamp(rint(fma(x, f32(1/s_x), zp_x)))          # qjax.quantize, compat="torch"
    acc  = Σ_k (x_q - zp_x)(w_q - zp_w)                   # int8 x int8 -> int32, exact
    y    = fma(f32(acc), f32(s_x·s_w), b)                 # float32 output

With the defaults (``act_spec`` = quint8 with ``reduce_range``, codes 0..127, and
FBGEMM's ``ChooseQuantizationParams``) this is what torch's
``torch.ao.nn.quantized.dynamic.Linear`` computes on the fbgemm/x86 engines
(``fbgemm::QuantizeAvx2`` with its fma, exact int32 accumulation, and
``ReQuantizeForFloat``'s ``f32(acc)·f32(s_x·s_w) + b``, which the compiler contracts into
one fma). ``min``/``max`` are over the finite values (torch's ``FindMinMax`` would take
NaN along); an empty input gives the range ``[0, 0]``, as torch.

``recipe="torchao"`` (torchao's ``Int8DynamicActivationInt8WeightConfig``, its
``Int8Tensor`` linear; activations :data:`TORCHAO_ACTIVATION`, int8 per token, symmetric
or asymmetric, qparams with ``compat="torch"``; weights symmetric, per channel or per
tensor)::

    x_q  = clamp(round(x · f32(1/s_x)) + zp_x, -128, 127)  # quantize_affine
    acc  = Σ_k x_q · w_q                                   # raw codes, int32, exact
    t    = f32(f32(acc) · s_x)                             # int_scaled_matmul
    t    = f32(t - f32(f32(zp_x · s_x) · f32(Σ_k w_q)))   # asymmetric x only
    y    = f32(f32(t · s_w) + b)                           # each op rounded, no fma

Below VNNI ``torch._int_mm`` saturates (oneDNN's ``vpmaddubsw``): ``accumulate=
"onednn_sat16"`` reproduces it there (``tests/test_flax_ptq_torchao.py`` compares at
the AVX2 level through torch's own switch in a subprocess).
**Weight-only quantization**: the kernel is stored as int8 codes, or as int4 codes
packed two per byte (:func:`pack_int4`), with per-channel or per-group scales; the layer
computes ``x @ dequantize(unpack(codes))`` in float (the weights shrink 4x or 8x; the
matmul stays float).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from .._float import fma_f32, materialize, mul_f32, opaque_one
from .._primitives import dequantize, quantize
from .._qarray import QArray
from .._qparams import Compat, qparams_from_minmax
from .._spec import QParams, QuantSpec
from ..kernels import PreparedLinear, prepare_linear
from ..kernels._accumulate import _sat16_pair_dot
from ..kernels._linear import _int8_dot
from ..observers import finite_minmax
from . import _record

__all__ = [
    "ACCUMULATES",
    "DYNAMIC_ACTIVATION",
    "DYNAMIC_WEIGHT",
    "INT4_WEIGHT",
    "RECIPES",
    "TORCHAO_ACTIVATION",
    "PackedWeight",
    "dynamic_linear",
    "pack_int4",
    "pack_weight",
    "prepare_dynamic_weight",
    "quantize_weight",
    "unpack_int4",
    "unpack_weight",
    "weight_only_linear",
]

#: torch's dynamic activation: quint8 with reduce_range (codes 0..127), affine.
DYNAMIC_ACTIVATION = QuantSpec(bits=8, signed=False, reduce_range=True)
#: torchao's dynamic activation: int8 symmetric per token (one qparams per row of
#: ``x.reshape(-1, K)``); ``.replace(symmetric=False)`` for its asymmetric mapping.
TORCHAO_ACTIVATION = QuantSpec(bits=8, signed=True, symmetric=True, axis=0)
#: the output formulas of :func:`dynamic_linear` (module docstring).
RECIPES = ("fbgemm", "torchao")
#: the accumulations of :func:`dynamic_linear` (``"onednn_sat16"``: torchao's below VNNI).
ACCUMULATES = ("exact", "onednn_sat16")
#: int8 symmetric per output channel of a ``(in, out)`` kernel (torch's
#: ``per_channel_dynamic_qconfig`` weight: qint8, -128..127, /127.5 with compat="torch").
DYNAMIC_WEIGHT = QuantSpec(bits=8, signed=True, symmetric=True, axis=-1)
#: int4 symmetric per output channel (-8..7).
INT4_WEIGHT = QuantSpec(bits=4, signed=True, symmetric=True, axis=-1)


def quantize_weight(kernel: jax.Array, spec: QuantSpec, compat: Compat = "qjax") -> QArray:
    """Quantize a float kernel with qparams from its own (finite) range.

    ``qp = qparams_from_minmax(min, max, spec, compat)`` per qparams entry of ``spec``,
    ``codes = quantize(kernel, qp, compat)`` (``"torch_fused"`` quantizes with torch's
    rule). Returns a :class:`~qjax.QArray` of ``spec.dtype`` codes.

    >>> w = jnp.array([[0.5, -1.0], [0.25, 2.0]])
    >>> q = quantize_weight(w, DYNAMIC_WEIGHT, "torch")
    >>> q.values
    Array([[127, -64],
           [ 64, 127]], dtype=int8)
    """
    kernel = jnp.asarray(kernel)
    if not jnp.issubdtype(kernel.dtype, jnp.floating):
        raise TypeError(f"quantize_weight: expects a floating kernel, got dtype {kernel.dtype}")
    mn, mx, _ = finite_minmax(kernel, spec)
    qp = qparams_from_minmax(mn, mx, spec, compat=compat)
    qcompat = "torch" if compat in ("torch", "torch_fused") else compat
    return QArray(quantize(kernel, qp, compat=qcompat), qp)


def prepare_dynamic_weight(
    kernel: jax.Array,
    spec: QuantSpec = DYNAMIC_WEIGHT,
    compat: Compat = "torch",
    *,
    name: str = "dynamic_linear",
) -> PreparedLinear:
    """Quantize an ``(in, out)`` float kernel to int8 and prepare it for the engine.

    ``spec`` must be an int8 per-tensor or per-output-channel spec (what
    :func:`qjax.kernels.prepare_linear` accepts); the overflow check is the engine's.

    >>> pw = prepare_dynamic_weight(jnp.ones((3, 2)))
    >>> pw.weight.values.dtype, pw.col_sum
    (dtype('int8'), Array([381, 381], dtype=int32))
    """
    kernel = jnp.asarray(kernel)
    if kernel.ndim != 2:
        raise ValueError(f"{name}: kernel must be (in, out), got shape {kernel.shape}")
    return prepare_linear(quantize_weight(kernel, spec, compat), name=name)


def dynamic_linear(
    x: jax.Array,
    w: PreparedLinear,
    bias: jax.Array | None = None,
    *,
    act_spec: QuantSpec = DYNAMIC_ACTIVATION,
    compat: Compat = "torch_fused",
    recipe: str = "fbgemm",
    accumulate: str = "exact",
    name: str | None = None,
) -> jax.Array:
    """Dynamically quantized linear layer (formulas in the module docstring).

    Args:
      x: float ``(..., K)``; its range (over the whole tensor, or per row of
        ``x.reshape(-1, K)`` for a per-token ``act_spec``) sets this call's qparams.
      w: the int8 weight from :func:`prepare_dynamic_weight` (or
        :func:`qjax.kernels.prepare_linear`).
      bias: float32 ``(N,)`` or ``None``.
      act_spec: 8-bit activation spec, per tensor (``axis=None``, default quint8
        ``reduce_range``) or per token (``axis=0``, e.g. :data:`TORCHAO_ACTIVATION`).
      compat: the activation qparams formula (default FBGEMM's; torchao's is ``"torch"``).
      recipe: ``"fbgemm"`` (torch ``quantize_dynamic``) or ``"torchao"`` (torchao's
        ``Int8DynamicActivationInt8WeightConfig``): the quantize and output formulas.
      accumulate: ``"exact"``, or for the torchao recipe ``"onednn_sat16"``: what
        ``torch._int_mm`` computes on CPUs without VNNI (oneDNN's ``vpmaddubsw`` on
        ``x_q + 128`` as uint8, adjacent pairs saturated to int16, the ``128·Σ_k w_q``
        compensation exact; :mod:`qjax.kernels._levels`).
      name: the layer's name in errors and in a converted program (default ``w.name``).

    Returns:
      float32 ``(..., N)``.

    >>> pw = prepare_dynamic_weight(jnp.array([[1.0, -1.0], [0.5, 0.0]]))
    >>> dynamic_linear(jnp.array([[2.0, 1.0]]), pw, jnp.array([0.0, 0.5]))
    Array([[ 2.4980702, -1.492157 ]], dtype=float32)
    >>> x = jnp.array([[2.0, 1.0], [0.01, -0.02]])  # per token: each row its own scale
    >>> dynamic_linear(x, pw, act_spec=TORCHAO_ACTIVATION, compat="torch", recipe="torchao")
    Array([[ 2.4882739e+00, -1.9843447e+00],
           [-7.8738951e-05, -9.9998470e-03]], dtype=float32)
    """
    if not isinstance(w, PreparedLinear):
        raise TypeError(f"dynamic_linear: w must be a PreparedLinear, got {type(w).__name__}")
    name = w.name if name is None else name
    per_token = act_spec.granularity == "axis" and act_spec.axes == (0,)
    if act_spec.bits != 8 or not (act_spec.granularity == "tensor" or per_token):
        raise ValueError(
            f"{name}: dynamic activations must be 8-bit, per-tensor or per-token (axis=0: "
            f"one qparams per row of x.reshape(-1, K)), got {act_spec}"
        )
    if recipe not in RECIPES:
        raise ValueError(f"{name}: unknown recipe {recipe!r}; known: {RECIPES}")
    if accumulate not in ACCUMULATES or (accumulate != "exact" and recipe != "torchao"):
        raise ValueError(
            f"{name}: accumulate {accumulate!r}: 'exact' for every recipe, 'onednn_sat16' "
            "for recipe='torchao' (torch._int_mm below VNNI)"
        )
    if recipe == "torchao" and not (w.zero_point_is_zero and act_spec.signed):
        raise ValueError(
            f"{name}: the torchao recipe has int8 activations and symmetric weights (zero "
            f"point 0); got act_spec {act_spec} and weight {w.weight.spec}"
        )
    x = jnp.asarray(x)
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(f"{name}: expects a floating input, got dtype {x.dtype}")
    x = x.astype(jnp.float32)
    k, n = w.in_features, w.out_features
    if x.ndim < 1 or x.shape[-1] != k:
        raise ValueError(f"{name}: x of shape {x.shape} does not fit a ({k}, {n}) weight")
    lead = x.shape[:-1]
    xr = x.reshape(-1, k) if per_token else x
    mn, mx, _ = finite_minmax(xr, act_spec)
    # torch: FindMinMax of an empty tensor is (0, 0); an all-NaN one has no finite range
    mn = jnp.where(jnp.isfinite(mn), mn, jnp.float32(0.0))
    mx = jnp.where(jnp.isfinite(mx), mx, jnp.float32(0.0))
    qp = qparams_from_minmax(mn, mx, act_spec, compat=compat)
    # one scale and zero point per row of the (rows, N) result, or one for all
    s_x = jnp.reshape(qp.scale, (-1, 1) if per_token else ()).astype(jnp.float32)
    z_x = jnp.reshape(qp.zero_point, (-1, 1) if per_token else ()).astype(jnp.int32)
    wq = w.weight
    s_w = wq.scale if wq.spec.granularity == "axis" else jnp.reshape(wq.scale, ())
    s_w = s_w.astype(jnp.float32)
    b = None if bias is None else jnp.asarray(bias, jnp.float32)
    if recipe == "torchao":
        xq = quantize(xr, qp, compat="qjax")  # round(x·(1/s)) + z: quantize_affine
        if accumulate == "exact":
            acc = _int8_dot(xq, wq.values).astype(jnp.float32)
        else:
            sat = _sat16_pair_dot(xq.astype(jnp.int32) + 128, wq.values)
            acc = (sat - jnp.int32(128) * w.col_sum).astype(jnp.float32)
        # every product rounded on its own: materialize stops XLA's reassociation of the
        # scalar products (per tensor) and the contraction of a product into the add
        t = materialize(acc * s_x)
        if not act_spec.symmetric:
            t = t - materialize(z_x.astype(jnp.float32) * s_x * w.col_sum.astype(jnp.float32))
        y = t * s_w if b is None else materialize(t * s_w) + b
    else:
        xq = quantize(xr, qp, compat="torch")
        accf = _accumulate(xq, z_x, w).astype(jnp.float32)
        mult = s_x * s_w
        if b is None:  # f32(acc·m) even when an add follows (no fma contraction under jit)
            y = mul_f32(accf, mult, opaque_one(mult))
        else:
            y = fma_f32(accf, mult, b)
    y = y.reshape(lead + (n,))
    if _record.active():  # qjax.convert serves this function itself (a dynamic_linear step)
        info = _record.DynamicMark(name, act_spec, compat, recipe, accumulate)
        y = _record.mark(y, {"x": x, "weight": w, "bias": bias}, info)
    return y


def _accumulate(xq: jax.Array, zx: jax.Array, w: PreparedLinear) -> jax.Array:
    """``Σ_k (x_q - zp_x)(w_q - zp_w)`` exactly in int32 through the int8 engine's dot;
    ``zx``: int32, ``()`` or one per row ``(M, 1)``."""
    if xq.dtype == jnp.uint8:  # x - 128 as int8 (a bit flip), as the engine does
        xq = lax.bitcast_convert_type(xq ^ jnp.uint8(0x80), jnp.int8)
        zx = zx - jnp.int32(128)
    wq = w.weight
    acc = _int8_dot(xq, wq.values) - zx * w.col_sum
    if not w.zero_point_is_zero:
        zw = jnp.asarray(wq.zero_point).astype(jnp.int32)
        row_sum = jnp.sum(xq.astype(jnp.int32), axis=-1, keepdims=True)
        acc = acc - zw * row_sum + jnp.int32(w.in_features) * zx * zw
    return acc


# --------------------------------------------------------------------------------------
# int4 packing and weight-only layers


def pack_int4(q: jax.Array, axis: int = 0) -> jax.Array:
    """Pack 4-bit codes two per byte along ``axis``: ``b = (q[2i] & 15) | (q[2i+1] << 4)``.

    Input: int8 codes in ``[-8, 7]`` or uint8 codes in ``[0, 15]`` (two's complement
    nibbles), with an even size along ``axis``. Output: uint8, half as long along
    ``axis``. Values outside the 4-bit range lose their high bits (not checked under
    ``jit``; :func:`unpack_int4` inverts this exactly for in-range codes).

    >>> pack_int4(jnp.array([-8, 7, 1, -1], jnp.int8))
    Array([120, 241], dtype=uint8)
    >>> pack_int4(jnp.zeros(3, jnp.int8))  # doctest: +ELLIPSIS
    Traceback (most recent call last):
      ...
    ValueError: pack_int4: axis 0 of shape (3,) has odd size 3; ... (pad it to 4)
    """
    q = jnp.asarray(q)
    if q.dtype not in (jnp.int8, jnp.uint8):
        raise TypeError(f"pack_int4: expects int8 or uint8 codes, got dtype {q.dtype}")
    ax = _axis(axis, q.ndim, "pack_int4")
    n = q.shape[ax]
    if n % 2:
        raise ValueError(
            f"pack_int4: axis {axis} of shape {q.shape} has odd size {n}; int4 codes pack in "
            f"pairs (pad it to {n + 1})"
        )
    u = lax.bitcast_convert_type(q, jnp.uint8) if q.dtype == jnp.int8 else q
    lo = lax.slice_in_dim(u, 0, n, 2, axis=ax) & jnp.uint8(0x0F)
    hi = lax.slice_in_dim(u, 1, n, 2, axis=ax) & jnp.uint8(0x0F)
    return lo | (hi << jnp.uint8(4))


def unpack_int4(packed: jax.Array, axis: int = 0, *, signed: bool = True) -> jax.Array:
    """Inverse of :func:`pack_int4`: uint8 bytes -> int8 codes (sign-extended nibbles,
    ``[-8, 7]``) or, with ``signed=False``, uint8 codes ``[0, 15]``; twice as long along
    ``axis``.

    >>> unpack_int4(jnp.array([120, 241], jnp.uint8))
    Array([-8,  7,  1, -1], dtype=int8)
    """
    p = jnp.asarray(packed)
    if p.dtype != jnp.uint8:
        raise TypeError(f"unpack_int4: expects uint8 bytes, got dtype {p.dtype}")
    ax = _axis(axis, p.ndim, "unpack_int4")
    lo = p & jnp.uint8(0x0F)
    hi = p >> jnp.uint8(4)
    both = jnp.stack([lo, hi], axis=ax + 1)
    shape = p.shape[:ax] + (2 * p.shape[ax],) + p.shape[ax + 1 :]
    u = both.reshape(shape)
    if not signed:
        return u
    # sign-extend the nibble: shift it to the top of an int8, then arithmetic shift back
    s = lax.bitcast_convert_type(u << jnp.uint8(4), jnp.int8)
    return s >> jnp.int8(4)


def _axis(axis: int, ndim: int, fn: str) -> int:
    if not isinstance(axis, (int, np.integer)) or not -ndim <= axis < max(ndim, 1):
        raise ValueError(f"{fn}: axis {axis!r} is out of range for rank {ndim}")
    return int(axis) % ndim


class PackedWeight(NamedTuple):
    """A weight-only kernel: ``codes`` (int8, or int4 packed two per uint8 byte along
    axis 0), ``scale`` and ``zero_point`` (the spec's qparams shape). The spec and the
    kernel shape are static attributes of the layer that owns it."""

    codes: jax.Array
    scale: jax.Array
    zero_point: jax.Array

    @property
    def nbytes(self) -> int:
        """Bytes stored: codes + scales + zero points."""
        return int(sum(np.dtype(a.dtype).itemsize * int(np.prod(a.shape)) for a in self))


def _check_weight_only_spec(spec: QuantSpec, name: str) -> None:
    if not isinstance(spec, QuantSpec):
        raise TypeError(f"{name}: spec must be a qjax.QuantSpec, got {type(spec).__name__}")
    if spec.bits not in (4, 8) or not spec.signed:
        raise ValueError(
            f"{name}: weight-only storage supports signed int8 and int4 specs, got "
            f"{spec.bits}-bit {'signed' if spec.signed else 'unsigned'}"
        )


def pack_weight(
    kernel: jax.Array, spec: QuantSpec = INT4_WEIGHT, compat: Compat = "qjax", *, name="layer"
) -> PackedWeight:
    """Quantize an ``(in, out)`` kernel (:func:`quantize_weight`) and store it: int8
    codes as they are, int4 codes packed along ``in`` (which must then be even).

    >>> pw = pack_weight(jnp.ones((4, 3)))
    >>> pw.codes.shape, pw.codes.dtype, pw.nbytes  # 6 bytes codes, 12 scale, 12 zp
    ((2, 3), dtype('uint8'), 30)
    """
    _check_weight_only_spec(spec, name)
    kernel = jnp.asarray(kernel)
    if kernel.ndim != 2:
        raise ValueError(f"{name}: kernel must be (in, out), got shape {kernel.shape}")
    if spec.bits == 4 and kernel.shape[0] % 2:
        raise ValueError(
            f"{name}: int4 packs pairs of input rows; in_features={kernel.shape[0]} is odd"
        )
    q = quantize_weight(kernel, spec, compat)
    codes = pack_int4(q.values, axis=0) if spec.bits == 4 else q.values
    return PackedWeight(codes, q.scale, q.zero_point)


def unpack_weight(pw: PackedWeight, spec: QuantSpec) -> QArray:
    """The stored weight as a :class:`~qjax.QArray` of int8 codes (unpacked for int4).

    >>> unpack_weight(pack_weight(jnp.eye(2)), INT4_WEIGHT).values
    Array([[7, 0],
           [0, 7]], dtype=int8)
    """
    _check_weight_only_spec(spec, "unpack_weight")
    codes = unpack_int4(pw.codes, axis=0) if spec.bits == 4 else pw.codes
    return QArray(codes, QParams(pw.scale, pw.zero_point, spec))


def weight_only_linear(
    x: jax.Array,
    pw: PackedWeight,
    spec: QuantSpec,
    bias: jax.Array | None = None,
    *,
    name: str = "weight_only_linear",
) -> jax.Array:
    """``x @ dequantize(unpack(pw)) + b`` in ``x``'s float dtype (the weight is
    dequantized to float32, ``f32(q - z)·s``, then cast). ``qjax.convert`` serves this
    function itself, from the stored codes (a ``weight_only_linear`` step named ``name``).

    >>> pw = pack_weight(jnp.array([[1.0, -2.0], [0.5, 4.0]]))
    >>> weight_only_linear(jnp.array([[1.0, 1.0]]), pw, INT4_WEIGHT)
    Array([[1.4285715, 2.2857141]], dtype=float32)
    """
    x = jnp.asarray(x)
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(f"weight_only_linear: expects a floating input, got dtype {x.dtype}")
    w = unpack_weight(pw, spec)
    wf = dequantize(w.values, w.qparams, dtype=x.dtype)
    if x.shape[-1] != wf.shape[0]:
        raise ValueError(
            f"weight_only_linear: x of shape {x.shape} does not fit a {wf.shape} kernel"
        )
    y = lax.dot_general(x, wf, (((x.ndim - 1,), (0,)), ((), ())))
    if bias is not None:
        y = y + jnp.asarray(bias).astype(y.dtype)
    if _record.active():
        info = _record.WeightOnlyMark(name, spec)
        y = _record.mark(y, {"x": x, "weight": pw, "bias": bias}, info)
    return y
