"""Requantization folded into the native layers of a served program, kept in step with
``program.params``.

A layer on the fused native kernel (``kernel="onednn"`` on the brgemm ukernel, or
``"amx"``, or a linear layer on ``"sat16"``; :func:`qjax.kernels.fold_requant`) needs per
output channel the coefficients of its input qparams, bias and output qparams. With the
params as ``jit`` arguments they are computed in every call (a dozen small XLA passes per
layer); :func:`fold_program` computes them once, from the program's current params, and
stores them in the layer's prepared weight (``program.params[name][0]``). The layers are
the steps of a converted Flax program (``kind="layer"``, :mod:`qjax.flax._steps`) and of
a torch model imported with ``qjax.converters.torch.import_model`` (``"torch_linear"`` /
``"torch_conv"``, :mod:`qjax.flax._torch_steps`; a saturating linear layer folds on the
sat16 kernel).

The coefficients depend on params of *other* steps too (the input qparams come from the
quantize step or the layer before, through ReLU, pooling and layout steps on codes), so
the fold is tied to the params it was computed from: :class:`~qjax.Program` calls
:func:`fold_program` again before the next run whenever ``program.params`` or any of its
entries was replaced (``Program.refresh``; entries are compared by identity, the
arrays in them are immutable ``jax`` arrays), so an edited program computes the edited
qparams' codes, never the stale fold's. A saved program holds no fold: loading folds
again (``load_served``).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from .. import kernels
from ..kernels import _native

__all__ = ["codes_qparams", "fold_program"]


def _unfolded(pw):
    if getattr(pw, "folded", None) is None:
        return pw
    return dataclasses.replace(pw, epilogue=None, folded=None)


# torch steps whose codes keep their (first) input's qparams, as torch's ops do
_TORCH_SAME_QPARAMS = ("torch_clamp", "torch_shape", "torch_pool")
# torch steps whose output qparams are the attribute "out"
_TORCH_OUT = ("torch_linear", "torch_conv", "torch_hardswish", "torch_binary", "torch_cat",
              "torch_batch_norm")  # fmt: skip


def codes_qparams(kind: str, attrs, params, x_qp):
    """The qparams of the codes a step of ``kind`` (a Flax program's or a torch import's,
    module docstring) stores, or ``None`` (a float value, or unknown): a quantize step's,
    a layer's output qparams, the attribute ``out`` / ``qp`` of a torch step, or ``x_qp``
    (those of the codes its first input holds) for the steps whose codes keep their
    input's qparams (ReLU, identity, a lax step on codes, torch's clamp, shape and pool
    steps). Also what ``load_served`` reads each Flax layer's input spec from.

    >>> from qjax import QParams, QuantSpec
    >>> qp = QParams(0.5, 3, QuantSpec(signed=False))
    >>> codes_qparams("relu", {"pick": [None]}, None, qp) is qp
    True
    >>> codes_qparams("lax", {"pick": [None], "on_codes": False}, None, qp) is None
    True
    """
    if kind == "quantize":
        return params
    if kind == "layer":
        return params[2]
    if kind == "torch_quantize":
        return attrs["qp"]
    if kind in _TORCH_OUT:
        return attrs.get("out")  # a cat without it: unknown
    if any(i is not None for i in attrs.get("pick", ())):
        return None  # reads an output of a several-output step: a float value
    if (
        kind in ("relu", "identity")
        or (kind == "lax" and attrs.get("on_codes"))
        or kind in _TORCH_SAME_QPARAMS
        or (kind == "torch_unary" and attrs.get("op") in ("relu", "identity"))
    ):
        return x_qp  # the codes keep their input's qparams
    return None


def _layer(step, p):
    """``(weight, bias, out qparams, scheme, activation, rebuild, accumulate)`` of a layer
    step whose requantization can be folded, or ``None``; ``rebuild(w)``: its params with
    weight ``w``."""
    kind, a = step.spec
    if kind == "layer":
        pw, bias, qy = p
        act = "relu" if a["relu"] else None
        return pw, bias, qy, a["scheme"], act, lambda w: (w, bias, qy), a.get("accumulate", "exact")
    if kind in ("torch_linear", "torch_conv"):
        pw, bias = p
        acc = a.get("accumulate", "exact")
        return pw, bias, a["out"], a["scheme"], a["activation"], lambda w: (w, bias), acc
    return None


def fold_program(program) -> int:
    """Fold the requantization of every fusable native layer of ``program`` (a
    :class:`~qjax.Program` of :mod:`qjax.flax._steps` or torch-import steps, module
    docstring) from its current params, replacing the weight in ``program.params[name]``
    (``(weight, bias, out qparams)``, a torch layer's ``(weight, bias)``); a layer
    that cannot be folded (XLA kernel, per-channel or unknown qparams, a float output)
    runs unfolded (an earlier fold removed). Returns the number of folded layers.

    Per output channel ``n`` (:func:`qjax.kernels.fold_requant`): ``ivec[n] = -(zp_x +
    shift)·Σw[n]`` (int32; ``+ b_q[n]`` for ``"qnnpack"``), ``fvec[n]`` / ``mult[n]``
    (float32) the scheme's bias term and multiplier of ``s_x``, ``s_w[n]``, ``b[n]``,
    ``s_out``, and the clamp ``(lo - zp_out, hi - zp_out)``; the codes are the unfolded
    layer's, bit for bit.

    >>> from qjax import Program
    >>> fold_program(Program([], ("x",), "x"))
    0
    """
    params = program.params
    qp: dict = {}
    folded = 0
    for s in program.steps:
        if s.spec is None:
            continue
        p = params[s.name]
        qx = qp.get(s.inputs[0]) if s.inputs else None
        layer = _layer(s, p) if s.inputs else None
        if layer is not None:
            pw, bias, qy, scheme, act, rebuild, acc = layer
            new = _unfolded(pw)
            if qx is not None and qy is not None and _fusable(new, qx, bias, qy, scheme, acc):
                fold = kernels.fold_requant
                new = fold(new, qx, bias, qy, scheme=scheme, activation=act, accumulate=acc)
                folded += 1
            if new is not pw:
                params[s.name] = p = rebuild(new)
        qp[s.name] = codes_qparams(s.spec[0], s.spec[1], p, qx)
    return folded


def _fusable(pw, qx, bias, qy, scheme, accumulate) -> bool:
    return _native.fusable(pw, _CodesLike(qx), bias, qy, scheme, accumulate)


class _CodesLike:
    """What :func:`~qjax.kernels._native.fusable` reads of an input: spec, dtype and
    qparams."""

    def __init__(self, qx):
        self.spec = qx.spec
        self.values = np.zeros(0, qx.spec.dtype)
        self.scale, self.zero_point = qx.scale, qx.zero_point
