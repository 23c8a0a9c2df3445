"""int8 MLP 784-1024-1024-10 inference: qjax vs JAX float32 vs PyTorch int8 engines vs
ONNX Runtime.

Run: ``.venv/bin/python benchmarks/int8_mlp.py``. The model is what a torch-converted
model runs: the float input is quantized at the boundary (quint8, ``compat="torch"``),
three integer linear layers (int8 per-channel symmetric weights, uint8 activations,
fused ReLU between, requantization scheme ``"fbgemm"``), the output dequantized. The
qparams come from min/max observers on a calibration batch; every contender uses the
same float weights, the same weight codes and the same qparams:

* qjax: ``quantized_linear`` x3, jitted, weights prepared once (``prepare_linear``);
* JAX float32: ``relu(x @ w + b)`` x3 with the float weights, jitted;
* PyTorch int8: ``torch.ops.quantized.linear[_relu]`` with weights prepacked per engine
  (``x86``, ``fbgemm``, ``onednn``, ``qnnpack``; ``qnnpack`` left out under
  ``QJAX_BENCH_SPIN=1``, see ``ENGINES``), ``OMP_WAIT_POLICY=PASSIVE`` and
  2 threads (XLA's CPU client uses the 2 cores too); with ``QJAX_BENCH_SPIN=1`` torch's
  OpenMP and ORT's threads spin as by default, as a user runs them, and every contender
  is timed in blocks of 20 consecutive calls after 15 ms of untimed ones
  (``_timing.spinning``);
* onnxruntime: qjax's own ONNX export of the same model. The qjax contender's weight
  codes and qparams go into an eager converted torch module (``Quantize``,
  ``LinearReLU`` x2, ``Linear``, ``DeQuantize``), ``qjax.converters.torch.import_model``
  (engine ``fbgemm``) makes it a Program (its output is checked equal to the qjax
  contender's), ``qjax.converters.onnx.export_onnx`` writes the QDQ model (static
  shapes: one per batch), run on the CPU execution provider with 2 intra-op threads,
  graph optimizations ON (QDQ fused into ``QGemm``), sequential execution, no spinning.
* qjax amx / qjax onednn: the same qjax program with every layer prepared with
  ``kernel="amx"`` (the native AMX int8 GEMM, :func:`qjax.kernels.native_status`) /
  ``kernel="onednn"`` (oneDNN's brgemm ukernel, where :func:`qjax.kernels.onednn_exact`
  says it is exact here) and the boundary quantize native
  (``quantize_input(..., kernel="auto")``); left out, with the reason printed, where
  unavailable.
* qjax auto: the layers on the kernel
  ``kernel="auto"`` picks here, each layer's requantization folded in at prepare time
  (:func:`qjax.kernels.fold_requant`: one native call per layer, no coefficient pass),
  the boundary quantize and dequantize native (so XLA's CPU client runs the program on
  the calling thread: it hands programs of 1000 XLA flops or more to its thread pool);
  on a CPU where ``"auto"`` picks XLA it is the XLA program. Its params are jit
  arguments: every call flattens their pytree (41 leaves) and hands XLA one buffer per leaf
  it reads.
* qjax frozen (the headline, the one the goals are for): what a user of the torch importer
  serves, ``import_model(module, engine="fbgemm", kernel="auto").freeze()``: the same
  layers and kernels (folded), the params compiled in as constants
  (:meth:`qjax.Program.freeze`), as ORT's session and torch's modules hold their weights.
  Its output is checked equal to torch fbgemm's and its activations (``trace``) too; its
  f32 ratio is against JAX f32 frozen the same way (``jax.jit`` closing over the weights).

Every qjax contender's output codes (all layers) are checked against torch fbgemm's,
and ORT's dequantized outputs against qjax's in units of the output scale (LSB;
mismatch counts printed). ORT's u8s8 kernels may saturate int16 pair sums on CPUs
without VNNI (its documented behaviour): the header prints the host level
(:func:`qjax.kernels.host_level`). Goals (issue 16, on the headline): >= 3x JAX f32 and
>= 1.5x the best torch engine at batch 32 and 256; >= 1.0x torch fbgemm at batch 1;
>= 1.0x onnxruntime at batch 1, 32 and 256. ``QJAX_BENCH_QUICK=1``: a fifth of the
repeats. Prints ``BENCH`` lines: JAX f32 / qjax, best torch / qjax and onnxruntime / qjax
per batch and contender, torch fbgemm / qjax at batch 1 (cases suffixed with the
contender, e.g. `` (auto (onednn, folded))``).
"""

