"""A served-program file is validated on load: a tampered or damaged file is refused with
a ``ValueError`` that names the step (or key) and the bad value, never loaded into a
program that computes garbage, and never an ``AttributeError`` / ``KeyError`` /
``ZeroDivisionError`` from deep inside. The files are written by ``save_served`` from a
small converted ``nnx.Sequential`` CNN (conv, ReLU, max pool, avg pool, flatten, linear;
format ``qjax.program``) and then edited. Files of the removed ``qjax.served`` format are
refused with a version error that says how to re-create them."""

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
    assert meta["format"] == "qjax.program"
    assert [st["name"] for st in meta["steps"]] == [
        "layers/0", "layers/1", "relu", "max_pool", "max_pool:dequantize",
        "reduce_window_sum", "div", "reshape_3", "layers/6:input", "layers/6",
        "layers/6:dequantize",
    ]  # fmt: skip
    assert np.array_equal(np.asarray(qjax.load_served(path)(x)), np.asarray(y))


def test_a_file_of_the_removed_served_format_is_refused_with_the_fix(tmp_path):
    """The JSON-step interpreter's files (format ``qjax.served``) are not converted (its
    average pool rounded the mean of the codes, which no program step computes): the
    error names the format and says how to re-create the file."""
    meta = {
        "format": "qjax.served",
        "version": 1,
        "steps": [{"op": "quantize", "name": "stub", "compat": "qjax"}],
        "params": [{"qp": {"kind": "qparams", "spec": {}}}],
        "input_shape": [3],
    }
    tensors = {"0.qp.scale": np.float32(0.5), "0.qp.zero_point": np.int32(0)}
    path = tmp_path / "old.safetensors"
    _write(path, meta, {k: np.asarray(v) for k, v in tensors.items()})
    with pytest.raises(ValueError) as info:
        qjax.load_served(path)
    msg = str(info.value)
    assert msg.startswith(f"load_served: {str(path)!r} holds format 'qjax.served' version 1")
    assert "reads 'qjax.program' version 1" in msg
    assert "convert the model again with this qjax" in msg and "qjax.save_served" in msg


# -- tampering: edits by step name (tensors are keyed by step index) ---------------------


def _i(meta, name):
    return next(i for i, st in enumerate(meta["steps"]) if st["name"] == name)


def _attrs(meta, name):
    return meta["steps"][_i(meta, name)]["attrs"]["dict"]


def _tensor(step, key, value, elem=False):
    """Set tensor ``<index of step>.<key>`` (its first element with ``elem``)."""

    def edit(meta, tensors):
        k = f"{_i(meta, step)}.{key}"
        if isinstance(value, np.ndarray):
            tensors[k] = value
        elif elem:
            t = tensors[k].copy()
            t.reshape(-1)[0] = value
            tensors[k] = t
        else:
            tensors[k] = np.asarray(value, tensors[k].dtype).reshape(tensors[k].shape)

    return edit


def _drop_tensor(step, key):
    def edit(meta, tensors):
        del tensors[f"{_i(meta, step)}.{key}"]

    return edit


def _geometry(**changes):
    def edit(meta, tensors):
        _attrs(meta, "layers/1")["geometry"]["dict"].update(changes)

    return edit


def _pool(**changes):
    def edit(meta, tensors):
        _attrs(meta, "max_pool")["params"]["dict"].update(changes)

    return edit


def _meta(fn):
    def edit(meta, tensors):
        fn(meta)

    return edit


def _step(name, fn):
    return _meta(lambda m: fn(m["steps"][_i(m, name)]))


