"""Conv + BatchNorm folding during QAT, as PyTorch's ``ConvBn2d`` (pure functions).

PyTorch's ``_ConvBnNd._forward_approximate`` (torch 2.13), in Flax's channels-last
layout (``c`` indexes output channels, the kernel's last axis)::

    std      = sqrt(running_var + eps)
    factor   = gamma / std
    w_fold   = fq(kernel · factor)                      # the weight quantizer sees the
    y        = conv(fq_in(x), w_fold) / factor          # folded weight, as served
    y        = y + conv_bias                            # when the conv has a bias
    y        = batch_norm(y)                            # batch statistics in training,
                                                        # running statistics otherwise

``batch_norm`` follows torch: training normalises with the biased batch variance and
updates ``running = (1 - momentum)·running + momentum·batch`` with the *unbiased*
variance (``momentum=0.1``); ``freeze_bn_stats`` (or ``train=False``) normalises with
the running statistics and updates nothing. The running statistics are returned, never
differentiated (``stop_gradient``), like the observer state.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from . import _core, _intsim, _record
from ._config import Mode, QuantConfig


def batch_norm(y, gamma, beta, mean, var, *, train: bool, momentum: float, eps: float):
    """Torch-convention batch norm over all axes but the last; returns
    ``(out, new_mean, new_var)``.

    >>> y = jnp.array([[1.0], [3.0]])
    >>> out, m, v = batch_norm(y, jnp.ones(1), jnp.zeros(1), jnp.zeros(1), jnp.ones(1),
    ...                        train=True, momentum=0.1, eps=0.0)
    >>> out[:, 0], m, v   # unbiased var 2 -> 0.9 + 0.1·2
    (Array([-1.,  1.], dtype=float32), Array([0.2], dtype=float32), Array([1.1], dtype=float32))
    """
    axes = tuple(range(y.ndim - 1))
    if train:
        n = 1
        for a in axes:
            n *= y.shape[a]
        bmean = jnp.mean(y, axis=axes)
        bvar = jnp.mean(jnp.square(y - bmean), axis=axes)
        out = (y - bmean) / jnp.sqrt(bvar + jnp.float32(eps)) * gamma + beta
        unbiased = bvar * jnp.float32(n / max(n - 1, 1))
        mom = jnp.float32(momentum)
        new_mean = (1 - mom) * mean + mom * lax.stop_gradient(bmean)
        new_var = (1 - mom) * var + mom * lax.stop_gradient(unbiased)
        return out, lax.stop_gradient(new_mean), lax.stop_gradient(new_var)
    out = (y - mean) / jnp.sqrt(var + jnp.float32(eps)) * gamma + beta
    return out, mean, var


def conv_bn(
    x,
    kernel,
    conv_bias,
    gamma,
    beta,
    mean,
    var,
    stats: _core.LayerStats,
    config: QuantConfig,
    mode: Mode,
    switches: _core.Switches,
    *,
    train_bn: bool,
    momentum: float = 0.1,
    eps: float = 1e-5,
    relu: bool = False,
    name: str = "conv_bn",
    require_stats: bool = True,
    conv_kwargs: dict,
):
    """The folded Conv+BN(+ReLU) forward; returns ``(y, stats, new_mean, new_var)``.

    In ``Mode.FLOAT`` and ``Mode.CALIBRATE`` the same folded arithmetic runs without
    fake-quant (so CALIBRATE output equals FLOAT output).

    >>> from qjax.flax import qjax_recommended
    >>> from qjax.flax._core import Switches, init_layer_stats
    >>> cfg = qjax_recommended()
    >>> k = jnp.ones((1, 1, 1, 2))
    >>> st = init_layer_stats(cfg, k.shape)
    >>> kw = dict(window_strides=(1, 1), padding="SAME",
    ...           dimension_numbers=("NHWC", "HWIO", "NHWC"))
    >>> y, st, m, v = conv_bn(jnp.ones((2, 3, 3, 1)), k, None, jnp.ones(2), jnp.zeros(2),
    ...                       jnp.zeros(2), jnp.ones(2), st, cfg, Mode.QAT, Switches(),
    ...                       train_bn=True, conv_kwargs=kw)
    >>> y.shape, m
    ((2, 3, 3, 2), Array([0.1, 0.1], dtype=float32))
    """
    factor = gamma / jnp.sqrt(var + jnp.float32(eps))
    y, stats = _core.quantized_op(
        lax.conv_general_dilated,
        x,
        kernel * factor,
        stats,
        config,
        mode,
        switches,
        name=name,
        require_stats=require_stats,
        **conv_kwargs,
    )
    y = y / factor
    if conv_bias is not None:
        y = y + conv_bias
    y, new_mean, new_var = batch_norm(
        y, gamma, beta, mean, var, train=train_bn, momentum=momentum, eps=eps
    )
    if relu:
        y = jax.nn.relu(y)
    y, stats = _core.quantize_output(
        y, stats, config, mode, switches, name=name, require_stats=require_stats
    )
    if not train_bn and (config.scheme is not None or _record.active()):
        # the served layer: BN folded with the running statistics (torch's convert); with
        # a scheme its integer value, without one the float simulation marked for convert
        w_fold, b_fold = _intsim.fold_bn(kernel, conv_bias, gamma, beta, mean, var, eps)
        y = _intsim.integer_override(
            y, x, w_fold, b_fold, stats, config, mode, switches.fake_quant, kind="conv",
            conv_kwargs=conv_kwargs, relu=relu, name=name, active=require_stats,
        )  # fmt: skip
    return y, stats, new_mean, new_var
