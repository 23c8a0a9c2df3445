"""ATen ops of a pt2e graph as float JAX functions (torch's argument conventions).

Every op the pt2e importer runs in float — all of them in ``mode="reference"``, the ones
between a dequantize and a quantize that have no integer kernel in ``mode="integer"`` —
is one entry of :data:`FLOAT_OPS`: ``fn(*args, **kwargs)`` with ATen's positional
arguments, tensors as float32 ``jax.Array``. Elementwise ops, data movement, max and
concatenation compute what torch computes bit for bit (one IEEE float32 operation per
element); reductions (conv, linear, matmul, mean, pooling sums, norms) and
transcendental functions (gelu, softmax, sigmoid, ...) agree with torch up to float32
summation order and libm differences.
"""

from __future__ import annotations

import math
import operator

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

__all__ = ["FLOAT_OPS", "MOVEMENT_OPS"]

_HI = lax.Precision.HIGHEST


def _ntuple(v, n):
    if isinstance(v, (int, np.integer)):
        return (int(v),) * n
    v = tuple(int(a) for a in v)
    return v * n if len(v) == 1 else v


def _conv(x, w, b=None, stride=1, padding=0, dilation=1, groups=1):
    nsp = x.ndim - 2
    stride, dilation = _ntuple(stride, nsp), _ntuple(dilation, nsp)
    if isinstance(padding, str):
        pads = padding.upper()
    else:
        pads = [(p, p) for p in _ntuple(padding, nsp)]
    sp = "HW"[-nsp:] if nsp <= 2 else "DHW"
    y = lax.conv_general_dilated(
        x,
        w,
        stride,
        pads,
        rhs_dilation=dilation,
        dimension_numbers=("NC" + sp, "OI" + sp, "NC" + sp),
        feature_group_count=int(groups),
        precision=_HI,
    )
    if b is not None:
        y = y + b.reshape((1, -1) + (1,) * nsp)
    return y


def _convolution(x, w, b, stride, padding, dilation, transposed, output_padding, groups):
    if transposed:
        raise ValueError("transposed convolution is not supported")
    return _conv(x, w, b, stride, padding, dilation, groups)


def _linear(x, w, b=None):
    y = jnp.matmul(x, w.T, precision=_HI)
    return y if b is None else y + b


def _addmm(b, x, w, beta=1, alpha=1):
    y = jnp.matmul(x, w, precision=_HI)
    if alpha != 1:
        y = y * alpha
    return y + (b if beta == 1 else b * beta)


def _window_pads(n, k, s, p, d, ceil_mode):
    num = n + 2 * p - d * (k - 1) - 1 + ((s - 1) if ceil_mode else 0)
    o = num // s + 1
    if ceil_mode and (o - 1) * s >= n + p:
        o -= 1
    return o, (p, max((o - 1) * s + d * (k - 1) + 1 - n - p, 0))


def _max_pool2d(x, kernel_size, stride=(), padding=0, dilation=1, ceil_mode=False):
    k = _ntuple(kernel_size, 2)
    s = _ntuple(stride, 2) if stride not in ((), [], None) else k
    p, d = _ntuple(padding, 2), _ntuple(dilation, 2)
    pads = [(0, 0), (0, 0)] + [
        _window_pads(x.shape[2 + i], k[i], s[i], p[i], d[i], ceil_mode)[1] for i in range(2)
    ]
    return lax.reduce_window(
        x, -jnp.inf, lax.max, (1, 1) + k, (1, 1) + s, pads, window_dilation=(1, 1) + d
    )


def _max_pool2d_with_indices(x, *args):
    return (_max_pool2d(x, *args), None)


def _avg_pool2d(
    x,
    kernel_size,
    stride=(),
    padding=0,
    ceil_mode=False,
    count_include_pad=True,
    divisor_override=None,
):
    k = _ntuple(kernel_size, 2)
    s = _ntuple(stride, 2) if stride not in ((), [], None) else k
    p = _ntuple(padding, 2)
    outs, pads, divs = [], [(0, 0), (0, 0)], []
    for i in range(2):
        n = x.shape[2 + i]
        o, pad = _window_pads(n, k[i], s[i], p[i], 1, ceil_mode)
        start = np.arange(o) * s[i] - p[i]
        end = np.minimum(start + k[i], n + p[i])
        inside = np.minimum(end, n) - np.maximum(start, 0)
        divs.append(end - start if count_include_pad else inside)
        outs.append(o)
        pads.append(pad)
    total = lax.reduce_window(x, 0.0, lax.add, (1, 1) + k, (1, 1) + s, pads)
    if divisor_override is not None:
        return total / jnp.float32(divisor_override)
    div = np.outer(divs[0], divs[1]).astype(np.float32)
    return total / jnp.asarray(div)


