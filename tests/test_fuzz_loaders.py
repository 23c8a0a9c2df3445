"""Fuzzing the two file readers that take files from anywhere: ``qjax.load_served`` (a
safetensors file: JSON metadata + tensors) and the converted-state_dict reader
(``qjax.converters.state_dict.load_state_dict``, ``torch.load(weights_only=True)``).

Contract, for every mutated file: the reader either

* loads it, and the result equals the original's (the served program's outputs on a
  fixed input; the state_dict reader's tree, leaf for leaf), or
* refuses it with a ``ValueError`` / ``TypeError`` that has a message;

never another exception type, never code from the file run, never a silently different
result. The mutations are chosen so that a mutated file is invalid or means what the
original meant (names, extra keys the reader ignores): a number becomes NaN, +-inf,
negative, zero or huge, a value takes the wrong JSON / Python type, a list becomes a
dict and back, keys go missing or appear, tensors change dtype or shape, the metadata is
cut; valid alternatives (a bool flipped, another known scheme, a ``null`` optional spec
field) are left out, because they describe another program. Files that carry a pickle
which runs code (the ``Evil`` of :mod:`test_cli`, and its malicious ``.pt2``) are in
the state_dict corpus: the marker such a payload writes must never appear.

Each test prints its counts (tried / refused cleanly / loaded and equal / executed code /
silently wrong) with ``-s``; the last two must be 0. Hypothesis runs a fixed number of
examples, derandomized, with no deadline: the whole module takes a few seconds."""

import collections
import io
import json
import math
import pathlib

import jax
import numpy as np
import pytest
from _helpers import saved_served_cnn
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_served_validation import _read, _write

import qjax

torch = pytest.importorskip("torch")
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::UserWarning")

