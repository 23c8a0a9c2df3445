"""``qjax.parity.inspect``: qparams, activation code ranges and risks of a program.

No reference is needed: the program runs on the given inputs, and every quantized
activation is summarised (qparams, the codes it actually used, how much of the dtype
range that is, the int32 kernel of a linear/conv layer) with the risks the rulebook
(:mod:`qjax.parity._rules`) sees without a reference: convert-clamped weights (rule 9),
int16 saturation on FBGEMM without VNNI (rule 14), odd zero points at quantize ties
(rules 1 vs 4), oneDNN's 1-LSB epilogue (rule 13). Works on imported programs and on
programs traced from Flax models (:func:`qjax.convert`), whose steps left in float
(``program.float_ops``) are listed too, in step order, as op ``"float"`` with the jax
primitive as target and no codes.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from .._render import Rendered
from .._spec import QParams
from ._evidence import check_program, engine_of, evidence, float_inputs
from ._rules import Cause, diagnose

__all__ = ["InspectReport", "LayerInfo", "inspect"]


def _qp_text(qp: QParams | None) -> str | None:
    if qp is None:
        return None
    s = np.asarray(qp.scale, np.float64).reshape(-1)
    z = np.asarray(qp.zero_point, np.int64).reshape(-1)
    spec = qp.spec
    rng = f"[{spec.qmin},{spec.qmax}]"
    if s.size == 1:
        return f"s={s[0]:.6g} zp={int(z[0])} {rng}"
    zs = f"zp={int(z[0])}" if np.all(z == z[0]) else f"zp {int(z.min())}..{int(z.max())}"
    return f"{s.size} ch s {s.min():.3g}..{s.max():.3g} {zs} {rng}"


@dataclasses.dataclass(frozen=True)
class LayerInfo:
    """One quantized activation (qparams, used code range, risks) or one step without
    codes out.

    ``kernel``: the int32 dot/conv kernel of a linear/conv layer (``program.kernels``:
    ``"xla"`` or ``"amx"``), else ``None``. A float step (``op == "float"``, ``target``
    the jax primitive it runs on dequantized values) and a linear/conv layer with a float
    output (no output quantizer: ``f32(acc)·f32(s_x·s_w) + b``) have no output qparams
    and no codes: ``out``, ``code_range`` and ``used`` are ``None``.
    """

    name: str
    op: str
    target: str | None
    scheme: str | None
    weight: str | None
    out: str | None
    code_range: tuple[int, int] | None
    used: float | None
    risks: tuple[Cause, ...] = ()
    kernel: str | None = None

    @property
    def is_float(self) -> bool:
        return self.op == "float"

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["risks"] = [c.to_dict() for c in self.risks]
        d["code_range"] = None if self.code_range is None else list(self.code_range)
        return d


@dataclasses.dataclass(frozen=True)
class InspectReport(Rendered):
    """Per-layer qparams, activation code ranges and risks (:func:`inspect`)."""

    layers: tuple[LayerInfo, ...]
    engine: str | None = None

    _HEADER = ("layer", "op", "scheme", "kernel", "weight qparams", "output qparams",
               "codes used", "of range", "risks")  # fmt: skip

    def __getitem__(self, name: str) -> LayerInfo:
        for la in self.layers:
            if la.name == name:
                return la
        raise KeyError(
            f"no layer {name!r} in the report; layers: {[la.name for la in self.layers]}"
        )

    @property
    def activations(self) -> tuple[LayerInfo, ...]:
        """The quantized activations (the rows with codes)."""
        return tuple(la for la in self.layers if la.code_range is not None)

    def _title(self) -> str:
        eng = f" (engine {self.engine})" if self.engine else ""
        n_float = sum(la.is_float for la in self.layers)
        n_other = len(self.layers) - len(self.activations) - n_float
        floats = f", {n_float} float steps" if n_float else ""
        floats += f", {n_other} layers with float outputs" if n_other else ""
        return f"qjax inspect{eng}: {len(self.activations)} quantized activations{floats}"

    def _rows(self) -> list[list[object]]:
        rows = []
        for la in self.layers:
            if la.code_range is None:
                codes = used = None
                op = f"float: {la.target}" if la.is_float else f"{la.op} (float out)"
            else:
                codes = f"{la.code_range[0]}..{la.code_range[1]}"
                used, op = f"{la.used:.0%}", la.op
            risks = "; ".join(f"rule {c.rule} {c.name}" for c in la.risks) or None
            rows.append([la.name, op, la.scheme, la.kernel, la.weight, la.out, codes, used,
                         risks])  # fmt: skip
        return rows

    def _explanations(self) -> list[str]:
        return [
            f"{la.name}: rule {c.rule} risk: {c.message}. Fix: {c.fix}."
            for la in self.layers
            for c in la.risks
        ]

    def to_dict(self) -> dict:
        return {"engine": self.engine, "layers": [la.to_dict() for la in self.layers]}


def inspect(program, inputs, *, engine: str | None = None) -> InspectReport:
    """Qparams, activation code ranges and risks of ``program`` run on ``inputs``.

    For every traced activation: op, scheme, kernel, weight and output qparams, the codes
    ``min..max`` it used on ``inputs`` and the share of its dtype range
    ``(max - min + 1) / (qmax - qmin + 1)``, and the rulebook's risks (no reference).
    A program traced from a Flax model (:func:`qjax.convert`) also gets a row per float
    step (``program.float_ops``), in step order: op ``"float"``, target the jax
    primitive, no codes; and a row per linear/conv layer with a float output (no output
    quantizer), with its weight qparams and kernel but no codes.

    Args:
      program: a :class:`~qjax.program.Program`: imported
        (``qjax.converters.torch.import_model``, ...) or traced (``qjax.convert``).
      inputs: one input or a tuple of inputs.
      engine: the torch engine it was imported for (``program.engine`` if unset;
        ``None`` for a Flax program).

    >>> import jax.numpy as jnp
    >>> from qjax import QuantSpec
    >>> from qjax.program import Layer, Program, Step
    >>> from qjax.kernels import quantize_input
    >>> qp = QParams(0.5, 3, QuantSpec(signed=False))
    >>> p = Program([Step("q", lambda _, x: quantize_input(x, qp), ("x",),
    ...                   layer=Layer("quantize", "Quantize", out=qp))], ("x",), "q")
    >>> r = inspect(p, jnp.array([0.0, 1.0]))
    >>> r.layers[0].code_range, [c.name for c in r.layers[0].risks]
    ((3, 5), ['zero_point_tie'])
    """
    check_program(program, "inspect")
    args = tuple(inputs) if isinstance(inputs, (tuple, list)) else (inputs,)
    trace = program.trace(*args)
    engine = engine_of(program, engine)
    floats = float_inputs(program, args)
    kernels = getattr(program, "kernels", None) or {}
    float_ops = getattr(program, "float_ops", None) or {}
    rows = {}
    for name, q in trace.items():
        codes = np.asarray(q.values)
        ev = evidence(program, name, codes, None, trace, floats, engine, "none")
        layer = program.layers.get(name)
        lo, hi = (int(codes.min()), int(codes.max())) if codes.size else (0, 0)
        spec = q.spec
        rows[name] = LayerInfo(
            name=name,
            op=ev.kind,
            target=getattr(layer, "target", None),
            scheme=getattr(layer, "scheme", None),
            weight=_qp_text(ev.weight.qparams if ev.weight is not None else None),
            out=_qp_text(q.qparams),
            code_range=(lo, hi),
            used=(hi - lo + 1) / (spec.qmax - spec.qmin + 1) if codes.size else 0.0,
            risks=tuple(diagnose(ev)),
            kernel=kernels.get(name),
        )
    for step in program.steps:  # steps without codes out: float steps, float layers
        layer = step.layer
        op = getattr(layer, "op", None)
        is_float = step.name in float_ops or op == "float"
        if step.name in rows or not (is_float or (op or "").startswith(("linear", "conv"))):
            continue
        ev = evidence(program, step.name, None, None, trace, floats, engine, "none")
        rows[step.name] = LayerInfo(
            name=step.name,
            op="float" if is_float else op,
            target=float_ops.get(step.name, layer.target) if is_float else layer.target,
            scheme=None if is_float else layer.scheme,
            weight=_qp_text(ev.weight.qparams if ev.weight is not None else None),
            out=None,
            code_range=None,
            used=None,
            risks=() if is_float else tuple(diagnose(ev)),
            kernel=kernels.get(step.name),
        )
    order = [s.name for s in program.steps if s.name in rows]
    order += [n for n in rows if n not in order]  # trace names that are not step names
    return InspectReport(tuple(rows[n] for n in order), engine)
