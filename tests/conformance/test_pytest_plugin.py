"""The pytest plugin: a vendor's ``pytest --pyargs anyaccel.conformance --anyaccel-backend NAME`` run."""
from __future__ import annotations

import os
import subprocess
import sys

import torch


def test_pytest_plugin_runs_one_item_per_case(tmp_path):
    # The plugin is found through the package's pytest11 entry point: no -p needed.
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    junit = tmp_path / "j.xml"
    r = subprocess.run([sys.executable, "-m", "pytest", "--pyargs",
                        "anyaccel.conformance", "--anyaccel-backend", "cpu", "--anyaccel-family", "gemm",
                        "--anyaccel-dtype", "fp32", "--anyaccel-examples", "1", "-p", "no:cacheprovider", "-v",
                        f"--junitxml={junit}"],
                       capture_output=True, text=True, env=env, timeout=300, cwd=tmp_path)
    assert "test_case[cpu-gemm-float32-decode M=1 x=[1, 64] N=32 bias] PASSED" in r.stdout
    import xml.etree.ElementTree as ET

    from anyaccel.conformance.ops import gemm
    from anyaccel.plugins import get_registry

    fixed = len(gemm.fixed_cases(get_registry().get("cpu"), torch.float32))
    items = {tc.get("name"): tc for tc in ET.parse(junit).getroot().iter("testcase")}
    ops = [n for n in items if n.startswith("test_case[cpu-gemm-float32-")]
    assert len(ops) == fixed + 1 and all(len(items[n]) == 0 for n in ops)  # every fixed case + 1 drawn passed
    cover = items.pop("test_case[cpu-coverage-all-declared features reached]")  # the coverage item comes last
    assert set(items) == set(ops)
    assert r.returncode == (0 if len(cover) == 0 else 1), r.stdout[-3000:] + r.stderr[-2000:]


class _Config:
    def __init__(self, **opts):
        self.opts = opts

    def getoption(self, name):
        return self.opts.get(name.removeprefix("anyaccel_"))


def test_unknown_backend_is_a_usage_error():
    import pytest

    from anyaccel.conformance.pytest_plugin import plan_from_config
    with pytest.raises(pytest.UsageError, match="no backend named 'nosuch'"):
        plan_from_config(_Config(backend=["nosuch"]))


def test_options_fall_back_to_the_environment(monkeypatch):
    from anyaccel.conformance.pytest_plugin import plan_from_config
    monkeypatch.setenv("ANYACCEL_CONFORMANCE_BACKEND", "cpu")
    monkeypatch.setenv("ANYACCEL_CONFORMANCE_FAMILY", "gemm")
    monkeypatch.setenv("ANYACCEL_CONFORMANCE_DTYPE", "bf16")
    monkeypatch.setenv("ANYACCEL_CONFORMANCE_EXAMPLES", "0")
    work = plan_from_config(_Config())
    assert work[-1].family == "coverage"  # the backend's coverage item closes its op cases
    work = work[:-1]
    assert work and {w.id.split("-")[:3] == ["cpu", "gemm", "bfloat16"] for w in work} == {True}
    assert all(w.case is not None and "drawn" not in w.case.tags for w in work)


def test_one_item_per_collective_case_and_per_model_and_dtype():
    from anyaccel.conformance.collectives import collective_cases
    from anyaccel.conformance.pytest_plugin import plan_from_config
    from anyaccel.conformance.runner import model_names

    work = plan_from_config(_Config(backend=["cpu"], family=["collectives", "models"], dtype=["fp32", "bf16"],
                                    examples=0))
    coll = [w.id for w in work if w.family == "collectives"]
    names = [c.name for c in collective_cases(2)]
    dtype_free = [c.name for c in collective_cases(2) if c.dtype_free]
    assert len(coll) == 2 * len(names) - len(dtype_free) and len(set(coll)) == len(coll)
    assert "cpu-collectives-float32-all_reduce sum [7, 3]" in coll and "cpu-collectives---barrier" in coll
    mods = [w.id for w in work if w.family == "models"]
    assert mods == [f"cpu-models-{dt}-{m}" for m in model_names() for dt in ("float32", "bfloat16")]


class _Unit:
    def __init__(self, records, note=""):
        self.records, self.note = records, note

    def run(self):
        return list(self.records)


def test_check_fails_not_run_unless_allowed_and_skips_a_partial_coverage_unit():
    import pytest

    from anyaccel.conformance.cases import CaseResult
    from anyaccel.conformance.pytest_plugin import check

    not_run = _Unit([CaseResult("cpu", "model", "llama (every check)", "float32", "not run",
                                reason="install it with: pip install 'anyaccel[reference]'")])
    with pytest.raises(pytest.fail.Exception, match=r"NOT RUN .*pip install 'anyaccel\[reference\]'"):
        check(not_run)
    with pytest.raises(pytest.skip.Exception, match="pip install"):
        check(not_run, allow_unsupported=True)
    with pytest.raises(pytest.skip.Exception, match="only 3 ran"):
        check(_Unit([], note="coverage needs all its 9 op cases; only 3 ran"))
    check(_Unit([CaseResult("cpu", "op", "x", "float32", "pass")]))  # a pass passes
