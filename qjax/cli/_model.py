"""What ``qjax parity`` / ``qjax inspect`` read: a saved torch model and its inputs.

MODEL formats, told apart by content (never by trusting a pickle):

==========================  ==============================================================
file                        how it is read
==========================  ==============================================================
state_dict                  ``torch.load(weights_only=True)`` into the module
                            ``--definition FILE.py:FUNCTION`` returns (the converted model's
                            structure); safe: nothing from the file runs
``torch.export`` ``.pt2``   only with ``--trusted``: ``torch.export.load`` unpickles parts of
                            the archive (weights, constants, sample inputs) and retries a
                            refused part with ``weights_only=False``, which runs its code;
                            imported with ``qjax.converters.pt2e``
TorchScript archive         only with ``--trusted``: ``torch.jit.load`` runs the archive's
                            compiled code (a module's ``__setstate__``); its quantized weights
                            and qparams are copied into the eager structure ``--definition``
                            builds (a scripted module has no FX graph to import)
pickled whole module        only with ``--trusted``: ``torch.load(weights_only=False)`` runs
                            the pickle's code
==========================  ==============================================================

Without ``--trusted`` (``trusted=True`` in :func:`load_model`) the last three are refused
with a ``ValueError`` naming the file, the format and why, before torch reads any of it.

Eager / FX converted modules are imported with ``qjax.converters.torch.import_model`` and
compared with its ``torch_trace``; ``.pt2`` programs with ``import_pt2e``, compared with the
outputs of the graph's quantize nodes (torch runs the graph; names match the trace).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import pathlib
import zipfile
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

__all__ = ["Loaded", "import_program", "load_inputs", "load_model", "reference_trace"]


@dataclasses.dataclass(frozen=True)
class Loaded:
    """A loaded model: ``kind`` (``"module"``, ``"state_dict"``, ``"torchscript"``,
    ``"pt2"``), the torch object (an ``nn.Module`` or ``ExportedProgram``) and, for
    ``.pt2``, its saved example inputs."""

    kind: str
    model: Any
    example_inputs: tuple | None = None


def _definition(spec: str):
    """``FILE.py:FUNCTION`` -> the function (the user's own code, named explicitly)."""
    path, sep, fn = spec.rpartition(":")
    if not sep or not path or not fn:
        raise ValueError(f"--definition must be FILE.py:FUNCTION, got {spec!r}")
    file = pathlib.Path(path)
    if not file.is_file():
        raise ValueError(f"--definition: no file {str(file)!r}")
    mod_spec = importlib.util.spec_from_file_location(f"_qjax_definition_{file.stem}", file)
    module = importlib.util.module_from_spec(mod_spec)
    mod_spec.loader.exec_module(module)
    build = getattr(module, fn, None)
    if not callable(build):
        raise ValueError(f"--definition: {str(file)!r} has no function {fn!r}")
    return build


def _build(definition: str):
    import torch

    model = _definition(definition)()
    if not isinstance(model, torch.nn.Module):
        raise TypeError(
            f"--definition {definition!r} returned {type(model).__name__}, not a torch.nn.Module"
        )
    return model


def _is_pt2(path: pathlib.Path, names: Sequence[str]) -> bool:
    # torch >= 2.8 archives hold ARCHIVE/archive_format ("pt2"); older ones
    # serialized_exported_program.json
    return path.suffix == ".pt2" or any(
        "serialized_exported_program" in n or n.rpartition("/")[2] == "archive_format"
        for n in names
    )


def _is_torchscript(names: Sequence[str]) -> bool:
    return any(n.endswith("constants.pkl") or "/code/" in n for n in names)


def _from_torchscript(script, module):
    """Copy a scripted converted model's weights and qparams into its eager structure.

    Quantized Linear/Conv modules (``set_weight_bias``) get the unpacked int8 weight and
    float bias plus ``scale``/``zero_point``; other modules their buffers and
    ``scale``/``zero_point`` attributes (``Quantize``, ``QFunctional``).
    """
    script_mods = dict(script.named_modules())
    state = script.state_dict()
    for name, mod in module.named_modules():
        if name not in script_mods:
            raise ValueError(
                f"the TorchScript model has no submodule {name!r}, which --definition builds"
            )
        smod = script_mods[name]
        if hasattr(mod, "set_weight_bias"):
            packed = smod._packed_params
            w, b = packed._weight_bias() if hasattr(packed, "_weight_bias") else packed.unpack()
            mod.set_weight_bias(w, b)
        for attr in ("scale", "zero_point"):
            if hasattr(mod, attr) and hasattr(smod, attr) and attr not in mod._buffers:
                setattr(mod, attr, type(getattr(mod, attr))(getattr(smod, attr)))
        for bname, buf in mod.named_buffers(recurse=False):
            key = f"{name}.{bname}" if name else bname
            if key in state:
                buf.copy_(state[key])
    return module.eval()


def _register_quantized_decomposed() -> None:
    """pt2e graphs call ``quantized_decomposed`` ops; deserializing needs them registered."""
    try:
        import torchao.quantization.pt2e.quantize_pt2e  # noqa: F401
    except ImportError:  # torch's own copy of the ops
        import torch.ao.quantization.fx._decomposed  # noqa: F401


_PT2_WHY = (
    "torch.export.load unpickles parts of it (weights, constants, sample inputs) and "
    "retries a part weights_only refuses with weights_only=False, which runs code from the file"
)
_TS_WHY = "torch.jit.load runs code from the file (the archive's compiled __setstate__)"


def _refuse_untrusted(path: str, trusted: bool, what: str, why: str) -> None:
    """Refuse a format whose loader runs code from the file, before torch reads it."""
    if not trusted:
        raise ValueError(
            f"{path!r} is {what}: {why}. Pass --trusted (trusted=True) only if you trust the "
            "file; a state_dict (torch.save(model.state_dict())) with --definition is read "
            "safely, with weights_only=True"
        )


def _zip_names(file: pathlib.Path) -> list[str]:
    """The member names of a zip archive; ``[]`` for anything else."""
    if not zipfile.is_zipfile(file):
        return []
    try:
        with zipfile.ZipFile(file) as z:
            return z.namelist()
    except (zipfile.BadZipFile, OSError, ValueError) as e:
        raise ValueError(f"{str(file)!r}: a damaged zip archive ({e})") from None


def load_model(path: str, *, definition: str | None = None, trusted: bool = False) -> Loaded:
    """Read MODEL (module docstring table); errors name the file and what to pass.

    >>> load_model("/nonexistent.pt")
    Traceback (most recent call last):
      ...
    ValueError: MODEL '/nonexistent.pt' does not exist
    """
    file = pathlib.Path(path)
    if file.is_dir():
        raise ValueError(
            f"MODEL {path!r} is a directory; pass a saved model file (a state_dict .pt, "
            "a TorchScript archive or a torch.export .pt2)"
        )
    if not file.is_file():
        raise ValueError(f"MODEL {path!r} does not exist")
    import torch

    from qjax.converters._torch_io import _first_line, _load

    names = _zip_names(file)
    if _is_pt2(file, names):
        _refuse_untrusted(path, trusted, "a torch.export .pt2 program", _PT2_WHY)
        if not names:
            raise ValueError(f"{path!r}: not a readable .pt2 file (not a zip archive; truncated?)")
        _register_quantized_decomposed()
        try:
            ep = torch.export.load(str(file))
        except Exception as e:  # torch raises many types for bad archives
            raise ValueError(
                f"{path!r}: torch.export.load failed ({type(e).__name__}: {_first_line(e)})"
            ) from None
        ex = getattr(ep, "example_inputs", None)
        return Loaded("pt2", ep, tuple(ex[0]) if ex else None)
    if _is_torchscript(names):
        _refuse_untrusted(path, trusted, "a TorchScript archive", _TS_WHY)
        if definition is None:
            raise ValueError(
                f"{path!r} is TorchScript, which has no FX graph to import: pass "
                "--definition FILE.py:FUNCTION returning the converted model's eager structure "
                "(its weights are copied from the TorchScript file)"
            )
        try:
            script = torch.jit.load(str(file), map_location="cpu")
        except Exception as e:
            raise ValueError(
                f"{path!r}: torch.jit.load failed ({type(e).__name__}: {_first_line(e)})"
            ) from None
        return Loaded("torchscript", _from_torchscript(script, _build(definition)))
    # one safe loader for the library and the CLI: weights_only=True unless trusted
    try:
        obj = _load(torch, str(file), repr(path), trusted)
    except ValueError as e:
        # a pickle weights_only refuses may be a whole model: say how to opt in
        hint = "" if trusted else " (if you trust the file: --trusted)"
        raise ValueError(f"{e}{hint}") from None
    if isinstance(obj, Mapping):
        if definition is None:
            raise ValueError(
                f"{path!r} is a state_dict: pass --definition FILE.py:FUNCTION returning the "
                "module it belongs to (the converted model's structure)"
            )
        module = _build(definition)
        module.load_state_dict(obj)
        return Loaded("state_dict", module.eval())
    if isinstance(obj, torch.nn.Module):
        try:
            return Loaded("module", obj.eval())
        except AttributeError as e:  # e.g. torch 2.13's quantized conv modules after pickling
            raise ValueError(
                f"torch could not restore the pickled model {path!r} ({e}); save its "
                "state_dict and pass --definition instead"
            ) from None
    raise TypeError(f"{path!r} holds a {type(obj).__name__}, not a model or a state_dict")


def load_inputs(
    shapes: Sequence[str] | None, files: Sequence[str] | None, seed: int, example=None
) -> tuple[np.ndarray, ...]:
    """Float32 inputs: ``.npy`` files, or standard normal arrays of ``shapes`` ("1,3,8,8").

    >>> [x.shape for x in load_inputs(["2,4"], None, 0)]
    [(2, 4)]
    >>> load_inputs(["2,x"], None, 0)
    Traceback (most recent call last):
      ...
    ValueError: --input-shape '2,x' must be comma-separated positive integers
    """
    if files:
        out = []
        for f in files:
            try:
                a = np.load(f, allow_pickle=False)
            except FileNotFoundError:
                raise ValueError(f"--inputs {f!r}: no such file") from None
            except (ValueError, OSError) as e:  # not .npy, or pickled objects (refused)
                raise ValueError(f"--inputs {f!r}: not a readable .npy array ({e})") from None
            if not np.issubdtype(a.dtype, np.floating):
                raise TypeError(f"--inputs {f!r}: expected a float array, got dtype {a.dtype}")
            out.append(a.astype(np.float32))
        return tuple(out)
    if shapes:
        rng = np.random.default_rng(seed)
        out = []
        for s in shapes:
            try:
                dims = tuple(int(d) for d in s.split(","))
            except ValueError:
                dims = ()
            if not dims or min(dims) <= 0:
                raise ValueError(f"--input-shape {s!r} must be comma-separated positive integers")
            out.append(rng.standard_normal(dims).astype(np.float32))
        return tuple(out)
    if example is not None:
        return tuple(np.asarray(t.detach().cpu().numpy(), np.float32) for t in example)
    raise ValueError("give the inputs: --input-shape 1,3,32,32 (random) or --inputs x.npy")


def import_program(
    loaded: Loaded, inputs: tuple, engine: str, pt2e_mode: str = "integer", isa=None
):
    """The qjax program for ``loaded`` (``import_model`` at CPU level ``isa``, or
    ``import_pt2e``: a pt2e graph runs float kernels in torch, the same on every level)."""
    import torch

    xs = tuple(torch.from_numpy(np.asarray(x)) for x in inputs)
    if loaded.kind == "pt2":
        from qjax.converters.pt2e import import_pt2e
        from qjax.kernels import engine as engine_at

        # pt2e imports take requantization schemes: the engine's linear scheme (the table)
        scheme = engine_at(engine).linear
        return import_pt2e(loaded.model, xs, mode=pt2e_mode, scheme=scheme)
    from qjax.converters.torch import import_model

    if engine in torch.backends.quantized.supported_engines:  # torch computes the reference
        torch.backends.quantized.engine = engine
    return import_model(loaded.model, xs, engine=engine, isa=isa)


def reference_trace(loaded: Loaded, program, inputs: tuple) -> dict[str, np.ndarray]:
    """torch's codes under the program's trace names (what :func:`qjax.parity.compare_traces`
    takes as the reference)."""
    import torch

    xs = tuple(torch.from_numpy(np.asarray(x)) for x in inputs)
    if loaded.kind != "pt2":
        from qjax.converters.torch import torch_trace

        return torch_trace(loaded.model, *xs)
    from qjax.converters._pt2e_graph import pt2e_trace

    return pt2e_trace(loaded.model, *xs)
