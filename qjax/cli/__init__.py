"""The ``qjax`` command line: ``demo``, ``parity MODEL``, ``inspect MODEL``, ``bench``.

``qjax parity MODEL`` imports a saved torch int8 model into qjax and compares every
quantized activation with torch's, on the same inputs, layer by layer (max LSB
difference, mismatch count and rate, first mismatch, likely cause from NUMERICS.md);
exit status 0 when every integer matches, 1 when some differ, 2 on errors.
``qjax inspect MODEL`` prints qparams per layer, the activation codes the inputs use and
the risks the same rulebook sees. MODEL formats: :mod:`qjax.cli._model` (a state_dict is
read safely; ``.pt2``, TorchScript and pickled models only with ``--trusted``, since their
loaders run code from the file). ``qjax inspect FILE.py:FUNCTION`` (or
``MODULE:FUNCTION``) inspects a qjax program built by the user's own code instead, e.g.
a Flax model traced by ``qjax.convert``: the function takes no arguments and returns the
:class:`~qjax.Program`, or ``(program, inputs)``; the file runs as Python code.
``qjax inspect FILE.safetensors`` inspects a program saved by :func:`qjax.save_served`
(converted or imported; read by :func:`qjax.load_served`, nothing in it runs as code),
on ``--inputs`` / ``--input-shape`` or random inputs at its example shapes.
``qjax debug FILE.py:FUNCTION``: debugging views of a quantized Flax model
(:mod:`qjax.debug._cli`).
"""

from __future__ import annotations

import argparse
import sys

from ..kernels._levels import ENGINE_CHOICES as ENGINES
from ..kernels._levels import LEVELS


def _model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "model",
        metavar="MODEL",
        help="a state_dict (with --definition; read safely, weights_only), or, only with"
        " --trusted: a TorchScript file (with --definition), a torch.export .pt2 file or a"
        " pickled model (loading these runs code from the file); for inspect also"
        " FILE.py:FUNCTION or MODULE:FUNCTION returning a qjax.Program (e.g. qjax.convert"
        " of a Flax model) or (program, inputs): that file or module runs as Python code;"
        " or a FILE.safetensors program saved by qjax.save_served (checked on load)",
    )
    p.add_argument(
        "--definition",
        metavar="FILE.py:FUNCTION",
        help="function returning the converted model's structure (an nn.Module)",
    )
    p.add_argument(
        "--trusted",
        action="store_true",
        help="allow loading a .pt2, TorchScript or pickled model: torch's loaders run code"
        " from these files, so pass it only for files you trust",
    )
    p.add_argument(
        "--engine",
        default=None,
        choices=ENGINES,
        help="qjax engine (default x86; for a program from FILE.py:FUNCTION, its own)",
    )
    p.add_argument(
        "--isa",
        default=None,
        choices=LEVELS,
        help="CPU level to emulate (default: this machine's, as torch detects it); torch's"
        " integers differ between AVX2, AVX-512 without VNNI, VNNI and AMX CPUs",
    )
    p.add_argument(
        "--input-shape",
        action="append",
        metavar="N,C,H,W",
        help="random normal float32 input of this shape (repeat per input)",
    )
    p.add_argument("--inputs", nargs="+", metavar="X.npy", help="float input arrays, in order")
    p.add_argument("--seed", type=int, default=0, help="seed of the random inputs")
    p.add_argument(
        "--pt2e-mode",
        default="integer",
        choices=("integer", "reference"),
        help=".pt2 programs: integer kernels or float reference",
    )
    p.add_argument(
        "--format",
        default="rich",
        choices=("rich", "text", "markdown", "json"),
        help="output format (rich falls back to text without the rich package)",
    )


def _load(args):
    from ._model import import_program, load_inputs, load_model

    loaded = load_model(args.model, definition=args.definition, trusted=args.trusted)
    inputs = load_inputs(args.input_shape, args.inputs, args.seed, loaded.example_inputs)
    with _running(inputs):
        program = import_program(loaded, inputs, args.engine, args.pt2e_mode, isa=args.isa)
        return loaded, inputs, program


class _running:
    """torch raises ``RuntimeError`` when a model cannot run on the given inputs (shapes
    that do not fit a layer): a usage error, reported with the input shapes."""

    def __init__(self, inputs):
        self.shapes = ", ".join(str(tuple(getattr(x, "shape", ()))) for x in inputs)

    def __enter__(self):
        return self

    def __exit__(self, kind, e, tb):
        if kind is not None and issubclass(kind, RuntimeError):
            first = next((ln.strip() for ln in str(e).splitlines() if ln.strip()), "")
            raise ValueError(
                f"MODEL does not run on inputs of shape {self.shapes} ({kind.__name__}: "
                f"{first[:200]}); check --input-shape / --inputs"
            ) from None
        return False


def _emit(report, fmt: str) -> None:
    if fmt == "rich":
        report.print()
    else:
        print(report.render(fmt))


def _parity(args) -> int:
    from .. import parity
    from ..kernels import host_level
    from ._model import reference_trace

    loaded, inputs, program = _load(args)
    with _running(inputs):
        reference = reference_trace(loaded, program, inputs)
    report = parity.compare(
        None,
        program,
        inputs,
        reference=reference,
        reference_kind="torch",
        engine=args.engine,
        reference_level=host_level(),  # torch just ran here
    )
    _emit(report, args.format)
    return 0 if report.ok else 1


def _inspect(args) -> int:
    from .. import parity

    if is_program_target(args.model):
        program, inputs = _program_target(args)
        report = parity.inspect(program, inputs, engine=args.engine)
    elif is_saved_program(args.model):
        program, inputs = _saved_program(args)
        report = parity.inspect(program, inputs, engine=args.engine or program.engine)
    else:
        _, inputs, program = _load(args)
        with _running(inputs):
            report = parity.inspect(program, inputs, engine=args.engine)
    _emit(report, args.format)
    return 0