import functools
import warnings

# before torch: its OpenMP reads the wait policy once
import _timing

_timing.wait_policy()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import qjax.converters.torch as qtorch  # noqa: E402
import torch  # noqa: E402
from _timing import (  # noqa: E402
    bench_line,
    blocks,
    interleaved,
    load_line,
    lsb_diff,
    machine_line,
    ort_session,
    ort_version,
    quick,
    settle,
    spinning,
    table,
    torch_threads_line,
)
from qjax.converters.onnx import export_onnx  # noqa: E402

import qjax  # noqa: E402
from qjax.kernels import (  # noqa: E402
    QArray,
    dequantize_output,
    fold_requant,
    host_level,
    native_status,
    onednn_exact,
    prepare_linear,
    quantize_input,
    quantized_linear,
)
from qjax.kernels._choice import linear_kernel  # noqa: E402
from qjax.kernels._native import onednn_fused  # noqa: E402

THREADS = 2
torch.set_num_threads(THREADS)
warnings.filterwarnings("ignore", message=".*quantized tensor creation functions.*")

SIZES = (784, 1024, 1024, 10)
BATCHES = (1, 32, 256)
# Under QJAX_BENCH_SPIN qnnpack is left out: its thread pool spins so long after a call
# that every contender timed after it ran on one core (the qjax MLP at batch 32 165 µs
# for ~100 calls after qnnpack, 102 alone); it is 15-20x slower than fbgemm here anyway.
ENGINES = ("x86", "fbgemm", "onednn") if spinning() else ("x86", "fbgemm", "onednn", "qnnpack")
A_SPEC = qjax.QuantSpec(signed=False)
W_SPEC = qjax.QuantSpec(signed=True, symmetric=True, axis=1)


def build_float(seed=0):
    g = torch.Generator().manual_seed(seed)
    ws, bs = [], []
    for n_in, n_out in zip(SIZES[:-1], SIZES[1:], strict=True):
        ws.append(torch.randn(n_out, n_in, generator=g) / n_in**0.5)  # torch (out, in)
        bs.append(0.1 * torch.randn(n_out, generator=g))
    return ws, bs


def float_forward_torch(ws, bs, x):
    acts = [x]
    h = x
    for i, (w, b) in enumerate(zip(ws, bs, strict=True)):
        h = torch.nn.functional.linear(h, w, b)
        if i < len(ws) - 1:
            h = torch.relu(h)
        acts.append(h)
    return acts


def calibrate(ws, bs, seed=1):
    """Activation qparams (quint8, per tensor) from min/max, weight codes per channel."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(512, SIZES[0], generator=g)  # MNIST-like pixels in [0, 1)
    acts = float_forward_torch(ws, bs, x)
    act_qp = []
    for a in acts:
        obs = torch.ao.quantization.MinMaxObserver(dtype=torch.quint8)
        obs(a)
        s, z = obs.calculate_qparams()
        act_qp.append((float(s), int(z)))
    qws = []
    for w in ws:
        obs = torch.ao.quantization.PerChannelMinMaxObserver(
            ch_axis=0, dtype=torch.qint8, qscheme=torch.per_channel_symmetric
        )
        obs(w)
        s, z = obs.calculate_qparams()
        qws.append(torch.quantize_per_channel(w, s.float(), z.long(), 0, torch.qint8))
    return act_qp, qws


def torch_model(engine, qws, bs, act_qp):
    torch.backends.quantized.engine = engine
    packed = [torch.ops.quantized.linear_prepack(qw, b) for qw, b in zip(qws, bs, strict=True)]
    s0, z0 = act_qp[0]

    def run(x, collect=False):
        h = torch.quantize_per_tensor(x, s0, z0, torch.quint8)
        outs = []
        for i, p in enumerate(packed):
            s, z = act_qp[i + 1]
            if i < len(packed) - 1:
                h = torch.ops.quantized.linear_relu(h, p, s, z)
            else:
                h = torch.ops.quantized.linear(h, p, s, z)
            outs.append(h)
        return outs if collect else h

    return run


def torch_module(qws, bs, act_qp):
    """The same model as an eager converted torch module (what ``import_model`` takes):
    the qjax contender's weight codes, biases and activation qparams, not re-observed."""
    torch.backends.quantized.engine = "fbgemm"
    nnq, nniq = torch.ao.nn.quantized, torch.ao.nn.intrinsic.quantized
    s0, z0 = act_qp[0]
    mods = [nnq.Quantize(s0, z0, torch.quint8)]
    for i, (qw, b) in enumerate(zip(qws, bs, strict=True)):
        n_out, n_in = qw.shape
        m = (nniq.LinearReLU if i < len(qws) - 1 else nnq.Linear)(n_in, n_out)
        m.set_weight_bias(qw, b)
        m.scale, m.zero_point = act_qp[i + 1]
        mods.append(m)
    mods.append(nnq.DeQuantize())
    return torch.nn.Sequential(*mods).eval()


