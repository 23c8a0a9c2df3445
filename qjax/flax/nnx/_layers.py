"""The ``flax.nnx`` quantized layers and hooks: state, statistics and the forward pass.

:class:`QuantStat` holds observer statistics; :class:`_QuantModule` is the state every
quantized module shares (config, mode, switches, statistics). The ``dot_general`` /
``conv_general_dilated`` hooks (:class:`QuantDotGeneral`,
:class:`QuantConvGeneralDilated`) go into stock ``nnx.Linear`` / ``nnx.Conv``; the
convenience layers (:class:`QuantLinear`, :class:`QuantConv`, :class:`QuantConvBn`,
:class:`ActQuant`, :class:`QuantStub`, :class:`DeQuantStub`) also quantize outputs.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax.numpy as jnp
from flax import nnx
from jax import lax

from .. import _convbn, _core, _intsim
from .._config import Mode, QuantConfig, as_mode

_LECUN_NORMAL = nnx.initializers.lecun_normal()  # nnx.Linear's defaults
_ZEROS = nnx.initializers.zeros_init()


class QuantStat(nnx.Variable):
    """Observer statistics (a pytree of arrays): not a parameter, never optimized."""


class _QuantModule(nnx.Module):
    """Common state of every quantized module: config, mode, switches, stats."""

    def _setup(self, config, mode, stats, name):
        if not isinstance(config, QuantConfig):
            raise TypeError(
                f"{name}: config must be a qjax.flax.QuantConfig, got {type(config).__name__}"
            )
        self.config = config
        self.mode = as_mode(mode)
        self.observe = True
        self.fake_quant = True
        self.name = name
        self.quant_stats = QuantStat(stats)

    @property
    def switches(self) -> _core.Switches:
        return _core.Switches(observe=self.observe, fake_quant=self.fake_quant)

    def _quantize_operands(self, lhs, rhs, kernel_view=None):
        """``(fq(lhs), fq(rhs), new stats)`` from this module's statistics, config, mode
        and switches (:func:`qjax.flax._core.quantize_operands`)."""
        st = self.quant_stats.get_value()
        return _core.quantize_operands(
            lhs, rhs, st, self.config, self.mode, self.switches, name=self.name,
            kernel_view=kernel_view,
        )  # fmt: skip

    def _hook_operands(self, lhs, rhs, kernel_view=None):
        """A hook's operands: :meth:`_quantize_operands` with the statistics stored."""
        x, w, st = self._quantize_operands(lhs, rhs, kernel_view)
        self.quant_stats.set_value(st)
        return x, w

    def _hook_value(self, y, lhs, rhs, kind: str, op_kwargs: dict, source: str):
        """The hook's output: :func:`qjax.flax._intsim.hook_override` (the int8 value
        when the config has a scheme; marked for ``qjax.convert``)."""
        return _intsim.hook_override(
            y, lhs, rhs, self.quant_stats.get_value(), self.config, self.mode,
            self.fake_quant, kind=kind, op_kwargs=op_kwargs, name=self.name, source=source,
        )  # fmt: skip


