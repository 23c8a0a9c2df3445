"""Module paths as text: the one way qjax joins path parts (``"encoder/fc1"``).

Every report, error message and ``where=`` regex names a module by the same string, so
NNX paths (``nnx.iter_modules``), Linen paths (``module.path``), pytree key paths and
converter targets all go through :func:`join_path`.
"""

from __future__ import annotations

from collections.abc import Iterable

__all__ = ["join_path"]


def join_path(parts: Iterable, root: str = "<root>") -> str:
    """``"a/b/0"`` from path parts; ``root`` for the empty path (the model itself).

    >>> join_path(("encoder", "layers", 0)), join_path(()), join_path((), root="")
    ('encoder/layers/0', '<root>', '')
    """
    return "/".join(str(p) for p in parts) or root
