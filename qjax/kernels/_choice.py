"""Which int32 dot/conv kernel a model-level call prepares each layer with.

Model-level calls (``qjax.convert``, ``qjax.load_served``,
``qjax.converters.torch.import_model``, ``qjax.converters.pt2e.import_pt2e``) take
``kernel``:

==========  ==========================================================================
``kernel``  each linear / conv layer runs on
==========  ==========================================================================
``None``    the default, per layer: exactly accumulated layers on XLA (on CPUs below
            VNNI, the layers ``"auto"`` puts on ``"sat16"``), saturating layers on the
            native ``"sat16"`` kernel
            (AVX2 / AVX-512) when :func:`qjax.kernels.sat16_status` says available
            (else XLA)
``"xla"``   XLA's ``dot_general`` / convolution for every layer: a pure-XLA,
            ``jax.export``-able program
``"amx"``   the native AMX kernel (:func:`qjax.kernels.native_status`) where it supports
            the layer, saturating layers as under ``None``, XLA elsewhere;
            ``RuntimeError`` with the reason when the AMX kernel cannot run on this
            machine
``"onednn"`` oneDNN's int8 kernels (the brgemm ukernel in torch's CPU wheel, or the
            optional PyPI library, :func:`qjax.kernels.onednn_status`) for exactly
            accumulated linear layers, and on the ukernel for exactly accumulated 1-D/2-D
            convolutions (any groups, depthwise included, stride, padding, dilation),
            where it is exact on this CPU (VNNI or AMX, :func:`qjax.kernels.onednn_exact`;
            without VNNI torch refuses the ukernel and the layers stay on XLA);
            saturating layers as under ``None``; ``RuntimeError`` with the reason when
            the library is not installed or does not load
``"auto"``  per layer the fastest exact kernel measured here: AMX where
            :func:`qjax.kernels.native_status` says available (linear layers and the
            convolutions it supports), else oneDNN where
            :func:`qjax.kernels.onednn_exact` says so (linear layers, and convolutions
            on the ukernel: measured faster than XLA for every conv shape tried, the
            depthwise one included); without either (CPUs below VNNI: oneDNN
            refuses, XLA's int8 dot is slow) on ``"sat16"`` (:func:`exact_on_sat16`)
            exactly accumulated convolutions with one group reading unsigned codes
            and linear layers: its saturating instructions where the int16 pair sums
            provably cannot saturate (7-bit activations, torch's ``reduce_range``,
            with any int8 weight; 8-bit ones where the weight's pairs are small
            enough), else its exact mode (the codes widened to int16 pairs; linear
            layers only on its AVX-512 code), the same integers; the rest as under
            ``None`` (never raises for availability)
==========  ==========================================================================

The AMX kernel supports linear layers and 2-D convolutions with ``groups=1`` and
dilation 1, accumulated exactly; on AMX machines grouped / depthwise / dilated / 1-D
convolutions keep XLA under ``"auto"``. The saturating layers (``fbgemm_sat16`` /
``onednn_sat16``: engines at CPU levels without VNNI, FBGEMM's depthwise 3x3 fast
path) run on the ``"sat16"`` kernel, which computes the int16 pair saturation with the
instruction FBGEMM/oneDNN use (``vpmaddubsw``), 100x and more faster than its XLA
formulation. Exact layers on ``"sat16"`` (below VNNI) are convolutions with one group
reading unsigned codes and linear layers (with the kernel's AVX2 code only those whose
pair sums cannot saturate; each call picks the saturating instructions where the
activation spec proves them exact, the exact widened mode otherwise), and only where
the caller passes the activation spec and the weight codes to :func:`linear_kernel` /
:func:`conv_kernel`:
``qjax.convert`` does (the layer's input quantizer's spec, else
that of the codes it reads), and so does ``qjax.load_served`` for a Flax program file
(the spec of the codes each layer reads, from the file's steps: the same kernels);
the torch / pt2e importers do not, as torch's activation codes are not bounded by
``reduce_range``'s 127 (its quantize clamps quint8 to ``[0, 255]``: a spec could not
choose the instructions), so their exact layers stay on XLA. The codes are the same
either way; the models record the choice per layer (``served.kernels``,
``program.kernels``: ``"xla"``, ``"amx"``, ``"onednn"`` or ``"sat16"``). A program whose layers
are wished native (``"amx"``, ``"onednn"``, ``"auto"``) also quantizes its float input
with the native FMA call where it runs (:func:`quantize_kernel`; torch's per-tensor
rule 1, the same codes as XLA's float64 emulation of the fma, a sixth of its time; the
choice is the program's, saved files do not record it). A program with
native layers cannot be ``jax.export``-ed (the custom call is refused; the sat16 and
oneDNN calls' locations say to use ``kernel='xla'``). Only
``qjax.converters.torch.import_model`` defaults to ``None`` (only torch engines
saturate); the other model-level calls keep ``"xla"``.
"""

