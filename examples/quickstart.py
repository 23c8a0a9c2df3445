"""Quickstart: per-channel weight quantization, an observer, and a QAT gradient.

Run: ``.venv/bin/python examples/quickstart.py``. Prints the codes' range, the
round-trip error bound (half a step per channel) and the activation qparams an EMA
observer picked, then checks that the straight-through gradient is masked outside
the representable range.
"""

import jax
import jax.numpy as jnp

import qjax


def main() -> dict:
    spec = qjax.QuantSpec(bits=8, signed=True, symmetric=True, axis=1)  # w: [in, out]
    w = jax.random.normal(jax.random.key(0), (64, 32))
    qp = qjax.qparams_from_minmax(w.min(axis=0), w.max(axis=0), spec)
    q = qjax.quantize(w, qp)
    w_hat = qjax.dequantize(q, qp)
    err = jnp.max(jnp.abs(w_hat - w) / qp.scale)  # in units of a step
    print(f"codes in [{int(q.min())}, {int(q.max())}], max error {float(err):.3f} steps")

    act = qjax.observers.ema_minmax(qjax.QuantSpec(bits=8, signed=False))
    state = act.init(w)
    update = jax.jit(act.update)
    for i in range(10):
        state = update(state, jax.nn.relu(jax.random.normal(jax.random.key(i), (128, 64))))
    act_qp = act.qparams(state)
    print(f"activation scale {float(act_qp.scale):.5f}, zero point {int(act_qp.zero_point)}")
    print(qjax.observers.report(state, "act"))

    x = jnp.array([-0.001, 0.5, 100.0])  # -0.001 rounds to code 0: inside
    g = jax.grad(lambda v: qjax.fake_quant(v, act_qp).sum())(x)
    print(f"straight-through gradient at {x.tolist()}: {g.tolist()}")
    return {"max_err_steps": float(err), "grad": g.tolist(), "zero_point": int(act_qp.zero_point)}


if __name__ == "__main__":
    main()
