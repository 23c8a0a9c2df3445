"""The served int8 program: a pytree of prepared integer weights and a jitted forward.

A :class:`ServedModel` (built by :func:`qjax.convert`) is a list of steps, each a static
description (JSON: op, module path, scheme, geometry) and a pytree of parameters
(:class:`~qjax.kernels.PreparedLinear` / :class:`~qjax.kernels.PreparedConv` weights
with int8 codes, float32 bias, :class:`~qjax.QParams`). The forward runs on integer
codes between a quantize at the input and a dequantize at the output:

==============  ==========================================================================
step            on the codes ``h``
==============  ==========================================================================
``quantize``    ``h = fake_quant_codes(x, qp)`` (float input) or of ``dequantize(h)``
                (codes in other qparams: a re-quantization, elementwise)
``linear``      (re-quantize to the layer's input qparams if it has its own), then
                :func:`qjax.kernels.quantized_linear` with the scheme, ReLU fused
``conv``        likewise with :func:`qjax.kernels.quantized_conv` (NHWC)
``relu``        :func:`qjax.kernels.relu` (a ReLU that could not be fused)
``max_pool``    :func:`qjax.kernels.max_pool2d`; ``avg_pool``:
                :func:`qjax.kernels.avg_pool2d`; ``flatten``: :func:`qjax.kernels.flatten`
``dequantize``  ``f32(h - zp)·s``
==============  ==========================================================================

Every ``dot_general``/convolution in the program is int8 x int8 -> int32. Saving
(:func:`save_served`) writes one ``.safetensors`` file: the integer and float arrays as
tensors, the structure as JSON in the file's metadata; nothing is pickled.

Kernel: ``qjax.convert(..., kernel=...)`` and ``load_served(path, kernel=...)`` prepare
the weights for XLA's dot/conv (``"xla"``, the default) or the native AMX kernel
(``"amx"``, ``"auto"``; :mod:`qjax._kernel_choice`); :attr:`ServedModel.kernels` says
which each layer got, :meth:`ServedModel.with_kernel` re-prepares. The codes are the same
either way, and the saved file holds no kernel (codes and qparams only). ``jax.export``
refuses a model with AMX layers (the native custom call is not serializable: the kernels
raise a ``ValueError`` naming it); export an ``"xla"`` one.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from .. import kernels
from .._kernel_choice import conv_kernel, kernels_of, linear_kernel, resolve_kernel
from .._primitives import dequantize
from .._qarray import QArray, _deserialize_spec, _serialize_spec
from .._spec import QParams
from ._intsim import apply_layer, fake_quant_codes

__all__ = ["ServedModel", "load_served", "save_served"]

_FORMAT = "qjax.served"
_VERSION = 1


def _requant_stream(h, qp: QParams, compat: str) -> QArray:
    v = dequantize(h.values, h.qparams) if isinstance(h, QArray) else h
    return QArray(fake_quant_codes(v, qp, compat), qp)


def _apply(steps: tuple[dict, ...], params: tuple[dict, ...], x: jax.Array) -> jax.Array:
    h: Any = x
    for st, p in zip(steps, params, strict=True):
        op = st["op"]
        if op == "quantize":
            h = _requant_stream(h, p["qp"], st["compat"])
        elif op in ("linear", "conv"):
            if p.get("in_qp") is not None:
                h = _requant_stream(h, p["in_qp"], st["compat"])
            h = apply_layer(
                op,
                h,
                p["w"],
                p.get("b"),
                p["out_qp"],
                scheme=st["scheme"],
                relu=st["relu"],
                geometry=st.get("geometry"),
                name=st["name"],
            )
        elif op == "relu":
            h = kernels.relu(h)
        elif op == "max_pool":
            h = kernels.max_pool2d(h, st["window"], st["strides"], st["padding"], layout="NHWC")
        elif op == "avg_pool":
            h = kernels.avg_pool2d(
                h, st["window"], st["strides"], st["padding"], layout="NHWC", scheme=st["scheme"]
            )
        elif op == "flatten":
            h = kernels.flatten(h, 1)
        elif op == "dequantize":
            h = kernels.dequantize_output(h)
        else:
            raise ValueError(f"{st.get('name')}: unknown served step {op!r}")
    if isinstance(h, QArray):
        h = kernels.dequantize_output(h)
    return h


def _freeze(steps) -> str:
    return json.dumps(list(steps), sort_keys=True)


@functools.lru_cache(maxsize=64)
def _thaw(structure: str) -> tuple[dict, ...]:
    return tuple(json.loads(structure))


@jax.tree_util.register_pytree_with_keys_class
@dataclasses.dataclass(frozen=True)
class ServedModel:
    """An int8 program built by :func:`qjax.convert`; call it on float input.

    Fields: ``structure`` (JSON of the steps, static), ``params`` (one dict of arrays,
    :class:`~qjax.QParams` and prepared weights per step: the pytree leaves),
    ``input_shape`` (the example's dims after the batch dim: inputs must match them).
    ``served(x)`` checks the shape and runs the jitted integer forward; ``served.forward``
    is the pure function of ``x`` (for ``jax.jit``, ``jax.make_jaxpr``, ``jax.export``).

    Input ``(batch, *input_shape)`` float32; output float32 (the dequantized codes).
    """

    structure: str
    params: tuple
    input_shape: tuple

    @property
    def steps(self) -> tuple[dict, ...]:
        return _thaw(self.structure)

    @property
    def kernels(self) -> dict[str, str]:
        """``{layer name: "amx" | "xla"}``: the int32 dot/conv kernel of each linear and
        conv step (module docstring)."""
        return kernels_of({st["name"]: p for st, p in zip(self.steps, self.params, strict=True)})

    def with_kernel(self, kernel: str) -> ServedModel:
        """The same model with its weights prepared for ``kernel`` (``"xla"``, ``"amx"``
        or ``"auto"``, :mod:`qjax._kernel_choice`): same codes, same outputs.

        >>> from qjax import QuantSpec
        >>> qp = QParams(jnp.float32(0.5), jnp.int32(0), QuantSpec())
        >>> st = [{"op": "quantize", "name": "stub", "compat": "qjax"}]
        >>> m = ServedModel(json.dumps(st), ({"qp": qp},), (3,))
        >>> m.with_kernel("auto").kernels  # no linear or conv layers
        {}
        """
        wish = resolve_kernel(kernel, "ServedModel.with_kernel")
        params = tuple(
            {k: (_reprepare(v, wish) if k == "w" else v) for k, v in p.items()} for p in self.params
        )
        return ServedModel(self.structure, params, self.input_shape)

    def tree_flatten_with_keys(self):
        ga = jax.tree_util.GetAttrKey
        return ((ga("params"), self.params),), (self.structure, self.input_shape)

    def tree_flatten(self):
        return (self.params,), (self.structure, self.input_shape)

    @classmethod
    def tree_unflatten(cls, aux, children) -> ServedModel:
        return cls(aux[0], children[0], aux[1])

    def forward(self, x: jax.Array) -> jax.Array:
        """The integer forward (no shape check), traceable."""
        return _apply(self.steps, self.params, x)

    def check_input(self, x) -> None:
        """``ValueError`` naming the first module when ``x`` does not fit the example."""
        shape = tuple(np.shape(x))
        if shape[1:] != tuple(self.input_shape):
            first = self.steps[0]["name"] if self.steps else "<empty>"
            raise ValueError(
                f"served model (input of {first!r}): expects input (batch, "
                f"{', '.join(map(str, self.input_shape))}) like the convert example, got "
                f"shape {shape}; convert the model again with an example of this shape"
            )
        if not jnp.issubdtype(jnp.result_type(x), jnp.floating):
            raise TypeError(f"served model: expects float input, got dtype {jnp.result_type(x)}")

    def __call__(self, x: jax.Array) -> jax.Array:
        self.check_input(x)
        return _jit_apply(self, x)


@jax.jit
def _jit_apply(served: ServedModel, x):
    return served.forward(x)


def _prepare_stored(kind: str, w: QArray, name: str, max_abs_x: int, groups: int, wish: str):
    """Prepare a stored weight (``(in, out)`` or ``HWIO``/``WIO`` codes) for ``wish``."""
    if kind == "linear":
        k = linear_kernel(wish)
        return kernels.prepare_linear(w, name=name, max_abs_x=max_abs_x, kernel=k)
    k = conv_kernel(wish, w.ndim - 2, groups)
    layout = "HWIO" if w.ndim == 4 else "WIO"
    return kernels.prepare_conv(
        w, name=name, groups=groups, weight_layout=layout, max_abs_x=max_abs_x, kernel=k
    )


def _reprepare(pw, wish: str):
    if isinstance(pw, kernels.PreparedLinear):
        return _prepare_stored("linear", pw.weight, pw.name, pw.max_abs_x, 1, wish)
    if isinstance(pw, kernels.PreparedConv):
        return _prepare_stored("conv", pw.weight, pw.name, pw.max_abs_x, pw.groups, wish)
    return pw


# --------------------------------------------------------------------------------------
# save / load (safetensors + JSON, no pickle)


def _arr(v) -> np.ndarray:
    return np.array(v, order="C")  # (np.ascontiguousarray would make 0-d arrays 1-d)


def _encode(prefix: str, v, tensors: dict) -> Any:
    """Put the arrays of one parameter into ``tensors``; return its JSON description."""
    if v is None:
        return None
    if isinstance(v, QParams):
        tensors[f"{prefix}.scale"] = _arr(v.scale)
        tensors[f"{prefix}.zero_point"] = _arr(v.zero_point)
        return {"kind": "qparams", "spec": json.loads(_serialize_spec(v.spec))}
    if isinstance(v, (kernels.PreparedLinear, kernels.PreparedConv)):
        w = v.weight
        tensors[f"{prefix}.values"] = _arr(w.values)
        tensors[f"{prefix}.scale"] = _arr(w.scale)
        tensors[f"{prefix}.zero_point"] = _arr(w.zero_point)
        d = {"spec": json.loads(_serialize_spec(w.spec)), "name": v.name}
        d["max_abs_x"] = v.max_abs_x
        if isinstance(v, kernels.PreparedLinear):
            return {"kind": "linear", **d}
        return {"kind": "conv", "groups": v.groups, **d}
    tensors[prefix] = _arr(v)
    return {"kind": "array"}


def _decode(prefix: str, d, tensors: dict, wish: str = "xla"):
    if d is None:
        return None
    kind = d["kind"]
    if kind == "array":
        return jnp.asarray(tensors[prefix])
    spec = _deserialize_spec(json.dumps(d["spec"]).encode())
    qp = QParams(
        jnp.asarray(tensors[f"{prefix}.scale"]), jnp.asarray(tensors[f"{prefix}.zero_point"]), spec
    )
    if kind == "qparams":
        return qp
    w = QArray(jnp.asarray(tensors[f"{prefix}.values"]), qp)
    if kind in ("linear", "conv"):
        groups = d.get("groups", 1)
        return _prepare_stored(kind, w, d["name"], d["max_abs_x"], groups, wish)
    raise ValueError(f"load_served: unknown parameter kind {kind!r} at {prefix!r}")


def save_served(path: str | os.PathLike, served: ServedModel) -> None:
    """Write ``served`` to one ``.safetensors`` file (arrays as tensors, structure as
    JSON metadata; no pickle). :func:`load_served` reads it back bit for bit.

    >>> import tempfile, os
    >>> from qjax import QuantSpec
    >>> qp = QParams(jnp.float32(0.5), jnp.int32(0), QuantSpec())
    >>> st = [{"op": "quantize", "name": "stub", "compat": "qjax"}]
    >>> m = ServedModel(json.dumps(st), ({"qp": qp},), (3,))
    >>> p = os.path.join(tempfile.mkdtemp(), "m.safetensors")
    >>> save_served(p, m); load_served(p)(jnp.array([[0.3, 1.0, -9.0]]))
    Array([[ 0.5,  1. , -9. ]], dtype=float32)
    """
    from safetensors.numpy import save_file

    if not isinstance(served, ServedModel):
        raise TypeError(f"save_served: expected a ServedModel, got {type(served).__name__}")
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
    save_file(tensors, os.fspath(path), metadata={"qjax": json.dumps(meta)})


def load_served(path: str | os.PathLike, *, kernel: str = "xla") -> ServedModel:
    """Read a :func:`save_served` file (``ValueError`` if it is not one).

    The file holds codes and qparams, no kernel: ``kernel`` (``"xla"``, ``"amx"`` or
    ``"auto"``, :mod:`qjax._kernel_choice`) prepares the weights on load, the same codes
    either way (``RuntimeError`` naming the reason for ``"amx"`` on a machine without it).

    >>> load_served(__file__)  # doctest: +ELLIPSIS
    Traceback (most recent call last):
      ...
    ValueError: load_served: ... is not a qjax served-model safetensors file ...
    """
    from safetensors import safe_open

    wish = resolve_kernel(kernel, "qjax.load_served")
    path = os.fspath(path)
    try:
        with safe_open(path, framework="np") as f:
            meta = json.loads((f.metadata() or {})["qjax"])
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    except Exception as e:  # safetensors raises its own error types
        raise ValueError(
            f"load_served: {path!r} is not a qjax served-model safetensors file ({e})"
        ) from None
    if meta.get("format") != _FORMAT or meta.get("version") != _VERSION:
        raise ValueError(
            f"load_served: {path!r} holds format {meta.get('format')!r} version "
            f"{meta.get('version')!r}; this qjax reads {_FORMAT!r} version {_VERSION}"
        )
    params = tuple(
        {k: _decode(f"{i}.{k}", d, tensors, wish) for k, d in p.items()}
        for i, p in enumerate(meta["params"])
    )
    return ServedModel(_freeze(meta["steps"]), params, tuple(meta["input_shape"]))
