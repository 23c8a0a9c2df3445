"""A converted Flax program in a file: format ``qjax.program`` (safetensors + JSON).

:func:`qjax.save_served` writes a program from :func:`qjax.convert` (a
:class:`~qjax.flax._convert.TracedProgram`) with :func:`save_program`;
:func:`qjax.load_served` reads it back with :func:`load_program`. The file holds, in the
safetensors metadata under ``"qjax"``, a JSON object::

    {"format": "qjax.program", "version": 1,
     "inputs": [{"name": "x", "shape": ["b", 8, 8, 1], "dtype": "float32"}],
     "batch": "b" | null, "example_batch": 8, "output": <names>, "layout": "NHWC",
     "float_ops": {step: primitive}, "steps": [<step>, ...]}

and each step is ``{"name", "kind", "inputs", "attrs", "params", "traced", "layer"}``: a
kind of :data:`qjax.flax._steps.KINDS` with its attributes (:func:`~qjax.flax._steps.
encode_value`), the names of the values it reads, and its arrays as tensors
(``"<i>.<key>"``; weights as int8 codes with their qparams). Nothing in the file runs as
code: a step is rebuilt by :func:`~qjax.flax._steps.make_step` from its kind, and a
``lax`` step may name only a primitive of :data:`~qjax.flax._steps.PRIMITIVES`.

**Any batch size.** :func:`save_program` lowers the model again with a symbolic batch
size ``b`` (the leading axis of every input whose leading size is the first input's), so
the shapes inside the program are expressions of ``b``; the loaded program runs any batch
size and checks the other axes. A model that cannot be traced that way (Python code that
branches on the batch size) is saved at the shapes of its example inputs, and the file
says why (``"fixed_because"``); the loaded program then refuses other shapes, naming them.

**Validated on load.** Every field is checked before anything runs: kinds, attribute
types, primitives, dtypes, qparams (finite scales > 0, zero points in range), weight codes
and their sums, biases (finite, one per output), layer geometry, the step graph (each
input defined before it is read); then the program is traced once at its example batch
size (nothing computed). A bad file gives a ``ValueError`` naming the step and the key.
"""

from __future__ import annotations

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np

from .. import kernels
from .._qarray import QArray, _deserialize_spec, _serialize_spec
from .._spec import QParams
from ..program import Layer, Program
from . import _steps
from ._served_io import (
    _COMPATS,
    _check_spec_types,
    _encode,
    _is_int,
    _load_param,
    _load_qparams,
    _tensor,
)

__all__ = ["FORMAT", "VERSION", "load_program", "program_file"]

FORMAT = "qjax.program"
VERSION = 1

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
    "dynamic_linear": {"name", "act_spec", "compat"},
    "weight_only_linear": {"name", "spec"},
}  # fmt: skip
_OPTIONAL = {"layer": {"perm"}}  # written by every save; a file from before may lack them
_SPEC_ATTRS = {"dynamic_linear": "act_spec", "weight_only_linear": "spec"}  # QuantSpec attrs
_DYNAMIC_COMPATS = ("qjax", "torch", "torch_fused", "tflite")  # qparams_from_minmax's


# --------------------------------------------------------------------------------------
# writing


def _encode_output(tree, where: str):
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


