"""QAT under a ``jax.sharding`` mesh (8 host CPU devices) equals QAT on one device.

The three cases run in one subprocess (``--xla_force_host_platform_device_count=8``) so
the other tests keep one device (one process: one start-up, one single-device compile).
An NNX MLP (32-64-16: both widths divide by 8) of
``QuantLinear`` layers (``qjax_recommended``: per-output-channel int8 weights, EMA
per-tensor activations, QAT mode) takes 4 SGD steps under ``nnx.jit``, with

- ``data``: the batch sharded along ``"data"`` (observers must see the global batch),
- ``model``: kernels, biases and the per-channel weight statistics sharded along the
  output-channel axis ``"model"``, the batch replicated,
- ``data+model``: both, on a 2x4 mesh.

Two comparisons with a single-device run:

1. **Lockstep**: before every step the single-device model gets a copy of the sharded
   model's state, so both take the step from identical parameters and statistics. The
   observer statistics are min/max reductions and EMAs of identical operands, so they
   must be *bit-identical*; so must the outputs when only the batch is sharded (each row
   is the same dot product). Sharding the output channels changes the shapes of the
   per-device matmuls and XLA:CPU may then sum a row in another order, so the outputs,
   and the statistics of ``fc2``'s input (observed from ``fc1``'s outputs), may differ
   by an ulp; ``fc1``'s input and all per-channel weight statistics stay bit-identical.
   Updated parameters differ by the order of the cross-device gradient sum (1-2 ulp;
   ~1e-5 *elementwise* relative on near-zero biases), so inexact tensors are
   compared with ``max|diff| <= 1e-6 * max|value|`` per tensor (measured, per tensor:
   params 2.1e-7, outputs 1.4e-7, ``fc2`` input stats 1.6e-7).
2. **Free-running**: the sharded and the single-device runs train independently from
   the same initialisation; ulp differences then propagate (an ulp can move a value
   across a rounding tie and change a fake-quant code), so everything is compared with
   ``max|diff| <= 1e-5 * max|value|`` per tensor (measured: at most 2.8e-7).

The script prints the worst measured ``max|diff| / max|value|`` of each comparison.
"""

import textwrap

from _helpers import run_script

