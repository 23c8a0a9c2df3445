"""Random small torch models, quantized with eager ``convert`` or FX ``convert_fx``.

Used by the importer tests (``test_converters_torch.py``). Each family draws its
structure from a numpy generator: layer sizes, activations (ReLU, ReLU6, Hardtanh, none),
fused or not, residual add / add_relu / mul / cat, pools, dropout, and the qconfig
(engine default, reduce_range on/off, per-tensor or per-channel weights).
"""

from __future__ import annotations

import warnings

import numpy as np
import torch
import torch.ao.nn.quantized as nnq
import torch.nn.functional as F
from torch import nn
from torch.ao.quantization import (
    DeQuantStub,
    MinMaxObserver,
    PerChannelMinMaxObserver,
    QConfig,
    QConfigMapping,
    QuantStub,
    convert,
    fuse_modules,
    get_default_qconfig,
    prepare,
)
from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

ACTS = ("relu", "relu6", "hardtanh", None)
BLOCKS = ("add", "add_relu", "cat", "dw", "none")
POOLS = ("max", "avg", "adaptive", "avg_pad")


def _act(name):
    if name == "relu":
        return nn.ReLU()
    if name == "relu6":
        return nn.ReLU6()
    if name == "hardtanh":
        return nn.Hardtanh(-0.7, 1.3)
    return nn.Identity()


class MLP(nn.Module):
    """Quant -> [Linear -> act] x depth (-> dropout) -> Linear -> (mul by itself) -> DeQuant."""

    def __init__(self, rng, fx_mode: bool):
        super().__init__()
        dims = [int(v) for v in rng.choice([3, 8, 16, 24, 32], 4)]
        depth = int(rng.integers(1, 4))
        self.in_features = dims[0]
        self.q, self.dq = QuantStub(), DeQuantStub()
        self.fcs = nn.ModuleList()
        self.acts = nn.ModuleList()
        self.act_names = []
        for i in range(depth):
            self.fcs.append(nn.Linear(dims[i], dims[i + 1], bias=bool(rng.random() < 0.8)))
            name = ACTS[int(rng.integers(0, 4))]
            self.act_names.append(name)
            self.acts.append(_act(name))
        self.drop = nn.Dropout(0.2)
        self.head = nn.Linear(dims[depth], int(rng.integers(2, 11)))
        self.square = bool(rng.random() < 0.3)
        self.ff = nnq.FloatFunctional()
        self.fx_mode = fx_mode

    def fuse_pairs(self):
        return [[f"fcs.{i}", f"acts.{i}"] for i, a in enumerate(self.act_names) if a == "relu"]

    def example(self, gen, n):
        return torch.randn(n, self.in_features, generator=gen) * 2

    def forward(self, x):
        x = self.q(x)
        for fc, act in zip(self.fcs, self.acts, strict=True):
            x = act(fc(x))
        x = self.head(self.drop(x))
        if self.square:
            x = torch.mul(x, x) if self.fx_mode else self.ff.mul(x, x)
        return self.dq(x)


