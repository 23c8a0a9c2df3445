"""``qjax debug TARGET``: every debugging view of :mod:`qjax.debug` from the command line.

``TARGET`` is ``path/to/file.py:function`` or ``package.module:function``; the function
(the user's own code, named explicitly) takes no arguments and returns ``(model, x)`` or
``(model, x, y)``: an ``nnx.Sequential`` of qjax layers with statistics, an input batch
and, optionally, labels (then the sensitivity sweep runs too). Prints the qparams table,
observer health, histogram summary, per-layer errors (and sensitivity), and writes
``histograms.png``, ``layer_errors.png`` (and ``sensitivity.png``) to ``--out``.
Exit status 0, or 2 on errors (the message names the problem).
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import pathlib
import sys

__all__ = ["add_debug_parser", "load_target", "run_debug"]


def add_debug_parser(sub) -> None:
    """The ``debug`` subcommand's arguments on an argparse subparsers object."""
    p = sub.add_parser(
        "debug",
        help="debugging views of a quantized Flax model (tables, plots)",
        description="Debugging views of a quantized Flax model. Imports and runs TARGET: "
        "your own Python file or module is executed (like 'python FILE.py'), with your "
        "permissions; pass only code you trust.",
    )
    p.add_argument(
        "target",
        metavar="TARGET",
        help="FILE.py:FUNCTION or MODULE:FUNCTION returning (model, x) or (model, x, y); "
        "the file or module is imported and runs as Python code",
    )
    p.add_argument("--out", default="qjax-debug", help="folder for the plots (default qjax-debug/)")
    p.add_argument(
        "--format", default="text", choices=("text", "markdown", "rich"), help="table format"
    )
    p.add_argument("--bins", type=int, default=64, help="histogram bins (default 64)")


def load_target(spec: str):
    """``FILE.py:FUNCTION`` or ``MODULE:FUNCTION`` -> the function.

    >>> load_target("qjax.debug:_doc_model").__name__
    '_doc_model'
    """
    where, sep, fn = spec.rpartition(":")
    if not sep or not where or not fn:
        raise ValueError(f"TARGET must be FILE.py:FUNCTION or MODULE:FUNCTION, got {spec!r}")
    if where.endswith(".py") or "/" in where or "\\" in where:
        file = pathlib.Path(where)
        if not file.is_file():
            raise ValueError(f"TARGET: no file {str(file)!r}")
        mod_spec = importlib.util.spec_from_file_location(f"_qjax_debug_{file.stem}", file)
        module = importlib.util.module_from_spec(mod_spec)
        sys.path.insert(0, str(file.resolve().parent))  # the file's sibling imports
        try:
            mod_spec.loader.exec_module(module)
        finally:
            sys.path.remove(str(file.resolve().parent))
    else:
        try:
            module = importlib.import_module(where)
        except ImportError as e:
            raise ValueError(f"TARGET: cannot import module {where!r}: {e}") from e
    build = getattr(module, fn, None)
    if not callable(build):
        raise ValueError(f"TARGET: {where!r} has no function {fn!r}")
    return build


def _unpack(result, spec: str):
    if not isinstance(result, tuple) or len(result) not in (2, 3):
        got = type(result).__name__
        if isinstance(result, tuple):
            got += f" of length {len(result)}"
        raise TypeError(f"TARGET {spec!r} must return (model, x) or (model, x, y), got {got}")
    return result if len(result) == 3 else (*result, None)


def run_debug(args: argparse.Namespace, file=None) -> int:
    """Run every view for ``args`` (from :func:`add_debug_parser`); print, plot, exit code."""
    from .. import debug

    file = sys.stdout if file is None else file
    try:
        model, x, y = _unpack(load_target(args.target)(), args.target)
        out = pathlib.Path(args.out)
        fmt = args.format
        print(debug.render_qparams(debug.qparams_table(model), fmt), file=file)
        print(file=file)
        print(debug.render_health(debug.observer_health(model), fmt), file=file)
        hists = debug.activation_histograms(model, x, bins=args.bins)
        print(file=file)
        print(debug.render_histograms(hists, fmt), file=file)
        errors = debug.layer_errors(model, x)
        print(file=file)
        print(debug.render_layer_errors(errors, fmt), file=file)
        plots = [debug.plot_histograms(hists, out / "histograms.png")]
        plots.append(debug.plot_layer_errors(errors, out / "layer_errors.png"))
        if y is not None:
            rows = debug.sensitivity(model, x, y)
            print(file=file)
            print(debug.render_sensitivity(rows, fmt), file=file)
            plots.append(debug.plot_sensitivity(rows, out / "sensitivity.png"))
        print(file=file)
        print("plots: " + ", ".join(str(p) for p in plots), file=file)
    except (ValueError, TypeError, OSError, ImportError) as e:
        print(f"qjax debug: error: {e}", file=sys.stderr)
        return 2
    return 0
