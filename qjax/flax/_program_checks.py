"""The checks of a ``qjax.program`` file (:mod:`qjax.flax._program_io`): each step
kind's attributes (:func:`_check_attrs`) and parameters (:func:`_load_params`: qparams,
weights, biases, tables, packed int4 codes), each value checked before anything runs.
"""

from __future__ import annotations

import json

import jax.numpy as jnp
import numpy as np

from .. import kernels
from .._qarray import QArray, _deserialize_spec
from .._spec import QParams
from ..program import Layer
from . import _steps
from ._fields import (
    _COMPATS,
    _check_spec_types,
    _is_int,
    _load_param,
    _load_qparams,
    _tensor,
)
from ._ptq import ACCUMULATES, RECIPES

_PARAM_KINDS = {  # kind -> the parameter kinds of its params tuple (None: no params)
    "quantize": "qparams",
    "layer": ("weight", "array", "qparams"),
    "lax": "arrays",
    "constant": "any",
    "embed": "table",
    "dynamic_linear": ("linear", "array"),
    "weight_only_linear": ("packed", "array"),
}
_ATTRS = {  # kind -> the attribute keys it has (besides "pick")
    "quantize": {"compat"},
    "dequantize": {"dtype"},
    "layer": {
        "op", "name", "source", "relu", "geometry", "in_ndim", "out_dims", "scheme", "perm"
    },
    "relu": set(),
    "lax": {"primitive", "params", "slots", "on_codes"},
    "constant": set(),
    "identity": set(),
    "embed": {"name", "mode", "fill"},
    "dynamic_linear": {"name", "act_spec", "compat", "recipe", "accumulate"},
    "weight_only_linear": {"name", "spec"},
}  # fmt: skip
# written by every save; a file from before may lack them
_OPTIONAL = {"layer": {"perm"}, "dynamic_linear": {"recipe", "accumulate"}}
_SPEC_ATTRS = {"dynamic_linear": "act_spec", "weight_only_linear": "spec"}  # QuantSpec attrs
_DYNAMIC_COMPATS = ("qjax", "torch", "torch_fused", "tflite")  # qparams_from_minmax's


def _need(d: dict, key: str, at: str):
    if not isinstance(d, dict) or key not in d:
        raise ValueError(f"{at}: missing {key!r}")
    return d[key]