def _encode_step(i: int, s, tensors: dict, where: str) -> dict:
    at = f"{where}: step {s.name!r}"
    if s.spec is None:
        target = s.layer.target if s.layer is not None else "?"
        raise TypeError(
            f"{at} ({target}) is a function without a description; only programs "
            "from qjax.convert can be saved"
        )
    kind, attrs = s.spec
    a = dict(attrs)
    if kind in _SPEC_ATTRS:
        a[_SPEC_ATTRS[kind]] = json.loads(_serialize_spec(a[_SPEC_ATTRS[kind]]))
    if kind == "lax":
        a["primitive"] = _steps.primitive(a["primitive"].name, at).name
        slots = []
        for sk, val in a["slots"]:
            if sk == "lit":
                val = (val.item(), val.dtype.name)
            slots.append([sk, val])
        a["slots"] = slots
    p = s.params
    if kind == "quantize":
        params = _encode(f"{i}.qp", p, tensors)
    elif kind == "layer":
        params = [_encode(f"{i}.{k}", v, tensors) for k, v in zip("wby", p, strict=True)]
    elif kind == "lax":
        params = []
        for j, c in enumerate(p):
            tensors[f"{i}.c{j}"] = np.array(c, order="C")
            params.append({"kind": "array"})
    elif kind == "constant":
        tensors[f"{i}.value"] = np.array(p, order="C")
        params = {"kind": "array"}
    elif kind == "embed":  # the table as int8 codes with their qparams
        tensors[f"{i}.t.values"] = np.array(p.values, order="C")
        params = {**_encode(f"{i}.t", p.qparams, tensors), "kind": "table"}
    elif kind == "dynamic_linear":
        params = [_encode(f"{i}.w", p[0], tensors), _encode(f"{i}.b", p[1], tensors)]
    elif kind == "weight_only_linear":  # int4 codes stay packed two per byte
        for key, v in zip(("codes", "scale", "zero_point"), p[0], strict=True):
            tensors[f"{i}.w.{key}"] = np.array(v, order="C")
        params = [{"kind": "packed"}, _encode(f"{i}.b", p[1], tensors)]
    else:
        params = None
    layer = None
    if s.layer is not None:
        lay = s.layer
        extra = {k: v for k, v in lay.extra.items() if k != "kernel"}  # chosen on load
        layer = {
            "op": lay.op,
            "target": lay.target,
            "scheme": lay.scheme,
            "extra": _steps.encode_value(extra, f"{at} layer"),
            "out": _encode(f"{i}.layer_out", lay.out, tensors),
        }
    return {
        "name": s.name,
        "kind": kind,
        "inputs": list(s.inputs),
        "attrs": _steps.encode_value(a, at),
        "params": params,
        "traced": s.traced,
        "layer": layer,
    }


def program_file(program, where: str = "save_served") -> tuple[dict, dict]:
    """``(metadata, tensors)`` of a converted program (:meth:`TracedProgram.describe`)."""
    prog, patterns, example_batch, fixed_because, float_ops = program.describe()
    tensors: dict[str, np.ndarray] = {}
    steps = [_encode_step(i, s, tensors, where) for i, s in enumerate(prog.steps)]
    inputs = [
        {"name": n, "shape": [_steps.encode_value(d, where) for d in sh], "dtype": dt.name}
        for n, (sh, dt) in zip(prog.inputs, patterns, strict=True)
    ]
    meta = {
        "format": FORMAT,
        "version": VERSION,
        "inputs": inputs,
        "batch": None if fixed_because else _steps.BATCH,
        "fixed_because": fixed_because,
        "example_batch": example_batch,
        "output": _encode_output(prog.output, where),
        "layout": program.layout,
        "float_ops": dict(float_ops),
        "steps": steps,
    }
    return meta, tensors


# --------------------------------------------------------------------------------------
# reading (a file may come from anywhere: every field is checked)


def _need(d: dict, key: str, at: str):
    if not isinstance(d, dict) or key not in d:
        raise ValueError(f"{at}: missing {key!r}")
    return d[key]


def _decode_output(obj, names: set, where: str):
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
        if sp.bits != 8 or sp.granularity != "tensor":
            raise ValueError(f"{at}: act_spec {sp} must be an 8-bit per-tensor spec")
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


def _load_params(i: int, kind: str, attrs: dict, pd, tensors: dict, wish: str, at: str):
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
    pw = _load_param(f"{i}.w", pd[0], w_kind, tensors, wish, f"{at} w")
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
    if out is not None:
        out = _load_qparams(f"{i}.layer_out", out, tensors, f"{at} layer out")
    return Layer(op, target, scheme, None, out, extra)


