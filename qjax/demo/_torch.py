"""The torch side of ``qjax demo``: the digits CNN as a torch eager model with the same
float weights, torch's own PTQ per engine, and the codes torch computes.

* :func:`torch_float_model`: QuantStub, Conv2d-BN-ReLU x2, MaxPool2d, Flatten, Linear,
  DeQuantStub (NCHW) with the qjax model's weights (the dense kernel's rows permuted from
  qjax's H, W, C flatten order to torch's C, H, W);
* :func:`torch_ptq`: ``fuse_modules`` (Conv-BN-ReLU -> ``ConvReLU2d``), ``prepare`` with
  ``get_default_qconfig(engine)``, calibration on the given batches, ``convert``;
* :func:`served_codes`: the codes a converted program (:func:`qjax.convert`) computes at
  every quantized activation (:meth:`qjax.Program.trace`), in torch's names and NCHW
  layout, to compare with ``torch_trace`` directly;
* :func:`weight_differences`: the program's int8 weights and scales against torch's.
"""

from __future__ import annotations

import contextlib
import copy
import warnings

import numpy as np
import torch
from torch import nn

from .._qarray import QArray
from ..program import Program

__all__ = [
    "engine",
    "served_codes",
    "to_nchw",
    "torch_float_model",
    "torch_ptq",
    "weight_differences",
]


