"""A served-model file is validated on load: a tampered or damaged file is refused with a
``ValueError`` that names the step (or key) and the bad value, never loaded into a
program that computes garbage, and never an ``AttributeError`` / ``KeyError`` /
``ZeroDivisionError`` from deep inside. The files are written by ``save_served`` from a
small converted CNN (conv, ReLU, max pool, avg pool, flatten, linear) and then edited."""

import json
import math

import numpy as np
import pytest
from _helpers import saved_served_cnn

import qjax


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    path, served, xs = saved_served_cnn(tmp_path_factory.mktemp("served"))
    return path, xs[1], served(xs[1])


def _read(path):
    from safetensors import safe_open

    with safe_open(str(path), framework="np") as f:
        meta = json.loads(f.metadata()["qjax"])
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    return meta, tensors


def _write(path, meta, tensors, raw_meta=None):
    from safetensors.numpy import save_file

    text = raw_meta if raw_meta is not None else json.dumps(meta)
    save_file(tensors, str(path), metadata={"qjax": text})


def test_untampered_file_loads_bit_exact(saved):
    path, x, y = saved
    meta, _ = _read(path)
    assert [st["op"] for st in meta["steps"]] == [
        "quantize", "conv", "max_pool", "avg_pool", "flatten", "linear", "dequantize",
    ]  # fmt: skip
    assert np.array_equal(np.asarray(qjax.load_served(path)(x)), np.asarray(y))


def _set(key, value):
    def edit(meta, tensors):
        tensors[key] = np.asarray(value, tensors[key].dtype).reshape(tensors[key].shape)

    return edit


def _elem(key, value):
    def edit(meta, tensors):
        t = tensors[key].copy()
        t.reshape(-1)[0] = value
        tensors[key] = t

    return edit


def _step(i, **changes):
    def edit(meta, tensors):
        meta["steps"][i].update(changes)

    return edit


def _drop_step_key(i, key):
    def edit(meta, tensors):
        del meta["steps"][i][key]

    return edit


def _drop_tensor(key):
    def edit(meta, tensors):
        del tensors[key]

    return edit


def _meta(fn):
    def edit(meta, tensors):
        fn(meta)

    return edit


