"""The ``flax.linen`` quantized layers and hooks: statistics and the forward pass.

Observer statistics live in the ``quant_stats`` collection (:data:`COLLECTION`), one
``stats`` variable per quantized module. The ``dot_general_cls`` /
``conv_general_dilated_cls`` hooks (:class:`QuantDotGeneral`,
:class:`QuantConvGeneralDilated`) go into stock ``nn.Dense`` / ``nn.Conv``; the
convenience layers (:class:`QuantDense`, :class:`QuantConv`, :class:`QuantConvBn`,
:class:`ActQuant`, :class:`QuantStub`, :class:`DeQuantStub`) also quantize outputs.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax.numpy as jnp
from jax import lax

from .. import _convbn, _core, _intsim
from .._config import Mode, QuantConfig, as_mode
from .._paths import join_path

COLLECTION = "quant_stats"


def _check_config(module: nn.Module, config) -> None:
    if not isinstance(config, QuantConfig):
        where = join_path(module.path)
        raise TypeError(
            f"{where}: config must be a qjax.flax.QuantConfig, got {type(config).__name__}"
        )


def _check_existing_kernel(module: nn.Module, x) -> None:
    """Once initialized, the input's features must match the stored kernel's (a ValueError
    naming the layer and both shapes, as the NNX layers; not flax's shape error)."""
    if module.has_variable("params", "kernel"):
        kernel = nn.meta.unbox(module.get_variable("params", "kernel"))
        _core.check_features(x, kernel, join_path(module.path))


def _stats_variable(module: nn.Module, init_fn):
    return module.variable(COLLECTION, "stats", init_fn)


def _store(module: nn.Module, var, new, mode: Mode, observe: bool) -> None:
    if not (mode.observes and observe) or module.is_initializing():
        return
    if not module.is_mutable_collection(COLLECTION):
        raise ValueError(
            f"{join_path(module.path)}: {mode} updates observer statistics, but the "
            f"{COLLECTION!r} collection is immutable; call apply(..., mutable=[{COLLECTION!r}]) "
            "or use Mode.FROZEN (or observe=False) for evaluation"
        )
    var.value = new


def _switches(module) -> _core.Switches:
    return _core.Switches(observe=module.observe, fake_quant=module.fake_quant)


def _refuse_output_quant(module, config) -> None:
    if config.quantize_output:
        raise ValueError(
            f"{join_path(module.path)}: a dot_general/conv hook sees the input and kernel "
            "only (the bias is added after it), so it cannot quantize the output; use "
            "config.replace(quantize_input=True, quantize_output=False), or QuantDense/"
            "QuantConv for PyTorch's output-quantizing convention"
        )


def _hook_operands(module, lhs, rhs, kernel_view=None):
    """A hook's operands ``(fq(lhs), fq(rhs))`` (:func:`qjax.flax._core.quantize_operands`)
    from its own statistics (made on first use with the kernel's shape, or the
    ``kernel_view``'s), stored back when the mode observes."""
    _check_config(module, module.config)
    _refuse_output_quant(module, module.config)
    mode = as_mode(module.mode)
    kshape = rhs.shape if kernel_view is None else kernel_view.shape
    var = _stats_variable(
        module,
        lambda: _core.init_layer_stats(module.config, kshape, input_shape=module.input_shape),
    )
    x, w, st = _core.quantize_operands(
        lhs,
        rhs,
        var.value,
        module.config,
        mode,
        _switches(module),
        name=join_path(module.path),
        require_stats=not module.is_initializing(),
        kernel_view=kernel_view,
    )
    _store(module, var, st, mode, module.observe)
    return x, w, st


def _hook_value(module, y, lhs, rhs, st, kind: str, op_kwargs: dict, source: str):
    """The hook's output: :func:`qjax.flax._intsim.hook_override` (the int8 value when the
    config has a scheme; marked for ``qjax.convert``), named by the hooked layer's path."""
    return _intsim.hook_override(
        y, lhs, rhs, st, module.config, as_mode(module.mode),
        module.fake_quant and not module.is_initializing(), kind=kind, op_kwargs=op_kwargs,
        name=join_path(module.path[:-1]) or join_path(module.path), source=source,
    )  # fmt: skip


class QuantDotGeneral(nn.Module):
    """A ``dot_general_cls`` hook for ``nn.Dense``: fake-quantizes input and kernel.

    Called with ``lax.dot_general``'s signature, keywords included. ``out_ndim`` (for
    ``nn.DenseGeneral``, ``len(features)``): the weight quantizer sees the kernel
    ``(*in, *out)`` as the ``(prod(in), prod(out))`` matrix (per-channel: one scale per
    flattened output feature), as NNX's :class:`~qjax.flax.nnx.QuantDotGeneral`.

    >>> import functools, jax
    >>> import flax.linen as nn
    >>> from qjax.flax import qjax_recommended
    >>> hook = functools.partial(QuantDotGeneral, config=qjax_recommended())
    >>> dense = nn.Dense(2, dot_general_cls=hook)
    >>> v = dense.init(jax.random.key(0), jnp.ones((4, 3)))
    >>> y, upd = dense.apply(v, jnp.ones((4, 3)), mutable=["quant_stats"])
    >>> int(upd["quant_stats"]["QuantDotGeneral_0"]["stats"].input.count)
    1
    """

    config: QuantConfig
    mode: Mode = Mode.QAT
    observe: bool = True
    fake_quant: bool = True
    input_shape: Sequence[int] | None = None
    out_ndim: int | None = None

    @nn.compact
    def __call__(
        self,
        lhs,
        rhs,
        dimension_numbers,
        precision=None,
        preferred_element_type=None,
        out_sharding=None,
    ):
        view = None
        if self.out_ndim is not None:
            view = _core.KernelView.of(rhs.shape, range(rhs.ndim - self.out_ndim, rhs.ndim))
        x, w, st = _hook_operands(self, lhs, rhs, view)
        y = lax.dot_general(
            x,
            w,
            dimension_numbers,
            precision=precision,
            preferred_element_type=preferred_element_type,
            out_sharding=out_sharding,
        )
        kw = {"dimension_numbers": dimension_numbers}
        return _hook_value(self, y, lhs, rhs, st, "linear", kw, "flax.linen.Dense")


class QuantConvGeneralDilated(nn.Module):
    """A ``conv_general_dilated_cls`` hook for ``nn.Conv`` (input and kernel quantized).

    >>> import functools, jax
    >>> import flax.linen as nn
    >>> from qjax.flax import qjax_recommended
    >>> hook = functools.partial(QuantConvGeneralDilated, config=qjax_recommended())
    >>> conv = nn.Conv(4, (3, 3), conv_general_dilated_cls=hook)
    >>> v = conv.init(jax.random.key(0), jnp.ones((1, 8, 8, 1)))
    >>> sorted(v)
    ['params', 'quant_stats']
    """

    config: QuantConfig
    mode: Mode = Mode.QAT
    observe: bool = True
    fake_quant: bool = True
    input_shape: Sequence[int] | None = None

    @nn.compact
    def __call__(
        self,
        lhs,
        rhs,
        window_strides,
        padding,
        lhs_dilation=None,
        rhs_dilation=None,
        dimension_numbers=None,
        feature_group_count=1,
        batch_group_count=1,
        precision=None,
        preferred_element_type=None,
        out_sharding=None,
    ):
        x, w, st = _hook_operands(self, lhs, rhs)
        kw = dict(
            window_strides=window_strides, padding=padding, lhs_dilation=lhs_dilation,
            rhs_dilation=rhs_dilation, dimension_numbers=dimension_numbers,
            feature_group_count=feature_group_count, batch_group_count=batch_group_count,
        )  # fmt: skip
        y = lax.conv_general_dilated(
            x, w, **kw, precision=precision, preferred_element_type=preferred_element_type,
            out_sharding=out_sharding,
        )  # fmt: skip
        return _hook_value(self, y, lhs, rhs, st, "conv", kw, "flax.linen.Conv")


class QuantDense(nn.Module):
    """``nn.Dense`` with fake-quantized input/weight/output (per the config).

    Params ``kernel`` ``(in, features)`` (lecun-normal) and ``bias`` (zeros), as
    ``nn.Dense``; statistics in ``quant_stats/stats``.

    >>> import jax
    >>> from qjax.flax import Mode, default_qat_qconfig
    >>> layer = QuantDense(2, config=default_qat_qconfig("x86"))
    >>> v = layer.init(jax.random.key(0), jnp.ones((4, 3)))
    >>> sorted(v["params"]), v["quant_stats"]["stats"].input is None
    (['bias', 'kernel'], True)
    """

    features: int
    config: QuantConfig
    use_bias: bool = True
    mode: Mode = Mode.QAT
    observe: bool = True
    fake_quant: bool = True
    kernel_init: Any = nn.initializers.lecun_normal()
    bias_init: Any = nn.initializers.zeros_init()

    @nn.compact
    def __call__(self, x, mode: Mode | None = None):
        _check_config(self, self.config)
        mode = as_mode(self.mode if mode is None else mode)
        kshape = (jnp.shape(x)[-1], self.features)
        _check_existing_kernel(self, x)
        kernel = self.param("kernel", self.kernel_init, kshape, jnp.float32)
        bias = self.param("bias", self.bias_init, (self.features,), jnp.float32)
        var = _stats_variable(self, lambda: _core.init_layer_stats(self.config, kshape))
        sw, name = _switches(self), join_path(self.path)
        x, kernel = _core.promote_operands(x, kernel, join_path(self.path))
        y, st = _core.quantized_op(
            lax.dot_general,
            x,
            kernel,
            var.value,
            self.config,
            mode,
            sw,
            name=name,
            require_stats=not self.is_initializing(),
            dimension_numbers=(((x.ndim - 1,), (0,)), ((), ())),
        )
        if self.use_bias:
            y = y + bias.astype(y.dtype)
        y, st = _core.quantize_output(
            y, st, self.config, mode, sw, name=name, require_stats=not self.is_initializing()
        )
        _store(self, var, st, mode, self.observe)
        return _intsim.integer_override(
            y, x, kernel, bias if self.use_bias else None, st, self.config, mode,
            self.fake_quant, kind="linear", name=name, active=not self.is_initializing(),
        )  # fmt: skip


class QuantConv(nn.Module):
    """Channels-last convolution with fake-quantized input/weight/output.

    ``kernel`` is ``kernel_size + (in, features)``, as ``nn.Conv``.

    >>> import jax
    >>> from qjax.flax import qjax_recommended
    >>> conv = QuantConv(4, (3, 3), config=qjax_recommended())
    >>> v = conv.init(jax.random.key(0), jnp.ones((1, 8, 8, 1)))
    >>> conv.apply(v, jnp.ones((1, 8, 8, 1)), mutable=["quant_stats"])[0].shape
    (1, 8, 8, 4)
    """

    features: int
    kernel_size: Sequence[int]
    config: QuantConfig
    strides: Sequence[int] | int = 1
    padding: Any = "SAME"
    use_bias: bool = True
    mode: Mode = Mode.QAT
    observe: bool = True
    fake_quant: bool = True
    kernel_init: Any = nn.initializers.lecun_normal()
    bias_init: Any = nn.initializers.zeros_init()

    @nn.compact
    def __call__(self, x, mode: Mode | None = None):
        _check_config(self, self.config)
        mode = as_mode(self.mode if mode is None else mode)
        ks = tuple(self.kernel_size)
        kshape = ks + (jnp.shape(x)[-1], self.features)
        strides = (self.strides,) * len(ks) if isinstance(self.strides, int) else self.strides
        _check_existing_kernel(self, x)
        kernel = self.param("kernel", self.kernel_init, kshape, jnp.float32)
        bias = self.param("bias", self.bias_init, (self.features,), jnp.float32)
        var = _stats_variable(self, lambda: _core.init_layer_stats(self.config, kshape))
        sw, name = _switches(self), join_path(self.path)
        n = x.ndim - 2
        if not 1 <= n <= 3:
            raise ValueError(
                f"{name}: QuantConv supports 1-3 spatial dims, got input rank {x.ndim}"
            )
        sp = "HWD"[:n]
        padding = self.padding if isinstance(self.padding, str) else tuple(map(tuple, self.padding))
        conv_kw = dict(
            window_strides=tuple(strides),
            padding=padding,
            dimension_numbers=("N" + sp + "C", sp + "IO", "N" + sp + "C"),
        )
        x, kernel = _core.promote_operands(x, kernel, join_path(self.path))
        y, st = _core.quantized_op(
            lax.conv_general_dilated,
            x,
            kernel,
            var.value,
            self.config,
            mode,
            sw,
            name=name,
            require_stats=not self.is_initializing(),
            **conv_kw,
        )
        if self.use_bias:
            y = y + bias.astype(y.dtype)
        y, st = _core.quantize_output(
            y, st, self.config, mode, sw, name=name, require_stats=not self.is_initializing()
        )
        _store(self, var, st, mode, self.observe)
        return _intsim.integer_override(
            y, x, kernel, bias if self.use_bias else None, st, self.config, mode,
            self.fake_quant, kind="conv", name=name, active=not self.is_initializing(),
            conv_kwargs=conv_kw,
        )  # fmt: skip


class QuantConvBn(nn.Module):
    """Conv + BatchNorm (+ ReLU) folded during QAT, as PyTorch's ``ConvBn2d`` (see
    :class:`qjax.flax.nnx.QuantConvBn`; same formulas, :mod:`qjax.flax._convbn`).

    Params ``kernel``, ``bias`` (if ``use_bias``), ``bn_scale``, ``bn_bias``; running
    statistics ``bn_mean``, ``bn_var`` in the ``batch_stats`` collection (updated when
    BN trains: not ``use_running_average`` and not ``freeze_bn_stats``; apply with
    ``mutable=["batch_stats", "quant_stats"]``).

    >>> import jax
    >>> from qjax.flax import qjax_recommended
    >>> cb = QuantConvBn(4, (3, 3), config=qjax_recommended())
    >>> v = cb.init(jax.random.key(0), jnp.ones((1, 5, 5, 1)))
    >>> sorted(v), sorted(v["batch_stats"])
    (['batch_stats', 'params', 'quant_stats'], ['bn_mean', 'bn_var'])
    >>> sorted(v["params"])
    ['bn_bias', 'bn_scale', 'kernel']
    """

    features: int
    kernel_size: Sequence[int]
    config: QuantConfig
    strides: Sequence[int] | int = 1
    padding: Any = "SAME"
    use_bias: bool = False
    relu: bool = False
    momentum: float = 0.1
    epsilon: float = 1e-5
    use_running_average: bool = False
    freeze_bn_stats: bool = False
    mode: Mode = Mode.QAT
    observe: bool = True
    fake_quant: bool = True
    kernel_init: Any = nn.initializers.lecun_normal()

    @nn.compact
    def __call__(self, x, mode: Mode | None = None, use_running_average: bool | None = None):
        _check_config(self, self.config)
        mode = as_mode(self.mode if mode is None else mode)
        ura = self.use_running_average if use_running_average is None else use_running_average
        ks = tuple(self.kernel_size)
        kshape = ks + (jnp.shape(x)[-1], self.features)
        f = (self.features,)
        _check_existing_kernel(self, x)
        kernel = self.param("kernel", self.kernel_init, kshape, jnp.float32)
        bias = self.param("bias", nn.initializers.zeros_init(), f) if self.use_bias else None
        gamma = self.param("bn_scale", nn.initializers.ones_init(), f)
        beta = self.param("bn_bias", nn.initializers.zeros_init(), f)
        mean = self.variable("batch_stats", "bn_mean", jnp.zeros, f, jnp.float32)
        var = self.variable("batch_stats", "bn_var", jnp.ones, f, jnp.float32)
        qvar = _stats_variable(self, lambda: _core.init_layer_stats(self.config, kshape))
        name = join_path(self.path)
        n = x.ndim - 2
        if not 1 <= n <= 3:
            raise ValueError(f"{name}: QuantConvBn supports 1-3 spatial dims, got rank {x.ndim}")
        sp = "HWD"[:n]
        strides = (self.strides,) * n if isinstance(self.strides, int) else tuple(self.strides)
        padding = self.padding if isinstance(self.padding, str) else tuple(map(tuple, self.padding))
        x, kernel = _core.promote_operands(x, kernel, name)
        train_bn = not (ura or self.freeze_bn_stats)
        y, st, new_mean, new_var = _convbn.conv_bn(
            x,
            kernel,
            bias,
            gamma,
            beta,
            mean.value,
            var.value,
            qvar.value,
            self.config,
            mode,
            _switches(self),
            train_bn=train_bn,
            momentum=self.momentum,
            eps=self.epsilon,
            relu=self.relu,
            name=name,
            require_stats=not self.is_initializing(),
            conv_kwargs=dict(
                window_strides=strides,
                padding=padding,
                dimension_numbers=("N" + sp + "C", sp + "IO", "N" + sp + "C"),
            ),
        )
        _store(self, qvar, st, mode, self.observe)
        if train_bn and not self.is_initializing():
            if not self.is_mutable_collection("batch_stats"):
                raise ValueError(
                    f"{name}: BatchNorm trains (use_running_average=False, freeze_bn_stats="
                    "False) and updates running statistics; apply with "
                    "mutable=['batch_stats', 'quant_stats'] or use_running_average=True"
                )
            mean.value, var.value = new_mean, new_var
        return y


class ActQuant(nn.Module):
    """Activation quantizer with ``config.activation`` (per-tensor unless ``shape``).

    >>> import jax
    >>> from qjax.flax import Mode, qjax_recommended
    >>> aq = ActQuant(qjax_recommended(), mode=Mode.CALIBRATE)
    >>> x = jnp.array([-1.0, 2.0])
    >>> v = aq.init(jax.random.key(0), x)
    >>> y, upd = aq.apply(v, x, mutable=["quant_stats"])
    >>> bool((y == x).all()), float(upd["quant_stats"]["stats"].max_val)
    (True, 2.0)
    """

    config: QuantConfig
    mode: Mode = Mode.QAT
    observe: bool = True
    fake_quant: bool = True
    shape: Sequence[int] | None = None

    @nn.compact
    def __call__(self, x, mode: Mode | None = None):
        _check_config(self, self.config)
        spec = self.config.activation
        if spec is None:
            raise ValueError(
                f"{join_path(self.path)}: config.activation is None; nothing to quantize"
            )
        mode = as_mode(self.mode if mode is None else mode)
        shape = () if spec.granularity == "tensor" else self.shape
        if shape is None:
            raise ValueError(f"{join_path(self.path)}: a per-axis activation spec needs shape=...")
        var = _stats_variable(
            self,
            lambda: _core.init_tensor_stats(
                spec, self.config.activation_observer, self.config.compat, shape
            ),
        )
        y, st = _core.quantize_tensor(
            x,
            var.value,
            spec,
            self.config.activation_observer,
            self.config,
            mode,
            _switches(self),
            name=join_path(self.path),
            require_stats=not self.is_initializing(),
        )
        _store(self, var, st, mode, self.observe)
        return y


class QuantStub(ActQuant):
    """Where the float input becomes quantized (PyTorch ``QuantStub``); an
    :class:`ActQuant` during QAT.

    >>> import jax
    >>> from qjax.flax import qjax_recommended
    >>> sorted(QuantStub(qjax_recommended()).init(jax.random.key(0), jnp.ones(2)))
    ['quant_stats']
    """


class DeQuantStub(nn.Module):
    """Where the quantized part ends (PyTorch ``DeQuantStub``); identity during QAT.

    >>> import jax
    >>> DeQuantStub().apply({}, jnp.array([1.0]))
    Array([1.], dtype=float32)
    """

    @nn.compact
    def __call__(self, x):
        return x
