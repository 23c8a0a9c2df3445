"""Smoke tests of the tour examples (examples/observers_tour.py, weight_schemes.py,
ptq_vs_qat_digits.py, weight_only_int4.py, pt2e_import.py, sharded_qat.py): each runs
end to end at a small size, and the claims its printout makes hold on its numbers.

The three that train a model in a loop of jitted steps and then quantize it several ways
(weight schemes, PTQ vs QAT, weight-only int4) are marked ``slow``: each needs 20-30 s
of CPU, mostly XLA compiling the training steps and the many small quantize programs;
the default run keeps the observers tour, the pt2e import and the sharded QAT check."""

import importlib.util
import pathlib
import textwrap

import jax
import numpy as np
import pytest
from _helpers import run_script

EXAMPLES = pathlib.Path(__file__).resolve().parents[1] / "examples"
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::DeprecationWarning")


def _load(name, monkeypatch):
    monkeypatch.syspath_prepend(str(EXAMPLES))  # the examples import examples/_digits.py
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_observers_tour(monkeypatch, capsys):
    r = _load("observers_tour", monkeypatch).main()  # full size: the tails need the data
    kinds = ("skewed", "heavy-tailed", "multimodal")
    names = ["min/max", "moving-average min/max", "per-channel min/max",
             "histogram (L2 search)", "percentile 99.99", "MSE search"]  # fmt: skip
    for k in kinds:
        assert list(r[k]) == names
        for v in r[k].values():
            assert v["lo"] < v["hi"] and np.isfinite(v["sqnr_db"]) and 0 <= v["clipped"] < 0.01
        mm = r[k]["min/max"]
        assert mm["clipped"] == 0  # min/max never clamps what it saw
        # per-channel ranges are sub-ranges: never worse than per-tensor min/max
        assert r[k]["per-channel min/max"]["mse"] <= mm["mse"]
        assert r["best"][k] == "per-channel min/max"  # channels differ in width by 8x
        # MSE search: the lowest per-tensor error, or within 2% of it
        best_pt = r[k][r["best_per_tensor"][k]]["mse"]
        assert r[k]["MSE search"]["mse"] <= 1.02 * best_pt
    heavy = r["heavy-tailed"]
    for name in ("MSE search", "histogram (L2 search)"):  # clipping the tail pays
        assert heavy[name]["mse"] < heavy["min/max"]["mse"], name
    for k in ("skewed", "heavy-tailed"):  # percentile: the finest step for the bulk
        assert r["best_bulk"][k] == "percentile 99.99"
        assert r[k]["percentile 99.99"]["bulk_mse"] < 0.5 * r[k]["min/max"]["bulk_mse"]
        assert r[k]["percentile 99.99"]["mse"] > r[k]["min/max"]["mse"]  # ... at a price
    multi = r["multimodal"]  # no tail: every per-tensor observer within 10% of min/max
    for name in ("moving-average min/max", "histogram (L2 search)", "MSE search"):
        assert abs(multi[name]["mse"] / multi["min/max"]["mse"] - 1) < 0.1, name
    out = capsys.readouterr().out
    assert "heavy-tailed: lowest MSE per-channel min/max" in out and "Why:" in out


@pytest.mark.slow
def test_weight_schemes(monkeypatch, capsys):
    with jax.numpy_dtype_promotion("standard"):  # optax adam (see test_examples.py)
        r = _load("weight_schemes", monkeypatch).main(epochs=1)
    assert set(r) == {"conv1", "conv2"}
    assert "sym per-group of 8 in-ch" not in r["conv1"]  # one input channel: no groups
    for layer, rows in r.items():
        for name, v in rows.items():
            # torch's own observers and fake-quant agree bit for bit where torch has them
            assert v["torch_equal"] is (None if "group" in name else True), (layer, name)
        for kind in ("sym", "asym"):
            assert rows[f"{kind} per-channel"]["mse"] <= rows[f"{kind} per-tensor"]["mse"]
        assert rows["int4 sym per-channel"]["mse"] > 50 * rows["sym per-channel"]["mse"]
        # torch's symmetric rule maps max|w| to 127.5, clamped to 127: half a step lost
        assert abs(rows["sym per-tensor"]["max_err_lsb"] - 0.5) < 1e-3
        assert rows["sym per-channel narrow"]["max_err_lsb"] <= 0.5 + 1e-6
        pc, pt = rows["sym per-channel"], rows["sym per-tensor"]
        assert pc["median_channel_max_err_lsb"] < pt["median_channel_max_err_lsb"]
        assert (pt["qparams"], pc["qparams"]) == (1, 16 if layer == "conv1" else 32)
    conv2 = r["conv2"]
    assert conv2["sym per-group of 8 in-ch"]["qparams"] == 64
    assert conv2["int4 sym per-group of 8"]["mse"] <= conv2["int4 sym per-channel"]["mse"]
    assert "per-channel gains" in capsys.readouterr().out


