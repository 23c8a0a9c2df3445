"""The forum report "logits mismatch between PyTorch inference and manual implementation".

A user trained an Iris MLP (4-16-3) with QAT, symmetric quint8 activations without
``reduce_range`` (zero point 128, codes 0..255) and per-channel weights, converted it,
and hand-simulated the first layer in numpy: some channels differed from PyTorch by
5-19 LSB. Which side is right?

This example retrains that model (sklearn ``load_iris``), then with qjax:

1. imports the converted model (engine ``"x86"``) and checks it against torch on this
   CPU, layer by layer: the same integers;
2. runs the user's hand simulation and compares it with qjax's ``"exact"`` engine
   (exact int32 sums, correctly rounded requantization): they agree up to the user's
   int32 bias rounding (1 LSB, NUMERICS rules 11 vs 12), and exactly once the bias is
   kept unrounded — the user's arithmetic was right;
3. in a subprocess with torch's switches set to the AVX2 level (``level_env("avx2")``: a
   CPU without VNNI, like the user's), runs torch again: FBGEMM's int16 pair sums
   saturate (rule 14), torch drifts by tens of LSB, qjax's import (``isa=None`` follows
   the level torch runs at) reproduces it exactly, and the parity report of an import for
   a VNNI CPU (``isa="vnni"``) against torch names the level mismatch (rule 14).

Run: ``python examples/iris_golden_model.py``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import warnings

import numpy as np
import torch
from qjax.converters.torch import import_model
from torch import nn
from torch.ao import quantization as tq

import qjax
from qjax.kernels import level_env


class QuantizableFNN(nn.Module):
    """The user's model: QuantStub -> fc1 -> ReLU -> fc2 -> DeQuantStub."""

    def __init__(self):
        super().__init__()
        self.quant = tq.QuantStub()
        self.dequant = tq.DeQuantStub()
        self.fc1 = nn.Linear(4, 16)
        self.relu1 = nn.ReLU()
        self.fc2 = nn.Linear(16, 3)

    def forward(self, x):
        return self.dequant(self.fc2(self.relu1(self.fc1(self.quant(x)))))


def data():
    """Standardised Iris features (all 150) and labels, the user's 80/20 split indices."""
    from sklearn import datasets
    from sklearn.model_selection import train_test_split
    from sklearn.preprocessing import StandardScaler

    iris = datasets.load_iris()
    x = StandardScaler().fit_transform(iris.data).astype(np.float32)
    idx_train, idx_test = train_test_split(np.arange(150), test_size=0.2, random_state=42)
    return x, iris.target, idx_train, idx_test


def prepared_model() -> nn.Module:
    """The user's QAT setup: symmetric quint8 activations, no reduce_range."""
    torch.backends.quantized.engine = "x86"
    act = tq.FakeQuantize.with_args(
        observer=tq.MovingAverageMinMaxObserver,
        qscheme=torch.per_tensor_symmetric,
        reduce_range=False,
    )
    model = QuantizableFNN()
    model.qconfig = tq.QConfig(activation=act, weight=tq.default_per_channel_weight_fake_quant)
    return tq.prepare_qat(model.train())


def train(epochs: int = 25, seed: int = 0) -> nn.Module:
    """QAT with Adam as in the report (fewer epochs, larger step); the converted model."""
    torch.manual_seed(seed)
    x, y, idx_train, _ = data()
    model = prepared_model()
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    xt, yt = torch.from_numpy(x[idx_train]), torch.from_numpy(y[idx_train])
    gen = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        for b in torch.randperm(len(xt), generator=gen).split(16):
            opt.zero_grad()
            nn.functional.cross_entropy(model(xt[b]), yt[b]).backward()
            opt.step()
    return tq.convert(model.eval())


def skeleton() -> nn.Module:
    """An untrained converted model with the same structure (to load a state_dict into)."""
    model = prepared_model()
    model(torch.zeros(2, 4))
    return tq.convert(model.eval())


def hand_simulation(model, x_u8: np.ndarray, zp_x: int, s_in: float, round_bias=True):
    """The user's golden model, vectorised over samples (their code, steps 1-5).

    ``round_bias=False`` keeps ``b/(s_in·s_w)`` unrounded (what FBGEMM does, rule 11).
    Returns the codes of each layer (after ReLU for the hidden one).
    """
    layers = [m for m in model.modules() if isinstance(m, torch.ao.nn.quantized.Linear)]
    outs = []
    for i, layer in enumerate(layers):
        w = layer.weight().int_repr().numpy().astype(np.int8)
        s_w = layer.weight().q_per_channel_scales().numpy()
        b_fp = layer.bias().detach().numpy()
        s_out, zp_y = float(layer.scale), int(layer.zero_point)
        acc = (x_u8.astype(np.int32) - zp_x) @ w.T.astype(np.int32)
        if round_bias:
            out = np.round((acc + np.round(b_fp / (s_in * s_w))) * (s_in * s_w / s_out))
        else:
            out = np.round((acc + b_fp / (s_in * s_w)) * (s_in * s_w / s_out))
        out = np.clip(out + zp_y, 0, 255).astype(np.uint8)
        if i != len(layers) - 1:
            out[out < zp_y] = zp_y
        outs.append(out)
        x_u8, zp_x, s_in = out, zp_y, s_out
    return outs


def _accuracy(logits, y) -> float:
    return float((np.asarray(logits).argmax(-1) == y).mean())