def ort_contender(program, xn):
    """An ORT session of qjax's ONNX export of ``program`` for inputs shaped like ``xn``,
    and the call to time."""
    sess = ort_session(export_onnx(program, (xn,)), threads=THREADS)
    feed = {sess.get_inputs()[0].name: xn}
    return sess, functools.partial(sess.run, None, feed)


def qjax_params(qws, bs, act_qp, kernel="xla"):
    layers = []
    for i, (qw, b) in enumerate(zip(qws, bs, strict=True)):
        codes = jnp.asarray(qw.int_repr().numpy().T.copy())  # (in, out)
        scale = jnp.asarray(qw.q_per_channel_scales().numpy().astype(np.float32))
        zp = jnp.asarray(qw.q_per_channel_zero_points().numpy().astype(np.int32))
        w = QArray(codes, qjax.QParams(scale, zp, W_SPEC))
        s, z = act_qp[i + 1]
        layers.append(
            {
                "w": prepare_linear(w, name=f"fc{i + 1}", kernel=kernel),
                "b": jnp.asarray(b.numpy()),
                "out": qjax.QParams(jnp.float32(s), jnp.int32(z), A_SPEC),
            }
        )
    s0, z0 = act_qp[0]
    return {"in": qjax.QParams(jnp.float32(s0), jnp.int32(z0), A_SPEC), "layers": layers}


def folded(params):
    """``params`` with each layer's requantization folded in (``fold_requant``: the
    epilogue vectors of the static qparams computed once, one native call per layer)."""
    in_qp, layers = params["in"], []
    for i, lp in enumerate(params["layers"]):
        act = "relu" if i < len(params["layers"]) - 1 else None
        w = fold_requant(lp["w"], in_qp, lp["b"], lp["out"], scheme="fbgemm", activation=act)
        layers.append(dict(lp, w=w))
        in_qp = lp["out"]
    return dict(params, layers=layers)


def qjax_layers(params, x, quant="xla"):
    """Every layer's output (QArray codes), float input quantized at the boundary
    (``quant``: ``quantize_input``'s kernel, ``"auto"`` native where it runs; the same
    for the output's ``dequantize_output`` in :func:`qjax_forward`)."""
    h = quantize_input(x, params["in"], kernel=quant)
    n = len(params["layers"])
    outs = []
    for i, lp in enumerate(params["layers"]):
        act = "relu" if i < n - 1 else None
        h = quantized_linear(h, lp["w"], lp["b"], lp["out"], scheme="fbgemm", activation=act)
        outs.append(h)
    return outs


qjax_codes = jax.jit(qjax_layers, static_argnames="quant")


@functools.partial(jax.jit, static_argnames="quant")
def qjax_forward(params, x, quant="xla"):
    return dequantize_output(qjax_layers(params, x, quant)[-1], kernel=quant)


@jax.jit
def f32_forward(params, x):
    h = x
    for i, (w, b) in enumerate(params):
        h = h @ w + b
        if i < len(params) - 1:
            h = jax.nn.relu(h)
    return h


