"""Symmetric vs asymmetric, per-tensor vs per-channel vs per-group, on trained conv weights.

Run: ``.venv/bin/python examples/weight_schemes.py`` (about 30 s of CPU time: a few
epochs of training, then the table).

The weights are real: the digits CNN of ``examples/cnn_digits.py`` (Conv-BN-ReLU x2) is
trained in float on sklearn's digits for ``epochs`` epochs, and each conv's weight is
taken *with its BatchNorm folded in* (``w·gamma/sqrt(var + eps)``, what PyTorch's
``convert`` stores and quantizes): ``conv1`` is 3x3x1x16, ``conv2`` 3x3x16x32 (Flax HWIO).
Folding scales every output channel by its own factor, which is why per-channel matters.

Each scheme takes its range from the weight's min/max (``qjax.observers.minmax``,
``compat="torch"``: torch's ``calculate_qparams``) and fake-quantizes the weight
(:func:`qjax.fake_quant`, torch's rounding rule). Errors, ``e = w - fq(w)``:

* ``MSE = mean(e²)``, ``SQNR = 10·log10(Σw² / Σe²)`` dB;
* ``max |e|`` over the weight, and the median over output channels of each channel's
  ``max |e|``, in LSB of the int8 per-tensor symmetric step (``max|w| / 127.5``, the
  qnnpack preset's): one yardstick for every row. The widest channel sets the per-tensor
  step, so every int8 scheme's worst error is about half that step (0.5); per-channel
  schemes shrink the error of the *other* channels, which the median column shows.

Every per-tensor and per-channel row (int4 too) is checked against torch at run time:
torch's own observer (``MinMaxObserver`` / ``PerChannelMinMaxObserver`` with the row's
qscheme and code range, qint8 storage) on the same weight (OIHW) must give the same
scales and zero points, and ``torch.fake_quantize_per_*_affine`` the same values, bit for
bit (column "torch =="). torch has no per-group observer ("-").
"""

from __future__ import annotations

import functools
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import torch
from _digits import data  # examples/_digits.py
from cnn_digits import make_model, train  # examples/cnn_digits.py
from flax import nnx

from qjax import QuantSpec, fake_quant, observers
from qjax._render import print_table
from qjax.flax import Mode, default_qconfig, qjax_recommended
from qjax.flax import nnx as qnnx
from qjax.flax._intsim import fold_bn

SYM = dict(signed=True, symmetric=True)
# (name, spec of a HWIO kernel, what it is)
SCHEMES = [
    ("sym per-tensor", default_qconfig("qnnpack").weight, "torch qnnpack preset weight"),
    ("sym per-channel", default_qconfig("x86").weight, "torch x86/fbgemm preset weight"),
    ("sym per-channel narrow", qjax_recommended().weight,
     "qjax_recommended; XNNPACK/TFLite conv (-127..127)"),
    ("asym per-tensor", QuantSpec(bits=8, signed=True), "no torch preset"),
    ("asym per-channel", QuantSpec(bits=8, signed=True, axis=-1), "no torch preset"),
    ("sym per-group of 8 in-ch", QuantSpec(bits=8, **SYM, axis=-1, group_size=8, group_axis=2),
     "grouped weight-only int8"),
    ("int4 sym per-channel", QuantSpec(bits=4, **SYM, axis=-1), "weight-only int4"),
    ("int4 sym per-group of 8", QuantSpec(bits=4, **SYM, axis=-1, group_size=8, group_axis=2),
     "grouped weight-only int4"),
]  # fmt: skip


def trained_conv_weights(epochs: int) -> dict[str, np.ndarray]:
    """Train the digits CNN in float; each conv's BN-folded HWIO weight (float32)."""
    t0 = time.perf_counter()
    (xtr, ytr), _ = data()
    model = make_model(nnx.Rngs(0))
    qnnx.set_mode(model, Mode.FLOAT)
    train(model, xtr, ytr, epochs, 1e-2)
    out = {}
    for name, conv in (("conv1", model.layers[1]), ("conv2", model.layers[2])):
        w, _ = fold_bn(conv.kernel[...], None, conv.bn_scale[...], conv.bn_bias[...],
                       conv.bn_mean[...], conv.bn_var[...], conv.epsilon)  # fmt: skip
        out[name] = np.asarray(w)
    print(f"trained the digits CNN for {epochs} epochs in {time.perf_counter() - t0:.1f} s")
    return out


