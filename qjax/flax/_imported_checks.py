"""The checks of an imported program's steps in a file (:mod:`qjax.flax._imported_io`).

Each kind of :data:`~qjax.flax._torch_steps.TORCH_KINDS` and
:data:`~qjax.flax._pt2e_steps.PT2E_KINDS` has its attributes listed here with a check
for each value (:data:`ATTRS`) and the structure of its params (:func:`check_params`);
:func:`check_step` runs both on a decoded step and raises a ``ValueError`` naming the
step and the key. Values that reach these checks are already plain (JSON primitives,
dtypes, lax enums, :class:`Ref`, :class:`~qjax.QuantSpec`, and activation
:class:`~qjax.QParams` checked by :func:`qjax._spec.check_qparam_values`).
"""

from __future__ import annotations

import math
from typing import Any, get_args

import numpy as np

from .. import kernels
from .._spec import QParams, QuantSpec, check_qparam_values
from ..kernels._accumulate import Accumulate
from ..kernels._elementwise import AddScheme
from ..kernels._pool import PoolScheme
from ._aten import FLOAT_OPS, MOVEMENT_OPS
from ._fields import _is_int
from ._torch_steps import Ref

__all__ = ["ATTRS", "check_params", "check_step"]

_ACCUMULATE = get_args(Accumulate)
_ADD = get_args(AddScheme)
_POOL = get_args(PoolScheme)
_SCHEMES = tuple(sorted(kernels.SCHEMES))


# --------------------------------------------------------------------------------------
# value checks: each returns None or raises ValueError(f"{at}: {key} ...")


def _bad(at, key, v, want):
    raise ValueError(f"{at}: {key} {v!r} must be {want}")


def _bool(v, at, key, n):
    if not isinstance(v, bool):
        _bad(at, key, v, "true or false")


def _one_of(*choices, optional=False):
    def check(v, at, key, n):
        if not ((optional and v is None) or (isinstance(v, str) and v in choices)):
            _bad(at, key, v, f"one of {choices}" + (" or null" if optional else ""))

    return check


def _number(optional=False, positive=False):
    def check(v, at, key, n):
        if optional and v is None:
            return
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            _bad(at, key, v, "a finite number" + (" or null" if optional else ""))
        if positive and v <= 0:
            _bad(at, key, v, "> 0")

    return check


def _int(lo=0):
    def check(v, at, key, n):
        if not (_is_int(v) and v >= lo):
            _bad(at, key, v, f"an integer >= {lo}")

    return check


def _str(v, at, key, n):
    if not (isinstance(v, str) and len(v) <= 200):
        _bad(at, key, v, "a string")


def _qparams(optional=False):
    def check(v, at, key, n):
        if not ((optional and v is None) or isinstance(v, QParams)):
            _bad(at, key, v, "activation qparams" + (" or null" if optional else ""))

    return check


def _spec(v, at, key, n):
    if not (isinstance(v, QuantSpec) and v.granularity == "tensor"):
        _bad(at, key, v, "a per-tensor QuantSpec")


def _flags(v, at, key, n):
    """One channels-last flag per input."""
    if not (isinstance(v, tuple) and len(v) == n and all(isinstance(t, bool) for t in v)):
        _bad(at, key, v, f"a list of {n} booleans (one per input)")


def _ints_or_int(v, at, key, n, *, lo=0, none_ok=False):
    if none_ok and v is None:
        return
    items = v if isinstance(v, (tuple, list)) else (v,)
    if not (items and len(items) <= 8 and all(_is_int(t) and t >= lo for t in items)):
        _bad(at, key, v, f"an integer >= {lo} or a list of them" + (" or null" if none_ok else ""))


def _geometry(lo, none_ok=False, pad_str=False):
    def check(v, at, key, n):
        if pad_str and v in ("SAME", "VALID", "same", "valid"):
            return
        _ints_or_int(v, at, key, n, lo=lo, none_ok=none_ok)

    return check


def _bounds(v, at, key, n):
    if v is None:
        return
    if not (isinstance(v, tuple) and len(v) == 2):
        _bad(at, key, v, "null or [lo, hi]")
    for t in v:
        _number()(t, at, key, n)


