"""The torch side of ``qjax demo``: the digits CNN as a torch eager model with the same
float weights, torch's own PTQ per engine, and the codes torch computes.

* :func:`torch_float_model`: QuantStub, Conv2d-BN-ReLU x2, MaxPool2d, Flatten, Linear,
  DeQuantStub (NCHW) with the qjax model's weights (the dense kernel's rows permuted from
  qjax's H, W, C flatten order to torch's C, H, W);
* :func:`torch_ptq`: ``fuse_modules`` (Conv-BN-ReLU -> ``ConvReLU2d``), ``prepare`` with
  ``get_default_qconfig(engine)``, calibration on the given batches, ``convert``;
* :func:`served_codes`: the codes a :class:`~qjax.flax.ServedModel` computes at every
  step, in torch's names and NCHW layout, to compare with ``torch_trace`` directly.
"""

from __future__ import annotations

import contextlib
import copy
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import torch
from torch import nn

from .._primitives import quantize
from .._qarray import QArray
from ..flax._serve import ServedModel, _freeze

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


def _prefix(served: ServedModel, k: int) -> ServedModel:
    steps = served.steps[: k + 1]
    return ServedModel(_freeze(steps), tuple(served.params[: k + 1]), served.input_shape)


def _out_qparams(served: ServedModel, k: int):
    for st, p in zip(served.steps[k::-1], served.params[k::-1], strict=True):
        if st["op"] == "quantize":
            return p["qp"]
        if st["op"] in ("linear", "conv"):
            return p["out_qp"]
    raise ValueError(f"served step {k} has no quantized input before it")


def served_codes(served: ServedModel, x, names) -> dict[str, QArray]:
    """The codes of every integer step of ``served`` on ``x`` (quantize, conv, max_pool,
    flatten, linear; not the final dequantize), under ``names`` (one per step, in order),
    in torch's layout: NHWC -> NCHW, and a flatten's rows in C, H, W order.

    Each step's output is the dequantized codes of the program cut after that step
    (all cuts in one jitted function); ``quantize`` with the step's own qparams gives the
    codes back exactly (``|q - zp| <= 255``, far from any rounding boundary).
    """
    ks = [k for k, s in enumerate(served.steps) if s["op"] != "dequantize"]
    if len(ks) != len(names):
        raise ValueError(f"served_codes: {len(ks)} integer steps but {len(names)} names")
    prefixes = [_prefix(served, k) for k in ks]
    ys = jax.jit(lambda x: [p.forward(x) for p in prefixes])(jnp.asarray(x))
    out: dict[str, QArray] = {}
    prev4 = None
    for k, y, name in zip(ks, ys, names, strict=True):
        qp = _out_qparams(served, k)
        codes = np.asarray(quantize(y, qp, compat="torch"))
        if codes.ndim == 4:
            prev4 = codes
            codes = codes.transpose(0, 3, 1, 2)
        elif served.steps[k]["op"] == "flatten" and prev4 is not None:
            codes = prev4.transpose(0, 3, 1, 2).reshape(codes.shape)
        out[name] = QArray(np.ascontiguousarray(codes), qp)
    return out


def _torch_weight_hwio(name: str, w: np.ndarray) -> np.ndarray:
    if name == "fc":  # (10, 512) in C, H, W order -> qjax's (512, 10) in H, W, C order
        return w.reshape(10, 32, 4, 4).transpose(2, 3, 1, 0).reshape(512, 10)
    return w.transpose(2, 3, 1, 0)  # OIHW -> HWIO


def weight_differences(served: ServedModel, qm) -> list[dict]:
    """Per weighted layer (conv1, conv2, fc): how many per-channel weight scales and int8
    weight codes of ``served`` differ from torch's converted model ``qm``'s (the same
    float weights, each side's own BN folding and weight observer)."""
    layers = [p["w"] for st, p in zip(served.steps, served.params, strict=True)
              if st["op"] in ("conv", "linear")]  # fmt: skip
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
