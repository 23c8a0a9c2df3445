"""int16-saturating emulation (torch's int8 engines below VNNI) vs the exact int8 path.

Run: ``.venv/bin/python benchmarks/int8_sat16.py``. One torch int8 MLP 784-1024-1024-10
(eager ``convert``, x86 qconfig, per-channel weights), imported per CPU level torch could
have run at (:mod:`qjax.kernels._levels`):

* exact: ``isa="vnni"`` (exact int32 accumulation) on the fastest exact kernel here,
  ``kernel="auto"`` (AMX or oneDNN's ukernel where they run exactly, else XLA) -- the
  baseline; and with ``kernel="xla"`` (XLA's int8 dot), a second baseline;
* sat16 native: ``isa="avx2"`` / ``"avx512"`` with the default kernel (saturating
  layers on the native ``qjax_sat16_gemm``, :func:`qjax.kernels.sat16_status`) on the
  best code path of this CPU (:func:`qjax.kernels._native._sat16.sat16_isa`), and the
  same forced to its AVX2 code (``QJAX_SAT16_ISA=avx2``, what it ran before the AVX-512
  path; on an AVX2-only CPU both are the AVX2 code);
* sat16 XLA: the same import with ``kernel="xla"`` (the pure-XLA formulation,
  exportable), timed with fewer repeats (it is 100x and more slower).

At batch 1, 32 and 256; medians of interleaved runs in one process. The native and XLA
sat16 programs' outputs are compared (mismatch count printed). Goal (issue 16): every
CPU-level emulation within 1.2x of the fastest exact path's time. ``BENCH`` lines: the
headline, both programs frozen (``Program.freeze()``: the params compiled in, as
``int8_mlp``'s headline), exact (``kernel="auto"``) / sat16-native time per level and
batch (goal ``>= 0.83``, i.e. sat16 <= 1.2x exact); the same with the params as jit
arguments, and against the XLA exact path. Each saturating layer is one native call with
its requantization folded in (``qjax_sat16_q8_gemm``, :func:`qjax.kernels.fold_requant`).
What bounds it on a VNNI CPU: ``vpdpbusd`` does 64 multiply-adds in one instruction, the
emulation needs
``vpmaddubsw`` + ``vpdpwssd`` (two multiplies) for the same 64.

Second table: the CNN of ``int8_cnn.py`` the same way (:func:`cnn_emulation`), from
torch's x86 and onednn engines: its convs on the fused sat16 conv, batch 64, frozen;
``BENCH`` lines with the same goal.

Third table (issue 16 item 2): a Flax MLP of the same sizes and a Flax CNN of
``int8_cnn.py``'s shapes with 7-bit activations (torch's x86 qconfig, ``reduce_range``)
served by ``qjax.convert``; their exactly accumulated layers on the sat16 kernel (its
AVX2 and AVX-512BW code, what a CPU below VNNI runs; ``kernel="auto"`` with the AMX and
oneDNN probes answering no) against XLA's int8 dot / conv (compiled for this CPU),
outputs checked equal. ``QJAX_BENCH_QUICK=1``: fewer repeats.
"""

import contextlib
import functools
import os
import warnings

# before torch: its OpenMP reads the wait policy once; qjax's helpers sleep between calls
import _timing  # noqa: E402

_timing.wait_policy()

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from _timing import (  # noqa: E402
    bench_line,
    interleaved,
    load_line,
    machine_line,
    quick,
    table,
)
from qjax.converters.torch import import_model  # noqa: E402
from torch import nn  # noqa: E402
from torch.ao.quantization import (  # noqa: E402
    DeQuantStub,
    QuantStub,
    convert,
    get_default_qconfig,
    prepare,
)

from qjax.kernels import sat16_status  # noqa: E402
from qjax.kernels._native import _sat16  # noqa: E402

SIZES = (784, 1024, 1024, 10)
BATCHES = (1, 32, 256)
LEVELS = ("avx2", "avx512")
GOAL = 1 / 1.2


def torch_mlp():
    torch.manual_seed(0)
    torch.backends.quantized.engine = "x86"
    layers = [QuantStub()]
    for i in range(len(SIZES) - 1):
        layers.append(nn.Linear(SIZES[i], SIZES[i + 1]))
        if i < len(SIZES) - 2:
            layers.append(nn.ReLU())
    m = nn.Sequential(*layers, DeQuantStub()).eval()
    m.qconfig = get_default_qconfig("x86")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        p = prepare(m)
        p(torch.rand(256, SIZES[0]))
        return convert(p)