CONV, FC, IN, FC_IN = "layers/1", "layers/6", "layers/0", "layers/6:input"
# (case id, edit, pattern the ValueError must match); steps: 0 quantize "layers/0", 1 conv
# "layers/1", 2 relu, 3 max_pool, 4-7 the float avg pool and flatten, 8 quantize
# "layers/6:input", 9 linear "layers/6", 10 dequantize
TAMPERED = [
    ("input scale NaN", _tensor(IN, "qp.scale", math.nan),
     r"step 0 \('layers/0'.*scale must be finite and > 0, got nan"),
    ("input scale -0.05", _tensor(IN, "qp.scale", -0.05),
     r"step 0 .*scale must be finite and > 0, got -0.05"),
    ("input scale inf", _tensor(IN, "qp.scale", math.inf),
     r"scale must be finite and > 0, got inf"),
    ("output scale 0", _tensor(FC, "y.scale", 0.0),
     r"step 9 \('layers/6'.*scale must be finite and > 0, got 0.0"),
    ("output zero point 700", _tensor(FC, "y.zero_point", 700),
     r"step 9 .*zero_point 700 is outside the spec range"),
    ("input zero point -1", _tensor(FC_IN, "qp.zero_point", -1),
     r"step 8 .*zero_point -1 is outside"),
    ("float zero point", _tensor(IN, "qp.zero_point", np.asarray(3.5, np.float32)),
     r"zero_point must be an? int"),
    ("int64 zero point 2**32+5", _tensor(IN, "qp.zero_point", np.asarray(2**32 + 5, np.int64)),
     r"zero_point must be an? int"),
    ("NaN bias", _tensor(CONV, "b", math.nan, elem=True),
     r"step 1 \('layers/1'.*bias must be finite, got nan"),
    ("inf bias", _tensor(FC, "b", -math.inf, elem=True), r"step 9 .*bias must be finite, got -inf"),
    ("bias of the wrong length", _tensor(FC, "b", np.zeros(1, np.float32)),
     r"step 9 .*bias has shape \(1,\), the layer has 3 outputs"),
    ("weight scale negative", _tensor(CONV, "w.scale", -0.5, elem=True),
     r"step 1 .*scale must be finite and > 0, got \[-0.5"),
    ("weight scale NaN", _tensor(FC, "w.scale", math.nan, elem=True),
     r"step 9 .*scale must be finite and > 0, got \[nan"),
    ("weight zero point 300", _tensor(FC, "w.zero_point", 300, elem=True),
     r"step 9 .*zero_point \[300.*is outside"),
    ("weight codes of another dtype",
     lambda m, t: t.update({"9.w.values": t["9.w.values"].astype(np.int16)}),
     r"step 9 .*int16"),
    ("max_abs_x lowered", _step(FC, lambda st: st["params"][0].update(max_abs_x=3)),
     r"step 9 .*max_abs_x 3"),
    # shapes that do not fit the rest of the program: refused on load (the load traces it)
    ("conv padding 3000", _geometry(padding=[[3000, 3000], [3000, 3000]]),
     r"does not run on .*reshape of shape \(4, 3003, 3003, 2\) to \(4, 32\)"),
    ("conv padding -2", _geometry(padding=[[-2, 0], [0, 0]]), r"step 1 .*padding"),
    ("conv padding 'FULL'", _geometry(padding="FULL"), r"step 1 .*padding 'FULL'"),
    ("conv stride 0", _geometry(stride=[0, 1]), r"step 1 .*stride"),
    ("conv layout NCHW", _geometry(layout="NCHW"), r"step 1 .*layout 'NCHW'"),
    ("pool stride 0", _pool(window_strides=[1, 0, 2, 1]),
     r"step 'max_pool' .*window_strides .*strictly positive, got \(1, 0, 2, 1\)"),
    ("pool window 0", _pool(window_dimensions=[1, 0, 2, 1]),
     r"step 'max_pool' .*window_dimensions .*strictly positive, got \(1, 0, 2, 1\)"),
    ("pool window larger than input", _pool(window_dimensions=[1, 50, 50, 1]),
     r"does not run on .*reshape of shape \(4, 0, 0, 2\)"),
    ("pool padding 3000", _pool(padding=[[0, 0], [3000, 3000], [0, 0], [0, 0]]),
     r"does not run on .*reshape of shape \(4, 3004, 4, 2\)"),
    ("unknown kind", _step("relu", lambda st: st.update(kind="exec")),
     r"step 2 .*unknown kind 'exec'"),
    ("relu flag not a bool", _step(FC, lambda st: st["attrs"]["dict"].update(relu="yes")),
     r"step 9 .*relu 'yes'"),
    ("unknown compat", _step(IN, lambda st: st["attrs"]["dict"].update(compat="evil")),
     r"step 0 .*compat 'evil'"),
    ("unknown scheme", _step(FC, lambda st: st["attrs"]["dict"].update(scheme="nope")),
     r"step 9 .*scheme 'nope'"),
    ("JSON list metadata", None, r"metadata is a list, not a JSON object"),
    ("metadata not JSON", "not json", r"metadata is not JSON"),
    ("steps missing", _meta(lambda m: m.pop("steps")), r"missing 'steps'"),
    ("inputs missing", _meta(lambda m: m.pop("inputs")), r"missing 'inputs'"),
    ("input shape negative", _meta(lambda m: m["inputs"][0]["shape"].__setitem__(1, -8)),
     r"dimension -8"),
    ("step not an object", _meta(lambda m: m["steps"].__setitem__(7, "flatten")),
     r"step 7 .*not a JSON object"),
    ("step name missing", _step(FC, lambda st: st.pop("name")), r"step 9 .*'name'"),
    ("layer weight missing", _step(CONV, lambda st: st["params"].pop(0)),
     r"step 1 \('layers/1'.*params are \[weights, bias, out qparams\]"),
    ("parameter kind unknown", _step(IN, lambda st: st["params"].update(kind="pickle")),
     r"step 0 .*kind 'pickle'"),
    ("spec with an unknown field", _step(IN, lambda st: st["params"]["spec"].update(evil=1)),
     r"step 0 .*unknown QuantSpec fields \['evil'\]"),
    ("spec bits 99", _step(IN, lambda st: st["params"]["spec"].update(bits=99)),
     r"step 0 .*bits must be in 2..16"),
    ("weight values tensor missing", _drop_tensor(FC, "w.values"),
     r"step 9 .*missing tensor '9.w.values'"),
    ("scale tensor missing", _drop_tensor(IN, "qp.scale"), r"step 0 .*missing tensor '0.qp.scale'"),
    ("linear in-features changed", _tensor(FC, "w.values", np.zeros((7, 3), np.int8)),
     r"layers/6.*\(4, 32\) does not fit a \(7, 3\) weight"),
    ("activation scale per-channel",
     lambda m, t: t.update({"0.qp.scale": np.full(2, 0.1, np.float32),
                            "0.qp.zero_point": np.zeros(2, np.int32)}),
     r"step 0 .*shape \(2,\)"),
]  # fmt: skip


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


