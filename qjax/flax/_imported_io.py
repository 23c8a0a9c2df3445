"""An imported torch / pt2e program in a file: format ``qjax.program``, ``"program":
"imported"`` (safetensors + JSON).

:func:`qjax.save_served` writes a :class:`~qjax.Program` from
:func:`qjax.converters.torch.import_model` or :func:`qjax.converters.pt2e.import_pt2e`
with :func:`imported_file`; :func:`qjax.load_served` reads it back with
:func:`load_imported`. The safetensors metadata ``"qjax"`` holds::

    {"format": "qjax.program", "version": 1, "program": "imported",
     "inputs": ["x"], "example_shapes": [[[2, 3, 8, 8], "float32"]] | null,
     "output": <names>, "engine": "x86" | null, "level": "avx2" | null,
     "layout": null | "NCHW" | "NHWC", "steps": [<step>, ...]}

and each step is ``{"name", "kind", "inputs", "attrs", "params", "layer"}``: a kind of
:data:`~qjax.flax._torch_steps.TORCH_KINDS` or :data:`~qjax.flax._pt2e_steps.PT2E_KINDS`
with its attributes, its arrays as tensors (``"<i>.<path>"``: weights as int8 codes with
their qparams, activation qparams as a float32 scale and an int32 zero point) and the
:class:`~qjax.Layer` that reports show. Values are tagged JSON: ``{"tuple": [...]}``,
``{"list": [...]}``, ``{"dict": {...}}``, ``{"ref": i}`` (the step's input ``i``),
``{"param": key}``, ``{"qparams": ...}``, ``{"spec": ...}`` and the plain values of
:func:`qjax.flax._steps.encode_value`.

Nothing in a file runs as code: a step is rebuilt by
:func:`~qjax.flax._torch_steps.make_torch_step` / :func:`~qjax.flax._pt2e_steps.
make_pt2e_step` from its kind, and a float step names an ATen op of
:data:`qjax.flax._aten.FLOAT_OPS`. **Validated on load**: every attribute
(:mod:`qjax.flax._imported_checks`), qparams, weight codes, biases, tables and the step
graph are checked before anything runs, then the program is traced once
(``jax.eval_shape``, nothing computed) at the example shapes it was imported with
(``program.example_shapes``, set by the importers; ``import_pt2e`` without example
inputs has none, and the file then skips this last check); a bad
file gives a ``ValueError`` naming the step and the key. The program runs any input shape
the imported one runs (it is traced per shape).

Weights are prepared on load for ``load_served(path, kernel=...)``
(:mod:`qjax.kernels._choice`, with each layer's accumulation): the same codes either way.
"""

from __future__ import annotations

import json

import jax
import numpy as np

from .. import kernels
from .._qarray import _serialize_spec
from .._spec import QParams, QuantSpec
from ..kernels._choice import conv_kernel, kernels_of, linear_kernel, quantize_kernel
from ..kernels._levels import ENGINE_CHOICES, LEVELS
from ..program import LAYOUTS, Layer, Program
from . import _steps
from ._fields import (
    _check_runs,
    _decode_output,
    _encode,
    _encode_output,
    _is_int,
    _load_param,
    _load_qparams,
    _step_header,
)
from ._fold import fold_program
from ._imported_checks import check_step
from ._program_checks import _load_array, _need, _spec_attr
from ._pt2e_steps import PT2E_KINDS, make_pt2e_step
from ._torch_steps import TORCH_KERNEL_KINDS, TORCH_KINDS, Ref, make_torch_step

__all__ = ["imported_file", "load_imported"]

KINDS = TORCH_KINDS + PT2E_KINDS
_MAX_DEPTH = 32

# --------------------------------------------------------------------------------------
# writing