def main():
    print(machine_line())
    print(load_line())
    ok, reason = sat16_status()
    print(f"sat16 native kernel: {reason}")
    if not ok:
        return
    q = torch_mlp()
    reps = 4 if quick() else 20
    rows = []
    isa = _sat16.sat16_isa()
    print(f"sat16 code path: {isa} (and forced to avx2)")
    for batch in BATCHES:
        x = torch.rand(batch, SIZES[0]) * 1.2  # a little past the calibration range
        xj = jnp.asarray(x.numpy())
        auto = import_model(q, (x,), engine="x86", isa="vnni", kernel="auto")
        exact = import_model(q, (x,), engine="x86", isa="vnni", kernel="xla")
        if batch == BATCHES[0]:
            print(f"exact kernel='auto' layers: {auto.kernels}")
        frozen = auto.freeze()
        fns = {
            "exact auto": lambda p=auto, xj=xj: p(xj),
            "exact frozen": lambda p=frozen, xj=xj: p(xj),
            "exact xla": lambda p=exact, xj=xj: p(xj),
        }
        progs = {}
        for level in LEVELS:
            nat = import_model(q, (x,), engine="x86", isa=level)
            assert set(nat.kernels.values()) == {"sat16"}, nat.kernels
            old = import_model(q, (x,), engine="x86", isa=level)
            with _isa("avx2"):  # the env var is read when the program is traced
                old(xj)
            xla = import_model(q, (x,), engine="x86", isa=level, kernel="xla")
            progs[level] = (nat, xla)
            fns[f"sat16 {level}"] = lambda p=nat, xj=xj: p(xj)
            fns[f"sat16 {level} frozen"] = functools.partial(nat.freeze(), xj)
            fns[f"sat16 {level} avx2"] = lambda p=old, xj=xj: p(xj)
        t = interleaved(fns, repeats=reps, warmup=2)
        for level in LEVELS:
            nat, xla = progs[level]
            t_xla = interleaved(
                {"x": lambda p=xla, xj=xj: p(xj)}, repeats=2 if quick() else 3, warmup=1
            )
            mism = int((np.asarray(nat(xj)) != np.asarray(xla(xj))).sum())
            t_nat, t_frozen = t[f"sat16 {level}"], t[f"sat16 {level} frozen"]
            rows.append(
                [
                    level,
                    batch,
                    f"{t['exact frozen'] * 1e3:.3f}",
                    f"{t_frozen * 1e3:.3f}",
                    f"{t_frozen / t['exact frozen']:.2f}x",
                    f"{t['exact auto'] * 1e3:.3f}",
                    f"{t['exact xla'] * 1e3:.3f}",
                    f"{t_nat * 1e3:.3f}",
                    f"{t[f'sat16 {level} avx2'] * 1e3:.3f}",
                    f"{t_xla['x'] * 1e3:.1f}",
                    f"{t_nat / t['exact auto']:.2f}x",
                    f"{t_nat / t['exact xla']:.2f}x",
                    f"{t_xla['x'] / t_nat:.0f}x",
                    f"{mism}/{np.asarray(nat(xj)).size}",
                ]
            )
            bench_line(
                "int8_sat16",
                f"MLP {level} batch {batch}, frozen: exact (kernel='auto') / sat16 native",
                t["exact frozen"] / t_frozen,
                "qjax exact frozen (vnni, fastest exact kernel)",
                f">= {GOAL:.2f}",
            )
            bench_line(
                "int8_sat16",
                f"MLP {level} batch {batch}: exact (kernel='auto') / sat16 native",
                t["exact auto"] / t_nat,
                "qjax exact (vnni, fastest exact kernel)",
                None,
            )
            bench_line(
                "int8_sat16",
                f"MLP {level} batch {batch}: exact (kernel='xla') / sat16 native",
                t["exact xla"] / t_nat,
                "qjax exact (vnni, XLA int8 dot)",
                f">= {GOAL:.2f}",
            )
    print(
        table(
            [
                "level",
                "batch",
                "exact frozen ms",
                "sat16 frozen ms",
                "frozen sat16/exact",
                "exact auto ms",
                "exact XLA ms",
                f"sat16 {isa} ms",
                "sat16 avx2 ms",
                "sat16 XLA ms",
                "sat16/auto",
                "sat16/XLA exact",
                "XLA/native",
                "native!=XLA",
            ],
            rows,
        )
    )


# the two below-VNNI tables: torch's QAT preset, the scheme served
_PRESETS = {7: ("x86", "fbgemm"), 8: ("qnnpack", "qnnpack")}


