"""The forum report "fake-quant gives 0..255, the converted model 0..254 with 127 twice".

An identity 1x1 Conv-ReLU (weight k·I, bias 0) is prepared for QAT with fused
fake-quant (``FusedMovingAvgObsFakeQuantize``: affine quint8 activations, per-tensor
symmetric qint8 weight), observed on inputs 0/255..255/255, and converted. The QAT
model maps input code c to output code c; the converted model loses bin 255 and outputs
127 for both 127 and 128.

qjax imports the converted model, reproduces torch's integers exactly (so the
requantization is not at fault), compares the int8 program with the QAT model's
fake-quant codes layer by layer and names the cause: NUMERICS.md rule 9 (the fused QAT
weight fake-quant fell back to affine, scale k/255, so k was exact while training)
against rule 6 (``convert()`` stores scale 2k/255, so k is 127.5 steps and is stored as
127). A narrow symmetric weight range [-127, 127] (scale k/127) is the fix: the same
pipeline then gives the identity, on every engine.

Run: ``python examples/identity_conv_report.py``.
"""

from __future__ import annotations

import warnings

import numpy as np
import torch
from qjax.converters.torch import import_model
from torch import nn
from torch.ao import quantization as tq

import qjax


class IdentityConv(nn.Module):
    """QuantStub -> Conv2d(3, 3, 1) + ReLU -> DeQuantStub, as in the report."""

    def __init__(self, k: float):
        super().__init__()
        self.quant = tq.QuantStub()
        self.conv = nn.Conv2d(3, 3, 1)
        self.act = nn.ReLU()
        self.dequant = tq.DeQuantStub()
        with torch.no_grad():
            self.conv.weight.copy_(k * torch.eye(3).reshape(3, 3, 1, 1))
            self.conv.bias.zero_()

    def forward(self, x):
        return self.dequant(self.act(self.conv(self.quant(x))))


def qconfig(weight_quant_min: int) -> tq.QConfig:
    """The report's qconfig: fused fake-quant, affine quint8 activations, symmetric weight."""
    fq = tq.FusedMovingAvgObsFakeQuantize
    act = fq.with_args(
        observer=tq.MovingAverageMinMaxObserver,
        quant_min=0,
        quant_max=255,
        dtype=torch.quint8,
        qscheme=torch.per_tensor_affine,
    )
    weight = fq.with_args(
        observer=tq.MovingAverageMinMaxObserver,
        quant_min=weight_quant_min,
        quant_max=127,
        dtype=torch.qint8,
        qscheme=torch.per_tensor_symmetric,
    )
    return tq.QConfig(activation=act, weight=weight)


def build(k: float, x: torch.Tensor, weight_quant_min: int = -128):
    """(QAT model with observers frozen, converted int8 model) for weight ``k·I``."""
    torch.backends.quantized.engine = "fbgemm"
    model = IdentityConv(k).eval()
    model.qconfig = qconfig(weight_quant_min)
    tq.fuse_modules(model, [["conv", "act"]], inplace=True)
    prepared = tq.prepare_qat(model.train())
    prepared(x)  # the observers see the data once
    prepared.apply(tq.disable_observer).eval()
    return prepared, tq.convert(prepared)


def fake_quant_codes(prepared: nn.Module, x: torch.Tensor, names) -> dict[str, np.ndarray]:
    """The QAT model's activation codes ``rint(y/s) + zp`` under the program's layer names.

    Forward hooks run after the fake-quant hook ``prepare_qat`` installed, so they see
    the fake-quantized output. A layer without its own fake-quant (the ReLU fused away
    into an Identity) repeats its input's codes.
    """
    seen: dict[str, torch.Tensor] = {}
    hooks = [
        prepared.get_submodule(n).register_forward_hook(
            lambda m, i, o, n=n: seen.__setitem__(n, o.detach())
        )
        for n in names
    ]
    with torch.no_grad():
        prepared(x)
    for h in hooks:
        h.remove()
    out, prev = {}, None
    for n in names:
        fq = getattr(prepared.get_submodule(n), "activation_post_process", None)
        if fq is None:
            out[n] = prev
            continue
        s, zp = float(fq.scale), int(fq.zero_point)
        out[n] = prev = (np.round(seen[n].numpy().astype(np.float64) / s) + zp).astype(np.int64)
    return out