def _check_attrs(kind: str, a: dict, at: str) -> None:
    """The attribute types of a step (decoded at batch 1)."""
    keys = set(a) - {"pick"}
    if keys != _ATTRS[kind] and keys | _OPTIONAL.get(kind, set()) != _ATTRS[kind]:
        raise ValueError(
            f"{at}: attributes {sorted(keys)}; a {kind} step has {sorted(_ATTRS[kind])}"
        )
    pick = a.get("pick")
    if not (isinstance(pick, tuple) and all(i is None or (_is_int(i) and i >= 0) for i in pick)):
        raise ValueError(f"{at}: pick {pick!r} must be a list of null or indices")
    if kind == "quantize" and a["compat"] not in _COMPATS:
        raise ValueError(f"{at}: unknown compat {a['compat']!r}; known: {_COMPATS}")
    if kind == "dequantize" and not (
        isinstance(a["dtype"], np.dtype) and jnp.issubdtype(a["dtype"], jnp.floating)
    ):
        raise ValueError(f"{at}: dtype {a['dtype']!r} must be a float dtype")
    if kind == "layer":
        if a["op"] not in ("linear", "conv"):
            raise ValueError(f"{at}: op {a['op']!r} must be 'linear' or 'conv'")
        if a["scheme"] not in kernels.SCHEMES:
            raise ValueError(
                f"{at}: unknown scheme {a['scheme']!r}; known: {sorted(kernels.SCHEMES)}"
            )
        if not isinstance(a["relu"], bool):
            raise ValueError(f"{at}: relu {a['relu']!r} must be true or false")
        if not (isinstance(a["name"], str) and isinstance(a["source"], str)):
            raise ValueError(f"{at}: name and source must be strings")
        if not (_is_int(a["in_ndim"]) and 1 <= a["in_ndim"] <= 8):
            raise ValueError(f"{at}: in_ndim {a['in_ndim']!r} must be an integer in [1, 8]")
        od = a["out_dims"]
        if od is not None and not (
            isinstance(od, tuple) and all(_is_int(d) and d >= 1 for d in od)
        ):
            raise ValueError(f"{at}: out_dims {od!r} must be null or a list of positive integers")
        _check_geometry(a["op"], a["geometry"], at)
        _check_perm(a, at)
    if kind in ("embed", "dynamic_linear", "weight_only_linear") and not isinstance(a["name"], str):
        raise ValueError(f"{at}: name {a['name']!r} must be a string")
    if kind == "embed":
        if a["mode"] not in ("fill", "clip"):
            raise ValueError(f"{at}: mode {a['mode']!r} must be 'fill' or 'clip'")
        if a["fill"] is not None and not isinstance(a["fill"], (int, float)):
            raise ValueError(f"{at}: fill {a['fill']!r} must be a number or null")
    if kind == "dynamic_linear":
        sp = a["act_spec"]
        if sp.bits != 8 or not (sp.granularity == "tensor" or sp.axes == (0,)):
            raise ValueError(f"{at}: act_spec {sp} must be an 8-bit per-tensor or per-token spec")
        if a.get("recipe", "fbgemm") not in RECIPES:
            raise ValueError(f"{at}: unknown recipe {a['recipe']!r}; known: {RECIPES}")
        if a.get("accumulate", "exact") not in ACCUMULATES:
            raise ValueError(f"{at}: accumulate {a['accumulate']!r}; known: {ACCUMULATES}")
        if a["compat"] not in _DYNAMIC_COMPATS:
            raise ValueError(f"{at}: unknown compat {a['compat']!r}; known: {_DYNAMIC_COMPATS}")
    if kind == "weight_only_linear":
        sp = a["spec"]
        if sp.bits not in (4, 8) or not sp.signed or sp.granularity == "axis" and sp.axis != -1:
            raise ValueError(
                f"{at}: spec {sp}: weight-only layers store signed int8 or int4 codes, per "
                "tensor, per output channel (axis -1) or per group"
            )
    if kind == "lax":
        if not isinstance(a["on_codes"], bool):
            raise ValueError(f"{at}: on_codes {a['on_codes']!r} must be true or false")
        if not isinstance(a["params"], dict):
            raise ValueError(f"{at}: params must be a JSON object")
        slots = a["slots"]
        if not isinstance(slots, tuple) or not all(
            isinstance(t, tuple) and len(t) == 2 and t[0] in ("lit", "param", "value")
            for t in slots
        ):
            raise ValueError(f"{at}: slots {slots!r} must be [kind, value] pairs")


def _check_perm(a: dict, at: str) -> None:
    """An Einsum layer's ``(x_perm, kernel_perm, y_perm)``: permutations of the input,
    kernel and output axes that :func:`~qjax.flax._intsim.run_layer` can apply."""
    perm = a.get("perm")
    if perm is None:
        return
    ok = isinstance(perm, tuple) and len(perm) == 3 and a["op"] == "linear"
    ok = ok and all(
        isinstance(p, tuple) and all(_is_int(v) for v in p) and sorted(p) == list(range(len(p)))
        for p in perm
    )
    od = a["out_dims"] or ()
    if not ok or len(perm[1]) != a["in_ndim"] + len(od) or len(perm[0]) < a["in_ndim"]:
        raise ValueError(
            f"{at}: perm {perm!r} must be three permutations (input, kernel with "
            f"{a['in_ndim']} contracted and {len(od)} output axes, output) of a linear layer"
        )


def _spec_attr(d, at: str):
    """A QuantSpec attribute from its JSON object (the spec fields, checked)."""
    if not isinstance(d, dict):
        raise ValueError(f"{at}: a spec must be a JSON object, got {d!r}")
    d = {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}
    _check_spec_types(d, at)
    try:
        return _deserialize_spec(json.dumps(d).encode())
    except (ValueError, TypeError) as e:
        raise ValueError(f"{at}: bad spec ({e})") from None