class _Writer:
    def __init__(self, tensors: dict):
        self.tensors = tensors

    def value(self, v, prefix: str, where: str, depth: int = 0):
        """A plain value, container, Ref, QuantSpec or QParams as tagged JSON."""
        if depth > _MAX_DEPTH:
            raise ValueError(f"{where}: nested deeper than {_MAX_DEPTH}")
        if isinstance(v, Ref):
            return {"ref": v.i} if v.key is None else {"param": v.key}
        if isinstance(v, QParams):
            return {"qparams": _encode(prefix, v, self.tensors)}
        if isinstance(v, QuantSpec):
            return {"spec": json.loads(_serialize_spec(v))}
        if isinstance(v, (tuple, list)):
            items = [
                self.value(t, f"{prefix}.{i}", f"{where}[{i}]", depth + 1) for i, t in enumerate(v)
            ]
            return {"tuple" if isinstance(v, tuple) else "list": items}
        if isinstance(v, dict):
            if not all(isinstance(k, str) for k in v):
                raise ValueError(f"{where}: a dict with non-string keys cannot be written")
            return {
                "dict": {
                    k: self.value(t, f"{prefix}.{k}", f"{where}.{k}", depth + 1)
                    for k, t in v.items()
                }
            }
        return _steps.encode_value(v, where)

    def params(self, v, prefix: str, where: str, depth: int = 0):
        """Step params: prepared weights and qparams (checked kinds), tuples, dicts, arrays."""
        if depth > _MAX_DEPTH:
            raise ValueError(f"{where}: nested deeper than {_MAX_DEPTH}")
        if v is None:
            return None
        if isinstance(v, (kernels.PreparedLinear, kernels.PreparedConv, QParams)):
            return _encode(prefix, v, self.tensors)
        if isinstance(v, tuple):
            items = [self.params(t, f"{prefix}.{i}", where, depth + 1) for i, t in enumerate(v)]
            return {"kind": "tuple", "items": items}
        if isinstance(v, dict) and all(isinstance(k, str) for k in v):
            items = {k: self.params(t, f"{prefix}.{k}", where, depth + 1) for k, t in v.items()}
            return {"kind": "dict", "items": items}
        if isinstance(v, (jax.Array, np.ndarray, np.generic)):
            self.tensors[prefix] = np.array(v, order="C")
            return {"kind": "tensor"}
        raise ValueError(f"{where}: params hold a {type(v).__name__}, which cannot be written")


def _layer_json(lay: Layer | None, i: int, w: _Writer, at: str):
    if lay is None:
        return None
    extra = {k: v for k, v in lay.extra.items() if k != "kernel"}  # chosen on load
    return {
        "op": lay.op,
        "target": lay.target,
        "scheme": lay.scheme,
        "weight": None if lay.weight is None else _encode(f"{i}.lw", lay.weight, w.tensors),
        "out": None if lay.out is None else _encode(f"{i}.lo", lay.out, w.tensors),
        "extra": w.value(extra, f"{i}.lx", f"{at} layer extra"),
    }


def imported_file(program: Program, where: str = "save_served") -> tuple[dict, dict]:
    """``(metadata, tensors)`` of an imported program (module docstring).

    ``TypeError`` naming the step and its op for a step without a description
    (``Step.spec`` is ``None``: a function only) or of a kind this format does not hold;
    ``ValueError`` naming the step for a value that cannot be written (e.g. a torch
    object in an argument template).
    """
    tensors: dict[str, np.ndarray] = {}
    w = _Writer(tensors)
    steps = []
    for i, s in enumerate(program.steps):
        op = f"{s.layer.op}, {s.layer.target}" if s.layer is not None else "no layer"
        at = f"{where}: step {s.name!r} ({op})"
        if s.spec is None or s.spec[0] not in KINDS:
            what = "a function without a description" if s.spec is None else f"kind {s.spec[0]!r}"
            raise TypeError(
                f"{at} is {what}; only steps of the torch / pt2e importers ({len(KINDS)} "
                "kinds, qjax.flax._imported_io) and of qjax.convert can be saved"
            )
        kind, attrs = s.spec
        steps.append(
            {
                "name": s.name,
                "kind": kind,
                "inputs": list(s.inputs),
                "attrs": w.value(_stored_attrs(attrs), f"{i}.a", f"{at} attrs"),
                "params": w.params(s.params, f"{i}.p", f"{at} params"),
                "layer": _layer_json(s.layer, i, w, at),
            }
        )
    shapes = getattr(program, "example_shapes", None)
    meta = {
        "format": "qjax.program",
        "version": 1,
        "program": "imported",
        "inputs": list(program.inputs),
        "example_shapes": None if shapes is None else [[list(sh), dt] for sh, dt in shapes],
        "output": _encode_output(program.output, where),
        "engine": program.engine,
        "level": program.level,
        "layout": program.layout,
        "steps": steps,
    }
    return meta, tensors


# --------------------------------------------------------------------------------------
# reading (a file may come from anywhere: every field is checked)


