"""The conformance suite as a pytest plugin, so a vendor runs it with the tools it already has.

Usage (from any directory, with the vendor's package installed)::

    pytest -p anyaccel.conformance.pytest_plugin --pyargs anyaccel.conformance --anyaccel-backend acme

or, when the plugin is registered under the ``pytest11`` entry point, simply
``pytest --pyargs anyaccel.conformance --anyaccel-backend acme``. Without the plugin loaded the same test module
reads the environment instead (``ANYACCEL_CONFORMANCE_BACKEND=acme pytest --pyargs anyaccel.conformance``).

Options (each also read from the environment variable in brackets):

``--anyaccel-backend NAME`` (``ANYACCEL_CONFORMANCE_BACKEND``, comma-separated)
    backend(s) to test, repeatable; default: every available backend.
``--anyaccel-family NAME`` (``ANYACCEL_CONFORMANCE_FAMILY``)
    op family to test, repeatable; default: all.
``--anyaccel-dtype NAME`` (``ANYACCEL_CONFORMANCE_DTYPE``)
    float32 / float16 / bfloat16 (or fp32, fp16, bf16), repeatable; default: all three.
``--anyaccel-examples N`` (``ANYACCEL_CONFORMANCE_EXAMPLES``)
    hypothesis-drawn cases per family and dtype (default 10).
``--anyaccel-strict`` (``ANYACCEL_CONFORMANCE_STRICT=1``)
    a case no kernel supports is an error instead of running through the fallback; so is a model whose ops fall
    back.
``--anyaccel-allow-unsupported`` (``ANYACCEL_CONFORMANCE_ALLOW_UNSUPPORTED=1``)
    a case that could not run here (``not run``: a reference dependency or checkpoint missing) is skipped
    instead of failing.

Each unit of the runner's plan is one test item with the id ``backend-family-dtype-case name``; it runs exactly
what ``anyaccel conformance`` runs: one item per op case, per collective case (the backend's collectives run once,
in the first of its items), per (model, dtype), and one ``coverage`` item per backend after its op cases. A
``fail`` or ``error`` fails the item with the reason; an ``unsupported`` case is skipped with its reason; a ``not
run`` case fails with its reason (how to install what is missing) unless unsupported cases are allowed; a pass
through the core's fallback passes (the fallback is reported in the item's output). The coverage item is skipped
when not every op case of its backend ran (``-k`` or ``--deselect``).
"""
from __future__ import annotations

import os
from typing import Any, List, Optional, Sequence

import pytest

__all__ = ["pytest_addoption", "generate", "check", "plan_from_config", "allow_unsupported"]

_ENV = {
    "backend": "ANYACCEL_CONFORMANCE_BACKEND",
    "family": "ANYACCEL_CONFORMANCE_FAMILY",
    "dtype": "ANYACCEL_CONFORMANCE_DTYPE",
    "examples": "ANYACCEL_CONFORMANCE_EXAMPLES",
    "strict": "ANYACCEL_CONFORMANCE_STRICT",
    "allow_unsupported": "ANYACCEL_CONFORMANCE_ALLOW_UNSUPPORTED",
}


def pytest_collect_directory(path: Any, parent: Any) -> Any:
    """anyaccel's own source tree is the package itself (its root holds the package's ``__init__.py``); collect it
    as a plain directory, so pytest never imports that ``__init__.py`` under the clone folder's name (which fails
    in a folder such as ``anyaccel-main``). Only the installed (editable) anyaccel's root is concerned."""
    import pathlib

    import anyaccel

    root = pathlib.Path(anyaccel.__file__).resolve().parent
    if pathlib.Path(path).resolve() == root and (root / "pyproject.toml").is_file():
        return pytest.Dir.from_parent(parent, path=pathlib.Path(path))
    return None


