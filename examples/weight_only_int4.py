"""Weight-only int4 (per-channel and per-group) vs int8 vs float on a digits MLP.

Run: ``.venv/bin/python examples/weight_only_int4.py`` (about 30 s of CPU time).

A float MLP (64-256-128-10, ``nnx.Linear``, ReLU) is trained on sklearn's 8x8 digits;
each ``Linear`` is then replaced by :class:`qjax.flax.nnx.WeightOnlyLinear`
(``from_linear``): the kernel is stored as int8 codes, or as int4 codes packed two per
byte along the input axis (:func:`qjax.flax._ptq.pack_int4`), plus float32 scales and
int32 zero points per output channel, or per group of ``group`` input rows and output
channel; the layer computes ``x @ dequantize(w) + b`` in float (weights shrink, the
matmul stays float). Weights are symmetric (``scale = max|w| / qmax`` over the channel or
group, ``qjax`` formula).

Printed per scheme: test accuracy, bytes of stored weights (codes + scales + zero points,
biases excluded, as ``WeightOnlyLinear.nbytes``) against the float32 kernels, the
largest weight error ``max |w - dequantize(q)|`` and its ratio to the largest weight,
and the largest logit difference from the float model. The int4 storage is checked:
unpacking the stored bytes gives back exactly the codes ``quantize(w)`` produced, and
``unpack_int4(pack_int4(q)) == q`` for every code of ``[-8, 7]``.
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from _digits import accuracy, data, minibatches  # examples/_digits.py
from flax import nnx

from qjax import QuantSpec, dequantize
from qjax.flax import _ptq
from qjax.flax import nnx as qnnx

SYM = dict(signed=True, symmetric=True, axis=-1)  # per output channel of an (in, out) kernel


def schemes(group: int) -> dict[str, QuantSpec]:
    return {
        "int8 per-channel": QuantSpec(bits=8, **SYM),
        "int4 per-channel": QuantSpec(bits=4, **SYM),
        f"int4 per-group of {group}": QuantSpec(bits=4, **SYM, group_size=group, group_axis=0),
    }


class MLP(nnx.Module):
    def __init__(self, layers):
        self.layers = nnx.List(layers)

    def __call__(self, x):
        x = x.reshape(x.shape[0], -1)
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                x = jax.nn.relu(x)
        return x


def train_float(epochs: int, widths=(64, 256, 128, 10)) -> MLP:
    (xtr, ytr), _ = data()
    rngs = nnx.Rngs(0)
    model = MLP([nnx.Linear(a, b, rngs=rngs) for a, b in zip(widths[:-1], widths[1:], strict=True)])
    opt = nnx.Optimizer(model, optax.adam(3e-3), wrt=nnx.Param)

    @nnx.jit
    def step(model, opt, xb, yb):
        def loss_fn(m):
            return optax.softmax_cross_entropy_with_integer_labels(m(xb), yb).mean()

        opt.update(model, nnx.grad(loss_fn)(model))

    for b in minibatches(len(xtr), epochs):
        step(model, opt, jnp.asarray(xtr[b]), jnp.asarray(ytr[b]))
    return model


def check_packing(kernels, spec: QuantSpec, layers) -> int:
    """Unpacked stored codes == freshly quantized codes; returns the codes compared."""
    n = 0
    quantize = jax.jit(_ptq.quantize_weight, static_argnums=1)
    for k, wo in zip(kernels, layers, strict=True):
        want = quantize(k, spec).values
        got = _ptq.unpack_weight(wo.weight.get_value(), spec).values
        if not np.array_equal(np.asarray(got), np.asarray(want)):
            raise AssertionError(f"int4 storage round trip changed codes ({spec})")
        n += want.size
    every = jnp.arange(-8, 8, dtype=jnp.int8).reshape(2, 8)
    if not np.array_equal(_ptq.unpack_int4(_ptq.pack_int4(every)), every):
        raise AssertionError("unpack_int4(pack_int4(q)) != q")
    return n


def weight_error(kernel, pw: _ptq.PackedWeight, spec: QuantSpec):
    """``(max |w - dequantize(q)|, Σ (w - dequantize(q))²)`` of one stored kernel."""
    w = _ptq.unpack_weight(pw, spec)
    d = kernel - dequantize(w.values, w.qparams)
    return jnp.abs(d).max(), jnp.sum(d**2)


def main(epochs: int = 20, group: int = 32) -> dict:
    """Returns ``{scheme: {accuracy, nbytes, max_weight_err, weight_mse, rel_weight_err,
    max_logit_diff}}`` (``"float"`` too), plus ``"codes_checked"``."""
    t0 = time.perf_counter()
    _, (xte, yte) = data()
    x = jnp.asarray(xte)
    model = train_float(epochs)
    logits = model(x)
    float_bytes = sum(int(lin.kernel[...].nbytes) for lin in model.layers)
    out = {"float": {"accuracy": accuracy(logits, yte), "nbytes": float_bytes}}
    checked = 0
    kernels = [lin.kernel[...] for lin in model.layers]
    biases = [lin.bias[...] for lin in model.layers]
    wmax = max(float(jnp.abs(k).max()) for k in kernels)
    forward = nnx.jit(lambda m, x: m(x))
    for name, spec in schemes(group).items():
        # one compiled program per layer shape, instead of many small eager ones
        build = nnx.jit(lambda k, b, spec=spec: qnnx.WeightOnlyLinear(k, b, spec=spec))
        layers = [build(k, b) for k, b in zip(kernels, biases, strict=True)]
        err_fn = jax.jit(weight_error, static_argnums=2)
        errs = [
            err_fn(k, wo.weight.get_value(), spec) for k, wo in zip(kernels, layers, strict=True)
        ]
        err = [float(e) for e, _ in errs]
        sq, count = sum(float(s) for _, s in errs), sum(k.size for k in kernels)
        ql = forward(MLP(layers), x)
        out[name] = {
            "accuracy": accuracy(ql, yte),
            "nbytes": sum(wo.nbytes for wo in layers),
            "max_weight_err": max(err),
            "weight_mse": sq / count,
            "rel_weight_err": max(err) / wmax,
            "max_logit_diff": float(jnp.abs(ql - logits).max()),
        }
        if spec.bits == 4:
            checked += check_packing(kernels, spec, layers)
    out["codes_checked"] = checked

    print(f"digits MLP 64-256-128-10 ({len(yte)} test images), weight-only quantization")
    print(
        f"  {'scheme':22s} {'accuracy':>8s} {'weight bytes':>12s} {'vs f32':>7s} "
        f"{'max |dw|':>9s} {'/max|w|':>8s} {'max |dlogit|':>12s}"
    )
    for name, r in out.items():
        if name == "codes_checked":
            continue
        extra = (
            f" {r['max_weight_err']:9.4f} {r['rel_weight_err']:8.4f} {r['max_logit_diff']:12.4f}"
            if "max_weight_err" in r
            else ""
        )
        print(
            f"  {name:22s} {100 * r['accuracy']:7.1f}% {r['nbytes']:12d} "
            f"{float_bytes / r['nbytes']:6.2f}x{extra}"
        )
    print(
        f"int4 storage round trip: {checked} codes unpacked == quantized codes; "
        f"({time.perf_counter() - t0:.0f} s)"
    )
    return out


if __name__ == "__main__":
    main()