class _Reader:
    def __init__(self, tensors: dict, wish: str, boundary: str = "xla"):
        self.tensors, self.wish, self.boundary = tensors, wish, boundary

    def value(self, obj, prefix: str, at: str, depth: int = 0):
        if depth > _MAX_DEPTH:
            raise ValueError(f"{at}: nested deeper than {_MAX_DEPTH}")
        if isinstance(obj, dict) and len(obj) == 1:
            ((tag, v),) = obj.items()
            if tag in ("tuple", "list") and isinstance(v, list):
                items = [
                    self.value(t, f"{prefix}.{i}", f"{at}[{i}]", depth + 1) for i, t in enumerate(v)
                ]
                return tuple(items) if tag == "tuple" else items
            if tag == "dict" and isinstance(v, dict):
                return {
                    k: self.value(t, f"{prefix}.{k}", f"{at}.{k}", depth + 1) for k, t in v.items()
                }
            if tag == "ref":
                if not (_is_int(v) and v >= 0):
                    raise ValueError(f"{at}: ref {v!r} must be an input index")
                return Ref(i=v)
            if tag == "param":
                if not isinstance(v, str):
                    raise ValueError(f"{at}: param {v!r} must be a name")
                return Ref(key=v)
            if tag == "qparams":
                return _load_param(prefix, v, "qparams", self.tensors, self.wish, at)
            if tag == "spec":
                return _spec_attr(v, at)
        if isinstance(obj, list):
            raise ValueError(f"{at}: unexpected list {obj!r} (lists are tagged)")
        return _steps.decode_value(obj, 1, at)

    def params(self, d, prefix: str, at: str, depth: int = 0):
        if depth > _MAX_DEPTH:
            raise ValueError(f"{at}: nested deeper than {_MAX_DEPTH}")
        if d is None:
            return None
        kind = d.get("kind") if isinstance(d, dict) else None
        if kind in ("linear", "conv", "qparams"):
            return _load_param(prefix, d, kind, self.tensors, "xla", at)
        if kind == "tuple" and isinstance(d.get("items"), list):
            return tuple(
                self.params(t, f"{prefix}.{i}", at, depth + 1) for i, t in enumerate(d["items"])
            )
        if kind == "dict" and isinstance(d.get("items"), dict):
            return {
                k: self.params(t, f"{prefix}.{k}", at, depth + 1) for k, t in d["items"].items()
            }
        if kind == "tensor" and set(d) == {"kind"}:
            return jax.device_put(np.array(_load_array(self.tensors, prefix, at)))
        raise ValueError(f"{at}: bad params description {d!r}")


def _kernel(kind: str, a: dict, pw, wish: str):
    """The kernel a loaded layer's weights are prepared for (its accumulation included)."""
    if isinstance(pw, kernels.PreparedLinear):
        return linear_kernel(wish, a.get("accumulate", "exact"))
    nsp = pw.weight.ndim - 2
    return conv_kernel(wish, nsp, pw.groups, a["dilation"], a.get("accumulate", "exact"))


def _reprepare(kind: str, a: dict, p, wish: str):
    key = 0 if kind.startswith("torch_") else "w"
    pw = p[key]
    k = _kernel(kind, a, pw, wish)
    if k == pw.kernel:
        return p
    if isinstance(pw, kernels.PreparedLinear):
        new = kernels.prepare_linear(pw.weight, name=pw.name, max_abs_x=pw.max_abs_x, kernel=k)
    else:
        layout = "HWIO" if pw.weight.ndim == 4 else "WIO"
        new = kernels.prepare_conv(
            pw.weight, name=pw.name, groups=pw.groups, weight_layout=layout,
            max_abs_x=pw.max_abs_x, kernel=k,
        )  # fmt: skip
    return (new, *p[1:]) if key == 0 else {**p, "w": new}


def _read_layer(d, i: int, r: _Reader, params, at: str) -> Layer | None:
    if d is None:
        return None
    op, target, scheme = _need(d, "op", at), _need(d, "target", at), _need(d, "scheme", at)
    if not (isinstance(op, str) and isinstance(target, str)):
        raise ValueError(f"{at}: layer op and target must be strings")
    if scheme is not None and not isinstance(scheme, str):
        raise ValueError(f"{at}: layer scheme {scheme!r} must be a string or null")
    extra = r.value(_need(d, "extra", at), f"{i}.lx", f"{at} layer extra")
    if not isinstance(extra, dict):
        raise ValueError(f"{at}: layer extra must be a JSON object")
    qps = []
    for key, pre in (("weight", "lw"), ("out", "lo")):
        v = _need(d, key, at)
        qps.append(
            None if v is None else _load_qparams(f"{i}.{pre}", v, r.tensors, f"{at} layer {key}")
        )
    pw = None
    if isinstance(params, tuple) and params and hasattr(params[0], "kernel"):
        pw = params[0]
    elif isinstance(params, dict) and hasattr(params.get("w"), "kernel"):
        pw = params["w"]
    if pw is not None:
        extra = {**extra, "kernel": pw.kernel}
    return Layer(op, target, scheme, qps[0], qps[1], extra)


# Attributes a step takes from the kernel its program runs on, never from a file: the
# loader's ``kernel=`` decides them (the native calls of the boundary quantize and
# dequantize and of the max pool).
_KERNEL_ATTRS = ("kernel",)


def _stored_attrs(attrs) -> dict:
    return {k: v for k, v in attrs.items() if k not in _KERNEL_ATTRS}


