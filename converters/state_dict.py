"""Load a PyTorch state_dict onto a qjax / Flax model by a declarative name table.

No model object is needed on the PyTorch side: the file is read with
``torch.load(path, weights_only=True)`` (a pickled whole module only with
``trusted=True``), a converted eager model's packed and quantized entries become
:class:`qjax.QArray` / :class:`qjax.QParams` (:mod:`._torch_io`), and a table of rules
renames and re-lays-out every entry onto the target's paths:

>>> TABLE = [
...     (r"(fc\\d)\\.weight", r"\\1/kernel", "linear"),   # [out, in] -> [in, out]
...     (r"(fc\\d)\\.bias", r"\\1/bias"),
...     (r".*\\.num_batches_tracked", None),              # dropped on purpose
... ]

A rule is ``(pattern, replacement[, layout])``: the first rule whose ``pattern``
``re.fullmatch``-es a torch key gives the target path ``match.expand(replacement)``
(``/``-separated, as ``nnx.state`` / Linen variables nest) and the layout flip
(:mod:`._layouts`: ``none``, ``linear``, ``conv1d``, ``conv2d``, ``conv3d``, or
``auto``: ``linear`` for 2-D, ``convNd`` for 3-5-D, ``none`` otherwise); a ``None``
replacement drops the key. A :class:`QArray` keeps its channel: per-channel
``axis 0`` moves with the flip (to ``-1`` for linear and conv).

The target is an NNX module (its ``nnx.Param`` and ``nnx.BatchStat`` state, updated in
place), an ``nnx.State`` (e.g. ``nnx.state(model, nnx.Param)``; its values are replaced
in place, as ``nnx.replace_by_pure_dict`` does), a nested mapping (Linen variables,
``nnx.to_pure_dict(...)``, or an abstract tree from ``jax.eval_shape`` whose leaves are
``jax.ShapeDtypeStruct``), or ``None`` (build a nested dict from the table's paths).
Every leaf is checked against the target: shape after the flip, dtype (``cast=True``
converts between float dtypes), kind (QArray vs float). Torch keys no rule maps or
whose path the target lacks, and target paths no key fills, are reported by name on
both sides: one ``ValueError`` with ``strict=True``, or in the returned :class:`Loaded`
with ``strict=False``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import jax
import numpy as np

from qjax import QArray, QParams

from ._layouts import conv_layout, get_layout, to_flax
from ._torch_io import normalize_state_dict, read_state_dict

__all__ = ["Loaded", "Rule", "load_state_dict"]


class Rule(NamedTuple):
    """One table entry: torch key regex -> target path template, layout name."""

    pattern: str
    replacement: str | None
    layout: str = "none"


class Loaded(NamedTuple):
    """Result of :func:`load_state_dict`.

    ``tree``: the filled target (the NNX module or ``nnx.State`` itself for those); ``loaded``:
    ``{target path: torch key (layout)}``; ``missing``: target paths no torch key filled;
    ``extra``: torch keys not loaded, with the reason.
    """

    tree: Any
    loaded: dict[str, str]
    missing: list[str]
    extra: dict[str, str]


def _rules(table) -> list[Rule]:
    out = []
    for i, r in enumerate(table):
        if isinstance(r, Rule):
            rule = r
        elif isinstance(r, Sequence) and not isinstance(r, str) and len(r) in (2, 3):
            rule = Rule(*r)
        else:
            raise TypeError(f"table[{i}] must be (pattern, replacement[, layout]), got {r!r}")
        try:
            rx = re.compile(rule.pattern)
        except re.error as e:
            raise ValueError(f"table[{i}]: bad pattern {rule.pattern!r} ({e})") from None
        if rule.layout != "auto":
            get_layout(rule.layout)
        out.append((rx, rule))
    return out


def _key_str(k) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(k, attr):
            return str(getattr(k, attr))
    return str(k)


def _is_leaf(x) -> bool:
    return isinstance(x, (QArray, QParams))


def _flatten(tree):
    flat, treedef = jax.tree_util.tree_flatten_with_path(tree, is_leaf=_is_leaf)
    paths = ["/".join(_key_str(k) for k in p) for p, _ in flat]
    return paths, [v for _, v in flat], treedef


def _flip(value, layout, key: str):
    """``value`` (array or QArray) in the Flax layout; returns ``(value, layout name)``."""
    if isinstance(value, QParams):  # per-tensor activation qparams: nothing to flip
        if layout not in ("none", "auto"):
            raise ValueError(f"torch {key!r}: qparams take no layout flip, got {layout!r}")
        return value, get_layout("none")
    arr = value.values if isinstance(value, QArray) else value
    if layout == "auto":
        nd = np.ndim(arr)
        if nd == 2:
            lay = get_layout("linear")
        else:
            lay = conv_layout(nd, key) if nd in (3, 4, 5) else get_layout("none")
    else:
        lay = get_layout(layout)
    if not isinstance(value, QArray):
        return to_flax(value, lay, f"torch {key!r}"), lay
    if lay.perm is None:
        return value, lay
    vals = to_flax(np.asarray(value.values), lay, f"torch {key!r}")
    spec = value.spec
    if spec.axis is not None:
        (ax,) = spec.axes
        spec = spec.replace(axis=lay.perm.index(ax % len(lay.perm)) - len(lay.perm))
    qp = QParams(value.qparams.scale, value.qparams.zero_point, spec)
    return QArray(vals, qp), lay


def _describe(v) -> str:
    if isinstance(v, QArray):
        return f"QArray {v.values.dtype}{list(v.values.shape)}"
    if isinstance(v, QParams):
        return f"QParams {v.spec.dtype} per-{v.spec.granularity}"
    return f"{np.dtype(v.dtype)}{list(np.shape(v))}"


def _check(value, want, key: str, path: str, lay, cast: bool):
    """``value`` fitted to the target leaf ``want``, or a message why not."""
    flip = "" if lay.perm is None else f" after {lay.name} flip"
    if isinstance(want, QArray) != isinstance(value, QArray) or (
        isinstance(want, QParams) != isinstance(value, QParams)
    ):
        return None, f"torch {key!r} is {_describe(value)}, target {path!r} is {_describe(want)}"
    if isinstance(value, QParams):
        if np.shape(value.scale) != np.shape(want.scale):
            return None, f"torch {key!r} qparams shape {np.shape(value.scale)} vs {path!r}"
        return value, None
    got = value.values if isinstance(value, QArray) else value
    ref = want.values if isinstance(want, QArray) else want
    if tuple(np.shape(got)) != tuple(np.shape(ref)):
        return None, (
            f"torch {key!r} has shape {list(np.shape(got))}{flip}, target {path!r} has "
            f"{list(np.shape(ref))}"
        )
    gd, rd = np.dtype(got.dtype), np.dtype(ref.dtype)
    if gd != rd:
        both_float = np.issubdtype(gd, np.floating) and np.issubdtype(rd, np.floating)
        if not (cast and both_float and not isinstance(value, QArray)):
            hint = " (pass cast=True to convert floats)" if both_float else ""
            return None, f"torch {key!r} has dtype {gd}, target {path!r} has {rd}{hint}"
        value = np.asarray(value).astype(rd)
    return value, None


def load_state_dict(
    source,
    target=None,
    table=(),
    *,
    strict: bool = True,
    trusted: bool = False,
    cast: bool = False,
) -> Loaded:
    """Load ``source`` (a path, file object, mapping or torch module) onto ``target``
    through ``table`` (see the module docstring for both).

    Values: float tensors become NumPy arrays of their own dtype (checked against the
    target's; ``cast=True`` converts floats), quantized weights :class:`qjax.QArray`
    (int8 codes, float32 scales, int32 zero points), ``scale``/``zero_point`` pairs
    :class:`qjax.QParams`. Raises ``ValueError`` naming the torch key and the target path
    for every shape, dtype or kind mismatch, and (``strict=True``) for unmapped keys on
    either side; ``TypeError`` for a malformed table or source.

    >>> import torch, jax.numpy as jnp
    >>> sd = {"fc.weight": torch.ones(2, 3), "fc.bias": torch.zeros(2)}
    >>> target = {"fc": {"kernel": jnp.zeros((3, 2)), "bias": jnp.zeros(2)}}
    >>> out = load_state_dict(sd, target, [(r"fc\\.weight", "fc/kernel", "linear"),
    ...                                    (r"fc\\.bias", "fc/bias")])
    >>> out.tree["fc"]["kernel"].shape, out.loaded["fc/kernel"]
    ((3, 2), 'fc.weight (linear: [out, in] -> [in, out])')
    >>> load_state_dict(sd, target, [(r"fc\\.weight", "fc/kernel", "linear")])
    Traceback (most recent call last):
      ...
    ValueError: load_state_dict: torch keys not loaded: fc.bias (no table rule); target ...
    """
    rules = _rules(table)
    flat = normalize_state_dict(read_state_dict(source, trusted=trusted))

    module = state = None
    from flax import nnx

    if isinstance(target, nnx.State):
        state, target = target, nnx.to_pure_dict(target)
    elif target is not None and not isinstance(target, Mapping):
        if not isinstance(target, nnx.Module):
            raise TypeError(
                "target must be an nnx.Module, a nested mapping (Linen variables, "
                f"jax.eval_shape output) or None, got {type(target).__name__}"
            )
        module = target
        state = nnx.state(module, nnx.Any(nnx.Param, nnx.BatchStat))
        target = nnx.to_pure_dict(state)
    if target is not None:
        paths, leaves, treedef = _flatten(target)
        want = dict(zip(paths, leaves, strict=True))
    else:
        want = None

    filled: dict[str, Any] = {}
    loaded: dict[str, str] = {}
    extra: dict[str, str] = {}
    problems: list[str] = []
    for key, value in flat.items():
        hit = next(((rx, r) for rx, r in rules if rx.fullmatch(key)), None)
        if hit is None:
            extra[key] = "no table rule"
            continue
        rx, rule = hit
        if rule.replacement is None:
            continue
        path = rx.fullmatch(key).expand(rule.replacement)
        try:
            value, lay = _flip(value, rule.layout, key)
        except ValueError as e:
            problems.append(str(e))
            continue
        if path in filled:
            problems.append(
                f"torch {key!r} and {loaded[path].split(' ')[0]!r} both map to {path!r}"
            )
            continue
        if want is not None:
            if path not in want:
                extra[key] = f"target has no {path!r}"
                continue
            value, why = _check(value, want[path], key, path, lay, cast)
            if why:
                problems.append(why)
                continue
        filled[path] = value
        loaded[path] = key + ("" if lay.perm is None else f" ({lay.name}: {lay.rule})")
    if problems:
        raise ValueError("load_state_dict: " + "; ".join(problems))
    missing = [] if want is None else [p for p in want if p not in filled]
    if strict and (missing or extra):
        parts = []
        if extra:
            parts.append(
                "torch keys not loaded: " + ", ".join(f"{k} ({why})" for k, why in extra.items())
            )
        if missing:
            parts.append("target paths not filled: " + ", ".join(missing))
        raise ValueError("load_state_dict: " + "; ".join(parts))

    if want is None:
        tree: dict = {}
        for path, v in filled.items():
            node = tree
            *head, last = path.split("/")
            for part in head:
                node = node.setdefault(part, {})
                if not isinstance(node, dict):
                    raise ValueError(f"load_state_dict: path {path!r} nests under a leaf")
            node[last] = v
        return Loaded(tree, loaded, missing, extra)
    new_leaves = [filled.get(p, leaf) for p, leaf in zip(paths, leaves, strict=True)]
    tree = jax.tree_util.tree_unflatten(treedef, new_leaves)
    if state is not None:
        nnx.replace_by_pure_dict(state, tree)
        tree = state
    if module is not None:
        nnx.update(module, state)
        tree = module
    return Loaded(tree, loaded, missing, extra)
