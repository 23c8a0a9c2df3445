"""The fields of a served-program file (:mod:`qjax.flax._program_io`, format
``qjax.program``): parameters to safetensors tensors + JSON (:func:`_encode`), and back
with every value checked (:func:`_load_param`: qparams, weights, biases; weights prepared
for the chosen kernel, :func:`_prepare_stored`).
"""

from __future__ import annotations

import json
from typing import Any

import jax.numpy as jnp
import numpy as np

from .. import kernels
from .._qarray import QArray, _deserialize_spec, _serialize_spec
from .._spec import QParams, check_qparam_values
from ..kernels._choice import conv_kernel, linear_kernel

_COMPATS = ("qjax", "torch", "tflite")  # what fake_quant_codes serves


def _arr(v) -> np.ndarray:
    return np.array(v, order="C")  # (np.ascontiguousarray would make 0-d arrays 1-d)


def _encode(prefix: str, v, tensors: dict) -> Any:
    """Put the arrays of one parameter into ``tensors``; return its JSON description."""
    if v is None:
        return None
    if isinstance(v, QParams):
        tensors[f"{prefix}.scale"] = _arr(v.scale)
        tensors[f"{prefix}.zero_point"] = _arr(v.zero_point)
        return {"kind": "qparams", "spec": json.loads(_serialize_spec(v.spec))}
    if isinstance(v, (kernels.PreparedLinear, kernels.PreparedConv)):
        w = v.weight
        tensors[f"{prefix}.values"] = _arr(w.values)
        tensors[f"{prefix}.scale"] = _arr(w.scale)
        tensors[f"{prefix}.zero_point"] = _arr(w.zero_point)
        d = {"spec": json.loads(_serialize_spec(w.spec)), "name": v.name}
        d["max_abs_x"] = v.max_abs_x
        if isinstance(v, kernels.PreparedLinear):
            return {"kind": "linear", **d}
        return {"kind": "conv", "groups": v.groups, **d}
    tensors[prefix] = _arr(v)
    return {"kind": "array"}


# the |x - zp_x| an 8-bit input can reach: a smaller max_abs_x would let the int32
# overflow check of prepare_linear / prepare_conv pass for layers that can overflow
_MIN_MAX_ABS_X = 255
_MAX_MAX_ABS_X = 1 << 16


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _tensor(tensors: dict, key: str, what: str, dtype=None) -> np.ndarray:
    if key not in tensors:
        raise ValueError(f"{what}: missing tensor {key!r}")
    t = tensors[key]
    if dtype is not None and t.dtype != np.dtype(dtype):
        raise ValueError(f"{what}: tensor {key!r} must be {np.dtype(dtype)}, got {t.dtype}")
    return t


_SPEC_BOOLS = ("signed", "symmetric", "narrow_range", "reduce_range")
_SPEC_OPT_INTS = ("quant_min", "quant_max", "group_size", "group_axis")


def _check_spec_types(spec: dict, what: str) -> None:
    """JSON types of a spec's fields (QuantSpec itself would take ``"no"`` as true)."""
    for k in _SPEC_BOOLS:
        if k in spec and not isinstance(spec[k], bool):
            raise ValueError(f"{what}: spec {k} {spec[k]!r} must be true or false")
    for k in _SPEC_OPT_INTS:
        if spec.get(k) is not None and not _is_int(spec[k]):
            raise ValueError(f"{what}: spec {k} {spec[k]!r} must be an integer or null")
    axis = spec.get("axis")
    if not (axis is None or _is_int(axis) or (isinstance(axis, list) and all(map(_is_int, axis)))):
        raise ValueError(f"{what}: spec axis {axis!r} must be an integer, a list of them or null")


def _load_qparams(prefix: str, d: dict, tensors: dict, what: str) -> QParams:
    if not isinstance(d.get("spec"), dict):
        raise ValueError(f"{what}: missing 'spec' (a JSON object)")
    _check_spec_types(d["spec"], what)
    try:
        spec = _deserialize_spec(json.dumps(d["spec"]).encode())
    except (ValueError, TypeError) as e:
        raise ValueError(f"{what}: bad spec ({e})") from None
    s = _tensor(tensors, f"{prefix}.scale", what)
    z = _tensor(tensors, f"{prefix}.zero_point", what)
    if s.dtype != np.float32:
        raise ValueError(f"{what} scale must be float32, got dtype {s.dtype}")
    if z.dtype != np.int32:
        raise ValueError(f"{what} zero_point must be an int32 integer, got dtype {z.dtype}")
    try:
        qp = QParams(jnp.asarray(s), jnp.asarray(z), spec)
    except (ValueError, TypeError) as e:
        raise ValueError(f"{what}: {e}") from None
    return check_qparam_values(qp, what)


def _prepare_stored(
    kind: str, w: QArray, name: str, max_abs_x: int, groups: int, wish: str, x_spec=None
):
    """Prepare a stored weight (``(in, out)`` or ``HWIO``/``WIO`` codes) for ``wish``;
    ``x_spec``: the spec of the codes the layer reads, where the file says it (its
    kernel as under ``qjax.convert``: :func:`~qjax.kernels._choice.linear_kernel`,
    :func:`~qjax.kernels._choice.conv_kernel`)."""
    if kind == "linear":
        k = linear_kernel(wish, x_spec=x_spec, w=w.values)
        return kernels.prepare_linear(w, name=name, max_abs_x=max_abs_x, kernel=k)
    k = conv_kernel(wish, w.ndim - 2, groups, x_spec=x_spec, w=w.values)
    layout = "HWIO" if w.ndim == 4 else "WIO"
    return kernels.prepare_conv(
        w, name=name, groups=groups, weight_layout=layout, max_abs_x=max_abs_x, kernel=k
    )