AVX2_SCRIPT = """
import json, sys, warnings
warnings.filterwarnings("ignore")
import importlib.util, numpy as np, torch
spec = importlib.util.spec_from_file_location("iris_example", sys.argv[1])
ex = importlib.util.module_from_spec(spec); spec.loader.exec_module(ex)
sys.exit(ex.avx2_part(sys.argv[2]))
"""


def avx2_part(state_path: str) -> int:
    """Run under torch's AVX2 switches: torch vs qjax, printed as JSON."""
    torch.set_num_threads(1)
    model = skeleton()
    model.load_state_dict(torch.load(state_path, weights_only=True))
    saved = np.load(state_path + ".data.npz")  # the inputs, without importing sklearn here
    x, y = saved["x"], saved["y"]
    xt = torch.from_numpy(x)
    sat = import_model(model, (xt,), engine="x86")  # the level torch runs at here: avx2
    exact = import_model(model, (xt,), engine="x86", isa="vnni")  # a VNNI CPU's integers
    r_sat = qjax.parity.compare(model, sat, xt)
    r_exact = qjax.parity.compare(model, exact, xt)
    with torch.no_grad():
        torch_logits = model(xt).numpy()
    print(r_exact.render("text"))
    print(
        "RESULT "
        + json.dumps(
            {
                "level": sat.level,
                "x86_here": r_sat.to_dict(),
                "x86_vnni": r_exact.to_dict(),
                "acc_torch_avx2": _accuracy(torch_logits, y),
                "acc_qjax_avx2": _accuracy(sat(xt), y),
                "acc_qjax_exact": _accuracy(exact(xt), y),
                "max_logit_diff": float(np.abs(np.asarray(sat(xt)) - torch_logits).max()),
            }
        )
    )
    return 0


def main(epochs: int = 25, seed: int = 0) -> dict:
    """Run the three parts and print what each shows; returns their numbers."""
    warnings.filterwarnings("ignore", category=UserWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    torch.set_num_threads(1)
    model = train(epochs, seed)
    x, y, _, idx_test = data()
    xt = torch.from_numpy(x)

    # 1. this CPU: torch (x86 engine) against qjax
    program = import_model(model, (xt,), engine="x86")
    here = qjax.parity.compare(model, program, xt, engine="x86")
    print(
        f"1. this CPU: qjax (engine x86) vs torch: {here.mismatches} of {here.values} "
        "integers differ"
    )

    # 2. the user's hand simulation against qjax's exact engine
    exact = import_model(model, (xt,), engine="exact")
    trace = exact.trace(xt)
    q_in = trace["quant"]
    args = (np.asarray(q_in.values), int(q_in.zero_point), float(q_in.scale))
    hand = hand_simulation(model, *args)
    hand_fp = hand_simulation(model, *args, round_bias=False)
    ref = {"relu1": hand[0], "fc2": hand[1]}
    vs_hand = qjax.parity.compare(None, exact, xt, reference=ref, reference_kind="hand")
    vs_hand_fp = qjax.parity.compare(
        None, exact, xt, reference={"relu1": hand_fp[0], "fc2": hand_fp[1]}
    )
    vs_hand_torch = qjax.parity.compare(None, program, xt, reference=ref, reference_kind="hand")
    print("2. the user's hand simulation vs qjax engine 'exact':")
    vs_hand.print()
    print(
        f"   vs torch on this CPU (qjax x86): {vs_hand_torch.mismatches} of "
        f"{vs_hand_torch.values} differ, at most {max(la.max_lsb for la in vs_hand_torch.layers)}"
        " LSB"
    )
    print(
        f"   with the bias kept unrounded: {vs_hand_fp.mismatches} of {vs_hand_fp.values} differ\n"
    )

    # 3. a CPU without AVX512-VNNI, in a subprocess
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "iris_int8_state.pt")
        torch.save(model.state_dict(), path)  # a state_dict keeps its version metadata
        np.savez(path + ".data.npz", x=x, y=y)
        env = {**os.environ, **level_env("avx2"), "JAX_PLATFORMS": "cpu"}
        proc = subprocess.run(
            [sys.executable, "-c", AVX2_SCRIPT, os.path.abspath(__file__), path],
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
    if proc.returncode != 0:
        raise RuntimeError(f"AVX2 subprocess failed:\n{proc.stdout}\n{proc.stderr}")
    text, _, result = proc.stdout.rpartition("RESULT ")
    avx2 = json.loads(result)
    with torch.no_grad():
        acc_here = _accuracy(model(xt).numpy(), y)
    print("3. torch forced to AVX2 (no VNNI): an import for a VNNI CPU (isa='vnni') vs torch:")
    print(text.rstrip())
    sat = avx2["x86_here"]
    print(
        f"   qjax engine 'x86' at the level torch runs at ({avx2['level']}) vs torch under "
        f"AVX2: {sat['mismatches']} of {sat['values']} integers differ; accuracy on all 150 "
        f"samples: torch on this CPU {acc_here:.1%}, torch AVX2 {avx2['acc_torch_avx2']:.1%}, "
        f"qjax at AVX2 {avx2['acc_qjax_avx2']:.1%}"
    )
    return {
        "here": here,
        "vs_hand": vs_hand,
        "vs_hand_unrounded_bias": vs_hand_fp,
        "vs_hand_torch": vs_hand_torch,
        "avx2": avx2,
        "acc_here": acc_here,
        "test_samples": len(idx_test),
    }


if __name__ == "__main__":
    main()
