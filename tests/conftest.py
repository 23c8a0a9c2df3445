"""Shared test setup: strict dtype promotion catches silent int8 -> float upcasts."""

import jax
import numpy as np
import pytest

jax.config.update("jax_numpy_dtype_promotion", "strict")


@pytest.fixture
def rng():
    return np.random.default_rng(0)
