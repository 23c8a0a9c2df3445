"""int8 Dense layer: qjax ``quantized_linear`` vs JAX float32 ``x @ w + b``.

Run: ``.venv/bin/python benchmarks/int8_dense.py``. M in {32, 256} rows, K = N in
{1024, 2048}; uint8 activations (zero point 120), int8 per-output-channel symmetric
weights prepared once (``prepare_linear``), float bias, fused ReLU, requantization
scheme ``"fbgemm"``, jitted; the float baseline is ``relu(x @ w + b)`` in float32, jitted.

Also timed, as the ceiling of any int8 lowering on XLA:CPU: the raw ``s8 x s8 -> s32``
``dot_general`` alone against the float32 dot alone; and, for scale, the same layer in
PyTorch's fbgemm engine (``quantized::linear_relu``, prepacked, 2 threads,
``OMP_WAIT_POLICY=PASSIVE``) when torch is installed. Goal (issue 3): >= 10x JAX f32.
``QJAX_BENCH_QUICK=1``: K = N = 1024 only, fewer repeats. Prints one ``BENCH`` line per
shape (ratio JAX f32 / qjax).

``qjax amx``: the same layer prepared with ``kernel="amx"`` (the native AMX int8 GEMM,
:func:`qjax.kernels.native_status`), timed beside the XLA lowering with its own parity
count against torch fbgemm and its own ``BENCH`` lines (case suffixed `` (amx)``); left
out, with the reason printed, where the kernel is unavailable. ``qjax onednn``: the same
with ``kernel="onednn"`` (oneDNN's int8 matmul, the optional library, where
:func:`qjax.kernels.onednn_exact` says it is exact here), case suffixed `` (onednn)``.
"""

import functools
import os
import warnings

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import jax
import jax.numpy as jnp
import numpy as np
from _timing import bench_line, interleaved, load_line, machine_line, quick, table
from jax import lax

import qjax
from qjax.kernels import QArray, native_status, onednn_exact, prepare_linear, quantized_linear

SHAPES = [(m, k) for k in (1024, 2048) for m in (32, 256)]
if quick():
    SHAPES = [(32, 1024), (256, 1024)]
A_SPEC = qjax.QuantSpec(signed=False)
W_SPEC = qjax.QuantSpec(signed=True, symmetric=True, axis=1)
DN = (((1,), (0,)), ((), ()))

try:
    import torch

    torch.set_num_threads(2)
    warnings.filterwarnings("ignore", message=".*quantized tensor creation functions.*")
    torch.backends.quantized.engine = "fbgemm"
except ImportError:
    torch = None


def torch_fbgemm_layer(xq, wq, sw, bf, out_qp):
    """``quantized::linear_relu`` with prepacked weights, same codes and qparams."""
    qw = torch._make_per_channel_quantized_tensor(
        torch.from_numpy(wq.T.copy()),
        torch.from_numpy(sw).double(),
        torch.zeros(len(sw), dtype=torch.long),
        0,
    )
    packed = torch.ops.quantized.linear_prepack(qw, torch.from_numpy(bf))
    qx = torch._make_per_tensor_quantized_tensor(
        torch.from_numpy(np.array(xq.values)), float(xq.scale), int(xq.zero_point)
    )
    so, zo = float(out_qp.scale), int(out_qp.zero_point)

    def run():
        with torch.inference_mode():
            return torch.ops.quantized.linear_relu(qx, packed, so, zo)

    return run


@jax.jit
def q_dense(x, pw, b, out_qp):
    return quantized_linear(x, pw, b, out_qp, scheme="fbgemm", activation="relu").values


@jax.jit
def f32_dense(x, w, b):
    return jax.nn.relu(x @ w + b)


@jax.jit
def s8_dot(x, w):
    return lax.dot_general(x, w, DN, preferred_element_type=jnp.int32)


@jax.jit
def f32_dot(x, w):
    return x @ w


