"""``qjax.parity.inspect``: qparams, activation code ranges and risks of an imported program.

No reference is needed: the program runs on the given inputs, and every quantized
activation is summarised (qparams, the codes it actually used, how much of the dtype
range that is) with the risks the rulebook (:mod:`qjax.parity._rules`) sees without a reference:
convert-clamped weights (rule 9), int16 saturation on FBGEMM without VNNI (rule 14), odd
zero points at quantize ties (rules 1 vs 4), oneDNN's 1-LSB epilogue (rule 13).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from .._render import Rendered
from .._spec import QParams
from ._evidence import engine_of, evidence, float_inputs
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
    """One quantized activation: qparams, used code range and risks."""

    name: str
    op: str
    target: str | None
    scheme: str | None
    weight: str | None
    out: str | None
    code_range: tuple[int, int]
    used: float
    risks: tuple[Cause, ...] = ()

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["risks"] = [c.to_dict() for c in self.risks]
        d["code_range"] = list(self.code_range)
        return d


@dataclasses.dataclass(frozen=True)
class InspectReport(Rendered):
    """Per-layer qparams, activation code ranges and risks (:func:`inspect`)."""

    layers: tuple[LayerInfo, ...]
    engine: str | None = None

    _HEADER = ("layer", "op", "scheme", "weight qparams", "output qparams", "codes used",
               "of range", "risks")  # fmt: skip

    def _title(self) -> str:
        eng = f" (engine {self.engine})" if self.engine else ""
        return f"qjax inspect{eng}: {len(self.layers)} quantized activations"

    def _rows(self) -> list[list[object]]:
        return [
            [
                la.name,
                la.op,
                la.scheme,
                la.weight,
                la.out,
                f"{la.code_range[0]}..{la.code_range[1]}",
                f"{la.used:.0%}",
                "; ".join(f"rule {c.rule} {c.name}" for c in la.risks) or None,
            ]  # fmt: skip
            for la in self.layers
        ]

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

    For every traced activation: op, scheme, weight and output qparams, the codes
    ``min..max`` it used on ``inputs`` and the share of its dtype range
    ``(max - min + 1) / (qmax - qmin + 1)``, and the rulebook's risks (no reference).

    Args:
      program: an imported :class:`~qjax.program.Program`.
      inputs: one input or a tuple of inputs.
      engine: the torch engine it was imported for (``program.engine`` if unset).

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
    args = tuple(inputs) if isinstance(inputs, (tuple, list)) else (inputs,)
    trace = program.trace(*args)
    engine = engine_of(program, engine)
    floats = float_inputs(program, args)
    layers = []
    for name, q in trace.items():
        codes = np.asarray(q.values)
        ev = evidence(program, name, codes, None, trace, floats, engine, "none")
        layer = program.layers.get(name)
        lo, hi = (int(codes.min()), int(codes.max())) if codes.size else (0, 0)
        spec = q.spec
        layers.append(
            LayerInfo(
                name=name,
                op=ev.kind,
                target=getattr(layer, "target", None),
                scheme=getattr(layer, "scheme", None),
                weight=_qp_text(ev.weight.qparams if ev.weight is not None else None),
                out=_qp_text(q.qparams),
                code_range=(lo, hi),
                used=(hi - lo + 1) / (spec.qmax - spec.qmin + 1) if codes.size else 0.0,
                risks=tuple(diagnose(ev)),
            )
        )
    return InspectReport(tuple(layers), engine)