def _flax_models(bits):
    """Flax models with 7-bit activations (torch's x86 qconfig, ``reduce_range``) or
    8-bit ones (its qnnpack qconfig: uint8 codes 0..255, per-tensor weights), calibrated:
    ``(name, model, float input per batch)``: the MLP of :data:`SIZES` at
    :data:`BATCHES`, and ``int8_cnn.py``'s CNN shapes (conv 3x3 1->32 + ReLU, conv 3x3
    32->64 + ReLU, "SAME" padding, max pool 2x2, FC 12544->10) at batch 64, NHWC."""
    from flax import nnx

    from qjax.flax import default_qat_qconfig
    from qjax.flax import nnx as qnnx

    preset, scheme = _PRESETS[bits]
    cfg = default_qat_qconfig(preset).replace(quantize_input=True, scheme=scheme)
    rng, r = np.random.default_rng(0), nnx.Rngs(0)
    layers = [qnnx.QuantStub(cfg)]
    for i in range(len(SIZES) - 1):
        layers.append(qnnx.QuantLinear(SIZES[i], SIZES[i + 1], config=cfg, rngs=r))
        if i < len(SIZES) - 2:
            layers.append(nnx.relu)
    mlp = nnx.Sequential(*layers, qnnx.DeQuantStub())
    qnnx.calibrate(mlp, [jnp.asarray(rng.random((256, SIZES[0])), jnp.float32)], progress=False)
    yield (
        "MLP",
        mlp,
        {b: jnp.asarray(rng.random((b, SIZES[0])) * 1.2, jnp.float32) for b in BATCHES},
    )
    cnn = nnx.Sequential(
        qnnx.QuantStub(cfg),
        qnnx.QuantConv(1, 32, (3, 3), config=cfg, rngs=r),
        nnx.relu,
        qnnx.QuantConv(32, 64, (3, 3), config=cfg, rngs=r),
        nnx.relu,
        qnnx.MaxPool((2, 2)),
        qnnx.Flatten(),
        qnnx.QuantLinear(14 * 14 * 64, 10, config=cfg, rngs=r),
        qnnx.DeQuantStub(),
    )
    qnnx.calibrate(cnn, [jnp.asarray(rng.random((64, 28, 28, 1)), jnp.float32)], progress=False)
    yield "CNN", cnn, {64: jnp.asarray(rng.random((64, 28, 28, 1)) * 1.2, jnp.float32)}


def below_vnni(bits=7):
    """Issue 16 item 2: exactly accumulated layers on the sat16 kernel, as
    ``kernel="auto"`` decides on a CPU below VNNI (decided here with the AMX and oneDNN
    probes answering "no"), vs the XLA int8 dot / conv the layers ran on before: the
    MLP's linear layers, the CNN's convs (one fused call each, the patches read in place,
    the 1-channel conv's with zero channels) and its linear layer. ``bits=7``: 7-bit
    activations, the kernel's saturating instructions (no pair sum can saturate).
    ``bits=8``: 8-bit ones, its exact mode (the codes widened to int16 pairs) where a
    weight's pairs could saturate: the CNN as ``"auto"`` decides (its convs, and its
    linear layer with the kernel's AVX-512 code), the MLP's linear layers forced onto it
    (``"auto"`` keeps 8-bit linear layers on XLA with the kernel's AVX2 code: these rows
    are why)."""
    import qjax
    from qjax.kernels import _choice, _native

    saved = _native.native_status, _native.onednn_exact, _choice.exact_on_sat16
    _native.native_status = _native.onednn_exact = lambda: (False, "below VNNI (benchmark)")
    rows = []
    reps = 4 if quick() else 20
    try:
        scheme = _PRESETS[bits][1]
        for model_name, model, inputs in _flax_models(bits):
            forced = bits == 8 and model_name == "MLP"
            if forced:  # the linear layers on the exact mode too
                _choice.exact_on_sat16 = functools.partial(saved[2], widened=True)
            for batch, x in inputs.items():
                xla = qjax.convert(model, x, scheme=scheme)
                progs = {"exact XLA": xla}
                for isa in ("avx2", "avx512"):
                    if isa not in _sat16.sat16_isas():
                        continue
                    with _isa(isa):  # traced (compiled) inside convert
                        progs[f"sat16 {isa}"] = qjax.convert(model, x, kernel="auto", scheme=scheme)
                for name, p in progs.items():
                    native = name != "exact XLA"
                    sat16 = [k == "sat16" for k in p.kernels.values()]
                    # 8-bit CNN: its convs on sat16, its linear layer too with the
                    # kernel's AVX-512 code (on XLA with its AVX2 code)
                    fc = native and (bits == 7 or forced or "avx512" in name)
                    want = [native] * (len(sat16) - 1) + [fc]
                    assert sat16 == want, (name, p.kernels)
                    mism = int((np.asarray(p(x)) != np.asarray(xla(x))).sum())
                    assert mism == 0, (name, mism)
                t = interleaved({k: (lambda p=p, x=x: p(x)) for k, p in progs.items()}, reps, 2)
                for name in progs:
                    if name == "exact XLA":
                        continue
                    label = f"{name}{' (forced)' if forced else ''}"
                    rows.append(
                        [
                            model_name,
                            batch,
                            label,
                            f"{t['exact XLA'] * 1e3:.3f}",
                            f"{t[name] * 1e3:.3f}",
                            f"{t['exact XLA'] / t[name]:.2f}x",
                        ]
                    )
                    bench_line(
                        "int8_sat16",
                        f"{bits}-bit {model_name} below VNNI batch {batch}: "
                        f"exact XLA / exact on {label}",
                        t["exact XLA"] / t[name],
                        "qjax exact (XLA int8 dot / conv)",
                    )
            _choice.exact_on_sat16 = saved[2]
    finally:
        _native.native_status, _native.onednn_exact, _choice.exact_on_sat16 = saved
    mode = "saturating instructions" if bits == 7 else "exact (widened) mode"
    print(f"{bits}-bit activations, exact, below VNNI, sat16's {mode} "
          "(outputs == XLA's: 0 differ)")  # fmt: skip
    print(table(["model", "batch", "kernel", "XLA ms", "sat16 ms", "XLA/sat16"], rows))


