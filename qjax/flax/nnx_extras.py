"""More ``flax.nnx`` layers over the functional cores: PTQ, learnable qparams, add/cat.

Re-exported by :mod:`qjax.flax.nnx`. Same numbers as the Linen layers of
:mod:`qjax.flax.linen_extras` from the same weights.

- :class:`DynamicQuantLinear`: int8 weights, activations quantized per call from their
  own range, int8 engine (PyTorch's ``quantize_dynamic``; :mod:`qjax.flax._ptq`).
- :class:`WeightOnlyLinear`: int8 or packed int4 weights (per-channel or per-group
  scales), ``x @ dequantize(w)`` in float.
- :class:`LearnableQuantLinear`: LSQ / PACT qparams as ``nnx.Param``
  (:mod:`qjax.flax._learnable`); :func:`init_qparams_from_stats` after calibration.
- :class:`QuantAdd`, :class:`QuantCat`: one observer and fake-quant on the result
  (PyTorch's ``FloatFunctional`` under QAT).
- :func:`check_statistics`: non-finite observer ranges, by module path
  (:mod:`qjax.flax._health`).

Quantized weights are :class:`QuantWeight` variables: not parameters (the optimizer
never sees them) and not statistics.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx
from jax import lax

from . import _core, _health, _learnable, _ptq
from ._config import Mode, QuantConfig
from .nnx import ActQuant, QuantStat, _path_str, _QuantModule

__all__ = [
    "DynamicQuantLinear",
    "LearnableQuantLinear",
    "QuantAdd",
    "QuantCat",
    "QuantWeight",
    "WeightOnlyLinear",
    "check_statistics",
    "init_qparams_from_stats",
]

_LECUN_NORMAL = nnx.initializers.lecun_normal()
_ZEROS = nnx.initializers.zeros_init()


class QuantWeight(nnx.Variable):
    """Quantized (frozen) weights: integer codes, scales, float bias of a PTQ layer."""


class DynamicQuantLinear(nnx.Module):
    """Dynamically quantized linear layer (torch ``quantize_dynamic`` for ``Linear``).

    Built from a float ``(in, out)`` kernel (and bias): the kernel is quantized once with
    ``weight_spec``/``compat`` (default int8 symmetric per output channel, torch's
    ``/127.5`` rule); each call quantizes ``x`` from its own min/max
    (:func:`qjax.flax._ptq.dynamic_linear`) and runs an int8 x int8 -> int32 dot.
    :meth:`from_linear` converts an ``nnx.Linear`` or :class:`~qjax.flax.nnx.QuantLinear`.

    >>> layer = DynamicQuantLinear(jnp.array([[1.0, -1.0], [0.5, 0.0]]), jnp.zeros(2))
    >>> layer(jnp.array([[2.0, 1.0]]))
    Array([[ 2.4980702, -1.992157 ]], dtype=float32)
    """

    def __init__(
        self,
        kernel: jax.Array,
        bias: jax.Array | None = None,
        *,
        weight_spec=_ptq.DYNAMIC_WEIGHT,
        compat="torch",
        act_spec=_ptq.DYNAMIC_ACTIVATION,
        act_compat="torch_fused",
        name: str = "DynamicQuantLinear",
    ):
        pw = _ptq.prepare_dynamic_weight(kernel, weight_spec, compat, name=name)
        self.weight = QuantWeight(pw)
        self.bias = nnx.data(None if bias is None else QuantWeight(jnp.asarray(bias, jnp.float32)))
        self.act_spec = act_spec
        self.act_compat = act_compat

    @classmethod
    def from_linear(cls, linear, **kwargs) -> DynamicQuantLinear:
        """From a trained ``nnx.Linear`` (or anything with ``kernel`` and ``bias``)."""
        bias = None if getattr(linear, "bias", None) is None else linear.bias[...]
        return cls(linear.kernel[...], bias, **kwargs)

    def __call__(self, x):
        bias = None if self.bias is None else self.bias[...]
        return _ptq.dynamic_linear(
            x, self.weight.get_value(), bias, act_spec=self.act_spec, compat=self.act_compat
        )


class WeightOnlyLinear(nnx.Module):
    """Linear layer with weight-only quantized storage: int8 codes, or int4 codes packed
    two per byte (:func:`~qjax.flax._ptq.pack_int4`), plus scales (per output channel,
    or per group of ``in`` rows with a per-group ``spec``); computes
    ``x @ dequantize(w) + b`` in float. ``nbytes`` is the stored weight size.

    >>> k = jnp.ones((8, 4))
    >>> layer = WeightOnlyLinear(k)                      # int4 per channel
    >>> layer.nbytes, k.nbytes                           # 16 B codes + 32 B qparams
    (48, 128)
    >>> layer(jnp.ones((1, 8)))
    Array([[8., 8., 8., 8.]], dtype=float32)
    """

    def __init__(
        self,
        kernel: jax.Array,
        bias: jax.Array | None = None,
        *,
        spec=_ptq.INT4_WEIGHT,
        compat="qjax",
        name: str = "WeightOnlyLinear",
    ):
        self.weight = QuantWeight(_ptq.pack_weight(kernel, spec, compat, name=name))
        self.bias = nnx.data(None if bias is None else QuantWeight(jnp.asarray(bias, jnp.float32)))
        self.spec = spec

    @classmethod
    def from_linear(cls, linear, **kwargs) -> WeightOnlyLinear:
        """From a trained ``nnx.Linear`` (or anything with ``kernel`` and ``bias``)."""
        bias = None if getattr(linear, "bias", None) is None else linear.bias[...]
        return cls(linear.kernel[...], bias, **kwargs)

    @property
    def nbytes(self) -> int:
        """Bytes of the stored weight (codes + scales + zero points), without the bias."""
        return self.weight.get_value().nbytes

    def __call__(self, x):
        bias = None if self.bias is None else self.bias[...]
        return _ptq.weight_only_linear(x, self.weight.get_value(), self.spec, bias)


class LearnableQuantLinear(_QuantModule):
    """``nnx.Linear`` with learnable qparams (``config.grad`` ``"lsq"`` or ``"pact"``).

    Params: ``kernel``, ``bias`` and ``qparams`` (``{"input"|"weight"|"output":
    {"scale", "zero_point"} or {"alpha"}}``); observer statistics in ``quant_stats``
    (:class:`~qjax.flax.nnx.QuantStat`). Calibrate (``Mode.CALIBRATE`` or
    :func:`qjax.flax.nnx.calibrate`), call :func:`init_qparams_from_stats`, then train
    in ``Mode.QAT``: the fake-quant uses the parameters.

    >>> from qjax.flax import qjax_recommended
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


