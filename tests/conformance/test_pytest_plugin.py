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
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
    assert "test_case[cpu-gemm-float32-decode M=1 x=[1, 64] N=32 bias] PASSED" in r.stdout
    from anyaccel.conformance.ops import gemm
    from anyaccel.plugins import get_registry

    fixed = len(gemm.fixed_cases(get_registry().get("cpu"), torch.float32))
    assert f" {fixed + 1} passed" in r.stdout  # every fixed float32 case + 1 drawn


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
    assert work and {w.id.split("-")[:3] == ["cpu", "gemm", "bfloat16"] for w in work} == {True}
    assert all(w.case is not None and "drawn" not in w.case.tags for w in work)
