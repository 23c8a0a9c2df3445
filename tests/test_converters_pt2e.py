"""torchao pt2e programs (convert_pt2e) imported into JAX, compared with torch at run time.

torch's reference is the converted q/dq program itself, run by torch: its
``quantize_per_tensor`` outputs are the codes every q node must reproduce. Two
measurements per model and mode:

* per layer ("teacher forced"): every step of the qjax program runs on torch's codes of
  the q nodes before it, so each q node's mismatches are its own, not inherited;
* end to end: the jitted program from the float input, codes and outputs.

What is asserted (the reasons are in NUMERICS.md rule 5 and ``qjax.converters.pt2e``):
q nodes whose producing ops are elementwise, max or data movement are bit-exact in both
modes (q/dq rules are exact, one IEEE op per element). Where torch sums in float (conv,
linear, matmul, mean, pooling, norms) or calls libm (gelu, softmax), qjax's float or
exact-integer result lands on the other side of a rounding tie now and then: at most 1
LSB per layer, in a small fraction of the codes.
"""

import warnings

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")
pt2e_api = pytest.importorskip("torchao.quantization.pt2e.quantize_pt2e")

from qjax.converters import pt2e  # noqa: E402

from qjax import QArray  # noqa: E402

warnings.filterwarnings("ignore", message=".*XNNPACKQuantizer is deprecated.*")

_EXACT_OPS = {
    "add",
    "sub",
    "mul",
    "div",
    "relu",
    "relu_",
    "hardtanh",
    "clamp",
    "max_pool2d",
    "cat",
    "view",
    "reshape",
    "_unsafe_view",
    "flatten",
    "permute",
    "transpose",
    "t",
    "unsqueeze",
    "squeeze",
    "contiguous",
    "clone",
    "slice",
    "select",
    "expand",
    "getitem",
}
# integer kernels that are exact for the patterns they are used in here (same qparams
# in and out, or no arithmetic)
_EXACT_KERNELS = {"max_pool2d", "relu", "move"}


def _xnnpack(per_channel=True, qat=False):
    from torchao.testing.pt2e._xnnpack_quantizer import (
        XNNPACKQuantizer,
        get_symmetric_quantization_config,
    )

    cfg = get_symmetric_quantization_config(is_per_channel=per_channel, is_qat=qat)
    return XNNPACKQuantizer().set_global(cfg)


def _x86(qat=False):
    from torchao.quantization.pt2e.quantizer.x86_inductor_quantizer import (
        X86InductorQuantizer,
        get_default_x86_inductor_quantization_config,
    )

    return X86InductorQuantizer().set_global(
        get_default_x86_inductor_quantization_config(is_qat=qat)
    )


