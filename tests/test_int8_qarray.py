"""QArray: invariants, validation messages, pytree behaviour, jax.export round trip."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import qjax
from qjax import QParams, QuantSpec
from qjax.kernels import QArray

U8 = QuantSpec(signed=False)
PER_CHANNEL = QuantSpec(signed=True, symmetric=True, axis=(1,))


def _per_channel(rng, shape=(3, 4)):
    vals = jnp.asarray(rng.integers(-128, 128, shape).astype(np.int8))
    qp = QParams(
        jnp.asarray(rng.uniform(0.01, 0.1, shape[1]), jnp.float32),
        jnp.zeros(shape[1], jnp.int32),
        PER_CHANNEL,
    )
    return QArray(vals, qp)


def test_structural_invariants_raise_with_actual_values():
    qp = QParams(0.1, 3, U8)
    with pytest.raises(TypeError, match="dtype int8 but the spec .8-bit unsigned. stores uint8"):
        QArray(jnp.zeros(3, jnp.int8), qp)
    with pytest.raises(TypeError, match="dtype int32"):
        QArray(jnp.zeros(3, jnp.int32), qp)
    with pytest.raises(TypeError, match="must be an array"):
        QArray([1, 2, 3], qp)
    with pytest.raises(TypeError, match="must be a QParams"):
        QArray(jnp.zeros(3, jnp.uint8), (0.1, 3))
    pc = QParams(jnp.ones(4), jnp.zeros(4, jnp.int32), PER_CHANNEL)
    with pytest.raises(ValueError, match=r"shape \(4,\) but a tensor of shape \(3, 5\)"):
        QArray(jnp.zeros((3, 5), jnp.int8), pc)
    with pytest.raises(TypeError, match="zero_point must be an integer array, got dtype float32"):
        QArray(jnp.zeros(3, jnp.uint8), QParams(0.1, jnp.float32(3.0), U8))


def test_value_invariants_raise_with_actual_values():
    v = jnp.array([1, 2, 250], jnp.uint8)
    with pytest.raises(ValueError, match=r"zero_point 300 is outside the spec range \[0, 255\]"):
        QArray(v, QParams(0.1, 300, U8)).validate()
    with pytest.raises(ValueError, match=r"scale must be finite and > 0, got \[-1.0\]"):
        QArray(
            jnp.zeros((2, 2), jnp.int8),
            QParams(jnp.array([0.5, -1.0]), jnp.zeros(2, jnp.int32), QuantSpec(axis=1)),
        ).validate()
    with pytest.raises(ValueError, match="scale must be finite"):
        QArray(v, QParams(jnp.inf, 0, U8)).validate()
    narrow = QuantSpec(signed=False, reduce_range=True)  # codes 0..127
    q = QArray(v, QParams(0.1, 0, narrow))
    assert q.validate() is q  # codes are only checked on request
    with pytest.raises(
        ValueError, match=r"codes span \[1, 250\], outside the spec range \[0, 127\]"
    ):
        q.validate(check_values=True)


def test_validate_is_safe_under_jit():
    @jax.jit
    def f(q):
        q.validate(check_values=True)  # tracers: structural checks only
        return q.dequantize()

    q = QArray(jnp.array([0, 10], jnp.uint8), QParams(0.5, 10, U8))
    np.testing.assert_array_equal(f(q), [-5.0, 0.0])


def test_pytree_leaves_and_paths(rng):
    q = _per_channel(rng)
    leaves, treedef = jax.tree.flatten(q)
    assert [leaf.shape for leaf in leaves] == [(3, 4), (4,), (4,)]
    paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(q)[0]]
    assert paths == [".values", ".scale", ".zero_point"]
    back = jax.tree.unflatten(treedef, leaves)
    assert back.spec == q.spec and back.shape == q.shape
    # different specs are different pytree structures (different jit cache entries)
    other = QArray(q.values, QParams(q.scale, q.zero_point, PER_CHANNEL.replace(narrow_range=True)))
    assert jax.tree.structure(other) != treedef


def test_jit_and_vmap(rng):
    q = _per_channel(rng)
    out = jax.jit(lambda q: q)(q)
    assert isinstance(out, QArray) and out.spec == q.spec
    np.testing.assert_array_equal(out.values, q.values)
    stacked = jax.tree.map(lambda *xs: jnp.stack(xs), q, q)
    deq = jax.vmap(lambda q: q.dequantize())(stacked)
    np.testing.assert_array_equal(deq[1], q.dequantize())


@pytest.mark.parametrize("compat", ["qjax", "torch", "tflite"])
def test_quantize_and_dequantize_are_the_primitives(compat, rng):
    x = jnp.asarray(rng.normal(0, 3, (5, 4)).astype(np.float32))
    qp = QParams(
        jnp.asarray(rng.uniform(0.01, 0.1, 4), jnp.float32), jnp.zeros(4, jnp.int32), PER_CHANNEL
    )
    q = QArray.quantize(x, qp, compat=compat)
    np.testing.assert_array_equal(q.values, qjax.quantize(x, qp, compat=compat))
    np.testing.assert_array_equal(q.dequantize(), qjax.dequantize(q.values, qp))
    assert q.dequantize(jnp.bfloat16).dtype == jnp.bfloat16
    assert "axis=(1,)" in repr(q) and "shape=(5, 4)" in repr(q)


def test_export_serializes_qarray_in_and_out(rng):
    q = _per_channel(rng, (6, 4))
    out_qp = QParams(0.05, 128, U8)

    def requant(q: QArray) -> QArray:
        return QArray.quantize(q.dequantize(), out_qp)

    exp = jax.export.export(jax.jit(requant))(q)
    blob = exp.serialize()
    restored = jax.export.deserialize(blob)
    y = restored.call(q)
    assert isinstance(y, QArray)
    assert y.spec == U8
    np.testing.assert_array_equal(y.values, requant(q).values)
    # the per-channel input spec (a tuple axis) survives the round trip too
    assert restored.in_tree == exp.in_tree
