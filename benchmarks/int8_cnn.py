"""int8 CNN inference: qjax vs JAX float32 vs PyTorch int8 engines vs ONNX Runtime (issues
3 and 16).

Run: ``.venv/bin/python benchmarks/int8_cnn.py``. The network: conv 3x3 1->32 + ReLU,
conv 3x3 32->64 + ReLU (BatchNorm already folded into the weights), max-pool 2, FC
12544->10, on 28x28 inputs, batch 64. PyTorch builds it with eager quantization
(QuantStub, fused ConvReLU2d, min/max calibration, ``convert``) per engine; qjax runs
the same codes and qparams taken from the converted model: ``quantized_conv`` (NHWC
internally), ``max_pool2d``, ``quantized_linear`` with the FC weight's columns permuted
from torch's NCHW flatten order, requantization scheme ``"onednn"`` (what torch's
onednn/x86 engines use for conv on this CPU) or ``"fbgemm"``. JAX float32 runs the float
weights. ONNX Runtime runs qjax's own ONNX export of the same model: the onednn-converted
torch model imported with ``qjax.converters.torch.import_model`` (engine ``onednn``; its
output is checked equal to the qjax ``"onednn"``-scheme program's),
``qjax.converters.onnx.export_onnx`` (QDQ, fused by ORT into ``QLinearConv`` / ``QGemm``),
CPU execution provider, 2 intra-op threads, graph optimizations ON, sequential execution,
no spinning (``_timing.ort_session``); torch with ``OMP_WAIT_POLICY=PASSIVE``.
``QJAX_BENCH_SPIN=1``: torch's and ORT's threads spin as by default, as a user runs
them, and every contender is timed in blocks of 20 calls after 15 ms of untimed ones
(``_timing.spinning``). ORT's dequantized outputs are compared with qjax's in units of
the output scale (LSB); ORT's u8s8 kernels may saturate int16 pair sums on CPUs without
VNNI (its documented behaviour), so the host level (:func:`qjax.kernels.host_level`) is printed.
``QJAX_BENCH_QUICK=1``: 5 repeats instead of 15.

The headline (the one the goals are for, issue 16: >= 3x JAX f32, >= 1.2x torch onednn,
>= 1.0x onnxruntime): ``qjax auto``, the ``"onednn"``-scheme program with every conv and
the FC on the kernel ``kernel="auto"`` picks here, each layer's requantization folded in
at prepare time where it is one fused native call (:func:`qjax.kernels.fold_requant`)
and the boundary quantize, the max pool and the dequantize native (``kernel="auto"``
of ``quantize_input``, ``max_pool2d``, ``dequantize_output``); its outputs
are checked equal to the XLA program's. Where ``"auto"`` picks XLA, the XLA program is
the headline. ``BENCH`` lines: best JAX f32 / it, torch onednn / it, torch x86 / it and
onnxruntime / it, and for reference the XLA program's.

``qjax amx``: the same programs with every conv and the FC prepared with ``kernel="amx"``
(the native AMX int8 kernels, :func:`qjax.kernels.native_status`); left out, with the
reason printed, where unavailable. ``qjax amx fused (fbgemm)``: the ``"fbgemm"``-scheme
program on AMX, whose convs and FC each run as one fused native call (int8 GEMM +
requantize; bit-exact with torch fbgemm, checked below); its ``BENCH`` lines are the
ones suffixed `` (amx)`` — the goal compares speed with torch's fastest engine here
(onednn), whose own requantization the ``"onednn"`` scheme emulates within rule 13's
bound but which the native kernel does not fuse (``qjax amx (onednn scheme)``: AMX dot +
XLA epilogue, printed for information).

``qjax onednn``: the same programs with every conv and the FC prepared with
``kernel="onednn"`` (oneDNN's brgemm ukernel from torch's CPU wheel, where it is the
provider and exact: :func:`qjax.kernels.onednn_exact`): ``(onednn scheme)`` the ukernel's
int32 accumulators with qjax's XLA epilogue of rule 13, ``fused (fbgemm)`` one call per
layer (conv/linear + requantize); their ``BENCH`` lines are suffixed `` (onednn)`` and
`` (onednn, fbgemm scheme)``.
"""

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
    torch_threads_line,
)
from qjax.converters.onnx import export_onnx  # noqa: E402