def is_program_target(spec: str) -> bool:
    """``FILE.py:FUNCTION`` or ``MODULE:FUNCTION`` (not a model file): a function that
    returns a qjax program.

    >>> is_program_target("nets.py:served"), is_program_target("pkg.nets:served")
    (True, True)
    >>> is_program_target("model.pt"), is_program_target("runs/m:1.pt")
    (False, False)
    """
    import pathlib

    where, sep, fn = str(spec).rpartition(":")
    if not sep or not where or not fn.isidentifier() or pathlib.Path(spec).exists():
        return False
    return where.endswith(".py") or all(p.isidentifier() for p in where.split("."))


def is_saved_program(spec: str) -> bool:
    """A ``.safetensors`` file: a program saved by :func:`qjax.save_served`.

    >>> is_saved_program("model.safetensors"), is_saved_program("model.pt")
    (True, False)
    """
    return str(spec).endswith(".safetensors")


def _saved_program(args):
    """``(program, inputs)`` from a :func:`qjax.save_served` file (read and checked by
    :func:`qjax.load_served`; nothing in it runs as code): ``--inputs`` /
    ``--input-shape``, else random inputs at the shapes it was imported with."""
    from .. import load_served
    from ._model import load_inputs

    if args.definition or args.trusted or args.isa:
        raise ValueError(
            f"--definition, --trusted and --isa are for saved torch models; {args.model} is "
            "a saved qjax program"
        )
    program = load_served(args.model)
    shapes = getattr(program, "example_shapes", None)
    if not (args.input_shape or args.inputs) and shapes:
        args.input_shape = [",".join(str(d) for d in sh) for sh, _ in shapes]
    return program, load_inputs(args.input_shape, args.inputs, args.seed)


def _program_target(args):
    """``(program, inputs)`` from the user's ``FILE.py:FUNCTION``: the function returns a
    program, or ``(program, inputs)``; ``--inputs`` / ``--input-shape`` override."""
    from ..debug._cli import load_target
    from ..program import Program
    from ._model import load_inputs

    if args.definition or args.trusted or args.isa:
        raise ValueError(
            "--definition, --trusted and --isa are for saved torch models; "
            f"{args.model} returns a qjax program"
        )
    result = load_target(args.model)()
    program, inputs = (result, None) if not isinstance(result, tuple) else (result + (None,))[:2]
    if not isinstance(program, Program):
        raise TypeError(
            f"{args.model} returned {type(result).__name__}; it must return a qjax.Program "
            "(e.g. qjax.convert(model, x)) or (program, inputs)"
        )
    if args.input_shape or args.inputs or inputs is None:
        inputs = load_inputs(args.input_shape, args.inputs, args.seed)
    return program, tuple(inputs) if isinstance(inputs, (tuple, list)) else (inputs,)


def _bench_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dir", help="benchmarks folder (default: the checkout's benchmarks/)")
    p.add_argument("--only", metavar="NAME[,NAME]", help="run only these scripts (no .py)")
    p.add_argument("--quick", action="store_true", help="QJAX_BENCH_QUICK=1: fewer repeats")
    p.add_argument("--verbose", action="store_true", help="stream the scripts' own output")
    p.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    p.add_argument("--timeout", type=float, help="seconds per script before it is killed")


def _bench_cmd(args) -> int:
    from ._bench import run_bench

    only = [n.strip() for n in args.only.split(",") if n.strip()] if args.only else None
    try:
        return run_bench(
            args.dir,
            only,
            quick=args.quick,
            verbose=args.verbose,
            json_path=args.json,
            timeout=args.timeout,
        )
    except (ValueError, OSError) as e:
        print(f"qjax bench: error: {e}", file=sys.stderr)
        return 2


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="qjax", description="Integer quantization for JAX.")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser(
        "demo", help="digits CNN end to end: float, PTQ, QAT, int8 served, torch parity"
    )
    demo.add_argument("--out", default="qjax-demo", help="summary and plots folder")
    demo.add_argument("--epochs", type=int, default=8, help="float training epochs")
    demo.add_argument("--qat-epochs", type=int, default=2, help="QAT fine-tuning epochs")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--quick", action="store_true", help="tiny run (for tests)")
    _model_args(sub.add_parser("parity", help="layer-by-layer integer parity of MODEL vs torch"))
    _model_args(sub.add_parser("inspect", help="qparams, code ranges and risks of MODEL"))
    from ..debug._cli import add_debug_parser

    add_debug_parser(sub)
    _bench_args(sub.add_parser("bench", help="run benchmarks/*.py and print the ratio table"))
    args = parser.parse_args(argv)
    if args.command == "debug":
        from ..debug._cli import run_debug

        return run_debug(args)
    if args.command == "bench":
        return _bench_cmd(args)
    if args.command == "demo":
        from ..demo import run_demo

        return run_demo(
            args.out, epochs=args.epochs, qat_epochs=args.qat_epochs, seed=args.seed,
            quick=args.quick,
        )  # fmt: skip
    try:
        own = is_program_target(args.model) or is_saved_program(args.model)
        if args.command == "parity" and own:
            what = "a function" if is_program_target(args.model) else "a saved qjax program"
            raise ValueError(
                f"qjax parity compares a saved torch model with torch; {args.model} is "
                f"{what} (a qjax program has no torch model): use qjax inspect, or "
                "qjax.parity.compare(None, program, x, reference={name: codes})"
            )
        if not own:
            args.engine = args.engine or "x86"
        return _parity(args) if args.command == "parity" else _inspect(args)
    except (ValueError, TypeError, NotImplementedError, OSError) as e:
        print(f"qjax {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
