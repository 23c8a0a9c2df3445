"""Evidence for the rulebook (:class:`LayerEvidence`, :class:`Cause`), gathered from a
program and its trace.

A :class:`LayerEvidence` needs, per layer: its op kind, the int8 weight, whether
it has a bias, its quantized (or float) input and its output qparams. All of them come
from the program's steps (``Step.inputs``, ``Step.params``, ``Step.layer``) and the trace;
the program's origin (imported, or traced from a Flax model by :func:`qjax.convert`)
from its type (:func:`origin_of`).
"""

from __future__ import annotations

import dataclasses
import sys
from typing import Any, Literal

import jax
import numpy as np

from .._qarray import QArray
from .._spec import QParams

Strength = Literal["confirmed", "likely", "risk"]
ReferenceKind = Literal["torch", "fake_quant", "hand", "none"]


@dataclasses.dataclass(frozen=True)
class Cause:
    """A likely reason for a layer's mismatches (or a risk of them).

    Fields: ``rule`` (NUMERICS.md rule numbers, e.g. ``"9"``), ``name`` (the predicate),
    ``strength`` (``"confirmed"``, ``"likely"`` or ``"risk"``), ``message`` (what was
    seen, with numbers) and ``fix`` (what makes the two sides agree).
    """

    rule: str
    name: str
    strength: Strength
    message: str
    fix: str

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class LayerEvidence:
    """Everything the rulebook may look at for one layer (all fields but ``name`` optional).

    ``codes`` are qjax's output codes, ``ref_codes`` the reference's (``None`` for
    ``inspect``), both numpy integer arrays of one shape. ``weight`` is the int8 weight
    (:class:`~qjax.QArray`, output channels on the last axis, as the kernels store it),
    ``input_codes``/``input_qparams`` the layer's quantized input, ``float_input`` its
    float input (quantize layers). ``kind`` is the op (``"quantize"``, ``"linear"``,
    ``"conv2d"``, ...), ``engine`` the torch engine the program was imported for (if
    known), ``scheme`` the requantization scheme the layer ran with (``"fbgemm"``,
    ``"onednn"``, ...),
    ``reference_kind`` what produced ``ref_codes``: ``"torch"`` (a converted model),
    ``"fake_quant"`` (a QAT model), ``"hand"`` (a hand simulation) or ``"none"``.
    ``reference_engine`` is the torch engine that produced ``ref_codes`` (torch's
    ``torch.backends.quantized.engine`` when the reference ran, if known) and
    ``input_differs`` says the layer's input already differs from the reference's.
    ``level`` is the CPU level the program emulates (``program.level``) and
    ``reference_level`` the one torch ran at (:func:`qjax.kernels.host_level` when the
    reference ran), when known. ``origin`` is ``"flax"`` for a program traced from a
    Flax model (:func:`qjax.convert`: its own weights and qparams, exact int32 kernels,
    no torch engine; the torch-only rules skip it), ``None`` otherwise (imported).
    """

    name: str
    kind: str = "other"
    engine: str | None = None
    codes: np.ndarray | None = None
    ref_codes: np.ndarray | None = None
    out_qparams: QParams | None = None
    weight: QArray | None = None
    has_bias: bool = False
    input_codes: np.ndarray | None = None
    input_qparams: QParams | None = None
    float_input: np.ndarray | None = None
    reference_kind: ReferenceKind = "torch"
    scheme: str | None = None
    reference_engine: str | None = None
    input_differs: bool = False
    level: str | None = None
    reference_level: str | None = None
    origin: str | None = None

    @property
    def compared(self) -> bool:
        return self.ref_codes is not None and self.codes is not None

    def mismatch(self) -> tuple[np.ndarray, np.ndarray]:
        """``(mask, diff)``: where the codes differ and ``codes - ref_codes`` (int64)."""
        diff = np.asarray(self.codes, np.int64) - np.asarray(self.ref_codes, np.int64)
        return diff != 0, diff