def _check_geometry(op: str, g, at: str) -> None:
    if op == "linear":
        if g is not None:
            raise ValueError(f"{at}: a linear layer has no geometry, got {g!r}")
        return
    if not isinstance(g, dict) or set(g) != {"stride", "padding", "layout", "dilation", "groups"}:
        raise ValueError(
            f"{at}: geometry {g!r} must have stride, padding, layout, dilation, groups"
        )
    n = {"NWC": 1, "NHWC": 2}.get(g["layout"])
    if n is None:
        raise ValueError(f"{at}: layout {g['layout']!r} must be 'NWC' or 'NHWC'")
    for k in ("stride", "dilation"):
        v = g[k]
        if not (
            isinstance(v, tuple)
            and len(v) == n
            and all(_is_int(t) and 1 <= t <= 1 << 16 for t in v)
        ):
            raise ValueError(f"{at}: {k} {v!r} must be {n} integers >= 1")
    pad = g["padding"]
    ok = pad in ("SAME", "VALID") or (
        isinstance(pad, tuple)
        and len(pad) == n
        and all(
            isinstance(p, tuple)
            and len(p) == 2
            and all(_is_int(t) and 0 <= t <= 1 << 16 for t in p)
            for p in pad
        )
    )
    if not ok:
        raise ValueError(f"{at}: padding {pad!r} must be 'SAME', 'VALID' or [[lo, hi], ...] >= 0")
    if not (_is_int(g["groups"]) and g["groups"] >= 1):
        raise ValueError(f"{at}: groups {g['groups']!r} must be a positive integer")


def _load_array(tensors: dict, key: str, at: str) -> np.ndarray:
    t = _tensor(tensors, key, at)
    if t.dtype.name not in _steps.DTYPES:
        raise ValueError(f"{at}: tensor {key!r} has dtype {t.dtype}; allowed: {_steps.DTYPES}")
    return t


def _load_params(
    i: int, kind: str, attrs: dict, pd, tensors: dict, wish: str, at: str, x_spec=None
):
    """A step's params from its JSON ``pd`` and the tensors, each value checked;
    ``x_spec``: the spec of the codes a layer step reads (``None``: not known)."""
    want = _PARAM_KINDS.get(kind)
    if want is None:
        if pd is not None:
            raise ValueError(f"{at}: a {kind} step has no parameters, got {pd!r}")
        return None
    if kind == "quantize":
        return _load_param(f"{i}.qp", pd, "qparams", tensors, wish, f"{at} qp")
    if kind == "constant":
        return jnp.asarray(_load_array(tensors, f"{i}.value", at))
    if kind == "lax":
        if not (isinstance(pd, list) and all(d == {"kind": "array"} for d in pd)):
            raise ValueError(f"{at}: params must be a list of {{'kind': 'array'}}")
        return tuple(jnp.asarray(_load_array(tensors, f"{i}.c{j}", at)) for j in range(len(pd)))
    if kind == "embed":
        return _load_table(i, pd, tensors, at)
    if kind == "dynamic_linear":
        if not (isinstance(pd, list) and len(pd) == 2):
            raise ValueError(f"{at}: a dynamic_linear step's params are [weights, bias]")
        pw = _load_param(f"{i}.w", pd[0], "linear", tensors, wish, f"{at} w")
        return pw, _load_bias(i, pd[1], pw.out_features, tensors, wish, at)
    if kind == "weight_only_linear":
        if not (isinstance(pd, list) and len(pd) == 2 and pd[0] == {"kind": "packed"}):
            raise ValueError(f"{at}: a weight_only_linear step's params are [packed, bias]")
        pw = _load_packed(i, attrs["spec"], tensors, at)
        return pw, _load_bias(i, pd[1], pw.codes.shape[1], tensors, wish, at)
    if not (isinstance(pd, list) and len(pd) == 3):
        raise ValueError(f"{at}: a layer step's params are [weights, bias, out qparams]")
    w_kind = "linear" if attrs["op"] == "linear" else "conv"
    pw = _load_param(f"{i}.w", pd[0], w_kind, tensors, wish, f"{at} w", x_spec)
    b = None if pd[1] is None else _load_param(f"{i}.b", pd[1], "array", tensors, wish, f"{at} b")
    qy = (
        None if pd[2] is None else _load_param(f"{i}.y", pd[2], "qparams", tensors, wish, f"{at} y")
    )
    n_out = pw.weight.shape[-1]
    if b is not None and tuple(b.shape) != (n_out,):
        raise ValueError(f"{at} b: bias has shape {tuple(b.shape)}, the layer has {n_out} outputs")
    if attrs["op"] == "conv":
        g = attrs["geometry"]
        if pw.weight.ndim - 2 != {"NWC": 1, "NHWC": 2}[g["layout"]] or pw.groups != g["groups"]:
            raise ValueError(
                f"{at}: weights of shape {tuple(pw.weight.shape)} (groups {pw.groups}) do not "
                f"match the geometry {g}"
            )
    return (pw, b, qy)


