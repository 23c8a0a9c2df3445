"""``qjax.kernels.window_max`` (strided slices) against XLA's own ``reduce_window_max``
on the same arguments: exact equality over random windows, strides, padding and
dilations, and the served programs that use it."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from jax import lax

from qjax.kernels import window_max


def _reference(x, k, s, pads, base=None, dil=None):
    r = x.ndim
    return lax.reduce_window_max_p.bind(
        x,
        window_dimensions=tuple(k),
        window_strides=tuple(s),
        padding=tuple(pads),
        base_dilation=tuple(base or (1,) * r),
        window_dilation=tuple(dil or (1,) * r),
    )


@st.composite
def _case(draw):
    dtype = draw(st.sampled_from([np.uint8, np.int8, np.int32]))
    r = draw(st.integers(1, 4))
    shape = [draw(st.integers(1, 9)) for _ in range(r)]
    k = [draw(st.integers(1, 4)) for _ in range(r)]
    s = [draw(st.integers(1, 3)) for _ in range(r)]
    dil = [draw(st.integers(1, 2)) for _ in range(r)]
    pads = [(draw(st.integers(0, 2)), draw(st.integers(0, 2))) for _ in range(r)]
    info = np.iinfo(dtype)
    seed = draw(st.integers(0, 2**31 - 1))
    x = np.random.default_rng(seed).integers(info.min, info.max, shape, endpoint=True)
    return x.astype(dtype), k, s, pads, dil


@settings(deadline=None, max_examples=60)
@given(_case())
def test_window_max_equals_reduce_window(case):
    x, k, s, pads, dil = case
    want = _reference(jnp.asarray(x), k, s, pads, dil=dil)
    got = window_max(jnp.asarray(x), k, s, pads, window_dilation=dil)
    assert got.dtype == want.dtype and got.shape == want.shape
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def test_window_max_fallbacks_and_errors():
    x = jnp.asarray(np.random.default_rng(0).integers(0, 255, (2, 7, 7, 3)), jnp.uint8)
    # input dilation, a 6x6 window (36 taps > 25) and floats take reduce_window itself
    for args in [
        ((1, 2, 2, 1), (1, 2, 2, 1), ((0, 0),) * 4, (1, 2, 2, 1)),
        ((1, 6, 6, 1), (1, 1, 1, 1), ((0, 0),) * 4, None),
    ]:
        want = _reference(x, *args)
        np.testing.assert_array_equal(window_max(x, *args), want)
    xf = x.astype(jnp.float32).at[0, 0, 0, 0].set(jnp.nan)
    k = (1, 3, 3, 1)
    np.testing.assert_array_equal(
        window_max(xf, k, k, ((0, 0),) * 4), _reference(xf, k, k, ((0, 0),) * 4)
    )
    # string padding as lax.reduce_window takes it
    want = lax.reduce_window(x, jnp.uint8(0), lax.max, (1, 3, 3, 1), (1, 2, 2, 1), "SAME")
    np.testing.assert_array_equal(window_max(x, (1, 3, 3, 1), (1, 2, 2, 1), "SAME"), want)
    with pytest.raises(ValueError, match="one entry per dimension of the rank-4 input"):
        window_max(x, (2, 2), (2, 2), ((0, 0),) * 2)


def test_window_max_under_jit_has_no_reduce_window():
    # why it exists: the served programs' max pool must not lower to XLA's reduce_window
    x = jnp.zeros((4, 8, 8, 16), jnp.uint8)
    f = jax.jit(lambda v: window_max(v, (1, 2, 2, 1), (1, 2, 2, 1), ((0, 0),) * 4))
    assert "reduce_window" not in f.lower(x).as_text()
