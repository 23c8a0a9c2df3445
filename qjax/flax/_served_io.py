"""The served-program file: :func:`save_served` and :func:`load_served` (safetensors + JSON).

:func:`save_served` writes a program from :func:`qjax.convert` (a
:class:`~qjax.flax._convert.TracedProgram`) or from a torch / pt2e importer (a
:class:`~qjax.Program` whose steps carry their description, ``Step.spec``;
:mod:`qjax.flax._imported_io`) to one ``.safetensors`` file in format
``qjax.program`` (:mod:`qjax.flax._program_io`: the integer and float arrays as tensors,
the steps as JSON in the file's metadata); nothing is pickled, and the write is atomic
(:func:`_write_atomic`). :func:`load_served` trusts nothing in the file: every step,
field, dtype and shape is checked by :func:`~qjax.flax._program_io.load_program`, and a
file is either loaded as the program it describes or refused with a ``ValueError`` naming
the step, the key and the bad value.

Files of the older format ``qjax.served`` (version 1, the JSON-step interpreter of a
``Sequential``, removed) are refused with a ``ValueError`` that names the format and says
how to re-create the file: convert the model again with this qjax and save the program.
(They are not converted: that interpreter ran average pooling on the integer codes, which
no step of a traced program computes, so a converted file could not promise the same
numbers.)

The file holds codes and qparams, no kernel: ``load_served(path, kernel=...)`` prepares
the weights on load (:mod:`qjax.kernels._choice`).
"""

from __future__ import annotations

import json
import os

from ..kernels._choice import resolve_kernel
from ..program import Program
from ._program_io import FORMAT, VERSION, load_program, program_file

__all__ = ["load_served", "save_served"]

_OLD_FORMAT = "qjax.served"  # the removed Sequential interpreter's files: refused, named


def save_served(path: str | os.PathLike, served: Program) -> None:
    """Write ``served`` (a program from :func:`qjax.convert`) to one ``.safetensors``
    file (arrays as tensors, steps as JSON metadata, format ``qjax.program``; no pickle).
    :func:`load_served` reads it back bit for bit.

    >>> import tempfile, os
    >>> from flax import nnx
    >>> from qjax.flax import default_qat_qconfig, nnx as qnnx
    >>> import qjax, jax.numpy as jnp
    >>> cfg = default_qat_qconfig("x86")
    >>> model = nnx.Sequential(qnnx.QuantStub(cfg), qnnx.DeQuantStub())
    >>> x = jnp.array([[0.3, 1.0, -9.0]])
    >>> qnnx.calibrate(model, [x], progress=False)
    1
    >>> p = os.path.join(tempfile.mkdtemp(), "m.safetensors")
    >>> save_served(p, qjax.convert(model, x))
    >>> bool((load_served(p)(x) == qjax.convert(model, x)(x)).all())
    True

    The write is atomic: the bytes go to a hidden temporary file in the target's folder,
    which is renamed over the target once complete, so a reader never sees half a file.
    The file gets the mode of any new file (``0o666`` less the umask), a symlink is
    followed (its target is written, the link stays), and an exception or
    ``KeyboardInterrupt`` during the write removes the temporary file; a process killed
    outright (``kill -9``, power loss) can leave a ``.<name>.*.tmp`` file behind. An
    ``OSError`` (e.g. ``PermissionError``) names ``path``.
    """
    from safetensors.numpy import save

    if not isinstance(served, Program):
        raise TypeError(
            "save_served: expected a qjax.Program (from qjax.convert or a torch / pt2e "
            f"importer), got {type(served).__name__}"
        )
    meta, tensors = program_file(served)
    _write_atomic(os.fspath(path), save(tensors, metadata={"qjax": json.dumps(meta)}))


def _write_atomic(path: str, data: bytes) -> None:
    """``data`` to ``path`` through a temporary file in the same folder and a rename
    (see :func:`save_served`)."""
    import tempfile

    target = os.path.realpath(path)  # a symlink: write its target, keep the link
    folder, name = os.path.split(target)
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=folder)
        with os.fdopen(fd, "wb") as f:
            umask = os.umask(0)
            os.umask(umask)
            os.fchmod(f.fileno(), 0o666 & ~umask)  # mkstemp makes 0600; follow the umask
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
        tmp = None
    except OSError as e:
        raise type(e)(e.errno, f"save_served: cannot write {path!r} ({e.strerror or e})") from e
    finally:
        if tmp is not None:
            try:
                os.unlink(tmp)
            except OSError:
                pass


def load_served(path: str | os.PathLike, *, kernel: str = "xla") -> Program:
    """Read a :func:`save_served` file (``ValueError`` if it is not one).

    The file holds codes and qparams, no kernel: ``kernel`` (``"xla"``, ``"amx"`` or
    ``"auto"``, :mod:`qjax.kernels._choice`) prepares the weights on load, the same codes
    either way (``RuntimeError`` naming the reason for ``"amx"`` on a machine without it).
    A Flax program's linear layers take the kernels ``qjax.convert`` gave them with the
    same ``kernel`` (below VNNI, ``"sat16"`` where the spec of the codes a layer reads,
    known from the file's steps, proves its pair sums exact).

    >>> load_served(__file__)  # doctest: +ELLIPSIS
    Traceback (most recent call last):
      ...
    ValueError: load_served: ... is not a qjax served-model safetensors file ...
    """
    from safetensors import safe_open

    wish = resolve_kernel(kernel, "qjax.load_served")
    path = os.fspath(path)
    where = f"load_served: {path!r}"
    try:  # safetensors reports an unreadable file as 'No such file or directory'
        with open(path, "rb"):
            pass
    except OSError as e:
        why = "permission denied" if isinstance(e, PermissionError) else (e.strerror or e)
        raise ValueError(f"load_served: cannot read {path!r} ({why})") from None
    try:
        with safe_open(path, framework="np") as f:
            text = (f.metadata() or {}).get("qjax")
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    except Exception as e:  # safetensors raises its own error types
        raise ValueError(
            f"load_served: {path!r} is not a qjax served-model safetensors file ({e})"
        ) from None
    if text is None:
        raise ValueError(
            f"load_served: {path!r} is not a qjax served-model safetensors file (no 'qjax' "
            "metadata)"
        )
    try:
        meta = json.loads(text)
    except ValueError as e:
        raise ValueError(f"{where}: metadata is not JSON ({e})") from None
    if not isinstance(meta, dict):
        raise ValueError(f"{where}: metadata is a {type(meta).__name__}, not a JSON object")
    if meta.get("format") == FORMAT and meta.get("version") == VERSION:
        return load_program(meta, tensors, wish, where)
    if meta.get("format") == _OLD_FORMAT:
        raise ValueError(
            f"load_served: {path!r} holds format {_OLD_FORMAT!r} version "
            f"{meta.get('version')!r}, written by an older qjax for its Sequential "
            f"interpreter, which this qjax no longer has; it reads {FORMAT!r} version "
            f"{VERSION}. Re-create the file: convert the model again with this qjax "
            "(qjax.convert(model, example_input)) and save it (qjax.save_served)"
        )
    raise ValueError(
        f"load_served: {path!r} holds format {meta.get('format')!r} version "
        f"{meta.get('version')!r}; this qjax reads {FORMAT!r} version {VERSION}"
    )