def run_torch(model, engine, x):
    torch.backends.quantized.engine = engine  # process-global: set where the model runs
    return model(x).dequantize()


def main():
    ws, bs = build_float()
    act_qp, qws = calibrate(ws, bs)
    qp = qjax_params(qws, bs, act_qp)
    # label -> (params, boundary quantize kernel); "qjax int8" is XLA's default program
    contenders = {"qjax int8": (qp, "xla")}
    reasons = {}
    for kernel, status in (("amx", native_status), ("onednn", onednn_exact)):
        ok, reasons[kernel] = status()
        if ok:
            contenders[f"qjax {kernel}"] = (qjax_params(qws, bs, act_qp, kernel=kernel), "auto")
    # kernel="auto"'s choice, requantization folded at prepare time where
    # the layer runs one fused native call, the boundary quantize native
    auto = linear_kernel("auto")
    if auto != "xla":
        params = qjax_params(qws, bs, act_qp, kernel=auto)
        fold = auto == "amx" or onednn_fused()
        contenders[f"qjax auto ({auto}{', folded' if fold else ''})"] = (
            folded(params) if fold else params,
            "auto",
        )
    fp = [
        (jnp.asarray(w.numpy().T.copy()), jnp.asarray(b.numpy()))
        for w, b in zip(ws, bs, strict=True)
    ]
    f32_frozen = jax.jit(functools.partial(f32_forward.__wrapped__, fp))
    tmodels = {e: torch_model(e, qws, bs, act_qp) for e in ENGINES}
    x_imp = torch.rand(8, SIZES[0], generator=torch.Generator().manual_seed(3))
    program = qtorch.import_model(torch_module(qws, bs, act_qp), (x_imp,), engine="fbgemm")
    # the headline: the importer's program on kernel="auto", params compiled in
    served = qtorch.import_model(
        torch_module(qws, bs, act_qp), (x_imp,), engine="fbgemm", kernel="auto"
    )
    headline = f"qjax frozen ({'/'.join(sorted(set(served.kernels.values())))})"
    frozen = served.freeze()

    def f32_base(label):  # frozen against frozen: the float weights closed over too
        return "jax f32 frozen" if label == headline else "jax f32"

    out_scale = act_qp[-1][0]

    print(machine_line())
    print(torch_threads_line(torch))
    print(
        f"{ort_version()}, {THREADS} intra-op threads, ORT_ENABLE_ALL, sequential, "
        f"spinning {'on' if spinning() else 'off'}; host level "
        f"{host_level()} (ORT's u8s8 kernels may saturate int16 pair sums below vnni)"
    )
    print(load_line())
    for kernel, reason in reasons.items():
        timed = f"qjax {kernel}" in contenders
        print(f"qjax {kernel}: {'timed' if timed else 'left out'} ({reason})")
    print(f"headline (goals): {headline}")
    if "qnnpack" not in ENGINES:
        print(
            "torch qnnpack: left out under QJAX_BENCH_SPIN (its threads spin long enough "
            "to slow the next contenders)"
        )
    print()

    rng = np.random.default_rng(2)
    rows, checks, ort_checks, ratios = [], [], [], []
    for batch in BATCHES:
        xn = rng.random((batch, SIZES[0]), dtype=np.float32)
        xj, xt = jnp.asarray(xn), torch.from_numpy(xn)
        # parity: qjax output codes vs torch fbgemm's
        torch.backends.quantized.engine = "fbgemm"
        refs = tmodels["fbgemm"](xt, collect=True)
        total = sum(r.numel() for r in refs)
        ref = refs[-1].dequantize().numpy()
        for label, (params, quant) in contenders.items():
            gots = qjax_codes(params, xj, quant)
            mism = sum(
                int((np.asarray(g.values) != r.int_repr().numpy()).sum())
                for g, r in zip(gots, refs, strict=True)
            )
            fmism = int((np.asarray(qjax_forward(params, xj, quant)) != ref).sum())
            checks.append((label, batch, mism, total, fmism, ref.size))
        acts = list(served.trace(xn).values())  # quantize, then the 3 layers
        mism = sum(
            int((np.asarray(a.values) != r.int_repr().numpy()).sum())
            for a, r in zip(acts[1:], refs, strict=True)
        )
        fmism = int((np.asarray(frozen(xn)) != ref).sum())
        checks.append((headline, batch, mism, total, fmism, ref.size))
        # ORT runs the export of the imported program: first that program is the qjax
        # contender's model, then ORT's outputs vs qjax's in output LSBs
        qout = np.asarray(qjax_forward(qp, xj))
        same = int((np.asarray(program(xn)) != qout).sum())
        sess, ort_run = ort_contender(program, xn)
        ort_checks.append((batch, same, *lsb_diff(ort_run()[0], qout, out_scale)))

        fns = {"jax f32": functools.partial(f32_forward, fp, xj)}
        fns["jax f32 frozen"] = functools.partial(f32_frozen, xj)
        for label, (params, quant) in contenders.items():
            fns[label] = functools.partial(qjax_forward, params, xj, quant)
        fns[headline] = functools.partial(frozen, xj)
        with torch.inference_mode():
            for e in ENGINES:
                fns[f"torch {e}"] = functools.partial(run_torch, tmodels[e], e, xt)
            fns["onnxruntime"] = ort_run
            reps = 200 if batch == 1 else (60 if batch == 32 else 25)
            reps = max(reps // 5, 5) if quick() else reps
            b = blocks()
            t = interleaved(fns, repeats=max(reps // b, 3), warmup=5, block=b, settle=settle())
        best_e = min(ENGINES, key=lambda e: t[f"torch {e}"])
        big = batch >= 32
        qjax_labels = [*contenders, headline]
        for label in qjax_labels:
            tq, goal = t[label], label == headline
            case = f"batch {batch}" + ("" if label == "qjax int8" else f" ({label[5:]})")
            f32 = f32_base(label)
            ratios.append((case, t[f32] / tq, f32, ">= 3x" if goal and big else None))
            ratios.append(
                (
                    case,
                    t[f"torch {best_e}"] / tq,
                    f"best torch ({best_e})",
                    ">= 1.5x" if goal and big else None,
                )
            )
            if not big:
                ratios.append(
                    (case, t["torch fbgemm"] / tq, "torch fbgemm", ">= 1.0x" if goal else None)
                )
            ratios.append((case, t["onnxruntime"] / tq, "onnxruntime", ">= 1.0x" if goal else None))
        rows.append(
            [batch]
            + [f"{t[k] * 1e6:.0f}" for k in fns]
            + [
                cell
                for label in qjax_labels
                for cell in (
                    f"{t[f32_base(label)] / t[label]:.2f}x",
                    f"{t[f'torch {best_e}'] / t[label]:.2f}x ({best_e})",
                    f"{t['onnxruntime'] / t[label]:.2f}x",
                )
            ]
        )
    header = ["batch"] + [f"{k} us" for k in fns]
    for label in qjax_labels:
        k = label[5:]
        header += [f"f32/{k}", f"best torch/{k}", f"ort/{k}"]
    print("median latency per forward (interleaved), ratios > 1: qjax faster")
    print(table(header, rows))
    print()
    print("parity, qjax vs torch fbgemm (same weights, qparams, input):")
    for label, batch, mism, total, fmism, n in checks:
        print(
            f"  {label} batch {batch}: {mism} / {total} layer output codes differ (all 3 layers), "
            f"{fmism} / {n} dequantized outputs"
        )
    print("parity, onnxruntime (qjax's ONNX export) vs qjax int8, output codes in LSB:")
    for batch, same, mism, n, mx in ort_checks:
        print(
            f"  batch {batch}: ORT vs qjax: {mism} of {n} codes differ (max {mx} LSB); "
            f"imported program vs qjax: {same} of {n} outputs differ"
        )
    print(load_line())
    print(
        f"goals (issue 16, on {headline}): >= 3x f32 and >= 1.5x best torch at batch 32, 256; "
        ">= 1.0x torch fbgemm at batch 1; >= 1.0x onnxruntime at batch 1, 32, 256"
    )
    for case, r, base, goal in ratios:
        bench_line("int8_mlp", case, r, base, goal)


if __name__ == "__main__":
    main()