class _StoredStep:
    """One step read from a file: checked, its arrays loaded; ``attrs`` still JSON (the
    batch size is known only when the program runs)."""

    def __init__(self, i: int, st, tensors: dict, wish: str, where: str):
        if not isinstance(st, dict):
            raise ValueError(f"{where}: step {i} is a {type(st).__name__}, not a JSON object")
        name, kind = st.get("name"), st.get("kind")
        if not isinstance(name, str):
            raise ValueError(f"{where}: step {i} has no 'name' (a str), got {name!r}")
        at = f"{where}: step {i} ({name!r}, {kind})"
        if kind not in _steps.KINDS:
            raise ValueError(f"{at}: unknown kind {kind!r}; known: {_steps.KINDS}")
        inputs = _need(st, "inputs", at)
        if not (isinstance(inputs, list) and all(isinstance(n, str) for n in inputs)):
            raise ValueError(f"{at}: inputs must be a list of names")
        traced = _need(st, "traced", at)
        if not isinstance(traced, bool):
            raise ValueError(f"{at}: traced {traced!r} must be true or false")
        self.at, self.name, self.kind, self.inputs, self.traced = (
            at,
            name,
            kind,
            tuple(inputs),
            traced,
        )
        self.json_attrs = _need(st, "attrs", at)
        a = self.attrs(1)  # the types, checked once
        _check_attrs(kind, a, at)
        if len(a["pick"]) != len(inputs):
            raise ValueError(f"{at}: {len(a['pick'])} pick entries for {len(inputs)} inputs")
        if kind == "lax":
            n_params = sum(1 for k, _ in a["slots"] if k == "param")
            n_values = sum(1 for k, _ in a["slots"] if k == "value")
            pd = st.get("params")
            if n_values != len(inputs) or n_params != len(pd if isinstance(pd, list) else ()):
                raise ValueError(f"{at}: slots do not match the inputs and params")
        self.params = _load_params(i, kind, a, st.get("params"), tensors, wish, at)
        self.layer = _load_layer(i, st.get("layer"), tensors, at)
        if self.layer is not None and kind == "dynamic_linear":
            self.layer = dataclasses.replace(
                self.layer,
                weight=self.params[0].weight.qparams,
                extra={**self.layer.extra, "kernel": self.params[0].kernel},
            )
        if self.layer is not None and kind == "layer":
            self.layer = dataclasses.replace(
                self.layer,
                weight=self.params[0].weight.qparams,
                extra={**self.layer.extra, "kernel": self.params[0].kernel},
            )

    def attrs(self, batch) -> dict:
        a = _steps.decode_value(self.json_attrs, batch, f"{self.at} attrs")
        if not isinstance(a, dict):
            raise ValueError(f"{self.at}: attrs must be a JSON object")
        if self.kind in _SPEC_ATTRS:
            a = dict(a)
            key = _SPEC_ATTRS[self.kind]
            a[key] = _spec_attr(a.get(key), f"{self.at} {key}")
        if self.kind == "lax":
            a = dict(a)
            a["primitive"] = _steps.primitive(a.get("primitive"), self.at)
            slots = []
            for sk, val in a.get("slots") or ():
                if sk == "lit":
                    if not (isinstance(val, tuple) and len(val) == 2):
                        raise ValueError(f"{self.at}: literal {val!r} must be [value, dtype]")
                    v, dt = val
                    if dt not in _steps.DTYPES or not isinstance(v, (bool, int, float)):
                        raise ValueError(f"{self.at}: literal {val!r}: a number and a dtype")
                    val = np.asarray(v, jnp.dtype(dt))
                elif not _is_int(val) or val < 0:
                    raise ValueError(f"{self.at}: slot index {val!r} must be an integer >= 0")
                slots.append((sk, val))
            a["slots"] = tuple(slots)
        return a

    def step(self, batch):
        a = self.attrs(batch)
        pick = a.pop("pick")
        return _steps.make_step(
            self.name, self.kind, a, self.inputs, pick, self.params, self.layer, self.traced
        )