def _template(v, at, key, n, keys=()):
    """An argument template: plain values, lists / tuples / dicts, and Refs to the step's
    ``n`` inputs (or params ``keys``)."""
    if isinstance(v, Ref):
        ok = (v.key is None and _is_int(v.i) and 0 <= v.i < n) or (v.i is None and v.key in keys)
        if not ok:
            _bad(at, key, v, f"a reference to one of the {n} inputs or params {sorted(keys)}")
    elif isinstance(v, (tuple, list)):
        for t in v:
            _template(t, at, key, n, keys)
    elif isinstance(v, dict):
        for t in v.values():
            _template(t, at, key, n, keys)
    elif not (v is None or isinstance(v, (bool, int, float, str, np.dtype))):
        _bad(at, key, v, "a plain value")  # (lax enums are IntEnums: ints)


def _dict_template(v, at, key, n):
    if not isinstance(v, dict):
        _bad(at, key, v, "a JSON object")
    _template(v, at, key, n)


_POOL_OPTIONS = {
    "max_pool2d": {"kernel_size", "stride", "padding", "dilation", "ceil_mode"},
    "avg_pool2d": {
        "kernel_size", "stride", "padding", "ceil_mode", "count_include_pad",
        "divisor_override", "scheme", "nhwc_block",
    },
    "adaptive_avg_pool2d": {"output_size", "scheme"},
}  # fmt: skip


def _pool_options(v, at, key, n, op):
    if not isinstance(v, dict) or not set(v) <= _POOL_OPTIONS[op]:
        _bad(at, key, v, f"a JSON object with keys from {sorted(_POOL_OPTIONS[op])}")
    for k, t in v.items():
        where = f"{key}.{k}"
        if k in ("ceil_mode", "count_include_pad"):
            _bool(t, at, where, n)
        elif k == "scheme":
            _one_of(*_POOL)(t, at, where, n)
        elif k in ("divisor_override", "nhwc_block"):
            if t is not None:
                _int(1)(t, at, where, n)
        elif k == "output_size":
            items = t if isinstance(t, (tuple, list)) else (t,)
            if not all(s is None or (_is_int(s) and s >= 1) for s in items):
                _bad(at, where, t, "an integer >= 1 or a list of them (or nulls)")
        else:
            lo = 0 if k == "padding" else 1
            _ints_or_int(t, at, where, n, lo=lo, none_ok=k == "stride")