import qjax  # noqa: E402
from qjax.kernels import (  # noqa: E402
    QArray,
    dequantize_output,
    flatten,
    fold_requant,
    host_level,
    max_pool2d,
    native_status,
    onednn_exact,
    prepare_conv,
    prepare_linear,
    quantize_input,
    quantized_conv,
    quantized_linear,
)
from qjax.kernels._choice import conv_kernel  # noqa: E402
from qjax.kernels._native import onednn_fused  # noqa: E402

torch.set_num_threads(2)
warnings.filterwarnings("ignore")
BATCH = 64
AQ = torch.ao.quantization


class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.quant = AQ.QuantStub()
        self.conv1 = torch.nn.Conv2d(1, 32, 3, padding=1)
        self.relu1 = torch.nn.ReLU()
        self.conv2 = torch.nn.Conv2d(32, 64, 3, padding=1)
        self.relu2 = torch.nn.ReLU()
        self.pool = torch.nn.MaxPool2d(2)
        self.fc = torch.nn.Linear(64 * 14 * 14, 10)
        self.dequant = AQ.DeQuantStub()

    def forward(self, x):
        x = self.quant(x)
        x = self.relu1(self.conv1(x))
        x = self.pool(self.relu2(self.conv2(x)))
        return self.dequant(self.fc(torch.flatten(x, 1)))


def converted(float_model, engine, calib):
    torch.backends.quantized.engine = engine
    m = Net()
    m.load_state_dict(float_model.state_dict())
    m.eval()
    m.qconfig = AQ.get_default_qconfig(engine)
    m = AQ.fuse_modules(m, [["conv1", "relu1"], ["conv2", "relu2"]])
    AQ.prepare(m, inplace=True)
    m(calib)
    return AQ.convert(m)


def _qarray_weight(wq):
    vals = jnp.asarray(wq.int_repr().numpy())
    if wq.qscheme() in (torch.per_channel_affine, torch.per_channel_symmetric):
        spec = qjax.QuantSpec(signed=True, axis=0)
        qp = qjax.QParams(
            scale=jnp.asarray(wq.q_per_channel_scales().numpy(), jnp.float32),
            zero_point=jnp.asarray(wq.q_per_channel_zero_points().numpy(), jnp.int32),
            spec=spec,
        )
    else:
        qp = qjax.QParams(wq.q_scale(), wq.q_zero_point(), qjax.QuantSpec(signed=True))
    return vals, qp


def qjax_program(qm, scheme, kernel="xla", fold=False):
    """The torch-converted model ``qm`` as a jitted qjax function: every conv and the FC
    prepared for ``kernel``; ``fold``: each layer's requantization folded in at prepare
    time (``fold_requant``) and the boundary quantize and dequantize native
    (``kernel="auto"``)."""
    u8 = qjax.QuantSpec(signed=False)

    def act_qp(mod):
        return qjax.QParams(float(mod.scale), int(mod.zero_point), u8)

    in_qp = act_qp(qm.quant)
    prev, convs = in_qp, []
    for mod in (qm.conv1, qm.conv2):
        vals, qp = _qarray_weight(mod.weight())
        w = prepare_conv(QArray(vals, qp), name="conv", weight_layout="OIHW", kernel=kernel)
        b, oq = jnp.asarray(mod.bias().detach().numpy()), act_qp(mod)
        if fold:
            w = fold_requant(w, prev, b, oq, scheme=scheme, activation="relu")
        convs.append((w, b, oq))
        prev = oq
    # FC: torch flattens NCHW (c, h, w); the qjax activations are NHWC (h, w, c).
    vals, qp = _qarray_weight(qm.fc.weight())  # (10, 12544) per output channel
    perm = np.arange(64 * 14 * 14).reshape(64, 14, 14).transpose(1, 2, 0).reshape(-1)
    vals = vals[:, perm].T  # (K, N) in NHWC order
    fc_qp = qjax.QParams(qp.scale, qp.zero_point, qp.spec.replace(axis=1))
    fc = prepare_linear(QArray(vals, fc_qp), name="fc", kernel=kernel)
    fc_b = jnp.asarray(qm.fc.bias().detach().numpy())
    fc_out = act_qp(qm.fc)
    if fold:
        fc = fold_requant(fc, prev, fc_b, fc_out, scheme=scheme)
    quant = "auto" if fold else "xla"

    @jax.jit
    def run(x_nchw):
        h = quantize_input(jnp.transpose(x_nchw, (0, 2, 3, 1)), in_qp, kernel=quant)
        for w, b, oq in convs:
            h = quantized_conv(
                h, w, b, oq, padding=1, layout="NHWC", scheme=scheme, activation="relu"
            )
        h = flatten(max_pool2d(h, 2, layout="NHWC", kernel=quant))
        h = quantized_linear(h, fc, fc_b, fc_out, scheme=scheme)
        return dequantize_output(h, kernel=quant)

    return run


