"""qjax.debug: the debugging views on a small MLP (one layer given a bad range on
purpose), hooked stock layers and the digits CNN; the ``qjax debug`` CLI."""

import pathlib
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import qjax
from qjax import debug
from qjax.flax import Mode, default_qat_qconfig, qjax_recommended
from qjax.flax import nnx as qnnx
from qjax.flax._core import init_layer_stats
from qjax.flax._paths import join_path

BAD = "layers/2"  # the MLP layer whose input range the tests shrink


def _mlp(seed=0):
    cfg = qjax_recommended()
    rngs = nnx.Rngs(seed)
    model = nnx.Sequential(
        qnnx.QuantLinear(8, 32, config=cfg, rngs=rngs),
        nnx.relu,
        qnnx.QuantLinear(32, 32, config=cfg, rngs=rngs),
        nnx.relu,
        qnnx.QuantLinear(32, 5, config=cfg, rngs=rngs),
    )
    x = jnp.asarray(np.random.default_rng(seed).normal(size=(256, 8)), jnp.float32)
    qnnx.calibrate(model, [x], progress=False)
    qnnx.set_mode(model, Mode.FLOAT)
    y = np.asarray(model(x)).argmax(-1)  # labels: the float model is 100% right
    qnnx.set_mode(model, Mode.QAT)
    return model, x, y


@pytest.fixture(scope="module")
def mlp():
    return _mlp()


def _shrink_input_range(model, path, lo=-0.05, hi=0.05):
    m = dict((join_path(p), m) for p, m in nnx.iter_modules(model))[path]
    st = m.quant_stats.get_value()
    inp = st.input._replace(min_val=jnp.float32(lo), max_val=jnp.float32(hi))
    m.quant_stats.set_value(st._replace(input=inp))


def _snapshot(model):
    graphdef, state = nnx.split(model)
    leaves = [np.asarray(v) for v in jax.tree_util.tree_leaves(state)]
    mods = [
        (p, m.mode, m.observe, m.fake_quant, m.name, getattr(m, "freeze_bn", None))
        for p, m in nnx.iter_modules(model)
        if isinstance(m, qnnx._QuantModule)
    ]
    return graphdef, leaves, mods


def _assert_unchanged(before, after):
    assert before[0] == after[0]
    assert before[2] == after[2]
    assert len(before[1]) == len(after[1])
    for a, b in zip(before[1], after[1], strict=True):
        np.testing.assert_array_equal(a, b)


def test_sqnr_is_the_hand_formula(rng):
    f = np.array([1.0, 2.0, 3.0, 4.0])
    assert debug.sqnr_db(f, f + [0, 0, 0, 1]) == pytest.approx(10 * np.log10(30.0), rel=1e-15)
    a = rng.normal(size=(7, 5))
    b = a + 0.01 * rng.normal(size=(7, 5))
    want = 20 * np.log10(np.linalg.norm(a) / np.linalg.norm(a - b))
    assert debug.sqnr_db(a, b) == pytest.approx(want, rel=1e-12)
    assert debug.sqnr_db(a, a) == np.inf
    assert debug.sqnr_db(np.zeros(3), np.ones(3)) == -np.inf
    with pytest.raises(ValueError, match=r"shapes differ: reference \(3,\), test \(4,\)"):
        debug.sqnr_db(np.zeros(3), np.zeros(4))


def test_layer_errors_equal_a_hand_run(mlp):
    model, x, _ = mlp
    fm, qm = nnx.clone(model), nnx.clone(model)
    qnnx.set_mode(fm, Mode.FLOAT)
    qnnx.set_mode(qm, Mode.FROZEN)
    f_in, f, q = [], x, x
    for i in range(5):
        f_in.append(f)
        f, q = fm.layers[i](f), qm.layers[i](q)
        if i == 2:
            f2, q2, iso2 = f, q, qm.layers[2](f_in[2])
    rows = {e.path: e for e in debug.layer_errors(model, x)}
    assert list(rows) == ["layers/0", "layers/2", "layers/4"]
    e = rows["layers/2"]
    f2, q2, iso2 = (np.asarray(a, np.float64) for a in (f2, q2, iso2))
    assert e.sqnr_db == 10 * np.log10(np.sum(f2**2) / np.sum((f2 - q2) ** 2))
    assert e.isolated_sqnr_db == 10 * np.log10(np.sum(f2**2) / np.sum((f2 - iso2) ** 2))
    assert e.max_abs_error == np.max(np.abs(f2 - q2))
    # its output goes through relu into layers/4's input quantizer: LSB = that scale
    qp4 = {(r.path, r.role): r for r in debug.qparams_table(model)}[("layers/4", "input")]
    assert e.output_scale == float(qp4.scale) > 0
    assert e.max_error_lsb == pytest.approx(e.max_abs_error / float(qp4.scale), rel=1e-12)
    assert rows["layers/4"].max_error_lsb is None  # nothing quantizes the last output
    assert all(20 < r.isolated_sqnr_db < 80 for r in rows.values())


