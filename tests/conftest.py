"""Shared test setup.

* Strict dtype promotion catches silent int8 -> float upcasts.
* One persistent XLA compilation cache per test run, shared by the xdist workers: most of
  the suite's time is XLA compiling, and many tests (and both workers) compile identical
  programs. The cache lives in the run's pytest temp base (fresh per run, so nothing
  compiled by an earlier checkout of the code is ever reused) and pytest's temp-dir
  retention removes it. ``QJAX_TEST_XLA_CACHE=0`` turns it off.
* Under ``-n`` with xdist's default ``--dist load``, the run is scheduled as
  ``--dist loadgroup``: modules marked ``pytest.mark.xdist_group`` (those whose
  module-scoped fixtures run long torch sweeps) stay on one worker, so each such fixture
  is built once per run instead of once per worker. An explicit ``--dist`` is kept.
"""

import os
import pathlib

import jax
import numpy as np
import pytest

jax.config.update("jax_numpy_dtype_promotion", "strict")


def pytest_configure(config):
    if hasattr(config, "workerinput"):
        # A worker parses the command line itself (no --dist there): take the controller's
        # choice, which makes xdist tag grouped test ids with their group.
        if config.workerinput.get("qjax_loadgroup"):
            config.option.loadgroup = True
        return
    args = config.invocation_params.args
    explicit = any(str(a) == "-d" or str(a).startswith("--dist") for a in args)
    if getattr(config.option, "dist", "no") == "load" and not explicit:
        config.option.dist = "loadgroup"


@pytest.hookimpl(optionalhook=True)
def pytest_configure_node(node):
    node.workerinput["qjax_loadgroup"] = node.config.option.dist == "loadgroup"


def pytest_sessionstart(session):
    if os.environ.get("QJAX_TEST_XLA_CACHE", "1") == "0":
        return
    config = session.config
    if hasattr(config, "workerinput"):
        # a worker's basetemp is <run basetemp>/popen-gwN: share the run's directory
        base = pathlib.Path(config.option.basetemp).parent
    else:
        base = config._tmp_path_factory.getbasetemp()
    cache = base / "xla-cache"
    cache.mkdir(parents=True, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", str(cache))
    # cache every program: the suite's programs are small and compile in well under 1 s
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)


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
