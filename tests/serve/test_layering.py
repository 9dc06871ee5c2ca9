"""The serving layer's place: ``cli`` -> ``serve`` -> ``models`` -> ``core``. Serve never imports a backend, and
nothing below it (core, models, plugins, conformance, backends) imports serve."""
from __future__ import annotations

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]


def _imports(path):
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            mod = node.module or ""
            yield node.lineno, "." * node.level + mod, [a.name for a in node.names]
        elif isinstance(node, ast.Import):
            for a in node.names:
                yield node.lineno, a.name, []


@pytest.mark.parametrize("path", sorted((ROOT / "serve").glob("*.py")), ids=lambda p: p.name)
def test_serve_never_imports_a_backend(path):
    for line, mod, names in _imports(path):
        parts = mod.lstrip(".").split(".")
        assert "backends" not in parts and "backends" not in names, f"{path.name}:{line} imports {mod}"


@pytest.mark.parametrize("folder", ["core", "models", "plugins", "conformance", "backends"])
def test_nothing_below_serve_imports_it(folder):
    bad = []
    for path in sorted((ROOT / folder).rglob("*.py")):
        for line, mod, names in _imports(path):
            if "serve" in mod.lstrip(".").split(".") or (mod.strip(".") == "" and "serve" in names):
                bad.append(f"{path.relative_to(ROOT)}:{line}: {mod}")
    assert not bad, "imports of the serving layer from below it:\n" + "\n".join(bad)
