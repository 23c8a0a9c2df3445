"""Helpers shared by several test files (importable as ``_helpers``; see pyproject)."""

import os
import subprocess
import sys

import numpy as np


def tie_heavy(rng, scale, shape, lo, hi):
    """Float inputs on and next to the rounding ties of codes ``lo..hi``.

    One fifth each: ``f32((k+1/2)·s)``, its upper and lower float neighbours, the float
    nearest ``(k+1/2)/inv`` (with ``x·inv == k+1/2`` exactly whenever that is
    representable; always for power-of-two scales) and uniform values in the range.
    ``scale`` broadcasts against ``shape`` (per-channel scales).
    """
    s = np.broadcast_to(np.asarray(scale, np.float32), shape)
    inv = np.float32(1) / s
    k = rng.integers(lo, hi, shape) + 0.5
    near = (k * s.astype(np.float64)).astype(np.float32)
    exact = (k / inv.astype(np.float64)).astype(np.float32)
    uni = (rng.uniform(lo - 0.5, hi + 0.5, shape) * s).astype(np.float32)
    pick = rng.integers(0, 5, shape)
    x = np.select(
        [pick == 0, pick == 1, pick == 2, pick == 3],
        [
            near,
            np.nextafter(near, np.float32(np.inf)),
            np.nextafter(near, np.float32(-np.inf)),
            exact,
        ],
        uni,
    )
    return x.astype(np.float32)


def run_script(script: str, *, marker: str, host_devices: int | None = None, env=None):
    """Run ``script`` in a fresh Python (own XLA flags, env); assert it printed ``marker``."""
    full_env = dict(os.environ)
    full_env["JAX_PLATFORMS"] = "cpu"
    if host_devices:
        flags = full_env.get("XLA_FLAGS", "")
        full_env["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={host_devices}"
    full_env.update(env or {})
    proc = subprocess.run(
        [sys.executable, "-c", script], env=full_env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0 and marker in proc.stdout, proc.stdout + proc.stderr
    return proc.stdout


def saved_served_cnn(directory):
    """A small served CNN (quant, conv, ReLU, max pool, avg pool, flatten, linear), saved
    to ``directory/cnn.safetensors``: ``(path, served, xs)`` with two calibration batches."""
    import jax
    from flax import nnx

    import qjax
    from qjax.flax import default_qat_qconfig
    from qjax.flax import nnx as qnnx

    cfg = default_qat_qconfig("x86").replace(quantize_input=True, scheme="fbgemm")
    r = nnx.Rngs(0)
    model = nnx.Sequential(
        qnnx.QuantStub(cfg),
        qnnx.QuantConv(1, 2, (3, 3), config=cfg, rngs=r),
        nnx.relu,
        qnnx.MaxPool((2, 2)),
        qnnx.AvgPool((1, 1)),
        qnnx.Flatten(),
        qnnx.QuantLinear(2 * 4 * 4, 3, config=cfg, rngs=r),
        qnnx.DeQuantStub(),
    )
    xs = [jax.random.normal(jax.random.key(i), (4, 8, 8, 1)) for i in range(2)]
    qnnx.calibrate(model, xs, progress=False)
    served = qjax.convert(model, xs[0])
    path = directory / "cnn.safetensors"
    qjax.save_served(path, served)
    return path, served, xs
