"""Quantization configs for the Flax layers, with PyTorch's vocabulary, and the lifecycle.

A :class:`QuantConfig` is frozen and hashable (a static attribute of NNX and Linen
modules, so changing it retraces instead of silently reusing a stale program). It says
which tensors of a layer are fake-quantized (``weight``, ``activation`` and where the
activation quantizer sits), which observer collects each tensor's statistics, which
formula turns statistics into qparams (``compat``) and which gradient the fake-quant
uses (``grad``).

The lifecycle (:class:`Mode`) and the state each mode reads and writes:

==============  ===============  ==============  =====================================
mode            observers        fake-quant      ``quant_stats`` (observer state)
==============  ===============  ==============  =====================================
``FLOAT``       off              off             exists (allocated at init), untouched
``CALIBRATE``   on               off             updated; output equals the float one
``QAT``         on               on              updated, then read for qparams
``FROZEN``      off              on              read only (must have been observed)
==============  ===============  ==============  =====================================

Per-layer switches (``observe``, ``fake_quant``; PyTorch's ``disable_observer`` /
``disable_fake_quant``) can only turn a mode's column *off*: observers run when the mode
and the switch allow it, and likewise fake-quant.

Weight specs refer to the Flax kernel layout (channels last: ``(in, out)`` for Dense,
``(kh, kw, in, out)`` for Conv), so a per-output-channel weight spec has ``axis=-1``
where PyTorch (``(out, in)``) says ``ch_axis=0``.
"""

from __future__ import annotations

import contextvars
import dataclasses
import enum
from collections.abc import Callable
from typing import Literal

from .. import observers as _observers
from .._primitives import QCompat
from .._qparams import COMPATS, Compat
from .._spec import QuantSpec
from ..kernels._levels import TORCH_ENGINES

__all__ = [
    "EMAMinMax",
    "Histogram",
    "MinMax",
    "Mode",
    "QuantConfig",
    "default_qat_qconfig",
    "default_qconfig",
    "qjax_recommended",
]

_GRADS_SUPPORTED = ("ste", "clipped_ste", "identity", "lsq", "pact")


class Mode(enum.Enum):
    """The quantization lifecycle of a layer (see the module docstring for the table).

    >>> Mode.QAT.observes, Mode.QAT.fake_quantizes
    (True, True)
    >>> Mode.CALIBRATE.fake_quantizes, Mode.FROZEN.observes
    (False, False)
    """

    FLOAT = "float"
    CALIBRATE = "calibrate"
    QAT = "qat"
    FROZEN = "frozen"

    @property
    def observes(self) -> bool:
        """Whether observers update their statistics in this mode."""
        return self in (Mode.CALIBRATE, Mode.QAT)

    @property
    def fake_quantizes(self) -> bool:
        """Whether tensors are fake-quantized in this mode."""
        return self in (Mode.QAT, Mode.FROZEN)


# set by qjax.flax._record.recording(): qjax.convert traces every layer in Mode.FROZEN
RECORDING: contextvars.ContextVar[bool] = contextvars.ContextVar("qjax_recording", default=False)


def as_mode(mode) -> Mode:
    """A :class:`Mode` from a Mode or its name (``"qat"``); ``ValueError`` otherwise.
    While ``qjax.convert`` records a forward, every valid mode reads as ``Mode.FROZEN``."""
    if not isinstance(mode, Mode):
        try:
            mode = Mode(str(mode).lower())
        except ValueError:
            raise ValueError(
                f"mode must be one of {[m.value for m in Mode]} or a qjax.flax.Mode, got {mode!r}"
            ) from None
    return Mode.FROZEN if RECORDING.get() else mode


@dataclasses.dataclass(frozen=True)
class MinMax:
    """Observer factory: running min/max (torch ``MinMaxObserver``).

    >>> obs = MinMax()(QuantSpec(), "qjax")
    >>> type(obs).__name__
    'Observer'
    """

    def __call__(self, spec: QuantSpec, compat: Compat) -> _observers.Observer:
        return _observers.minmax(spec, compat=compat)


