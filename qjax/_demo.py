"""``qjax demo``: a short tour of what qjax computes, with PyTorch checked at run time.

The tour covers, in order: how each observer picks a range on skewed data (and the
error that range gives), how the compat modes differ on the weight of the identity
1x1 conv from the forum report (NUMERICS.md), bit-exact parity with torch's quantize /
fake-quant over ``size`` values including exact ties, and a few steps of QAT with
learnable (LSQ) scales under optax.
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np

from . import observers
from ._primitives import dequantize, fake_quant, quantize
from ._qparams import qparams_from_minmax
from ._spec import QParams, QuantSpec


def _table(title: str, header: list[str], rows: list[list[object]]) -> str:
    cells = [header] + [[_fmt(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    line = "  ".join("-" * w for w in widths)
    out = [title, line, "  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)), line]
    out += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in cells[1:]]
    return "\n".join(out + [line])


def _fmt(v: object) -> str:
    if isinstance(v, float):
        return f"{v:.6g}"
    return str(v)


def sqnr_db(x: jax.Array, y: jax.Array) -> float:
    """Signal-to-quantization-noise ratio ``10·log10(Σx² / Σ(x-y)²)`` in dB."""
    noise = float(jnp.sum((x - y) ** 2))
    return float("inf") if noise == 0 else 10.0 * float(np.log10(float(jnp.sum(x**2)) / noise))


def _observer_tour(rng: np.random.Generator) -> str:
    # Post-ReLU activations with a heavy tail: min/max is dominated by a few outliers.
    batches = [
        np.maximum(rng.standard_t(3, size=(64, 256)), 0).astype(np.float32) for _ in range(8)
    ]
    spec = QuantSpec(bits=8, signed=False)
    candidates = {
        "minmax": observers.minmax(spec),
        "ema_minmax": observers.ema_minmax(spec),
        "histogram (L2)": observers.histogram(spec),
        "percentile 99.9": observers.percentile(spec, percentile=99.9),
        "mse": observers.mse(spec),
    }
    x_all = jnp.asarray(np.concatenate(batches))
    rows = []
    for name, obs in candidates.items():
        update = jax.jit(obs.update)
        state = obs.init(x_all[:64])
        for b in batches:
            state = update(state, jnp.asarray(b))
        qp = obs.qparams(state)
        y = fake_quant(x_all, qp)
        hi = float(qp.scale) * (spec.qmax - int(qp.zero_point))
        rows.append([name, hi, float(qp.scale), int(qp.zero_point), sqnr_db(x_all, y)])
    return _table(
        "Observers on heavy-tailed post-ReLU activations (uint8, 8 batches)",
        ["observer", "range max", "scale", "zero point", "SQNR dB"],
        rows,
    )


def _compat_tour() -> str:
    # The identity 1x1 conv of the forum report: weight k·I, observed range [0, k].
    k = 0.75
    w = jnp.asarray(np.eye(4, dtype=np.float32) * k)
    spec = QuantSpec(bits=8, signed=True, symmetric=True)
    rows = []
    for compat in ("qjax", "torch", "torch_fused", "tflite"):
        qp = qparams_from_minmax(jnp.min(w), jnp.max(w), spec, compat=compat)
        q = quantize(w, qp)
        back = float(jnp.max(dequantize(q, qp)))
        rows.append([compat, float(qp.scale), int(qp.zero_point), int(jnp.max(q)), back, back == k])
    return _table(
        f"qparams of the identity-conv weight k·I, k={k} (int8 symmetric spec)",
        ["compat", "scale", "zero point", "code of k", "k after round trip", "exact"],
        rows,
    )


def _parity_tour(size: int, rng: np.random.Generator) -> str:
    try:
        import torch
    except ImportError:
        return "torch is not installed: parity checks skipped (pip install 'qjax[torch]')"
    import warnings

    warnings.filterwarnings("ignore", message=".*quantized tensor creation.*")
    rows = []
    for scale, zp in ((0.0235, 3), (1 / 3, 128), (2.0**-7, 77)):
        s = np.float32(scale)
        k = rng.integers(-400, 400, size // 2)
        ties = ((k + 0.5) * s).astype(np.float32)  # exact .5 ties before the zero point
        x = np.concatenate([rng.standard_normal(size - ties.size).astype(np.float32) * 2, ties])
        xt, xj = torch.from_numpy(x), jnp.asarray(x)
        qp = QParams(scale=s, zero_point=zp, spec=QuantSpec(signed=False))
        t_q = torch.quantize_per_tensor(xt, float(s), zp, torch.quint8).int_repr().numpy()
        j_q = np.asarray(quantize(xj, qp, compat="torch"))
        t_f = torch.fake_quantize_per_tensor_affine(xt, float(s), zp, 0, 255).numpy()
        j_f = np.asarray(fake_quant(xj, qp, compat="torch"))
        own = np.asarray(quantize(xj, qp))
        rows.append(
            [
                f"s={float(s):.6g} zp={zp}",
                x.size,
                int((t_q != j_q).sum()),
                int((t_f.view(np.int32) != j_f.view(np.int32)).sum()),
                int((own != t_q).sum()),
            ]
        )
    return _table(
        "Bit-exact parity with torch 2.13 (values incl. 50% exact ties)",
        [
            "qparams",
            "values",
            "quantize_per_tensor mismatches",
            "fake_quantize mismatches",
            "qjax default codes != torch quantize (ties: zp after rounding)",
        ],
        rows,
    )


def _qat_tour(rng: np.random.Generator) -> str:
    import optax

    # Fit y = x @ w_true with a 4-bit weight whose scale is learned (LSQ).
    x = jnp.asarray(rng.standard_normal((256, 16)).astype(np.float32))
    w_true = jnp.asarray(rng.standard_normal((16, 4)).astype(np.float32))
    y = x @ w_true
    spec = QuantSpec(bits=4, signed=True, symmetric=True, axis=1)
    params = {"w": jnp.zeros((16, 4)) + 0.01, "s": jnp.full((4,), 0.1)}

    def loss(p):
        qp = QParams(scale=p["s"], zero_point=jnp.zeros((4,), jnp.int32), spec=spec)
        return jnp.mean((x @ fake_quant(p["w"], qp, grad="lsq") - y) ** 2)

    opt = optax.adam(3e-2)
    state = opt.init(params)

    @jax.jit
    def step(p, st):
        val, g = jax.value_and_grad(loss)(p)
        upd, st = opt.update(g, st, p)
        return optax.apply_updates(p, upd), st, val

    rows = []
    for i in range(301):
        params, state, val = step(params, state)
        if i in (0, 50, 100, 300):
            rows.append([i, float(val), " ".join(f"{v:.3f}" for v in np.asarray(params["s"]))])
    return _table(
        "QAT: 4-bit per-channel weights with learnable LSQ scales (optax adam)",
        ["step", "loss", "learned scales"],
        rows,
    )


def run_demo(size: int = 1_000_000, seed: int = 0) -> int:
    """Run the tour and print its tables; returns a process exit code."""
    t0 = time.perf_counter()
    rng = np.random.default_rng(seed)
    print(f"qjax demo (jax {jax.__version__}, {jax.devices()[0].platform})\n")
    for part in (_observer_tour(rng), _compat_tour(), _parity_tour(size, rng), _qat_tour(rng)):
        print(part, end="\n\n")
    print(f"done in {time.perf_counter() - t0:.1f} s")
    return 0