class MLP(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = torch.nn.Linear(16, 32)
        self.fc2 = torch.nn.Linear(32, 32)
        self.fc3 = torch.nn.Linear(32, 8)

    def forward(self, x):
        return self.fc3(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


class CNN(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.c2 = torch.nn.Conv2d(8, 8, 3, padding=1)
        self.c3 = torch.nn.Conv2d(8, 8, 1)
        self.fc = torch.nn.Linear(16, 5)

    def forward(self, x):
        y = torch.relu(self.c1(x))
        z = torch.relu(self.c2(y)) + y  # add of two quantized activations
        z = self.c3(z) + z  # conv + add (x86 fuses it; float add in qjax)
        z = torch.nn.functional.max_pool2d(z, 2)
        z = torch.cat([z, torch.nn.functional.max_pool2d(y, 2)], 1)
        z = torch.nn.functional.adaptive_avg_pool2d(z, 1)
        return self.fc(torch.flatten(z, 1))


class Pools(torch.nn.Module):
    """cat and adaptive_avg_pool2d on quantized activations (x86 quantizes both)."""

    def __init__(self):
        super().__init__()
        self.c1 = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.c2 = torch.nn.Conv2d(8, 8, 3, padding=1)
        self.fc = torch.nn.Linear(8, 5)

    def forward(self, x):
        y = torch.relu(self.c1(x))
        z = torch.nn.functional.max_pool2d(self.c2(y) + y, 2)
        z = torch.cat([z, z], 1)
        z = torch.nn.functional.adaptive_avg_pool2d(z, 1).flatten(1)[:, :8]
        return self.fc(z)


class Conv1d(torch.nn.Module):
    """conv1d (padding; stride + groups), hardtanh, permute, linear on 3-d input, mean."""

    def __init__(self):
        super().__init__()
        self.c1 = torch.nn.Conv1d(4, 8, 3, padding=1)
        self.c2 = torch.nn.Conv1d(8, 8, 3, stride=2, groups=2)
        self.fc = torch.nn.Linear(8, 3)

    def forward(self, x):
        y = torch.nn.functional.hardtanh(self.c1(x), 0.0, 6.0)
        y = torch.relu(self.c2(y))
        return self.fc(y.permute(0, 2, 1)).mean(1)


class Block(torch.nn.Module):
    """linear, layer_norm, gelu, matmul of activations, softmax, mean."""

    def __init__(self):
        super().__init__()
        self.fc1 = torch.nn.Linear(8, 16)
        self.ln = torch.nn.LayerNorm(16)
        self.fc2 = torch.nn.Linear(16, 16)
        self.fc3 = torch.nn.Linear(16, 4)

    def forward(self, x):
        h = torch.nn.functional.gelu(self.ln(self.fc1(x)))
        a = torch.softmax(torch.matmul(h, h.transpose(-1, -2)), -1)
        return self.fc3(torch.matmul(a, self.fc2(h)).mean(1))


def _convert(model, x, quantizer, qat=False, seed=0):
    torch.manual_seed(seed)
    gm = torch.export.export(model, x).module()
    prep = pt2e_api.prepare_qat_pt2e if qat else pt2e_api.prepare_pt2e
    gm = prep(gm, quantizer)
    gen = torch.Generator().manual_seed(seed + 1)
    for _ in range(4):  # calibration (QAT: observers + fake quant in training mode)
        gm(torch.randn(x[0].shape, generator=gen) * 1.5)
    return pt2e_api.convert_pt2e(gm)


def _torch_values(gm, x):
    """torch's value of every node of the converted program, and its output."""
    vals = {}

    class Recorder(torch.fx.Interpreter):
        def run_node(self, n):
            r = super().run_node(n)
            if isinstance(r, torch.Tensor):
                vals[n.name] = r.detach().numpy().copy()
            return r

    with torch.no_grad():
        out = Recorder(gm).run(*x)
    return vals, out.detach().numpy()


def _diff(a, b):
    d = np.abs(np.asarray(a, np.int64) - np.asarray(b, np.int64))
    return int(d.size), int((d != 0).sum()), int(d.max(initial=0))


def _layerwise(program, tvals, x):
    """Per q node (size, mismatches, max LSB), each step fed torch's codes before it.

    One jitted function (one compile): after each q step its codes are compared with
    torch's and replaced by them.
    """
    names = [s.name for s in program.steps]
    forced = {k: tvals[k] for k in names if k in tvals}

    @jax.jit
    def run(params, args, forced):
        env = dict(zip(program.inputs, args, strict=True))
        out = {}
        for s in program.steps:
            v = s.fn(params[s.name], *(env[i] for i in s.inputs))
            if isinstance(v, QArray):
                out[s.name] = v.values
                v = QArray(forced[s.name].astype(v.values.dtype), v.qparams)
            env[s.name] = v
        return out

    args = tuple(np.asarray(t.numpy()) for t in x)
    out = run(program.params, args, forced)
    return {k: _diff(v, tvals[k]) for k, v in out.items()}, out


def _chain_ops(program, name):
    """(integer kernel or None, float ops) between q step ``name`` and the q steps before it."""
    steps = {s.name: s for s in program.steps}
    root = steps[name]
    kernel = None if root.layer.op == "quantize" else root.layer.op
    ops, todo = set(), list(root.inputs)
    while todo:
        s = steps.get(todo.pop())
        if s is None or s.layer.op not in ("float", "dequantize"):  # an input or a q step
            continue
        if s.layer.op == "float":
            ops.add(s.layer.extra["op"])
        todo.extend(s.inputs)
    return kernel, ops


def _source_q(program, name):
    """The q step whose codes feed q step ``name`` (through dq and float steps)."""
    steps = {s.name: s for s in program.steps}
    cur = steps[name].inputs[0]
    while cur in steps and steps[cur].layer.op in ("float", "dequantize"):
        cur = steps[cur].inputs[0]
    return cur


def _is_mean_of_window(program, name):
    """A global average pool (kernel or float op) whose q keeps its input's qparams."""
    kernel, ops = _chain_ops(program, name)
    if not (kernel == "adaptive_avg_pool2d" or (kernel is None and ops == {"adaptive_avg_pool2d"})):
        return False
    a, b = program.layers[_source_q(program, name)].out, program.layers[name].out
    return float(a.scale) == float(b.scale) and int(a.zero_point) == int(b.zero_point)


def _exact_chain(program, name):
    kernel, ops = _chain_ops(program, name)
    return (kernel is None or kernel in _EXACT_KERNELS) and ops <= _EXACT_OPS


CASES = {
    # name: (model, input shape, quantizer factory, qat)
    "mlp_xnnpack_per_channel": (MLP, (64, 16), lambda: _xnnpack(True), False),
    "cnn_xnnpack_per_channel": (CNN, (8, 3, 8, 8), lambda: _xnnpack(True), False),
    "pools_x86": (Pools, (8, 3, 8, 8), lambda: _x86(), False),
    "conv1d_xnnpack_per_channel": (Conv1d, (8, 4, 16), lambda: _xnnpack(True), False),
    "block_xnnpack_per_tensor": (Block, (4, 6, 8), lambda: _xnnpack(False), False),
    "mlp_xnnpack_qat": (MLP, (64, 16), lambda: _xnnpack(True, qat=True), True),
    "cnn_x86_qat": (CNN, (8, 3, 8, 8), lambda: _x86(qat=True), True),
}


@pytest.fixture(scope="module")
def converted():
    torch.set_num_threads(1)
    cache = {}

    def get(case):
        if case not in cache:
            model_cls, shape, quantizer, qat = CASES[case]
            torch.manual_seed(0)
            model = model_cls() if qat else model_cls().eval()
            x = (torch.randn(shape),)
            gm = _convert(model, x, quantizer(), qat=qat)
            xt = (torch.randn(shape, generator=torch.Generator().manual_seed(7)) * 1.5,)
            cache[case] = (gm, xt) + _torch_values(gm, xt)
        return cache[case]

    return get


# QAT graphs go through the same importer code; their reference mode adds no coverage
_RUNS = [
    (m, c) for m in ("reference", "integer") for c in CASES if m == "integer" or "qat" not in c
]


@pytest.mark.parametrize("mode, case", _RUNS)
def test_codes_match_torch(converted, case, mode):
    gm, x, tvals, tout = converted(case)
    program = pt2e.import_pt2e(gm, mode=mode)
    if mode == "integer":  # the patterns the quantizer produced did reach integer kernels
        kinds = {lay.op for lay in program.layers.values()}
        assert kinds & {"linear", "conv2d", "conv1d"}, kinds
    # per layer
    per_layer, codes = _layerwise(program, tvals, x)
    q_nodes = {
        n.name
        for n in gm.graph.nodes
        if n.op == "call_function"
        and "quantize_per_tensor" in str(n.target)
        and "dequantize" not in str(n.target)
    }
    assert set(per_layer) == q_nodes
    total = mism = 0
    for name, (n, bad, worst) in per_layer.items():
        total, mism = total + n, mism + bad
        if _exact_chain(program, name):
            assert bad == 0, (name, _chain_ops(program, name), bad, worst)
        elif _is_mean_of_window(program, name):
            # A mean of N codes (the kernel: torch's quantized adaptive_avg_pool2d, exact
            # integer sum S; the reference: torch's float mean) sits exactly on a .5 tie
            # whenever S mod N == N/2; there each side rounds by its own float noise.
            # Every mismatch must be such a tie, and only 1 LSB.
            assert worst <= 1, (name, bad, worst)
            assert codes[name].shape[-2:] == (1, 1), name  # global pools (the models here)
            src = _source_q(program, name)
            q_in = tvals[src].astype(np.int64)
            zp = int(program.layers[src].out.zero_point)
            sums = (q_in - zp).sum(axis=(2, 3), keepdims=True)
            n_win = q_in.shape[2] * q_in.shape[3]
            ties = (2 * sums) % (2 * n_win) == n_win
            assert (ties | (np.asarray(codes[name]) == tvals[name])).all(), name
        else:
            assert worst <= 1, (name, _chain_ops(program, name), bad, worst)
            # float summation order (or exact integer requantization) against torch's
            # float sums: a tie now and then (measured 1 in 65536 with 10^5+ codes)
            assert bad <= max(2, n // 1000), (name, bad, n)
    # end to end, jitted, from the float input
    trace = program.trace(*x)
    e2e = [_diff(trace[k].values, tvals[k]) for k in per_layer]
    e2e_mism = sum(b for _, b, _ in e2e)
    assert e2e_mism <= max(4, total // 100), (e2e_mism, total)
    y = np.asarray(program(*x))
    assert y.shape == tout.shape and np.isfinite(y).all()
    if e2e_mism == 0 and mode == "reference":
        assert np.allclose(y, tout, rtol=0, atol=1e-5 * np.abs(tout).max())
    print(
        f"\n{case} {mode}: per-layer codes {total} mismatches {mism} max "
        f"{max(w for _, _, w in per_layer.values())}; end-to-end mismatches {e2e_mism} "
        f"max {max(w for _, _, w in e2e)}; output max |diff| {np.abs(y - tout).max():.3g}"
    )


@pytest.mark.slow
def test_jit_equals_eager(converted):
    """The jitted program computes what its steps compute one op at a time: XLA fuses
    nothing that changes a rounding (dq products next to float adds, conv + add here)."""
    gm, x, _, _ = converted("pools_x86")
    program = pt2e.import_pt2e(gm, mode="reference")
    env = dict(zip(program.inputs, (np.asarray(t.numpy()) for t in x), strict=True))
    for s in program.steps:
        env[s.name] = s.fn(program.params[s.name], *(env[i] for i in s.inputs))
    for k, v in program.trace(*x).items():
        np.testing.assert_array_equal(np.asarray(v.values), np.asarray(env[k].values), k)


def test_exported_program_input(converted):
    gm, x, _, tout = converted("mlp_xnnpack_per_channel")
    ep = torch.export.export(gm, x)
    a = pt2e.import_pt2e(gm, x)
    b = pt2e.import_pt2e(ep, x)
    np.testing.assert_array_equal(np.asarray(a(*x)), np.asarray(b(*x)))
    ta, tb = a.trace(*x), b.trace(*x)
    assert len(ta) == len(tb)
    for va, vb in zip(ta.values(), tb.values(), strict=True):
        np.testing.assert_array_equal(np.asarray(va.values), np.asarray(vb.values))


@pytest.mark.parametrize(
    "case, kernels",
    [
        ("cnn_xnnpack_per_channel", {"conv2d", "add", "max_pool2d", "linear"}),
        ("pools_x86", {"conv2d", "max_pool2d", "cat", "adaptive_avg_pool2d"}),
        ("block_xnnpack_per_tensor", {"linear"}),
        ("conv1d_xnnpack_per_channel", {"conv1d", "move", "linear"}),
    ],
)
def test_layers_metadata(converted, case, kernels):
    gm, x, _, _ = converted(case)
    layers = pt2e.import_pt2e(gm, mode="integer").layers
    assert kernels <= {lay.op for lay in layers.values()}
    convs = [lay for lay in layers.values() if lay.op in ("conv1d", "conv2d", "linear")]
    assert all(c.scheme == "fbgemm" and c.weight is not None for c in convs)
    assert all(c.extra["module"] in ("c1", "c2", "c3", "fc", "fc1", "fc2", "fc3") for c in convs)
    floats = {lay.extra["op"] for lay in layers.values() if lay.op == "float"}
    if case == "block_xnnpack_per_tensor":  # no integer kernel for these: float, and said so
        assert {"layer_norm", "gelu", "softmax", "matmul", "mean"} <= floats


def test_unsupported_op_names_node():
    class M(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = torch.nn.Linear(4, 4)

        def forward(self, x):
            return torch.cumsum(self.fc(x), 1)

    x = (torch.randn(2, 4),)
    gm = _convert(M().eval(), x, _xnnpack())
    with pytest.raises(ValueError, match=r"node 'cumsum' calls aten\.cumsum\.default"):
        pt2e.import_pt2e(gm, x)


def test_bad_arguments(converted):
    gm, x, _, _ = converted("mlp_xnnpack_per_channel")
    with pytest.raises(TypeError, match="GraphModule"):
        pt2e.import_pt2e(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="mode"):
        pt2e.import_pt2e(gm, mode="float")
    with pytest.raises(TypeError, match="example input"):
        pt2e.import_pt2e(gm, (x[0], x[0]))


@pytest.mark.slow
def test_conv_bn_qat_x86():
    """Conv + BatchNorm QAT (torchao folds BN at convert): ~30 s of torch pattern matching."""

    class M(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.c = torch.nn.Conv2d(3, 8, 3, padding=1)
            self.bn = torch.nn.BatchNorm2d(8)
            self.fc = torch.nn.Linear(8 * 4 * 4, 5)

        def forward(self, x):
            y = torch.nn.functional.max_pool2d(torch.relu(self.bn(self.c(x))), 2)
            return self.fc(y.flatten(1))

    torch.set_num_threads(1)
    x = (torch.randn(4, 3, 8, 8),)
    gm = _convert(M(), x, _x86(qat=True), qat=True)
    tvals, _ = _torch_values(gm, x)
    for mode in ("reference", "integer"):
        stats, _ = _layerwise(pt2e.import_pt2e(gm, x, mode=mode), tvals, x)
        assert all(w <= 1 for _, _, w in stats.values()), stats


def test_parity_compare_on_a_pt2e_program_compares_every_quantize_node(converted):
    """``qjax.parity.compare(gm, program, x)`` on a pt2e program compares torch's codes of
    every quantize node (reference mode: exact on this elementwise MLP's q nodes up to
    rule 13-like float-order ties), never nothing; a model with no counterpart raises."""
    import qjax

    gm, x, tvals, _ = converted("mlp_xnnpack_per_channel")
    program = pt2e.import_pt2e(gm, x, mode="reference")
    report = qjax.parity.compare(gm, program, x)
    names = sorted(program.trace(*x))
    assert [la.name for la in report.layers] == [n for n in program.trace(*x)]
    assert report.values == sum(np.asarray(tvals[n]).size for n in names) > 0
    for la in report.layers:  # each layer's count is torch's q node against qjax's
        got = np.asarray(program.trace(*x)[la.name].values, np.int64)
        assert la.mismatches == int((got != np.asarray(tvals[la.name], np.int64)).sum())
    other = torch.nn.Sequential(torch.nn.ReLU()).eval()  # no quantized activations
    with pytest.raises(ValueError, match="nothing was compared"):
        qjax.parity.compare(other, program, x)
    empty = qjax.parity.compare_traces({}, {})
    assert empty.values == 0 and not empty.ok  # a report on nothing does not pass
