"""Neutral code (core/, models/, conformance/) never names a vendor or a backend, and core imports nothing of ours."""
from __future__ import annotations

import ast
import io
import pathlib
import re
import tokenize

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
NEUTRAL = ("core", "models", "conformance")
# Names of built-in backends, vendors and transports. Docstrings and comments may mention them as examples;
# code (identifiers and string literals that are not docstrings) may not.
FORBIDDEN = re.compile(r"\b(cuda|rocm|hip|triton|nvidia|amd|nccl|rccl|gloo|cublas|hipblas)\b", re.IGNORECASE)


def _files(folder):
    return sorted((ROOT / folder).rglob("*.py"))


def _docstring_lines(tree):
    lines = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) and isinstance(first.value.value, str):
                lines.update(range(first.lineno, first.end_lineno + 1))
    return lines


@pytest.mark.parametrize("path", [p for f in NEUTRAL for p in _files(f)], ids=lambda p: str(p.relative_to(ROOT)))
def test_neutral_code_names_no_vendor_or_backend(path):
    src = path.read_text()
    skip = _docstring_lines(ast.parse(src))
    bad = []
    for tok in tokenize.generate_tokens(io.StringIO(src).readline):
        if tok.type in (tokenize.NAME, tokenize.STRING) and tok.start[0] not in skip and FORBIDDEN.search(tok.string):
            bad.append(f"{path.name}:{tok.start[0]}: {tok.string[:60]}")
    assert not bad, "vendor or backend names in neutral code:\n" + "\n".join(bad)


@pytest.mark.parametrize("path", _files("core"), ids=lambda p: p.name)
def test_core_imports_nothing_of_ours_but_core(path):
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level >= 2:
            pytest.fail(f"{path.name}:{node.lineno} imports from outside core (level {node.level} relative import)")
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
            assert not any(n.startswith("anyaccel.") and not n.startswith("anyaccel.core") for n in names), (
                f"{path.name}:{node.lineno}")


@pytest.mark.parametrize("path", _files("models"), ids=lambda p: p.name)
def test_models_never_import_a_backend(path):
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            mod = node.module or ""
            assert "backends" not in mod.split("."), f"{path.name}:{node.lineno} imports {mod}"