_STORE = {"cl": _bool, "want": _bool}
ATTRS: dict[str, dict[str, Any]] = {
    "torch_quantize": {"qp": _qparams(), **_STORE},
    "torch_dequantize": {"cl": _bool},
    "torch_linear": {
        "scheme": _one_of(*_SCHEMES), "activation": _one_of("relu", optional=True),
        "accumulate": _one_of(*_ACCUMULATE), "out": _qparams(), **_STORE,
    },
    "torch_conv": {
        "stride": _geometry(1), "padding": _geometry(0, pad_str=True), "dilation": _geometry(1),
        "groups": _int(1), "layout": _one_of("NCHW", "NHWC", "NCW", "NWC"),
        "scheme": _one_of(*_SCHEMES), "accumulate": _one_of(*_ACCUMULATE),
        "activation": _one_of("relu", optional=True), "out": _qparams(), **_STORE,
    },
    "torch_unary": {
        "op": _one_of("identity", "relu", "mul_scalar"), "value": _number(optional=True),
        **_STORE,
    },
    "torch_clamp": {
        "op": _one_of("relu6", "hardtanh"), "lo": _number(optional=True),
        "hi": _number(optional=True), "bug": _bool, **_STORE,
    },
    "torch_hardswish": {"out": _qparams(), "qnnpack": _bool, **_STORE},
    "torch_binary": {
        "op": _one_of("add", "mul"), "activation": _one_of("relu", optional=True),
        "scheme": _one_of(*_ADD, optional=True), "out": _qparams(), "cls": _flags,
        "want": _bool,
    },
    "torch_cat": {
        "out": _qparams(optional=True), "dim": _int(0), "fast": _bool, "cls": _flags,
        "want": _bool,
    },
    "torch_shape": {
        "op": _one_of("flatten", "reshape"), "args": _template, "kwargs": _dict_template,
        **_STORE,
    },
    "torch_size": {"args": _template, "kwargs": _dict_template, "cl": _bool},
    "torch_getitem": {"args": _template},
    "torch_pool": {
        "op": _one_of(*_POOL_OPTIONS), "options": None, "layout": _one_of("NCHW", "NHWC"),
        **_STORE,
    },
    "torch_batch_norm": {
        "eps": _number(positive=True), "out": _qparams(), "relu": _bool,
        "layout": _one_of("NCHW", "NHWC"), **_STORE,
    },
    "torch_output": {"template": _template, "cls": _flags},
    "pt2e_quantize": {"spec": _spec},
    "pt2e_dequantize": {"spec": _spec},
    "pt2e_float": {"op": _one_of(*FLOAT_OPS), "args": None, "kwargs": None},
    "pt2e_conv": {
        "spec": _spec, "stride": _geometry(1), "padding": _geometry(0, pad_str=True),
        "dilation": _geometry(1), "layout": _one_of("NCHW", "NCW"),
        "scheme": _one_of(*_SCHEMES), "activation": _one_of("relu", "relu6", "hardtanh",
                                                             optional=True),
        "bounds": _bounds, "name": _str,
    },
    "pt2e_linear": {
        "spec": _spec, "scheme": _one_of(*_SCHEMES),
        "activation": _one_of("relu", "relu6", "hardtanh", optional=True), "bounds": _bounds,
        "name": _str,
    },
    "pt2e_binary": {
        "op": _one_of("add", "mul"), "spec": _spec, "scheme": _one_of(*_ADD, optional=True),
        "activation": _one_of("relu", optional=True),
    },
    "pt2e_cat": {"spec": _spec, "dim": _int(-8)},
    "pt2e_pool": {
        "op": _one_of("max_pool2d", "avg_pool2d", "adaptive_avg_pool2d", "mean"),
        "args": None, "scheme": _one_of(*_POOL, optional=True),
    },
    "pt2e_relu": {},
    "pt2e_move": {"op": _one_of(*MOVEMENT_OPS), "args": _template, "kwargs": _dict_template},
}  # fmt: skip
_PT2E_POOL_ARGS = {  # op -> checks of its positional args
    "max_pool2d": (_geometry(1), _geometry(1, none_ok=True), _geometry(0), _geometry(1), _bool),
    "avg_pool2d": (
        _geometry(1), _geometry(1, none_ok=True), _geometry(0), _bool, _bool,
        _geometry(1, none_ok=True),
    ),
    "adaptive_avg_pool2d": (_geometry(1),),
    "mean": (_bool,),
}  # fmt: skip


def check_step(kind: str, a: dict, n_inputs: int, params: Any, at: str) -> None:
    """Every attribute of a decoded step of ``kind`` (module docstring), then its params."""
    want = ATTRS[kind]
    if set(a) != set(want):
        raise ValueError(f"{at}: attributes {sorted(a)}; a {kind} step has {sorted(want)}")
    for key, check in want.items():
        if check is not None:
            check(a[key], at, key, n_inputs)
    if kind == "torch_pool":
        _pool_options(a["options"], at, "options", n_inputs, a["op"])
    if kind == "pt2e_pool":
        checks = _PT2E_POOL_ARGS[a["op"]]
        args = a["args"]
        if not (isinstance(args, tuple) and len(args) == len(checks)):
            _bad(at, "args", args, f"{len(checks)} pool arguments")
        for i, (t, c) in enumerate(zip(args, checks, strict=True)):
            c(t, at, f"args[{i}]", n_inputs)
    if kind == "pt2e_float":
        keys = tuple(params) if isinstance(params, dict) else ()
        _template(a["args"], at, "args", n_inputs, keys)
        _dict_template(a["kwargs"], at, "kwargs", n_inputs)
        _template(a["kwargs"], at, "kwargs", n_inputs, keys)
    if kind == "torch_clamp" and a["op"] == "hardtanh" and (a["lo"] is None or a["hi"] is None):
        raise ValueError(f"{at}: a hardtanh step needs lo and hi")
    if kind == "torch_unary" and a["op"] == "mul_scalar" and a["value"] is None:
        raise ValueError(f"{at}: a mul_scalar step needs a value")
    check_params(kind, a, params, at)


# --------------------------------------------------------------------------------------
# params