def _adaptive_avg_pool2d(x, output_size):
    oh, ow = (int(output_size), int(output_size)) if np.ndim(output_size) == 0 else output_size
    h, w = x.shape[-2:]
    rows = []
    for i in range(oh):
        h0, h1 = (i * h) // oh, -((-(i + 1) * h) // oh)
        cols = []
        for j in range(ow):
            w0, w1 = (j * w) // ow, -((-(j + 1) * w) // ow)
            cols.append(jnp.mean(x[..., h0:h1, w0:w1], axis=(-2, -1)))
        rows.append(jnp.stack(cols, axis=-1))
    return jnp.stack(rows, axis=-2)


def _mean(x, dim=None, keepdim=False, dtype=None):
    axis = None if dim is None or dim == [] else tuple(int(d) for d in np.atleast_1d(dim))
    return jnp.mean(x, axis=axis, keepdims=bool(keepdim))


def _sum(x, dim=None, keepdim=False, dtype=None):
    axis = None if dim is None or dim == [] else tuple(int(d) for d in np.atleast_1d(dim))
    return jnp.sum(x, axis=axis, keepdims=bool(keepdim))


def _flatten(x, start_dim=0, end_dim=-1):
    nd = max(x.ndim, 1)
    s, e = start_dim % nd, end_dim % nd
    return x.reshape(x.shape[:s] + (math.prod(x.shape[s : e + 1]),) + x.shape[e + 1 :])


def _slice(x, dim=0, start=None, end=None, step=1):
    idx = [slice(None)] * x.ndim
    n = x.shape[dim]
    start = 0 if start is None else start
    end = n if end is None else min(end, n)
    idx[dim] = slice(start, end, step)
    return x[tuple(idx)]


def _select(x, dim, index):
    return jnp.take(x, index, axis=dim)


def _squeeze(x, dim=None):
    if dim is None:
        return jnp.squeeze(x)
    dims = tuple(d % x.ndim for d in np.atleast_1d(dim) if x.shape[d] == 1)
    return jnp.squeeze(x, dims) if dims else x


def _expand(x, size, implicit=False):
    lead = len(size) - x.ndim
    shape = tuple(x.shape[i - lead] if (s == -1 and i >= lead) else s for i, s in enumerate(size))
    return jnp.broadcast_to(x, shape)


def _layer_norm(x, normalized_shape, weight=None, bias=None, eps=1e-5, cudnn_enable=True):
    axes = tuple(range(x.ndim - len(normalized_shape), x.ndim))
    mean = jnp.mean(x, axis=axes, keepdims=True)
    var = jnp.mean(jnp.square(x - mean), axis=axes, keepdims=True)
    y = (x - mean) * lax.rsqrt(var + jnp.float32(eps))
    if weight is not None:
        y = y * weight
    if bias is not None:
        y = y + bias
    return y


def _bn_eval(x, weight, bias, mean, var, eps):
    shape = (1, -1) + (1,) * (x.ndim - 2)
    y = (x - mean.reshape(shape)) * lax.rsqrt(var.reshape(shape) + jnp.float32(eps))
    if weight is not None:
        y = y * weight.reshape(shape)
    if bias is not None:
        y = y + bias.reshape(shape)
    return y


def _batch_norm(x, weight, bias, mean, var, training, momentum, eps, cudnn_enabled=True):
    if training:
        raise ValueError("batch_norm in training mode; call torch's eval() before exporting")
    return _bn_eval(x, weight, bias, mean, var, eps)


def _bn_no_training(x, weight, bias, mean, var, momentum, eps):
    return (_bn_eval(x, weight, bias, mean, var, eps), None, None)


def _softmax(x, dim, half_to_float=False):
    return jax.nn.softmax(x, axis=dim)


def _log_softmax(x, dim, half_to_float=False):
    return jax.nn.log_softmax(x, axis=dim)


def _gelu(x, approximate="none"):
    return jax.nn.gelu(x, approximate=approximate == "tanh")


def _hardtanh(x, min_val=-1.0, max_val=1.0):
    return jnp.clip(x, jnp.float32(min_val), jnp.float32(max_val))


