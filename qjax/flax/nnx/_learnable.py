"""A ``flax.nnx`` linear layer with learnable qparams (LSQ / PACT).

:class:`LearnableQuantLinear` keeps its qparams as ``nnx.Param`` (the core is
:mod:`qjax.flax._learnable`); :func:`~qjax.flax.nnx.init_qparams_from_stats` seeds them
from calibrated observers. Same numbers as :class:`qjax.flax.linen.LearnableQuantDense`.
"""

from __future__ import annotations

import jax.numpy as jnp
from flax import nnx
from jax import lax

from .. import _core, _learnable
from .._config import Mode, QuantConfig
from ._layers import _LECUN_NORMAL, _ZEROS, _QuantModule


class LearnableQuantLinear(_QuantModule):
    """``nnx.Linear`` with learnable qparams (``config.grad`` ``"lsq"`` or ``"pact"``).

    Params: ``kernel``, ``bias`` and ``qparams`` (``{"input"|"weight"|"output":
    {"scale", "zero_point"} or {"alpha"}}``); observer statistics in ``quant_stats``
    (:class:`~qjax.flax.nnx.QuantStat`). Calibrate (``Mode.CALIBRATE`` or
    :func:`qjax.flax.nnx.calibrate`), call :func:`init_qparams_from_stats`, then train
    in ``Mode.QAT``: the fake-quant uses the parameters.

    >>> from qjax.flax import qjax_recommended
    >>> from qjax.flax.nnx import init_qparams_from_stats
    >>> cfg = qjax_recommended().replace(grad="lsq")
    >>> layer = LearnableQuantLinear(3, 2, config=cfg, mode=Mode.CALIBRATE, rngs=nnx.Rngs(0))
    >>> _ = layer(jnp.ones((4, 3)))
    >>> init_qparams_from_stats(layer)
    ['<root>']
    >>> sorted(layer.qparams.get_value()["input"])
    ['scale', 'zero_point']
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
        name: str = "LearnableQuantLinear",
    ):
        _learnable.check_learnable(config, name)
        kshape = (in_features, out_features)
        self.kernel = nnx.Param(kernel_init(rngs.params(), kshape, jnp.float32))
        self.bias = nnx.data(
            nnx.Param(bias_init(rngs.params(), (out_features,), jnp.float32)) if use_bias else None
        )
        params, stats = _learnable.init_learnable_params(config, kshape)
        self.qparams = nnx.Param(params)
        self._setup(config, mode, stats, name)

    def __call__(self, x):
        args = (self.config, self.mode, self.switches)
        params = self.qparams.get_value()
        y, st = _learnable.learnable_op(
            lax.dot_general,
            *_core.promote_operands(x, self.kernel[...], self.name),
            params,
            self.quant_stats.get_value(),
            *args,
            name=self.name,
            dimension_numbers=(((x.ndim - 1,), (0,)), ((), ())),
        )
        if self.bias is not None:
            y = y + self.bias[...].astype(y.dtype)
        y, st = _learnable.learnable_output(y, params, st, *args, name=self.name)
        self.quant_stats.set_value(st)
        return y
