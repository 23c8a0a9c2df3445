"""Layer-by-layer parity between a qjax program and a reference, with causes.

:func:`compare` runs the torch model (through ``qjax.converters.torch.torch_trace``) and
the qjax :class:`~qjax.program.Program` on the same inputs and, for every
quantized activation both produce, counts integer mismatches:

* ``max_lsb = max |q_qjax - q_ref|`` (codes, so 1 = one quantization step),
* ``mismatches = #{q_qjax != q_ref}`` and ``rate = mismatches / values``,
* the first mismatch (row-major index, both codes),
* likely causes from the rulebook (:mod:`qjax.parity._rules`, NUMERICS.md rule numbers).

:func:`compare_traces` does the same for any two ``{layer name: codes}`` mappings (a
hand simulation, a QAT model's fake-quant codes), and :func:`inspect` lists qparams,
activation code ranges and risks of a program without a reference. Reports render as a
rich table (plain text without ``rich``), markdown or JSON. torch is imported only when
:func:`compare` needs it.

Programs traced from Flax models (:func:`qjax.convert`) work the same way, against a
``reference={name: codes}`` (their own trace at another scheme or batch, a QAT model's
codes, a hand simulation): their trace names are module paths (``"c1"``,
``"fc:input"``), they have no torch engine (``engine=None``; the torch-only rules skip
them, :mod:`qjax.parity._rules`), and a layer fed through float steps (a mean, a
LayerNorm) is traced back through them to the quantized activations it depends on
when deciding whether it only carries an input's mismatches on.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from .._qarray import QArray
from .._render import Rendered
from ._evidence import (
    Cause,
    LayerEvidence,
    ReferenceKind,
    check_program,
    codes_of,
    engine_of,
    evidence,
    float_inputs,
)
from ._inspect import InspectReport, LayerInfo, inspect
from ._rules import diagnose

__all__ = [
    "Cause",
    "InspectReport",
    "LayerInfo",
    "LayerParity",
    "ParityReport",
    "compare",
    "compare_traces",
    "inspect",
]


@dataclasses.dataclass(frozen=True)
class LayerParity:
    """Parity of one layer: counts, the first mismatch and the likely causes.

    ``first`` is ``None`` or ``{"index": [...], "reference": int, "qjax": int}``;
    ``ref_range`` / ``qjax_range`` are the ``(min, max)`` codes on each side;
    ``propagated_from`` names the input layer whose mismatches this layer only carries
    on (set when no rule applies and that input already differs; the nearest traced
    activation upstream, through untraced steps such as float or layout steps).
    """

    name: str
    op: str
    shape: tuple[int, ...]
    values: int
    mismatches: int
    max_lsb: int
    first: dict | None
    ref_range: tuple[int, int]
    qjax_range: tuple[int, int]
    causes: tuple[Cause, ...] = ()
    scheme: str | None = None
    propagated_from: str | None = None

    @property
    def rate(self) -> float:
        return self.mismatches / self.values if self.values else 0.0

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["causes"] = [c.to_dict() for c in self.causes]
        d["rate"] = self.rate
        d["shape"], d["ref_range"], d["qjax_range"] = (
            list(self.shape),
            list(self.ref_range),
            list(self.qjax_range),
        )
        return d


@dataclasses.dataclass(frozen=True)
class ParityReport(Rendered):
    """Per-layer parity of a program against a reference (:func:`compare`).

    ``layers`` in graph order; ``notes`` lists layers present on one side only or with
    different shapes. ``ok`` is true when integers were compared and none differs (a
    report that compared nothing does not pass).
    """

    layers: tuple[LayerParity, ...]
    engine: str | None = None
    reference_kind: str = "torch"
    notes: tuple[str, ...] = ()

    @property
    def values(self) -> int:
        return sum(la.values for la in self.layers)

    @property
    def mismatches(self) -> int:
        return sum(la.mismatches for la in self.layers)

    @property
    def ok(self) -> bool:
        return self.values > 0 and self.mismatches == 0

    def __getitem__(self, name: str) -> LayerParity:
        for la in self.layers:
            if la.name == name:
                return la
        raise KeyError(
            f"no layer {name!r} in the report; layers: {[la.name for la in self.layers]}"
        )

    # ---- rendering --------------------------------------------------------------------

    def _title(self) -> str:
        eng = f", engine {self.engine}" if self.engine else ""
        return (
            f"qjax parity vs {self.reference_kind}{eng}: {self.mismatches} of {self.values} "
            "integers differ"
        )

    _HEADER = ("layer", "op", "values", "mismatches", "rate", "max LSB", "first mismatch",
               "likely cause")  # fmt: skip

    def _rows(self) -> list[list[object]]:
        rows = []
        for la in self.layers:
            first = None
            if la.first is not None:
                idx = ",".join(map(str, la.first["index"]))
                first = f"[{idx}] ref {la.first['reference']} / qjax {la.first['qjax']}"
            cause = "; ".join(f"rule {c.rule} {c.name} ({c.strength})" for c in la.causes)
            if not cause and la.propagated_from:
                cause = f"input {la.propagated_from!r} already differs"
            op = f"{la.op}/{la.scheme}" if la.scheme else la.op
            rows.append([la.name, op, la.values, la.mismatches, f"{la.rate:.3g}", la.max_lsb,
                         first, cause or None])  # fmt: skip
        return rows

    def _explanations(self) -> list[str]:
        out = []
        for la in self.layers:
            for c in la.causes:
                out.append(f"{la.name}: rule {c.rule} ({c.strength}): {c.message}. Fix: {c.fix}.")
        return out + [f"note: {n}" for n in self.notes]

    def to_dict(self) -> dict:
        return {
            "engine": self.engine,
            "reference_kind": self.reference_kind,
            "values": self.values,
            "mismatches": self.mismatches,
            "ok": self.ok,
            "layers": [la.to_dict() for la in self.layers],
            "notes": list(self.notes),
        }


def _layer_parity(ev: LayerEvidence, scheme) -> LayerParity:
    mask, diff = ev.mismatch()
    n = int(mask.sum())
    first = None
    if n:
        idx = tuple(int(i) for i in np.argwhere(mask)[0])
        first = {
            "index": list(idx),
            "reference": int(ev.ref_codes[idx]),
            "qjax": int(ev.codes[idx]),
        }

    def rng(a):
        a = np.asarray(a)
        return (int(a.min()), int(a.max())) if a.size else (0, 0)

    return LayerParity(
        name=ev.name,
        op=ev.kind,
        shape=tuple(int(d) for d in np.shape(ev.codes)),
        values=int(mask.size),
        mismatches=n,
        max_lsb=int(np.abs(diff).max(initial=0)),
        first=first,
        ref_range=rng(ev.ref_codes),
        qjax_range=rng(ev.codes),
        causes=tuple(diagnose(ev)),
        scheme=scheme,
    )


def compare_traces(
    reference: Mapping[str, Any],
    trace: Mapping[str, QArray],
    *,
    program=None,
    inputs: Sequence[Any] = (),
    engine: str | None = None,
    reference_kind: ReferenceKind = "torch",
    reference_engine: str | None = None,
    reference_level: str | None = None,
) -> ParityReport:
    """Compare qjax's ``trace`` (``{name: QArray}``) with ``reference`` codes, per layer.

    Layers are compared in ``trace`` order wherever both sides have the name; others
    become notes. ``program`` (the :class:`Program` that made ``trace``) and ``inputs``
    give the rulebook the weights, layer inputs and float inputs it looks at.
    ``reference`` values may be QArrays, torch quantized tensors or integer arrays.

    Args:
      reference: ``{layer name: codes}`` from torch, a QAT model or a hand simulation.
      trace: ``program.trace(*inputs)``.
      program, inputs: optional, for causes (an imported program, or one traced from a
        Flax model by :func:`qjax.convert`).
      engine: the torch engine the program was imported for (``program.engine`` if unset;
        ``None`` for a Flax program, which then gets no engine rule).
      reference_kind: ``"torch"``, ``"fake_quant"`` or ``"hand"`` (which rules apply).
      reference_engine: the torch engine that produced ``reference`` (when known, an
        import for another engine is named as the cause).
      reference_level: the CPU level torch ran at (when known, a program emulating
        another level is named as the cause, ``level_mismatch``).

    Returns:
      a :class:`ParityReport`.

    >>> from qjax import QuantSpec, QParams
    >>> qp = QParams(0.1, 0, QuantSpec(signed=False))
    >>> mine = {"fc1": QArray(np.array([1, 2, 3], np.uint8), qp)}
    >>> r = compare_traces({"fc1": np.array([1, 2, 5], np.uint8)}, mine)
    >>> r.mismatches, r["fc1"].max_lsb, r["fc1"].first
    (1, 2, {'index': [2], 'reference': 5, 'qjax': 3})
    """
    if not isinstance(reference, Mapping) or not isinstance(trace, Mapping):
        raise TypeError("reference and trace must be mappings {layer name: codes}")
    engine = engine_of(program, engine)
    floats = float_inputs(program, inputs) if program is not None else {}
    layers, notes = [], []
    for name, q in trace.items():
        if name not in reference:
            notes.append(f"layer {name!r} has no reference codes")
            continue
        codes = codes_of(q, f"qjax layer {name!r}")
        ref = codes_of(reference[name], f"reference layer {name!r}")
        if codes.shape != ref.shape:
            notes.append(f"layer {name!r}: qjax shape {codes.shape} != reference {ref.shape}")
            continue
        bad = {p.name for p in layers if p.mismatches}
        src = next((n for n in _sources(program, name, trace) if n in bad), None)
        src_bad = src is not None
        ev = evidence(
            program,
            name,
            codes,
            ref,
            trace,
            floats,
            engine,
            reference_kind,
            reference_engine=reference_engine,
            input_differs=src_bad,
            reference_level=reference_level,
        )
        layer = program.layers.get(name) if program is not None else None
        la = _layer_parity(ev, getattr(layer, "scheme", None))
        if la.mismatches and not la.causes and src_bad:
            la = dataclasses.replace(la, propagated_from=src)
        layers.append(la)
    notes += [
        f"reference layer {n!r} is not in the qjax trace" for n in reference if n not in trace
    ]
    return ParityReport(tuple(layers), engine, reference_kind, tuple(notes))


def _sources(program, name: str, trace: Mapping) -> list[str]:
    """The traced activations step ``name`` reads, directly or through steps that are
    not in the trace (float, dequantize and untraced layout steps), nearest first."""
    steps = {s.name: s for s in getattr(program, "steps", ())}
    if name not in steps:
        return []
    out, seen, todo = [], set(), list(steps[name].inputs)
    while todo:
        n = todo.pop(0)
        if n in seen or n not in steps:
            continue
        seen.add(n)
        if n in trace:
            out.append(n)
        else:
            todo.extend(steps[n].inputs)
    return out


def _as_tuple(inputs) -> tuple:
    return tuple(inputs) if isinstance(inputs, (tuple, list)) else (inputs,)


def compare(
    torch_model,
    program,
    inputs,
    *,
    reference: Mapping[str, Any] | None = None,
    reference_kind: ReferenceKind | None = None,
    engine: str | None = None,
    reference_level: str | None = None,
) -> ParityReport:
    """Per-layer integer parity of ``program`` against ``torch_model`` on ``inputs``.

    The torch side is ``qjax.converters.torch.torch_trace(torch_model, *inputs)`` (the
    quantized activations of a converted eager/FX model, under the same names as
    ``program.trace``); pass ``reference`` (``{name: codes}``) instead to compare with a
    QAT model's fake-quant codes (``reference_kind="fake_quant"``) or a hand simulation
    (``"hand"``). Counting and causes: :func:`compare_traces`; torch's engine at the
    time (``torch.backends.quantized.engine``) is the reference engine and this
    machine's CPU level (:func:`qjax.kernels.host_level`) the reference level, so a
    program imported for another engine or level gets that named as the cause
    (``engine_mismatch``, ``level_mismatch``).

    Args:
      torch_model: the converted torch model (``None`` when ``reference`` is given).
      program: the imported qjax program, or one traced from a Flax model
        (:func:`qjax.convert`; with ``reference``, since there is no torch model).
      inputs: one input or a tuple of inputs (numpy, jax or torch, float).
      reference: ``{layer name: codes}`` to compare with instead of running torch.
      reference_kind: ``"torch"``, ``"fake_quant"`` or ``"hand"`` (default: ``"torch"``
        when torch runs, else ``"hand"``).
      engine: the engine the program was imported for (``program.engine`` if unset).
      reference_level: the CPU level a given ``reference`` was computed at (when torch
        runs here, this machine's: :func:`qjax.kernels.host_level`).

    Returns:
      a :class:`ParityReport`: ``report.print()``, ``.to_markdown()``, ``.to_json()``.

    Raises:
      ValueError: nothing was compared (no trace name of the program has reference
        codes): a report on nothing never passes. A pt2e program (``convert_pt2e``
        GraphModule or ExportedProgram) is compared through the codes of its
        ``quantize_per_tensor`` nodes.

    >>> import torch, warnings
    >>> from torch.ao.quantization import QuantStub, DeQuantStub, get_default_qconfig
    >>> from torch.ao.quantization import prepare, convert
    >>> from qjax.converters.torch import import_model
    >>> _ = torch.manual_seed(0)
    >>> m = torch.nn.Sequential(QuantStub(), torch.nn.Linear(4, 3), DeQuantStub()).eval()
    >>> m.qconfig = get_default_qconfig("fbgemm")
    >>> with warnings.catch_warnings():
    ...     warnings.simplefilter("ignore")
    ...     torch.backends.quantized.engine = "fbgemm"
    ...     p = prepare(m); _ = p(torch.randn(8, 4)); qm = convert(p)
    ...     x = torch.randn(5, 4)
    ...     r = compare(qm, import_model(qm, (x,), engine="fbgemm"), x)
    >>> r.ok, r.values, [la.name for la in r.layers]
    (True, 35, ['_0', '_1'])
    """
    args = _as_tuple(inputs)
    if reference is None:
        if torch_model is None:
            raise ValueError("compare needs a torch_model or a reference trace")
        import torch  # torch only when asked for

        from qjax.converters._pt2e_graph import is_pt2e, pt2e_trace
        from qjax.converters.torch import torch_trace
        from qjax.kernels import host_level

        if is_pt2e(torch_model):  # q/dq graph: the codes of its quantize nodes
            reference = pt2e_trace(torch_model, *args)
        else:
            reference = torch_trace(torch_model, *args)
        ref_engine = torch.backends.quantized.engine  # what torch's kernels just ran
        ref_level = host_level()  # ... and the CPU level they ran at
        kind = reference_kind or "torch"
    else:
        ref_engine, ref_level = None, reference_level
        kind = reference_kind or "hand"
    check_program(program, "compare")
    trace = program.trace(*args)
    report = compare_traces(
        reference,
        trace,
        program=program,
        inputs=args,
        engine=engine,
        reference_kind=kind,
        reference_engine=ref_engine,
        reference_level=ref_level,
    )
    if report.values == 0:
        raise ValueError(
            "compare: no quantized activation of the program has reference codes, so "
            f"nothing was compared (program trace: {sorted(trace)[:8]}; reference: "
            f"{sorted(reference)[:8]}); pass the model the program was imported from, or "
            "reference={name: codes} under the program's trace names"
        )
    return report
