"""Reading a PyTorch state_dict safely, and normalising a converted model's entries.

``torch.load(path, weights_only=True)`` always; a pickled whole module (or anything
else that needs code from the file to unpickle) loads only with ``trusted=True``.
Every failure (missing, corrupt, truncated or foreign file) is a ``ValueError`` that
names the file and the cause. Quantization parameters are checked as every qjax loader
checks them (:func:`qjax._spec.check_qparam_values`: scales finite and > 0 in float32,
zero points integers in the spec's range), and an int8 layer's bias must be finite; a
bad value is a ``ValueError`` naming the entry and the value (torch itself builds
quantized tensors with NaN, zero or negative scales).

A converted eager model's state_dict (NUMERICS.md rule 20) is normalised to flat
entries (``P`` a module prefix):

=======================================  ================================================
PyTorch key(s)                           normalised entry
=======================================  ================================================
``P._packed_params._packed_params``      ``P.weight``: :class:`qjax.QArray` (int8 codes,
(``(qint8 weight, f32 bias)``)           per-tensor or per-channel f32 scales, int32 zero
                                         points, torch layout); ``P.bias``: float32 array
``P._packed_params.dtype``               dropped (the packed dtype, ``torch.qint8``)
``P.weight`` (a quantized tensor)        ``P.weight``: :class:`qjax.QArray`
``P.scale`` + ``P.zero_point`` (1 value)  ``P.qparams``: :class:`qjax.QParams` (quint8/
                                         qint8 per-tensor: the module's output, or a
                                         ``QuantStub``'s quantized input)
any other tensor                         a NumPy array (a copy)
=======================================  ================================================
"""

from __future__ import annotations

import os
import pickle
import re
from collections.abc import Mapping

import numpy as np

from qjax import QArray, QParams, QuantSpec
from qjax._spec import check_qparam_values

__all__ = ["normalize_state_dict", "read_state_dict"]


def _torch():
    try:
        import torch
    except ImportError as e:  # pragma: no cover - torch is in the test environment
        raise ImportError("reading PyTorch files needs torch: pip install 'qjax[torch]'") from e
    return torch


def read_state_dict(source, *, trusted: bool = False) -> dict:
    """A ``{str: value}`` state_dict from a path, a binary file object, a mapping or (an
    already loaded) ``torch.nn.Module``.

    Files load with ``torch.load(..., map_location="cpu", weights_only=True)``; with
    ``trusted=True`` a file that holds a pickled module is unpickled
    (``weights_only=False``: it runs code from the file) and its ``state_dict()`` used.

    >>> import torch, io
    >>> buf = io.BytesIO(); torch.save({"w": torch.ones(2)}, buf); _ = buf.seek(0)
    >>> read_state_dict(buf)
    {'w': tensor([1., 1.])}
    >>> read_state_dict(io.BytesIO(b"not a torch file"))  # doctest: +ELLIPSIS
    Traceback (most recent call last):
      ...
    ValueError: <file object>: not a readable PyTorch file (UnpicklingError: Unsupported ...)
    """
    torch = _torch()
    name = "<file object>"
    if isinstance(source, torch.nn.Module):
        return dict(source.state_dict())
    if isinstance(source, Mapping):
        obj = source
    else:
        if isinstance(source, (str, os.PathLike)):
            name = os.fspath(source)
            if not os.path.isfile(name):
                raise ValueError(f"{name!r}: no such file")
        elif not hasattr(source, "read"):
            raise TypeError(
                "state_dict source must be a path, a binary file object, a mapping or a "
                f"torch.nn.Module, got {type(source).__name__}"
            )
        obj = _load(torch, source, name, trusted)
    if isinstance(obj, torch.nn.Module):
        obj = obj.state_dict()
    if not isinstance(obj, Mapping):
        raise TypeError(f"{name}: holds a {type(obj).__name__}, not a state_dict (a mapping)")
    out = {}
    for k, v in obj.items():
        if not isinstance(k, str):
            raise TypeError(f"{name}: state_dict key {k!r} is a {type(k).__name__}, not a str")
        if isinstance(v, Mapping):
            raise TypeError(
                f"{name}: entry {k!r} is a nested mapping (a checkpoint?); pass its "
                f"state_dict, e.g. checkpoint[{k!r}]"
            )
        out[k] = v
    return out


_DOTTED = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)+")