class QuantAdd(ActQuant):
    """``a + b`` with one observer and fake-quant on the sum (torch
    ``FloatFunctional.add`` under QAT): :class:`~qjax.flax.nnx.ActQuant` of the sum.

    >>> from qjax.flax import Mode, qjax_recommended
    >>> add = QuantAdd(qjax_recommended(), mode=Mode.CALIBRATE)
    >>> _ = add(jnp.array([1.0, -2.0]), jnp.array([0.5, 0.5]))
    >>> float(add.quant_stats.get_value().min_val)
    -1.5
    """

    def __init__(self, config, *, mode=Mode.QAT, name="QuantAdd"):
        super().__init__(config, mode=mode, name=name)

    def __call__(self, a, b):
        return super().__call__(jnp.add(a, b))


class QuantCat(ActQuant):
    """``concatenate(xs, axis)`` with one observer and fake-quant on the result (torch
    ``FloatFunctional.cat`` under QAT), so every input ends up on one output range.

    >>> from qjax.flax import Mode, qjax_recommended
    >>> cat = QuantCat(qjax_recommended(), mode=Mode.CALIBRATE)
    >>> cat([jnp.zeros((1, 2)), jnp.ones((1, 3))], axis=-1).shape
    (1, 5)
    """

    def __init__(self, config, *, mode=Mode.QAT, name="QuantCat"):
        super().__init__(config, mode=mode, name=name)

    def __call__(self, xs: Sequence[jax.Array], axis: int = -1):
        xs = list(xs)
        if not xs:
            raise ValueError(f"{self.name}: nothing to concatenate")
        return super().__call__(jnp.concatenate(xs, axis=axis))


def init_qparams_from_stats(model: nnx.Module) -> list[str]:
    """Copy the observers' qparams into the learnable ``qparams`` of every
    :class:`LearnableQuantLinear` of ``model`` (after calibration); returns their paths.

    Checks first (:func:`check_statistics`): observers that never saw data, or hold
    non-finite ranges, raise ``ValueError`` naming the module path.

    >>> from qjax.flax import qjax_recommended
    >>> layer = LearnableQuantLinear(
    ...     2, 2, config=qjax_recommended().replace(grad="pact"), rngs=nnx.Rngs(0))
    >>> init_qparams_from_stats(layer)  # doctest: +ELLIPSIS
    Traceback (most recent call last):
      ...
    ValueError: init_qparams_from_stats: <root>: observers ['input', 'weight'] never saw data; ...
    """
    done = []
    for path, m in nnx.iter_modules(model):
        if isinstance(m, LearnableQuantLinear):
            p = _path_str(path)
            st = m.quant_stats.get_value()
            never = [k for k, v in st.layer._asdict().items() if v is not None and not int(v.count)]
            if never:
                raise ValueError(
                    f"init_qparams_from_stats: {p}: observers {never} never saw data; run the "
                    "model in Mode.CALIBRATE first"
                )
            _health.check_statistics(st.layer, where="init_qparams_from_stats", prefix=p)
            m.qparams.set_value(jax.tree.map(jnp.asarray, st.init))
            done.append(p)
    if not done:
        raise ValueError("init_qparams_from_stats: the model has no LearnableQuantLinear")
    return done


def check_statistics(model: nnx.Module, *, where: str = "check_statistics") -> None:
    """Raise ``ValueError`` naming the module paths whose observer ranges are not finite
    (with the fix); warn about NaN/inf inputs the observers ignored.

    >>> from qjax.flax import nnx as qn, qjax_recommended
    >>> layer = qn.QuantLinear(2, 2, config=qjax_recommended(), rngs=nnx.Rngs(0))
    >>> check_statistics(layer)  # fresh statistics are empty, not broken
    """
    _health.check_statistics(nnx.state(model, QuantStat), where=where)