_POOL_EDITS = {c[0]: c[1:] for c in TAMPERED if c[0].startswith("pool ")}


@pytest.mark.parametrize("name", sorted(_POOL_EDITS))
def test_tampered_pool_is_refused_alike_on_a_native_kernel(saved, tmp_path, name):
    """On ``kernel="auto"`` a max pool on codes may be a native call: a tampered window is
    still refused with XLA's message naming the step and the value (the native path takes
    only well-formed windows), as are malformed parameter lists."""
    from qjax.flax._steps import _max_pool_nhwc

    path, _, _ = saved
    edit, pattern = _POOL_EDITS[name]
    meta, tensors = _read(path)
    edit(meta, tensors)
    bad = tmp_path / "bad.safetensors"
    _write(bad, meta, tensors)
    with pytest.raises(ValueError, match=pattern):
        qjax.load_served(bad, kernel="auto")
    good = {"window_dimensions": (1, 2, 2, 1), "window_strides": (1, 2, 2, 1),
            "padding": ((0, 0), (0, 1), (1, 0), (0, 0)), "window_dilation": (1, 1, 1, 1),
            "base_dilation": (1, 1, 1, 1)}  # fmt: skip
    assert _max_pool_nhwc(good)["pads"] == ((0, 1), (1, 0))
    malformed = [("window_dilation", (1, 1, 1)), ("window_strides", (1, 0, 2, 1)),
                 ("padding", ((0, 0), (0,), (0, 0), (0, 0))), ("padding", None),
                 ("window_dimensions", (2, 2, 2, 1)), ("base_dilation", (1, 2, 1, 1))]  # fmt: skip
    for key, value in malformed:
        assert _max_pool_nhwc({**good, key: value}) is None, (key, value)
