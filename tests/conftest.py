"""Shared test setup: strict dtype promotion catches silent int8 -> float upcasts."""

import jax
import numpy as np
import pytest

jax.config.update("jax_numpy_dtype_promotion", "strict")


@pytest.fixture
def rng():
    return np.random.default_rng(0)


@pytest.fixture(autouse=True)
def _restore_torch_engine():
    """Tests switch torch's quantized engine; never let one leak into the next test."""
    try:
        import torch
    except ImportError:
        yield
        return
    engine = torch.backends.quantized.engine
    threads = torch.get_num_threads()
    yield
    torch.backends.quantized.engine = engine
    torch.set_num_threads(threads)