def torch_check(w: np.ndarray, spec: QuantSpec, fq: np.ndarray, qp) -> bool | None:
    """torch's min/max observer for ``spec`` (qint8 storage, ``spec``'s code range) and its
    fake-quant on the same weight give the same qparams and values; ``None`` where torch
    has no such observer (per-group)."""
    if spec.granularity == "group":
        return None
    tw = torch.from_numpy(np.ascontiguousarray(w.transpose(3, 2, 0, 1)))  # HWIO -> OIHW
    tq = torch.ao.quantization
    bounds = dict(dtype=torch.qint8, quant_min=spec.qmin, quant_max=spec.qmax)
    if spec.granularity == "tensor":
        scheme = torch.per_tensor_symmetric if spec.symmetric else torch.per_tensor_affine
        obs = tq.MinMaxObserver(qscheme=scheme, **bounds)
    else:
        scheme = torch.per_channel_symmetric if spec.symmetric else torch.per_channel_affine
        obs = tq.PerChannelMinMaxObserver(ch_axis=0, qscheme=scheme, **bounds)
    obs(tw)
    s, zp = obs.calculate_qparams()
    if spec.granularity == "tensor":
        y = torch.fake_quantize_per_tensor_affine(tw, float(s), int(zp), spec.qmin, spec.qmax)
    else:
        y = torch.fake_quantize_per_channel_affine(tw, s, zp.int(), 0, spec.qmin, spec.qmax)
    same_qp = np.array_equal(s.numpy().ravel(), np.ravel(qp.scale)) and np.array_equal(
        zp.numpy().ravel(), np.ravel(qp.zero_point)
    )
    return same_qp and np.array_equal(y.numpy().transpose(2, 3, 1, 0), fq)


@functools.partial(jax.jit, static_argnums=1)  # one program per scheme, not many eager ops
def observe_and_fake_quant(x, spec: QuantSpec):
    """The min/max observer's qparams for ``x`` (torch's formula) and ``fq(x)``."""
    obs = observers.minmax(spec, compat="torch")
    qp = obs.qparams(obs.update(obs.init(x), x))
    # torch has no per-group fake-quant; qjax's rule differs from torch's only in where
    # the zero point is added, and the grouped specs here are symmetric (zero point 0)
    return qp, fake_quant(x, qp, compat="qjax" if spec.granularity == "group" else "torch")


def main(epochs: int | None = None) -> dict:
    """Train, quantize both convs every way; returns ``{layer: {scheme: {mse, sqnr_db,
    max_err_lsb, nbytes, torch_equal}}}`` (``torch_equal`` None where no torch preset)."""
    epochs = int(os.environ.get("QJAX_EXAMPLE_EPOCHS", 4)) if epochs is None else epochs
    weights = trained_conv_weights(epochs)
    results, rows = {}, []
    for layer, w in weights.items():
        x = jnp.asarray(w)
        yardstick = float(np.abs(w).max()) / 127.5
        results[layer] = {}
        for name, spec, preset in SCHEMES:
            if spec.group_size is not None and w.shape[2] % spec.group_size:
                continue  # conv1 has one input channel: nothing to group
            qp, fq = observe_and_fake_quant(x, spec)
            fq = np.asarray(fq)
            e = w.astype(np.float64) - fq
            per_out = np.abs(e).reshape(-1, w.shape[-1]).max(0) / yardstick
            r = {
                "mse": float(np.mean(e**2)),
                "sqnr_db": float(10 * np.log10(np.sum(w.astype(np.float64) ** 2) / np.sum(e**2))),
                "max_err_lsb": float(per_out.max()),
                "median_channel_max_err_lsb": float(np.median(per_out)),
                "qparams": int(np.size(qp.scale)),
                "torch_equal": torch_check(w, spec, fq, qp),
            }
            results[layer][name] = r
            rows.append(
                [
                    layer,
                    name,
                    r["qparams"],
                    r["mse"],
                    round(r["sqnr_db"], 2),
                    round(r["max_err_lsb"], 3),
                    round(r["median_channel_max_err_lsb"], 3),
                    {None: "-", True: "yes", False: "NO"}[r["torch_equal"]],
                    preset,
                ]
            )
    print_table(
        f"Weight quantization of the trained digits CNN's BN-folded conv weights ({epochs} "
        "epochs); errors in LSB of the int8 per-tensor symmetric step",
        ["layer", "scheme", "qparams", "MSE", "SQNR dB", "max |e|", "median channel max |e|",
         "torch ==", "is"],
        rows,
    )  # fmt: skip
    for layer, r in results.items():
        gain = r["sym per-channel"]["sqnr_db"] - r["sym per-tensor"]["sqnr_db"]
        print(f"{layer}: per-channel gains {gain:.1f} dB over per-tensor (symmetric int8)")
    return results


if __name__ == "__main__":
    main()