@dataclasses.dataclass(frozen=True)
class EMAMinMax:
    """Observer factory: moving-average min/max (torch ``MovingAverage*MinMaxObserver``).

    ``averaging_constant=1.0`` keeps only the latest batch (for weights: the current
    weights' range).

    >>> EMAMinMax(0.01) == EMAMinMax(0.01)
    True
    """

    averaging_constant: float = 0.01

    def __call__(self, spec: QuantSpec, compat: Compat) -> _observers.Observer:
        return _observers.ema_minmax(
            spec, averaging_constant=self.averaging_constant, compat=compat
        )


ObserverFactory = Callable[[QuantSpec, Compat], _observers.Observer]


@dataclasses.dataclass(frozen=True)
class QuantConfig:
    """What a quantized layer fake-quantizes, and how.

    Args:
      weight: spec of the kernel (Flax layout, channels last), ``None`` = float weight.
      activation: spec of the activation, ``None`` = float activation.
      weight_observer, activation_observer: observer factories
        ``(spec, compat) -> qjax.observers.Observer`` (:class:`MinMax`,
        :class:`EMAMinMax` or any callable of that signature, preferably hashable).
      compat: qparams formula (:func:`qjax.qparams_from_minmax`): ``"qjax"``,
        ``"torch"``, ``"torch_fused"`` (PyTorch's default fused QAT fake-quant) or
        ``"tflite"``. The fake-quant rounding follows it (``"torch"`` rules for both
        torch modes).
      grad: fake-quant gradient, ``"ste"``, ``"clipped_ste"`` or ``"identity"``
        ``"lsq"``/``"pact"``: learnable qparams as parameters, for the layers of
        :mod:`qjax.flax.nnx._learnable` / :mod:`qjax.flax.linen._learnable` only.
      quantize_input: the activation quantizer sits on the layer's input (qjax's and
        the ``dot_general`` hook's convention; what an int8 kernel consumes).
      quantize_output: the activation quantizer sits on the layer's output after the
        bias (PyTorch eager's convention; put a ``QuantStub`` before the first layer).
      scheme: ``None`` (default): the fake-quant forward is a float simulation (float
        op on fake-quantized operands, then the output fake-quant). A requantization
        scheme name (a key of :data:`qjax.kernels.SCHEMES`, e.g. ``"fbgemm"``): in
        ``QAT``/``FROZEN`` the layer's forward *value* is the int8 server's integer
        formula (int32 accumulation of the codes, :func:`qjax.kernels.requantize` with
        this scheme, dequantized; :mod:`qjax.flax._intsim`), with the float
        straight-through gradient, so :func:`qjax.convert` with the same scheme serves
        exactly the trained numbers. Needs int8 weights and ``quantize_input=True``.
        With ``quantize_output=True`` the output is the requantized codes; without an
        output quantizer (and in the ``dot_general``/conv hooks) it is the float
        :func:`qjax.kernels.dequantize_accumulator` ``f32(acc)·f32(s_x·s_w) + b``.

    >>> cfg = qjax_recommended()
    >>> cfg.weight.axis, cfg.activation.signed, cfg.compat
    (-1, True, 'qjax')
    >>> hash(cfg) == hash(qjax_recommended())
    True
    """

    weight: QuantSpec | None = None
    activation: QuantSpec | None = None
    weight_observer: ObserverFactory = EMAMinMax(1.0)
    activation_observer: ObserverFactory = EMAMinMax(0.01)
    compat: Compat = "qjax"
    grad: Literal["ste", "clipped_ste", "identity", "lsq", "pact"] = "ste"
    quantize_input: bool = True
    quantize_output: bool = False
    scheme: str | None = None

    def __post_init__(self):
        for name in ("weight", "activation"):
            v = getattr(self, name)
            if v is not None and not isinstance(v, QuantSpec):
                raise TypeError(
                    f"QuantConfig.{name} must be a qjax.QuantSpec or None, got {type(v).__name__}"
                )
        for name in ("weight_observer", "activation_observer"):
            if not callable(getattr(self, name)):
                raise TypeError(
                    f"QuantConfig.{name} must be an observer factory (spec, compat) -> "
                    f"Observer, got {getattr(self, name)!r}"
                )
        if self.compat not in COMPATS:
            raise ValueError(f"QuantConfig.compat must be one of {COMPATS}, got {self.compat!r}")
        if self.grad not in _GRADS_SUPPORTED:
            raise ValueError(
                f"QuantConfig.grad must be one of {_GRADS_SUPPORTED}, got {self.grad!r}"
            )
        if self.activation is not None and not (self.quantize_input or self.quantize_output):
            raise ValueError(
                "QuantConfig has an activation spec but quantize_input=quantize_output=False; "
                "set activation=None for float activations"
            )

        if self.scheme is not None:
            _check_scheme(self)

    @property
    def fake_quant_compat(self) -> QCompat:
        """The :func:`qjax.fake_quant` rounding rule that goes with ``compat``."""
        return "torch" if self.compat in ("torch", "torch_fused") else self.compat

    def replace(self, **changes) -> QuantConfig:
        """A copy with fields changed (``dataclasses.replace``)."""
        return dataclasses.replace(self, **changes)


