"""Quantization-aware training layers for ``flax.nnx`` (a thin shell over the core).

Observer statistics live in :class:`QuantStat` variables, so
``nnx.state(model, QuantStat)`` selects them and ``nnx.Optimizer(model, tx,
wrt=nnx.Param)`` never sees them. The mode (:class:`~qjax.flax.Mode`) and the per-layer
switches are static attributes: changing them with :func:`set_mode`,
:func:`disable_observer`, ... retraces ``nnx.jit`` instead of reusing a stale program.

Two ways in, same numbers:

- **Hooks into stock layers.** ``nnx.Linear(..., dot_general=QuantDotGeneral(cfg,
  kernel_shape=(i, o)))`` and ``nnx.Conv(..., conv_general_dilated=QuantConvGeneral
  Dilated(cfg, kernel_shape=...))``: the hook is itself an ``nnx.Module`` holding the
  statistics, so it becomes a child of the Linear/Conv. Or :func:`quantize_model` sets
  the hooks on an existing model from path rules. A hook sees ``(inputs, kernel)``
  only, before the bias: it quantizes the input activation and the weight, not the
  output (configs with ``quantize_output=True`` are refused; use the layers below). One
  hook instance per layer (a shared hook shares statistics).
- **Convenience layers**: :class:`QuantLinear`, :class:`QuantConv`,
  :class:`QuantConvBn` (BN folded as torch's ``ConvBn2d``, :func:`freeze_bn_stats`),
  :class:`ActQuant`, :class:`QuantStub`, :class:`DeQuantStub`, which also quantize
  outputs (PyTorch's eager convention, ``default_qat_qconfig``).

Post-training calibration: :func:`calibrate` (jitted, tqdm progress bar, batch count).
The hook path's limits: no output quantization, and ``nnx.Linear`` must be built with
(or given, via :func:`quantize_model`) one hook instance of its own.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Sequence

import jax.numpy as jnp
from flax import nnx
from jax import lax

from . import _convbn, _core, _intsim
from ._calibrate import run_batches as _run_batches
from ._config import Mode, QuantConfig, as_mode
from ._pooling import AvgPool as AvgPool
from ._pooling import Flatten as Flatten
from ._pooling import MaxPool as MaxPool

__all__ = [
    "ActQuant",
    "AvgPool",
    "DeQuantStub",
    "Flatten",
    "MaxPool",
    "QuantConv",
    "QuantConvBn",
    "QuantConvGeneralDilated",
    "QuantDotGeneral",
    "QuantLinear",
    "QuantStat",
    "QuantStub",
    "calibrate",
    "disable_fake_quant",
    "disable_observer",
    "enable_fake_quant",
    "enable_observer",
    "freeze_bn_stats",
    "unfreeze_bn_stats",
    "quantize_model",
    "set_mode",
]


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

    >>> from flax import nnx
    >>> from qjax.flax import qjax_recommended
    >>> hook = QuantDotGeneral(qjax_recommended(), kernel_shape=(3, 2))
    >>> layer = nnx.Linear(3, 2, dot_general=hook, rngs=nnx.Rngs(0))
    >>> layer(jnp.ones((4, 3))).shape, int(hook.quant_stats.get_value().input.count)
    ((4, 2), 1)
    """

    def __init__(
        self,
        config: QuantConfig,
        kernel_shape: Sequence[int],
        *,
        input_shape: Sequence[int] | None = None,
        mode: Mode = Mode.QAT,
        name: str = "QuantDotGeneral",
    ):
        _refuse_output_quant(config, name)
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
        y, st = _core.quantized_op(
            lax.dot_general,
            lhs,
            rhs,
            self.quant_stats.get_value(),
            self.config,
            self.mode,
            self.switches,
            name=self.name,
            dimension_numbers=dimension_numbers,
            precision=precision,
            preferred_element_type=preferred_element_type,
            out_sharding=out_sharding,
        )
        self.quant_stats.set_value(st)
        return y


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
        y, st = _core.quantized_op(
            lax.conv_general_dilated,
            lhs,
            rhs,
            self.quant_stats.get_value(),
            self.config,
            self.mode,
            self.switches,
            name=self.name,
            window_strides=window_strides,
            padding=padding,
            lhs_dilation=lhs_dilation,
            rhs_dilation=rhs_dilation,
            dimension_numbers=dimension_numbers,
            feature_group_count=feature_group_count,
            batch_group_count=batch_group_count,
            precision=precision,
            preferred_element_type=preferred_element_type,
            out_sharding=out_sharding,
        )
        self.quant_stats.set_value(st)
        return y


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
        y, st = _core.quantized_op(
            lax.dot_general,
            x,
            kernel,
            self.quant_stats.get_value(),
            self.config,
            self.mode,
            self.switches,
            name=self.name,
            dimension_numbers=(((x.ndim - 1,), (0,)), ((), ())),
        )
        bias = None if self.bias is None else self.bias[...]
        if bias is not None:
            y = y + bias.astype(y.dtype)
        y, st = _core.quantize_output(y, st, self.config, self.mode, self.switches, name=self.name)
        self.quant_stats.set_value(st)
        return _intsim.integer_override(
            y, x, kernel, bias, st, self.config, self.mode, self.fake_quant, kind="linear",
            name=self.name,
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
        y, st = _core.quantized_op(
            lax.conv_general_dilated,
            x,
            kernel,
            self.quant_stats.get_value(),
            self.config,
            self.mode,
            self.switches,
            name=self.name,
            **kw,
        )
        bias = None if self.bias is None else self.bias[...]
        if bias is not None:
            y = y + bias.astype(y.dtype)
        y, st = _core.quantize_output(y, st, self.config, self.mode, self.switches, name=self.name)
        self.quant_stats.set_value(st)
        return _intsim.integer_override(
            y, x, kernel, bias, st, self.config, self.mode, self.fake_quant, kind="conv",
            conv_kwargs=kw, name=self.name,
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


# --------------------------------------------------------------------------------------
# lifecycle and switches


def _path_str(path) -> str:
    return "/".join(str(p) for p in path) or "<root>"


def _quant_modules(model, where: str | None = None, fn: str = "set_mode"):
    out = []
    for path, m in nnx.iter_modules(model):
        if isinstance(m, _QuantModule):
            p = _path_str(path)
            if m.name != p:
                m.name = p
            if where is None or re.fullmatch(where, p):
                out.append((p, m))
    if not out:
        what = "quantized modules" if where is None else f"quantized modules matching {where!r}"
        raise ValueError(
            f"{fn}: the model has no {what}; "
            "use QuantLinear/QuantConv/ActQuant or quantize_model(model, rules) first"
        )
    return out


def set_mode(model: nnx.Module, mode: Mode | str, *, where: str | None = None) -> None:
    """Put every quantized module of ``model`` (or those whose path fully matches the
    regex ``where``) into ``mode``. Entering ``FROZEN`` checks that every observer has
    seen data and raises ``ValueError`` naming the module paths that have not.

    >>> from flax import nnx
    >>> from qjax.flax import Mode, qjax_recommended
    >>> layer = QuantLinear(2, 2, config=qjax_recommended(), rngs=nnx.Rngs(0))
    >>> set_mode(layer, Mode.CALIBRATE); layer.mode
    <Mode.CALIBRATE: 'calibrate'>
    """
    mode = as_mode(mode)
    mods = _quant_modules(model, where, "set_mode")
    if mode is Mode.FROZEN:
        missing = [p for p, m in mods if _never_observed(m.quant_stats.get_value())]
        if missing:
            raise ValueError(
                f"set_mode(FROZEN): no statistics in {missing}: these observers never saw "
                "data; run the model in Mode.CALIBRATE or Mode.QAT first"
            )
        from ._health import check_statistics  # non-finite ranges, named by path

        for p, m in mods:
            check_statistics(m.quant_stats.get_value(), where="set_mode(FROZEN)", prefix=p)
    for _, m in mods:
        m.mode = mode


def _never_observed(stats) -> bool:
    leaves = stats if isinstance(stats, _core.LayerStats) else (stats,)
    for st in leaves:
        count = getattr(st, "count", None)
        if count is not None and int(count) == 0:
            return True
    return False


def _set_switch(model, where, attr: str, value: bool, fn: str) -> None:
    for _, m in _quant_modules(model, where, fn):
        setattr(m, attr, value)


def disable_observer(model: nnx.Module, *, where: str | None = None) -> None:
    """Stop observers updating (torch ``disable_observer``), in all quantized modules or
    those whose path fully matches the regex ``where``. Fake-quant then uses the
    statistics as they are.

    >>> from flax import nnx
    >>> from qjax.flax import qjax_recommended
    >>> layer = QuantLinear(2, 2, config=qjax_recommended(), rngs=nnx.Rngs(0))
    >>> disable_observer(layer); layer.observe
    False
    """
    _set_switch(model, where, "observe", False, "disable_observer")


def enable_observer(model: nnx.Module, *, where: str | None = None) -> None:
    """Undo :func:`disable_observer` (torch ``enable_observer``); the mode still decides.

    >>> from flax import nnx
    >>> from qjax.flax import qjax_recommended
    >>> layer = QuantLinear(2, 2, config=qjax_recommended(), rngs=nnx.Rngs(0))
    >>> disable_observer(layer); enable_observer(layer); layer.observe
    True
    """
    _set_switch(model, where, "observe", True, "enable_observer")


def disable_fake_quant(model: nnx.Module, *, where: str | None = None) -> None:
    """Stop fake-quantizing (torch ``disable_fake_quant``): tensors pass through as float.

    >>> from flax import nnx
    >>> from qjax.flax import qjax_recommended
    >>> layer = QuantLinear(2, 2, config=qjax_recommended(), rngs=nnx.Rngs(0))
    >>> disable_fake_quant(layer, where="<root>"); layer.fake_quant
    False
    """
    _set_switch(model, where, "fake_quant", False, "disable_fake_quant")


def enable_fake_quant(model: nnx.Module, *, where: str | None = None) -> None:
    """Undo :func:`disable_fake_quant` (torch ``enable_fake_quant``).

    >>> from flax import nnx
    >>> from qjax.flax import qjax_recommended
    >>> layer = QuantLinear(2, 2, config=qjax_recommended(), rngs=nnx.Rngs(0))
    >>> disable_fake_quant(layer); enable_fake_quant(layer); layer.fake_quant
    True
    """
    _set_switch(model, where, "fake_quant", True, "enable_fake_quant")


def freeze_bn_stats(model: nnx.Module, *, where: str | None = None) -> None:
    """Normalise with the running BN statistics and stop updating them (torch
    ``freeze_bn_stats``), in every :class:`QuantConvBn` (or those matching ``where``).

    >>> from flax import nnx
    >>> from qjax.flax import qjax_recommended
    >>> cb = QuantConvBn(1, 2, (1, 1), config=qjax_recommended(), rngs=nnx.Rngs(0))
    >>> freeze_bn_stats(cb); _ = cb(jnp.ones((1, 2, 2, 1))); cb.bn_mean[...]
    Array([0., 0.], dtype=float32)
    """
    _set_bn(model, where, True, "freeze_bn_stats")


def unfreeze_bn_stats(model: nnx.Module, *, where: str | None = None) -> None:
    """Undo :func:`freeze_bn_stats`.

    >>> from flax import nnx
    >>> from qjax.flax import qjax_recommended
    >>> cb = QuantConvBn(1, 2, (1, 1), config=qjax_recommended(), rngs=nnx.Rngs(0))
    >>> freeze_bn_stats(cb); unfreeze_bn_stats(cb); cb.freeze_bn
    False
    """
    _set_bn(model, where, False, "unfreeze_bn_stats")


def _set_bn(model, where, value: bool, fn: str) -> None:
    mods = [m for _, m in _quant_modules(model, where, fn) if isinstance(m, QuantConvBn)]
    if not mods:
        raise ValueError(f"{fn}: the model has no QuantConvBn modules (where={where!r})")
    for m in mods:
        m.freeze_bn = value


def quantize_model(
    model: nnx.Module,
    rules: Sequence[tuple[str, QuantConfig]],
    *,
    mode: Mode = Mode.QAT,
) -> dict[str, str]:
    """Install quantization hooks into the stock layers of ``model``, in place.

    ``rules`` is a sequence of ``(regex, config)``; the first regex that fully matches a
    module's path (``"layers/0"``, ``"encoder/fc1"``) decides. Matched ``nnx.Linear``
    layers get a :class:`QuantDotGeneral`, ``nnx.Conv`` a
    :class:`QuantConvGeneralDilated` (so configs must quantize inputs, not outputs).
    Containers (modules with children) are walked, not quantized. Raises ``TypeError``
    naming the path when a rule matches a leaf module of another type, and
    ``ValueError`` when a rule matches nothing. Returns ``{path: regex}``.

    >>> from flax import nnx
    >>> from qjax.flax import qjax_recommended
    >>> class MLP(nnx.Module):
    ...     def __init__(self, rngs):
    ...         self.fc1 = nnx.Linear(4, 8, rngs=rngs)
    ...         self.fc2 = nnx.Linear(8, 2, rngs=rngs)
    >>> model = MLP(nnx.Rngs(0))
    >>> quantize_model(model, [(r"fc\\d", qjax_recommended())])
    {'fc1': 'fc\\\\d', 'fc2': 'fc\\\\d'}
    """
    rules = list(rules)
    for pat, cfg in rules:
        if not isinstance(cfg, QuantConfig):
            raise TypeError(
                f"quantize_model: rule {pat!r} needs a QuantConfig, got {type(cfg).__name__}"
            )
    used: dict[str, str] = {}
    hits = {pat: 0 for pat, _ in rules}
    targets = []
    for path, m in nnx.iter_modules(model):
        if isinstance(m, _QuantModule) or not path:
            continue
        p = _path_str(path)
        # Skip containers: any module with a child module.
        has_child = any(isinstance(v, nnx.Module) and v is not m for _, v in nnx.iter_children(m))
        if has_child and not isinstance(m, (nnx.Linear, nnx.Conv)):
            continue
        for pat, cfg in rules:
            if re.fullmatch(pat, p):
                hits[pat] += 1
                targets.append((p, m, pat, cfg))
                break
    for p, m, pat, _ in targets:
        if not isinstance(m, (nnx.Linear, nnx.Conv)):
            raise TypeError(
                f"quantize_model: rule {pat!r} matches {p!r}, a {type(m).__name__}, which has "
                "no quantization hook (supported: nnx.Linear, nnx.Conv); narrow the pattern"
            )
    unused = [pat for pat, n in hits.items() if n == 0]
    if unused:
        raise ValueError(
            f"quantize_model: rules {unused} matched no module; paths are like "
            f"{[_path_str(p) for p, _ in list(nnx.iter_modules(model))[:5] if p]}"
        )
    for p, m, pat, cfg in targets:
        if isinstance(m, nnx.Linear):
            hook = QuantDotGeneral(cfg, m.kernel.shape, mode=mode, name=p)
            m.dot_general = nnx.data(hook)
        else:
            hook = QuantConvGeneralDilated(cfg, m.kernel.shape, mode=mode, name=p)
            m.conv_general_dilated = nnx.data(hook)
        used[p] = pat
    return used


def calibrate(
    model: nnx.Module,
    batches: Iterable,
    *,
    forward: Callable | None = None,
    max_batches: int | None = None,
    progress: bool = True,
    then: Mode = Mode.FROZEN,
) -> int:
    """Post-training calibration: run ``model`` in ``Mode.CALIBRATE`` over ``batches``.

    Each batch goes through a jitted ``forward(model, batch)`` (default ``model(batch)``;
    a tuple batch is passed as ``model(*batch)``), with a tqdm progress bar when tqdm is
    installed. Afterwards the model is put in mode ``then`` (``FROZEN`` by default,
    which checks that every observer saw data). Returns the number of batches.

    >>> from flax import nnx
    >>> from qjax.flax import qjax_recommended
    >>> layer = QuantLinear(3, 2, config=qjax_recommended(), rngs=nnx.Rngs(0))
    >>> calibrate(layer, [jnp.ones((4, 3)), -jnp.ones((4, 3))], progress=False)
    2
    >>> layer.mode, round(float(layer.quant_stats.get_value().input.min_val), 4)  # EMA
    (<Mode.FROZEN: 'frozen'>, 0.98)
    """
    if forward is None:

        def forward(m, batch):
            return m(*batch) if isinstance(batch, tuple) else m(batch)

    set_mode(model, Mode.CALIBRATE)
    step = nnx.jit(forward)
    n = _run_batches(lambda b: step(model, b), batches, max_batches=max_batches, progress=progress)
    set_mode(model, then)
    return n


# Layers and helpers of qjax.flax.nnx_extras (imported last: they build on the above).
from . import nnx_extras as _extras  # noqa: E402
from .nnx_extras import *  # noqa: E402, F403

__all__ += _extras.__all__
