"""The installed distribution is exactly the import package `anyaccel`, with every subpackage listed."""
from __future__ import annotations

import pathlib
import tomllib

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _pyproject():
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_every_python_package_in_the_tree_is_listed_for_installation():
    listed = set(_pyproject()["tool"]["setuptools"]["packages"])
    found = {"anyaccel"}
    for init in ROOT.rglob("__init__.py"):
        rel = init.parent.relative_to(ROOT)
        if not rel.parts or rel.parts[0] in ("tests", "docs", "build", "examples") or any(
                p.startswith(".") or p.endswith(".egg-info") for p in rel.parts):
            continue
        found.add(".".join(("anyaccel", *rel.parts)))
    assert found - listed == set(), "packages missing from pyproject's list (a non-editable install would lose them)"
    assert listed - found == set(), "pyproject lists packages that do not exist"


def test_nothing_but_anyaccel_is_installed_at_top_level():
    cfg = _pyproject()["tool"]["setuptools"]
    assert cfg["package-dir"] == {"anyaccel": "."}
    assert all(p == "anyaccel" or p.startswith("anyaccel.") for p in cfg["packages"])


def test_builtin_backends_are_registered_through_the_public_entry_point_group():
    eps = _pyproject()["project"]["entry-points"]["anyaccel.plugins"]
    assert {"cpu", "cuda", "rocm"} <= set(eps)