def _need_bias(v, n_out: int, at: str) -> None:
    if v is None:
        return
    if not (
        hasattr(v, "dtype")
        and v.dtype == np.float32
        and tuple(v.shape) == (n_out,)
        and bool(np.isfinite(np.asarray(v)).all())
    ):
        got = (getattr(v, "dtype", type(v).__name__), getattr(v, "shape", None))
        raise ValueError(f"{at}: bias must be finite float32 of shape ({n_out},), got {got}")


def _weight(v, kind: type, at: str):
    if not isinstance(v, kind):
        raise ValueError(
            f"{at}: weights must be a prepared {kind.__name__}, got {type(v).__name__}"
        )
    return v.weight.shape[-1]


def _step_qparams(d, spec: QuantSpec, at: str) -> None:
    """A pt2e step's ``{"scale": f32 scalar, "zp": integer scalar}`` under ``spec``."""
    if not (isinstance(d, dict) and set(d) == {"scale", "zp"}):
        raise ValueError(f"{at}: qparams must be {{'scale', 'zp'}}, got {d!r}")
    s, z = d["scale"], d["zp"]
    if not (hasattr(s, "dtype") and s.dtype == np.float32 and s.shape == ()):
        raise ValueError(f"{at}: scale must be a float32 scalar")
    if not (hasattr(z, "dtype") and np.issubdtype(z.dtype, np.integer) and z.shape == ()):
        raise ValueError(f"{at}: zp must be an integer scalar")
    try:
        check_qparam_values(QParams(s, z, spec), at)
    except (ValueError, TypeError) as e:
        raise ValueError(str(e)) from None


def check_params(kind: str, a: dict, p: Any, at: str) -> None:
    """The structure, dtypes and shapes of a step's params (weights, biases and qparams
    are checked as they load: :func:`qjax.flax._fields._load_param`)."""
    if kind in ("torch_linear", "torch_conv"):
        cls = kernels.PreparedLinear if kind == "torch_linear" else kernels.PreparedConv
        if not (isinstance(p, tuple) and len(p) == 2):
            raise ValueError(f"{at}: params must be [weights, bias]")
        _need_bias(p[1], _weight(p[0], cls, at), at)
        if kind == "torch_conv" and p[0].groups != a["groups"]:
            raise ValueError(
                f"{at}: weights of {p[0].groups} groups, attribute groups {a['groups']}"
            )
    elif kind == "torch_hardswish":
        if a["qnnpack"]:
            if not (hasattr(p, "dtype") and p.dtype == np.uint8 and tuple(p.shape) == (256,)):
                raise ValueError(f"{at}: a QNNPACK hardswish needs a uint8 table of 256 codes")
        elif p is not None:
            raise ValueError(f"{at}: an ATen hardswish step has no params")
    elif kind == "torch_batch_norm":
        if not (isinstance(p, tuple) and len(p) == 4):
            raise ValueError(f"{at}: params must be [weight, bias, mean, var]")
        shapes = {tuple(t.shape) for t in p if t is not None}
        for t in p:
            if t is not None and not (
                hasattr(t, "dtype") and t.dtype == np.float32 and t.ndim == 1
            ):
                raise ValueError(f"{at}: batch-norm statistics must be float32 vectors")
        if len(shapes) > 1 or p[2] is None or p[3] is None:
            raise ValueError(f"{at}: batch-norm mean and var (and weight, bias) of one length")
    elif kind in ("pt2e_quantize", "pt2e_dequantize", "pt2e_binary", "pt2e_cat"):
        _step_qparams(p, a["spec"], f"{at} qparams")
    elif kind in ("pt2e_conv", "pt2e_linear"):
        cls = kernels.PreparedLinear if kind == "pt2e_linear" else kernels.PreparedConv
        if not (isinstance(p, dict) and set(p) == {"w", "b", "out"}):
            raise ValueError(f"{at}: params must be {{'w', 'b', 'out'}}")
        _need_bias(p["b"], _weight(p["w"], cls, at), at)
        _step_qparams(p["out"], a["spec"], f"{at} out")
    elif kind == "pt2e_float":
        if not (isinstance(p, dict) and all(hasattr(v, "dtype") for v in p.values())):
            raise ValueError(f"{at}: params must map names to arrays")
    elif p is not None:
        raise ValueError(f"{at}: a {kind} step has no params")
