"""The installed distribution is exactly the import package `anyaccel`, with every subpackage listed."""
from __future__ import annotations

import pathlib
import shutil
import subprocess
import tempfile
import tomllib

import pytest

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


# -- the two README commands use two environments ---------------------------------------------------------------
# `make test` installs the example plugin packages; discovery loads every installed plugin, so in the environment
# `make conformance` uses they would add the `example` backend to every run and a kernel provider to `explain`.

EXAMPLES = ("examples/acme-anyaccel", "examples/fastnorm-anyaccel")


def _make_dry_run(target: str, **variables: str) -> list:
    """The commands ``make TARGET`` would run in a fresh clone (``make -n``, nothing built), one per line."""
    if shutil.which("make") is None:
        pytest.skip("make is not installed here; the Makefile is exercised by .ci/run instead")
    with tempfile.TemporaryDirectory() as tmp:
        # a scratch copy of what the recipes read, so no venv of this checkout makes a target up to date
        for name in ("Makefile", "pyproject.toml"):
            shutil.copy(ROOT / name, tmp)
        args = ["make", "-n", "--no-print-directory", "-C", tmp, target, *(f"{k}={v}" for k, v in variables.items())]
        r = subprocess.run(args, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    return [line.strip() for line in r.stdout.splitlines() if line.strip()]


def _venv_of(line: str) -> str:
    """The venv folder a pip/pytest/anyaccel command line runs in (``X`` of ``X/bin/...``), else ''."""
    head = line.split()[0]
    return head.split("/bin/")[0] if "/bin/" in head else ""


def test_make_test_installs_the_examples_into_its_own_venv_only():
    test_cmds = _make_dry_run("test")
    conf_cmds = _make_dry_run("conformance")
    installs = [c for c in test_cmds if any(e in c for e in EXAMPLES)]
    assert installs, "make test no longer installs the example plugin packages the tests need:\n" + "\n".join(test_cmds)
    test_venvs = {_venv_of(c) for c in installs}
    conf_venvs = {_venv_of(c) for c in conf_cmds if _venv_of(c)}
    assert conf_venvs, "make conformance runs no command inside a venv:\n" + "\n".join(conf_cmds)
    assert not test_venvs & conf_venvs, (
        f"make test installs the example plugins into {sorted(test_venvs)}, which make conformance also uses "
        f"({sorted(conf_venvs)}): a later conformance run would test the example backend too")
    assert not any(e in c for c in conf_cmds for e in EXAMPLES), "make conformance installs the example plugins"
    # pytest runs where the examples are
    pytest_venvs = {_venv_of(c) for c in test_cmds if " -m pytest" in c}
    assert pytest_venvs == test_venvs, (pytest_venvs, test_venvs)


def test_make_variables_keep_the_two_venvs_apart():
    """Overriding the venv names on the command line still keeps them apart (they are variables, not literals)."""
    cmds = _make_dry_run("test", VENV="envA", TEST_VENV="envB")
    assert all(_venv_of(c) in ("", "envB") for c in cmds), "\n".join(cmds)


def test_both_venvs_are_ignored_by_git_and_cleaned():
    ignored = {line.strip() for line in (ROOT / ".gitignore").read_text().splitlines()}
    assert {".venv/", ".venv-test/"} <= ignored
    clean = _make_dry_run("clean")
    assert any(".venv-test" in c and ".venv " in c + " " for c in clean), clean


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    quick = readme.split("## Quick start", 1)[1].split("```bash", 1)[1].split("```", 1)[0]
    commands = [line.split("#")[0].strip() for line in quick.splitlines() if line.strip()]
    assert commands == ["make conformance", "make test"], commands
    ci = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()
          if line.strip() and not line.lstrip().startswith("#")]
    assert "make test" in ci, ci


def test_tests_run_from_a_clone_whose_folder_is_not_an_identifier(tmp_path):
    """A clone named like GitHub's archive folder ("anyaccel-main") runs its tests: pytest must not import the
    repository root's __init__.py as a package named after the folder (the conformance pytest plugin collects
    the source root of the anyaccel being imported as a plain directory)."""
    import os
    import sys

    clone = tmp_path / "anyaccel-main"
    shutil.copytree(ROOT, clone, ignore=shutil.ignore_patterns(".git", ".venv*", "__pycache__", "*.egg-info",
                                                                 "build", "reports", ".hypothesis"))
    (tmp_path / "path").mkdir()
    os.symlink(clone, tmp_path / "path" / "anyaccel")      # `import anyaccel` -> this copy
    env = {**os.environ, "PYTHONPATH": str(tmp_path / "path"), "HF_HUB_OFFLINE": "1"}
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "tests/test_neutrality.py", "-k", "core_imports"],
                       cwd=clone, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and " passed" in r.stdout, r.stdout[-2000:] + r.stderr[-2000:]