from __future__ import annotations

import jax

from . import PreparedConv, PreparedLinear, _native
from ._accumulate import sat16_exact, sat16_exact_max_x

_SATURATING = ("fbgemm_sat16", "onednn_sat16")

__all__ = [
    "KERNEL_CHOICES",
    "conv_kernel",
    "exact_on_sat16",
    "kernels_of",
    "linear_kernel",
    "quantize_kernel",
    "resolve_kernel",
]

KERNEL_CHOICES = (None, "xla", "amx", "onednn", "auto")


def resolve_kernel(kernel: str | None, where: str) -> str:
    """The model-wide wish, ``"xla"``, ``"default"``, ``"amx"``, ``"onednn"`` or
    ``"auto"``, for ``kernel`` asked of ``where`` (``None`` gives ``"default"``: XLA for
    exact layers, native sat16 for saturating ones); :func:`linear_kernel` and
    :func:`conv_kernel` turn it into each layer's kernel.

    Raises ``ValueError`` for an unknown name and ``RuntimeError`` (naming ``where`` and
    the reason) for ``"amx"`` when the native kernel is unavailable
    (:func:`qjax.kernels.native_status`) and for ``"onednn"`` when the optional library
    is not installed or does not load (:func:`qjax.kernels.onednn_status`).

    >>> resolve_kernel("xla", "qjax.convert"), resolve_kernel(None, "qjax.convert")
    ('xla', 'default')
    >>> resolve_kernel("auto", "qjax.convert")
    'auto'
    >>> resolve_kernel("tpu", "qjax.convert")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
      ...
    ValueError: qjax.convert: kernel must be one of (None, 'xla', ..., 'auto'), got 'tpu'
    """
    if kernel not in KERNEL_CHOICES:
        raise ValueError(f"{where}: kernel must be one of {KERNEL_CHOICES}, got {kernel!r}")
    if kernel is None:
        return "default"
    if kernel in ("xla", "auto"):
        return kernel
    # looked up on the module at each call: the kernels' own check reads the same function
    if kernel == "onednn":
        ok, reason = _native.onednn_status()
        what = "the optional oneDNN library"
    else:
        ok, reason = _native.native_status()
        what = "the native AMX kernel"
    if not ok:
        raise RuntimeError(
            f"{where}(kernel={kernel!r}): {what} is unavailable on this machine: "
            f"{reason}; use kernel='xla', or kernel='auto' to take a native kernel only "
            "where it runs"
        )
    return kernel


def _saturating_kernel(wish: str) -> str:
    """``"sat16"`` unless ``wish`` is ``"xla"`` or the native sat16 kernel cannot run."""
    return "sat16" if wish != "xla" and _native.sat16_status()[0] else "xla"