def test_a_bad_range_shows_everywhere(mlp):
    model, x, y = mlp
    good = {e.path: e for e in debug.layer_errors(model, x)}
    bad = nnx.clone(model)
    _shrink_input_range(bad, BAD)

    hists = debug.activation_histograms(bad, x)
    clipped = {(h.path, h.role): h.clipped_below + h.clipped_above for h in hists}
    worst = max(clipped, key=clipped.get)
    assert worst == (BAD, "input") and clipped[worst] > 0.4  # relu: ~half are 0
    others = [v for k, v in clipped.items() if k != worst]
    assert max(others) < 0.05

    errs = {e.path: e for e in debug.layer_errors(bad, x)}
    assert min(errs.values(), key=lambda e: e.isolated_sqnr_db).path == BAD
    assert errs[BAD].isolated_sqnr_db < good[BAD].isolated_sqnr_db - 20
    assert errs["layers/0"].sqnr_db == good["layers/0"].sqnr_db  # upstream untouched

    rows = debug.sensitivity(bad, x, y)
    assert rows[0].path == BAD
    assert rows[0].recovered > 0.3 and rows[0].all_quantized < 0.7
    assert rows[0].float_metric == 1.0
    assert all(r.recovered < rows[0].recovered for r in rows[1:])
    text = debug.render_sensitivity(rows)
    assert text.splitlines()[4].startswith(BAD)


def test_histogram_counts_and_clipping(mlp):
    model, x, _ = mlp
    hists = debug.activation_histograms(model, x, bins=17)
    assert [(h.path, h.role) for h in hists] == [
        (p, r) for p in ("layers/0", "layers/2", "layers/4") for r in ("input", "weight")
    ]
    sizes = {"layers/0": (x.size, 8 * 32), "layers/2": (256 * 32, 32 * 32)}
    sizes["layers/4"] = (256 * 32, 32 * 5)
    for h in hists:
        n = sizes[h.path][h.role == "weight"]
        assert int(h.counts.sum()) == h.n_values == n and h.n_nonfinite == 0
        assert len(h.counts) == 17 and len(h.edges) == 18
        assert h.edges[0] <= h.lo < h.hi <= h.edges[-1]
    # layers/0's input, per-tensor: clipped is x more than s/2 outside [(qmin-z)s, (qmax-z)s]
    r = {(r.path, r.role): r for r in debug.qparams_table(model)}[("layers/0", "input")]
    s, z = np.float32(r.scale), int(r.zero_point)
    lo, hi = np.float32(-128 - z) * s, np.float32(127 - z) * s
    xs = np.asarray(x)
    h0 = hists[0]
    assert (h0.lo, h0.hi) == (float(lo), float(hi))
    assert h0.clipped_below * xs.size == np.sum(xs < lo - s / 2)
    assert h0.clipped_above * xs.size == np.sum(xs > hi + s / 2)
    # shrink the range so that values do clip: the same rule on the new qparams
    tight = nnx.clone(model)
    _shrink_input_range(tight, "layers/0", -1.0, 1.0)
    t0 = debug.activation_histograms(tight, x, bins=17)[0]
    r = {(r.path, r.role): r for r in debug.qparams_table(tight)}[("layers/0", "input")]
    s, z = np.float32(r.scale), int(r.zero_point)
    lo, hi = np.float32(-128 - z) * s, np.float32(127 - z) * s
    n_below, n_above = np.sum(xs < lo - s / 2), np.sum(xs > hi + s / 2)
    assert n_below > 100 and n_above > 100
    assert (t0.clipped_below * xs.size, t0.clipped_above * xs.size) == (n_below, n_above)
    with pytest.raises(ValueError, match="bins must be a positive int"):
        debug.activation_histograms(model, x, bins=0)


