"""The functional core of the Flax layers: pure functions, no Flax.

Both shells (:mod:`qjax.flax.nnx`, :mod:`qjax.flax.linen`) only store the observer
states and call these functions, so NNX and Linen compute the same numbers.

One quantized tensor (:func:`quantize_tensor`), per mode and switches::

    observe    = mode.observes and switches.observe
    fake_quant = mode.fake_quantizes and switches.fake_quant
    state'     = observer.update(state, stop_gradient(x))   if observe else state
    y          = fake_quant(x, observer.qparams(state'))    if fake_quant else x

The new state is computed from ``stop_gradient(x)`` and is itself wrapped in
``stop_gradient``: statistics are returned to the caller, never passed through
gradients. In QAT the qparams come from the state *after* this batch's update, as in
PyTorch's ``FakeQuantize.forward`` (observe, then calculate_qparams, then fake-quant).

A layer (:func:`quantized_op`, :func:`quantize_output`): the activation quantizer on the
input (``config.quantize_input``), the weight quantizer on the kernel, the float op
(``lax.dot_general`` or ``lax.conv_general_dilated``) on the fake-quantized operands;
after the shell adds the bias, the activation quantizer on the output
(``config.quantize_output``).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from .._primitives import fake_quant
from .._spec import QuantSpec
from . import _record
from ._config import Mode, QuantConfig, as_mode

__all__ = [
    "KernelView",
    "LayerStats",
    "Switches",
    "init_layer_stats",
    "einsum_kernel_view",
    "embed_view",
    "init_tensor_stats",
    "promote_operands",
    "quantize_operands",
    "quantize_output",
    "quantize_tensor",
    "quantize_weight",
    "quantized_op",
]


class Switches(NamedTuple):
    """Per-layer switches (static): PyTorch's ``enable/disable_observer`` and
    ``enable/disable_fake_quant``. They only turn off what the mode turns on."""

    observe: bool = True
    fake_quant: bool = True


_ALL_ON = Switches()


class LayerStats(NamedTuple):
    """Observer states of one layer (``None`` where the config quantizes nothing)."""

    input: Any = None
    weight: Any = None
    output: Any = None


class KernelView(NamedTuple):
    """A kernel seen by the weight quantizer as a ``(contracted, output)`` matrix.

    ``nnx.LinearGeneral`` kernels ``(*in_features, *out_features)`` and ``Einsum`` kernels
    (output axes anywhere) are transposed so the output axes come last, then flattened::

        view(w) = reshape(transpose(w, perm), (prod(contracted dims), prod(output dims)))

    so a per-channel weight spec (``axis=-1``) gives one scale per output feature (the
    flattened output axes) and a per-tensor spec one scale; fake-quant is elementwise,
    so :meth:`unview` of the fake-quantized view is exactly fake-quant of ``w`` with
    those qparams.

    >>> v = KernelView.of((4, 2, 3), out_axes=(1, 2))
    >>> v.shape, v.perm
    ((4, 6), (0, 1, 2))
    >>> v2 = KernelView.of((2, 5, 3), out_axes=(0, 2))  # Einsum "bnd,ndh->bh" style
    >>> v2.shape, v2.perm
    ((5, 6), (1, 0, 2))
    >>> w = jnp.arange(30.0).reshape(2, 5, 3)
    >>> bool((v2.unview(v2.view(w)) == w).all())
    True
    """

    perm: tuple[int, ...]  # kernel axes, contracted first, output axes last (order kept)
    tshape: tuple[int, ...]  # the transposed kernel's shape
    shape: tuple[int, int]  # (prod(contracted), prod(output))

    @classmethod
    def of(cls, kernel_shape, out_axes) -> KernelView:
        kernel_shape = tuple(int(d) for d in kernel_shape)
        n = len(kernel_shape)
        outs = sorted(a % n for a in out_axes)
        perm = tuple(a for a in range(n) if a not in outs) + tuple(outs)
        tshape = tuple(kernel_shape[a] for a in perm)
        k = len(perm) - len(outs)
        rows = int(np.prod(tshape[:k], dtype=np.int64))
        cols = int(np.prod(tshape[k:], dtype=np.int64))
        return cls(perm, tshape, (rows, cols))

    def view(self, w):
        if self.perm != tuple(range(len(self.perm))):
            w = jnp.transpose(w, self.perm)
        return jnp.reshape(w, self.shape)

    def unview(self, w):
        w = jnp.reshape(w, self.tshape)
        if self.perm != tuple(range(len(self.perm))):
            w = jnp.transpose(w, np.argsort(self.perm))
        return w


def einsum_kernel_view(subscripts: str, kernel_shape, name: str = "Einsum") -> KernelView:
    """The :class:`KernelView` of an ``Einsum`` kernel: its output axes are the kernel
    (second operand) letters that appear in the result, the others are contracted.

    >>> einsum_kernel_view("btd,dnh->btnh", (8, 2, 4)).shape
    (8, 8)
    >>> einsum_kernel_view("btnh,nhd->btd", (2, 4, 8)).shape
    (8, 8)
    """
    eq = subscripts.replace(" ", "")
    if eq.count(",") != 1 or "->" not in eq:
        raise ValueError(f"{name}: einsum {subscripts!r} must be explicit 'lhs,rhs->out'")
    ops, out = eq.split("->")
    rhs = ops.split(",")[1]
    if "." in rhs or len(rhs) != len(kernel_shape):
        raise ValueError(
            f"{name}: einsum {subscripts!r}: the kernel operand {rhs!r} must name each of "
            f"its {len(kernel_shape)} axes (kernel shape {tuple(kernel_shape)}, no '...')"
        )
    return KernelView.of(kernel_shape, [i for i, c in enumerate(rhs) if c in out])


def embed_view(table_shape) -> KernelView:
    """An embedding table ``(num_embeddings, features)`` seen as ``(features,
    num_embeddings)``: each row (embedding vector) is an output channel, as in
    ``Embed.attend``'s ``query @ table.T``.

    >>> embed_view((10, 4)).shape
    (4, 10)
    """
    return KernelView.of(tuple(table_shape), out_axes=(0,))


def promote_operands(x, kernel, name: str = "layer"):
    """Input and kernel cast to the wider of their float dtypes (works under strict
    dtype promotion; ``nnx.Linear`` promotes likewise). Integer inputs are an error.

    >>> a, b = promote_operands(jnp.ones(2, jnp.bfloat16), jnp.ones(2, jnp.float32))
    >>> a.dtype, b.dtype
    (dtype('float32'), dtype('float32'))
    """
    x = jnp.asarray(x)
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(f"{name}: expects a floating input, got dtype {x.dtype}")
    dt = x.dtype if x.dtype.itemsize >= kernel.dtype.itemsize else kernel.dtype
    return x.astype(dt), kernel.astype(dt)


def check_features(x, kernel, name: str) -> None:
    """The input's last axis against the kernel's ``in_features`` (a static shape check:
    the error names the layer instead of ``dot_general``/``conv_general_dilated`` or
    flax's ``ScopeParamShapeError``; the NNX and Linen layers share it)."""
    shape, k = jnp.shape(x), kernel.shape
    if not shape or shape[-1] != k[-2]:
        n = shape[-1] if shape else "no"
        raise ValueError(
            f"{name}: the input has {n} features (shape {tuple(shape)}), the layer takes "
            f"in_features={k[-2]} (kernel shape {tuple(k)})"
        )


def init_tensor_stats(spec: QuantSpec | None, factory, compat, shape) -> Any:
    """Observer state for a tensor of ``shape`` (``None`` when ``spec`` is ``None``).

    >>> from qjax.flax._config import EMAMinMax
    >>> st = init_tensor_stats(QuantSpec(axis=-1), EMAMinMax(), "qjax", (4, 3))
    >>> st.min_val.shape, int(st.count)
    ((3,), 0)
    """
    if spec is None:
        return None
    return factory(spec, compat).init(jnp.zeros(tuple(shape), jnp.float32))


def _activation_shape(spec: QuantSpec | None, shape, where: str):
    if spec is None or spec.granularity == "tensor":
        return ()
    if shape is None:
        raise ValueError(
            f"a per-axis/per-group activation spec ({spec}) needs the {where} shape at "
            f"init; pass {where}_shape=..."
        )
    return tuple(shape)


def init_layer_stats(
    config: QuantConfig, kernel_shape, *, input_shape=None, output_shape=None
) -> LayerStats:
    """All observer states of a layer with a kernel of ``kernel_shape``.

    Per-tensor activation statistics need no shape; per-axis ones need
    ``input_shape``/``output_shape`` (an example batch shape).

    >>> from qjax.flax._config import qjax_recommended
    >>> st = init_layer_stats(qjax_recommended(), (8, 4))
    >>> st.input.min_val.shape, st.weight.min_val.shape, st.output
    ((), (4,), None)
    """
    if not isinstance(config, QuantConfig):
        raise TypeError(f"config must be a qjax.flax.QuantConfig, got {type(config).__name__}")
    act = config.activation
    inp = out = None
    if act is not None and config.quantize_input:
        shape = _activation_shape(act, input_shape, "input")
        inp = init_tensor_stats(act, config.activation_observer, config.compat, shape)
    if act is not None and config.quantize_output:
        shape = _activation_shape(act, output_shape, "output")
        out = init_tensor_stats(act, config.activation_observer, config.compat, shape)
    w = init_tensor_stats(config.weight, config.weight_observer, config.compat, kernel_shape)
    return LayerStats(input=inp, weight=w, output=out)


def _check_observed(state, name: str) -> None:
    count = getattr(state, "count", None)
    if count is None or isinstance(count, jax.core.Tracer):
        return
    if int(count) == 0:
        raise ValueError(
            f"{name}: fake-quantizes with the observer's statistics without updating them "
            "(Mode.FROZEN or observe=False), but this observer never saw data; run the model "
            "in Mode.CALIBRATE or Mode.QAT first (or load statistics into its quant_stats)"
        )


def quantize_tensor(
    x: jax.Array,
    state: Any,
    spec: QuantSpec | None,
    factory,
    config: QuantConfig,
    mode: Mode,
    switches: Switches = _ALL_ON,
    *,
    name: str = "tensor",
    require_stats: bool = True,
) -> tuple[jax.Array, Any]:
    """Observe and/or fake-quantize one tensor; returns ``(y, new_state)``.

    ``y`` has ``x``'s dtype (fake-quant computes in float32). ``name`` (a module path)
    appears in errors: fake-quant from an observer that is off (FROZEN mode or
    ``observe=False``) and never saw data raises ``ValueError`` when the state is
    concrete (not under ``jit``), unless ``require_stats=False`` (used by Linen's
    ``init``, which allocates statistics without data).

    >>> from qjax.flax._config import qjax_recommended
    >>> cfg = qjax_recommended()
    >>> spec = cfg.activation
    >>> st = init_tensor_stats(spec, cfg.activation_observer, "qjax", ())
    >>> x = jnp.array([-1.0, 0.3, 2.0])
    >>> y, st = quantize_tensor(x, st, spec, cfg.activation_observer, cfg, Mode.CALIBRATE)
    >>> bool((y == x).all()), float(st.max_val)
    (True, 2.0)
    >>> y, _ = quantize_tensor(x, st, spec, cfg.activation_observer, cfg, Mode.FROZEN)
    >>> y
    Array([-1.        ,  0.30588236,  2.        ], dtype=float32)
    """
    mode = as_mode(mode)
    if spec is None:
        return x, state
    if state is None:
        raise ValueError(f"{name}: no observer state for a quantized tensor (spec {spec})")
    obs = factory(spec, config.compat)
    if mode.observes and switches.observe:
        state = jax.tree_util.tree_map(
            jax.lax.stop_gradient, obs.update(state, jax.lax.stop_gradient(x))
        )
    if mode.fake_quantizes and switches.fake_quant:
        if config.grad in ("lsq", "pact"):
            raise ValueError(
                f"{name}: grad={config.grad!r} learns the qparams as parameters; use "
                "LearnableQuantLinear (qjax.flax.nnx) / LearnableQuantDense (qjax.flax.linen)"
            )
        if require_stats and not (mode.observes and switches.observe):
            _check_observed(state, name)
        qp = obs.qparams(state)
        y = fake_quant(x, qp, grad=config.grad, compat=config.fake_quant_compat).astype(x.dtype)
        if _record.active():
            info = _record.QuantizeMark(name, config.fake_quant_compat)
            y = _record.mark(y, {"x": x, "qp": qp, "stats": state}, info)
        return y, state
    return x, state


def quantize_operands(
    lhs: jax.Array,
    rhs: jax.Array,
    stats: LayerStats,
    config: QuantConfig,
    mode: Mode,
    switches: Switches = _ALL_ON,
    *,
    name: str = "layer",
    require_stats: bool = True,
    kernel_view: KernelView | None = None,
) -> tuple[jax.Array, jax.Array, LayerStats]:
    """``(fq(lhs), fq(rhs), new stats)``: the input quantizer on ``lhs`` (when
    ``config.quantize_input``) and the weight quantizer on ``rhs``.

    With a ``kernel_view`` the weight quantizer sees ``kernel_view.view(rhs)`` (its
    statistics have the view's shape) and the result is put back in ``rhs``'s layout:
    ``fq(rhs) = unview(fake_quant(view(rhs), qparams))``.

    >>> from qjax.flax._config import qjax_recommended
    >>> cfg = qjax_recommended()
    >>> v = KernelView.of((2, 3, 4), out_axes=(1, 2))
    >>> st = init_layer_stats(cfg, v.shape)
    >>> x, w, st = quantize_operands(jnp.ones((5, 2)), jnp.ones((2, 3, 4)), st, cfg,
    ...                              Mode.QAT, kernel_view=v)
    >>> w.shape, st.weight.min_val.shape
    ((2, 3, 4), (12,))
    """
    mode = as_mode(mode)
    xin, st_in = lhs, stats.input
    if config.quantize_input:
        xin, st_in = quantize_tensor(
            lhs,
            stats.input,
            config.activation,
            config.activation_observer,
            config,
            mode,
            switches,
            name=f"{name} (input)",
            require_stats=require_stats,
        )
    wq, st_w = quantize_weight(
        rhs,
        stats.weight,
        config,
        mode,
        switches,
        name=name,
        require_stats=require_stats,
        kernel_view=kernel_view,
    )
    return xin, wq, LayerStats(input=st_in, weight=st_w, output=stats.output)


def quantize_weight(
    w: jax.Array,
    state: Any,
    config: QuantConfig,
    mode: Mode,
    switches: Switches = _ALL_ON,
    *,
    name: str = "layer",
    require_stats: bool = True,
    kernel_view: KernelView | None = None,
) -> tuple[jax.Array, Any]:
    """The weight quantizer on ``w`` (seen through ``kernel_view`` if given):
    ``(unview(fake_quant(view(w), qparams)), new_state)``.

    >>> from qjax.flax._config import qjax_recommended
    >>> cfg = qjax_recommended()
    >>> v = KernelView.of((5, 2), out_axes=(0,))  # an embedding table, one scale per row
    >>> st = init_layer_stats(cfg, v.shape).weight
    >>> wq, st = quantize_weight(jnp.ones((5, 2)), st, cfg, Mode.QAT, kernel_view=v)
    >>> wq.shape, st.min_val.shape
    ((5, 2), (5,))
    """
    wv = w if kernel_view is None else kernel_view.view(w)
    wq, st = quantize_tensor(
        wv,
        state,
        config.weight,
        config.weight_observer,
        config,
        mode,
        switches,
        name=f"{name} (weight)",
        require_stats=require_stats,
    )
    return (wq if kernel_view is None else kernel_view.unview(wq)), st


def quantized_op(
    op,
    lhs: jax.Array,
    rhs: jax.Array,
    stats: LayerStats,
    config: QuantConfig,
    mode: Mode,
    switches: Switches = _ALL_ON,
    *,
    name: str = "layer",
    require_stats: bool = True,
    kernel_view: KernelView | None = None,
    **op_kwargs,
) -> tuple[jax.Array, LayerStats]:
    """``op(fq(lhs), fq(rhs), **op_kwargs)`` and the new stats (input and weight).

    ``op`` is ``lax.dot_general``, ``lax.conv_general_dilated`` or anything with the
    same leading ``(lhs, rhs)`` arguments; ``lhs`` is the activation, ``rhs`` the
    kernel (seen through ``kernel_view`` if given, see :func:`quantize_operands`). The
    output quantizer is not applied here (see :func:`quantize_output`).

    >>> from jax import lax
    >>> from qjax.flax._config import qjax_recommended
    >>> cfg = qjax_recommended()
    >>> w = jnp.ones((2, 3))
    >>> st = init_layer_stats(cfg, w.shape)
    >>> x = jnp.array([[0.5, -1.0]])
    >>> y, st = quantized_op(lax.dot_general, x, w, st, cfg, Mode.QAT,
    ...                      dimension_numbers=(((1,), (0,)), ((), ())))
    >>> y.shape, int(st.input.count), int(st.weight.count)
    ((1, 3), 1, 1)
    """
    xin, wq, st = quantize_operands(
        lhs,
        rhs,
        stats,
        config,
        mode,
        switches,
        name=name,
        require_stats=require_stats,
        kernel_view=kernel_view,
    )
    return op(xin, wq, **op_kwargs), st


def quantize_output(
    y: jax.Array,
    stats: LayerStats,
    config: QuantConfig,
    mode: Mode,
    switches: Switches = _ALL_ON,
    *,
    name: str = "layer",
    require_stats: bool = True,
) -> tuple[jax.Array, LayerStats]:
    """The output quantizer (``config.quantize_output``), applied after the bias.

    >>> from qjax.flax._config import default_qat_qconfig
    >>> cfg = default_qat_qconfig("x86")
    >>> st = init_layer_stats(cfg, (2, 3))
    >>> y, st = quantize_output(jnp.array([0.0, 1.0]), st, cfg, Mode.CALIBRATE)
    >>> float(st.output.max_val)
    1.0
    """
    if not config.quantize_output:
        return y, stats
    y, st = quantize_tensor(
        y,
        stats.output,
        config.activation,
        config.activation_observer,
        config,
        mode,
        switches,
        name=f"{name} (output)",
        require_stats=require_stats,
    )
    return y, stats._replace(output=st)