_SCRIPT = textwrap.dedent(
    """
    import jax, jax.numpy as jnp, numpy as np, optax
    from flax import nnx
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    from qjax.flax import Mode, qjax_recommended, nnx as qn

    jax.config.update("jax_numpy_dtype_promotion", "strict")
    assert jax.device_count() == 8, jax.devices()
    devs = np.array(jax.devices())
    CFG = qjax_recommended()

    class MLP(nnx.Module):
        def __init__(self, rngs):
            self.fc1 = qn.QuantLinear(32, 64, config=CFG, mode=Mode.QAT, rngs=rngs)
            self.fc2 = qn.QuantLinear(64, 16, config=CFG, mode=Mode.QAT, rngs=rngs)

        def __call__(self, x):
            return self.fc2(jax.nn.relu(self.fc1(x)))

    rng = np.random.default_rng(0)
    XS = [rng.standard_normal((64, 32)).astype(np.float32) * (1 + i) for i in range(4)]
    for i, x in enumerate(XS):  # an outlier row in one shard only: a per-shard
        x[8 * i + 3] *= 8.0     # observer would miss it
    YS = [rng.integers(0, 16, 64).astype(np.int32) for _ in range(4)]
    tx = optax.sgd(0.05, momentum=0.9)

    @nnx.jit
    def step(model, opt, x, y):
        def loss_fn(m):
            out = m(x)
            return optax.softmax_cross_entropy_with_integer_labels(out, y).mean(), out

        (_, out), grads = nnx.value_and_grad(loss_fn, has_aux=True)(model)
        opt.update(model, grads)
        return out

    def make():
        model = MLP(nnx.Rngs(0))
        return model, nnx.Optimizer(model, tx, wrt=nnx.Param)

    def local(tree):  # an unsharded copy on the default device
        return jax.tree.map(lambda a: jnp.asarray(np.asarray(a)), tree)

    def flat(tree):
        return {
            jax.tree_util.keystr(p): np.asarray(v)
            for p, v in jax.tree_util.tree_flatten_with_path(tree)[0]
        }

    WORST = {}

    def compare(ref, got, rel, what, exact=()):
        # exact=(): substrings of leaf paths that must be bit-identical; rel=None: all.
        fr, fg = flat(ref), flat(got)
        assert fr.keys() == fg.keys(), (what, fr.keys(), fg.keys())
        for k, r in fr.items():
            g = fg[k]
            assert r.shape == g.shape and r.dtype == g.dtype, (what, k)
            if rel is None or any(e in k for e in exact):
                np.testing.assert_array_equal(g, r, err_msg=f"{what} {k}")
            elif r.size:
                d = float(np.max(np.abs(g.astype(np.float64) - r)))
                scale = float(np.max(np.abs(r)))
                assert d <= rel * scale, (what, k, d, scale)
                WORST[what] = max(WORST.get(what, 0.0), d / scale if scale else 0.0)

    def stats(m):
        return nnx.state(m, qn.QuantStat)

    def params(m):
        return nnx.state(m, nnx.Param)

    def run(CASE):
        if CASE == "data":
            mesh, x_spec, model_axis = Mesh(devs, ("data",)), P("data"), None
        elif CASE == "model":
            mesh, x_spec, model_axis = Mesh(devs, ("model",)), P(), "model"
        else:
            mesh, x_spec = Mesh(devs.reshape(2, 4), ("data", "model")), P("data")
            model_axis = "model"
        WORST.clear()

        def shard(a):  # output channels are the last axis of kernels, biases, weight stats
            if model_axis is None or a.ndim == 0:
                spec = P()
            else:
                spec = P(*([None] * (a.ndim - 1)), model_axis)
            return jax.device_put(a, NamedSharding(mesh, spec))

        def put(a):
            return jax.device_put(a, NamedSharding(mesh, x_spec))

        # The sharded model: every Param, QuantStat and optimizer leaf placed on the mesh.
        model, opt = make()
        for obj in (model, opt):
            nnx.update(obj, jax.tree.map(shard, nnx.state(obj)))
        free_ref, free_opt = make()  # single device, trained independently
        ref, ref_opt = make()  # single device, reset to the sharded state before each step

        # Sharded output channels: fc1's input and all weight statistics are reductions of
        # identical operands (exact); fc2's input is fc1's output (an ulp may differ).
        exact_stats = None if model_axis is None else ("fc1']['quant_stats'].value.input",
                                                       ".weight.")
        for i, (x, y) in enumerate(zip(XS, YS)):
            nnx.update(ref, local(nnx.state(model)))
            nnx.update(ref_opt, local(nnx.state(opt)))
            out_ref = step(ref, ref_opt, jnp.asarray(x), jnp.asarray(y))
            out = step(model, opt, put(x), put(y))
            out_free = step(free_ref, free_opt, jnp.asarray(x), jnp.asarray(y))
            compare(out_ref, out, None if model_axis is None else 1e-6, "lockstep outputs")
            compare(stats(ref), stats(model), None if model_axis is None else 1e-6,
                    "lockstep stats", exact=exact_stats or ())
            compare(params(ref), params(model), 1e-6, "lockstep params")
            compare(out_free, out, 1e-5, "free-running outputs")
            compare(stats(free_ref), stats(model), 1e-5, "free-running stats")
            compare(params(free_ref), params(model), 1e-5, "free-running params")

        # The observers saw the global batch: the lockstep statistics above are bit-identical
        # (each batch has an outlier row in one shard), and each step counted once.
        assert int(model.fc1.quant_stats.get_value().input.count) == len(XS)
        # ... and the shardings stayed as placed: per-channel state along "model".
        chan = P() if model_axis is None else P(model_axis)
        for layer in (model.fc1, model.fc2):
            w = layer.quant_stats.get_value().weight
            kernel = layer.kernel[...]
            assert kernel.sharding.is_equivalent_to(NamedSharding(mesh, P(None, *chan)), 2), (
                kernel.sharding)
            assert w.min_val.sharding.is_equivalent_to(NamedSharding(mesh, chan), 1), (
                w.min_val.sharding)
            assert w.max_val.sharding.is_equivalent_to(NamedSharding(mesh, chan), 1)
            # The per-channel weight scale computed from them is sharded the same way and
            # equals the single-device scale.
            wobs = CFG.weight_observer(CFG.weight, CFG.compat)
            qp = jax.jit(wobs.qparams)(w)
            qp_ref = wobs.qparams(local(w))
            assert qp.scale.sharding.is_equivalent_to(NamedSharding(mesh, chan), 1), (
                qp.scale.sharding)
            compare(qp_ref, qp, None, "weight qparams")
        print(CASE, "worst relative differences:", WORST)
        print("SHARDED-QAT-OK", CASE)

    # one process for the three layouts: one start-up and one single-device compile
    for case in ("data", "model", "data+model"):
        run(case)
    """
)


def test_sharded_qat_equals_single_device():
    out = run_script(_SCRIPT, marker="SHARDED-QAT-OK data+model", host_devices=8)
    for case in ("data", "model", "data+model"):
        assert f"SHARDED-QAT-OK {case}\n" in out, out
    print(out)