def test_health_names_nan_zero_range_and_never_updated(mlp):
    model, x, _ = mlp
    assert all(h.ok for h in debug.observer_health(model))
    sick = nnx.clone(model)
    l0, l2, l4 = sick.layers[0], sick.layers[2], sick.layers[4]
    st = l0.quant_stats.get_value()
    l0.quant_stats.set_value(st._replace(input=st.input._replace(max_val=jnp.float32(jnp.nan))))
    st = l2.quant_stats.get_value()
    w = st.weight._replace(max_val=st.weight.max_val.at[3].set(st.weight.min_val[3]))
    l2.quant_stats.set_value(st._replace(weight=w))
    l4.quant_stats.set_value(init_layer_stats(l4.config, l4.kernel.shape))  # count 0
    rows = {(h.path, h.role): h for h in debug.observer_health(sick)}
    assert rows[("layers/0", "input")].problems == ["1 non-finite range entry"]
    assert rows[("layers/2", "weight")].problems == ["1 zero-width range (min == max)"]
    assert rows[("layers/4", "input")].problems == ["never updated (count 0)"]
    assert rows[("layers/4", "weight")].count == 0 and not rows[("layers/4", "weight")].ok
    assert [k for k, h in rows.items() if h.ok] == [
        ("layers/0", "weight"), ("layers/2", "input")
    ]  # fmt: skip
    text = debug.render_health(list(rows.values()))
    assert text.splitlines()[0] == "observer health: 6 observers, 4 with problems"
    assert text.splitlines()[4].startswith("layers/0  input") and "non-finite" in text
    with pytest.raises(ValueError, match=r"no statistics in \['layers/4'\]"):
        debug.layer_errors(sick, x)  # FROZEN needs statistics; the error names the layer


def test_plots_are_pngs(mlp, tmp_path):
    model, x, y = mlp
    paths = [
        debug.plot_histograms(debug.activation_histograms(model, x), tmp_path / "a/h.png"),
        debug.plot_layer_errors(debug.layer_errors(model, x), tmp_path / "e.png"),
        debug.plot_sensitivity(debug.sensitivity(model, x, y), tmp_path / "s.png"),
    ]
    for p in paths:
        data = pathlib.Path(p).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 2000
    with pytest.raises(ValueError, match="no histograms"):
        debug.plot_histograms([], tmp_path / "x.png")


def test_qparams_table_and_render(mlp):
    model, _, _ = mlp
    rows = debug.qparams_table(model)
    w = rows[1]
    assert (w.path, w.role, w.dtype, w.bits, w.granularity) == (
        "layers/0", "weight", "int8", 8, "axis -1"
    )  # fmt: skip
    kernel = np.asarray(model.layers[0].kernel[...])
    assert w.scale.shape == (32,) and w.observed_max == kernel.max()
    assert w.observed_min == kernel.min() and w.count == 1
    md = debug.render_qparams(rows, "markdown")
    assert md.startswith("**qparams per quantized tensor**") and md.count("| layers/") == 6
    assert "(n=32)" in debug.render_qparams(rows, "rich")
    with pytest.raises(ValueError, match="format must be"):
        debug.render_qparams(rows, "html")


def test_other_models_hooks_and_errors(rng):
    cfg = qjax_recommended()
    rngs = nnx.Rngs(1)
    hooked = nnx.Sequential(nnx.Linear(4, 6, rngs=rngs), nnx.relu, nnx.Linear(6, 3, rngs=rngs))
    qnnx.quantize_model(hooked, [(r"layers/\d", cfg)])
    x = jnp.asarray(rng.normal(size=(32, 4)), jnp.float32)
    qnnx.calibrate(hooked, [x], progress=False)
    assert [(r.path, r.role) for r in debug.qparams_table(hooked)][:2] == [
        ("layers/0/dot_general", "input"), ("layers/0/dot_general", "weight")
    ]  # fmt: skip
    assert [e.path for e in debug.layer_errors(hooked, x)] == ["layers/0", "layers/2"]
    h = debug.activation_histograms(hooked, x)[1]
    assert h.role == "weight" and h.n_values == 24

    # LSQ layer: the table shows the learned qparams (here doubled), not the observer's
    lsq = qjax_recommended().replace(grad="lsq")
    lm = nnx.Sequential(qnnx.LearnableQuantLinear(4, 3, config=lsq, mode="calibrate", rngs=rngs))
    lm(x)
    qnnx.init_qparams_from_stats(lm)
    s0 = debug.qparams_table(lm)[0].scale
    p = lm.layers[0].qparams.get_value()
    lm.layers[0].qparams.set_value({**p, "input": {**p["input"], "scale": p["input"]["scale"] * 2}})
    assert debug.qparams_table(lm)[0].scale == 2 * s0 and s0 > 0

    class Two(nnx.Module):
        def __init__(self, rngs):
            self.fc1 = qnnx.QuantLinear(4, 4, config=cfg, rngs=rngs)
            self.fc2 = qnnx.QuantLinear(4, 2, config=cfg, rngs=rngs)

    two = Two(nnx.Rngs(0))
    assert [r.path for r in debug.qparams_table(two)] == ["fc1", "fc1", "fc2", "fc2"]
    assert len(debug.observer_health(two)) == 4
    for view in (debug.layer_errors, debug.activation_histograms):
        with pytest.raises(TypeError, match="nnx.Sequential one element at a time; got Two"):
            view(two, x)
    nested = nnx.Sequential(nnx.Sequential(qnnx.QuantLinear(4, 2, config=cfg, rngs=rngs)))
    with pytest.raises(TypeError, match="layers/0/layers/0 is a quantized module nested inside"):
        debug.sensitivity(nested, x, np.zeros(32, np.int32))
    with pytest.raises(ValueError, match="no qjax quantized modules"):
        debug.qparams_table(nnx.Sequential(nnx.Linear(2, 2, rngs=rngs)))
    with pytest.raises(ValueError, match=r"need labels of shape \(32,\)"):
        debug.sensitivity(hooked, x, np.zeros(5, np.int32))