def pytest_addoption(parser: Any) -> None:
    group = parser.getgroup("anyaccel", "anyaccel conformance")
    group.addoption("--anyaccel-backend", action="append", default=None, dest="anyaccel_backend",
                    help="backend to test (repeatable; default: every available backend)")
    group.addoption("--anyaccel-family", action="append", default=None, dest="anyaccel_family",
                    help="op family to test (repeatable; default: all)")
    group.addoption("--anyaccel-dtype", action="append", default=None, dest="anyaccel_dtype",
                    help="dtype to test (repeatable; default: float32, float16, bfloat16)")
    group.addoption("--anyaccel-examples", type=int, default=None, dest="anyaccel_examples",
                    help="hypothesis-drawn cases per family and dtype (default 10)")
    group.addoption("--anyaccel-strict", action="store_true", default=None, dest="anyaccel_strict",
                    help="treat a case no kernel supports as an error instead of using the fallback")
    group.addoption("--anyaccel-allow-unsupported", action="store_true", default=None,
                    dest="anyaccel_allow_unsupported",
                    help="skip, instead of failing, cases that could not run here (a reference dependency missing)")


def _opt(config: Any, name: str) -> Any:
    try:
        value = config.getoption(f"anyaccel_{name}")
    except (ValueError, AttributeError):
        value = None
    if value is not None:
        return value
    raw = os.environ.get(_ENV[name], "").strip()
    if not raw:
        return None
    if name in ("backend", "family", "dtype"):
        return [x.strip() for x in raw.split(",") if x.strip()]
    if name == "examples":
        return int(raw)
    return raw.lower() in ("1", "true", "yes", "on")


def plan_from_config(config: Any) -> List[Any]:
    """The runner's plan for the options of this pytest run."""
    from ..plugins import get_registry
    from . import runner

    reg = get_registry()
    names: Optional[Sequence[str]] = _opt(config, "backend")
    if names:
        backends = []
        for n in dict.fromkeys(names):
            try:
                b = reg.get(n)
            except Exception as e:
                raise pytest.UsageError(f"anyaccel: {' '.join(str(e).split())}") from None
            if not b.available:
                raise pytest.UsageError(f"anyaccel: backend '{n}' is not available here: {b.reason}")
            backends.append(b)
    else:
        backends = reg.available()
    try:
        dtypes = [runner.dtype_from_name(d) for d in _opt(config, "dtype") or ()] or list(runner.DEFAULT_DTYPES)
    except ValueError as e:
        raise pytest.UsageError(f"anyaccel: {e}") from None
    examples = _opt(config, "examples")
    return runner.plan(backends, dtypes, _opt(config, "family"),
                       examples=runner.DEFAULT_EXAMPLES if examples is None else examples,
                       strict=bool(_opt(config, "strict")), check_coverage=True)


def generate(metafunc: Any) -> None:
    """Parametrize the ``anyaccel_case`` argument with one item per planned case (call from
    ``pytest_generate_tests``)."""
    if "anyaccel_case" not in metafunc.fixturenames:
        return
    work = plan_from_config(metafunc.config)
    metafunc.parametrize("anyaccel_case", work, ids=[w.id for w in work])


def check(planned: Any, allow_unsupported: Optional[bool] = None) -> None:
    """Run one planned unit and turn its records into a pytest outcome."""
    results = planned.run()
    if not results and getattr(planned, "note", ""):
        pytest.skip(planned.note)
    bad = [r for r in results if r.status in ("fail", "error")]
    not_run = [r for r in results if r.status == "not run"]
    for r in results:
        if r.fallback or r.max_abs_err is not None:
            print(f"{r.backend} {r.op} {r.dtype} [{r.name}]: {r.status} kernel={r.kernel} fallback={r.fallback} "
                  f"max_abs_err={r.max_abs_err} tolerance={r.tolerance} {r.reason}")
    if bad:
        pytest.fail("\n".join(f"{r.status.upper()} {r.backend} {r.op} {r.dtype} [{r.name}]: max_abs_err="
                              f"{r.max_abs_err} tolerance={r.tolerance}: {r.reason}" for r in bad), pytrace=False)
    if not_run and not allow_unsupported:
        pytest.fail("\n".join(f"NOT RUN {r.backend} {r.op} {r.dtype} [{r.name}]: {r.reason} (pass "
                              f"--anyaccel-allow-unsupported to skip instead)" for r in not_run), pytrace=False)
    if results and all(r.status in ("unsupported", "not run") for r in results):
        pytest.skip("; ".join(r.reason for r in results))


def allow_unsupported(config: Any) -> bool:
    """Whether this pytest run lets ``not run`` cases skip (option or environment)."""
    return bool(_opt(config, "allow_unsupported"))