class CNN(nn.Module):
    """Quant -> conv (+act) -> [depthwise / residual add / cat branch] -> pool -> flatten
    -> linear -> DeQuant."""

    def __init__(self, rng, fx_mode: bool, block=None, pool=None, width=None, dw=None):
        super().__init__()
        self.fx_mode = fx_mode
        self.c_in = int(rng.integers(1, 5))
        self.hw = (int(rng.integers(5, 10)), int(rng.integers(5, 10)))
        c = width or int(rng.choice([4, 6, 8, 16]))
        k = int(rng.choice([1, 3]))
        self.q, self.dq = QuantStub(), DeQuantStub()
        self.stem = nn.Conv2d(self.c_in, c, k, padding=k // 2, stride=int(rng.choice([1, 1, 2])))
        self.stem_act_name = ACTS[int(rng.integers(0, 3))]
        self.stem_act = _act(self.stem_act_name)
        self.block = block or str(rng.choice(BLOCKS))
        dw = bool(c % 8 == 0 and rng.random() < 0.7) if dw is None else dw
        self.b1 = nn.Conv2d(c, c, 3, padding=1, groups=c if dw else 1)
        self.b1_relu = nn.ReLU()
        self.b2 = nn.Conv2d(c, c, 1, bias=bool(rng.random() < 0.7))
        self.ff = nnq.FloatFunctional()
        self.pool_kind = pool or str(rng.choice(POOLS))
        if self.pool_kind == "max":
            self.pool = nn.MaxPool2d(2, ceil_mode=bool(rng.random() < 0.3))
        elif self.pool_kind == "avg":
            self.pool = nn.AvgPool2d(2, count_include_pad=False)
        elif self.pool_kind == "avg_pad":
            self.pool = nn.AvgPool2d(3, stride=2, padding=1)
        else:
            self.pool = nn.AdaptiveAvgPool2d(int(rng.choice([1, 2])))
        with torch.no_grad():
            feat = self._features(torch.zeros(1, self.c_in, *self.hw), quant=False).shape[1]
        self.fc = nn.Linear(feat, int(rng.integers(2, 8)))

    def fuse_pairs(self):
        pairs = [["b1", "b1_relu"]]
        if self.stem_act_name == "relu":
            pairs.append(["stem", "stem_act"])
        return pairs

    def example(self, gen, n):
        return torch.randn(n, self.c_in, *self.hw, generator=gen)

    def _features(self, x, quant=True):
        y = self.stem_act(self.stem(x))
        if self.block == "none":
            z = y
        elif self.block == "dw":
            z = self.b2(self.b1_relu(self.b1(y)))
        else:
            b = self.b2(self.b1_relu(self.b1(y)))
            if self.block == "cat":
                z = torch.cat([y, b], 1) if self.fx_mode or not quant else self.ff.cat([y, b], 1)
            elif self.block == "add_relu":
                if self.fx_mode or not quant:
                    z = F.relu(torch.add(y, b))
                else:
                    z = self.ff.add_relu(y, b)
            else:
                z = torch.add(y, b) if self.fx_mode or not quant else self.ff.add(y, b)
        z = self.pool(z)
        return torch.flatten(z, 1) if self.fx_mode else z.reshape(z.size(0), -1)

    def forward(self, x):
        x = self.q(x)
        x = self._features(x)
        x = self.fc(x)
        return self.dq(x)


class Conv1dNet(nn.Module):
    """Quant -> Conv1d (+relu) -> Conv1d (strided, grouped) -> flatten -> Linear -> DeQuant."""

    def __init__(self, rng, fx_mode: bool):
        super().__init__()
        self.c_in = int(rng.integers(1, 5))
        self.length = int(rng.integers(8, 20))
        c = int(rng.choice([2, 4, 6]))
        self.q, self.dq = QuantStub(), DeQuantStub()
        self.c1 = nn.Conv1d(self.c_in, c, int(rng.integers(1, 5)), padding=int(rng.integers(0, 2)))
        self.r1 = nn.ReLU()
        self.c2 = nn.Conv1d(c, c, 3, stride=2, groups=int(rng.choice([1, 2])), dilation=1)
        with torch.no_grad():
            n = self.c2(self.c1(torch.zeros(1, self.c_in, self.length))).numel()
        self.fc = nn.Linear(n, int(rng.integers(2, 8)))

    def fuse_pairs(self):
        return [["c1", "r1"]]

    def example(self, gen, n):
        return torch.randn(n, self.c_in, self.length, generator=gen)

    def forward(self, x):
        x = self.c2(self.r1(self.c1(self.q(x))))
        return self.dq(self.fc(torch.flatten(x, 1)))


FAMILIES = {"mlp": MLP, "cnn": CNN, "conv1d": Conv1dNet}


def qconfig(engine: str, variant: str) -> QConfig:
    """``"default"``: torch's default for ``engine``; ``"wide"``: reduce_range off (codes up
    to 255), per-channel weights; ``"per_tensor"``: per-tensor symmetric weights;
    ``"affine_w"``: per-tensor affine weights (non-zero zero points); the last two with
    reduce_range on (``"qnnpack"``: off)."""
    if variant == "default":
        return get_default_qconfig(engine)
    act_rr = variant != "wide" and engine != "qnnpack"
    act = MinMaxObserver.with_args(dtype=torch.quint8, reduce_range=act_rr)
    if variant == "wide":
        w = PerChannelMinMaxObserver.with_args(
            dtype=torch.qint8, qscheme=torch.per_channel_symmetric
        )
    elif variant == "affine_w":
        w = MinMaxObserver.with_args(dtype=torch.qint8, qscheme=torch.per_tensor_affine)
    else:
        w = MinMaxObserver.with_args(dtype=torch.qint8, qscheme=torch.per_tensor_symmetric)
    return QConfig(activation=act, weight=w)


def build(
    family: str, seed: int, engine: str, variant: str, mode: str, fuse: bool = True, **options
):
    """A calibrated, converted model, its example input and a description.

    ``mode``: ``"eager"`` (``fuse_modules`` when ``fuse``, ``prepare``, calibrate,
    ``convert``) or ``"fx"`` (``prepare_fx``/``convert_fx``, which fuses by itself). The
    torch engine must already be set to ``engine``.
    """
    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    model = FAMILIES[family](rng, mode == "fx", **options).eval()
    calib = model.example(gen, 32)
    x = model.example(gen, int(rng.integers(1, 5)))
    qc = qconfig(engine, variant)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if mode == "eager":
            if fuse and model.fuse_pairs():
                fuse_modules(model, model.fuse_pairs(), inplace=True)
            model.qconfig = qc
            p = prepare(model)
            p(calib)
            q = convert(p)
        else:
            p = prepare_fx(model, QConfigMapping().set_global(qc), (calib,))
            p(calib)
            q = convert_fx(p)
    return q, x
