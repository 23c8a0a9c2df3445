"""Steps as their jaxprs, written as ONNX nodes: the exporter's path for the steps of a
program traced from a Flax model (:mod:`qjax.converters.onnx`).

A ``float`` step runs one jax primitive on dequantized values, and a layout step (a
``reshape``, ``transpose``, max pool, ... on codes) runs one on the integer codes. Each
is traced once (``jax.make_jaxpr`` of the step at the example's shapes) and its
equations are written as the ONNX ops of the table below, on the same tensors in the
same layout (a channels-last program stays channels-last; only ops that ONNX defines
channels-first, convolution and pooling, get ``Transpose`` nodes around them). Equations
on constants only are evaluated now (initializers). Any other primitive raises
``NotImplementedError`` naming it.

=========================================  ==============================================
jax primitive                              ONNX
=========================================  ==============================================
``add sub mul div max min pow``            ``Add Sub Mul Div Max Min Pow``
``neg exp log tanh logistic sqrt abs       ``Neg Exp Log Tanh Sigmoid Sqrt Abs Sign Floor
sign floor ceil sin cos tan erf not``      Ceil Sin Cos Tan Erf Not``
``rsqrt``, ``square``, ``integer_pow``     ``Div(1, Sqrt)``, ``Mul``, the ``Mul`` chain
                                           jax computes (then ``Div(1, ·)`` if negative)
``round`` (half to even), ``exp2``         ``Round``, ``Pow(2, x)``
``eq ne gt ge lt le and or``               ``Equal Not(Equal) Greater GreaterOrEqual Less
                                           LessOrEqual And Or``
``select_n`` (2 cases), ``clamp``          ``Where``, ``Min(Max(x, lo), hi)``
``convert_element_type``, ``copy``,        ``Cast``, ``Identity``
``stop_gradient``
``reduce_sum/max/min/prod``, ``argmax``    ``ReduceSum/Max/Min/Prod``, ``ArgMax`` + ``Cast``
``reshape transpose squeeze                ``Reshape Transpose Squeeze Reshape+Expand
broadcast_in_dim concatenate slice rev     Concat Slice Slice(step -1) Pad Split``
pad split``
``dot_general``                            ``Einsum`` (float)
``conv_general_dilated``                   ``Transpose``, ``Conv``, ``Transpose``
``reduce_window_max``, ``reduce_window_    ``Transpose``, ``MaxPool`` / ``Conv`` with a
sum``                                      ones kernel (the window sum), ``Transpose``
=========================================  ==============================================

Float results are the same float32 operations, but not always bit for bit XLA's:
summation order (reductions, dot products, window sums) and transcendental functions
(``exp``, ``tanh``, ...) may differ in the last ulp, so a quantizer after a float step
can differ by one code where its input lies within rounding error of a half.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
from jax.extend import core as jcore
from onnx import helper

__all__ = ["translate"]

_BINARY = {
    "add": "Add",
    "sub": "Sub",
    "mul": "Mul",
    "div": "Div",
    "max": "Max",
    "min": "Min",
    "pow": "Pow",
    "eq": "Equal",
    "gt": "Greater",
    "ge": "GreaterOrEqual",
    "lt": "Less",
    "le": "LessOrEqual",
    "and": "And",
    "or": "Or",
}
_UNARY = {
    "neg": "Neg",
    "exp": "Exp",
    "log": "Log",
    "tanh": "Tanh",
    "logistic": "Sigmoid",
    "sqrt": "Sqrt",
    "abs": "Abs",
    "sign": "Sign",
    "floor": "Floor",
    "ceil": "Ceil",
    "sin": "Sin",
    "cos": "Cos",
    "tan": "Tan",
    "erf": "Erf",
    "not": "Not",
    "copy": "Identity",
    "copy_p": "Identity",
    "stop_gradient": "Identity",
}
_REDUCE = {
    "reduce_sum": "ReduceSum",
    "reduce_max": "ReduceMax",
    "reduce_min": "ReduceMin",
    "reduce_prod": "ReduceProd",
}
_CALLS = {"pjit": "jaxpr", "jit": "jaxpr", "closed_call": "call_jaxpr"}


def _np(a) -> np.ndarray:
    return np.asarray(a)


class _Writer:
    """One step's equations as nodes of the builder ``b`` (``env``: jaxpr variable ->
    ONNX tensor name, or a numpy array for values known now)."""

    def __init__(self, b, stem: str):
        self.b = b
        self.stem = stem

    # -- tensors -----------------------------------------------------------------------

    def tensor(self, v) -> str:
        """An ONNX tensor name for ``v`` (a name, or a constant made an initializer)."""
        if isinstance(v, str):
            return v
        return self.b.const(self.b.fresh(f"{self.stem}/const"), _np(v))

    def node(self, op: str, inputs, n_out: int = 1, **attrs) -> list[str]:
        outs = [self.b.fresh(f"{self.stem}/{op}") for _ in range(n_out)]
        return self.b.node(op, [self.tensor(i) for i in inputs], outs, outs[0], **attrs)

    def one(self, op: str, inputs, **attrs) -> str:
        return self.node(op, inputs, **attrs)[0]

    def ints(self, values) -> str:
        return self.tensor(np.asarray(list(values), np.int64))

    # -- jaxprs ------------------------------------------------------------------------

    def run(self, jaxpr, consts, args) -> list:
        env: dict = {}

        def read(v):
            if isinstance(v, jcore.Literal):
                return np.asarray(v.val, dtype=v.aval.dtype)
            return env[v]

        for v, c in zip(jaxpr.constvars, consts, strict=True):
            env[v] = _np(c)
        for v, a in zip(jaxpr.invars, args, strict=True):
            env[v] = a
        for eqn in jaxpr.eqns:
            ins = [read(v) for v in eqn.invars]
            outs = self.equation(eqn, ins)
            for v, o in zip(eqn.outvars, outs, strict=True):
                env[v] = o
        return [read(v) for v in jaxpr.outvars]

    def equation(self, eqn, ins) -> list:
        prim, p = eqn.primitive.name, eqn.params
        if prim in _CALLS and _CALLS[prim] in p:
            body = p[_CALLS[prim]]
            if isinstance(body, jcore.ClosedJaxpr):
                return self.run(body.jaxpr, body.consts, ins)
            return self.run(body, [], ins)
        if all(not isinstance(v, str) for v in ins):  # known now: a constant
            subfuns, bind_params = eqn.primitive.get_bind_params(p)
            out = eqn.primitive.bind(*subfuns, *ins, **bind_params)
            out = out if eqn.primitive.multiple_results else [out]
            return [_np(o) for o in out]
        out_avals = [v.aval for v in eqn.outvars]
        fn = getattr(self, f"_p_{prim}", None)
        if prim in _BINARY:
            return [self.one(_BINARY[prim], ins)]
        if prim == "ne":
            return [self.one("Not", [self.one("Equal", ins)])]
        if prim in _UNARY:
            return [self.one(_UNARY[prim], ins)]
        if prim in _REDUCE:
            return [self.reduce(_REDUCE[prim], ins[0], p["axes"])]
        if fn is None:
            raise NotImplementedError(f"jax primitive {prim!r} has no ONNX export")
        out = fn(ins, p, eqn.invars, out_avals)
        return out if isinstance(out, list) else [out]

    # -- primitives --------------------------------------------------------------------

    def reduce(self, op: str, x, axes) -> str:
        axes = [int(a) for a in axes]
        if not axes:
            return self.one("Identity", [x])
        if op == "ReduceSum" or self.b.opset >= 18:
            return self.one(op, [x, self.ints(axes)], keepdims=0)
        return self.one(op, [x], axes=axes, keepdims=0)

    def _p_rsqrt(self, ins, p, invars, out):
        one = np.ones((), out[0].dtype)
        return self.one("Div", [one, self.one("Sqrt", ins)])

    def _p_square(self, ins, p, invars, out):
        return self.one("Mul", [ins[0], ins[0]])

    def _p_integer_pow(self, ins, p, invars, out):
        # jax's lowering: binary exponentiation with the same products, then 1/acc
        x, y = ins[0], int(p["y"])
        if y == 0:
            return np.ones(out[0].shape, out[0].dtype)
        acc, n = None, abs(y)
        while n > 0:
            if n & 1:
                acc = x if acc is None else self.one("Mul", [acc, x])
            n >>= 1
            if n:
                x = self.one("Mul", [x, x])
        return self.one("Div", [np.ones((), out[0].dtype), acc]) if y < 0 else acc

    def _p_exp2(self, ins, p, invars, out):
        return self.one("Pow", [np.asarray(2, out[0].dtype), ins[0]])

    def _p_round(self, ins, p, invars, out):
        if int(p.get("rounding_method", 0)) != 1:
            raise NotImplementedError(
                "jax primitive 'round' rounding half away from zero (ONNX Round rounds half "
                "to even; jnp.round is the half-to-even one)"
            )
        return self.one("Round", ins)

    def _p_clamp(self, ins, p, invars, out):
        lo, x, hi = ins
        return self.one("Min", [self.one("Max", [x, lo]), hi])

    def _p_select_n(self, ins, p, invars, out):
        pred, cases = ins[0], ins[1:]
        if len(cases) != 2:
            raise NotImplementedError(f"select_n with {len(cases)} cases (2 only)")
        if invars[0].aval.dtype != np.bool_:
            pred = self.one("Cast", [pred], to=helper.np_dtype_to_tensor_dtype(np.dtype(bool)))
        return self.one("Where", [pred, cases[1], cases[0]])

    def _p_convert_element_type(self, ins, p, invars, out):
        dt = np.dtype(p["new_dtype"])
        if dt == np.dtype(invars[0].aval.dtype):
            return self.one("Identity", ins)
        return self.one("Cast", ins, to=helper.np_dtype_to_tensor_dtype(dt))

    def _p_argmax(self, ins, p, invars, out):
        return self._arg("ArgMax", ins, p, out)

    def _p_argmin(self, ins, p, invars, out):
        return self._arg("ArgMin", ins, p, out)

    def _arg(self, op, ins, p, out):
        (axis,) = p["axes"]
        y = self.one(op, ins, axis=int(axis), keepdims=0)
        return self.one("Cast", [y], to=helper.np_dtype_to_tensor_dtype(np.dtype(out[0].dtype)))

    def _p_reshape(self, ins, p, invars, out):
        if p.get("dimensions") is not None:
            raise NotImplementedError("reshape with dimensions (a transpose first)")
        return self.one("Reshape", [ins[0], self.ints(out[0].shape)])

    def _p_transpose(self, ins, p, invars, out):
        return self.one("Transpose", ins, perm=[int(a) for a in p["permutation"]])

    def _p_squeeze(self, ins, p, invars, out):
        return self.one("Squeeze", [ins[0], self.ints(p["dimensions"])])

    def _p_broadcast_in_dim(self, ins, p, invars, out):
        shape = tuple(int(d) for d in p["shape"])
        src = tuple(invars[0].aval.shape)
        dims = [int(d) for d in p["broadcast_dimensions"]]
        mid = [1] * len(shape)
        for i, d in enumerate(dims):
            mid[d] = src[i]
        x = ins[0]
        if tuple(mid) != src:
            x = self.one("Reshape", [x, self.ints(mid)])
        if tuple(mid) == shape:
            return x if x != ins[0] else self.one("Identity", [x])
        return self.one("Expand", [x, self.ints(shape)])

    def _p_concatenate(self, ins, p, invars, out):
        return self.one("Concat", ins, axis=int(p["dimension"]))

    def _p_slice(self, ins, p, invars, out):
        start = [int(v) for v in p["start_indices"]]
        stop = [int(v) for v in p["limit_indices"]]
        step = [int(v) for v in (p.get("strides") or (1,) * len(start))]
        axes = list(range(len(start)))
        args = [ins[0], self.ints(start), self.ints(stop), self.ints(axes), self.ints(step)]
        return self.one("Slice", args)

    def _p_rev(self, ins, p, invars, out):
        dims = [int(d) for d in p["dimensions"]]
        big = np.iinfo(np.int64).min
        args = [ins[0], self.ints([-1] * len(dims)), self.ints([big] * len(dims)),
                self.ints(dims), self.ints([-1] * len(dims))]  # fmt: skip
        return self.one("Slice", args)

    def _p_pad(self, ins, p, invars, out):
        cfg = [tuple(int(v) for v in c) for c in p["padding_config"]]
        if any(lo < 0 or hi < 0 or mid != 0 for lo, hi, mid in cfg):
            raise NotImplementedError(f"pad with negative or interior padding {cfg}")
        pads = [c[0] for c in cfg] + [c[1] for c in cfg]
        return self.one("Pad", [ins[0], self.ints(pads), ins[1]], mode="constant")

    def _p_split(self, ins, p, invars, out):
        sizes = [int(s) for s in p["sizes"]]
        return self.node("Split", [ins[0], self.ints(sizes)], len(sizes), axis=int(p["axis"]))

    def _p_dot_general(self, ins, p, invars, out):
        (lc, rc), (lb, rb) = p["dimension_numbers"]
        lhs, rhs = invars[0].aval, invars[1].aval
        if not all(np.issubdtype(a.dtype, np.floating) for a in (lhs, rhs, out[0])):
            raise NotImplementedError("dot_general on integers (float only)")
        letters = iter("abcdefghijklmnopqrstuvwxyz")
        ls = [next(letters) for _ in range(lhs.ndim)]
        rs = [None] * rhs.ndim
        for a, b in zip(lc, rc, strict=True):
            rs[b] = ls[a]
        for a, b in zip(lb, rb, strict=True):
            rs[b] = ls[a]
        rs = [r if r is not None else next(letters) for r in rs]
        free_l = [ls[i] for i in range(lhs.ndim) if i not in lc and i not in lb]
        free_r = [rs[i] for i in range(rhs.ndim) if i not in rc and i not in rb]
        res = [ls[i] for i in lb] + free_l + free_r
        eq = f"{''.join(ls)},{''.join(rs)}->{''.join(res)}"
        x, w = ins
        for i, a in ((0, lhs), (1, rhs)):
            if np.dtype(a.dtype) != np.dtype(out[0].dtype):
                t = helper.np_dtype_to_tensor_dtype(np.dtype(out[0].dtype))
                if i == 0:
                    x = self.one("Cast", [x], to=t)
                else:
                    w = self.one("Cast", [w], to=t)
        return self.one("Einsum", [x, w], equation=eq)

    def _p_conv_general_dilated(self, ins, p, invars, out):
        dn = p["dimension_numbers"]
        lhs_spec, rhs_spec, out_spec = (tuple(int(a) for a in s) for s in dn)
        n = len(lhs_spec) - 2
        if any(int(v) != 1 for v in (p.get("lhs_dilation") or (1,) * n)):
            raise NotImplementedError("conv_general_dilated with lhs_dilation (transposed conv)")
        if int(p.get("batch_group_count", 1)) != 1:
            raise NotImplementedError("conv_general_dilated with batch_group_count > 1")
        if not np.issubdtype(out[0].dtype, np.floating):
            raise NotImplementedError("conv_general_dilated on integers (float only)")
        x = self.permute(ins[0], lhs_spec)
        w = ins[1]
        if isinstance(w, str):
            w = self.permute(w, rhs_spec)
        else:
            w = np.ascontiguousarray(np.transpose(_np(w), rhs_spec))
        kernel = [int(invars[1].aval.shape[d]) for d in rhs_spec[2:]]
        pads = [tuple(int(v) for v in q) for q in p["padding"]]
        if any(lo < 0 or hi < 0 for lo, hi in pads):
            raise NotImplementedError(f"conv_general_dilated with negative padding {pads}")
        y = self.one(
            "Conv", [x, w], kernel_shape=kernel,
            strides=[int(s) for s in p["window_strides"]],
            pads=[q[0] for q in pads] + [q[1] for q in pads],
            dilations=[int(d) for d in (p.get("rhs_dilation") or (1,) * n)],
            group=int(p.get("feature_group_count", 1)),
        )  # fmt: skip
        return self.unpermute(y, out_spec)

    def _p_reduce_window_max(self, ins, p, invars, out):
        return self.window("MaxPool", ins[0], p, invars[0].aval)

    def _p_reduce_window_sum(self, ins, p, invars, out):
        return self.window("sum", ins[0], p, invars[0].aval)

    def window(self, op: str, x, p, aval) -> str:
        """A reduce-window over some axes as an ONNX pool over the spatial axes of a
        ``(batch, channel, *window axes)`` transpose of ``x``."""
        dims = [int(d) for d in p["window_dimensions"]]
        strides = [int(s) for s in p["window_strides"]]
        pads = [tuple(int(v) for v in q) for q in p["padding"]]
        if any(int(d) != 1 for d in p.get("base_dilation") or ()):
            raise NotImplementedError("reduce_window with base dilation")
        wdil = [int(d) for d in p.get("window_dilation") or (1,) * len(dims)]
        moving = [
            i
            for i in range(len(dims))
            if (dims[i], strides[i], pads[i], wdil[i]) != (1, 1, (0, 0), 1)
        ]
        fixed = [i for i in range(len(dims)) if i not in moving]
        if len(fixed) != 2 or not moving:
            raise NotImplementedError(
                f"reduce_window over axes {moving} of a rank-{len(dims)} value (an ONNX pool "
                "needs exactly one batch and one channel axis left)"
            )
        spec = tuple(fixed + moving)
        y = self.permute(x, spec)
        kernel = [dims[i] for i in moving]
        attrs = dict(kernel_shape=kernel, strides=[strides[i] for i in moving],
                     pads=[pads[i][0] for i in moving] + [pads[i][1] for i in moving])  # fmt: skip
        if op == "MaxPool":
            y = self.one("MaxPool", [y], dilations=[wdil[i] for i in moving], **attrs)
        else:  # the window sum: a depthwise conv with a ones kernel (zero padding)
            if not np.issubdtype(aval.dtype, np.floating):
                raise NotImplementedError("reduce_window_sum on integers (float only)")
            c = int(aval.shape[fixed[1]])
            ones = np.ones((c, 1, *kernel), aval.dtype)
            y = self.one("Conv", [y, ones], group=c, dilations=[wdil[i] for i in moving], **attrs)
        return self.unpermute(y, spec)

    def permute(self, x: str, spec) -> str:
        """``x`` transposed so that axis ``i`` of the result is axis ``spec[i]`` of ``x``."""
        spec = [int(a) for a in spec]
        if spec == sorted(spec):
            return x
        return self.one("Transpose", [x], perm=spec)

    def unpermute(self, y: str, spec) -> str:
        """The inverse of :meth:`permute`: axis ``spec[i]`` of the result is axis ``i``."""
        spec = [int(a) for a in spec]
        if spec == sorted(spec):
            return y
        return self.one("Transpose", [y], perm=[int(i) for i in np.argsort(spec)])


def translate(b, stem: str, closed, args: list) -> list:
    """The outputs of jaxpr ``closed`` written as nodes of builder ``b`` (node names under
    ``stem``): one ONNX tensor name (or, for values known now, a numpy array) per
    output; ``args`` likewise per input."""
    return _Writer(b, stem).run(closed.jaxpr, closed.consts, list(args))


def leaves_of(value: Any) -> list:
    """The flattened leaves of a (possibly abstract) program value, jax's order."""
    return jax.tree_util.tree_leaves(value)