FUZZ = settings(
    max_examples=300,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
CLEAN = (ValueError, TypeError)


class Tally:
    """Outcome counts of one fuzz run, printed at its end."""

    def __init__(self, what):
        self.what, self.n = what, collections.Counter()
        self.wrong = []  # mutations that loaded into a different result
        self.crashed = []  # (mutation, exception) of unclean failures

    def report(self, capsys):
        n = self.n
        line = (
            f"{self.what}: {n['tried']} files tried, {n['refused']} refused cleanly, "
            f"{n['equal']} loaded and equal, {n['executed']} executed code, "
            f"{n['wrong']} silently wrong, {n['crashed']} other exceptions"
        )
        with capsys.disabled():
            print(f"\n{line}")
        assert n["tried"] == n["refused"] + n["equal"] + n["wrong"] + n["crashed"], n
        assert n["executed"] == 0, line
        assert n["wrong"] == 0, f"{line}: {self.wrong[:5]}"
        assert n["crashed"] == 0, f"{line}: {self.crashed[:5]}"
        assert n["refused"] > 0 and n["equal"] > 0, line  # both outcomes were exercised


def _refused(e: Exception) -> bool:
    """A clean refusal: ValueError / TypeError with a message."""
    return isinstance(e, CLEAN) and bool(str(e).strip())


# --------------------------------------------------------------------------------------
# served files (the small CNN of test_served_validation: conv, ReLU, max/avg pool,
# flatten, linear)


@pytest.fixture(scope="module")
def served_file(tmp_path_factory):
    d = tmp_path_factory.mktemp("fuzz_served")
    _, served, xs = saved_served_cnn(d)
    meta, tensors = _read(d / "cnn.safetensors")
    return d, meta, tensors, np.asarray(xs[1]), np.asarray(served(xs[1]))


# replacement values for a JSON leaf or container: each breaks the field it lands on or
# (e.g. 0 for a padding of 0) changes nothing
JSON_POOL = [
    math.nan,
    math.inf,
    -math.inf,
    -1,
    0,
    -(2**40),
    2**31,
    2**63,
    10**30,
    1e308,
    0.5,
    True,
    None,
    "",
    "bogus",
    [],
    {},
    [None],
    {"k": 1},
    [1, 2, 3, 4, 5, 6, 7, 8, 9],
]
SPEC_OPTIONAL = {"quant_min", "quant_max", "axis", "group_size", "group_axis"}


def _json_paths(node, path=()):
    """Every position in the metadata: (path, value)."""
    yield path, node
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _json_paths(v, (*path, k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _json_paths(v, (*path, i))


def _parent(meta, path):
    node = meta
    for k in path[:-1]:
        node = node[k]
    return node


def _valid_alternative(old, new, key) -> bool:
    """``new`` is a legitimate other value for ``key`` (a different program, not a
    damaged file): a bool flipped, or ``null`` for an optional spec field."""
    if isinstance(old, bool) and isinstance(new, bool):
        return True
    return new is None and key in SPEC_OPTIONAL


@st.composite
def served_mutations(draw, meta, tensors):
    """(description, edit(meta, tensors) -> raw metadata text or None)."""
    kind = draw(st.sampled_from(["replace", "replace", "delete", "extra", "retype", "tensor"]))
    paths = [p for p, _ in _json_paths(meta)]
    if kind == "tensor":
        return draw(_tensor_mutation(tensors))
    if kind == "extra":
        where = draw(st.sampled_from([p for p, v in _json_paths(meta) if isinstance(v, dict)]))

        def edit(m, t):
            node = m
            for k in where:
                node = node[k]
            node["bogus_key"] = 1

        return f"extra key at {list(where)}", edit
    path = draw(st.sampled_from(paths[1:] if kind == "delete" else paths))
    if kind == "delete":

        def edit(m, t):
            del _parent(m, path)[path[-1]]

        return f"delete {list(path)}", edit
    if kind == "retype":
        if not path:
            cut = draw(st.integers(0, 400))
            return f"metadata cut at {cut}", lambda m, t: json.dumps(m)[:cut]

        def edit(m, t):
            parent = _parent(m, path)
            old = parent[path[-1]]
            if isinstance(old, dict):
                parent[path[-1]] = list(old.values())
            elif isinstance(old, list):
                parent[path[-1]] = {str(i): v for i, v in enumerate(old)}
            else:
                parent[path[-1]] = [old]

        return f"retype {list(path)}", edit
    new = draw(st.sampled_from(JSON_POOL))
    if not path:
        return f"metadata is {new!r}", lambda m, t: json.dumps(new)
    old = _parent(meta, path)[path[-1]]
    # a bool flipped or a null optional spec field is another valid file: left out
    new = JSON_POOL[0] if _valid_alternative(old, new, path[-1]) else new

    def edit(m, t):
        _parent(m, path)[path[-1]] = new

    return f"{list(path)}: {old!r} -> {new!r}", edit


# tensor values by role: each invalid for that role
SCALE_BAD = [math.nan, math.inf, -math.inf, 0.0, -0.0, -1.0, -1e-30, 1e39]
ZP_BAD = [700, -700, 256, -129, 2**31 - 1, -(2**31)]
BIAS_BAD = [math.nan, math.inf, -math.inf]
DTYPES = ["float64", "float16", "int64", "int32", "int8", "uint8", "int16", "float32", "bool"]


@st.composite
def _tensor_mutation(draw, tensors):
    key = draw(st.sampled_from(sorted(tensors)))
    how = draw(st.sampled_from(["value", "dtype", "shape", "drop", "extra"]))
    if how == "drop":
        return f"drop tensor {key}", lambda m, t: t.pop(key)
    if how == "extra":
        return "extra tensor", lambda m, t: t.__setitem__("9.w.values", np.zeros(3, np.int8))
    if how == "dtype":
        dt = draw(st.sampled_from([d for d in DTYPES if d != tensors[key].dtype.name]))
        return f"{key} as {dt}", lambda m, t: t.__setitem__(key, t[key].astype(dt))
    if how == "shape":
        shapes = [(1,), (0,), (2,), (1, 1), (*tensors[key].shape, 1), (3, 2)]
        shape = draw(st.sampled_from([s for s in shapes if s != tensors[key].shape]))

        def reshape(m, t):
            flat = np.resize(t[key].reshape(-1), max(1, math.prod(shape)))
            t[key] = flat[: math.prod(shape)].reshape(shape)

        return f"{key} shape {shape}", reshape
    if key.endswith(".scale"):
        pool = SCALE_BAD
    elif key.endswith(".zero_point"):
        pool = ZP_BAD
    elif key.endswith(".b"):
        pool = BIAS_BAD
    else:  # int8 weight codes: every int8 is a valid code; change the dtype instead
        return f"{key} as int16 300", _codes_300(key)
    v = draw(st.sampled_from(pool))
    i = draw(st.integers(0, max(0, tensors[key].size - 1)))

    def edit(m, t):
        a = t[key].copy()
        with np.errstate(over="ignore", invalid="ignore"):
            a.reshape(-1)[i] = np.asarray(v).astype(a.dtype)
        t[key] = a

    return f"{key}[{i}] = {v}", edit


def _codes_300(key):
    def edit(m, t):
        a = t[key].astype(np.int16)
        a.reshape(-1)[0] = 300
        t[key] = a

    return edit


def test_fuzz_served_metadata_and_tensors(served_file, capsys):
    d, meta0, tensors0, x, y0 = served_file
    tally = Tally("load_served fuzz")
    path = d / "mutated.safetensors"

    @FUZZ
    @given(st.data())
    def one(data):
        meta, tensors = json.loads(json.dumps(meta0)), {k: v.copy() for k, v in tensors0.items()}
        what, edit = data.draw(served_mutations(meta0, tensors0), label="mutation")
        raw = edit(meta, tensors)
        _write(path, meta, tensors, raw_meta=raw if isinstance(raw, str) else None)
        tally.n["tried"] += 1
        try:
            program = qjax.load_served(path)
            y = np.asarray(program(x))
        except Exception as e:
            if _refused(e):
                tally.n["refused"] += 1
            else:
                tally.n["crashed"] += 1
                tally.crashed.append(f"{what}: {type(e).__name__}: {e}")
            return
        if y.shape == y0.shape and np.array_equal(y, y0, equal_nan=True):
            tally.n["equal"] += 1
        else:
            tally.n["wrong"] += 1
            tally.wrong.append(what)

    one()
    tally.report(capsys)


# --------------------------------------------------------------------------------------
# converted eager state_dicts


@pytest.fixture(scope="module")
def state_dict_case(tmp_path_factory):
    from qjax.converters.state_dict import load_state_dict
    from test_converters_state_dict import CONVERTED_TABLE, _converted

    sd = dict(_converted().state_dict())
    tree = load_state_dict(sd, None, CONVERTED_TABLE).tree
    target = jax.eval_shape(lambda: tree)
    return sd, tree, target, tmp_path_factory.mktemp("fuzz_sd")


NAN, INF = float("nan"), float("inf")
SD_SCALE_BAD = [NAN, INF, -INF, 0.0, -1.0, 1e300, -1e-300]
SD_ZP_BAD = [700, -1, 256, 2**40, -(2**40)]  # quint8 activations: 0..255
SD_WEIGHT_ZP_BAD = [700, 128, -129, 2**32 + 3, 2**40]  # qint8 weights: -128..127 (-1 is valid)
SD_TYPE_BAD = [
    "x",
    None,
    3,
    0.5,
    [0.1],
    {"a": 1},
    (1, 2),
    b"\x00",
    torch.float32,
]


def _tensor_like(v, dtype):
    return torch.tensor(v, dtype=dtype)


@st.composite
def sd_mutations(draw, sd, marker):
    keys = sorted(sd)
    kind = draw(
        st.sampled_from(["scale", "zero_point", "weight", "bias", "type", "shape", "keys", "evil"])
    )
    if kind == "scale":
        key = draw(st.sampled_from([k for k in keys if k.endswith("scale")]))
        v = draw(st.sampled_from(SD_SCALE_BAD))
        dt = draw(st.sampled_from([torch.float32, torch.float64]))
        return f"{key} = {v} ({dt})", lambda s: s.__setitem__(
            key, _tensor_like([v] if s[key].ndim else v, dt)
        )
    if kind == "zero_point":
        key = draw(st.sampled_from([k for k in keys if k.endswith("zero_point")]))
        v = draw(st.sampled_from(SD_ZP_BAD))
        return f"{key} = {v}", lambda s: s.__setitem__(
            key, _tensor_like([v] if s[key].ndim else v, torch.int64)
        )
    if kind == "weight":
        return draw(_weight_mutation())
    if kind == "bias":
        v = draw(st.sampled_from([NAN, INF, -INF]))
        where = draw(st.sampled_from(["conv.bias", "fc"]))

        def edit(s):
            if where == "conv.bias":
                b = s["conv.bias"].detach().clone()
                b[1] = v
                s["conv.bias"] = b
            else:
                w, b = s["fc._packed_params._packed_params"]
                b = b.detach().clone()
                b[0] = v
                s["fc._packed_params._packed_params"] = (w, b)

        return f"{where} bias {v}", edit
    if kind == "type":
        key = draw(st.sampled_from(keys))
        v = draw(st.sampled_from(SD_TYPE_BAD))
        return f"{key} = {v!r}", lambda s: s.__setitem__(key, v)
    if kind == "shape":
        key = draw(st.sampled_from([k for k in keys if k.endswith(("scale", "zero_point"))]))
        n = draw(st.sampled_from([0, 2, 5]))

        def edit(s):
            t = s[key].reshape(-1)
            s[key] = t.repeat(n) if n else t[:0]

        return f"{key} with {n} elements", edit
    if kind == "keys":
        how = draw(st.sampled_from(["drop", "extra", "rename"]))
        key = draw(st.sampled_from(keys))
        if how == "drop":
            return f"drop {key}", lambda s: s.pop(key)
        if how == "extra":
            return "extra key", lambda s: s.__setitem__("fc.extra", torch.ones(2))
        return f"rename {key}", lambda s: s.__setitem__(key + "_", s.pop(key))
    # a pickle that runs code on load (test_cli's Evil), at any key or nested in a value
    key = draw(st.sampled_from(keys))
    nested = draw(st.booleans())
    evil = _evil(marker)
    return f"Evil at {key} (nested={nested})", lambda s: s.__setitem__(
        key, (s[key], evil) if nested else evil
    )


def _evil(marker):
    from test_cli import Evil  # the malicious object of the CLI tests

    return Evil(marker)


@st.composite
def _weight_mutation(draw):
    which = draw(st.sampled_from(["conv.weight", "fc"]))
    how = draw(st.sampled_from(["scale", "zp", "float", "int", "quint8", "tuple"]))
    v = draw(st.sampled_from(SD_SCALE_BAD if how == "scale" else SD_WEIGHT_ZP_BAD))
    c = draw(st.integers(0, 2))
    shape = draw(st.sampled_from(["(w,)", "(w, b, b)", "[w, b]", "(b, w)", "{'w': w}"]))

    def change(w):
        if how == "float":
            return w.dequantize()
        if how == "int":
            return w.int_repr()
        if how == "quint8":
            return torch.quantize_per_tensor(w.dequantize(), 0.1, 0, torch.quint8)
        s = w.q_per_channel_scales().clone()
        z = w.q_per_channel_zero_points().clone()
        if how == "scale":
            s[c] = v
        else:
            z[c] = v
        return torch._make_per_channel_quantized_tensor(w.int_repr(), s, z, w.q_per_channel_axis())

    def edit(s):
        if which == "conv.weight":
            s[which] = change(s[which])
            return
        key = "fc._packed_params._packed_params"
        w, b = s[key]
        if how == "tuple":
            s[key] = eval(shape, {"w": w, "b": b})  # noqa: S307 (a literal of w and b)
        else:
            s[key] = (change(w), b)

    detail = {"scale": v, "zp": v, "tuple": shape}.get(how, "")
    return f"{which} {how} {detail} (channel {c})", edit


def _same_tree(a, b) -> bool:
    la, ta = jax.tree.flatten(a)
    lb, tb = jax.tree.flatten(b)
    return ta == tb and all(
        np.shape(x) == np.shape(y)
        and np.asarray(x).dtype == np.asarray(y).dtype
        and np.array_equal(np.asarray(x), np.asarray(y), equal_nan=True)
        for x, y in zip(la, lb, strict=True)
    )


def test_fuzz_converted_state_dicts(state_dict_case, capsys):
    from qjax.converters.state_dict import load_state_dict
    from test_converters_state_dict import CONVERTED_TABLE

    sd0, tree0, target, d = state_dict_case
    tally = Tally("state_dict fuzz")
    marker = d / "PWNED"

    @FUZZ
    @given(st.data())
    def one(data):
        sd = dict(sd0)
        what, edit = data.draw(sd_mutations(sd0, marker), label="mutation")
        edit(sd)
        buf = io.BytesIO()
        torch.save(sd, buf)
        tally.n["tried"] += 1
        results = []
        for tgt in (target, None):  # onto the model's shapes, and onto no target
            try:
                out = load_state_dict(io.BytesIO(buf.getvalue()), tgt, CONVERTED_TABLE)
            except Exception as e:
                results.append("refused" if _refused(e) else "crashed")
                if results[-1] == "crashed":
                    tally.crashed.append(f"{what} (target: {tgt is not None}): {e!r}")
            else:  # onto no target a dropped key leaves a visibly smaller tree: not judged
                results.append("equal" if tgt is None or _same_tree(out.tree, tree0) else "wrong")
        result = "crashed" if "crashed" in results else results[0]
        tally.n[result] += 1
        if result == "wrong":
            tally.wrong.append(what)
        if marker.exists():
            tally.n["executed"] += 1
            marker.unlink()

    one()
    # the malicious .pt2 of the CLI tests, read as a state_dict: refused, never run
    from test_cli import _evil_pt2

    evil, pt2_marker = _evil_pt2(d)
    tally.n["tried"] += 1
    with pytest.raises(ValueError, match="holds Python objects|not a readable") as e:
        load_state_dict(evil, target, CONVERTED_TABLE)
    tally.n["refused"] += _refused(e.value)
    tally.n["executed"] += pt2_marker.exists()
    tally.report(capsys)


def test_fuzz_served_refuses_torch_files(state_dict_case, served_file):
    """A pickle or a .pt2 passed to load_served is not a served file: named ValueError."""
    sd0, _, _, d = state_dict_case
    marker = pathlib.Path(d) / "PWNED_SERVED"
    path = pathlib.Path(d) / "evil.safetensors"
    torch.save({"w": _evil(marker)}, path)
    with pytest.raises(ValueError, match="not a qjax served-model safetensors file"):
        qjax.load_served(path)
    assert not marker.exists()


# --------------------------------------------------------------------------------------
# what the fuzzing found, pinned (each failed before its fix)


def _spec_of(meta, kind, param):
    """The spec (a JSON object) of the first ``kind`` step's parameter ``param`` (None: a
    quantize step's qparams; an index: a layer's weight 0, bias 1, output qparams 2)."""
    st = next(st for st in meta["steps"] if st["kind"] == kind)
    return (st["params"] if param is None else st["params"][param])["spec"]


@pytest.mark.parametrize(
    "kind, param, field, value, pattern",
    [
        # an activation spec made per-axis: UnboundLocalError before
        ("quantize", None, "axis", -1, r"activation qparams must be per-tensor"),
        # QuantSpec took any JSON value as a bool: these loaded
        ("layer", 2, "narrow_range", "bogus", r"spec narrow_range 'bogus' must be"),
        ("quantize", None, "reduce_range", 0, r"spec reduce_range 0 must be true or false"),
        ("layer", 0, "symmetric", "", r"spec symmetric '' must be true or false"),
        ("quantize", None, "quant_min", True, r"spec quant_min True must be an integer or null"),
    ],
)
def test_served_spec_fields_found_by_fuzzing(served_file, kind, param, field, value, pattern):
    d, meta0, tensors0, _, _ = served_file
    meta = json.loads(json.dumps(meta0))
    _spec_of(meta, kind, param)[field] = value
    _write(d / "found.safetensors", meta, dict(tensors0))
    with pytest.raises(ValueError, match=pattern):
        qjax.load_served(d / "found.safetensors")


def test_layer_out_of_another_type_found_by_fuzzing(served_file):
    """A layer's ``out`` qparams replaced by a string: AttributeError before."""
    d, meta0, tensors0, _, _ = served_file
    meta = json.loads(json.dumps(meta0))
    next(st for st in meta["steps"] if st["kind"] == "layer")["layer"]["out"] = ""
    _write(d / "found.safetensors", meta, dict(tensors0))
    with pytest.raises(ValueError, match=r"layer out '' must be qparams"):
        qjax.load_served(d / "found.safetensors")


def test_packed_params_of_non_tensors_found_by_fuzzing(state_dict_case):
    """(1, 2) as a linear's packed (weight, bias): AttributeError before."""
    from qjax.converters.state_dict import load_state_dict
    from test_converters_state_dict import CONVERTED_TABLE

    sd = dict(state_dict_case[0])
    sd["fc._packed_params._packed_params"] = (1, 2)
    with pytest.raises(TypeError, match=r"'fc._packed_params._packed_params': weight is a int"):
        load_state_dict(sd, None, CONVERTED_TABLE)
