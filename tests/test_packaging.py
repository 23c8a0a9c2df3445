"""The package layout promised in DESIGN.md: converters/ imports as qjax.converters."""

import pathlib
import tomllib

import qjax.converters

import qjax

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_converters_maps_to_top_level_folder():
    assert pathlib.Path(qjax.converters.__file__).parent == ROOT / "converters"


def test_every_package_is_listed_for_normal_installs():
    cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(cfg["packages"])
    found = {
        ".".join(p.parent.relative_to(ROOT).parts)
        for p in (ROOT / "qjax").rglob("__init__.py")
        if "__pycache__" not in p.parts
    }
    found.add("qjax.converters")
    found |= {
        "qjax.converters." + ".".join(p.parent.relative_to(ROOT / "converters").parts)
        for p in (ROOT / "converters").rglob("*/__init__.py")
    }
    assert found <= listed, f"packages missing from pyproject.toml: {sorted(found - listed)}"
    assert cfg["package-dir"]["qjax.converters"] == "converters"


def test_public_names_of_the_contract():
    for name in (
        "QuantSpec",
        "QParams",
        "qparams_from_minmax",
        "quantize",
        "dequantize",
        "fake_quant",
        "observers",
    ):
        assert name in qjax.__all__ and hasattr(qjax, name)