def main():
    torch.manual_seed(0)
    float_model = Net().eval()
    x = torch.rand(BATCH, 1, 28, 28)
    xj = jnp.asarray(x.numpy())
    models = {e: converted(float_model, e, x) for e in ("onednn", "x86", "fbgemm")}

    sd = {k: jnp.asarray(v.numpy()) for k, v in float_model.state_dict().items()}

    @jax.jit
    def f32(x):
        dn = ("NCHW", "OIHW", "NCHW")
        h = jax.lax.conv_general_dilated(
            x, sd["conv1.weight"], (1, 1), "SAME", dimension_numbers=dn
        )
        h = jax.nn.relu(h + sd["conv1.bias"][:, None, None])
        h = jax.lax.conv_general_dilated(
            h, sd["conv2.weight"], (1, 1), "SAME", dimension_numbers=dn
        )
        h = jax.nn.relu(h + sd["conv2.bias"][:, None, None])
        h = jax.lax.reduce_window(h, -jnp.inf, jax.lax.max, (1, 1, 2, 2), (1, 1, 2, 2), "VALID")
        return h.reshape(BATCH, -1) @ sd["fc.weight"].T + sd["fc.bias"]

    @jax.jit
    def f32_nhwc(x):
        dn = ("NHWC", "OIHW", "NHWC")
        h = jnp.transpose(x, (0, 2, 3, 1))
        h = jax.lax.conv_general_dilated(
            h, sd["conv1.weight"], (1, 1), "SAME", dimension_numbers=dn
        )
        h = jax.nn.relu(h + sd["conv1.bias"])
        h = jax.lax.conv_general_dilated(
            h, sd["conv2.weight"], (1, 1), "SAME", dimension_numbers=dn
        )
        h = jax.nn.relu(h + sd["conv2.bias"])
        h = jax.lax.reduce_window(h, -jnp.inf, jax.lax.max, (1, 2, 2, 1), (1, 2, 2, 1), "VALID")
        return jnp.transpose(h, (0, 3, 1, 2)).reshape(BATCH, -1) @ sd["fc.weight"].T + sd["fc.bias"]

    progs = {"onednn": qjax_program(models["onednn"], "onednn")}
    progs["fbgemm"] = qjax_program(models["fbgemm"], "fbgemm")
    amx, amx_reason = native_status()
    if amx:
        progs["onednn amx"] = qjax_program(models["onednn"], "onednn", kernel="amx")
        # the fused AMX path (conv/linear + requantize in one call) covers fbgemm/qnnpack
        progs["fbgemm amx"] = qjax_program(models["fbgemm"], "fbgemm", kernel="amx")
    dnn, dnn_reason = onednn_exact()
    dnn = dnn and onednn_fused()  # convs need the brgemm ukernel provider
    if dnn:
        progs["onednn onednn"] = qjax_program(models["onednn"], "onednn", kernel="onednn")
        progs["fbgemm onednn"] = qjax_program(models["fbgemm"], "fbgemm", kernel="onednn")
    # the headline (goals): kernel="auto"'s choice here, onednn scheme (torch onednn's
    # codes within rule 13), requantization folded where the layer is one fused call
    auto = conv_kernel("auto", 2)
    fold = auto == "onednn" and dnn
    if auto != "xla":
        progs["onednn auto"] = qjax_program(models["onednn"], "onednn", kernel=auto, fold=fold)
    headline = f"qjax auto ({auto}{', folded' if fold else ''})" if auto != "xla" else None
    # ORT: qjax's export of the onednn-converted model (what the timed qjax program runs)
    torch.backends.quantized.engine = "onednn"  # import_model runs the model once
    program = qtorch.import_model(models["onednn"], (x,), engine="onednn")
    sess = ort_session(export_onnx(program, (x.numpy(),)))
    ort_feed = {sess.get_inputs()[0].name: x.numpy()}
    print(machine_line())
    print(torch_threads_line(torch))
    print(
        f"{ort_version()}, 2 intra-op threads, ORT_ENABLE_ALL, sequential, "
        f"spinning {'on' if spinning() else 'off'}; host level "
        f"{host_level()} (ORT's u8s8 kernels may saturate int16 pair sums below vnni)"
    )
    print(load_line())
    print(f"qjax amx: {'timed' if amx else 'left out'} ({amx_reason})")
    print(f"qjax onednn: {'timed' if dnn else 'left out'} ({dnn_reason})")
    print(f"headline (goals): {headline or 'qjax int8 (onednn scheme), XLA'}")
    for key, prog in progs.items():
        eng = key.split()[0]
        torch.backends.quantized.engine = eng
        want = models[eng](x).numpy()
        got = np.asarray(prog(xj))
        suffix = f" ({key.split()[1]})" if " " in key else ""
        print(
            f"qjax scheme {eng!r}{suffix} vs torch {eng}: "
            f"{int((got != want).sum())} of {got.size} outputs differ"
        )
    qout = np.asarray(progs["onednn"](xj))
    if headline:
        got = np.asarray(progs["onednn auto"](xj))
        print(f"{headline} vs qjax XLA (onednn scheme): {int((got != qout).sum())} differ")
    same = int((np.asarray(program(x.numpy())) != qout).sum())
    mism, n, mx = lsb_diff(sess.run(None, ort_feed)[0], qout, float(models["onednn"].fc.scale))
    print(
        f"ORT vs qjax: {mism} of {n} codes differ (max {mx} LSB) (qjax scheme 'onednn'; "
        f"imported program vs qjax: {same} of {n} outputs differ)"
    )

    def torch_fn(eng):
        def f():
            torch.backends.quantized.engine = eng
            with torch.no_grad():
                return models[eng](x)

        return f

    fns = {
        "qjax int8 (onednn scheme)": lambda: progs["onednn"](xj),
        "qjax int8 (fbgemm scheme)": lambda: progs["fbgemm"](xj),
        "jax f32 NCHW": lambda: f32(xj),
        "jax f32 NHWC": lambda: f32_nhwc(xj),
        "torch onednn": torch_fn("onednn"),
        "torch x86": torch_fn("x86"),
        "torch fbgemm": torch_fn("fbgemm"),
        "onnxruntime": lambda: sess.run(None, ort_feed),
    }
    if amx:
        fns["qjax amx (onednn scheme)"] = lambda: progs["onednn amx"](xj)
        fns["qjax amx fused (fbgemm)"] = lambda: progs["fbgemm amx"](xj)
    if dnn:
        fns["qjax onednn (onednn scheme)"] = lambda: progs["onednn onednn"](xj)
        fns["qjax onednn fused (fbgemm)"] = lambda: progs["fbgemm onednn"](xj)
    if headline:
        fns[headline] = lambda: progs["onednn auto"](xj)
    b = blocks()
    t = interleaved(fns, repeats=max((5 if quick() else 15) // b, 3), block=b, settle=settle())
    for k, v in t.items():
        print(f"{k:28s} {v * 1e3:8.2f} ms")
    q = t["qjax int8 (onednn scheme)"]
    best_f32 = min(t["jax f32 NCHW"], t["jax f32 NHWC"])
    head = t[headline] if headline else q
    print(f"headline {headline or 'qjax int8 (onednn scheme)'}:")
    print(f"  best JAX f32 / it: {best_f32 / head:.2f}x  (goal >= 3x)")
    print(f"  torch onednn / it: {t['torch onednn'] / head:.2f}x  (goal >= 1.2x)")
    print(f"  torch x86 / it: {t['torch x86'] / head:.2f}x")
    print(f"  onnxruntime / it: {t['onnxruntime'] / head:.2f}x  (goal >= 1.0x)")
    print(load_line())
    case = f"batch {BATCH} 28x28"
    hcase = case + (f" ({headline[5:]})" if headline else "")
    bench_line("int8_cnn", hcase, best_f32 / head, "jax f32 (best layout)", ">= 3x")
    bench_line("int8_cnn", hcase, t["torch onednn"] / head, "torch onednn", ">= 1.2x")
    bench_line("int8_cnn", hcase, t["torch x86"] / head, "torch x86")
    bench_line("int8_cnn", hcase, t["onnxruntime"] / head, "onnxruntime", ">= 1.0x")
    if headline:  # the XLA program, for reference
        bench_line("int8_cnn", case, best_f32 / q, "jax f32 (best layout)")
        bench_line("int8_cnn", case, t["torch onednn"] / q, "torch onednn")
    if amx:
        qa = t["qjax amx (onednn scheme)"]
        print(f"qjax int8 / qjax amx: {q / qa:.2f}x")
        qf = t["qjax amx fused (fbgemm)"]
        print(
            f"qjax amx fused (fbgemm scheme): best JAX f32 / it {best_f32 / qf:.2f}x, "
            f"torch onednn / it {t['torch onednn'] / qf:.2f}x, torch fbgemm / it "
            f"{t['torch fbgemm'] / qf:.2f}x (its codes are torch fbgemm's), onnxruntime / it "
            f"{t['onnxruntime'] / qf:.2f}x"
        )
        bench_line("int8_cnn", case + " (amx)", best_f32 / qf, "jax f32 (best layout)")
        bench_line("int8_cnn", case + " (amx)", t["torch onednn"] / qf, "torch onednn")
        bench_line("int8_cnn", case + " (amx)", t["torch fbgemm"] / qf, "torch fbgemm")
        bench_line("int8_cnn", case + " (amx)", t["onnxruntime"] / qf, "onnxruntime")
    if dnn:
        qo, qd = t["qjax onednn (onednn scheme)"], t["qjax onednn fused (fbgemm)"]
        print(f"qjax int8 (xla) / qjax onednn, onednn scheme: {q / qo:.2f}x")
        print(
            f"qjax onednn fused (fbgemm scheme): best JAX f32 / it {best_f32 / qd:.2f}x, "
            f"torch onednn / it {t['torch onednn'] / qd:.2f}x, torch fbgemm / it "
            f"{t['torch fbgemm'] / qd:.2f}x (its codes are torch fbgemm's), onnxruntime / it "
            f"{t['onnxruntime'] / qd:.2f}x; qjax fbgemm (xla) / it "
            f"{t['qjax int8 (fbgemm scheme)'] / qd:.2f}x"
        )
        for name, tq in (("(onednn)", qo), ("(onednn, fbgemm scheme)", qd)):
            bench_line("int8_cnn", f"{case} {name}", best_f32 / tq, "jax f32 (best layout)")
            bench_line("int8_cnn", f"{case} {name}", t["torch onednn"] / tq, "torch onednn")
            bench_line("int8_cnn", f"{case} {name}", t["onnxruntime"] / tq, "onnxruntime")


if __name__ == "__main__":
    main()
