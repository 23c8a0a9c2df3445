"""``QArray``: integer codes together with the qparams that give them meaning.

A :class:`QArray` is what flows between the integer kernels (:mod:`qjax.kernels`): the
codes ``values`` and their :class:`~qjax.QParams`, so a kernel can never lose track of
which scale and zero point its input carries. It is a pytree whose leaves are
``values``, ``scale`` and ``zero_point`` (in that order; the ``QuantSpec`` is static
metadata), so it passes through ``jax.jit``, ``jax.vmap`` and ``jax.export``.

Invariants (checked by :meth:`QArray.validate`; the first three are structural and also
checked at construction, the rest need concrete values):

===  ========================================================================================
1    ``values`` has an integer dtype equal to ``qparams.spec.dtype`` (int8 / uint8 /
     int16 / uint16)
2    ``scale`` is floating and ``zero_point`` is an integer array (no learnable float zero
     points: those belong to training, not to integer kernels)
3    both qparams have the shape the spec asks for on ``values.shape``
     (:meth:`~qjax.QuantSpec.qparams_shape`: ``()`` per-tensor, ``(C,)`` per-channel)
4    every zero point lies in ``[spec.qmin, spec.qmax]``
5    every scale is finite and ``> 0``
6    (``check_values=True``) every code lies in ``[spec.qmin, spec.qmax]``
===  ========================================================================================

Real value of a code ``q``: ``x = (q - zero_point) · scale``, with the qparams broadcast
along the spec's axes; :meth:`QArray.dequantize` computes it with
:func:`qjax.dequantize` (``f32(q - z) · s``).
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ._primitives import dequantize as _dequantize
from ._primitives import quantize as _quantize
from ._spec import QParams, QuantSpec, _short, check_qparam_values

__all__ = ["QArray"]


@jax.tree_util.register_pytree_with_keys_class
@dataclasses.dataclass(frozen=True)
class QArray:
    """Integer codes ``values`` with their :class:`~qjax.QParams` (a pytree).

    Leaves: ``values``, ``qparams.scale``, ``qparams.zero_point``; the spec is static
    metadata, so two QArrays with different specs are different pytree structures (and
    different ``jit`` cache entries). Invariants are listed in the module docstring.

    Args:
      values: integer codes of dtype ``qparams.spec.dtype``.
      qparams: their scale, zero point and spec.

    >>> from qjax import QuantSpec, QParams
    >>> qp = QParams(scale=0.5, zero_point=128, spec=QuantSpec(signed=False))
    >>> q = QArray.quantize(jnp.array([-1.0, 0.0, 2.0]), qp)
    >>> q.values, q.dtype, q.shape
    (Array([126, 128, 132], dtype=uint8), dtype('uint8'), (3,))
    >>> q.dequantize()
    Array([-1.,  0.,  2.], dtype=float32)
    >>> QArray(jnp.zeros(3, jnp.int8), qp)
    Traceback (most recent call last):
      ...
    TypeError: QArray.values has dtype int8 but the spec (8-bit unsigned) stores uint8
    """

    values: jax.Array
    qparams: QParams

    def __post_init__(self):
        if not isinstance(self.qparams, QParams):
            raise TypeError(f"QArray.qparams must be a QParams, got {type(self.qparams).__name__}")
        v = self.values
        if isinstance(v, (np.ndarray, np.generic)):
            object.__setattr__(self, "values", jnp.asarray(v))
        elif not hasattr(v, "dtype") or not hasattr(v, "shape"):
            raise TypeError(f"QArray.values must be an array, got {type(v).__name__}")
        self._check_structure()

    # ---- pytree -------------------------------------------------------------------

    def tree_flatten_with_keys(self):
        ga = jax.tree_util.GetAttrKey
        children = (
            (ga("values"), self.values),
            (ga("scale"), self.qparams.scale),
            (ga("zero_point"), self.qparams.zero_point),
        )
        return children, self.qparams.spec

    def tree_flatten(self):
        return (self.values, self.qparams.scale, self.qparams.zero_point), self.qparams.spec

    @classmethod
    def tree_unflatten(cls, spec: QuantSpec, children) -> QArray:
        # No validation here: transforms (vmap, tree_map, eval_shape) put arbitrary
        # objects in the leaves.
        values, scale, zero_point = children
        obj = object.__new__(cls)
        object.__setattr__(obj, "values", values)
        object.__setattr__(obj, "qparams", QParams.tree_unflatten(spec, (scale, zero_point)))
        return obj

    # ---- construction and conversion ----------------------------------------------

    @classmethod
    def quantize(
        cls,
        x: jax.Array,
        qparams: QParams,
        *,
        compat: str = "qjax",
        key: jax.Array | None = None,
    ) -> QArray:
        """Quantize float ``x`` with :func:`qjax.quantize` (same ``compat`` modes).

        >>> from qjax import QuantSpec, QParams
        >>> qp = QParams(scale=jnp.array([1.0, 0.5]), zero_point=jnp.array([0, 0]),
        ...              spec=QuantSpec(axis=1))
        >>> QArray.quantize(jnp.array([[1.0, 1.0], [-3.0, 3.0]]), qp).values
        Array([[ 1,  2],
               [-3,  6]], dtype=int8)
        """
        return cls(_quantize(x, qparams, compat=compat, key=key), qparams)

    def dequantize(self, dtype=jnp.float32) -> jax.Array:
        """Real values ``f32(q - z) · s`` (:func:`qjax.dequantize`), as ``dtype``."""
        return _dequantize(self.values, self.qparams, dtype=dtype)

    # ---- properties ---------------------------------------------------------------

    @property
    def spec(self) -> QuantSpec:
        return self.qparams.spec

    @property
    def scale(self) -> jax.Array:
        return self.qparams.scale

    @property
    def zero_point(self) -> jax.Array:
        return self.qparams.zero_point

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.values.shape)

    @property
    def ndim(self) -> int:
        return len(self.values.shape)

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(self.values.dtype)

    def __repr__(self) -> str:
        return (
            f"QArray(shape={self.shape}, dtype={self.dtype}, "
            f"{_describe_spec(self.spec)}, scale={_short(self.scale)}, "
            f"zero_point={_short(self.zero_point)})"
        )

    # ---- validation ---------------------------------------------------------------

    def validate(self, *, check_values: bool = False) -> QArray:
        """Check every invariant of the module docstring; return ``self``.

        Structural invariants (1-3) are checked always; those that need numbers (4, 5
        and, with ``check_values=True``, 6) only when the leaves are concrete (not
        tracers), so ``validate()`` is safe to call inside ``jit``.

        Raises:
          TypeError: wrong dtypes (named, with the dtype found).
          ValueError: qparams shape, zero point, scale or code out of range (with the
            offending values).

        >>> from qjax import QuantSpec, QParams
        >>> spec = QuantSpec(signed=False)
        >>> QArray(jnp.array([1, 2], jnp.uint8), QParams(0.1, 300, spec)).validate()
        Traceback (most recent call last):
          ...
        ValueError: QArray zero_point 300 is outside the spec range [0, 255]
        """
        self._check_structure()
        spec = self.spec
        check_qparam_values(self.qparams, "QArray")  # invariants 4 and 5
        if check_values and _concrete(self.values):
            vn = np.asarray(self.values)
            if vn.size and (vn.min() < spec.qmin or vn.max() > spec.qmax):
                raise ValueError(
                    f"QArray codes span [{vn.min()}, {vn.max()}], outside the spec range "
                    f"[{spec.qmin}, {spec.qmax}]"
                )
        return self

    def _check_structure(self) -> None:
        spec = self.spec
        vdt = np.dtype(self.values.dtype)
        if vdt != spec.dtype:
            raise TypeError(
                f"QArray.values has dtype {vdt} but the spec ({spec.bits}-bit "
                f"{'signed' if spec.signed else 'unsigned'}) stores {spec.dtype}"
            )
        sdt = jnp.result_type(self.scale)
        if not jnp.issubdtype(sdt, jnp.floating):
            raise TypeError(f"QArray scale must be floating, got dtype {sdt}")
        zdt = jnp.result_type(self.zero_point)
        if not jnp.issubdtype(zdt, jnp.integer):
            raise TypeError(
                f"QArray zero_point must be an integer array, got dtype {zdt} (round a "
                "learnable float zero point before building integer tensors)"
            )
        try:
            self.qparams.check(self.values.shape)
        except ValueError as e:
            raise ValueError(f"QArray: {e}") from None


# ---- jax.export serialization ---------------------------------------------------------

_SPEC_FIELDS = tuple(f.name for f in dataclasses.fields(QuantSpec))


def _serialize_spec(spec: QuantSpec) -> bytes:
    d = {name: getattr(spec, name) for name in _SPEC_FIELDS}
    if isinstance(d["axis"], tuple):
        d["axis"] = list(d["axis"])
    return json.dumps(d, sort_keys=True).encode()


def _deserialize_spec(data: bytes) -> QuantSpec:
    d: dict[str, Any] = json.loads(data.decode())
    unknown = set(d) - set(_SPEC_FIELDS)
    if unknown:
        raise ValueError(f"serialized QArray spec has unknown QuantSpec fields {sorted(unknown)}")
    if isinstance(d.get("axis"), list):
        d["axis"] = tuple(d["axis"])
    return QuantSpec(**d)


jax.export.register_pytree_node_serialization(
    QArray,
    serialized_name="qjax.QArray",
    serialize_auxdata=_serialize_spec,
    deserialize_auxdata=_deserialize_spec,
)


# ---- helpers ------------------------------------------------------------------------


def _concrete(v) -> bool:
    return isinstance(v, (int, float, np.ndarray, np.generic, jax.Array)) and not isinstance(
        v, jax.core.Tracer
    )


def _describe_spec(spec: QuantSpec) -> str:
    kind = f"{spec.bits}-bit {'signed' if spec.signed else 'unsigned'} [{spec.qmin}, {spec.qmax}]"
    if spec.granularity == "axis":
        kind += f", axis={spec.axis}"
    elif spec.granularity == "group":
        kind += f", group_axis={spec.group_axis}, group_size={spec.group_size}"
    return kind