def _load_param(prefix: str, d, kind: str, tensors: dict, wish: str, what: str, x_spec=None):
    """A parameter from a file, validated (``kind``: the one the step needs; ``x_spec``:
    :func:`_prepare_stored`'s)."""
    if not isinstance(d, dict) or d.get("kind") != kind:
        got = d.get("kind") if isinstance(d, dict) else d
        raise ValueError(f"{what}: parameter kind {got!r}, expected {kind!r}")
    if kind == "array":  # a bias
        b = _tensor(tensors, prefix, what, np.float32)
        if not np.isfinite(b).all():
            raise ValueError(f"{what}: bias must be finite, got {b[~np.isfinite(b)][0]}")
        return jnp.asarray(b)
    qp = _load_qparams(prefix, d, tensors, what)
    if kind == "qparams":  # an activation's: per-tensor
        if qp.spec.granularity != "tensor" or np.size(qp.scale) != 1:
            raise ValueError(
                f"{what}: activation qparams must be per-tensor (one scale and zero point), "
                f"got scale shape {tuple(np.shape(qp.scale))} under {qp.spec}"
            )
        return qp
    try:
        w = QArray(jnp.asarray(_tensor(tensors, f"{prefix}.values", what)), qp)
        w.validate(check_values=True)
    except (ValueError, TypeError) as e:
        raise ValueError(f"{what}: {e}") from None
    name, groups, max_abs_x = d.get("name"), d.get("groups", 1), d.get("max_abs_x")
    if not isinstance(name, str):
        raise ValueError(f"{what}: 'name' must be a str, got {name!r}")
    if not (_is_int(groups) and groups >= 1):
        raise ValueError(f"{what}: groups {groups!r} must be a positive integer")
    if not (_is_int(max_abs_x) and _MIN_MAX_ABS_X <= max_abs_x <= _MAX_MAX_ABS_X):
        raise ValueError(
            f"{what}: max_abs_x {max_abs_x!r} must be an integer in [{_MIN_MAX_ABS_X}, "
            f"{_MAX_MAX_ABS_X}] (the int32 overflow check assumes any 8-bit input)"
        )
    try:
        return _prepare_stored(kind, w, name, max_abs_x, groups, wish, x_spec)
    except (ValueError, TypeError) as e:
        raise ValueError(f"{what}: {e}") from None


def _encode_output(tree, where: str):
    """A program's ``output`` (names in tuples, lists and str-keyed dicts) as JSON."""
    if isinstance(tree, str):
        return {"name": tree}
    if isinstance(tree, (tuple, list)):
        kind = "tuple" if isinstance(tree, tuple) else "list"
        return {kind: [_encode_output(t, where) for t in tree]}
    if isinstance(tree, dict) and all(isinstance(k, str) for k in tree):
        return {"dict": {k: _encode_output(v, where) for k, v in tree.items()}}
    raise ValueError(
        f"{where}: the model returns a {type(tree).__name__}; a saved program returns "
        "arrays in tuples, lists or dicts with string keys"
    )


def _decode_output(obj, names: set, where: str):
    """Inverse of :func:`_encode_output`; every name must be in ``names``."""
    if isinstance(obj, dict) and len(obj) == 1:
        ((kind, v),) = obj.items()
        if kind == "name" and isinstance(v, str):
            if v not in names:
                raise ValueError(f"{where}: output {v!r} is not a step or input name")
            return v
        if kind in ("tuple", "list") and isinstance(v, list):
            out = [_decode_output(t, names, where) for t in v]
            return tuple(out) if kind == "tuple" else out
        if kind == "dict" and isinstance(v, dict):
            return {k: _decode_output(t, names, where) for k, t in v.items()}
    raise ValueError(f"{where}: bad output description {obj!r}")


def _check_runs(program, shapes, where: str, *, trace: bool) -> None:
    """A loaded program traces at ``shapes`` (``((shape, dtype), ...)``; nothing is
    computed), else ``ValueError`` naming the shapes and the first line of the error."""
    import jax

    try:
        avals = tuple(jax.ShapeDtypeStruct(sh, dt) for sh, dt in shapes)
        jax.eval_shape(program._make(trace=trace), program.params, avals)
    except Exception as e:
        first = str(e).splitlines()[0] if str(e) else ""
        raise ValueError(
            f"{where}: the program does not run on its example inputs "
            f"{[sh for sh, _ in shapes]} ({type(e).__name__}: {first})"
        ) from None
    program.compile_count = 0


def _step_header(i: int, st, kinds, where: str) -> tuple[str, str, tuple[str, ...], str]:
    """``(name, kind, inputs, at)`` of a saved step's JSON object, each checked (``at``:
    the step's place for error messages); ``ValueError`` naming the step otherwise."""
    if not isinstance(st, dict):
        raise ValueError(f"{where}: step {i} is a {type(st).__name__}, not a JSON object")
    name, kind = st.get("name"), st.get("kind")
    if not isinstance(name, str):
        raise ValueError(f"{where}: step {i} has no 'name' (a str), got {name!r}")
    at = f"{where}: step {i} ({name!r}, {kind})"
    if kind not in kinds:
        raise ValueError(f"{at}: unknown kind {kind!r}; known: {kinds}")
    if "inputs" not in st:
        raise ValueError(f"{at}: missing 'inputs'")
    inputs = st["inputs"]
    if not (isinstance(inputs, list) and all(isinstance(n, str) for n in inputs)):
        raise ValueError(f"{at}: inputs must be a list of names")
    return name, kind, tuple(inputs), at