def codes_of(v: Any, what: str) -> np.ndarray:
    """Integer codes of a QArray, a torch quantized tensor or an integer array."""
    if isinstance(v, QArray):
        return np.asarray(v.values)
    if hasattr(v, "int_repr"):  # a torch quantized tensor
        return v.int_repr().numpy()
    a = np.asarray(v)
    if not np.issubdtype(a.dtype, np.integer):
        raise TypeError(f"{what}: expected integer codes or a QArray, got dtype {a.dtype}")
    return a


def weight_and_bias(params: Any) -> tuple[QArray | None, bool]:
    """The int8 weight (first signed QArray of rank >= 2) and whether params hold a
    nonzero float array outside it (a bias: the kernels keep biases float32)."""
    weight, has_bias = None, False
    leaves = jax.tree_util.tree_leaves(params, is_leaf=lambda x: isinstance(x, QArray))
    for leaf in leaves:
        if isinstance(leaf, QArray):
            if weight is None and leaf.spec.signed and leaf.ndim >= 2:
                weight = leaf
        elif hasattr(leaf, "dtype") and np.issubdtype(np.dtype(leaf.dtype), np.floating):
            has_bias = has_bias or bool(np.any(np.asarray(leaf) != 0))
    return weight, has_bias


def evidence(
    program,
    name: str,
    codes,
    ref_codes,
    trace,
    floats,
    engine,
    reference_kind,
    *,
    reference_engine=None,
    input_differs=False,
    reference_level=None,
):
    """:class:`LayerEvidence` for step ``name``: its op, weight, bias and first input.

    The input is the traced activation the step reads (or, for a quantize step, the
    program's float input); ``program`` may be ``None`` (codes only).
    """
    step = next((s for s in getattr(program, "steps", ()) if s.name == name), None)
    layer = step.layer if step is not None else None
    weight, has_bias = weight_and_bias(step.params) if step is not None else (None, False)
    input_codes = input_qp = float_input = None
    if step is not None and step.inputs:
        src = step.inputs[0]
        if src in trace:
            input_codes, input_qp = np.asarray(trace[src].values), trace[src].qparams
        elif src in floats:
            float_input = floats[src]
    return LayerEvidence(
        name=name,
        kind=layer.op if layer is not None else "other",
        engine=engine,
        codes=codes,
        ref_codes=ref_codes,
        out_qparams=trace[name].qparams if name in trace else None,
        weight=weight,
        has_bias=has_bias,
        input_codes=input_codes,
        input_qparams=input_qp,
        float_input=float_input,
        reference_kind=reference_kind,
        scheme=getattr(layer, "scheme", None),
        reference_engine=reference_engine,
        input_differs=input_differs,
        level=getattr(program, "level", None),
        reference_level=reference_level,
        origin=origin_of(program),
    )


def origin_of(program) -> str | None:
    """``"flax"`` for a program :func:`qjax.convert` traced from a Flax model, else
    ``None`` (imported from torch, or built by hand).

    Read from the type without importing Flax: such a program exists only once
    :mod:`qjax.flax._convert` is loaded.

    >>> origin_of(None) is None
    True
    """
    mod = sys.modules.get("qjax.flax._convert")
    traced = getattr(mod, "TracedProgram", None)
    return "flax" if traced is not None and isinstance(program, traced) else None


def check_program(program, what: str) -> None:
    """``TypeError`` unless ``program`` runs and traces like a :class:`~qjax.Program`."""
    if not (hasattr(program, "trace") and hasattr(program, "steps")):
        raise TypeError(
            f"{what}: expected a qjax.Program (qjax.convert of a Flax model, "
            "qjax.converters.torch.import_model, ...), got "
            f"{type(program).__name__}: it has no per-layer trace"
        )


def engine_of(program, engine):
    """``engine`` if given, else the program's ``engine`` attribute (or ``None``)."""
    if engine is not None:
        return engine
    return getattr(program, "engine", None)


def float_inputs(program, inputs) -> dict[str, np.ndarray]:
    """``{program input name: numpy array}`` (torch tensors copied through numpy)."""
    out = {}
    for n, v in zip(getattr(program, "inputs", ()), inputs, strict=False):
        if hasattr(v, "detach"):
            v = v.detach().cpu().numpy()
        out[n] = np.asarray(v)
    return out