def _read_step(i: int, st, r: _Reader, known: set, at0: str):
    name, kind, inputs, at = _step_header(i, st, KINDS, at0)
    missing = [n for n in inputs if n not in known]
    if missing:
        raise ValueError(f"{at}: inputs {missing} are not defined by an earlier step or input")
    a = r.value(_need(st, "attrs", at), f"{i}.a", f"{at} attrs")
    if not isinstance(a, dict):
        raise ValueError(f"{at}: attrs must be a JSON object")
    params = r.params(_need(st, "params", at), f"{i}.p", f"{at} params")
    check_step(kind, a, len(inputs), params, at)
    if kind in ("torch_linear", "torch_conv", "pt2e_linear", "pt2e_conv"):
        params = _reprepare(kind, a, params, r.wish)
    if kind in TORCH_KERNEL_KINDS:
        a = {**a, "kernel": r.boundary}
    layer = _read_layer(_need(st, "layer", at), i, r, params, at)
    make = make_torch_step if kind in TORCH_KINDS else make_pt2e_step
    return make(name, kind, a, tuple(inputs), params, layer)


def _example_shapes(v, n: int, where: str):
    if v is None:
        return None
    if not (isinstance(v, list) and len(v) == n):
        raise ValueError(f"{where}: example_shapes must be null or one [shape, dtype] per input")
    out = []
    for j, e in enumerate(v):
        ok = isinstance(e, list) and len(e) == 2 and isinstance(e[0], list)
        ok = ok and len(e[0]) <= 8 and all(_is_int(d) and 0 <= d <= 1 << 24 for d in e[0])
        if not (ok and e[1] in _steps.DTYPES):
            raise ValueError(f"{where}: example_shapes[{j}] {e!r} must be [[dims], dtype]")
        out.append((tuple(e[0]), e[1]))
    return tuple(out)


def _linear_accumulate(steps_json) -> str:
    """A saturating accumulation of the file's torch layers, if any, else ``"exact"`` (what
    decides the kernel of its ops on codes, as the engine's at import; the steps
    themselves are checked when read)."""
    layers = ("torch_linear", "torch_conv")
    for st in steps_json:
        a = st.get("attrs") if isinstance(st, dict) and st.get("kind") in layers else None
        a = a.get("dict") if isinstance(a, dict) else None  # a dict is stored as {"dict": ...}
        acc = a.get("accumulate") if isinstance(a, dict) else None
        if isinstance(acc, str) and acc != "exact":
            return acc
    return "exact"


def load_imported(meta: dict, tensors: dict, wish: str, where: str) -> Program:
    """The :class:`~qjax.Program` an imported-program file describes, every field checked
    (module docstring)."""
    for key in ("inputs", "example_shapes", "output", "engine", "level", "layout", "steps"):
        _need(meta, key, where)
    names = meta["inputs"]
    if not (isinstance(names, list) and 1 <= len(names) <= 64):
        raise ValueError(f"{where}: inputs must be a list of 1 to 64 names")
    if not all(isinstance(n, str) for n in names) or len(set(names)) != len(names):
        raise ValueError(f"{where}: inputs {names!r} must be distinct names")
    if meta["engine"] is not None and meta["engine"] not in ENGINE_CHOICES:
        raise ValueError(
            f"{where}: engine {meta['engine']!r} must be null or one of {ENGINE_CHOICES}"
        )
    if meta["level"] is not None and meta["level"] not in LEVELS:
        raise ValueError(f"{where}: level {meta['level']!r} must be null or one of {LEVELS}")
    if meta["layout"] not in LAYOUTS:
        raise ValueError(f"{where}: layout {meta['layout']!r} must be one of {LAYOUTS}")
    shapes = _example_shapes(meta["example_shapes"], len(names), where)
    steps_json = meta["steps"]
    if not isinstance(steps_json, list) or not steps_json:
        raise ValueError(f"{where}: steps must be a non-empty list")
    r = _Reader(tensors, wish, quantize_kernel(wish, _linear_accumulate(steps_json)))
    known = set(names)
    steps = []
    for i, st in enumerate(steps_json):
        s = _read_step(i, st, r, known, where)
        if s.name in known:
            raise ValueError(f"{where}: step {i} ({s.name!r}): the name is defined twice")
        known.add(s.name)
        steps.append(s)
    output = _decode_output(meta["output"], known, where)
    program = Program(
        steps, names, output, engine=meta["engine"], level=meta["level"], layout=meta["layout"]
    )
    program.kernels = kernels_of(program.params)
    program.example_shapes = shapes
    program.refresh = fold_program  # a torch import's native layers: requantization folded
    if shapes is not None:  # the last word: it traces at the example shapes (nothing computed)
        _check_runs(program, shapes, where, trace=True)
    return program
