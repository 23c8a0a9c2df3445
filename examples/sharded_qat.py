"""Data-parallel QAT on 8 (host) devices with ``jax.sharding``, checked against 1 device.

Run: ``.venv/bin/python examples/sharded_qat.py`` (about 30 s of CPU time). Run as a script, it sets
``XLA_FLAGS=--xla_force_host_platform_device_count=8`` *before* importing jax, so XLA
splits the CPU into 8 devices (the flag only counts before jax initialises its
backends; on a machine with 8 accelerators drop it). Imported as a module, it uses
whatever devices the process already has and needs 8 of them.

A digits MLP (64-128-10) of ``QuantLinear`` layers (``qjax_recommended``: int8
per-output-channel weights, int8 per-tensor EMA activation ranges, QAT mode) is
trained with SGD under ``nnx.jit``. Each global batch of 64 rows is sharded along the
mesh axis ``"data"`` (8 rows per device); parameters, observer statistics and optimizer
state are replicated. The observers are ordinary ``jnp`` min/max reductions, so under
``jax.sharding`` they see the *global* batch: no per-device statistics to merge.

The check, at every step (as ``tests/test_flax_sharding.py`` does): a single-device
model gets a copy of the sharded model's state and takes the same step on the unsharded
batch ("lockstep"). Then

* the outputs and every observer statistic must be **bit-identical** (each output row
  is the same dot product; min/max/EMA of identical operands);
* the updated parameters may differ by the order in which the cross-device gradient sum
  is added up (an ulp or two): the largest ``|difference| / max|value|`` is printed and
  must stay below 1e-6.

Then both models are evaluated: accuracy of the sharded model on the test set.
"""

from __future__ import annotations

import os

if __name__ == "__main__":  # before jax is imported: the flag is read once, at start-up
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
    )
    os.environ.setdefault("JAX_PLATFORMS", "cpu")

import time  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from flax import nnx  # noqa: E402
from jax.sharding import Mesh, NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402
from sklearn.datasets import load_digits  # noqa: E402

from qjax.flax import Mode, qjax_recommended  # noqa: E402
from qjax.flax import nnx as qnnx  # noqa: E402

DEVICES = 8


class MLP(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        cfg = qjax_recommended()
        self.fc1 = qnnx.QuantLinear(64, 128, config=cfg, mode=Mode.QAT, rngs=rngs)
        self.fc2 = qnnx.QuantLinear(128, 10, config=cfg, mode=Mode.QAT, rngs=rngs)

    def __call__(self, x):
        return self.fc2(jax.nn.relu(self.fc1(x)))


@nnx.jit
def step(model, opt, x, y):
    def loss_fn(m):
        out = m(x)
        return optax.softmax_cross_entropy_with_integer_labels(out, y).mean(), out

    (_, out), grads = nnx.value_and_grad(loss_fn, has_aux=True)(model)
    opt.update(model, grads)
    return out


def _make():
    model = MLP(nnx.Rngs(0))
    return model, nnx.Optimizer(model, optax.sgd(0.1, momentum=0.9), wrt=nnx.Param)


def _leaves(tree) -> list[np.ndarray]:
    return [np.asarray(a) for a in jax.tree.leaves(tree)]


def _local(tree):
    """An unsharded copy on the default device."""
    return jax.tree.map(lambda a: jnp.asarray(np.asarray(a)), tree)


def main(steps: int = 60, batch: int = 64) -> dict:
    """Returns ``{"devices", "steps", "outputs_identical", "stats_identical",
    "max_param_rel_diff", "accuracy", "seconds"}``."""
    if jax.device_count() < DEVICES:
        raise RuntimeError(
            f"sharded_qat needs {DEVICES} devices, found {jax.device_count()} "
            f"({jax.devices()}); run it as a script, or start Python with "
            "XLA_FLAGS=--xla_force_host_platform_device_count=8"
        )
    if batch % DEVICES:
        raise ValueError(f"batch={batch} must divide into {DEVICES} device shards")
    t0 = time.perf_counter()
    d = load_digits()
    x_all, y_all = (d.data / 16.0).astype(np.float32), d.target.astype(np.int32)
    idx = np.random.default_rng(0).permutation(len(x_all))
    tr, te = idx[:1437], idx[1437:]

    mesh = Mesh(np.array(jax.devices()[:DEVICES]), ("data",))
    rows = NamedSharding(mesh, P("data"))  # batch split along "data"
    replicated = NamedSharding(mesh, P())

    model, opt = _make()
    for obj in (model, opt):
        nnx.update(obj, jax.device_put(nnx.state(obj), replicated))
    ref, ref_opt = _make()  # single device, reset to the sharded state before each step

    rng = np.random.default_rng(1)
    out_same = stats_same = True
    worst = 0.0
    for _ in range(steps):
        b = rng.choice(tr, batch, replace=False)
        xb, yb = x_all[b], y_all[b]
        nnx.update(ref, _local(nnx.state(model)))
        nnx.update(ref_opt, _local(nnx.state(opt)))
        out_ref = step(ref, ref_opt, jnp.asarray(xb), jnp.asarray(yb))
        out = step(model, opt, jax.device_put(xb, rows), jax.device_put(yb, rows))
        out_same &= np.array_equal(np.asarray(out), np.asarray(out_ref))
        got, want = (_leaves(nnx.state(m, qnnx.QuantStat)) for m in (model, ref))
        stats_same &= all(np.array_equal(a, r) for a, r in zip(got, want, strict=True))
        got, want = (_leaves(nnx.state(m, nnx.Param)) for m in (model, ref))
        for a, r in zip(got, want, strict=True):
            scale = float(np.abs(r).max())
            if scale:
                worst = max(worst, float(np.abs(a.astype(np.float64) - r).max()) / scale)
    assert out.sharding.is_equivalent_to(rows, 2), out.sharding  # the batch stayed split

    qnnx.set_mode(model, Mode.FROZEN)
    logits = model(jnp.asarray(x_all[te]))
    result = {
        "devices": jax.device_count(),
        "steps": steps,
        "outputs_identical": bool(out_same),
        "stats_identical": bool(stats_same),
        "max_param_rel_diff": worst,
        "accuracy": float((np.asarray(logits).argmax(-1) == y_all[te]).mean()),
        "seconds": time.perf_counter() - t0,
    }
    print(
        f"{result['devices']} devices ({jax.devices()[0].platform}), mesh axis 'data': "
        f"{batch} rows per step, {batch // DEVICES} per device, {steps} QAT steps"
    )
    print(
        f"lockstep vs 1 device: outputs bit-identical: {result['outputs_identical']}; "
        f"observer statistics bit-identical: {result['stats_identical']}; "
        f"parameters max |diff| / max |value| = {worst:.2e} (gradient sum order)"
    )
    print(
        f"sharded QAT model, frozen int8 fake-quant: test accuracy "
        f"{100 * result['accuracy']:.1f}% ({result['seconds']:.0f} s)"
    )
    return result


if __name__ == "__main__":
    main()
