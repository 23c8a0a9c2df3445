"""The served-model file: :func:`save_served` and :func:`load_served` (safetensors + JSON).

:func:`save_served` writes a :class:`~qjax.flax._serve.ServedModel` to one
``.safetensors`` file: the integer and float arrays as tensors, the structure as JSON in
the file's metadata; nothing is pickled, and the write is atomic (:func:`_write_atomic`).
:func:`load_served` trusts nothing in the file: every step, field, dtype and shape is
checked (qparams with :func:`qjax._spec.check_qparam_values`, the one check QArray uses:
scales finite and > 0, zero points int32 inside the spec's range; biases finite and one
per output; strides and windows >= 1; pool padding at most half the window, conv padding
at most the larger of kernel size - 1 and the layer's input size; shapes walked from
``input_shape``), and a file is either loaded as the program it describes or refused with
a ``ValueError`` naming the step, the key and the bad value.

The file holds codes and qparams, no kernel: ``load_served(path, kernel=...)`` prepares
the weights on load (:mod:`qjax.kernels._choice`).
"""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np

from .. import kernels
from .._qarray import QArray
from ..kernels._choice import resolve_kernel
from ..program import Program
from ._fields import _COMPATS, _encode, _field, _ints, _is_int, _load_param
from ._serve import ServedModel, _freeze

__all__ = ["load_served", "save_served"]

_FORMAT = "qjax.served"
_VERSION = 1


# --------------------------------------------------------------------------------------
# save: arrays to tensors, the rest to JSON


# --------------------------------------------------------------------------------------
# validation of a file on load: every field a program reads is checked, and a file is
# either loaded into the program it describes or refused with a ValueError naming the
# step, the key and the bad value (a file may come from anywhere)

_OPS = ("quantize", "linear", "conv", "relu", "max_pool", "avg_pool", "flatten", "dequantize")
_POOL_SCHEMES = ("fbgemm", "x86", "onednn", "qnnpack")  # kernels.avg_pool2d's
# op -> {parameter: (kind, required)}
_PARAMS = {
    "quantize": {"qp": ("qparams", True)},
    "linear": {
        "w": ("linear", True),
        "out_qp": ("qparams", True),
        "in_qp": ("qparams", False),
        "b": ("array", False),
    },
    "conv": {
        "w": ("conv", True),
        "out_qp": ("qparams", True),
        "in_qp": ("qparams", False),
        "b": ("array", False),
    },
}


def _check_step_fields(st: dict, at: str) -> None:
    op = st["op"]
    if op in ("quantize", "linear", "conv") and _field(st, "compat", at) not in _COMPATS:
        raise ValueError(f"{at}: unknown compat {st['compat']!r}; known: {_COMPATS}")
    if op in ("linear", "conv"):
        if _field(st, "scheme", at) not in kernels.SCHEMES:
            raise ValueError(
                f"{at}: unknown scheme {st['scheme']!r}; known: {sorted(kernels.SCHEMES)}"
            )
        if not isinstance(_field(st, "relu", at), bool):
            raise ValueError(f"{at}: relu {st['relu']!r} must be true or false")
    if op == "avg_pool" and _field(st, "scheme", at) not in _POOL_SCHEMES:
        raise ValueError(f"{at}: unknown avg_pool scheme {st['scheme']!r}; known: {_POOL_SCHEMES}")