class QuantDotGeneral(_QuantModule):
    """A ``dot_general`` hook for ``nnx.Linear`` that fake-quantizes input and kernel.

    Call signature is ``lax.dot_general``'s, keywords included (``precision``,
    ``preferred_element_type``, ``out_sharding``), so ``nnx.Linear`` calls it as it
    calls ``lax.dot_general``. ``lhs`` is taken as the activation, ``rhs`` as the kernel.

    Args:
      config: a :class:`~qjax.flax.QuantConfig` with ``quantize_output=False``.
      kernel_shape: the layer's kernel shape (the statistics get their final shapes now).
      input_shape: an example input shape, needed only for per-axis activation specs.
      mode: initial :class:`~qjax.flax.Mode`.
      out_ndim: for ``nnx.LinearGeneral``: its kernel is ``(*in_features,
        *out_features)`` with ``out_ndim = len(out_features)``; the weight quantizer
        sees it as the ``(prod(in_features), prod(out_features))`` matrix, so a
        per-channel spec gives one scale per flattened output feature
        (:class:`~qjax.flax._core.KernelView`). ``None`` (``nnx.Linear``): the kernel
        as it is.

    >>> from flax import nnx
    >>> from qjax.flax import qjax_recommended
    >>> hook = QuantDotGeneral(qjax_recommended(), kernel_shape=(3, 2))
    >>> layer = nnx.Linear(3, 2, dot_general=hook, rngs=nnx.Rngs(0))
    >>> layer(jnp.ones((4, 3))).shape, int(hook.quant_stats.get_value().input.count)
    ((4, 2), 1)
    >>> hook = QuantDotGeneral(qjax_recommended(), kernel_shape=(3, 2, 4), out_ndim=2)
    >>> lg = nnx.LinearGeneral(3, (2, 4), dot_general=hook, rngs=nnx.Rngs(0))
    >>> lg(jnp.ones((5, 3))).shape, hook.quant_stats.get_value().weight.min_val.shape
    ((5, 2, 4), (8,))
    """

    def __init__(
        self,
        config: QuantConfig,
        kernel_shape: Sequence[int],
        *,
        input_shape: Sequence[int] | None = None,
        mode: Mode = Mode.QAT,
        name: str = "QuantDotGeneral",
        out_ndim: int | None = None,
    ):
        _refuse_output_quant(config, name)
        kernel_shape = tuple(kernel_shape)
        self.kernel_view = None
        if out_ndim is not None:
            n = len(kernel_shape)
            self.kernel_view = _core.KernelView.of(kernel_shape, range(n - out_ndim, n))
            kernel_shape = self.kernel_view.shape
        stats = _core.init_layer_stats(config, kernel_shape, input_shape=input_shape)
        self._setup(config, mode, stats, name)

    def __call__(
        self,
        lhs,
        rhs,
        dimension_numbers,
        precision=None,
        preferred_element_type=None,
        out_sharding=None,
    ):
        x, w = self._hook_operands(lhs, rhs, self.kernel_view)
        y = lax.dot_general(
            x,
            w,
            dimension_numbers,
            precision=precision,
            preferred_element_type=preferred_element_type,
            out_sharding=out_sharding,
        )
        kw = {"dimension_numbers": dimension_numbers}
        return self._hook_value(y, lhs, rhs, "linear", kw, "flax.nnx.Linear")


class QuantConvGeneralDilated(_QuantModule):
    """A ``conv_general_dilated`` hook for ``nnx.Conv`` (input and kernel fake-quantized).

    Signature and arguments as :class:`QuantDotGeneral`, with ``lax.conv_general_dilated``'s
    parameters.

    >>> from flax import nnx
    >>> from qjax.flax import qjax_recommended
    >>> hook = QuantConvGeneralDilated(qjax_recommended(), kernel_shape=(3, 3, 1, 4))
    >>> conv = nnx.Conv(1, 4, (3, 3), conv_general_dilated=hook, rngs=nnx.Rngs(0))
    >>> conv(jnp.ones((2, 8, 8, 1))).shape
    (2, 8, 8, 4)
    """

    def __init__(
        self,
        config: QuantConfig,
        kernel_shape: Sequence[int],
        *,
        input_shape: Sequence[int] | None = None,
        mode: Mode = Mode.QAT,
        name: str = "QuantConvGeneralDilated",
    ):
        _refuse_output_quant(config, name)
        stats = _core.init_layer_stats(config, kernel_shape, input_shape=input_shape)
        self._setup(config, mode, stats, name)

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
        x, w = self._hook_operands(lhs, rhs)
        kw = dict(
            window_strides=window_strides, padding=padding, lhs_dilation=lhs_dilation,
            rhs_dilation=rhs_dilation, dimension_numbers=dimension_numbers,
            feature_group_count=feature_group_count, batch_group_count=batch_group_count,
        )  # fmt: skip
        y = lax.conv_general_dilated(
            x, w, **kw, precision=precision, preferred_element_type=preferred_element_type,
            out_sharding=out_sharding,
        )  # fmt: skip
        return self._hook_value(y, lhs, rhs, "conv", kw, "flax.nnx.Conv")


