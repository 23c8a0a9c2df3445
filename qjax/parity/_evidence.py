"""Evidence for the rulebook, gathered from a program and its trace.

A :class:`~qjax.parity._rules.LayerEvidence` needs, per layer: its op kind, the int8 weight, whether
it has a bias, its quantized (or float) input and its output qparams. All of them come
from the program's steps (``Step.inputs``, ``Step.params``, ``Step.layer``) and the trace;
the program's origin (imported, or traced from a Flax model by :func:`qjax.convert`)
from its type (:func:`origin_of`).
"""

from __future__ import annotations

import sys
from typing import Any

import jax
import numpy as np

from .._qarray import QArray
from ._rules import LayerEvidence


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
            f"{type(program).__name__}: it has no per-layer trace (a Sequential's "
            "ServedModel has none: convert a model class whose __call__ calls the "
            "Sequential, which qjax.convert traces into a Program)"
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