def _digits_cnn():
    from qjax.demo._data import data, make_model  # the digits CNN of examples/ and the demo

    (xtr, ytr), _ = data()
    # examples/cnn_digits.py's config: torch's x86 QAT qconfig, input quantizers, fbgemm
    cfg = default_qat_qconfig("x86").replace(quantize_input=True, scheme="fbgemm")
    model = make_model(nnx.Rngs(0), cfg)
    x, y = jnp.asarray(xtr[:256]), ytr[:256]
    qnnx.calibrate(model, [x], progress=False, then=Mode.QAT)  # BN still on batch stats
    return model, x, y


def test_digits_cnn_views_leave_the_model_unchanged():
    model, x, y = _digits_cnn()
    before = _snapshot(model)
    rows = debug.qparams_table(model)
    health = debug.observer_health(model)
    hists = debug.activation_histograms(model, x, bins=16)
    errs = debug.layer_errors(model, x)
    sens = debug.sensitivity(model, x, y)
    _assert_unchanged(before, _snapshot(model))
    assert {m for _, m, *_ in before[2]} == {Mode.QAT}
    assert [e.path for e in errs] == ["layers/0", "layers/1", "layers/2", "layers/5"]
    assert all(np.isfinite(e.sqnr_db) and e.sqnr_db > 10 for e in errs)
    assert errs[1].output_scale is not None and errs[1].max_error_lsb >= 0
    assert len(rows) == len(health) == 10 and all(h.ok for h in health)
    w1 = [h for h in hists if (h.path, h.role) == ("layers/1", "weight")][0]
    assert w1.n_values == 3 * 3 * 1 * 16
    assert sorted(r.path for r in sens) == [e.path for e in errs]


def test_cli_on_a_file_target(tmp_path, capsys):
    target = tmp_path / "target.py"
    target.write_text(
        textwrap.dedent(
            f"""
            import sys
            sys.path.insert(0, {str(pathlib.Path(__file__).parent)!r})
            from test_debug import _mlp, _shrink_input_range

            def build():
                model, x, y = _mlp()
                _shrink_input_range(model, "layers/2")
                return model, x, y

            def bad():
                return 3
            """
        )
    )
    from qjax.cli import main

    out = tmp_path / "plots"
    assert main(["debug", f"{target}:build", "--out", str(out), "--format", "markdown"]) == 0
    text = capsys.readouterr().out
    for title in ("qparams per quantized tensor", "observer health", "per-layer error"):
        assert f"**{title}" in text
    sens = text.split("**sensitivity")[1].splitlines()
    assert sens[4].startswith("| layers/2 |")  # the shrunk layer tops the sweep
    for name in ("histograms.png", "layer_errors.png", "sensitivity.png"):
        assert (out / name).read_bytes()[:4] == b"\x89PNG"
    assert main(["debug", f"{target}:bad", "--out", str(out)]) == 2
    assert "must return (model, x) or (model, x, y), got int" in capsys.readouterr().err
    assert main(["debug", f"{tmp_path}/none.py:build"]) == 2
    assert "no file" in capsys.readouterr().err
    assert qjax.debug is debug