def _refuse_output_quant(config, name):
    if isinstance(config, QuantConfig) and config.quantize_output:
        raise ValueError(
            f"{name}: a dot_general/conv hook sees the layer's input and kernel only (the "
            "bias is added after it), so it cannot quantize the output; use "
            "config.replace(quantize_input=True, quantize_output=False), or QuantLinear/"
            "QuantConv for PyTorch's output-quantizing convention"
        )


class QuantLinear(_QuantModule):
    """``nnx.Linear`` with fake-quantized input/weight/output (per the config).

    Parameters are named and initialised as ``nnx.Linear``'s (``kernel`` of shape
    ``(in_features, out_features)``, lecun-normal; ``bias`` zeros); observer state is
    the :class:`QuantStat` ``quant_stats``.

    >>> from flax import nnx
    >>> from qjax.flax import Mode, default_qat_qconfig
    >>> layer = QuantLinear(3, 2, config=default_qat_qconfig("x86"), rngs=nnx.Rngs(0))
    >>> y = layer(jnp.ones((4, 3)))
    >>> st = layer.quant_stats.get_value()
    >>> st.input is None, int(st.weight.count), int(st.output.count)
    (True, 1, 1)
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        config: QuantConfig,
        use_bias: bool = True,
        mode: Mode = Mode.QAT,
        kernel_init=_LECUN_NORMAL,
        bias_init=_ZEROS,
        rngs: nnx.Rngs,
        name: str = "QuantLinear",
    ):
        kshape = (in_features, out_features)
        self.kernel = nnx.Param(kernel_init(rngs.params(), kshape, jnp.float32))
        self.bias = nnx.data(
            nnx.Param(bias_init(rngs.params(), (out_features,), jnp.float32)) if use_bias else None
        )
        self._setup(config, mode, _core.init_layer_stats(config, kshape), name)

    def __call__(self, x):
        _core.check_features(x, self.kernel, self.name)
        x, kernel = _core.promote_operands(x, self.kernel[...], self.name)
        xq, wq, st = self._quantize_operands(x, kernel)
        y = lax.dot_general(xq, wq, (((x.ndim - 1,), (0,)), ((), ())))
        bias = None if self.bias is None else self.bias[...]
        if bias is not None:
            y = y + bias.astype(y.dtype)
        y, st = _core.quantize_output(y, st, self.config, self.mode, self.switches, name=self.name)
        self.quant_stats.set_value(st)
        return _intsim.integer_override(
            y, x, kernel, bias, st, self.config, self.mode, self.fake_quant, kind="linear",
            name=self.name, source="qjax.flax.nnx.QuantLinear",
        )  # fmt: skip


class QuantConv(_QuantModule):
    """A 2-D (or N-D) channels-last convolution with fake-quantized input/weight/output.

    ``kernel`` has shape ``kernel_size + (in_features, out_features)`` (``nnx.Conv``'s
    layout); ``padding`` is ``"SAME"``, ``"VALID"`` or explicit pairs.

    >>> from flax import nnx
    >>> from qjax.flax import qjax_recommended
    >>> conv = QuantConv(1, 4, (3, 3), config=qjax_recommended(), rngs=nnx.Rngs(0))
    >>> conv(jnp.ones((2, 8, 8, 1))).shape
    (2, 8, 8, 4)
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        kernel_size: Sequence[int],
        *,
        config: QuantConfig,
        strides: Sequence[int] | int = 1,
        padding="SAME",
        use_bias: bool = True,
        mode: Mode = Mode.QAT,
        kernel_init=_LECUN_NORMAL,
        bias_init=_ZEROS,
        rngs: nnx.Rngs,
        name: str = "QuantConv",
    ):
        kernel_size = tuple(kernel_size)
        kshape = kernel_size + (in_features, out_features)
        self.strides = (strides,) * len(kernel_size) if isinstance(strides, int) else tuple(strides)
        self.padding = padding if isinstance(padding, str) else tuple(map(tuple, padding))
        self.kernel = nnx.Param(kernel_init(rngs.params(), kshape, jnp.float32))
        self.bias = nnx.data(
            nnx.Param(bias_init(rngs.params(), (out_features,), jnp.float32)) if use_bias else None
        )
        self._setup(config, mode, _core.init_layer_stats(config, kshape), name)

    def __call__(self, x):
        _core.check_features(x, self.kernel, self.name)
        x, kernel = _core.promote_operands(x, self.kernel[...], self.name)
        kw = _conv_kwargs(x.ndim, self.strides, self.padding)
        xq, wq, st = self._quantize_operands(x, kernel)
        y = lax.conv_general_dilated(xq, wq, **kw)
        bias = None if self.bias is None else self.bias[...]
        if bias is not None:
            y = y + bias.astype(y.dtype)
        y, st = _core.quantize_output(y, st, self.config, self.mode, self.switches, name=self.name)
        self.quant_stats.set_value(st)
        return _intsim.integer_override(
            y, x, kernel, bias, st, self.config, self.mode, self.fake_quant, kind="conv",
            conv_kwargs=kw, name=self.name, source="qjax.flax.nnx.QuantConv",
        )  # fmt: skip