def _row_summary(codes: np.ndarray) -> str:
    r = codes[0, 0, 0]
    return " ".join(map(str, r[125:131])) + f" ... {r[-1]} (distinct {np.unique(r).size})"


def main(k: float = 1.0, rows: int = 4) -> dict:
    """Run the report end to end; print the parity report and return its numbers."""
    warnings.filterwarnings("ignore", category=UserWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    torch.set_num_threads(1)
    x = (torch.arange(256, dtype=torch.float32) / 255).repeat(1, 3, rows, 1)
    prepared, converted = build(k, x)
    program = import_model(converted, (x,), engine="fbgemm")
    names = list(program.trace(x))

    vs_torch = qjax.parity.compare(converted, program, x, engine="fbgemm")
    print(
        f"qjax vs the converted torch model: {vs_torch.mismatches} of {vs_torch.values} "
        "integers differ (the int8 arithmetic is reproduced exactly)\n"
    )

    ref = fake_quant_codes(prepared, x, names)
    report = qjax.parity.compare(
        None, program, x, reference=ref, reference_kind="fake_quant", engine="fbgemm"
    )
    report.print()
    conv = program.trace(x)["conv"]
    w = program.params["conv"][0].weight
    print(
        f"\nstored weight codes {np.unique(np.asarray(w.values)).tolist()} "
        f"scale {float(w.scale):.6g} = 2k/255 -> k stored as {127 * float(w.scale):.6g}"
    )
    print(f"QAT (fake-quant) row: {_row_summary(ref['conv'])}")
    print(f"converted / qjax row: {_row_summary(np.asarray(conv.values))}\n")

    engines = {}
    for engine in ("fbgemm", "qnnpack", "tflite", "exact"):
        p = program if engine == "fbgemm" else import_model(converted, (x,), engine=engine)
        codes = np.asarray(p.trace(x)["conv"].values)
        engines[engine] = (int(codes.min()), int(codes.max()), int(np.unique(codes).size))
    print("the stored weight on every engine (min, max, distinct codes):", engines)

    prepared_n, converted_n = build(k, x, weight_quant_min=-127)
    program_n = import_model(converted_n, (x,), engine="fbgemm")
    ref_n = fake_quant_codes(prepared_n, x, names)
    fixed = qjax.parity.compare(
        None, program_n, x, reference=ref_n, reference_kind="fake_quant", engine="fbgemm"
    )
    fixed_torch = qjax.parity.compare(converted_n, program_n, x, engine="fbgemm")
    conv_n = np.asarray(program_n.trace(x)["conv"].values)
    wn = program_n.params["conv"][0].weight
    print(
        f"\nfix: narrow weight range [-127, 127]: scale {float(wn.scale):.6g} = k/127, "
        f"codes {np.unique(np.asarray(wn.values)).tolist()}; QAT vs int8: "
        f"{fixed.mismatches} of {fixed.values} differ; torch vs qjax: "
        f"{fixed_torch.mismatches}; row: {_row_summary(conv_n)}"
    )
    fixed_engines = {}
    for engine in ("fbgemm", "qnnpack", "tflite", "exact"):
        p = program_n if engine == "fbgemm" else import_model(converted_n, (x,), engine=engine)
        codes = np.asarray(p.trace(x)["conv"].values)
        fixed_engines[engine] = bool(np.array_equal(codes[0, 0, 0], np.arange(256)))
    print("identity on every engine with the narrow weight:", fixed_engines)
    return {
        "vs_torch": vs_torch,
        "report": report,
        "fixed": fixed,
        "fixed_vs_torch": fixed_torch,
        "engines": engines,
        "fixed_engines": fixed_engines,
        "weight_codes": np.unique(np.asarray(w.values)).tolist(),
        "fixed_weight_codes": np.unique(np.asarray(wn.values)).tolist(),
    }


if __name__ == "__main__":
    main()