def _clamp(x, min=None, max=None):  # noqa: A002 (torch's argument names)
    if min is not None:
        x = jnp.maximum(x, jnp.float32(min))
    if max is not None:
        x = jnp.minimum(x, jnp.float32(max))
    return x


def _add(a, b, alpha=1):
    return a + (b if alpha == 1 else b * alpha)


def _sub(a, b, alpha=1):
    return a - (b if alpha == 1 else b * alpha)


def _scalar_f32(v):
    return jnp.float32(v) if isinstance(v, (int, float)) else v


def _binary(f):
    return lambda a, b: f(_scalar_f32(a), _scalar_f32(b))


def _hardswish(x):
    return x * jnp.clip(x + 3.0, 0.0, 6.0) / 6.0


def _hardsigmoid(x):
    return jnp.clip(x + 3.0, 0.0, 6.0) / 6.0


def _identity(x, *args, **kwargs):
    return x


# Pure data movement: the same function moves integer codes (``mode="integer"``) and
# float values, so both modes share it.
MOVEMENT_OPS = {
    "aten.view.default": lambda x, size: x.reshape(tuple(size)),
    "aten.reshape.default": lambda x, size: x.reshape(tuple(size)),
    "aten._unsafe_view.default": lambda x, size: x.reshape(tuple(size)),
    "aten.flatten.using_ints": _flatten,
    "aten.permute.default": lambda x, dims: jnp.transpose(x, tuple(dims)),
    "aten.transpose.int": lambda x, a, b: jnp.swapaxes(x, a, b),
    "aten.t.default": lambda x: x.T,
    "aten.unsqueeze.default": lambda x, dim: jnp.expand_dims(x, dim % (x.ndim + 1)),
    "aten.squeeze.dim": _squeeze,
    "aten.squeeze.dims": _squeeze,
    "aten.squeeze.default": _squeeze,
    "aten.contiguous.default": _identity,
    "aten.clone.default": _identity,
    "aten.alias.default": _identity,
    "aten.dropout.default": _identity,  # torch.export in eval: train=False
    "aten.slice.Tensor": _slice,
    "aten.select.int": _select,
    "aten.expand.default": _expand,
}

FLOAT_OPS = {
    **MOVEMENT_OPS,
    "aten.conv1d.default": _conv,
    "aten.conv2d.default": _conv,
    "aten.conv2d.padding": _conv,
    "aten.convolution.default": _convolution,
    "aten.linear.default": _linear,
    "aten.addmm.default": _addmm,
    "aten.matmul.default": lambda a, b: jnp.matmul(a, b, precision=_HI),
    "aten.mm.default": lambda a, b: jnp.matmul(a, b, precision=_HI),
    "aten.bmm.default": lambda a, b: jnp.matmul(a, b, precision=_HI),
    "aten.relu.default": lambda x: jnp.maximum(x, jnp.float32(0.0)),
    "aten.relu_.default": lambda x: jnp.maximum(x, jnp.float32(0.0)),
    "aten.hardtanh.default": _hardtanh,
    "aten.hardtanh_.default": _hardtanh,
    "aten.clamp.default": _clamp,
    "aten.gelu.default": _gelu,
    "aten.silu.default": jax.nn.silu,
    "aten.sigmoid.default": jax.nn.sigmoid,
    "aten.tanh.default": jnp.tanh,
    "aten.hardswish.default": _hardswish,
    "aten.hardsigmoid.default": _hardsigmoid,
    "aten.softmax.int": _softmax,
    "aten._softmax.default": _softmax,
    "aten.log_softmax.int": _log_softmax,
    "aten.layer_norm.default": _layer_norm,
    "aten.batch_norm.default": _batch_norm,
    "aten._native_batch_norm_legit_no_training.default": _bn_no_training,
    "aten.add.Tensor": _add,
    "aten.sub.Tensor": _sub,
    "aten.mul.Tensor": _binary(operator.mul),
    "aten.div.Tensor": _binary(operator.truediv),
    "aten.cat.default": lambda xs, dim=0: jnp.concatenate(list(xs), axis=dim),
    "aten.max_pool2d.default": _max_pool2d,
    "aten.max_pool2d_with_indices.default": _max_pool2d_with_indices,
    "aten.avg_pool2d.default": _avg_pool2d,
    "aten.adaptive_avg_pool2d.default": _adaptive_avg_pool2d,
    "aten.mean.dim": _mean,
    "aten.mean.default": _mean,
    "aten.sum.dim_IntList": _sum,
    "_operator.getitem": operator.getitem,
}
