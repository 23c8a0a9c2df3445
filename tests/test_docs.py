"""Every public function documents its formula with a runnable example (a doctest)."""

import inspect

import pytest

import qjax
from qjax import observers


def _public(mod):
    for name in mod.__all__:
        obj = getattr(mod, name)
        if inspect.isfunction(obj):
            yield f"{mod.__name__}.{name}", obj


@pytest.mark.parametrize(
    "name,fn",
    # ids are the names alone: pytest-xdist needs the same ids in every worker
    [pytest.param(n, f, id=n) for n, f in list(_public(qjax)) + list(_public(observers))],
)
def test_public_function_has_docstring_with_doctest(name, fn):
    doc = inspect.getdoc(fn) or ""
    assert len(doc.splitlines()) >= 3, f"{name} needs a docstring with its formula"
    assert ">>>" in doc, f"{name} needs a doctest example"
