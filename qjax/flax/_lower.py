"""Lowering a recorded forward (a jaxpr with qjax marks) to one int8 :class:`~qjax.Program`.

:func:`lower` walks the equations of the jaxpr that :func:`qjax.convert` traced while
:func:`qjax.flax._record.recording` was on, with two kinds of values: *known* ones
(weights, observer states, qparams: everything that does not depend on the inputs,
computed once, now) and *program* values, each the output of a :class:`~qjax.Step`. A
program value is either a float array or integer codes with their qparams (a
:class:`~qjax.QArray` whose dequantization is, bit for bit, the float value the model
computed there). Per equation:

=================================  ======================================================
equation                           lowered to
=================================  ======================================================
only known inputs                  evaluated now (a constant of the program)
``jit`` / ``custom_jvp`` /         its body, inlined
``custom_vjp`` / ``checkpoint``
activation quantizer (mark)        ``quantize`` step: float -> codes, or codes -> codes
                                   in other qparams (``fake_quant`` of the dequantized
                                   value, elementwise); the same qparams: nothing
quantized layer (mark)             the input's ``quantize`` (when the layer has an input
                                   quantizer), then an int8 x int8 -> int32 ``linear`` /
                                   ``conv2d`` / ``conv1d`` step with the scheme's
                                   requantization (codes out) or, without an output
                                   quantizer, the float ``f32(acc)·f32(s_x·s_w) + b``;
                                   weights quantized and prepared once, here
Einsum hook (mark with ``perm``)   the same ``linear`` step with the equation's transposes
                                   around it (:func:`~qjax.flax._intsim.einsum_layout`)
gather of an Embed table (mark)    ``embed``: the lookup on the table's int8 codes
dynamic / weight-only linear       ``dynamic_linear`` / ``weight_only_linear``: the
(mark)                             :mod:`qjax.flax._ptq` function, weights stored int8 /
                                   packed int4
``max(codes, 0)``                  ``relu`` on the codes (clamp at the zero point)
``reduce_window_max`` and layout   the same op on the codes (max pool, reshape,
ops on per-tensor codes            transpose, slices, concatenation in one qparams)
anything else                      a ``float`` step: the same primitive on the
                                   dequantized inputs (``dequantize`` steps)
=================================  ======================================================

Every step computes exactly what the model computed at that point (the marks carry the
model's own qparams and formula, :mod:`qjax.flax._intsim`), so the program's outputs are
the frozen model's, bit for bit, when its layers have a ``QuantConfig(scheme=...)`` equal
to the program's scheme. Equations whose values the outputs do not need (the float
simulation a mark replaced) are dropped. :attr:`Lowering.float_ops` lists the float
steps that remain, and a marked layer the int8 kernels cannot run (with the reason).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.extend import core as jcore

from .._spec import QParams
from ..kernels._choice import quantize_kernel
from ..program import Layer, Program, Step
from . import _record
from ._core import LayerStats
from ._intsim import prepare_layer
from ._steps import KERNEL_KINDS, boundary_kernels, make_step
from ._table import table_codes

__all__ = ["Lowering", "check_stats", "lower"]

# primitives with a body to inline: the parameter holding it
_CALLS = {
    "pjit": "jaxpr",
    "jit": "jaxpr",
    "closed_call": "call_jaxpr",
    "core_call": "call_jaxpr",
    "custom_jvp_call": "call_jaxpr",
    "custom_vjp_call": "call_jaxpr",
    "custom_vjp_call_jaxpr": "fun_jaxpr",
    "checkpoint": "jaxpr",
    "remat": "jaxpr",
}
# ops that move codes without arithmetic: the same op on the integer values
_LAYOUT = {
    "reshape",
    "transpose",
    "squeeze",
    "expand_dims",
    "broadcast_in_dim",
    "slice",
    "rev",
    "copy",
    "copy_p",
    "reduce_window_max",
    "concatenate",
}


class _Pending:
    """A known equation, evaluated on first use: most known values (the float simulation's
    weight fake-quant, statistics arithmetic a mark replaced) are never needed, and each
    evaluation is a small XLA compile."""

    def __init__(self, eqn, ins):
        self.eqn, self.ins, self.outs = eqn, ins, None

    def get(self, i: int):
        if self.outs is None:
            self.outs = _bind(self.eqn, [v.val for v in self.ins])
            self.ins = None
        return self.outs[i]


class _Known:
    """A value that does not depend on the inputs (``val`` computed when first read)."""

    __slots__ = ("_pending", "_val", "literal")

    def __init__(self, val=None, literal: bool = False, pending=None):
        self._val, self.literal, self._pending = val, literal, pending

    @property
    def val(self):
        if self._pending is not None:
            self._val = self._pending[0].get(self._pending[1])
            self._pending = None
        return self._val


class _Table(_Known):
    """A weight-only embedding table (a :class:`~qjax.flax._record.TableMark`): known,
    and a gather of it is served from its int8 codes (:meth:`Lowering.embed`)."""

    __slots__ = ("info", "src", "table", "stats")

    def __init__(self, src: _Known, info, table: _Known, stats):
        super().__init__()
        self.src, self.info, self.table, self.stats = src, info, table, stats

    @property
    def val(self):
        return self.src.val


@dataclasses.dataclass
class _Value:
    """A program value: the output ``idx`` of step ``name`` (codes when ``qp`` is set)."""

    name: str
    idx: int | None = None
    qp: QParams | None = None


def _same_qparams(a: QParams, b: QParams) -> bool:
    return (
        a.spec == b.spec
        and np.array_equal(np.asarray(a.scale), np.asarray(b.scale))
        and np.array_equal(np.asarray(a.zero_point), np.asarray(b.zero_point))
    )


def _symbolic(eqn) -> bool:
    """Whether an output shape of ``eqn`` has a symbolic dimension (a program lowered
    with a symbolic batch size computes such values when it runs, not now)."""
    return any(
        any(jax.export.is_symbolic_dim(d) for d in getattr(v.aval, "shape", ()))
        for v in eqn.outvars
    )


def _bind(eqn, vals):
    with eqn.ctx.manager:
        out = eqn.primitive.bind(*vals, **eqn.primitive.get_bind_params(eqn.params))
    return list(out) if eqn.primitive.multiple_results else [out]


def check_stats(stats, name: str) -> None:
    """``ValueError`` naming ``name`` when its observer states (one state, a
    :class:`~qjax.flax._core.LayerStats`, or qparams) never saw data (``count == 0``) or
    hold non-finite numbers."""
    for st in stats if isinstance(stats, LayerStats) else (stats,):
        if st is None:
            continue
        count = getattr(st, "count", None)
        if count is not None and int(np.asarray(count)) == 0:
            raise ValueError(
                f"convert: {name} has observers that never saw data (count 0); calibrate "
                "the model (qjax.flax.nnx.calibrate / linen.calibrate) or train it in "
                "Mode.QAT first"
            )
        for leaf in jax.tree_util.tree_leaves(st):
            a = np.asarray(leaf)
            if a.dtype.kind == "f" and not np.isfinite(a).all():
                raise ValueError(
                    f"convert: {name} has non-finite observer statistics ({a.ravel()[:4]}); "
                    "the calibration data contained inf/NaN: recalibrate with finite data"
                )


class Lowering:
    """The state of one lowering: the steps so far and the names they use."""

    def __init__(self, scheme: str, native: str, prepared: dict | None = None):
        self.scheme = scheme
        self.native = native
        self.prepared = {} if prepared is None else prepared  # name -> (qx, weight, qy)
        self.steps: list[Step] = []
        self._names: set[str] = set()
        self._deq: dict[tuple, _Value] = {}
        self._quantized: dict[tuple, list] = {}
        self.marked = 0
        self.float_ops: dict[str, str] = {}  # step name -> what stays float (and why)

    # -- steps -------------------------------------------------------------------------

    def _fresh(self, stem: str) -> str:
        name, i = stem, 1
        while name in self._names:
            i += 1
            name = f"{stem}_{i}"
        self._names.add(name)
        return name

    def add(self, stem, kind, attrs, inputs, params=None, layer=None, traced=True) -> str:
        """A step of ``kind`` (:mod:`qjax.flax._steps`) over program values; its name."""
        name = self._fresh(stem)
        if kind in KERNEL_KINDS:
            attrs = {**attrs, "kernel": quantize_kernel(self.native)}
        self.steps.append(
            make_step(
                name,
                kind,
                attrs,
                tuple(v.name for v in inputs),
                tuple(v.idx for v in inputs),
                params,
                layer,
                traced,
            )  # fmt: skip
        )
        return name

    def dequantized(self, v: _Value, dtype) -> _Value:
        """The float value of codes ``v`` (one ``dequantize`` step per value and dtype)."""
        key = (v.name, v.idx, np.dtype(dtype).name)
        if key not in self._deq:
            layer = Layer("dequantize", "dequantize")
            attrs = {"dtype": np.dtype(dtype)}
            name = self.add(f"{v.name}:dequantize", "dequantize", attrs, [v], None, layer, False)
            self._deq[key] = _Value(name)
        return self._deq[key]

    def quantized(self, x: _Value, qp: QParams, compat: str, stem: str, target: str) -> _Value:
        """``x`` as codes in ``qp``: ``fake_quant_codes`` of its float value (no step
        when ``x`` already holds codes in ``qp``)."""
        if x.qp is not None and _same_qparams(x.qp, qp):
            return x
        done = self._quantized.setdefault((x.name, x.idx), [])
        for qp2, v in done:  # the same value quantized the same way: one step
            if _same_qparams(qp2, qp):
                return v
        layer = Layer("quantize", target, None, None, qp, {"compat": compat})
        out = _Value(self.add(stem, "quantize", {"compat": compat}, [x], qp, layer), qp=qp)
        done.append((qp, out))
        return out

    # -- equations ---------------------------------------------------------------------

    def run(self, jaxpr, consts, args) -> list:
        env: dict = {}

        def read(v):
            if isinstance(v, jcore.Literal):
                return _Known(v.val, literal=True)
            return env[v]

        for v, c in zip(jaxpr.constvars, consts, strict=True):
            env[v] = _Known(c)
        for v, a in zip(jaxpr.invars, args, strict=True):
            env[v] = a
        for eqn in jaxpr.eqns:
            outs = self.equation(eqn, [read(v) for v in eqn.invars])
            for v, o in zip(eqn.outvars, outs, strict=True):
                env[v] = o
        return [read(v) for v in jaxpr.outvars]

    def equation(self, eqn, ins) -> list:
        prim = eqn.primitive
        if prim is _record.mark_p:
            return [self.mark(eqn, ins)]
        if prim.name in _CALLS and _CALLS[prim.name] in eqn.params:
            body = eqn.params[_CALLS[prim.name]]
            if isinstance(body, jcore.ClosedJaxpr):
                return self.run(body.jaxpr, body.consts, ins)
            return self.run(body, [], ins)
        if prim.name == "gather" and isinstance(ins[0], _Table) and isinstance(ins[1], _Value):
            out = self.embed(eqn, ins[0], ins[1])
            if out is not None:
                return [out]
        if all(isinstance(v, _Known) for v in ins) and not _symbolic(eqn):
            pending = _Pending(eqn, ins)
            return [_Known(pending=(pending, i)) for i in range(len(eqn.outvars))]
        codes = [v for v in ins if isinstance(v, _Value) and v.qp is not None]
        if codes and len(codes) == len([v for v in ins if isinstance(v, _Value)]):
            out = self.on_codes(eqn, ins, codes)
            if out is not None:
                return out
        return self.float_step(eqn, ins)

    def on_codes(self, eqn, ins, codes) -> list | None:
        """The integer form of ``eqn`` on codes, or ``None`` (it then runs in float)."""
        name, qp = eqn.primitive.name, codes[0].qp
        if qp.spec.granularity != "tensor" or any(not _same_qparams(c.qp, qp) for c in codes):
            return None
        if name == "max" and len(ins) == 2:
            k = [v for v in ins if isinstance(v, _Known)]
            if len(k) != 1 or np.asarray(k[0].val).size != 1 or float(np.asarray(k[0].val)) != 0:
                return None
            layer = Layer("relu", "max(x, 0)", None, None, qp)
            return [_Value(self.add("relu", "relu", {}, codes, None, layer), qp=qp)]
        if name not in _LAYOUT or any(isinstance(v, _Known) for v in ins):
            return None
        op = "max_pool" if name == "reduce_window_max" else name
        layer = Layer(op, name, None, None, qp, {k: str(v) for k, v in eqn.params.items()})
        attrs = {
            "primitive": eqn.primitive,
            "params": dict(eqn.params),
            "slots": tuple(("value", i) for i in range(len(ins))),
            "on_codes": True,
        }
        step = self.add(op, "lax", attrs, list(ins), None, layer, traced=op == "max_pool")
        return [_Value(step, qp=qp)]

    def float_step(self, eqn, ins) -> list:
        """``eqn`` as it is, on the float values of its inputs (known ones as params)."""
        slots, params, dyn = [], [], []
        for i, v in enumerate(ins):
            if isinstance(v, _Known):
                if v.literal:
                    slots.append(("lit", np.asarray(v.val, eqn.invars[i].aval.dtype)))
                else:
                    slots.append(("param", len(params)))
                    params.append(v)  # read (computed) only if the step is kept
            else:
                if v.qp is not None:
                    v = self.dequantized(v, eqn.invars[i].aval.dtype)
                slots.append(("value", len(dyn)))
                dyn.append(v)
        attrs = {
            "primitive": eqn.primitive,
            "params": dict(eqn.params),
            "slots": tuple(slots),
            "on_codes": False,
        }
        prim = eqn.primitive.name
        layer = Layer("float", prim)
        step = self.add(prim, "lax", attrs, dyn, tuple(params), layer, traced=False)
        self.float_ops[step] = prim
        if eqn.primitive.multiple_results:
            return [_Value(step, i) for i in range(len(eqn.outvars))]
        return [_Value(step)]

    # -- marks -------------------------------------------------------------------------

    def mark(self, eqn, ins):
        info = eqn.params["info"]
        y = ins[0]
        ops = jax.tree_util.tree_unflatten(eqn.params["treedef"], ins[1:])
        x = ops.pop("x")
        if isinstance(info, _record.TableMark) and isinstance(y, _Known):
            self.marked += 1
            return _Table(y, info, x, ops["stats"])
        if isinstance(y, _Known) or isinstance(x, _Known):
            return y  # a weight's quantizer, or a layer whose input is a constant
        leaves = jax.tree_util.tree_leaves(ops, is_leaf=lambda v: isinstance(v, (_Known, _Value)))
        if any(not isinstance(v, _Known) for v in leaves):
            raise ValueError(
                f"convert: {info.name}: its qparams or weights depend on the input (a "
                "learnable or dynamic quantizer); the int8 program needs them fixed"
            )
        ops = jax.tree_util.tree_map(lambda v: v.val, ops, is_leaf=lambda v: isinstance(v, _Known))
        self.marked += 1
        if isinstance(info, _record.QuantizeMark):
            qp = ops["qp"]
            check_stats(ops["stats"], info.name)  # the statistics, not only the qparams
            check_stats(qp, info.name)
            stem = info.name.replace(" (input)", ":input").replace(" (output)", ":output")
            return self.quantized(x, qp, info.compat, stem, "qjax.flax.ActQuant")
        if isinstance(info, (_record.DynamicMark, _record.WeightOnlyMark)):
            dtype = jax.tree_util.tree_unflatten(eqn.params["treedef"], eqn.invars[1:])["x"]
            return self.ptq_linear(info, x, ops, dtype.aval.dtype)
        if isinstance(info, _record.TableMark):  # a table computed from the input
            raise ValueError(f"convert: {info.name}: the embedding table depends on the input")
        if info.unsupported:
            why = info.unsupported  # the reasons name the layer
            self.float_ops[y.name] = why if why.startswith(info.name) else f"{info.name}: {why}"
            return y
        return self.layer(info, x, ops)

    def ptq_linear(self, info, x: _Value, ops, dtype) -> _Value:
        """A dynamic or weight-only linear layer (:mod:`qjax.flax._ptq`) as its step,
        on the float value of its input."""
        if x.qp is not None:
            x = self.dequantized(x, dtype)
        bias = ops["bias"]
        bias = None if bias is None else jnp.asarray(bias, jnp.float32)
        w = ops["weight"]
        if isinstance(info, _record.DynamicMark):
            kind = "dynamic_linear"
            attrs = {
                "name": info.name, "act_spec": info.act_spec, "compat": info.compat,
                "recipe": info.recipe, "accumulate": info.accumulate,
            }  # fmt: skip
            extra = {
                "act_spec": str(info.act_spec), "compat": info.compat, "recipe": info.recipe,
                "accumulate": info.accumulate, "kernel": w.kernel,
            }  # fmt: skip
            layer = Layer(kind, "qjax.flax DynamicQuantLinear", None, w.weight.qparams, None, extra)
        else:
            kind = "weight_only_linear"
            attrs = {"name": info.name, "spec": info.spec}
            qp = QParams(w.scale, w.zero_point, info.spec)
            layer = Layer(kind, "qjax.flax WeightOnlyLinear", None, qp, None, {})
        return _Value(self.add(info.name, kind, attrs, [x], (w, bias), layer, traced=False))

    def embed(self, eqn, table: _Table, idx: _Value) -> _Value | None:
        """``jnp.take(table, ids, axis=0)`` (the gather ``nnx.Embed`` / ``nn.Embed``
        run) as an ``embed`` step on the table's int8 codes; ``None`` (a float gather of
        the fake-quantized table) for any other gather or a per-group table."""
        p = eqn.params
        dn, shape = p["dimension_numbers"], eqn.invars[0].aval.shape
        ids_ndim = len(eqn.invars[1].aval.shape)
        take = (
            len(shape) == 2
            and tuple(dn.offset_dims) == (ids_ndim - 1,)
            and tuple(dn.collapsed_slice_dims) == (0,)
            and tuple(dn.start_index_map) == (0,)
            and not dn.operand_batching_dims
            and tuple(p["slice_sizes"]) == (1, shape[1])
            and eqn.invars[1].aval.shape[-1] == 1
        )
        mode = {
            lax.GatherScatterMode.FILL_OR_DROP: "fill",
            lax.GatherScatterMode.CLIP: "clip",
            lax.GatherScatterMode.PROMISE_IN_BOUNDS: "clip",  # XLA clamps the start index
        }.get(p["mode"])
        info = table.info
        if not take or mode is None or info.config.weight.granularity == "group":
            return None
        name = info.name
        known = lambda v: isinstance(v, _Known)  # noqa: E731
        if not all(known(v) for v in jax.tree_util.tree_leaves(table.stats, is_leaf=known)):
            return None
        stats = jax.tree_util.tree_map(lambda v: v.val, table.stats, is_leaf=known)
        check_stats(stats, name)
        codes = table_codes(info, table.table.val, stats)
        fill = p.get("fill_value")
        attrs = {"name": name, "mode": mode, "fill": None if fill is None else float(fill)}
        layer = Layer("embed", "flax Embed (weight-only)", None, codes.qparams, None, {})
        return _Value(self.add(name, "embed", attrs, [idx], codes, layer, traced=False))

    def layer(self, info: _record.LayerMark, x: _Value, ops) -> _Value:
        cfg, name = info.config, info.name
        stats = ops["stats"]
        check_stats(stats, name)
        if cfg.scheme is not None and cfg.scheme != self.scheme:
            raise ValueError(
                f"convert: {name} trained with QuantConfig(scheme={cfg.scheme!r}); convert "
                f"with scheme={cfg.scheme!r} to serve what it trained"
            )
        if cfg.weight is None or cfg.activation is None:
            raise ValueError(f"convert: {name} has a float weight or activation (config {cfg})")
        if name not in self.prepared:
            codes_spec = None if x.qp is None else x.qp.spec
            self.prepared[name] = prepare_layer(
                info, ops["kernel"], stats, native=self.native, codes_spec=codes_spec
            )
        qx, pw, qy = self.prepared[name]
        if qx is not None:
            x = self.quantized(x, qx, cfg.fake_quant_compat, f"{name}:input", info.source)
        elif x.qp is None:
            raise ValueError(
                f"convert: {name} receives a float tensor but has no input quantizer; put a "
                "QuantStub before it or use a config with quantize_input=True"
            )
        bias = ops["bias"]
        bias = None if bias is None else jnp.asarray(bias, jnp.float32)
        g = info.geometry
        attrs = {
            "op": info.op,
            "name": name,
            "source": info.source,
            "relu": info.relu,
            "geometry": g,
            "in_ndim": info.in_ndim,
            "out_dims": info.out_dims,
            "scheme": self.scheme,
            "perm": info.perm,
        }
        extra = {"activation": "relu" if info.relu else None, "kernel": pw.kernel}
        op = "linear"
        if info.op == "conv":
            op = f"conv{pw.weight.ndim - 2}d"
            extra |= {k: g[k] for k in ("stride", "padding", "dilation", "groups")}
        layer = Layer(op, info.source, self.scheme, pw.weight.qparams, qy, extra)
        step = self.add(name, "layer", attrs, [x], (pw, bias, qy), layer, traced=qy is not None)
        return _Value(step, qp=qy)


def _prune(steps: list[Step], outputs) -> list[Step]:
    """The steps the outputs need, in order."""
    need = set(jax.tree_util.tree_leaves(outputs))
    keep = []
    for s in reversed(steps):
        if s.name in need:
            keep.append(s)
            need.update(s.inputs)
    return keep[::-1]


def lower(
    closed, known, in_names, out_tree, *, scheme: str, native: str, prepared=None
) -> tuple[Program, Lowering]:
    """``(program, lowering)`` for the traced ``closed`` jaxpr, whose arguments are the
    ``known`` arrays (weights, statistics) followed by the program inputs ``in_names``;
    ``prepared`` caches each layer's prepared weights across lowerings."""
    low = Lowering(scheme, native, prepared)
    args = [_Known(v) for v in known] + [_Value(n) for n in in_names]
    outs = low.run(closed.jaxpr, closed.consts, args)
    names = []
    for i, (o, var) in enumerate(zip(outs, closed.jaxpr.outvars, strict=True)):
        stem = "output" if len(outs) == 1 else f"output{i}"
        if isinstance(o, _Known):
            layer = Layer("constant", "constant")
            o = _Value(low.add(stem, "constant", {}, [], np.asarray(o.val), layer))
        elif o.qp is not None:
            o = low.dequantized(o, var.aval.dtype)
        elif o.idx is not None:
            o = _Value(low.add(stem, "identity", {}, [o], None, Layer("identity", "output")))
        names.append(o.name)
    output = jax.tree_util.tree_unflatten(out_tree, names)
    steps = [
        dataclasses.replace(s, params=tuple(k.val for k in s.params))
        if s.spec[0] == "lax" and not s.spec[1]["on_codes"]
        else s
        for s in _prune(low.steps, output)
    ]
    steps = boundary_kernels(steps, in_names)
    kept = {s.name for s in steps}
    low.float_ops = {k: v for k, v in low.float_ops.items() if k in kept}
    return Program(steps, in_names, output), low