def quantize_kernel(wish: str, accumulate: str = "exact") -> str:
    """The kernel of a program's boundary quantize and dequantize
    (:func:`qjax.kernels.quantize_input`, :func:`qjax.kernels.dequantize_output`) and of
    its ops on codes that have a native call (max pool, ReLU): ``"auto"`` (the native
    calls where they run) when the program's layers are wished native (``"amx"``,
    ``"onednn"``, ``"auto"``) or its linear layers saturate (``accumulate``
    ``"fbgemm_sat16"`` / ``"onednn_sat16"``) on the native sat16 kernel
    (:func:`linear_kernel`: any wish but ``"xla"``; such a program is not
    ``jax.export``-able anyway), else ``"xla"`` (``"xla"`` and the default keep exactly
    accumulated programs pure XLA, ``jax.export``-able).

    >>> quantize_kernel("onednn"), quantize_kernel("auto"), quantize_kernel("xla")
    ('auto', 'auto', 'xla')
    >>> quantize_kernel("default") == quantize_kernel("xla", "fbgemm_sat16") == "xla"
    True
    >>> sat = linear_kernel("default", "fbgemm_sat16") == "sat16"  # the kernel runs here
    >>> quantize_kernel("default", "fbgemm_sat16") == ("auto" if sat else "xla")
    True
    """
    if wish in ("amx", "onednn", "auto"):
        return "auto"
    native = accumulate in _SATURATING and linear_kernel(wish, accumulate) == "sat16"
    return "auto" if native else "xla"


def linear_kernel(wish: str, accumulate: str = "exact", x_spec=None, w=None) -> str:
    """The kernel a linear layer gets. Exact accumulation: ``"amx"`` when wished
    (``"amx"``, or ``"auto"`` where the AMX kernel is available), ``"onednn"`` when wished
    (``"onednn"``, or ``"auto"`` without AMX) and :func:`qjax.kernels.onednn_exact` says
    its integers are exact here; else, for ``"auto"`` and ``"default"`` (no exact native
    kernel here: a CPU below VNNI), ``"sat16"`` as :func:`exact_on_sat16` says (needs
    the activation spec ``x_spec`` and the int8 weight codes ``w``, ``(K, N)``); else
    ``"xla"``. With int16 pair saturation
    (``fbgemm_sat16`` / ``onednn_sat16``) the native ``"sat16"`` kernel unless ``wish``
    is ``"xla"`` or it is unavailable.

    >>> linear_kernel("amx"), linear_kernel("xla", "fbgemm_sat16"), linear_kernel("default")
    ('amx', 'xla', 'xla')
    >>> sat = "sat16" if _native.sat16_status()[0] else "xla"
    >>> linear_kernel("default", "fbgemm_sat16") == linear_kernel("amx", "onednn_sat16") == sat
    True
    >>> linear_kernel("onednn") == ("onednn" if _native.onednn_exact()[0] else "xla")
    True
    """
    if accumulate in _SATURATING:
        return _saturating_kernel(wish)
    if accumulate != "exact":
        return "xla"
    if wish == "auto" and _native.native_status()[0]:
        # AMX machines keep qjax's AMX kernel under "auto": it is the one measured there
        # (oneDNN's ukernel has not been run against it on an AMX machine yet)
        return "amx"
    if wish in ("onednn", "auto") and _native.onednn_exact()[0]:
        return "onednn"
    if wish == "amx":
        return "amx"
    return "sat16" if exact_on_sat16(wish, x_spec, w) else "xla"


def exact_on_sat16(wish: str, x_spec, w, widened: bool | None = None) -> bool:
    """Whether an exactly accumulated layer runs on the native ``"sat16"`` kernel:
    ``wish`` is ``"auto"`` or ``"default"``, neither the AMX kernel
    (:func:`qjax.kernels.native_status`) nor an exact oneDNN kernel
    (:func:`qjax.kernels.onednn_exact`) runs here (CPUs below VNNI), the sat16 kernel
    does (:func:`qjax.kernels.sat16_status`), the codes' spec ``x_spec`` and the weight
    codes ``w`` are known, and its saturating instructions are exact: the largest uint8
    code the activations feed the kernel
    (:func:`~qjax.kernels._prepared.sat16_exact_codes`) is at most
    :func:`~qjax.kernels._accumulate.sat16_exact_max_x` of ``w`` (a linear layer's
    ``(K, N)``; of a conv's ``HWIO`` / ``WIO`` codes
    :func:`~qjax.kernels._accumulate.sat16_conv_max_x`, both pairings; any int8 weight
    with 7-bit activations) -- or, beyond that bound, the kernel's exact mode (the codes
    widened to int16 pairs) may run (``widened``): :func:`conv_kernel` says so for its
    convolutions (a CNN measured 1.1-1.7x XLA's int8 program with the kernel's AVX2
    code, 1.8-3.1x with its AVX-512 code); ``None`` (linear layers): where the kernel
    runs its AVX-512 code (:func:`~qjax.kernels._native._sat16.sat16_isa`; an MLP
    1.0-1.3x XLA's int8 dot at batch 256, faster below), not with its AVX2 code
    (0.6-0.7x at batch 256; ``benchmarks/int8_sat16.py``, table 4). Unknown ``x_spec``
    or ``w``: ``False``.

    >>> from qjax import QuantSpec
    >>> exact_on_sat16("xla", QuantSpec(signed=False, reduce_range=True), None)
    False
    """
    if wish not in ("auto", "default") or x_spec is None or w is None:
        return False
    if _native.native_status()[0] or _native.onednn_exact()[0]:
        return False
    if not _native.sat16_status()[0]:
        return False
    if widened is None:
        widened = _native._sat16.sat16_isa() != "avx2"
    if widened:
        return True  # exact either way: saturating instructions where they are
    return sat16_exact(x_spec, sat16_exact_max_x(w))


