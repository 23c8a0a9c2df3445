"""Import a torchao pt2e quantized model into JAX and check it against torch, layer by layer.

Run: ``.venv/bin/python examples/pt2e_import.py`` (about 20 s of CPU time).

1. A small torch CNN (conv-ReLU x2, max pool, linear) is trained in float on sklearn's
   8x8 digits for a few seconds (``torch``, NCHW).
2. torchao's pt2e flow: ``torch.export`` -> ``prepare_pt2e`` with the XNNPACK quantizer
   (int8 symmetric per-channel weights, int8 affine activations) -> calibration on the
   training images -> ``convert_pt2e``: a q/dq ATen graph.
3. :func:`qjax.converters.pt2e.import_pt2e` turns the graph into a jitted qjax program
   (``mode="integer"``: conv and linear run int8 x int8 -> int32 with the ``fbgemm``
   requantization; ``mode="reference"``: dequantize -> float op -> quantize, as the
   graph says).
4. Every ``quantize_per_tensor`` node's codes are compared with torch's (torch runs the
   converted graph; :func:`qjax.parity.compare_traces` counts mismatches and names likely
   causes) on the test images, end to end (mismatches downstream of an earlier one are
   marked as carried over), and the outputs are compared (max |difference|, argmax
   agreement, accuracy on both sides).

What to expect (``qjax.converters.pt2e``'s docstring, NUMERICS.md rule 5): q nodes after
elementwise ops, max pooling and data movement are bit-exact; after a conv or linear,
torch sums in float32 and qjax in exact int32 (or float in another order), so a code
next to a rounding tie moves by 1 LSB now and then: a small fraction of codes, at most
1 LSB per layer where the layer's input agrees.
"""

from __future__ import annotations

import time
import warnings

import numpy as np
import torch
from _digits import data  # examples/_digits.py
from qjax.converters.pt2e import import_pt2e
from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

from qjax.parity import compare_traces


class CNN(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = torch.nn.Conv2d(1, 8, 3, padding=1)
        self.c2 = torch.nn.Conv2d(8, 16, 3)
        self.fc = torch.nn.Linear(16 * 3 * 3, 10)

    def forward(self, x):
        y = torch.relu(self.c1(x))
        y = torch.nn.functional.max_pool2d(torch.relu(self.c2(y)), 2)
        return self.fc(torch.flatten(y, 1))


def train_torch(x, y, epochs: int) -> CNN:
    torch.manual_seed(0)
    model = CNN()
    opt = torch.optim.Adam(model.parameters(), 1e-2)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y).long()
    gen = torch.Generator().manual_seed(0)
    for _ in range(epochs):
        for b in torch.randperm(len(xt), generator=gen).split(64):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(xt[b]), yt[b]).backward()
            opt.step()
    return model.eval()


def quantize_pt2e(model: CNN, x_cal: np.ndarray, x_example):
    """torchao pt2e: export, prepare with the XNNPACK quantizer, calibrate, convert.

    The export is static: the program takes batches of ``x_example``'s size, and the
    calibration runs the training images in chunks of that size."""
    from torchao.testing.pt2e._xnnpack_quantizer import (
        XNNPACKQuantizer,
        get_symmetric_quantization_config,
    )

    quantizer = XNNPACKQuantizer().set_global(get_symmetric_quantization_config(True))
    gm = prepare_pt2e(torch.export.export(model, x_example).module(), quantizer)
    with torch.no_grad():
        n = len(x_example[0])
        for i in range(0, len(x_cal) - n + 1, n):
            gm(torch.from_numpy(x_cal[i : i + n]))
    return convert_pt2e(gm)


def torch_codes(gm, x: torch.Tensor):
    """torch's codes of every quantize node of the converted graph, and its output."""
    codes = {}

    class Recorder(torch.fx.Interpreter):
        def run_node(self, n):
            r = super().run_node(n)
            t = str(n.target)
            if "quantize_per_tensor" in t and "dequantize" not in t:
                codes[n.name] = r.numpy().copy()
            return r

    with torch.no_grad():
        out = Recorder(gm).run(x)
    return codes, out.numpy()


def main(epochs: int = 8, test_images: int | None = None) -> dict:
    """Returns ``{mode: {"report": ParityReport, "max_out_diff", "argmax_agree",
    "acc_qjax"}}`` for ``"integer"`` and ``"reference"``, plus ``"acc_torch"`` and
    ``"acc_float"``."""
    t0 = time.perf_counter()
    (xtr, ytr), (xte, yte) = data()
    nchw = lambda a: np.ascontiguousarray(a.transpose(0, 3, 1, 2))  # noqa: E731
    xtr, xte = nchw(xtr), nchw(xte)[:test_images]
    yte = yte[:test_images]
    torch.set_num_threads(1)
    model = train_torch(xtr, ytr, epochs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torchao's deprecation notes on the quantizer
        gm = quantize_pt2e(model, xtr, (torch.from_numpy(xte),))
    with torch.no_grad():
        acc_float = float((model(torch.from_numpy(xte)).argmax(1).numpy() == yte).mean())
    ref, tout = torch_codes(gm, torch.from_numpy(xte))
    out = {"acc_float": acc_float, "acc_torch": float((tout.argmax(1) == yte).mean())}
    for mode in ("integer", "reference"):
        program = import_pt2e(gm, (torch.from_numpy(xte),), mode=mode)
        qout = np.asarray(program(xte))
        report = compare_traces(ref, program.trace(xte), program=program, inputs=(xte,))
        out[mode] = {
            "report": report,
            "max_out_diff": float(np.abs(qout - tout).max()),
            "argmax_agree": float((qout.argmax(1) == tout.argmax(1)).mean()),
            "acc_qjax": float((qout.argmax(1) == yte).mean()),
        }
        report.print()
        r = out[mode]
        print(
            f"mode={mode!r}: outputs max |qjax - torch| = {r['max_out_diff']:.3g}, argmax "
            f"agrees on {100 * r['argmax_agree']:.1f}% of {len(yte)} images; accuracy torch "
            f"{100 * out['acc_torch']:.1f}%, qjax {100 * r['acc_qjax']:.1f}% "
            f"(float model {100 * acc_float:.1f}%)\n"
        )
    print(f"({time.perf_counter() - t0:.0f} s)")
    return out


if __name__ == "__main__":
    main()
