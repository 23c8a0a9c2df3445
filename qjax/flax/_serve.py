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

Every ``dot_general``/convolution in the program is int8 x int8 -> int32. The file
format (:func:`qjax.save_served` / :func:`qjax.load_served`: safetensors + JSON, no
pickle, every field validated on load) is :mod:`qjax.flax._served_io`.

Kernel: ``qjax.convert(..., kernel=...)`` and ``load_served(path, kernel=...)`` prepare
the weights for XLA's dot/conv (``"xla"``, the default) or the native AMX kernel
(``"amx"``, ``"auto"``; :mod:`qjax.kernels._choice`); :attr:`ServedModel.kernels` says
which each layer got, :meth:`ServedModel.with_kernel` re-prepares. The codes are the same
either way, and the saved file holds no kernel (codes and qparams only). ``jax.export``
refuses a model with AMX layers (the native custom call is not serializable: the kernels
raise a ``ValueError`` naming it); export an ``"xla"`` one.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from .. import kernels
from .._primitives import dequantize
from .._qarray import QArray
from .._spec import QParams
from ..kernels._choice import conv_kernel, kernels_of, linear_kernel, resolve_kernel
from ._intsim import apply_layer, fake_quant_codes

__all__ = ["ServedModel"]


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
        or ``"auto"``, :mod:`qjax.kernels._choice`): same codes, same outputs.

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