class DigitsNet(nn.Module):
    """The digits CNN in torch eager form (NCHW), ready for eager PTQ."""

    def __init__(self):
        super().__init__()
        self.quant = torch.ao.quantization.QuantStub()
        self.conv1 = nn.Conv2d(1, 16, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(32)
        self.relu2 = nn.ReLU()
        self.pool = nn.MaxPool2d(2)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(4 * 4 * 32, 10)
        self.dequant = torch.ao.quantization.DeQuantStub()

    def forward(self, x):
        x = self.quant(x)
        x = self.relu1(self.bn1(self.conv1(x)))
        x = self.relu2(self.bn2(self.conv2(x)))
        x = self.flatten(self.pool(x))
        return self.dequant(self.fc(x))


def to_nchw(x) -> torch.Tensor:
    """NHWC float images -> a contiguous NCHW float32 torch tensor.

    >>> to_nchw(np.zeros((2, 8, 8, 1))).shape
    torch.Size([2, 1, 8, 8])
    """
    return torch.from_numpy(np.ascontiguousarray(np.asarray(x, np.float32).transpose(0, 3, 1, 2)))


def _t(a) -> torch.Tensor:
    return torch.from_numpy(np.array(a, np.float32))  # a writable copy (jax arrays are not)


def torch_float_model(model) -> DigitsNet:
    """A :class:`DigitsNet` (eval mode) carrying the float weights of the qjax digits CNN
    ``model`` (:func:`qjax.demo._data.make_model`): HWIO kernels -> OIHW, BN scale/bias and
    running statistics as they are, the dense kernel ``(512, 10)`` in H, W, C row order ->
    torch's ``(10, 512)`` in C, H, W order."""
    layers = model.layers
    net = DigitsNet()
    with torch.no_grad():
        for conv, bn, q in ((net.conv1, net.bn1, layers[1]), (net.conv2, net.bn2, layers[2])):
            conv.weight.copy_(_t(np.asarray(q.kernel[...]).transpose(3, 2, 0, 1)))
            bn.weight.copy_(_t(q.bn_scale[...]))
            bn.bias.copy_(_t(q.bn_bias[...]))
            bn.running_mean.copy_(_t(q.bn_mean[...]))
            bn.running_var.copy_(_t(q.bn_var[...]))
            bn.eps = float(q.epsilon)
        k = np.asarray(layers[5].kernel[...]).reshape(4, 4, 32, 10)
        net.fc.weight.copy_(_t(k.transpose(3, 2, 0, 1).reshape(10, 512)))
        net.fc.bias.copy_(_t(layers[5].bias[...]))
    return net.eval()


@contextlib.contextmanager
def engine(name: str):
    """Run under torch's quantized engine ``name`` (restored afterwards), one thread.

    >>> with engine("qnnpack"):
    ...     torch.backends.quantized.engine
    'qnnpack'
    """
    old, threads = torch.backends.quantized.engine, torch.get_num_threads()
    torch.backends.quantized.engine = name
    torch.set_num_threads(1)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch 2.13 deprecates torch.ao.quantization
            yield
    finally:
        torch.backends.quantized.engine = old
        torch.set_num_threads(threads)


def torch_ptq(float_model: DigitsNet, engine_name: str, batches) -> nn.Module:
    """torch eager PTQ of a copy of ``float_model`` under ``engine_name``: fuse
    Conv-BN-ReLU, ``prepare`` with ``get_default_qconfig(engine_name)``, run ``batches``
    (NCHW tensors), ``convert``. Call inside :func:`engine`."""
    from torch.ao import quantization as tq

    m = copy.deepcopy(float_model).eval()
    m = tq.fuse_modules(m, [["conv1", "bn1", "relu1"], ["conv2", "bn2", "relu2"]])
    m.qconfig = tq.get_default_qconfig(engine_name)
    prepared = tq.prepare(m)
    with torch.no_grad():
        for b in batches:
            prepared(b)
    return tq.convert(prepared)


def served_codes(
    program: Program, x, names, flatten: tuple[str, str] | None = None
) -> dict[str, QArray]:
    """``{name: QArray}``: the codes of every quantized activation of ``program`` on ``x``
    (:meth:`~qjax.Program.trace`, in graph order: one name each), in torch's layout
    (NHWC -> NCHW). ``flatten=(after, name)`` adds ``name``: the codes of activation
    ``after`` flattened in torch's C, H, W order (the program flattens codes without a
    step of its own; torch's ``Flatten`` is one).

    The codes are the program's own integers (no re-quantization of a float output).
    """
    trace = program.trace(np.asarray(x, np.float32))
    if len(trace) != len(names):
        raise ValueError(
            f"served_codes: {len(trace)} quantized activations {list(trace)} but "
            f"{len(names)} names {list(names)}"
        )
    out: dict[str, QArray] = {}
    for name, q in zip(names, trace.values(), strict=True):
        codes = np.asarray(q.values)
        if codes.ndim == 4:
            codes = codes.transpose(0, 3, 1, 2)
        out[name] = QArray(np.ascontiguousarray(codes), q.qparams)
        if flatten is not None and name == flatten[0]:
            flat = codes.reshape(codes.shape[0], -1)  # NCHW rows: torch's C, H, W order
            out[flatten[1]] = QArray(np.ascontiguousarray(flat), q.qparams)
    return out


def _torch_weight_hwio(name: str, w: np.ndarray) -> np.ndarray:
    if name == "fc":  # (10, 512) in C, H, W order -> qjax's (512, 10) in H, W, C order
        return w.reshape(10, 32, 4, 4).transpose(2, 3, 1, 0).reshape(512, 10)
    return w.transpose(2, 3, 1, 0)  # OIHW -> HWIO


def weight_differences(program: Program, qm) -> list[dict]:
    """Per weighted layer (conv1, conv2, fc): how many per-channel weight scales and int8
    weight codes of ``program`` (its linear / conv layers in graph order) differ from
    torch's converted model ``qm``'s (the same float weights, each side's own BN folding
    and weight observer)."""
    layers = [program.params[n][0] for n, la in program.layers.items()
              if la.op in ("linear", "conv2d", "conv1d", "conv")]  # fmt: skip
    out = []
    for name, pw in zip(("conv1", "conv2", "fc"), layers, strict=True):
        tw = getattr(qm, name).weight()
        codes = _torch_weight_hwio(name, tw.int_repr().numpy())
        if tw.qscheme() in (torch.per_channel_affine, torch.per_channel_symmetric):
            ts = tw.q_per_channel_scales().numpy()
        else:
            ts = np.array([tw.q_scale()])
        qs = np.asarray(pw.weight.qparams.scale).reshape(-1)
        ts = np.broadcast_to(ts.astype(np.float32), qs.shape)
        out.append({
            "layer": name,
            "scales": int(qs.size),
            "scale_mismatches": int((ts != qs.astype(np.float32)).sum()),
            "codes": int(codes.size),
            "code_mismatches": int((codes != np.asarray(pw.weight.values)).sum()),
        })  # fmt: skip
    return out
