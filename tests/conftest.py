"""Shared test setup.

* Strict dtype promotion catches silent int8 -> float upcasts.
* One persistent XLA compilation cache per test run, shared by the xdist workers: most of
  the suite's time is XLA compiling, and many tests (and both workers) compile identical
  programs. The cache lives in the run's pytest temp base (fresh per run, so nothing
  compiled by an earlier checkout of the code is ever reused) and pytest's temp-dir
  retention removes it. ``QJAX_TEST_XLA_CACHE=0`` turns it off.
* Under ``-n`` with xdist's default ``--dist load``, the modules in ``ONE_WORKER`` (whose
  module-scoped fixtures run long torch sweeps or imports) are each sent whole to one
  worker, so each such fixture is built once per run instead of once per worker; every
  other test is load-balanced one by one. xdist's ``--dist loadgroup`` would do this from
  ``xdist_group`` marks, but xdist 3.8 tags grouped test ids through ``item._nodeid``,
  which pytest 9 no longer reads, so the grouping is done here by module path instead.
  An explicit ``--dist`` is kept as given.
* ``QJAX_TEST_KERNEL=auto`` (or ``onednn`` / ``amx``): every model-level call that asks
  for XLA (``kernel="xla"``, the default of ``qjax.convert`` / ``load_served``) or the
  default (``None``, ``import_model``'s) gets that kernel instead, so the parity sweeps
  compare torch's integers with the native kernels' (issue 16). A sweep, not a default
  run: tests that check the default choice or ``jax.export`` (which refuses native
  calls) are expected to fail under it.
"""

import os
import pathlib

import jax
import numpy as np
import pytest

jax.config.update("jax_numpy_dtype_promotion", "strict")


def _sweep_kernel(kernel: str) -> None:
    """Route every model-level kernel wish of "xla" / None to ``kernel`` (docstring)."""
    import qjax.converters.pt2e as pt2e
    import qjax.converters.torch as torch_conv

    from qjax.flax import _convert, _served_io
    from qjax.kernels import _choice

    def resolve(wish, where, _orig=_choice.resolve_kernel):
        return _orig(kernel if wish in (None, "xla") else wish, where)

    for mod in (pt2e, torch_conv, _convert, _served_io):
        mod.resolve_kernel = resolve


if os.environ.get("QJAX_TEST_KERNEL"):
    _sweep_kernel(os.environ["QJAX_TEST_KERNEL"])


# modules whose module-scoped fixtures are expensive (see the module docstring)
ONE_WORKER = {
    "test_converters_torch",  # two sweeps importing ~50 torch models each
    "test_int8_conv",  # the torch conv engine sweep
    "test_int8_linear",  # the torch linear engine sweep
    "test_int8_ops",  # the add cases; module-wide counts
    "test_converters_onnx",  # per model: convert, export, run ORT
    "test_converters_pt2e",  # each pt2e case converted once
    "test_debug",  # the calibrated MLP
    "test_cli",  # models saved by a subprocess
    "test_converters_qat",  # module-wide counts, asserted by its last test
    "test_converters_save",  # imported models saved and loaded once each
}


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
    args = [str(a) for a in config.invocation_params.args]
    if config.option.dist != "load" or any(a == "-d" or a.startswith("--dist") for a in args):
        return None  # xdist's own scheduler for what the caller asked for
    from xdist.scheduler import LoadScopeScheduling

    class ModuleGroups(LoadScopeScheduling):
        """LoadScope with a scope per ONE_WORKER module and per test elsewhere (scopes
        with more tests go out first, so the long grouped modules start early)."""

        def _split_scope(self, nodeid):
            path = nodeid.split("::", 1)[0]
            return path if pathlib.PurePosixPath(path).stem in ONE_WORKER else nodeid

    return ModuleGroups(config, log)


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
