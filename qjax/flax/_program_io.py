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

from .._qarray import _serialize_spec
from ..kernels._choice import quantize_kernel
from ..program import Program
from . import _steps
from ._fields import (
    _check_runs,
    _decode_output,
    _encode,
    _encode_output,
    _is_int,
    _step_header,
)
from ._fold import codes_qparams
from ._imported_io import imported_file, load_imported
from ._program_checks import (
    _SPEC_ATTRS,
    _check_attrs,
    _load_layer,
    _load_params,
    _need,
    _spec_attr,
)

__all__ = ["FORMAT", "VERSION", "load_program", "program_file"]

FORMAT = "qjax.program"
VERSION = 1

# --------------------------------------------------------------------------------------
# writing


def _encode_step(i: int, s, tensors: dict, where: str) -> dict:
    at = f"{where}: step {s.name!r}"
    if s.spec is None:
        target = s.layer.target if s.layer is not None else "?"
        raise TypeError(
            f"{at} ({target}) is a function without a description; only programs "
            "from qjax.convert can be saved"
        )
    kind, attrs = s.spec
    a = {k: v for k, v in attrs.items() if k != "kernel"}  # the loader's kernel= sets it
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
        for j, c in enumerate(p or ()):  # a step on codes (max pool, reshape) has none
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
    """``(metadata, tensors)`` of a converted program (:meth:`TracedProgram.describe`),
    or of an imported torch / pt2e program (:func:`~qjax.flax._imported_io.imported_file`)."""
    from ._convert import TracedProgram

    if not isinstance(program, TracedProgram):
        return imported_file(program, where)
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


class _StoredStep:
    """One step read from a file: checked, its arrays loaded; ``attrs`` still JSON (the
    batch size is known only when the program runs)."""

    def __init__(self, i: int, st, tensors: dict, wish: str, where: str, qps: dict):
        name, kind, inputs, at = _step_header(i, st, _steps.KINDS, where)
        traced = _need(st, "traced", at)
        if not isinstance(traced, bool):
            raise ValueError(f"{at}: traced {traced!r} must be true or false")
        self.at, self.name, self.kind, self.inputs, self.traced = (
            at,
            name,
            kind,
            inputs,
            traced,
        )
        self.json_attrs = _need(st, "attrs", at)
        self.wish = wish
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
        # the qparams of the codes the first input holds (qps: each earlier value's), from
        # which a layer takes its kernel as qjax.convert did (linear_kernel)
        x_qp = qps.get(inputs[0]) if inputs and a["pick"][0] is None else None
        x_spec = x_qp.spec if kind == "layer" and x_qp is not None else None
        self.params = _load_params(i, kind, a, st.get("params"), tensors, wish, at, x_spec)
        self.codes_qparams = codes_qparams(kind, a, self.params, x_qp)
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
        if self.kind in _steps.KERNEL_KINDS:
            a["kernel"] = quantize_kernel(self.wish)
        return _steps.make_step(
            self.name, self.kind, a, self.inputs, pick, self.params, self.layer, self.traced
        )


def load_program(meta: dict, tensors: dict, wish: str, where: str):
    """The program a ``qjax.program`` file describes (a
    :class:`~qjax.flax._convert.TracedProgram`), every field checked (module docstring)."""
    from ._convert import TracedProgram

    if meta.get("program") == "imported":
        return load_imported(meta, tensors, wish, where)
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
    qps: dict = {}  # the qparams of the codes each value holds, read off the steps
    stored = []
    for i, st in enumerate(steps_json):
        s = _StoredStep(i, st, tensors, wish, where, qps)
        qps[s.name] = s.codes_qparams
        stored.append(s)
    known = set(names) | {s.name for s in stored}
    output = _decode_output(meta["output"], known, where)

    def at_batch(b) -> Program:
        try:
            steps = _steps.boundary_kernels([s.step(b) for s in stored], names)
            return Program(steps, names, output)
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
    _check_runs(program, first_shapes, where, trace=False)  # the last word: at the example batch

    def describe():
        if batch_name is None:
            return program, first_shapes, example, meta.get("fixed_because"), float_ops
        (b,) = jax.export.symbolic_shape(_steps.BATCH)
        return at_batch(b), shapes_at(b), example, None, float_ops

    served = TracedProgram(program, float_ops, first_shapes, build, describe)
    served.layout = meta["layout"]
    return served