def _check_scheme(cfg: QuantConfig) -> None:
    from ..kernels import SCHEMES  # kernels import nothing from flax: no cycle

    if cfg.scheme not in SCHEMES:
        raise ValueError(
            f"QuantConfig.scheme must be None or one of {sorted(SCHEMES)}, got {cfg.scheme!r}"
        )
    w, a = cfg.weight, cfg.activation
    if w is None or a is None or w.bits != 8 or not w.signed or a.bits != 8:
        raise ValueError(
            f"QuantConfig(scheme={cfg.scheme!r}) simulates the int8 server: it needs an int8 "
            f"signed weight spec and an 8-bit activation spec, got weight={w}, activation={a}"
        )
    if not cfg.quantize_input:
        raise ValueError(
            f"QuantConfig(scheme={cfg.scheme!r}): the integer formula needs the layer's input "
            "qparams; set quantize_input=True (config.replace(quantize_input=True, "
            "scheme=...))"
        )


def default_qat_qconfig(backend: str = "x86") -> QuantConfig:
    """PyTorch's ``get_default_qat_qconfig(backend)`` (version 1) as a :class:`QuantConfig`.

    Both backends use ``FusedMovingAvgObsFakeQuantize`` (moving-average min/max with
    ``averaging_constant=0.01`` for weights and activations, qparams recomputed with
    FBGEMM's ``ChooseQuantizationParams``: ``compat="torch_fused"``) and quantize each
    module's *output* (``quantize_output=True``; put a ``QuantStub`` first):

    ==========  ===============================  ==========================================
    backend     activation                        weight
    ==========  ===============================  ==========================================
    ``x86``     quint8 affine, 0..255,            qint8 symmetric per-channel (torch
    ``fbgemm``  ``reduce_range`` (codes 0..127)   ``ch_axis=0`` = Flax kernel axis -1)
    ``qnnpack`` quint8 affine 0..255              qint8 symmetric per-tensor
    ``onednn``  quint8 affine 0..255              qint8 symmetric per-channel
    ==========  ===============================  ==========================================

    >>> cfg = default_qat_qconfig("x86")
    >>> cfg.activation.qmin, cfg.activation.qmax, cfg.weight.axis, cfg.compat
    (0, 127, -1, 'torch_fused')
    >>> default_qat_qconfig("qnnpack").weight.axis is None
    True
    """
    backends = TORCH_ENGINES
    if backend not in backends:
        raise ValueError(f"default_qat_qconfig: backend must be one of {backends}, got {backend!r}")
    act = QuantSpec(
        bits=8, signed=False, quant_min=0, quant_max=255, reduce_range=backend in ("x86", "fbgemm")
    )
    per_channel = backend != "qnnpack"
    weight = QuantSpec(
        bits=8,
        signed=True,
        symmetric=True,
        quant_min=-128,
        quant_max=127,
        axis=-1 if per_channel else None,
    )
    return QuantConfig(
        weight=weight,
        activation=act,
        weight_observer=EMAMinMax(0.01),
        activation_observer=EMAMinMax(0.01),
        compat="torch_fused",
        grad="ste",
        quantize_input=False,
        quantize_output=True,
    )


