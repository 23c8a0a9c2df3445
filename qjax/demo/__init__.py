"""``qjax demo``: the whole job on sklearn's digits, end to end, checked against PyTorch.

Stages (each with a progress bar and a printed time):

1. float training of a small CNN (:func:`qjax.demo._data.make_model`) in Flax NNX + optax;
2. PTQ: the float weights in a model with torch's preset ``default_qconfig(engine)``,
   ``calibrate`` (histogram observers), ``qjax.convert`` -> int8 served;
3. QAT: the float model with torch's QAT qconfig (``scheme="fbgemm"``), calibrated,
   fine-tuned in ``Mode.QAT``, frozen and served: served == frozen fake-quant, exactly;
4. speed: the int8 served forward vs the float jitted forward (interleaved medians); where
   :func:`qjax.kernels.native_status` says the native AMX kernel runs, the same model
   converted for it too (``qjax.convert(..., kernel="amx")``), whose outputs must equal
   the XLA kernel's exactly (otherwise the row says why it is missing); where oneDNN's
   ukernel runs exactly instead (:func:`qjax.kernels.onednn_exact`, no AMX), the same for
   ``kernel="onednn"``; below VNNI (neither), for ``kernel="auto"``, which runs the
   layers with 7-bit activations on the saturating kernel (:func:`qjax.kernels.sat16_status`);
5. torch: the same CNN as a torch eager model with the same weights (float logits
   checked), torch eager PTQ per engine (fbgemm, qnnpack, x86, onednn where supported) on
   the same calibration batches; the converted model imported into qjax and compared
   integer by integer (``qjax.parity.compare``); and qjax's own PTQ codes compared with
   torch's directly (same preset, same batches);
6. plots (``qjax.debug``): activation histograms with the chosen ranges, per-layer SQNR
   of the PTQ model, the accuracy table; ``summary.md`` / ``summary.json``.

qjax's own PTQ vs torch's PTQ (same preset, same batches) is reported, not promised: the
input quantizer and the dense layer's weights come out identical (same qparams, same
codes), but the conv layers do not, because the float values the observers see differ
before any quantization. torch's ``fuse_modules`` folds BN into the float32 weight as
``w·(γ·rsqrt(var+ε))`` and then observes ``conv(x, w_fold) + b_fold``; qjax's
``QuantConvBn`` observes ``w·(γ/sqrt(var+ε))`` and ``conv(x, w·f)/f`` followed by BN (the
QAT formula), and serves a float64 fold. Weights then differ in the last ulp, a few
per-channel scales by one ulp, the histogram ranges by one ulp, and about 0.1-1% of the
conv codes by one step (per-layer counts and the weight evidence are in the summary).
With ``reduce_range`` (fbgemm, x86) there is a second cause, larger steps: torch's
converted ops clamp to the whole quint8 range 0..255 although the observer computed the
qparams for 0..127, while ``qjax.convert`` serves the fake-quant range 0..127 (so that
served == frozen); test activations beyond the calibrated range then differ by more than
one step (counted per layer as "torch codes outside qjax's range").

Exit status 1 when a promised exactness fails (served != frozen QAT; served on AMX !=
served on XLA; torch float logits
off by more than 1e-4; parity mismatches on fbgemm/qnnpack, or more than one LSB on
x86/onednn, NUMERICS.md rule 13), naming what failed.
"""

from __future__ import annotations

import copy
import pathlib
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ._data import accuracy, copy_float_weights, data, interleaved, make_model, train

