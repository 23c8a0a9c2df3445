"""Quantization specs and qparams: every integer bound lives here.

A :class:`QuantSpec` says *what* integers a tensor is mapped to; :class:`QParams` says
*how* (scale and zero point). Both are consumed by every other layer of qjax.

Integer bounds (``qmin``, ``qmax``), the table every other module relies on:

=========================  ===================  ======================================
case                       signed               unsigned
=========================  ===================  ======================================
default                    -2^(b-1) .. 2^(b-1)-1  0 .. 2^b-1
``narrow_range=True``      -2^(b-1)+1 .. 2^(b-1)-1  1 .. 2^b-1
``reduce_range=True``      bounds // 2 (floor), as torch: int8 -64..63, uint8 0..127
explicit quant_min/max     taken as given (then ``// 2`` under reduce_range)
=========================  ===================  ======================================

Storage dtype: int8/uint8 for ``bits <= 8``, int16/uint16 for ``bits <= 16``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np

Rounding = Literal["half_even", "half_away", "stochastic"]
_ROUNDINGS = ("half_even", "half_away", "stochastic")


def _as_axes(axis: int | Sequence[int] | None) -> tuple[int, ...]:
    if axis is None:
        return ()
    if isinstance(axis, (int, np.integer)):
        return (int(axis),)
    return tuple(int(a) for a in axis)


@dataclasses.dataclass(frozen=True)
class QuantSpec:
    """How a tensor is quantized: bit width, range, granularity and rounding.

    Frozen and hashable, so it can be a ``jax.jit`` static argument and pytree metadata.

    Args:
      bits: integer width, 2..16.
      signed: signed (``int8``) or unsigned (``uint8``) integers.
      symmetric: zero point fixed at the middle of the range (0 for signed).
      narrow_range: drop the lowest code (int8 -> -127..127), so the range is symmetric.
      reduce_range: halve the bounds (floor), PyTorch's ``reduce_range``.
      quant_min, quant_max: explicit integer bounds (both or neither).
      axis: per-axis (per-channel) quantization along these axes; ``None`` = per-tensor.
      group_size, group_axis: per-group quantization: ``group_axis`` is split into
        contiguous groups of ``group_size`` elements, each with its own qparams.
      rounding: ``"half_even"`` (``jnp.round``, torch's ``nearbyint``), ``"half_away"``
        (TFLite's ``std::round``) or ``"stochastic"`` (needs a PRNG key).

    Qparams shape for a tensor of shape ``S``: one entry per element of
    ``S[a] for a in axes`` (sorted), with ``S[group_axis] // group_size`` for the group
    axis; ``()`` for per-tensor.

    >>> spec = QuantSpec(bits=8, signed=True, symmetric=True, axis=0)
    >>> spec.qmin, spec.qmax, spec.dtype
    (-128, 127, dtype('int8'))
    >>> QuantSpec(bits=8, signed=False, reduce_range=True).qmax
    127
    >>> spec.qparams_shape((16, 3, 3, 8))
    (16,)
    """

    bits: int = 8
    signed: bool = True
    symmetric: bool = False
    narrow_range: bool = False
    reduce_range: bool = False
    quant_min: int | None = None
    quant_max: int | None = None
    axis: int | tuple[int, ...] | None = None
    group_size: int | None = None
    group_axis: int | None = None
    rounding: Rounding = "half_even"

    def __post_init__(self):
        if isinstance(self.bits, bool) or not isinstance(self.bits, (int, np.integer)):
            raise TypeError(f"QuantSpec.bits must be an int, got {self.bits!r}")
        if not 2 <= self.bits <= 16:
            raise ValueError(f"QuantSpec.bits must be in 2..16, got {self.bits}")
        if self.rounding not in _ROUNDINGS:
            raise ValueError(
                f"QuantSpec.rounding must be one of {_ROUNDINGS}, got {self.rounding!r}"
            )
        if (self.quant_min is None) != (self.quant_max is None):
            raise ValueError(
                "QuantSpec: give both quant_min and quant_max or neither, got "
                f"quant_min={self.quant_min}, quant_max={self.quant_max}"
            )
        if self.quant_min is not None:
            lo, hi = self._storage_bounds()
            if not lo <= self.quant_min < self.quant_max <= hi:
                raise ValueError(
                    f"QuantSpec: need {lo} <= quant_min < quant_max <= {hi} for "
                    f"{self.bits}-bit {'signed' if self.signed else 'unsigned'} storage, got "
                    f"quant_min={self.quant_min}, quant_max={self.quant_max}"
                )
        axes = _as_axes(self.axis)
        if len(set(axes)) != len(axes):
            raise ValueError(f"QuantSpec.axis has repeated entries: {self.axis}")
        # Normalise a list axis to a tuple so the spec stays hashable.
        if self.axis is not None and not isinstance(self.axis, int):
            object.__setattr__(self, "axis", axes)
        if (self.group_size is None) != (self.group_axis is None):
            raise ValueError(
                "QuantSpec: per-group quantization needs both group_size and group_axis, got "
                f"group_size={self.group_size}, group_axis={self.group_axis}"
            )
        if self.group_size is not None:
            if not isinstance(self.group_size, (int, np.integer)) or self.group_size < 1:
                raise ValueError(
                    f"QuantSpec.group_size must be a positive int, got {self.group_size!r}"
                )
            if self.group_axis in axes:
                raise ValueError(
                    f"QuantSpec.group_axis={self.group_axis} is also in axis={self.axis}; "
                    "an axis is either per-channel or split into groups"
                )
        if self.qmin >= self.qmax:
            raise ValueError(
                f"QuantSpec: empty integer range [{self.qmin}, {self.qmax}] "
                "(narrow_range/reduce_range leave no codes)"
            )

    def _storage_bounds(self) -> tuple[int, int]:
        if self.signed:
            return -(2 ** (self.bits - 1)), 2 ** (self.bits - 1) - 1
        return 0, 2**self.bits - 1

    @property
    def has_custom_range(self) -> bool:
        """True when quant_min/quant_max were given (torch's ``has_customized_qrange``)."""
        return self.quant_min is not None

    @property
    def qmin(self) -> int:
        """Smallest integer code."""
        if self.quant_min is not None:
            lo = self.quant_min
        else:
            lo = self._storage_bounds()[0] + (1 if self.narrow_range else 0)
        return lo // 2 if self.reduce_range else lo

    @property
    def qmax(self) -> int:
        """Largest integer code."""
        hi = self.quant_max if self.quant_max is not None else self._storage_bounds()[1]
        return hi // 2 if self.reduce_range else hi

    @property
    def dtype(self) -> np.dtype:
        """Storage dtype of quantized values."""
        if self.bits <= 8:
            return np.dtype(np.int8 if self.signed else np.uint8)
        return np.dtype(np.int16 if self.signed else np.uint16)

    @property
    def axes(self) -> tuple[int, ...]:
        """Per-channel axes as a tuple (possibly negative, as given)."""
        return _as_axes(self.axis)

    @property
    def granularity(self) -> Literal["tensor", "axis", "group"]:
        if self.group_size is not None:
            return "group"
        return "axis" if self.axes else "tensor"

    def symmetric_zero_point(self) -> int:
        """Zero point of a symmetric spec: the middle code, rounded up (0 for signed)."""
        return (self.qmin + self.qmax + 1) // 2

    def normalized_axes(self, ndim: int) -> tuple[int, ...]:
        """Per-channel axes and group axis, made non-negative and sorted; validated."""
        axes = list(self.axes)
        if self.group_axis is not None:
            axes.append(self.group_axis)
        out = []
        for a in axes:
            if not -ndim <= a < ndim:
                raise ValueError(f"QuantSpec axis {a} is out of range for a tensor of rank {ndim}")
            out.append(a % ndim)
        if len(set(out)) != len(out):
            raise ValueError(f"QuantSpec axes {axes} name the same dimension twice")
        return tuple(sorted(out))

    def qparams_shape(self, shape: Sequence[int]) -> tuple[int, ...]:
        """Shape of scale/zero_point for a tensor of ``shape``."""
        shape = tuple(shape)
        gaxis = None if self.group_axis is None else self.group_axis % max(len(shape), 1)
        out = []
        for a in self.normalized_axes(len(shape)):
            n = shape[a]
            if a == gaxis:
                if n % self.group_size:
                    raise ValueError(
                        f"group_size={self.group_size} does not divide dimension {a} of "
                        f"shape {shape} (size {n}); pick a divisor of {n}"
                    )
                n //= self.group_size
            out.append(n)
        return tuple(out)

    def replace(self, **changes: Any) -> QuantSpec:
        """A copy with fields changed (``dataclasses.replace``)."""
        return dataclasses.replace(self, **changes)


@jax.tree_util.register_pytree_node_class
@dataclasses.dataclass(frozen=True)
class QParams:
    """Scale and zero point of a quantized tensor: a pytree with ``spec`` as metadata.

    Invariants: ``scale`` is floating; ``zero_point`` is integer (or floating, for
    learnable LSQ zero points, rounded when used); both have the spec's qparams shape
    (``()`` per-tensor, ``(C,)`` per-channel, see :meth:`QuantSpec.qparams_shape`).

    >>> qp = QParams(scale=0.5, zero_point=3, spec=QuantSpec(signed=False))
    >>> qp.scale.dtype, qp.zero_point.dtype
    (dtype('float32'), dtype('int32'))
    """

    scale: jax.Array
    zero_point: jax.Array
    spec: QuantSpec = QuantSpec()

    def __post_init__(self):
        if not isinstance(self.spec, QuantSpec):
            raise TypeError(f"QParams.spec must be a QuantSpec, got {type(self.spec).__name__}")
        s, z = self.scale, self.zero_point
        if _is_concrete_leaf(s):
            s = jnp.asarray(s, jnp.float32 if _is_pyscalar_or_int(s) else None)
            if not jnp.issubdtype(s.dtype, jnp.floating):
                raise TypeError(f"QParams.scale must be floating, got dtype {s.dtype}")
            object.__setattr__(self, "scale", s)
        if _is_concrete_leaf(z):
            z = jnp.asarray(z)
            if jnp.issubdtype(z.dtype, jnp.bool_) or not (
                jnp.issubdtype(z.dtype, jnp.integer) or jnp.issubdtype(z.dtype, jnp.floating)
            ):
                raise TypeError(f"QParams.zero_point must be integer, got dtype {z.dtype}")
            if jnp.issubdtype(z.dtype, jnp.integer) and z.dtype != jnp.int32:
                z = z.astype(jnp.int32)
            object.__setattr__(self, "zero_point", z)
        ss, zs = getattr(self.scale, "shape", None), getattr(self.zero_point, "shape", None)
        if ss is not None and zs is not None and ss != zs and zs != () and ss != ():
            raise ValueError(f"QParams: scale shape {ss} != zero_point shape {zs}")

    def tree_flatten(self):
        return (self.scale, self.zero_point), self.spec

    @classmethod
    def tree_unflatten(cls, spec, children):
        obj = object.__new__(cls)
        object.__setattr__(obj, "scale", children[0])
        object.__setattr__(obj, "zero_point", children[1])
        object.__setattr__(obj, "spec", spec)
        return obj

    def check(self, shape: Sequence[int]) -> None:
        """Raise ``ValueError`` unless these qparams fit a tensor of ``shape``."""
        want = self.spec.qparams_shape(shape)
        for name in ("scale", "zero_point"):
            got = tuple(jnp.shape(getattr(self, name)))
            if got != want and not (got == () and self.spec.granularity == "tensor"):
                if got in ((1,),) and want == ():
                    continue
                raise ValueError(
                    f"QParams.{name} has shape {got} but a tensor of shape {tuple(shape)} "
                    f"under {_describe(self.spec)} needs {want}"
                )


def _is_pyscalar_or_int(v) -> bool:
    if isinstance(v, (bool, int, float, np.integer)):
        return True
    return hasattr(v, "dtype") and jnp.issubdtype(v.dtype, jnp.integer)


def _is_concrete_leaf(v) -> bool:
    # Pytree transforms (vmap, tracing, tree_map over specs) put non-arrays in leaves;
    # validate only what looks like numbers.
    return isinstance(v, (int, float, np.ndarray, np.generic, jax.Array)) and not isinstance(
        v, jax.core.Tracer
    )


def _describe(spec: QuantSpec) -> str:
    if spec.granularity == "tensor":
        return "per-tensor quantization"
    if spec.granularity == "axis":
        return f"per-axis quantization (axis={spec.axis})"
    return (
        f"per-group quantization (axis={spec.axis}, group_axis={spec.group_axis}, "
        f"group_size={spec.group_size})"
    )


def check_qparam_values(qp: QParams, what: str = "QParams") -> QParams:
    """The value invariants of qparams, one check for every place that accepts them
    (:meth:`qjax.QArray.validate`, :func:`qjax.load_served`, the state_dict reader):
    every scale finite and ``> 0``, every zero point an integer (integer dtype) inside
    ``[spec.qmin, spec.qmax]``. ``ValueError`` naming ``what`` and the bad values;
    traced leaves are skipped (safe inside ``jit``). Returns ``qp``.

    >>> check_qparam_values(QParams(-0.05, 0, QuantSpec()), "input")
    Traceback (most recent call last):
      ...
    ValueError: input scale must be finite and > 0, got -0.05000000074505806
    >>> check_qparam_values(QParams(0.1, 700, QuantSpec(signed=False)), "fc out_qp")
    Traceback (most recent call last):
      ...
    ValueError: fc out_qp zero_point 700 is outside the spec range [0, 255]
    """
    spec = qp.spec
    z, s = qp.zero_point, qp.scale
    if _is_concrete_leaf(z):
        zn = np.asarray(z)
        if not np.issubdtype(zn.dtype, np.integer):
            raise ValueError(f"{what} zero_point must be integers, got dtype {zn.dtype}")
        bad = (zn < spec.qmin) | (zn > spec.qmax)
        if bad.any():
            raise ValueError(
                f"{what} zero_point {_short(zn[bad] if zn.ndim else zn)} is outside "
                f"the spec range [{spec.qmin}, {spec.qmax}]"
            )
    if _is_concrete_leaf(s):
        sn = np.asarray(s)
        if not np.issubdtype(sn.dtype, np.floating):
            raise ValueError(f"{what} scale must be floating, got dtype {sn.dtype}")
        bad = ~(np.isfinite(sn) & (sn > 0))
        if bad.any():
            raise ValueError(
                f"{what} scale must be finite and > 0, got {_short(sn[bad] if sn.ndim else sn)}"
            )
    return qp


def _short(v, n: int = 6) -> str:
    if isinstance(v, jax.core.Tracer):
        return f"<traced {v.dtype}{list(v.shape)}>"
    a = np.asarray(v)
    if a.ndim == 0:
        return str(a.item())
    flat = a.reshape(-1)
    body = ", ".join(str(x) for x in flat[:n].tolist())
    return f"[{body}{', ...' if flat.size > n else ''}] (shape {a.shape})"


def broadcast_qparam(v: jax.Array, spec: QuantSpec, shape: Sequence[int]) -> jax.Array:
    """Reshape a compact qparam (spec's qparams shape) to broadcast against ``shape``.

    For per-group specs ``shape`` must be the *grouped* shape (see :func:`group_view`).
    """
    ndim = len(shape)
    v = jnp.asarray(v)
    if spec.granularity == "tensor":
        return v.reshape(()) if v.size == 1 else v
    if spec.granularity == "group":
        ndim -= 1  # the grouped view has one extra dimension
    axes = spec.normalized_axes(ndim)
    if spec.granularity == "group":
        g = spec.group_axis % ndim
        # In the grouped view, dims after the group axis shift right by one and the
        # group-size dimension sits right after the group axis.
        full = [1] * (ndim + 1)
        for i, a in enumerate(axes):
            pos = a if a <= g else a + 1
            full[pos] = v.shape[i]
        return v.reshape(full)
    full = [1] * ndim
    for i, a in enumerate(axes):
        full[a] = v.shape[i]
    return v.reshape(full)


def group_view(x: jax.Array, spec: QuantSpec) -> jax.Array:
    """Split ``spec.group_axis`` into (groups, group_size); identity for other specs."""
    if spec.granularity != "group":
        return x
    g = spec.group_axis % x.ndim
    spec.qparams_shape(x.shape)  # validates divisibility with a clear message
    return x.reshape(
        x.shape[:g] + (x.shape[g] // spec.group_size, spec.group_size) + x.shape[g + 1 :]
    )


def reduction_axes(spec: QuantSpec, ndim: int) -> tuple[int, ...]:
    """Axes to reduce over (of the grouped view) to get per-qparam statistics."""
    if spec.granularity == "tensor":
        return tuple(range(ndim))
    if spec.granularity == "group":
        g = spec.group_axis % ndim
        keep = {a if a <= g else a + 1 for a in spec.normalized_axes(ndim)}
        return tuple(a for a in range(ndim + 1) if a not in keep)
    keep = set(spec.normalized_axes(ndim))
    return tuple(a for a in range(ndim) if a not in keep)
