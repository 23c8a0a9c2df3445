"""Which int32 dot/conv kernel a model-level call prepares each layer with.

Model-level calls (``qjax.convert``, ``qjax.load_served``,
``qjax.converters.torch.import_model``, ``qjax.converters.pt2e.import_pt2e``) take
``kernel``:

==========  ==========================================================================
``kernel``  each linear / conv layer runs on
==========  ==========================================================================
``None``    the default, per layer: exactly accumulated layers on XLA, saturating
            layers on the native AVX2 ``"sat16"`` kernel when
            :func:`qjax.kernels.sat16_status` says available (else XLA)
``"xla"``   XLA's ``dot_general`` / convolution for every layer: a pure-XLA,
            ``jax.export``-able program
``"amx"``   the native AMX kernel (:func:`qjax.kernels.native_status`) where it supports
            the layer, saturating layers as under ``None``, XLA elsewhere;
            ``RuntimeError`` with the reason when the AMX kernel cannot run on this
            machine
``"auto"``  as ``"amx"`` when :func:`qjax.kernels.native_status` says available, else
            as ``None`` (never raises for availability)
==========  ==========================================================================

The AMX kernel supports linear layers and 2-D convolutions with ``groups=1`` and
dilation 1, accumulated exactly; grouped / depthwise / dilated / 1-D convolutions keep
XLA. The saturating layers (``fbgemm_sat16`` / ``onednn_sat16``: engines at CPU levels
without VNNI, FBGEMM's depthwise 3x3 fast path) run on the ``"sat16"`` kernel, which
computes the int16 pair saturation with the instruction FBGEMM/oneDNN use
(``vpmaddubsw``), 100x and more faster than its XLA formulation. The codes are the same
either way; the models record the choice per layer (``served.kernels``,
``program.kernels``: ``"xla"``, ``"amx"`` or ``"sat16"``). A program with native layers
cannot be ``jax.export``-ed (the custom call is refused; the sat16 call's location says
to use ``kernel='xla'``). Only ``qjax.converters.torch.import_model`` defaults to
``None`` (only torch engines saturate); the other model-level calls keep ``"xla"``.
"""

from __future__ import annotations

import jax

from . import PreparedConv, PreparedLinear, _native

_SATURATING = ("fbgemm_sat16", "onednn_sat16")

__all__ = ["KERNEL_CHOICES", "conv_kernel", "kernels_of", "linear_kernel", "resolve_kernel"]

KERNEL_CHOICES = (None, "xla", "amx", "auto")


def resolve_kernel(kernel: str | None, where: str) -> str:
    """The model-wide wish, ``"amx"``, ``"xla"`` or ``"default"``, for ``kernel`` asked of
    ``where`` (``None`` gives ``"default"``: XLA for exact layers, native sat16 for
    saturating ones).

    Raises ``ValueError`` for an unknown name and ``RuntimeError`` (naming ``where`` and
    :func:`qjax.kernels.native_status`'s reason) for ``"amx"`` when the native kernel is
    unavailable; ``"auto"`` gives ``"amx"`` exactly when it is available.

    >>> resolve_kernel("xla", "qjax.convert"), resolve_kernel(None, "qjax.convert")
    ('xla', 'default')
    >>> ok = _native.native_status()[0]
    >>> resolve_kernel("auto", "qjax.convert") == ("amx" if ok else "default")
    True
    >>> resolve_kernel("tpu", "qjax.convert")
    Traceback (most recent call last):
      ...
    ValueError: qjax.convert: kernel must be one of (None, 'xla', 'amx', 'auto'), got 'tpu'
    """
    if kernel not in KERNEL_CHOICES:
        raise ValueError(f"{where}: kernel must be one of {KERNEL_CHOICES}, got {kernel!r}")
    if kernel is None:
        return "default"
    if kernel == "xla":
        return "xla"
    # looked up on the module at each call: the kernels' own check reads the same function
    ok, reason = _native.native_status()
    if kernel == "auto":
        return "amx" if ok else "default"
    if not ok:
        raise RuntimeError(
            f"{where}(kernel='amx'): the native AMX kernel is unavailable on this machine: "
            f"{reason}; use kernel='xla', or kernel='auto' to take AMX only where it runs"
        )
    return "amx"


def _saturating_kernel(wish: str) -> str:
    """``"sat16"`` unless ``wish`` is ``"xla"`` or the native AVX2 kernel cannot run."""
    return "sat16" if wish != "xla" and _native.sat16_status()[0] else "xla"


def linear_kernel(wish: str, accumulate: str = "exact") -> str:
    """The kernel a linear layer gets: for exact accumulation ``"amx"`` when wished, else
    ``"xla"``; with int16 pair saturation (``fbgemm_sat16`` / ``onednn_sat16``) the native
    ``"sat16"`` kernel unless ``wish`` is ``"xla"`` or it is unavailable.

    >>> linear_kernel("amx"), linear_kernel("xla", "fbgemm_sat16"), linear_kernel("default")
    ('amx', 'xla', 'xla')
    >>> sat = "sat16" if _native.sat16_status()[0] else "xla"
    >>> linear_kernel("default", "fbgemm_sat16") == linear_kernel("amx", "onednn_sat16") == sat
    True
    """
    if accumulate in _SATURATING:
        return _saturating_kernel(wish)
    return "amx" if wish == "amx" and accumulate == "exact" else "xla"


def conv_kernel(wish: str, nsp: int, groups: int = 1, dilation=1, accumulate: str = "exact") -> str:
    """The kernel a convolution gets: ``"amx"`` when wished for 2-D (``nsp=2``),
    ``groups=1``, dilation 1, exact accumulation; saturating convolutions (any shape) as
    in :func:`linear_kernel`; ``"xla"`` otherwise.

    >>> conv_kernel("amx", 2), conv_kernel("amx", 2, groups=8), conv_kernel("amx", 1)
    ('amx', 'xla', 'xla')
    >>> conv_kernel("amx", 2, dilation=(2, 2)), conv_kernel("amx", 2, dilation=(1, 1))
    ('xla', 'amx')
    >>> conv_kernel("xla", 2, groups=8, accumulate="fbgemm_sat16")
    'xla'
    """
    if accumulate in _SATURATING:
        return _saturating_kernel(wish)
    ok = _native.conv_supported(nsp, groups, dilation) and accumulate == "exact"
    return "amx" if wish == "amx" and ok else "xla"


def _is_prepared(v) -> bool:
    return isinstance(v, (PreparedLinear, PreparedConv))


def kernels_of(named_params) -> dict[str, str]:
    """``{name: "amx" | "sat16" | "xla"}`` for each entry of ``{name: params pytree}`` holding a
    prepared weight (:class:`~qjax.kernels.PreparedLinear` /
    :class:`~qjax.kernels.PreparedConv`), in the mapping's order.

    >>> import jax.numpy as jnp
    >>> from qjax import QArray, QParams, QuantSpec
    >>> from qjax.kernels import prepare_linear
    >>> w = QArray(jnp.ones((2, 2), jnp.int8), QParams(0.1, 0, QuantSpec(symmetric=True)))
    >>> kernels_of({"fc": {"w": prepare_linear(w), "b": None}, "relu": None})
    {'fc': 'xla'}
    """
    out = {}
    for name, params in named_params.items():
        leaves = jax.tree_util.tree_leaves(params, is_leaf=_is_prepared)
        prepared = [v for v in leaves if _is_prepared(v)]
        if prepared:
            out[name] = prepared[0].kernel
    return out
