"""A ``flax.linen`` dense layer with learnable qparams (LSQ / PACT): qparams in
``params/qparams``, observer statistics in ``quant_stats`` (the core is
:mod:`qjax.flax._learnable`); :func:`~qjax.flax.linen.init_qparams_from_stats` seeds
them after calibration. Same numbers as :class:`qjax.flax.nnx.LearnableQuantLinear`.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp
from jax import lax

from .. import _core, _learnable
from .._config import Mode, QuantConfig, as_mode
from .._paths import join_path
from ._layers import _stats_variable, _store, _switches


class LearnableQuantDense(nn.Module):
    """``nn.Dense`` with learnable qparams (``config.grad`` ``"lsq"``/``"pact"``), see
    :class:`qjax.flax.nnx.LearnableQuantLinear`. Params ``kernel``, ``bias``,
    ``qparams``; statistics (:class:`~qjax.flax._learnable.LearnableStats`) in
    ``quant_stats/stats``.

    >>> import jax
    >>> from qjax.flax import qjax_recommended
    >>> layer = LearnableQuantDense(2, config=qjax_recommended().replace(grad="pact"))
    >>> v = layer.init(jax.random.key(0), jnp.ones((1, 3)))
    >>> sorted(v["params"]), sorted(v["params"]["qparams"]["weight"])
    (['bias', 'kernel', 'qparams'], ['alpha'])
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
        name = join_path(self.path)
        _learnable.check_learnable(self.config, name)
        mode = as_mode(self.mode if mode is None else mode)
        kshape = (jnp.shape(x)[-1], self.features)
        kernel = self.param("kernel", self.kernel_init, kshape, jnp.float32)
        bias = self.param("bias", self.bias_init, (self.features,), jnp.float32)
        qparams = self.param(
            "qparams", lambda _: _learnable.init_learnable_params(self.config, kshape)[0]
        )
        var = _stats_variable(
            self, lambda: _learnable.init_learnable_params(self.config, kshape)[1]
        )
        args = (self.config, mode, _switches(self))
        x, kernel = _core.promote_operands(x, kernel, name)
        y, st = _learnable.learnable_op(
            lax.dot_general,
            x,
            kernel,
            qparams,
            var.value,
            *args,
            name=name,
            dimension_numbers=(((x.ndim - 1,), (0,)), ((), ())),
        )
        if self.use_bias:
            y = y + bias.astype(y.dtype)
        y, st = _learnable.learnable_output(y, qparams, st, *args, name=name)
        _store(self, var, st, mode, self.observe)
        return y