def main():
    status = {"amx": native_status(), "onednn": onednn_exact()}
    natives = [k for k, (ok, _) in status.items() if ok]  # the native kernels timed
    print(machine_line())
    if torch is not None:
        print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(load_line())
    for k, (ok, reason) in status.items():
        print(f"qjax {k}: {'timed' if ok else 'left out'} ({reason})")
    print()
    rng = np.random.default_rng(0)
    rows, ratios, native_ratios = [], [], []
    for m, k in SHAPES:
        n = k
        wf = (rng.standard_normal((k, n)) / k**0.5).astype(np.float32)
        bf = (0.1 * rng.standard_normal(n)).astype(np.float32)
        xf = rng.random((m, k), dtype=np.float32)
        sw = np.abs(wf).max(axis=0) / 127
        wq = np.clip(np.rint(wf / sw), -127, 127).astype(np.int8)
        w = QArray(
            jnp.asarray(wq),
            qjax.QParams(jnp.asarray(sw, jnp.float32), jnp.zeros(n, jnp.int32), W_SPEC),
        )
        pw = prepare_linear(w)
        x = QArray(
            jnp.asarray(rng.integers(0, 256, (m, k)), jnp.uint8),
            qjax.QParams(jnp.float32(1 / 255), jnp.int32(120), A_SPEC),
        )
        out_qp = qjax.QParams(jnp.float32(0.02), jnp.int32(0), A_SPEC)
        xi = jnp.asarray(rng.integers(-128, 128, (m, k)), jnp.int8)
        wi = jnp.asarray(wq)
        xj, wj, bj = jnp.asarray(xf), jnp.asarray(wf), jnp.asarray(bf)
        b = jnp.asarray(bf)
        fns = {
            "qjax": functools.partial(q_dense, x, pw, b, out_qp),
            "f32": functools.partial(f32_dense, xj, wj, bj),
            "s8 dot": functools.partial(s8_dot, xi, wi),
            "f32 dot": functools.partial(f32_dot, xj, wj),
        }
        pws = {k: prepare_linear(w, kernel=k) for k in natives}
        for kn, pwk in pws.items():
            fns[f"qjax {kn}"] = functools.partial(q_dense, x, pwk, b, out_qp)
        mism = None
        if torch is not None:
            fns["torch fbgemm"] = torch_fbgemm_layer(x, wq, sw.astype(np.float32), bf, out_qp)
            ref = fns["torch fbgemm"]().int_repr().numpy()
            mism = int((np.asarray(q_dense(x, pw, b, out_qp)) != ref).sum())
            for kn, pwk in pws.items():
                bad = int((np.asarray(q_dense(x, pwk, b, out_qp)) != ref).sum())
                mism = f"{mism} ({kn} {bad})"
        reps = (40 if m == 32 else 15) // (4 if quick() else 1)
        t = interleaved(fns, repeats=reps, warmup=3)
        ratios.append((f"M={m} K=N={k}", t["f32"] / t["qjax"]))
        for kn in natives:
            native_ratios.append((f"M={m} K=N={k} ({kn})", t["f32"] / t[f"qjax {kn}"]))
        rows.append(
            [m, k, n]
            + [f"{t[name] * 1e6:.0f}" for name in fns]
            + [
                f"{t['f32'] / t['qjax']:.2f}x",
                f"{t['f32 dot'] / t['s8 dot']:.2f}x",
                f"{t['s8 dot'] / t['qjax']:.2f}",
            ]
            + ([f"{t['torch fbgemm'] / t['qjax']:.2f}x", mism] if torch is not None else [])
            + [
                cell
                for kn in natives
                for cell in (
                    f"{t['f32'] / t[f'qjax {kn}']:.2f}x",
                    f"{t['qjax'] / t[f'qjax {kn}']:.2f}x",
                )
                + ((f"{t['torch fbgemm'] / t[f'qjax {kn}']:.2f}x",) if torch is not None else ())
            ]
        )
    header = ["M", "K", "N"] + [f"{name} us" for name in fns]
    header += ["f32/qjax", "f32dot/s8dot (ceiling)", "s8dot/qjax"]
    header += ["fbgemm/qjax", "codes != fbgemm"] if torch is not None else []
    for kn in natives:
        header += [f"f32/{kn}", f"qjax/{kn}"] + ([f"fbgemm/{kn}"] if torch is not None else [])
    print("median latency (interleaved); ratios > 1: int8 faster")
    print(table(header, rows))
    print(load_line())
    print("goal: qjax >= 10x f32 at M >= 32, K, N >= 1024")
    for case, r in ratios + native_ratios:
        bench_line("int8_dense", case, r, "jax f32", ">= 10x")


if __name__ == "__main__":
    main()
