"""Torch models imported with ``kernel="auto"`` get their native layers' requantization
folded (:mod:`qjax.flax._fold`): the same integers as torch and as the XLA import, every
traced activation; an edited ``program.params`` folded again before the next call; a
saved program holds no fold and ``load_served(kernel="auto")`` folds again. Skipped
where no native kernel with the fused epilogue runs (the XLA import is then all there
is)."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import _torch_models as tm  # noqa: E402
from qjax.converters import torch as qtorch  # noqa: E402

import qjax  # noqa: E402
from qjax.flax._fold import fold_program  # noqa: E402
from qjax.kernels import _native, native_status, onednn_exact  # noqa: E402

_FUSED = native_status()[0] or (onednn_exact()[0] and _native.onednn_fused())
pytestmark = pytest.mark.skipif(not _FUSED, reason="no native kernel with the fused epilogue")

# (engine, torch model family, seed, qconfig variant, mode, options): a CNN with a
# residual add + ReLU and a max pool, a depthwise block with an average pool, an MLP
CASES = [
    ("fbgemm", "cnn", 3, "wide", "eager", dict(block="add_relu", pool="max", width=16)),
    ("x86", "cnn", 4, "default", "fx", dict(block="dw", pool="avg", width=16, dw=True)),
    ("onednn", "mlp", 5, "default", "eager", {}),
    ("qnnpack", "cnn", 6, "default", "eager", dict(block="cat", pool="adaptive", width=8)),
]


def _import(case, kernel):
    engine, fam, seed, variant, mode, opts = case
    torch.backends.quantized.engine = engine
    model, x = tm.build(fam, seed, engine, variant, mode, **opts)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return model, x, qtorch.import_model(model, (x,), engine=engine, kernel=kernel)


def _folded(program) -> dict[str, bool]:
    """``{layer: folded?}`` of the torch linear / conv steps on a native kernel."""
    return {
        s.name: program.params[s.name][0].folded is not None
        for s in program.steps
        if s.spec is not None
        and s.spec[0] in ("torch_linear", "torch_conv")
        and program.params[s.name][0].kernel in ("onednn", "amx")
    }


def _differ(a, b) -> int:
    a, b = np.asarray(a), np.asarray(b)
    assert a.shape == b.shape and a.dtype == b.dtype
    return int((a != b).sum())


@pytest.mark.parametrize("case", CASES, ids=[f"{c[0]}-{c[1]}" for c in CASES])
def test_imported_native_layers_fold_and_match(case):
    model, x, auto = _import(case, "auto")
    _, _, xla = _import(case, "xla")
    got, trace = auto.run_traced(x)
    want, want_trace = xla.run_traced(x)
    folded = _folded(auto)
    # every exactly accumulated layer on the fused kernel is folded (fbgemm's depthwise
    # 3x3 saturating fast path, for one, runs on sat16 and is not in the list)
    assert folded and all(folded.values()), folded
    assert _differ(got, want) == 0
    n = 0
    for k, v in want_trace.items():
        assert _differ(trace[k].values, v.values) == 0, k
        n += v.values.size
    if case[0] in ("fbgemm", "qnnpack"):  # the same integers as torch (x86 / onednn:
        with torch.no_grad():  # rule 13, compared through the XLA import)
            assert _differ(got, model(x).numpy()) == 0
    print(f"\n{case[0]} {case[1]}: {len(folded)} folded layers, {n} traced codes, 0 differ")


def test_edited_params_fold_again_never_stale():
    model, x, auto = _import(CASES[0], "auto")
    _, _, xla = _import(CASES[0], "xla")
    layer = next(iter(_folded(auto)))
    (pw, bias), (pw_x, bias_x) = auto.params[layer], xla.params[layer]
    before = np.asarray(auto(x))
    try:
        auto.params[layer] = (pw, bias + 0.5)  # the folded coefficients depend on it
        xla.params[layer] = (pw_x, bias_x + 0.5)
        want = np.asarray(xla(x))
        assert _differ(want, before) > 0  # the edit changes the outputs
        stale = auto.params[layer][0].folded
        assert _differ(auto(x), want) == 0  # folded again from the edited params
        assert auto.params[layer][0].folded != stale
        # without the refresh the stale fold runs: the guard is what keeps it exact
        auto.params[layer] = (pw, bias)
        auto(x)
        auto.params[layer] = (auto.params[layer][0], bias + 0.5)
        auto.refresh = None
        assert _differ(auto(x), want) > 0
    finally:
        auto.refresh = fold_program
        auto.params[layer] = (pw, bias)
        xla.params[layer] = (pw_x, bias_x)
    assert _differ(auto(x), before) == 0


def test_save_load_folds_again(tmp_path):
    _, x, auto = _import(CASES[0], "auto")
    auto(x)  # folded before its first call: the file must hold none of it
    path = tmp_path / "imported.safetensors"
    qjax.save_served(path, auto)
    plain = qjax.load_served(path)
    again = qjax.load_served(path, kernel="auto")
    again(x)  # the fold runs before the first call
    assert again.kernels == auto.kernels and _folded(again) == _folded(auto)
    assert all(_folded(again).values())
    assert not _folded(plain)  # an XLA load: nothing native, nothing folded
    assert _differ(again(x), auto(x)) == 0 and _differ(plain(x), auto(x)) == 0