def load_program(meta: dict, tensors: dict, wish: str, where: str):
    """The program a ``qjax.program`` file describes (a
    :class:`~qjax.flax._convert.TracedProgram`), every field checked (module docstring)."""
    from ._convert import TracedProgram

    for key in ("inputs", "batch", "example_batch", "output", "layout", "float_ops", "steps"):
        _need(meta, key, where)
    batch_name = meta["batch"]
    if batch_name not in (None, _steps.BATCH):
        raise ValueError(f"{where}: batch {batch_name!r} must be {_steps.BATCH!r} or null")
    example = meta["example_batch"]
    if not (_is_int(example) and example >= 1):
        raise ValueError(f"{where}: example_batch {example!r} must be a positive integer")
    if meta["layout"] not in (None, "NCHW", "NHWC"):
        raise ValueError(f"{where}: layout {meta['layout']!r} must be null, 'NCHW' or 'NHWC'")
    float_ops = meta["float_ops"]
    if not (isinstance(float_ops, dict) and all(isinstance(v, str) for v in float_ops.values())):
        raise ValueError(f"{where}: float_ops must map step names to strings")
    ins = meta["inputs"]
    if not (isinstance(ins, list) and 1 <= len(ins) <= 64):
        raise ValueError(f"{where}: inputs must be a list of 1 to 64 entries")
    names, patterns = [], []
    for j, d in enumerate(ins):
        at = f"{where}: input {j}"
        name, shape, dt = _need(d, "name", at), _need(d, "shape", at), _need(d, "dtype", at)
        if not isinstance(name, str) or dt not in _steps.DTYPES:
            raise ValueError(f"{at}: name {name!r} (a string) and dtype {dt!r} ({_steps.DTYPES})")
        if not (isinstance(shape, list) and 1 <= len(shape) <= 8):
            raise ValueError(f"{at}: shape {shape!r} must be a list of 1 to 8 dimensions")
        for n in shape:
            if not ((_is_int(n) and n >= 1) or (isinstance(n, dict) and batch_name is not None)):
                raise ValueError(f"{at}: dimension {n!r} must be a positive integer or the batch")
        names.append(name)
        patterns.append((shape, np.dtype(jnp.dtype(dt))))
    steps_json = meta["steps"]
    if not isinstance(steps_json, list) or not steps_json:
        raise ValueError(f"{where}: steps must be a non-empty list")
    stored = [_StoredStep(i, st, tensors, wish, where) for i, st in enumerate(steps_json)]
    known = set(names) | {s.name for s in stored}
    output = _decode_output(meta["output"], known, where)

    def at_batch(b) -> Program:
        try:
            return Program([s.step(b) for s in stored], names, output)
        except (TypeError, ValueError) as e:
            raise ValueError(f"{where}: {e}") from None

    def shapes_at(b) -> tuple:
        return tuple(
            (tuple(_steps.decode_value(n, b, where) for n in sh), dt) for sh, dt in patterns
        )

    def build(shapes) -> Program:
        got = tuple(sh for sh, _ in shapes)
        b = got[0][0] if batch_name is not None and got and got[0] else None
        want = shapes_at(b if b is not None else example)
        if tuple(shapes) != want:
            why = "" if batch_name else f" (saved at fixed shapes: {meta.get('fixed_because')})"
            raise TypeError(
                f"program from {where.split(': ', 1)[-1]} takes inputs "
                f"{[(sh, dt.name) for sh, dt in want]} (any batch size: "
                f"{batch_name is not None}){why}; got {[(sh, dt.name) for sh, dt in shapes]}"
            )
        return at_batch(b)

    first_shapes = shapes_at(example)
    program = at_batch(example)
    try:  # the last word: the program traces at its example batch size (nothing computed)
        avals = tuple(jax.ShapeDtypeStruct(sh, dt) for sh, dt in first_shapes)
        jax.eval_shape(program._make(trace=False), program.params, avals)
    except Exception as e:
        first = str(e).splitlines()[0] if str(e) else ""
        raise ValueError(
            f"{where}: the program does not run on inputs {[sh for sh, _ in first_shapes]} "
            f"({type(e).__name__}: {first})"
        ) from None
    program.compile_count = 0

    def describe():
        if batch_name is None:
            return program, first_shapes, example, meta.get("fixed_because"), float_ops
        (b,) = jax.export.symbolic_shape(_steps.BATCH)
        return at_batch(b), shapes_at(b), example, None, float_ops

    served = TracedProgram(program, float_ops, first_shapes, build, describe)
    served.layout = meta["layout"]
    return served