def _load(torch, source, name, trusted):
    pos = source.tell() if hasattr(source, "tell") else None
    try:
        return torch.load(source, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for bad bytes; all mean "unreadable"
        # "Unsupported global": a well-formed pickle of Python objects (a whole module);
        # anything else (bad opcodes, bad zip, truncation) is an unreadable file.
        found = re.search(r"GLOBAL (\S+) was not an allowed global", str(e))
        refused = isinstance(e, pickle.UnpicklingError) and found and _DOTTED.fullmatch(found[1])
        if not refused:
            raise ValueError(
                f"{name}: not a readable PyTorch file ({type(e).__name__}: {_first_line(e)})"
            ) from None
        if not trusted:
            raise ValueError(
                f"{name}: holds Python objects ({found[1]}) that torch.load(weights_only=True) "
                "refuses (a pickled whole module?); loading it runs code from the file. Save "
                "model.state_dict() instead, or pass trusted=True if you trust the file"
            ) from None
    if pos is not None:
        source.seek(pos)
    try:
        return torch.load(source, map_location="cpu", weights_only=False)
    except Exception as e:
        raise ValueError(
            f"{name}: trusted load failed ({type(e).__name__}: {_first_line(e)})"
        ) from None


def _first_line(e: BaseException) -> str:
    text = str(e)
    if "WeightsUnpickler error:" in text:  # skip torch's advice about weights_only
        text = text.split("WeightsUnpickler error:", 1)[1]
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return lines[0][:200] if lines else ""


def _array(t, key: str) -> np.ndarray:
    torch = _torch()
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"state_dict entry {key!r} is a {type(t).__name__}, not a tensor")
    # A copy: JAX may alias NumPy memory, and a live torch model updates buffers in place.
    return t.detach().cpu().numpy().copy()


def _qarray(t, key: str) -> QArray:
    from ._torch_values import weight_qarray  # the torch importer's weight conversion

    if not isinstance(t, _torch().Tensor):
        raise TypeError(f"state_dict entry {key!r}: weight is a {type(t).__name__}, not a tensor")
    try:  # weight_qarray refuses bad qparams (NaN, <= 0 scales; zero points out of range)
        return weight_qarray(t, f"state_dict entry {key!r}")
    except NotImplementedError as e:
        raise ValueError(f"unsupported quantized tensor: {e}") from None


def _bias(b, key: str) -> np.ndarray:
    """An int8 layer's float bias: finite."""
    a = _array(b, key)
    if not np.isfinite(a).all():
        bad = a[~np.isfinite(a)].reshape(-1)[0]
        raise ValueError(f"state_dict entry {key!r}: bias must be finite, got {bad}")
    return a


def _qparams(scale, zero_point, key: str) -> QParams:
    # Converted eager models keep quint8 activations, clamped to 0..255 (rule 18).
    spec = QuantSpec(signed=False)
    with np.errstate(over="ignore"):  # a float64 scale beyond float32 becomes inf: refused
        s = np.asarray(float(scale), np.float32)
    # checked before QParams casts the zero point to int32 (which would wrap a large one)
    raw = QParams.tree_unflatten(spec, (s, np.asarray(int(zero_point))))
    check_qparam_values(raw, f"state_dict entry {key!r}: activation")
    return QParams(s, np.int32(int(zero_point)), spec)


def _is_quantized(v) -> bool:
    return isinstance(v, _torch().Tensor) and v.is_quantized


def _is_qparams_pair(sd, prefix) -> bool:
    torch = _torch()
    s, z = sd.get(f"{prefix}scale"), sd.get(f"{prefix}zero_point")
    return (
        isinstance(s, torch.Tensor)
        and isinstance(z, torch.Tensor)
        and s.numel() == 1
        and z.numel() == 1
        and s.dim() <= 1
        and z.dim() <= 1
        and s.is_floating_point()
        and not z.is_floating_point()
    )


def normalize_state_dict(sd: Mapping) -> dict:
    """Flat ``{key: NumPy array | QArray | QParams}`` from a state_dict, expanding a
    converted model's packed and quantized entries (table in the module docstring).

    >>> import torch
    >>> lin = torch.ao.nn.quantized.Linear(3, 2)
    >>> out = normalize_state_dict(lin.state_dict())
    >>> sorted(out), type(out["weight"]).__name__, out["weight"].values.dtype
    (['bias', 'qparams', 'weight'], 'QArray', dtype('int8'))
    """
    torch = _torch()
    out: dict = {}
    for key, v in sd.items():
        prefix = key[: key.rfind(".") + 1]
        if key.endswith("_packed_params._packed_params"):
            base = key[: -len("_packed_params._packed_params")]
            if not (isinstance(v, tuple) and len(v) == 2):
                raise TypeError(f"state_dict entry {key!r}: expected (weight, bias), got {v!r:.60}")
            w, b = v
            out[f"{base}weight"] = _qarray(w, key)
            if b is not None:
                out[f"{base}bias"] = _bias(b, key)
        elif key.endswith("_packed_params.dtype"):
            continue
        elif key.endswith(("scale", "zero_point")) and key in (
            f"{prefix}scale",
            f"{prefix}zero_point",
        ):
            if _is_qparams_pair(sd, prefix):
                if key.endswith("scale"):
                    out[f"{prefix}qparams"] = _qparams(
                        sd[f"{prefix}scale"], sd[f"{prefix}zero_point"], key
                    )
            else:
                out[key] = _array(v, key)
        elif isinstance(v, torch.Tensor) and v.is_quantized:
            out[key] = _qarray(v, key)
        elif key == f"{prefix}bias" and _is_quantized(sd.get(f"{prefix}weight")):
            out[key] = _bias(v, key)  # a quantized conv's bias
        else:
            out[key] = _array(v, key)
    return out