def cnn_emulation():
    """The CNN of ``int8_cnn.py`` (conv 3x3 1->32 + ReLU, conv 3x3 32->64 + ReLU, max pool,
    FC; batch 64 of 28x28) converted by torch's x86 and onednn engines, imported per CPU
    level as :func:`main`'s MLP: the exact import (``isa="vnni"``, ``kernel="auto"``)
    against the emulation (``isa="avx2"`` / ``"avx512"``: FBGEMM's saturating im2col
    pairs for the x86 engine's convs, oneDNN's per-tap pairs with the zero-point term over
    the valid taps for the onednn engine's), both frozen. Each conv is one fused native
    call (``qjax_sat16_q8_conv`` reads the patches in place; the 1-channel conv's are
    built by XLA for FBGEMM's pairs, read in place with zero channels for oneDNN's), the
    requantization folded; the pure-XLA emulation's outputs are compared (mismatches
    printed)."""
    from int8_cnn import BATCH, Net, converted

    torch.manual_seed(0)
    x = torch.rand(BATCH, 1, 28, 28)
    xj = jnp.asarray(x.numpy())
    float_model = Net().eval()
    rows = []
    for engine in ("x86", "onednn"):
        q = converted(float_model, engine, x)
        torch.backends.quantized.engine = engine  # import_model runs the model once
        exact = import_model(q, (x,), engine=engine, isa="vnni", kernel="auto")
        fns = {"exact": functools.partial(exact.freeze(), xj)}
        mism = {}
        for level in LEVELS:
            nat = import_model(q, (x,), engine=engine, isa=level)
            assert set(nat.kernels.values()) == {"sat16"}, nat.kernels
            xla = import_model(q, (x,), engine=engine, isa=level, kernel="xla")
            mism[level] = int((np.asarray(nat(xj)) != np.asarray(xla(xj))).sum())
            fns[level] = functools.partial(nat.freeze(), xj)
        t = interleaved(fns, repeats=4 if quick() else 15, warmup=2)
        for level in LEVELS:
            ratio = t["exact"] / t[level]
            rows.append([engine, level, f"{t['exact'] * 1e3:.2f}", f"{t[level] * 1e3:.2f}",
                         f"{1 / ratio:.2f}x", mism[level]])  # fmt: skip
            bench_line(
                "int8_sat16",
                f"CNN {engine} {level} batch {BATCH}, frozen: exact (kernel='auto') / sat16 native",
                ratio,
                "qjax exact frozen (vnni, fastest exact kernel)",
                f">= {GOAL:.2f}",
            )
    print(f"CNN of int8_cnn.py, batch {BATCH}; exact layers: {exact.kernels}")
    headers = ["engine", "level", "exact frozen ms", "sat16 frozen ms", "sat16/exact",
               "native!=XLA"]  # fmt: skip
    print(table(headers, rows))


@contextlib.contextmanager
def _isa(name):
    old = os.environ.get(_sat16.ISA_ENV)
    os.environ[_sat16.ISA_ENV] = name
    try:
        yield
    finally:
        if old is None:
            del os.environ[_sat16.ISA_ENV]
        else:
            os.environ[_sat16.ISA_ENV] = old


if __name__ == "__main__":
    main()
    cnn_emulation()
    below_vnni(7)
    below_vnni(8)