@pytest.mark.slow
def test_ptq_vs_qat_digits(monkeypatch, capsys):
    with jax.numpy_dtype_promotion("standard"):
        acc = _load("ptq_vs_qat_digits", monkeypatch).main(epochs=3, qat_epochs=1, bits=(2,))
    assert set(acc) == {"float", "PTQ int2", "QAT int2", "seconds"}
    assert acc["float"] >= 0.85
    # ternary weights and 4 activation levels: PTQ loses accuracy, one QAT epoch wins it back
    assert acc["PTQ int2"] < acc["float"] - 0.05
    assert acc["QAT int2"] > acc["PTQ int2"] + 0.05
    assert "W2A2" in capsys.readouterr().out


@pytest.mark.slow
def test_weight_only_int4(monkeypatch, capsys):
    with jax.numpy_dtype_promotion("standard"):
        r = _load("weight_only_int4", monkeypatch).main(epochs=2, group=32)
    widths = [(64, 256), (256, 128), (128, 10)]
    f32 = sum(4 * i * o for i, o in widths)
    assert r["float"]["nbytes"] == f32
    # codes + float32 scales + int32 zero points, per output channel or per group
    assert r["int8 per-channel"]["nbytes"] == sum(i * o + 8 * o for i, o in widths)
    assert r["int4 per-channel"]["nbytes"] == sum(i * o // 2 + 8 * o for i, o in widths)
    assert r["int4 per-group of 32"]["nbytes"] == sum(
        i * o // 2 + 8 * o * (i // 32) for i, o in widths
    )
    assert r["codes_checked"] == 2 * sum(i * o for i, o in widths)  # both int4 schemes
    i8, c4, g4 = r["int8 per-channel"], r["int4 per-channel"], r["int4 per-group of 32"]
    assert i8["max_weight_err"] < c4["max_weight_err"] / 8
    assert g4["weight_mse"] <= c4["weight_mse"]
    assert i8["accuracy"] >= r["float"]["accuracy"] - 0.01
    assert min(c4["accuracy"], g4["accuracy"]) >= r["float"]["accuracy"] - 0.05
    assert "unpacked == quantized codes" in capsys.readouterr().out


def test_pt2e_import(monkeypatch, capsys):
    pytest.importorskip("torchao")
    r = _load("pt2e_import", monkeypatch).main(epochs=1, test_images=64)
    for mode in ("integer", "reference"):
        rep = r[mode]["report"]
        assert len(rep.layers) == 6 and not rep.notes  # every q node of the graph compared
        assert rep.layers[0].mismatches == 0  # the input quantize: exact (rule 5)
        # conv/linear sum in another order than torch: 1 LSB at a tie, rarely
        assert all(la.max_lsb <= 1 for la in rep.layers), rep.to_markdown()
        assert rep.mismatches <= 1e-3 * rep.values, rep.to_markdown()
        assert r[mode]["argmax_agree"] >= 0.98
    # mode="integer": the conv and linear patterns reached the int8 kernels
    ops = [la.op for la in r["integer"]["report"].layers]
    assert ops == ["quantize", "conv2d", "conv2d", "max_pool2d", "move", "linear"], ops
    assert {la.op for la in r["reference"]["report"].layers} == {"quantize"}
    assert "qjax parity vs torch" in capsys.readouterr().out


_SHARDED = textwrap.dedent(
    """
    import runpy, sys
    sys.path.insert(0, {examples!r})
    import jax
    jax.config.update("jax_numpy_dtype_promotion", "strict")
    ns = runpy.run_path({path!r})  # not as __main__: XLA_FLAGS come from the parent
    r = ns["main"](steps=3)
    assert r["devices"] == 8, r
    assert r["outputs_identical"] and r["stats_identical"], r
    assert 0 <= r["max_param_rel_diff"] <= 1e-6, r
    print("SHARDED-EXAMPLE-OK", r)
    """
)


@pytest.mark.slow  # sharded == single-device QAT runs by default in test_flax_sharding.py
def test_sharded_qat_example():
    script = _SHARDED.format(examples=str(EXAMPLES), path=str(EXAMPLES / "sharded_qat.py"))
    out = run_script(script, marker="SHARDED-EXAMPLE-OK", host_devices=8)
    assert "outputs bit-identical: True" in out