def conv_kernel(
    wish: str,
    nsp: int,
    groups: int = 1,
    dilation=1,
    accumulate: str = "exact",
    x_spec=None,
    w=None,
) -> str:
    """The kernel a convolution gets, exact accumulation: ``"amx"`` when wished (``"amx"``,
    or ``"auto"`` with AMX available) for 2-D (``nsp=2``), ``groups=1``, dilation 1;
    else ``"onednn"`` when wished (``"onednn"``, or ``"auto"``) for 1-D and 2-D
    convolutions of any groups (depthwise included), stride, padding and dilation, where
    oneDNN's brgemm ukernel is the provider and exact here
    (:func:`qjax.kernels.onednn_exact`, :func:`qjax.kernels._native.onednn_fused`; the
    PyPI matmul provider has no convolution); else (no exact native kernel here: a CPU
    below VNNI), for ``"auto"`` and ``"default"``, ``"sat16"`` for a convolution with one
    group reading unsigned codes (:func:`exact_on_sat16` with the activation spec
    ``x_spec`` and the int8 ``HWIO`` / ``WIO`` weight codes ``w``); saturating
    convolutions (any shape) as in :func:`linear_kernel`; ``"xla"`` otherwise.

    >>> conv_kernel("amx", 2), conv_kernel("amx", 2, groups=8), conv_kernel("amx", 1)
    ('amx', 'xla', 'xla')
    >>> conv_kernel("amx", 2, dilation=(2, 2)), conv_kernel("amx", 2, dilation=(1, 1))
    ('xla', 'amx')
    >>> conv_kernel("xla", 2, groups=8, accumulate="fbgemm_sat16")
    'xla'
    >>> uk = _native.onednn_exact()[0] and _native.onednn_fused()
    >>> conv_kernel("onednn", 2, groups=8, dilation=2) == ("onednn" if uk else "xla")
    True
    """
    if accumulate in _SATURATING:
        return _saturating_kernel(wish)
    if accumulate != "exact":
        return "xla"
    amx = wish == "amx" or (wish == "auto" and _native.native_status()[0])
    if amx and _native.conv_supported(nsp, groups, dilation):
        return "amx"
    if wish == "auto" and _native.native_status()[0]:
        return "xla"  # AMX machines: the convs the AMX kernel leaves stay as measured there
    if wish in ("onednn", "auto") and nsp in (1, 2) and _onednn_conv_ok():
        return "onednn"
    if groups == 1 and x_spec is not None and not x_spec.signed and w is not None:
        return "sat16" if exact_on_sat16(wish, x_spec, w, widened=True) else "xla"
    return "xla"


def _onednn_conv_ok() -> bool:
    return _native.onednn_exact()[0] and _native.onednn_fused()


def _is_prepared(v) -> bool:
    return isinstance(v, (PreparedLinear, PreparedConv))


def kernels_of(named_params) -> dict[str, str]:
    """``{name: "amx" | "onednn" | "sat16" | "xla"}`` for each entry of ``{name: params
    pytree}`` holding a prepared weight (:class:`~qjax.kernels.PreparedLinear` /
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