def _conv_shape(st: dict, w: QArray, groups: int, shape: tuple, at: str) -> tuple:
    """The step's output shape (no batch); every geometry field checked."""
    geo = _field(st, "geometry", at)
    if not isinstance(geo, dict):
        raise ValueError(f"{at}: geometry {geo!r} must be a JSON object")
    ksz, cin, cout = w.shape[:-2], w.shape[-2], w.shape[-1]
    nsp = len(ksz)
    want = {1: "NWC", 2: "NHWC"}.get(nsp)
    if geo.get("layout") != want:
        raise ValueError(
            f"{at}: layout {geo.get('layout')!r} does not serve a {nsp}-D kernel (needs {want!r})"
        )
    if len(shape) != nsp + 1:
        raise ValueError(f"{at}: a {nsp}-D conv on an input of shape {shape}")
    stride = _ints(geo.get("stride"), nsp, "stride", at)
    pad = geo.get("padding")
    if isinstance(pad, str):
        if pad not in ("SAME", "VALID"):
            raise ValueError(f"{at}: padding {pad!r} must be 'SAME', 'VALID' or [[lo, hi], ...]")
    elif not (
        isinstance(pad, list)
        and len(pad) == nsp
        and all(isinstance(p, list) and len(p) == 2 and all(map(_is_int, p)) for p in pad)
    ):
        raise ValueError(f"{at}: padding {pad!r} must be 'SAME', 'VALID' or [[lo, hi], ...]")
    if shape[-1] != cin * groups:
        raise ValueError(
            f"{at}: w takes {cin * groups} input channels, the step's input has {shape[-1]}"
        )
    out = []
    for i, (n, k, s) in enumerate(zip(shape[:-1], ksz, stride, strict=True)):
        if pad == "SAME":
            o = -(-n // s)
        elif pad == "VALID":
            o = (n - k) // s + 1 if n >= k else 0
        else:
            lo, hi = pad[i]
            bound = max(k - 1, n)
            for v in (lo, hi):
                if v < 0:
                    raise ValueError(f"{at}: padding {v} (in {pad!r}) is negative")
                if v > bound:
                    raise ValueError(
                        f"{at}: padding {v} (in {pad!r}) exceeds the bound {bound} (the larger "
                        f"of the kernel size - 1 and the input size {n} along axis {i})"
                    )
            o = (n + lo + hi - k) // s + 1 if n + lo + hi >= k else 0
        if o < 1:
            raise ValueError(f"{at}: kernel {list(ksz)} does not fit the input {list(shape[:-1])}")
        out.append(o)
    return (*out, cout)


def _pool_shape(st: dict, shape: tuple, at: str) -> tuple:
    if len(shape) != 3:
        raise ValueError(f"{at}: 2-D pooling (NHWC) on an input of shape {shape}")
    window = _ints(_field(st, "window", at), 2, "window", at, scalar_ok=True)
    strides = _ints(_field(st, "strides", at), 2, "strides", at, scalar_ok=True)
    pad = _ints(_field(st, "padding", at), 2, "padding", at, lo=0, scalar_ok=True)
    out = []
    for n, k, s, p in zip(shape[:2], window, strides, pad, strict=True):
        if 2 * p > k:
            raise ValueError(f"{at}: padding {p} exceeds half the window ({k})")
        if k > n + 2 * p:
            raise ValueError(f"{at}: window {k} is larger than the input ({n}) plus padding")
        out.append((n + 2 * p - k) // s + 1)
    return (*out, shape[2])


def _check_program(steps: list, params: list, input_shape: tuple, where: str) -> None:
    """Walk the shapes (no batch) through the steps: sizes, paddings, bias lengths."""
    shape = input_shape
    for i, (st, p) in enumerate(zip(steps, params, strict=True)):
        op, at = st["op"], f"{where}: step {i} ({st['name']!r}, {st['op']})"
        if op in ("linear", "conv"):
            w = p["w"].weight
            if op == "linear":
                if w.ndim != 2 or not shape or shape[-1] != w.shape[0]:
                    raise ValueError(
                        f"{at}: w takes {w.shape[0]} input features, the step's input has "
                        f"{shape[-1] if shape else 'none'} (shape {shape})"
                    )
                shape = (*shape[:-1], w.shape[1])
            else:
                shape = _conv_shape(st, w, p["w"].groups, shape, at)
            b = p.get("b")
            if b is not None and tuple(b.shape) != (w.shape[-1],):
                raise ValueError(
                    f"{at} b: bias has shape {tuple(b.shape)}, the layer has {w.shape[-1]} "
                    f"outputs: needs ({w.shape[-1]},)"
                )
        elif op in ("max_pool", "avg_pool"):
            shape = _pool_shape(st, shape, at)
        elif op == "flatten":
            shape = (int(np.prod(shape)),)


def _load_program(meta, tensors: dict, wish: str, where: str) -> ServedModel:
    """The :class:`ServedModel` a file's metadata and tensors describe, validated."""
    for key in ("steps", "params", "input_shape"):
        if key not in meta:
            raise ValueError(f"{where}: metadata is missing {key!r}")
    steps, pmeta, input_shape = meta["steps"], meta["params"], meta["input_shape"]
    if not (isinstance(steps, list) and isinstance(pmeta, list)):
        raise ValueError(f"{where}: 'steps' and 'params' must be JSON lists")
    if len(steps) != len(pmeta):
        raise ValueError(f"{where}: {len(steps)} steps but {len(pmeta)} parameter entries")
    if not (
        isinstance(input_shape, list)
        and 1 <= len(input_shape) <= 8
        and all(_is_int(n) and n >= 1 for n in input_shape)
    ):
        raise ValueError(
            f"{where}: input_shape {input_shape!r} must be a list of positive integers"
        )
    params = []
    for i, (st, pd) in enumerate(zip(steps, pmeta, strict=True)):
        if not isinstance(st, dict):
            raise ValueError(f"{where}: step {i} is a {type(st).__name__}, not a JSON object")
        name, op = st.get("name"), st.get("op")
        if not isinstance(name, str):
            raise ValueError(f"{where}: step {i} has no 'name' (a str), got {name!r}")
        at = f"{where}: step {i} ({name!r}, {op})"
        if op not in _OPS:
            raise ValueError(f"{at}: unknown op {op!r}; known: {_OPS}")
        _check_step_fields(st, at)
        if not isinstance(pd, dict):
            raise ValueError(f"{at}: parameters are a {type(pd).__name__}, not a JSON object")
        want = _PARAMS.get(op, {})
        for k in pd:
            if k not in want:
                raise ValueError(
                    f"{at}: unexpected parameter {k!r} (a {op} step takes {sorted(want)})"
                )
        p = {}
        for k, (kind, required) in want.items():
            if k not in pd:  # every writer writes every key (null: the step has none)
                raise ValueError(f"{at}: missing parameter {k!r}")
            if pd[k] is None:
                if required:
                    raise ValueError(f"{at}: parameter {k!r} is null; the step needs it")
                p[k] = None
                continue
            p[k] = _load_param(f"{i}.{k}", pd[k], kind, tensors, wish, f"{at} {k}")
        params.append(p)
    input_shape = tuple(input_shape)
    _check_program(steps, params, input_shape, where)
    served = ServedModel(_freeze(steps), tuple(params), input_shape)
    try:  # the last word: the program traces on its input shape (nothing is computed)
        jax.eval_shape(served.forward, jax.ShapeDtypeStruct((1, *input_shape), jnp.float32))
    except Exception as e:
        raise ValueError(
            f"{where}: the program does not run on input (1, {', '.join(map(str, input_shape))}) "
            f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
        ) from None
    return served


def save_served(path: str | os.PathLike, served: ServedModel) -> None:
    """Write ``served`` to one ``.safetensors`` file (arrays as tensors, structure as
    JSON metadata; no pickle). :func:`load_served` reads it back bit for bit.

    >>> import tempfile, os
    >>> from qjax import QParams, QuantSpec
    >>> qp = QParams(jnp.float32(0.5), jnp.int32(0), QuantSpec())
    >>> st = [{"op": "quantize", "name": "stub", "compat": "qjax"}]
    >>> m = ServedModel(json.dumps(st), ({"qp": qp},), (3,))
    >>> p = os.path.join(tempfile.mkdtemp(), "m.safetensors")
    >>> save_served(p, m); load_served(p)(jnp.array([[0.3, 1.0, -9.0]]))
    Array([[ 0.5,  1. , -9. ]], dtype=float32)

    The write is atomic: the bytes go to a hidden temporary file in the target's folder,
    which is renamed over the target once complete, so a reader never sees half a file.
    The file gets the mode of any new file (``0o666`` less the umask), a symlink is
    followed (its target is written, the link stays), and an exception or
    ``KeyboardInterrupt`` during the write removes the temporary file; a process killed
    outright (``kill -9``, power loss) can leave a ``.<name>.*.tmp`` file behind. An
    ``OSError`` (e.g. ``PermissionError``) names ``path``.
    """
    from safetensors.numpy import save

    from ._convert import TracedProgram

    if isinstance(served, (TracedProgram, Program)):  # converted, or imported from torch
        from ._program_io import program_file

        meta, tensors = program_file(served)
        _write_atomic(os.fspath(path), save(tensors, metadata={"qjax": json.dumps(meta)}))
        return
    if not isinstance(served, ServedModel):
        raise TypeError(
            f"save_served: expected a program from qjax.convert, got {type(served).__name__}"
            + (
                " (an imported torch / pt2e program cannot be saved: save the torch model)"
                if isinstance(served, Program)
                else ""
            )
        )
    tensors: dict[str, np.ndarray] = {}
    params = []
    for i, p in enumerate(served.params):
        params.append({k: _encode(f"{i}.{k}", v, tensors) for k, v in p.items()})
    meta = {
        "format": _FORMAT,
        "version": _VERSION,
        "steps": json.loads(served.structure),
        "params": params,
        "input_shape": list(served.input_shape),
    }
    _write_atomic(os.fspath(path), save(tensors, metadata={"qjax": json.dumps(meta)}))


def _write_atomic(path: str, data: bytes) -> None:
    """``data`` to ``path`` through a temporary file in the same folder and a rename
    (see :func:`save_served`)."""
    import tempfile

    target = os.path.realpath(path)  # a symlink: write its target, keep the link
    folder, name = os.path.split(target)
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=folder)
        with os.fdopen(fd, "wb") as f:
            umask = os.umask(0)
            os.umask(umask)
            os.fchmod(f.fileno(), 0o666 & ~umask)  # mkstemp makes 0600; follow the umask
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
        tmp = None
    except OSError as e:
        raise type(e)(e.errno, f"save_served: cannot write {path!r} ({e.strerror or e})") from e
    finally:
        if tmp is not None:
            try:
                os.unlink(tmp)
            except OSError:
                pass


def load_served(path: str | os.PathLike, *, kernel: str = "xla") -> ServedModel:
    """Read a :func:`save_served` file (``ValueError`` if it is not one).

    The file holds codes and qparams, no kernel: ``kernel`` (``"xla"``, ``"amx"`` or
    ``"auto"``, :mod:`qjax.kernels._choice`) prepares the weights on load, the same codes
    either way (``RuntimeError`` naming the reason for ``"amx"`` on a machine without it).

    >>> load_served(__file__)  # doctest: +ELLIPSIS
    Traceback (most recent call last):
      ...
    ValueError: load_served: ... is not a qjax served-model safetensors file ...
    """
    from safetensors import safe_open

    wish = resolve_kernel(kernel, "qjax.load_served")
    path = os.fspath(path)
    where = f"load_served: {path!r}"
    try:  # safetensors reports an unreadable file as 'No such file or directory'
        with open(path, "rb"):
            pass
    except OSError as e:
        why = "permission denied" if isinstance(e, PermissionError) else (e.strerror or e)
        raise ValueError(f"load_served: cannot read {path!r} ({why})") from None
    try:
        with safe_open(path, framework="np") as f:
            text = (f.metadata() or {}).get("qjax")
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    except Exception as e:  # safetensors raises its own error types
        raise ValueError(
            f"load_served: {path!r} is not a qjax served-model safetensors file ({e})"
        ) from None
    if text is None:
        raise ValueError(
            f"load_served: {path!r} is not a qjax served-model safetensors file (no 'qjax' "
            "metadata)"
        )
    try:
        meta = json.loads(text)
    except ValueError as e:
        raise ValueError(f"{where}: metadata is not JSON ({e})") from None
    if not isinstance(meta, dict):
        raise ValueError(f"{where}: metadata is a {type(meta).__name__}, not a JSON object")
    from ._program_io import FORMAT, VERSION, load_program

    if meta.get("format") == FORMAT and meta.get("version") == VERSION:
        return load_program(meta, tensors, wish, where)
    if meta.get("format") != _FORMAT or meta.get("version") != _VERSION:
        raise ValueError(
            f"load_served: {path!r} holds format {meta.get('format')!r} version "
            f"{meta.get('version')!r}; this qjax reads {_FORMAT!r} version {_VERSION} and "
            f"{FORMAT!r} version {VERSION}"
        )
    return _load_program(meta, tensors, wish, where)