def _load_bias(i: int, d, n_out: int, tensors: dict, wish: str, at: str):
    if d is None:
        return None
    b = _load_param(f"{i}.b", d, "array", tensors, wish, f"{at} b")
    if tuple(b.shape) != (n_out,):
        raise ValueError(f"{at} b: bias has shape {tuple(b.shape)}, the layer has {n_out} outputs")
    return b


def _load_table(i: int, pd, tensors: dict, at: str) -> QArray:
    """An embedding table: 2-D codes of the spec's dtype inside its range, one scale per
    row (axis 0) or per tensor."""
    if not isinstance(pd, dict) or pd.get("kind") != "table":
        raise ValueError(f"{at}: an embed step's params are {{'kind': 'table', 'spec': ...}}")
    qp = _load_qparams(f"{i}.t", {"spec": pd.get("spec")}, tensors, f"{at} table")
    values = _tensor(tensors, f"{i}.t.values", at)
    spec = qp.spec
    if (
        values.ndim != 2
        or spec.granularity == "group"
        or (spec.granularity == "axis" and spec.axis not in (0, -2))
    ):
        raise ValueError(
            f"{at}: the table must be (num_embeddings, features) codes quantized per row "
            f"(axis 0) or per tensor, got shape {values.shape} under {spec}"
        )
    try:
        return QArray(jnp.asarray(values), qp).validate(check_values=True)
    except (ValueError, TypeError) as e:
        raise ValueError(f"{at} table: {e}") from None


def _load_packed(i: int, spec, tensors: dict, at: str):
    """Weight-only ``(in, out)`` codes: int8, or int4 packed two per uint8 byte along
    ``in``; qparams of the spec's shape for the unpacked kernel; codes in range."""
    from ._ptq import PackedWeight, unpack_int4

    want = np.uint8 if spec.bits == 4 else np.int8
    codes = _tensor(tensors, f"{i}.w.codes", at, want)
    scale = _tensor(tensors, f"{i}.w.scale", at, np.float32)
    zp = _tensor(tensors, f"{i}.w.zero_point", at, np.int32)
    if codes.ndim != 2 or 0 in codes.shape:
        raise ValueError(f"{at}: weight codes must be a non-empty (in, out) matrix: {codes.shape}")
    values = jnp.asarray(codes)
    if spec.bits == 4:  # the int4 codes, two per byte: in = 2 x the stored rows
        values = unpack_int4(values, axis=0)
    try:
        QArray(values, QParams(jnp.asarray(scale), jnp.asarray(zp), spec)).validate(
            check_values=True
        )
    except (ValueError, TypeError) as e:
        raise ValueError(
            f"{at} w: {e} (kernel ({values.shape[0]}, {values.shape[1]}) from "
            f"{'packed ' if spec.bits == 4 else ''}codes of shape {codes.shape})"
        ) from None
    return PackedWeight(jnp.asarray(codes), jnp.asarray(scale), jnp.asarray(zp))


def _load_layer(i: int, d, tensors: dict, at: str) -> Layer | None:
    if d is None:
        return None
    op, target, scheme = _need(d, "op", at), _need(d, "target", at), _need(d, "scheme", at)
    if not (isinstance(op, str) and isinstance(target, str)):
        raise ValueError(f"{at}: layer op and target must be strings")
    if scheme is not None and scheme not in kernels.SCHEMES:
        raise ValueError(f"{at}: unknown layer scheme {scheme!r}")
    extra = _steps.decode_value(_need(d, "extra", at), 1, f"{at} layer extra")
    if not isinstance(extra, dict):
        raise ValueError(f"{at}: layer extra must be a JSON object")
    out = d.get("out")
    if out is not None and not isinstance(out, dict):
        raise ValueError(f"{at}: layer out {out!r} must be qparams (a JSON object) or null")
    if out is not None:
        out = _load_qparams(f"{i}.layer_out", out, tensors, f"{at} layer out")
    return Layer(op, target, scheme, None, out, extra)
