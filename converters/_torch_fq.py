"""Reading a PyTorch fake-quant module as qjax observer state, and checking that the
qjax config computes what it computes.

=================================  ===========================  ===========================
PyTorch                            qjax                         checked
=================================  ===========================  ===========================
``FusedMovingAvgObsFakeQuantize``  ``compat="torch_fused"``     dtype, quant_min/max,
``FakeQuantize``                   ``compat="torch"``           qscheme (symmetric,
``MovingAverage*MinMaxObserver``   ``EMAMinMax(c)``             per-tensor / per-channel),
``[PerChannel]MinMaxObserver``     ``MinMax()``                 averaging constant
``_LearnableFakeQuantize`` (LSQ)   not supported: the Flax layers have no learnable
                                   qparams yet (``QuantConfig.grad`` has no ``"lsq"``)
=================================  ===========================  ===========================

Observer state: ``min_val``/``max_val`` are copied as float32 (a per-channel observer
that never ran holds empty tensors: ``+inf``/``-inf`` of the qjax shape); ``count`` is
1 once a finite range was seen (torch keeps no count), ``nonfinite`` 0.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from qjax.flax import EMAMinMax, MinMax, QuantConfig
from qjax.observers import MinMaxState

__all__ = ["check_fake_quant", "check_qparams", "fake_quant_state", "is_fake_quant"]


def _torch():
    try:
        import torch
    except ImportError as e:  # pragma: no cover - torch is in the test environment
        raise ImportError("qjax.converters needs PyTorch: pip install 'qjax[torch]'") from e
    return torch


def is_fake_quant(module) -> bool:
    """Whether ``module`` is a PyTorch fake-quant module (``FakeQuantizeBase``).

    >>> import torch.ao.quantization as tq
    >>> is_fake_quant(tq.FakeQuantize()), is_fake_quant(tq.QuantStub())
    (True, False)
    """
    from torch.ao.quantization.fake_quantize import FakeQuantizeBase

    return isinstance(module, FakeQuantizeBase)


def _kind(fq, where: str) -> str:
    from torch.ao.quantization._learnable_fake_quantize import _LearnableFakeQuantize
    from torch.ao.quantization.fake_quantize import FakeQuantize, FusedMovingAvgObsFakeQuantize

    if isinstance(fq, _LearnableFakeQuantize):
        raise ValueError(
            f"{where}: _LearnableFakeQuantize (LSQ, learnable scale/zero point) cannot be "
            "imported: qjax.flax layers keep qparams as observer state, not learnable "
            "parameters (QuantConfig.grad has no 'lsq'); qjax.fake_quant(grad='lsq') is the "
            "primitive to build such a layer on"
        )
    if isinstance(fq, FusedMovingAvgObsFakeQuantize):
        return "torch_fused"
    if isinstance(fq, FakeQuantize):
        return "torch"
    raise TypeError(f"{where}: unsupported fake-quant module {type(fq).__name__}")


def _observer_factory_matches(obs, factory) -> str | None:
    """``None`` if the qjax observer factory computes what ``obs`` does, else why not."""
    from torch.ao.quantization import observer as tobs

    ema_types = (tobs.MovingAverageMinMaxObserver, tobs.MovingAveragePerChannelMinMaxObserver)
    if isinstance(obs, ema_types):
        c = float(obs.averaging_constant)
        if isinstance(factory, EMAMinMax) and float(factory.averaging_constant) == c:
            return None
        return f"torch observer {type(obs).__name__}(averaging_constant={c}) needs EMAMinMax({c})"
    if isinstance(obs, (tobs.MinMaxObserver, tobs.PerChannelMinMaxObserver)):
        if isinstance(factory, MinMax):
            return None
        return f"torch observer {type(obs).__name__} needs MinMax()"
    return f"torch observer {type(obs).__name__} has no qjax equivalent in qjax.flax"


def check_fake_quant(fq, config: QuantConfig, slot: str, where: str) -> None:
    """Raise ``ValueError`` naming ``where`` unless the qjax ``config``'s quantizer for
    ``slot`` (``"weight"`` or an activation slot) computes what PyTorch's ``fq`` does.

    >>> import torch.ao.quantization as tq
    >>> from qjax.flax import default_qat_qconfig
    >>> qc = tq.get_default_qat_qconfig("x86")
    >>> check_fake_quant(qc.weight(), default_qat_qconfig("x86"), "weight", "fc")
    >>> check_fake_quant(qc.weight(), default_qat_qconfig("qnnpack"), "weight", "fc")
    Traceback (most recent call last):
      ...
    ValueError: fc: torch per_channel_symmetric (ch_axis 0) vs qjax per-tensor weight spec
    """
    torch = _torch()
    compat = _kind(fq, where)
    weight = slot == "weight"
    spec = config.weight if weight else config.activation
    factory = config.weight_observer if weight else config.activation_observer
    if spec is None:
        raise ValueError(f"{where}: torch fake-quantizes the {slot}, the qjax config does not")
    problems = []
    if config.compat != compat:
        problems.append(f"torch {type(fq).__name__} needs compat={compat!r}, got {config.compat!r}")
    signed = {torch.qint8: True, torch.quint8: False}.get(fq.dtype)
    if signed is None:
        problems.append(f"torch dtype {fq.dtype} is not supported (qint8, quint8)")
    elif spec.bits != 8 or spec.signed != signed:
        problems.append(f"torch dtype {fq.dtype} vs qjax {spec.bits}-bit signed={spec.signed}")
    if (int(fq.quant_min), int(fq.quant_max)) != (spec.qmin, spec.qmax):
        problems.append(
            f"torch range [{fq.quant_min}, {fq.quant_max}] vs qjax [{spec.qmin}, {spec.qmax}]"
        )
    qs = str(fq.qscheme).removeprefix("torch.")
    per_channel = fq.qscheme in (torch.per_channel_affine, torch.per_channel_symmetric)
    symmetric = fq.qscheme in (torch.per_tensor_symmetric, torch.per_channel_symmetric)
    if per_channel and not (weight and int(fq.ch_axis) == 0 and spec.axis in (-1, (-1,))):
        what = "per-channel" if spec.axis is not None else "per-tensor"
        problems.append(
            f"torch {qs} (ch_axis {fq.ch_axis}) vs qjax {what} {slot} spec"
            + ("" if weight else " (per-channel activations are not supported)")
        )
    if not per_channel and spec.axis is not None:
        problems.append(f"torch {qs} vs qjax per-channel spec (axis {spec.axis})")
    if symmetric != spec.symmetric:
        problems.append(f"torch {qs} vs qjax symmetric={spec.symmetric}")
    why = _observer_factory_matches(fq.activation_post_process, factory)
    if why:
        problems.append(why)
    if problems:
        raise ValueError(f"{where}: " + "; ".join(problems))


def fake_quant_state(fq, shape: tuple[int, ...], where: str) -> MinMaxState:
    """The qjax :class:`~qjax.observers.MinMaxState` of PyTorch fake-quant ``fq``'s
    observer, for a qjax state of qparams ``shape`` (``()`` or ``(C,)``).

    >>> import torch, torch.ao.quantization as tq
    >>> fq = tq.get_default_qat_qconfig("x86").activation()
    >>> _ = fq(torch.tensor([-1.0, 2.0]))
    >>> st = fake_quant_state(fq, (), "act")
    >>> float(st.min_val), float(st.max_val), int(st.count)
    (-1.0, 2.0, 1)
    """
    obs = fq.activation_post_process
    mn = obs.min_val.detach().cpu().numpy().astype(np.float32)
    mx = obs.max_val.detach().cpu().numpy().astype(np.float32)
    if mn.size == 0 and mx.size == 0:  # a per-channel observer that never ran
        mn = np.full(shape, np.inf, np.float32)
        mx = np.full(shape, -np.inf, np.float32)
    if mn.shape != tuple(shape) or mx.shape != tuple(shape):
        raise ValueError(
            f"{where}: torch observer min/max have shapes {mn.shape}/{mx.shape}, the qjax "
            f"statistics need {tuple(shape)}"
        )
    seen = bool(np.any(np.isfinite(mn)))
    return MinMaxState(
        min_val=jnp.asarray(mn),
        max_val=jnp.asarray(mx),
        nonfinite=jnp.zeros((), jnp.int32),
        count=jnp.asarray(int(seen), jnp.int32),
    )


@functools.lru_cache(maxsize=64)
def qparams_fn(factory, spec, compat):
    """``factory(spec, compat).qparams`` under ``jax.jit``, one per configuration (the
    eager version dispatches dozens of small XLA ops per call)."""
    return jax.jit(factory(spec, compat).qparams)


def check_qparams(fq, state: MinMaxState, config: QuantConfig, slot: str, where: str) -> int:
    """Check that qjax derives PyTorch's stored scale and zero point from ``state``
    (qjax recomputes qparams from the observer state; it stores none). Returns the
    number of qparams entries compared (0 when the observer never saw data).

    >>> import torch, torch.ao.quantization as tq
    >>> from qjax.flax import default_qat_qconfig
    >>> fq = tq.get_default_qat_qconfig("x86").activation()
    >>> _ = fq(torch.tensor([-1.0, 2.0]))
    >>> cfg = default_qat_qconfig("x86")
    >>> check_qparams(fq, fake_quant_state(fq, (), "a"), cfg, "output", "a")
    1
    """
    if int(state.count) == 0:
        return 0
    weight = slot == "weight"
    spec = config.weight if weight else config.activation
    factory = config.weight_observer if weight else config.activation_observer
    qp = qparams_fn(factory, spec, config.compat)(state)
    s = np.asarray(qp.scale, np.float32).reshape(-1)
    z = np.asarray(qp.zero_point).astype(np.int64).reshape(-1)
    ts = fq.scale.detach().cpu().numpy().astype(np.float32).reshape(-1)
    tz = fq.zero_point.detach().cpu().numpy().astype(np.int64).reshape(-1)
    if s.shape != ts.shape or not (np.array_equal(s, ts) and np.array_equal(z, tz)):
        raise ValueError(
            f"{where}: torch holds scale {ts.tolist()} / zero_point {tz.tolist()}, but its "
            f"observer's min/max give {s.tolist()} / {z.tolist()} under the qjax config; qjax "
            "derives qparams from observer state (were scale/zero_point set by hand?)"
        )
    return int(s.size)