def _conv_kwargs(ndim: int, strides, padding) -> dict:
    n = ndim - 2
    if n < 1:
        raise ValueError(f"QuantConv expects (batch, *spatial, channels) input, got rank {ndim}")
    sp = "HWD"[:n] if n <= 3 else None
    if sp is None:
        raise ValueError(f"QuantConv supports 1-3 spatial dimensions, got {n}")
    dn = ("N" + sp + "C", sp + "IO", "N" + sp + "C")
    return dict(window_strides=strides, padding=padding, dimension_numbers=dn)


class QuantConvBn(_QuantModule):
    """Conv + BatchNorm (+ ReLU) with the BN folded into the fake-quantized weight during
    QAT, as PyTorch's ``ConvBn2d``/``ConvBnReLU2d`` (formulas in
    :mod:`qjax.flax._convbn`; torch's BN conventions: ``momentum=0.1``, unbiased running
    variance).

    Params: ``kernel`` (``kernel_size + (in, out)``), ``bias`` (if ``use_bias``),
    ``bn_scale``, ``bn_bias``; running statistics ``bn_mean``, ``bn_var`` are
    ``nnx.BatchStat``. BN uses batch statistics (and updates the running ones) unless
    ``use_running_average`` (``model.eval()``) or the ``freeze_bn`` switch
    (:func:`freeze_bn_stats`) is on.

    >>> from flax import nnx
    >>> from qjax.flax import qjax_recommended
    >>> cb = QuantConvBn(1, 4, (3, 3), config=qjax_recommended(), relu=True, rngs=nnx.Rngs(0))
    >>> y = cb(jnp.ones((2, 5, 5, 1)))
    >>> y.shape, float(y.min()) >= 0, cb.bn_mean[...].shape
    ((2, 5, 5, 4), True, (4,))
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        kernel_size: Sequence[int],
        *,
        config: QuantConfig,
        strides: Sequence[int] | int = 1,
        padding="SAME",
        use_bias: bool = False,
        relu: bool = False,
        momentum: float = 0.1,
        epsilon: float = 1e-5,
        use_running_average: bool = False,
        mode: Mode = Mode.QAT,
        kernel_init=_LECUN_NORMAL,
        rngs: nnx.Rngs,
        name: str = "QuantConvBn",
    ):
        kernel_size = tuple(kernel_size)
        kshape = kernel_size + (in_features, out_features)
        self.strides = (strides,) * len(kernel_size) if isinstance(strides, int) else tuple(strides)
        self.padding = padding if isinstance(padding, str) else tuple(map(tuple, padding))
        self.kernel = nnx.Param(kernel_init(rngs.params(), kshape, jnp.float32))
        zeros = jnp.zeros((out_features,), jnp.float32)
        self.bias = nnx.data(nnx.Param(zeros) if use_bias else None)
        self.bn_scale = nnx.Param(jnp.ones((out_features,), jnp.float32))
        self.bn_bias = nnx.Param(zeros)
        self.bn_mean = nnx.BatchStat(zeros)
        self.bn_var = nnx.BatchStat(jnp.ones((out_features,), jnp.float32))
        self.relu = relu
        self.momentum = momentum
        self.epsilon = epsilon
        self.use_running_average = use_running_average
        self.freeze_bn = False
        self._setup(config, mode, _core.init_layer_stats(config, kshape), name)

    def __call__(self, x, use_running_average: bool | None = None):
        ura = self.use_running_average if use_running_average is None else use_running_average
        _core.check_features(x, self.kernel, self.name)
        x, kernel = _core.promote_operands(x, self.kernel[...], self.name)
        y, st, mean, var = _convbn.conv_bn(
            x,
            kernel,
            None if self.bias is None else self.bias[...],
            self.bn_scale[...],
            self.bn_bias[...],
            self.bn_mean[...],
            self.bn_var[...],
            self.quant_stats.get_value(),
            self.config,
            self.mode,
            self.switches,
            train_bn=not (ura or self.freeze_bn),
            momentum=self.momentum,
            eps=self.epsilon,
            relu=self.relu,
            name=self.name,
            conv_kwargs=_conv_kwargs(x.ndim, self.strides, self.padding),
        )
        self.quant_stats.set_value(st)
        self.bn_mean[...] = mean
        self.bn_var[...] = var
        return y


class ActQuant(_QuantModule):
    """An activation quantizer: observes and fake-quantizes ``x`` with
    ``config.activation`` (per-tensor unless ``shape`` is given for a per-axis spec).

    >>> from flax import nnx
    >>> from qjax.flax import Mode, qjax_recommended
    >>> aq = ActQuant(qjax_recommended(), mode=Mode.CALIBRATE)
    >>> x = jnp.array([-1.0, 0.5, 3.0])
    >>> bool((aq(x) == x).all()), float(aq.quant_stats.get_value().max_val)
    (True, 3.0)
    """

    def __init__(
        self,
        config: QuantConfig,
        *,
        shape: Sequence[int] | None = None,
        mode: Mode = Mode.QAT,
        name: str = "ActQuant",
    ):
        if not isinstance(config, QuantConfig):
            raise TypeError(f"{name}: config must be a QuantConfig, got {type(config).__name__}")
        if config.activation is None:
            raise ValueError(f"{name}: config.activation is None; nothing to quantize")
        spec = config.activation
        act_shape = () if spec.granularity == "tensor" else shape
        if act_shape is None:
            raise ValueError(f"{name}: a per-axis activation spec needs shape=...")
        st = _core.init_tensor_stats(spec, config.activation_observer, config.compat, act_shape)
        self._setup(config, mode, st, name)

    def __call__(self, x):
        y, st = _core.quantize_tensor(
            x,
            self.quant_stats.get_value(),
            self.config.activation,
            self.config.activation_observer,
            self.config,
            self.mode,
            self.switches,
            name=self.name,
        )
        self.quant_stats.set_value(st)
        return y


class QuantStub(ActQuant):
    """Marks where a model's float input becomes quantized (PyTorch ``QuantStub``);
    during QAT it is an :class:`ActQuant`.

    >>> from qjax.flax import qjax_recommended
    >>> QuantStub(qjax_recommended())(jnp.array([0.0, 1.0])).dtype
    dtype('float32')
    """

    def __init__(self, config, *, shape=None, mode=Mode.QAT, name="QuantStub"):
        super().__init__(config, shape=shape, mode=mode, name=name)


class DeQuantStub(nnx.Module):
    """Marks where the quantized part of a model ends (PyTorch ``DeQuantStub``);
    the identity during QAT.

    >>> DeQuantStub()(jnp.array([1.0]))
    Array([1.], dtype=float32)
    """

    def __call__(self, x):
        return x