# (case id, edit, pattern the ValueError must match); steps: 0 quantize "layers/0",
# 1 conv "layers/1", 2 max_pool, 3 avg_pool, 4 flatten, 5 linear "layers/6", 6 dequantize
TAMPERED = [
    (
        "input scale NaN",
        _set("0.qp.scale", math.nan),
        r"step 0 \('layers/0'.*qp scale must be finite and > 0, got nan",
    ),
    (
        "input scale -0.05",
        _set("0.qp.scale", -0.05),
        r"step 0 .*qp scale must be finite and > 0, got -0.05",
    ),
    ("input scale inf", _set("0.qp.scale", math.inf), r"qp scale must be finite and > 0, got inf"),
    (
        "output scale 0",
        _set("5.out_qp.scale", 0.0),
        r"step 5 \('layers/6'.*out_qp scale must be finite and > 0, got 0.0",
    ),
    (
        "output zero point 700",
        _set("5.out_qp.zero_point", 700),
        r"step 5 .*out_qp zero_point 700 is outside the spec range \[0, 127\]",
    ),
    (
        "input zero point -1",
        _set("1.in_qp.zero_point", -1),
        r"step 1 .*in_qp zero_point -1 is outside",
    ),
    (
        "float zero point",
        lambda m, t: t.update({"0.qp.zero_point": np.asarray(3.5, np.float32)}),
        r"qp zero_point must be an? int",
    ),
    (
        "int64 zero point 2**32+5",
        lambda m, t: t.update({"0.qp.zero_point": np.asarray(2**32 + 5, np.int64)}),
        r"qp zero_point must be an? int",
    ),
    ("NaN bias", _elem("1.b", math.nan), r"step 1 \('layers/1'.*b.*bias must be finite, got nan"),
    ("inf bias", _elem("5.b", -math.inf), r"step 5 .*bias must be finite, got -inf"),
    (
        "bias of the wrong length",
        lambda m, t: t.update({"5.b": np.zeros(1, np.float32)}),
        r"step 5 .*bias has shape \(1,\).*\(3,\)",
    ),
    (
        "weight scale negative",
        _elem("1.w.scale", -0.5),
        r"step 1 .*w scale must be finite and > 0, got \[-0.5\]",
    ),
    (
        "weight scale NaN",
        _elem("5.w.scale", math.nan),
        r"step 5 .*w scale must be finite and > 0, got \[nan\]",
    ),
    (
        "weight zero point 300",
        _elem("5.w.zero_point", 300),
        r"step 5 .*w zero_point \[300\] \(shape \(1,\)\) is outside",
    ),
    (
        "weight codes of another dtype",
        lambda m, t: t.update({"5.w.values": t["5.w.values"].astype(np.int16)}),
        r"step 5 .*w.*int16",
    ),
    (
        "max_abs_x lowered",
        _meta(lambda m: m["params"][5]["w"].update(max_abs_x=3)),
        r"step 5 .*max_abs_x 3",
    ),
    (
        "conv padding 3000",
        _step(
            1,
            geometry={"layout": "NHWC", "padding": [[3000, 3000], [3000, 3000]], "stride": [1, 1]},
        ),
        r"step 1 \('layers/1'.*padding 3000 .*bound",
    ),
    (
        "conv padding -2",
        _step(1, geometry={"layout": "NHWC", "padding": [[-2, 0], [0, 0]], "stride": [1, 1]}),
        r"step 1 .*padding -2",
    ),
    (
        "conv padding 'FULL'",
        _step(1, geometry={"layout": "NHWC", "padding": "FULL", "stride": [1, 1]}),
        r"step 1 .*padding 'FULL'",
    ),
    (
        "conv stride 0",
        _step(1, geometry={"layout": "NHWC", "padding": "SAME", "stride": [0, 1]}),
        r"step 1 .*stride 0",
    ),
    (
        "conv layout NCHW",
        _step(1, geometry={"layout": "NCHW", "padding": "SAME", "stride": [1, 1]}),
        r"step 1 .*layout 'NCHW'",
    ),
    ("pool stride 0", _step(2, strides=[0, 2]), r"step 2 \('layers/3', max_pool\).*strides 0"),
    ("pool window 0", _step(2, window=[0, 2]), r"step 2 .*window 0"),
    (
        "pool window larger than input",
        _step(3, window=[50, 50], strides=[1, 1]),
        r"step 3 .*window 50 .*input",
    ),
    ("pool padding 3000", _step(2, padding=3000), r"step 2 .*padding 3000.*half the window"),
    ("pool padding as a string", _step(3, padding="x"), r"step 3 .*padding 'x'"),
    ("unknown op", _step(4, op="exec"), r"step 4 .*unknown op 'exec'"),
    ("relu flag not a bool", _step(5, relu="yes"), r"step 5 .*relu 'yes'"),
    ("unknown compat", _step(0, compat="evil"), r"step 0 .*compat 'evil'"),
    ("unknown scheme", _step(5, scheme="nope"), r"step 5 .*scheme 'nope'"),
    ("JSON list metadata", None, r"metadata is a list, not a JSON object"),
    ("metadata not JSON", "not json", r"metadata is not JSON"),
    ("steps missing", _meta(lambda m: m.pop("steps")), r"missing 'steps'"),
    ("input_shape missing", _meta(lambda m: m.pop("input_shape")), r"missing 'input_shape'"),
    (
        "input_shape negative",
        _meta(lambda m: m.update(input_shape=[8, -8, 1])),
        r"input_shape \[8, -8, 1\]",
    ),
    (
        "params shorter than steps",
        _meta(lambda m: m["params"].pop()),
        r"7 steps but 6 parameter entries",
    ),
    (
        "step not an object",
        _meta(lambda m: m["steps"].__setitem__(4, "flatten")),
        r"step 4 .*not a JSON object",
    ),
    ("step name missing", _drop_step_key(5, "name"), r"step 5 .*'name'"),
    ("step scheme missing", _drop_step_key(5, "scheme"), r"step 5 .*missing 'scheme'"),
    (
        "conv weight missing",
        _meta(lambda m: m["params"][1].pop("w")),
        r"step 1 .*missing parameter 'w'",
    ),
    (
        "unexpected parameter",
        _meta(lambda m: m["params"][2].update(x={"kind": "array"})),
        r"step 2 .*unexpected parameter 'x'",
    ),
    (
        "parameter kind unknown",
        _meta(lambda m: m["params"][0]["qp"].update(kind="pickle")),
        r"step 0 .*qp.*kind 'pickle'",
    ),
    (
        "spec with an unknown field",
        _meta(lambda m: m["params"][0]["qp"]["spec"].update(evil=1)),
        r"step 0 .*qp.*unknown QuantSpec fields \['evil'\]",
    ),
    (
        "spec bits 99",
        _meta(lambda m: m["params"][0]["qp"]["spec"].update(bits=99)),
        r"step 0 .*qp.*bits must be in 2..16",
    ),
    (
        "weight values tensor missing",
        _drop_tensor("5.w.values"),
        r"step 5 .*missing tensor '5.w.values'",
    ),
    ("scale tensor missing", _drop_tensor("0.qp.scale"), r"step 0 .*missing tensor '0.qp.scale'"),
    (
        "linear in-features changed",
        lambda m, t: t.update({"5.w.values": np.zeros((7, 3), np.int8)}),
        r"step 5 .*takes 7 input features.*has 32",
    ),
    (
        "activation scale per-channel",
        lambda m, t: t.update(
            {
                "1.out_qp.scale": np.full(2, 0.1, np.float32),
                "1.out_qp.zero_point": np.zeros(2, np.int32),
            }
        ),
        r"step 1 .*out_qp.*shape \(2,\)",
    ),
]


@pytest.mark.parametrize("edit, pattern", [c[1:] for c in TAMPERED], ids=[c[0] for c in TAMPERED])
def test_tampered_file_is_refused_with_the_step_and_value(saved, tmp_path, edit, pattern):
    path, _, _ = saved
    meta, tensors = _read(path)
    bad = tmp_path / "bad.safetensors"
    if edit is None:
        _write(bad, None, tensors, raw_meta=json.dumps([meta]))
    elif isinstance(edit, str):
        _write(bad, None, tensors, raw_meta=edit)
    else:
        edit(meta, tensors)
        _write(bad, meta, tensors)
    with pytest.raises(ValueError, match=pattern) as info:
        qjax.load_served(bad)
    assert str(info.value).startswith(f"load_served: {str(bad)!r}"), info.value