ENGINES = ("fbgemm", "qnnpack", "x86", "onednn")  # kernels.TORCH_ENGINES, display order
# torch's engine -> the qjax preset whose calibration it shares and the one convert
# scheme that serves it (x86 runs oneDNN convs and FBGEMM linears: no single scheme)
_PRESET = {"fbgemm": "x86", "x86": "x86", "qnnpack": "qnnpack", "onednn": "onednn"}
_DIRECT_SCHEME = {"fbgemm": "fbgemm", "qnnpack": "qnnpack", "onednn": "onednn"}
_TORCH_NAMES = ["quant", "conv1", "conv2", "pool", "flatten", "fc"]  # integer steps
# the served program's quantized activations (its trace, in order); its flatten moves
# the pool's codes without a step of its own
_TRACED_NAMES = ["quant", "conv1", "conv2", "pool", "fc"]


class _Stages:
    def __init__(self):
        self.seconds: dict[str, float] = {}
        self.cpu_seconds: dict[str, float] = {}

    def run(self, name: str, fn):
        print(f"[{name}] ...", flush=True)
        t0, c0 = time.perf_counter(), time.process_time()
        out = fn()
        self.seconds[name] = round(time.perf_counter() - t0, 2)
        self.cpu_seconds[name] = round(time.process_time() - c0, 2)
        print(f"[{name}] done in {self.seconds[name]:.1f} s (CPU {self.cpu_seconds[name]:.1f} s)",
              flush=True)  # fmt: skip
        return out


def _check(checks: list, name: str, result: str, ok: bool) -> None:
    checks.append({"name": name, "result": result, "ok": bool(ok)})


def _float_stage(xtr, ytr, xte, yte, epochs, seed, bar):
    from .. import flax as qflax
    from ..flax import nnx as qnnx

    cfg = qflax.default_qat_qconfig("x86").replace(quantize_input=True, scheme="fbgemm")
    model = make_model(nnx.Rngs(seed), cfg)
    qnnx.set_mode(model, qflax.Mode.FLOAT)
    train(model, xtr, ytr, epochs, 1e-2, seed=seed, desc="float training", bar=bar)
    qnnx.freeze_bn_stats(model)  # running BN statistics from here on (torch's eval())
    logits = np.asarray(nnx.jit(lambda m, x: m(x))(model, jnp.asarray(xte)))
    return model, logits


def _ptq_stage(model, presets, batches, xte, bar):
    """qjax PTQ with torch's presets: ``{preset: (calibrated model, {scheme: served})}``."""
    import qjax

    from ..flax import default_qconfig
    from ..flax import nnx as qnnx

    out = {}
    for preset, schemes in presets.items():
        ptq = make_model(nnx.Rngs(0), default_qconfig(preset))
        copy_float_weights(model, ptq)
        qnnx.freeze_bn_stats(ptq)
        qnnx.calibrate(ptq, batches, progress=bar)  # ends in Mode.FROZEN
        out[preset] = (ptq, {s: qjax.convert(ptq, xte[:1], scheme=s) for s in schemes})
    return out


def _qat_stage(model, batches, xtr, ytr, xte, qat_epochs, seed, bar):
    import qjax

    from ..flax import Mode
    from ..flax import nnx as qnnx

    qat = copy.deepcopy(model)
    qnnx.calibrate(qat, batches, progress=bar)
    qnnx.set_mode(qat, Mode.QAT)
    train(qat, xtr, ytr, qat_epochs, 1e-3, seed=seed + 1, desc="QAT fine-tuning", bar=bar)
    qnnx.set_mode(qat, Mode.FROZEN)
    frozen = np.asarray(nnx.jit(lambda m, x: m(x))(qat, jnp.asarray(xte)))
    served = qjax.convert(qat, xte[:1], scheme="fbgemm")
    return qat, frozen, served, np.asarray(served(jnp.asarray(xte)))