@dataclasses.dataclass(frozen=True)
class Histogram:
    """Observer factory: histogram with torch's L2 range search (``HistogramObserver``).

    >>> Histogram() == Histogram(2048)
    True
    """

    bins: int = 2048

    def __call__(self, spec: QuantSpec, compat: Compat) -> _observers.Observer:
        return _observers.histogram(spec, bins=self.bins, compat=compat)


def default_qconfig(backend: str = "x86") -> QuantConfig:
    """PyTorch's post-training ``get_default_qconfig(backend)`` as a :class:`QuantConfig`.

    Activations: quint8 affine per-tensor from a ``HistogramObserver`` (L2 range
    search; ``reduce_range`` on ``x86``/``fbgemm``); weights: qint8 symmetric from min/max
    (per-channel except on ``qnnpack``); qparams by the observers' ``calculate_qparams``
    (``compat="torch"``, rule 6). Each module's output is quantized (eager convention;
    put a ``QuantStub`` first). Use it with ``calibrate`` (PTQ), then ``qjax.convert``.

    ==========  =======================================  ===============================
    backend     activation                               weight
    ==========  =======================================  ===============================
    ``x86``     histogram, quint8, ``reduce_range``      per-channel min/max, qint8 sym.
    ``fbgemm``  histogram, quint8, ``reduce_range``      per-channel min/max, qint8 sym.
    ``qnnpack`` histogram, quint8                        per-tensor min/max, qint8 sym.
    ``onednn``  histogram, quint8                        per-channel min/max, qint8 sym.
    ==========  =======================================  ===============================

    >>> cfg = default_qconfig("x86")
    >>> cfg.activation.qmax, cfg.weight.axis, cfg.compat, type(cfg.activation_observer).__name__
    (127, -1, 'torch', 'Histogram')
    """
    backends = TORCH_ENGINES
    if backend not in backends:
        raise ValueError(f"default_qconfig: backend must be one of {backends}, got {backend!r}")
    qat = default_qat_qconfig(backend)
    return dataclasses.replace(
        qat, weight_observer=MinMax(), activation_observer=Histogram(), compat="torch"
    )


def qjax_recommended() -> QuantConfig:
    """qjax's preset: what trains well and serves bit-exactly on the int8 engine.

    Weights: int8 symmetric per-output-channel with ``narrow_range`` (-127..127, so the
    weight range maps exactly onto codes and no bin is lost at convert time), observed
    from the current weights (``EMAMinMax(1.0)``). Activations: int8 affine per-tensor
    on the layer input, moving-average min/max (0.01). ``compat="qjax"``, STE.

    >>> cfg = qjax_recommended()
    >>> cfg.weight.qmin, cfg.weight.qmax, cfg.quantize_input
    (-127, 127, True)
    """
    return QuantConfig(
        weight=QuantSpec(bits=8, signed=True, symmetric=True, narrow_range=True, axis=-1),
        activation=QuantSpec(bits=8, signed=True),
        weight_observer=EMAMinMax(1.0),
        activation_observer=EMAMinMax(0.01),
        compat="qjax",
        grad="ste",
        quantize_input=True,
        quantize_output=False,
    )
