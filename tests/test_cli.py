"""The command line, run as users run it: ``python -m anyaccel ...`` in a subprocess."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import xml.etree.ElementTree as ET

import pytest

from anyaccel.cli import CliError, parse_dtype


def _run(*args: str, timeout: float = 120):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "COLUMNS": "160"}
    env.pop("ANYACCEL_STRICT", None)
    return subprocess.run([sys.executable, "-m", "anyaccel", *args], capture_output=True, text=True, env=env,
                          timeout=timeout)


def test_backends_json_shape():
    r = _run("backends", "--json")
    assert r.returncode == 0, r.stderr
    data = json.loads(r.stdout)
    assert set(data) >= {"backends", "quarantined"}
    cpu = next(b for b in data["backends"] if b["name"] == "cpu")
    for key in ("name", "available", "reason", "package", "version", "api_version", "ops"):
        assert key in cpu
    assert cpu["available"] is True and cpu["package"] == "anyaccel"
    assert "gemm" in cpu["ops"] and cpu["ops"]["gemm"][0]["provider"] == "anyaccel"
    unavailable = [b for b in data["backends"] if not b["available"]]
    assert all(b["reason"] for b in unavailable)


def test_backends_table():
    r = _run("backends")
    assert r.returncode == 0 and "cpu" in r.stdout and "cpu.gemm.addmm [anyaccel]" in r.stdout


def test_explain_subprocess_prints_the_choice():
    r = _run("explain", "gemm", "--backend", "cpu", "--dtype", "bf16", "--bias", "--in-features", "64")
    assert r.returncode == 0, r.stderr
    assert "chosen: cpu.gemm.addmm" in r.stdout and "bias=True" in r.stdout and "K=64" in r.stdout


class _Reg:
    """A registry of one throwaway backend, for in-process CLI tests."""

    def __init__(self, backend):
        self.backends = {backend.name: backend}
        self.quarantined, self.warnings = [], []

    def get(self, name):
        from anyaccel.core import UnsupportedError
        if name not in self.backends:
            raise UnsupportedError(f"no backend named '{name}'")
        return self.backends[name]

    def available(self):
        return [b for b in self.backends.values() if b.available]


def test_explain_lists_rejected_candidates_with_reasons(monkeypatch, capsys):
    import torch

    from anyaccel import cli
    from anyaccel.backends.cpu.gemm import KERNELS
    from anyaccel.core import Backend, BackendDef, GemmCapability, KernelImpl

    fast = KernelImpl(op="gemm", backend="two", name="two.gemm.fast", build=KERNELS[0].build, priority=20,
                      capability=GemmCapability(dtypes=frozenset({torch.float16})), provider="acme-fast")
    slow = KernelImpl(op="gemm", backend="two", name="two.gemm.slow", build=KERNELS[0].build, priority=5,
                      capability=GemmCapability(), provider="acme")
    b = Backend.local(BackendDef(name="two", vendor="t", device_type="cpu"), [fast, slow])
    monkeypatch.setattr(cli, "_registry", lambda: _Reg(b))
    assert cli.main(["explain", "gemm", "--backend", "two", "--dtype", "bf16"]) == 0
    out = capsys.readouterr().out
    assert "chosen: two.gemm.slow" in out and "rejected:" in out
    assert "two.gemm.fast [from acme-fast, priority 20]: dtype bfloat16 not in supported dtypes" in out
    assert cli.main(["explain", "gemm", "--backend", "two", "--dtype", "fp16", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["chosen"] == "two.gemm.fast"
    assert [c["name"] for c in data["candidates"] if not c["chosen"]] == ["two.gemm.slow"]


def test_explain_unknown_op_lists_ops():
    r = _run("explain", "nosuchop", "--backend", "cpu")
    assert r.returncode == 2 and "known ops:" in r.stderr and "gemm" in r.stderr
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_conformance_writes_reports_and_exits_zero(tmp_path):
    j, x, m = tmp_path / "r.json", tmp_path / "r.xml", tmp_path / "r.md"
    r = _run("conformance", "--backend", "cpu", "--family", "gemm", "--dtype", "fp32", "--dtype", "bf16",
             "--examples", "2", "--json", str(j), "--junit", str(x), "--markdown", str(m))
    assert "Traceback" not in r.stderr, r.stderr
    data = json.loads(j.read_text())
    assert set(data) == {"environment", "summary", "cases", "coverage"}
    # the exit status is the report's: 0 unless a declared feature went unreached (a coverage error)
    assert r.returncode == data["summary"]["exit_code"] == (1 if data["summary"]["coverage_unreached"] else 0)
    assert data["summary"]["fail"] == 0 and data["summary"]["total"] == len(data["cases"]) > 10
    assert {c["dtype"] for c in data["cases"]} == {"float32", "bfloat16"}
    assert {c["status"] for c in data["cases"] if c["kind"] != "coverage"} == {"pass"}
    assert {(r["feature"], r["dtype"]) for r in data["coverage"]} >= {("bias", "float32"), ("no bias", "bfloat16")}
    tests = len(data["cases"]) + sum(len(v) for v in data["environment"]["not_loaded"].values())
    assert ET.parse(x).getroot().get("tests") == str(tests)
    assert "## Matrix" in m.read_text() and "## Coverage" in m.read_text()
    assert "pass" in r.stdout and "gemm" in r.stdout and "coverage: cases that reached" in r.stdout


def test_conformance_bad_dtype_is_one_line_exit_2():
    bad_dtype = _run("conformance", "--backend", "cpu", "--dtype", "fp8")
    assert bad_dtype.returncode == 2 and "unknown dtype 'fp8'" in bad_dtype.stderr
    assert "Traceback" not in bad_dtype.stderr and len(bad_dtype.stderr.strip().splitlines()) == 1


def test_conformance_unknown_backend_or_family_exits_2(capsys):
    from anyaccel import cli

    assert cli.main(["conformance", "--backend", "nosuch"]) == 2
    assert "no backend named 'nosuch'" in capsys.readouterr().err
    assert cli.main(["conformance", "--backend", "cpu", "--family", "nosuchfamily"]) == 2
    assert "known families" in capsys.readouterr().err


def test_conformance_unavailable_backend_exits_2_with_reason(capsys):
    from anyaccel import cli
    from anyaccel.plugins import get_registry

    gone = [b for b in get_registry().backends.values() if not b.available]
    if not gone:
        pytest.skip("every backend is available on this machine")
    assert cli.main(["conformance", "--backend", gone[0].name]) == 2
    err = capsys.readouterr().err
    assert "not available here" in err and " ".join(gone[0].reason.split()) in err


def test_conformance_failure_exit_code_in_process(monkeypatch, capsys):
    """A failing case gives exit status 1 (in process, with a planted-bug backend)."""
    import torch

    from anyaccel import cli
    from anyaccel.backends.cpu.gemm import KERNELS
    from anyaccel.core import Backend, BackendDef, KernelImpl

    real = KERNELS[0]
    k = KernelImpl(op="gemm", backend="bad", name="bad.gemm", priority=1, capability=real.capability,
                   build=lambda spec: (lambda x, w, b, out: real.build(spec)(x, w, None, out)))
    bad = Backend.local(BackendDef(name="bad", vendor="t", device_type="cpu"), [k])

    monkeypatch.setattr(cli, "_registry", lambda: _Reg(bad))
    rc = cli.main(["conformance", "--backend", "bad", "--family", "gemm", "--dtype", "float32", "--examples", "0",
                   "--quiet"])
    assert rc == 1
    assert "fail" in capsys.readouterr().out


@pytest.mark.parametrize("text,expected", [("fp32", "float32"), ("f32", "float32"), ("half", "float16"),
                                           ("fp16", "float16"), ("bf16", "bfloat16"), ("torch.bfloat16", "bfloat16")])
def test_dtype_aliases(text, expected):
    import torch
    assert parse_dtype(text) == getattr(torch, expected)


def test_bad_dtype_raises_cli_error():
    with pytest.raises(CliError, match="expected one of float32, float16, bfloat16"):
        parse_dtype("int3")


def test_explain_and_backends_name_the_kernel_provider_that_overrides(monkeypatch, capsys):
    import torch

    from anyaccel import cli
    from anyaccel.backends.cpu.gemm import KERNELS
    from anyaccel.core import Backend, BackendDef, GemmCapability, KernelImpl

    own = KernelImpl(op="gemm", backend="own", name="own.gemm", build=KERNELS[0].build, priority=10,
                     capability=GemmCapability(), provider="own-pkg")
    fast = KernelImpl(op="gemm", backend="own", name="turbo.gemm", build=KERNELS[0].build, priority=30,
                      capability=GemmCapability(dtypes=frozenset({torch.bfloat16})), provider="turbo-pkg")
    b = Backend(BackendDef(name="own", vendor="t", device_type="cpu"), package="own-pkg", version="2.0",
                kernels=(own, fast))
    monkeypatch.setattr(cli, "_registry", lambda: _Reg(b))
    assert cli.main(["explain", "gemm", "--backend", "own", "--dtype", "bf16"]) == 0
    out = capsys.readouterr().out
    assert "backend 'own' is supplied by own-pkg 2.0" in out
    assert "kernel provider turbo-pkg overrides own.gemm (higher declared priority)" in out
    assert cli.main(["explain", "gemm", "--backend", "own", "--dtype", "fp32"]) == 0
    out = capsys.readouterr().out
    assert "chosen: own.gemm" in out and "kernel provider" not in out
    data = cli.backends_json()["backends"][0]
    assert data["kernel_providers"] == [{"package": "turbo-pkg", "version": "", "kernels": ["turbo.gemm"],
                                         "overrides": ["own.gemm"]}]
    assert [k["overrides"] for k in data["ops"]["gemm"]] == [["own.gemm"], []]
    assert cli.main(["backends"]) == 0
    table = capsys.readouterr().out
    assert "kernel providers" in table and "turbo-pkg" in table


def test_conformance_help_lists_families_and_the_opt_out():
    from anyaccel.conformance.runner import families

    r = _run("conformance", "--help")
    assert r.returncode == 0
    text = " ".join(r.stdout.split())
    assert all(f in text for f in families()) and "collectives, models" in text
    assert "--allow-unsupported" in text and "pip install 'anyaccel[reference]'" in text
    assert "not run" in text and "coverage" in text


_NO_TRANSFORMERS = ("import sys; sys.modules['transformers'] = None; from anyaccel.cli import main; "
                    "raise SystemExit(main(sys.argv[1:]))")


@pytest.mark.parametrize("quiet", [False, True])
def test_conformance_without_transformers_exits_non_zero_with_one_install_line(quiet):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "COLUMNS": "160"}
    args = ["conformance", "--backend", "cpu", "--model", "llama", "--model", "gpt2", "--dtype", "fp32",
            *(["--quiet"] if quiet else [])]
    r = subprocess.run([sys.executable, "-c", _NO_TRANSFORMERS, *args], capture_output=True, text=True, env=env,
                       timeout=300)
    assert r.returncode == 1, r.stdout + r.stderr
    lines = [ln for ln in r.stdout.splitlines() if "pip install 'anyaccel[reference]'" in ln]
    assert len(lines) == 1 and "transformers" in lines[0], r.stdout
    assert "2 not run" in r.stdout
    ok = subprocess.run([sys.executable, "-c", _NO_TRANSFORMERS, *args, "--allow-unsupported"], capture_output=True,
                        text=True, env=env, timeout=300)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "2 not run" in ok.stdout and "(not-run cases allowed)" in ok.stdout