def _speed_stage(model, qat, served, served_out, xte, batch, repeats, checks):
    """Float vs int8 (XLA kernel) and, where it runs, int8 on the native AMX kernel, or
    else on oneDNN's ukernel where it is exact: the QAT model converted again for it, its
    outputs on the test images checked == XLA's."""
    import qjax

    from ..kernels import native_status, onednn_exact, sat16_status

    x = jnp.asarray(np.resize(xte, (batch,) + xte.shape[1:]))  # test images, cycled
    graphdef, state = nnx.split(model)
    float_fwd = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x))
    fns = {"float": lambda: float_fwd(state, x), "int8": lambda: served(x)}
    ok, reason = native_status()
    # AMX where it runs, else oneDNN's ukernel where it is exact: the same model converted
    # for the kernel, its outputs checked == XLA's, then timed with the others
    dnn = (False, "AMX runs here") if ok else onednn_exact()
    exact_here = (False, "an exact AMX / VNNI kernel runs here")
    natives = {
        "amx": ("AMX", ok, reason),
        "onednn": ("oneDNN", *dnn),
        # below VNNI: kernel="auto" puts the layers whose int16 pair sums cannot saturate
        # (7-bit activations) on the saturating kernel, the same integers
        "sat16": ("sat16", *(exact_here if ok or dnn[0] else sat16_status())),
    }
    info = {}
    for kernel, (label, available, why) in natives.items():
        info[kernel] = {"available": available, "reason": why}
        if not available:
            continue
        wish = "auto" if kernel == "sat16" else kernel
        fast = qjax.convert(qat, xte[:1], scheme="fbgemm", kernel=wish)
        info[kernel]["kernels"] = fast.kernels
        got = np.asarray(fast(jnp.asarray(xte)))
        n, bad = int(got.size), int((got != served_out).sum())
        info[kernel].update(compared=n, mismatches=bad)
        _check(checks, f"int8 served on {label} == on XLA (test-image outputs)",
               f"{bad} of {n} outputs differ", bad == 0)  # fmt: skip
        fns[kernel] = lambda fast=fast: fast(x)
    # turns of 5 calls: qjax's helper threads spin a while after a native call
    # (QJAX_SPIN_US), only a turn's first call meets the previous contender's
    t = interleaved(fns, repeats=max(1, repeats // 5), block=5)
    f_ms, i_ms = 1e3 * t["float"], 1e3 * t["int8"]
    out = {"batch": batch, "repeats": repeats, "float_ms": f_ms, "int8_ms": i_ms,
           "ratio": i_ms / f_ms, **info}  # fmt: skip
    for kernel in natives:
        if kernel in t:
            ms = 1e3 * t[kernel]
            out.update({f"{kernel}_ms": ms, f"{kernel}_ratio": ms / f_ms,
                        f"{kernel}_vs_int8": ms / i_ms})  # fmt: skip
    return out


def _torch_stage(model, float_logits, ptqs, engines, calib, xte, yte, checks, bar):
    import torch

    from qjax.converters.torch import import_model, torch_trace

    from .. import parity
    from ..kernels import engine as qengine
    from ._data import progress
    from ._torch import (
        engine,
        to_nchw,
        torch_float_model,
        torch_ptq,
        weight_differences,
    )

    tmodel = torch_float_model(model)
    xt = to_nchw(xte)
    with torch.no_grad():
        diff = float(np.abs(tmodel(xt).numpy() - float_logits).max())
    _check(checks, "torch float logits == JAX float logits", f"max |diff| {diff:.2g}", diff <= 1e-4)
    if diff > 1e-4:
        return {}, diff
    tb = [to_nchw(b) for b in calib]
    results = {}
    for eng in progress(engines, len(engines), "torch PTQ + parity", bar):
        with engine(eng):
            qm = torch_ptq(tmodel, eng, tb)
            program = import_model(qm, (xt[:1],), engine=eng)
            rep = parity.compare(qm, program, xt)
            with torch.no_grad():
                acc = accuracy(qm(xt).numpy(), yte)
            ref = torch_trace(qm, xt)
        max_lsb = max((la.max_lsb for la in rep.layers), default=0)
        # the promise at this CPU level: oneDNN's epilogue (rule 13) is the only inexact
        # part; x86 convs run it only on VNNI CPUs (qjax.kernels._levels)
        e_here = qengine(eng)
        exact = eng in ("fbgemm", "qnnpack") or (eng == "x86" and not e_here.x86_conv_onednn)
        promise = "0 mismatches" if exact else "<= 1 LSB (rule 13)"
        ok = rep.mismatches == 0 if exact else max_lsb <= 1
        _check(checks, f"parity {eng}: qjax import == torch", f"{rep.mismatches} of "
               f"{rep.values} differ, max {max_lsb} LSB", ok)  # fmt: skip
        e = {
            "accuracy": acc,
            "level": program.level or "-",
            "parity": {
                "values": rep.values,
                "mismatches": rep.mismatches,
                "max_lsb": max_lsb,
                "promise": promise,
                "ok": ok,
                "report": rep.to_dict(),
            },  # fmt: skip
            "direct": None,
        }
        scheme = _DIRECT_SCHEME.get(eng)
        if scheme is not None and _PRESET[eng] in ptqs:
            served = ptqs[_PRESET[eng]][1][scheme]
            e["direct"] = _direct(served, ref, xte, eng)
            e["direct"]["weights"] = weight_differences(served, qm)
        results[eng] = e
    return results, diff


def _direct(served, ref, xte, eng) -> dict:
    """qjax's own PTQ (torch's preset, same batches) served with ``eng``'s scheme vs the
    codes torch's converted model computes: per layer mismatches and qparams equality."""
    from .. import parity
    from ._torch import served_codes

    mine = served_codes(served, xte, _TRACED_NAMES, flatten=("pool", "flatten"))
    rep = parity.compare_traces({n: ref[n] for n in _TORCH_NAMES}, mine, engine=eng)
    same, outside = [], []
    for n in _TORCH_NAMES:
        a, b = ref[n].qparams, mine[n].qparams
        s_eq = np.float32(np.asarray(a.scale)) == np.float32(np.asarray(b.scale))
        z_eq = int(np.asarray(a.zero_point)) == int(np.asarray(b.zero_point))
        same.append(bool(s_eq and z_eq))
        # torch clamps converted activations to the dtype (0..255) even with reduce_range;
        # qjax serves the fake-quant range (0..127): codes torch puts outside it
        t = np.asarray(ref[n].values).astype(np.int64)
        outside.append(int(((t < b.spec.qmin) | (t > b.spec.qmax)).sum()))
    return {
        "values": rep.values,
        "mismatches": rep.mismatches,
        "layers": len(_TORCH_NAMES),
        "qparams_equal": sum(same),
        "per_layer": [
            {"layer": la.name, "values": la.values, "mismatches": la.mismatches,
             "max_lsb": la.max_lsb, "same_qparams": s, "torch_outside_qjax_range": o,
             "torch_scale": float(np.asarray(ref[la.name].qparams.scale)),
             "qjax_scale": float(np.asarray(mine[la.name].qparams.scale))}
            for la, s, o in zip(rep.layers, same, outside, strict=True)
        ],
    }  # fmt: skip


def _plots(ptq_model, xte, summary, out: pathlib.Path) -> dict:
    from .. import debug
    from ._report import plot_accuracy

    hists = debug.activation_histograms(ptq_model, jnp.asarray(xte))
    errors = debug.layer_errors(ptq_model, jnp.asarray(xte))
    summary["sqnr_db"] = {f"{e.path} {e.kind}": e.sqnr_db for e in errors}
    return {
        "histograms": str(debug.plot_histograms(hists, out / "histograms.png")),
        "sqnr": str(debug.plot_layer_errors(errors, out / "sqnr.png")),
        "accuracy": str(plot_accuracy(summary, out / "accuracy.png")),
    }


def run_demo(
    out: str | pathlib.Path = "qjax-demo",
    *,
    epochs: int = 8,
    qat_epochs: int = 2,
    seed: int = 0,
    quick: bool = False,
    progress: bool = True,
) -> int:
    """Run the demo (module docstring), print the summary, write it and the plots under
    ``out``; return 0, or 1 when a promised exactness failed (named in the output).

    ``quick``: 1 epoch each, two calibration batches, engine fbgemm only, few
    timing repeats (for tests; the accuracy is then low)."""
    import torch

    from ._report import write_summary

    out = pathlib.Path(out)
    st = _Stages()
    (xtr, ytr), (xte, yte) = data(seed)
    if quick:
        epochs, qat_epochs = min(epochs, 1), min(qat_epochs, 1)
    n_calib = 2 if quick else 4
    calib = [xtr[i * 256 : (i + 1) * 256] for i in range(n_calib)]
    batches = [jnp.asarray(b) for b in calib]
    engines = [e for e in (ENGINES[:1] if quick else ENGINES)
               if e in torch.backends.quantized.supported_engines]  # fmt: skip
    presets: dict[str, list[str]] = {"x86": ["fbgemm"]}  # the PTQ row: torch's x86 preset
    for e in engines:
        if e in _DIRECT_SCHEME:
            presets.setdefault(_PRESET[e], [])
            if _DIRECT_SCHEME[e] not in presets[_PRESET[e]]:
                presets[_PRESET[e]].append(_DIRECT_SCHEME[e])
    checks: list[dict] = []

    model, float_logits = st.run(
        "float training", lambda: _float_stage(xtr, ytr, xte, yte, epochs, seed, progress)
    )
    ptqs = st.run("PTQ calibrate + convert", lambda: _ptq_stage(model, presets, batches, xte,
                                                                 progress))  # fmt: skip
    ptq_served = ptqs["x86"][1]["fbgemm"]
    qat, frozen, served, served_out = st.run(
        "QAT + convert", lambda: _qat_stage(model, batches, xtr, ytr, xte, qat_epochs, seed,
                                            progress)
    )  # fmt: skip
    mism = int((served_out != frozen).sum())
    _check(checks, "QAT int8 served == frozen fake-quant", f"{mism} of {frozen.size} outputs "
           "differ", mism == 0)  # fmt: skip
    speed = st.run("speed", lambda: _speed_stage(model, qat, served, served_out, xte, 256,
                                                  5 if quick else 30, checks))  # fmt: skip
    engines_out, diff = st.run(
        "torch PTQ + parity",
        lambda: _torch_stage(model, float_logits, ptqs, engines, calib, xte, yte, checks,
                             progress),
    )  # fmt: skip
    summary = {
        "n_test": len(yte),
        "epochs": epochs,
        "qat_epochs": qat_epochs,
        "calibration_images": int(sum(len(b) for b in calib)),
        "accuracy": {
            "float (JAX, Flax NNX)": accuracy(float_logits, yte),
            "PTQ int8 served (torch x86 preset)": accuracy(ptq_served(jnp.asarray(xte)), yte),
            "QAT fake-quant (frozen)": accuracy(frozen, yte),
            "QAT int8 served": accuracy(served_out, yte),
        },
        "served_vs_frozen": {"compared": int(frozen.size), "mismatches": mism},
        "torch_float_max_abs_diff": diff,
        "speed": speed,
        "engines": engines_out,
        "checks": checks,
    }
    summary["plots"] = st.run("plots", lambda: _plots(ptqs["x86"][0], xte, summary, out))
    summary["stage_seconds"], summary["stage_cpu_seconds"] = st.seconds, st.cpu_seconds
    summary["ok"] = all(c["ok"] for c in checks)
    print()
    print(write_summary(summary, out))
    print(f"\nwrote {out}/summary.md, summary.json, histograms.png, sqnr.png, accuracy.png")
    failed = [c for c in checks if not c["ok"]]
    for c in failed:
        print(f"FAILED: {c['name']}: {c['result']}")
    return 1 if failed else 0
