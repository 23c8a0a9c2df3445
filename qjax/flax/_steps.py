"""The steps of a traced Flax program as descriptions: ``(kind, attributes)`` + params.

:mod:`qjax.flax._lower` builds every step of a converted model with :func:`make_step`
from a *kind* and JSON-able *attributes*; the arrays go in the step's params. The same
function rebuilds the steps of a program read from a file (:mod:`qjax.flax._program_io`),
so a saved program runs the code that the converted one ran, and nothing in a file is
executed: a file names a kind and, for ``lax`` steps, a primitive from
:data:`PRIMITIVES`, with parameters made of plain values (:func:`encode_value`). (A
converted program may run any primitive in a float step; only these can be saved.)

=============  ==========================================  ===========================
kind           computes (``p``: the step's params)         attributes
=============  ==========================================  ===========================
``quantize``   ``QArray(fake_quant_codes(x, p, compat),    ``compat``
               p)`` (``x`` dequantized first if codes)
``dequantize`` ``f32(q - zp)·s`` cast to ``dtype``          ``dtype``
``layer``      int8 linear / conv, ``p = (weights, bias,   the layer's ``op``, ``name``,
               out qparams)`` (:func:`~qjax.flax.           ``relu``, ``geometry``,
               _intsim.run_layer`` with ``scheme``)         ``in_ndim``, ``out_dims``,
                                                           ``scheme``, ``source``,
                                                           ``perm`` (an Einsum's
                                                           transposes, or null)
``embed``      an embedding lookup from int8 codes,         ``name``, ``mode``
               ``p``: the table's codes and qparams         (``"fill"`` / ``"clip"``),
               (:func:`embed_lookup`)                       ``fill`` (a float or null)
``dynamic_     :func:`qjax.flax._ptq.dynamic_linear`,       ``name``, ``act_spec``,
linear``       ``p = (int8 weight, bias)``                  ``compat``
``weight_      :func:`qjax.flax._ptq.weight_only_linear`,   ``name``, ``spec``
only_linear``  ``p = (codes, scale, zero point), bias``
``relu``       ``max(q, zp)`` on codes                      --
``lax``        one JAX primitive on float values, or on     ``primitive``, ``params``,
               the integer values of codes (``on_codes``;   ``slots``, ``on_codes``
               layout ops and max pooling), ``p``: the
               known (constant) operands
``constant``   ``p``                                        --
``identity``   its input                                    --
=============  ==========================================  ===========================

Every kind also has ``pick``: for each input, the index of the output it reads of a step
with several outputs (``None``: the value itself).

**Kernel.** ``quantize``, ``dequantize`` and ``lax`` steps also take ``kernel``
(:data:`KERNEL_KINDS`): ``"auto"`` where the program's layers run a native kernel
(:func:`qjax.kernels._choice.quantize_kernel`), else ``"xla"``. With ``"auto"`` a
quantize (``compat`` ``"qjax"`` or ``"torch"``), a dequantize and a max pool on codes
are one native call each where that call applies (per-tensor 8-bit codes; the same codes
and floats), so that a program of native layers has no XLA op left to send it to XLA's
thread pool; inside a program (a quantize of a step's value, a dequantize that a step
reads) they stay XLA (:func:`boundary_kernels`). A file never holds it: the lowering and
the loader (``load_served(kernel=...)``) set it.

**Batch.** A program saved from a model is lowered with a symbolic batch size ``b``
(``jax.export.symbolic_shape``): the shapes in its ``lax`` parameters are expressions
such as ``b`` or ``64*b``, stored as text and evaluated (:func:`eval_dim`: integers,
``b``, ``+``, ``-``, ``*`` and parentheses, nothing else) at the batch size a program is
run with.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.extend.core import primitives as _prims

from .. import kernels
from .._primitives import dequantize
from .._qarray import QArray
from ..kernels._elementwise import native_quantize
from ..kernels._pool import native_max_pool
from ..program import Layer, Step
from . import _ptq, _record
from ._intsim import fake_quant_codes, run_layer

__all__ = [
    "KERNEL_KINDS",
    "KINDS",
    "PRIMITIVES",
    "bind",
    "boundary_kernels",
    "decode_value",
    "embed_lookup",
    "encode_value",
    "eval_dim",
    "make_step",
    "on_xla",
    "primitive",
]

KINDS = (
    "quantize",
    "dequantize",
    "layer",
    "relu",
    "lax",
    "constant",
    "identity",
    "embed",
    "dynamic_linear",
    "weight_only_linear",
)

# the primitives a lax step may run: elementwise math, comparisons, reductions, layout,
# dots and convolutions, pooling windows (no calls, loops, callbacks, effects or RNG)
PRIMITIVES = frozenset(
    """abs acos acosh add and argmax argmin asin asinh atan atan2 atanh
    broadcast_in_dim cbrt ceil clamp concatenate conv_general_dilated convert_element_type
    copy cos cosh cumlogsumexp cummax cummin cumprod cumsum div dot_general dynamic_slice
    eq erf erf_inv erfc exp exp2 expm1 floor gather ge gt imag integer_pow iota is_finite
    le log log1p logistic lt max min mul ne neg nextafter not or pad pow real
    reduce_and reduce_max reduce_min reduce_or reduce_precision reduce_prod reduce_sum
    reduce_window_max reduce_window_min reduce_window_sum rem reshape rev round rsqrt
    select_n sign sin sinh slice sort sqrt square squeeze stop_gradient sub tan tanh transpose xor
    shift_left shift_right_arithmetic shift_right_logical split expand_dims top_k""".split()
)

DTYPES = (
    "bool",
    "int8",
    "uint8",
    "int16",
    "uint16",
    "int32",
    "uint32",
    "int64",
    "uint64",
    "float16",
    "bfloat16",
    "float32",
    "float64",
)
_ENUMS = {c.__name__: c for c in (lax.RoundingMethod, lax.Precision, lax.GatherScatterMode)}
_STRUCTS = {c.__name__: c for c in (lax.ConvDimensionNumbers, lax.GatherDimensionNumbers)}
BATCH = "b"  # the name of the symbolic batch size in a saved program


# --------------------------------------------------------------------------------------
# batch-size expressions


_TOKEN = re.compile(r"\s*(\d+|b|[-+*()])")


def eval_dim(text: str, batch: Any) -> Any:
    """The value of a dimension expression (``"b"``, ``"64*b"``, ``"2*b + 3"``) at
    ``b = batch`` (an int, or a symbolic dimension). ``ValueError`` for anything but
    integers, ``b``, ``+``, ``-``, ``*`` and parentheses.

    >>> eval_dim("2*b + 3", 5), eval_dim("-1*b + 16", 4)
    (13, 12)
    >>> eval_dim("b // 2", 4)  # doctest: +ELLIPSIS
    Traceback (most recent call last):
      ...
    ValueError: dimension expression 'b // 2': unexpected '/' (integers, b, +, -, * and ...
    """
    if not isinstance(text, str) or len(text) > 200:
        raise ValueError(f"dimension expression {text!r}: a string of at most 200 characters")
    tokens, pos = [], 0
    while pos < len(text):
        m = _TOKEN.match(text, pos)
        if m is None:
            if text[pos:].strip() == "":
                break
            raise ValueError(
                f"dimension expression {text!r}: unexpected {text[pos:].strip()[0]!r} "
                "(integers, b, +, -, * and parentheses only)"
            )
        tokens.append(m.group(1))
        pos = m.end()
    i = 0

    def peek():
        return tokens[i] if i < len(tokens) else None

    def take():
        nonlocal i
        i += 1
        return tokens[i - 1]

    def factor():
        t = take() if peek() is not None else None
        if t == "-":
            return -factor()
        if t == "(":
            v = expr()
            if peek() != ")":
                raise ValueError(f"dimension expression {text!r}: unbalanced parentheses")
            take()
            return v
        if t == BATCH:
            return batch
        if t is not None and t.isdigit():
            return int(t)
        raise ValueError(f"dimension expression {text!r}: unexpected {t!r}")

    def term():
        v = factor()
        while peek() == "*":
            take()
            v = v * factor()
        return v

    def expr():
        v = term()
        while peek() in ("+", "-"):
            v = v + term() if take() == "+" else v - term()
        return v

    v = expr()
    if i != len(tokens):
        raise ValueError(f"dimension expression {text!r}: unexpected {tokens[i]!r}")
    return v


# --------------------------------------------------------------------------------------
# plain values: primitive parameters, attributes


def encode_value(v: Any, where: str) -> Any:
    """``v`` as JSON: ``None``, bools, ints, finite floats and strings as themselves;
    tuples and lists as lists; dicts (string keys) as ``{"dict": ...}``; dtypes, symbolic
    dimensions, non-finite floats and the lax enums / structures (:data:`_ENUMS`,
    :data:`_STRUCTS`) tagged. ``ValueError`` naming ``where`` for anything else.

    >>> encode_value((1, 2.5, "SAME", np.dtype("int8"), lax.RoundingMethod.TO_NEAREST_EVEN), "p")
    [1, 2.5, 'SAME', {'dtype': 'int8'}, {'enum': 'RoundingMethod', 'name': 'TO_NEAREST_EVEN'}]
    """
    if v is None or isinstance(v, (bool, str)):
        return v
    for name, cls in _ENUMS.items():  # before int: RoundingMethod is an IntEnum
        if isinstance(v, cls):
            return {"enum": name, "name": v.name}
    if isinstance(v, (int, np.integer)) and not isinstance(v, np.bool_):
        return int(v)
    if isinstance(v, np.bool_):
        return bool(v)
    if isinstance(v, (float, np.floating)):
        return float(v) if np.isfinite(v) else {"float": repr(float(v))}
    if jax.export.is_symbolic_dim(v):
        text = str(v)
        eval_dim(text, 1)  # a form the reader accepts, or an error now
        return {"dim": text}
    for name, cls in _STRUCTS.items():
        if isinstance(v, cls):
            fields = {f: encode_value(getattr(v, f), f"{where}.{f}") for f in _fields(cls)}
            return {"struct": name, "fields": fields}
    if isinstance(v, (tuple, list)):
        return [encode_value(t, f"{where}[{i}]") for i, t in enumerate(v)]
    if isinstance(v, Mapping) and all(isinstance(k, str) for k in v):
        return {"dict": {k: encode_value(t, f"{where}.{k}") for k, t in v.items()}}
    try:
        dt = np.dtype(v)
    except TypeError:
        dt = None
    if dt is not None and not isinstance(v, (np.ndarray, jax.Array)) and dt.name in DTYPES:
        return {"dtype": dt.name}
    raise ValueError(f"{where}: a {type(v).__name__} value ({v!r}) cannot be written to a file")


def _fields(cls) -> tuple[str, ...]:
    if hasattr(cls, "_fields"):
        return tuple(cls._fields)
    return tuple(cls.__dataclass_fields__)


def decode_value(obj: Any, batch: Any, where: str) -> Any:
    """The inverse of :func:`encode_value` (lists become tuples), with symbolic
    dimensions evaluated at ``batch``; ``ValueError`` naming ``where`` for anything
    :func:`encode_value` does not write.

    >>> decode_value([{"dim": "2*b"}, {"dtype": "float32"}, {"float": "inf"}], 3, "p")
    (6, dtype('float32'), inf)
    """
    if obj is None or isinstance(obj, (bool, int, str)):
        return obj
    if isinstance(obj, float):
        return obj
    if isinstance(obj, list):
        return tuple(decode_value(t, batch, f"{where}[{i}]") for i, t in enumerate(obj))
    if not isinstance(obj, dict) or len(obj) not in (1, 2):
        raise ValueError(f"{where}: unexpected value {obj!r}")
    if "dim" in obj and len(obj) == 1:
        try:
            return eval_dim(obj["dim"], batch)
        except ValueError as e:
            raise ValueError(f"{where}: {e}") from None
    if "dtype" in obj and len(obj) == 1:
        if obj["dtype"] not in DTYPES:
            raise ValueError(f"{where}: dtype {obj['dtype']!r} is not one of {DTYPES}")
        return np.dtype(jax.numpy.dtype(obj["dtype"]))
    if "float" in obj and len(obj) == 1:
        if obj["float"] not in ("nan", "inf", "-inf"):
            raise ValueError(f"{where}: float {obj['float']!r} must be 'nan', 'inf' or '-inf'")
        return float(obj["float"])
    if "dict" in obj and len(obj) == 1 and isinstance(obj["dict"], dict):
        return {k: decode_value(t, batch, f"{where}.{k}") for k, t in obj["dict"].items()}
    if set(obj) == {"enum", "name"}:
        cls = _ENUMS.get(obj["enum"])
        if cls is None or obj["name"] not in cls.__members__:
            raise ValueError(f"{where}: unknown enum value {obj!r}")
        return cls[obj["name"]]
    if set(obj) == {"struct", "fields"}:
        cls = _STRUCTS.get(obj["struct"])
        fields = obj["fields"]
        if cls is None or not isinstance(fields, dict) or set(fields) != set(_fields(cls)):
            raise ValueError(f"{where}: unknown structure {obj!r}")
        return cls(**{f: decode_value(fields[f], batch, f"{where}.{f}") for f in _fields(cls)})
    raise ValueError(f"{where}: unexpected value {obj!r}")


# --------------------------------------------------------------------------------------
# steps


def bind(prim, params: Mapping, args) -> list:
    """``prim.bind(*args, **params)`` as a list of outputs. (``reshape`` first checks the
    element count, which its shape rule leaves to the lowering: a file's sizes are known
    wrong when it loads, not on the first call.)"""
    if prim.name == "reshape" and args:
        n, m = np.shape(args[0]), params.get("new_sizes", ())
        if not _same_size(n, m):
            raise ValueError(f"reshape of shape {tuple(n)} to {tuple(m)}: sizes differ")
    out = prim.bind(*args, **prim.get_bind_params(dict(params)))
    return list(out) if prim.multiple_results else [out]


def _same_size(a, b) -> bool:
    """Whether shapes ``a`` and ``b`` hold as many elements (dimensions may be symbolic:
    ``True`` where that cannot be decided; the lowering checks again)."""
    try:
        return bool(math.prod(a) == math.prod(b))
    except Exception:  # an inconclusive comparison of symbolic dimensions
        return True


def primitive(name: str, where: str):
    """The primitive of :data:`PRIMITIVES` named ``name`` (``ValueError`` for others)."""
    if name not in PRIMITIVES:
        raise ValueError(
            f"{where}: primitive {name!r} is not one a saved program may run "
            f"(qjax.flax._steps.PRIMITIVES: {len(PRIMITIVES)} elementwise, reduction, layout, "
            "dot, convolution and pooling primitives)"
        )
    return getattr(_prims, f"{name}_p")


def _dequantize(dtype, kernel):
    def fn(_, q):
        return kernels.dequantize_output(q, kernel=kernel).astype(dtype)

    return fn


def _quantize(compat, kernel):
    native = compat in ("qjax", "torch")  # fake_quant_codes: both are qjax.quantize's

    def fn(p, v):
        if isinstance(v, QArray):
            v = dequantize(v.values, v.qparams)
        elif native:
            codes = native_quantize(v, p, "qjax", kernel, "quantize step")
            if codes is not None:
                return QArray(codes, p)
        return QArray(fake_quant_codes(v, p, compat), p)

    return fn


def _layer(a):
    info = _record.LayerMark(
        a["op"], a["name"], None, a["source"], a["relu"], a["geometry"], a["in_ndim"],
        a["out_dims"], None, a.get("perm"),
    )  # fmt: skip
    scheme = a["scheme"]

    def fn(p, xq):
        return run_layer(info, xq, p[0], p[1], p[2], scheme)

    return fn


def _max_pool_nhwc(params) -> dict | None:
    """The window of a ``reduce_window_max`` over H and W of an (N, H, W, C) value (no
    base dilation, integer sizes), else ``None``."""
    # anything else (a file's malformed parameters included) is left to XLA's reduce_window,
    # which names the problem
    dims, strides = params.get("window_dimensions"), params.get("window_strides")
    pads, dil = params.get("padding"), params.get("window_dilation")
    base = params.get("base_dilation")
    seqs = (dims, strides, dil, base, pads)
    if not all(isinstance(v, (tuple, list)) and len(v) == 4 for v in seqs):
        return None
    if not all(isinstance(p, (tuple, list)) and len(p) == 2 for p in pads):
        return None
    flat = (*dims, *strides, *dil, *base, *(v for p in pads for v in p))
    if not all(isinstance(v, int) for v in flat):
        return None  # symbolic
    if min(*dims, *strides, *dil) < 1 or min(v for p in pads for v in p) < 0:
        return None
    if any(v != 1 for v in (*base, dims[0], dims[3], strides[0], strides[3], dil[0], dil[3])):
        return None
    if tuple(pads[0]) != (0, 0) or tuple(pads[3]) != (0, 0):
        return None
    return {"window": tuple(dims[1:3]), "strides": tuple(strides[1:3]),
            "dilation": tuple(dil[1:3]), "pads": (tuple(pads[1]), tuple(pads[2]))}  # fmt: skip


def _native_max_pool(prim, params, pool, q: QArray) -> QArray | None:
    """A max pool on codes through :func:`qjax.kernels._pool.native_max_pool`, or
    ``None`` where the native call does not apply."""
    k, s, d, pads = pool["window"], pool["strides"], pool["dilation"], pool["pads"]
    lo = (pads[0][0], pads[1][0])
    y = native_max_pool(q.values, k, s, d, lo, lambda v: bind(prim, params, [v])[0])
    return None if y is None else QArray(y, q.qparams)


def _lax(a):
    prim, params, slots, on_codes = a["primitive"], a["params"], a["slots"], a["on_codes"]
    pool = None
    if on_codes and prim.name == "reduce_window_max" and a.get("kernel", "xla") == "auto":
        pool = _max_pool_nhwc(params)

    def fn(p, *vals):
        if on_codes:
            if pool is not None:
                y = _native_max_pool(prim, params, pool, vals[0])
                if y is not None:
                    return y
            out = bind(prim, params, [q.values for q in vals])
            return QArray(out[0], vals[0].qparams)
        args = [
            val if kind == "lit" else (p[val] if kind == "param" else vals[val])
            for kind, val in slots
        ]
        out = bind(prim, params, args)
        return out if prim.multiple_results else out[0]

    return fn


def embed_lookup(table: QArray, indices, *, mode: str = "fill", fill=None) -> jax.Array:
    """An embedding lookup served from int8 codes: the gather ``jnp.take(t, ids,
    axis=0)`` runs (rows ``indices[..., 0]`` of ``t``) on ``t = dequantize(table)``, which
    is the model's fake-quantized table bit for bit (``f32(q - zp)·s`` per row, or per
    tensor).

    ``table``: ``(num_embeddings, features)`` codes, one scale per row (spec ``axis=0``)
    or per tensor. ``indices``: integers ``(..., 1)``. ``mode="fill"``: a row outside
    ``[0, n)`` gives ``fill`` (``None``: NaN), ``jnp.take``'s default; ``"clip"``: the
    nearest row. Float32 ``(..., features)`` out. The table is dequantized whole, then
    gathered, as the model gathers its fake-quantized table: the same program shape, so
    XLA rounds the float ops around the lookup (an add it may contract into an fma) as in
    the jitted model; the rows of codes alone, dequantized after the gather, were
    measured to change that rounding.

    >>> from qjax import QParams, QuantSpec
    >>> t = QArray(jnp.array([[1, -2], [3, 4]], jnp.int8),
    ...            QParams(jnp.array([0.5, 0.25]), jnp.array([0, 0]), QuantSpec(axis=0)))
    >>> embed_lookup(t, jnp.array([[1], [0], [5]]))
    Array([[ 0.75,  1.  ],
           [ 0.5 , -1.  ],
           [  nan,   nan]], dtype=float32)
    """
    idx = jnp.asarray(indices)
    dn = lax.GatherDimensionNumbers(
        offset_dims=(idx.ndim - 1,), collapsed_slice_dims=(0,), start_index_map=(0,)
    )
    modes = {"fill": lax.GatherScatterMode.FILL_OR_DROP, "clip": lax.GatherScatterMode.CLIP}
    t = dequantize(table.values, table.qparams)
    return lax.gather(t, idx, dn, (1, table.shape[1]), mode=modes[mode], fill_value=fill)


def _embed(a):
    mode, fill = a["mode"], a["fill"]
    return lambda p, idx: embed_lookup(p, idx, mode=mode, fill=fill)


def _dynamic(a):
    spec, compat, name = a["act_spec"], a["compat"], a["name"]
    # files from before recipes: the only recipe and accumulation then
    recipe, acc = a.get("recipe", "fbgemm"), a.get("accumulate", "exact")
    return lambda p, x: _ptq.dynamic_linear(
        x, p[0], p[1], act_spec=spec, compat=compat, recipe=recipe, accumulate=acc, name=name
    )


def _weight_only(a):
    spec, name = a["spec"], a["name"]
    return lambda p, x: _ptq.weight_only_linear(x, p[0], spec, p[1], name=name)


def _fn(kind: str, a: Mapping):
    if kind == "quantize":
        return _quantize(a["compat"], a.get("kernel", "xla"))
    if kind == "dequantize":
        return _dequantize(a["dtype"], a.get("kernel", "xla"))
    if kind == "layer":
        return _layer(a)
    if kind == "relu":
        return lambda _, q: kernels.relu(q)
    if kind == "lax":
        return _lax(a)
    if kind == "constant":
        return lambda p: p
    if kind == "identity":
        return lambda _, v: v
    if kind == "embed":
        return _embed(a)
    if kind == "dynamic_linear":
        return _dynamic(a)
    if kind == "weight_only_linear":
        return _weight_only(a)
    raise ValueError(f"unknown step kind {kind!r}; known: {KINDS}")


KERNEL_KINDS = ("quantize", "dequantize", "lax")  # the kinds that take ``kernel``


def boundary_kernels(steps, inputs) -> list[Step]:
    """``steps`` with ``kernel="xla"`` for every quantize step that reads another step's
    value and every dequantize step whose value another step reads: only the program's
    boundary runs natively; inside, XLA fuses them into their float neighbours (a native
    dequantize of the CNN class's 256x16x16x32 codes feeding a float add measured ~8%
    slower there).

    >>> q = make_step("q", "quantize", {"compat": "qjax", "kernel": "auto"}, ("x",), (None,))
    >>> d = make_step("d", "dequantize", {"dtype": "float32", "kernel": "auto"}, ("q",), (None,))
    >>> r = make_step("r", "quantize", {"compat": "qjax", "kernel": "auto"}, ("d",), (None,))
    >>> [s.spec[1]["kernel"] for s in boundary_kernels([q, d, r], ("x",))]
    ['auto', 'xla', 'xla']
    """
    read = {i for s in steps for i in s.inputs}
    out = []
    for s in steps:
        kind, a = s.spec
        inner = (kind == "quantize" and any(i not in inputs for i in s.inputs)) or (
            kind == "dequantize" and s.name in read
        )
        out.append(on_xla(s) if inner else s)
    return out


def on_xla(step: Step) -> Step:
    """``step`` with ``kernel="xla"`` (its native calls off: pure XLA, e.g. the jaxpr an
    exporter reads); the step itself when it has no kernel attribute or runs XLA."""
    if step.spec is None or step.spec[0] not in KERNEL_KINDS:
        return step
    kind, a = step.spec
    if a.get("kernel", "xla") == "xla":
        return step
    a = dict(a, kernel="xla")
    pick = a.pop("pick")
    return make_step(step.name, kind, a, step.inputs, pick, step.params, step.layer, step.traced)


def make_step(
    name: str,
    kind: str,
    attrs: Mapping,
    inputs: tuple[str, ...],
    pick: tuple,
    params: Any = None,
    layer: Layer | None = None,
    traced: bool = True,
) -> Step:
    """The :class:`~qjax.Step` of ``kind`` (module docstring) reading ``inputs`` (output
    ``pick[i]`` of a step with several outputs); ``Step.spec`` keeps its description.

    >>> from qjax import QuantSpec, QParams
    >>> qp = QParams(0.5, 0, QuantSpec())
    >>> s = make_step("q", "quantize", {"compat": "qjax"}, ("x",), (None,), qp)
    >>> s.fn(s.params, jax.numpy.array([0.3, -9.0])).values
    Array([  1, -18], dtype=int8)
    """
    fn = _fn(kind, attrs)
    if any(i is not None for i in pick):

        def run(p, *vals):
            return fn(p, *(v if i is None else v[i] for v, i in zip(vals, pick, strict=True)))

    else:
        run = fn
    spec = (kind, {**attrs, "pick": tuple(pick)})
    return Step(name, run, tuple(inputs), params, traced, None, layer, spec)
