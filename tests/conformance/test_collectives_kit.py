"""The collectives kit's command line: ``--world-size`` and ``--dist-backend`` reach run_collectives (checked with
a fake run, no processes), a backend that declares no transport can be tested over a named one, and a world
size below 2 is a usage error."""
from __future__ import annotations

import sys
import types

from anyaccel.cli import main
from anyaccel.conformance import runner
from anyaccel.conformance.cases import CaseResult
from anyaccel.core.backend import Backend, BackendDef
from anyaccel.core.validation import dtype_name


def _fake(monkeypatch, calls):
    fake = types.ModuleType("anyaccel.conformance.collectives")
    fake.collective_cases = lambda world_size: [types.SimpleNamespace(name=f"all_reduce sum x{world_size}",
                                                                      dtype_free=False)]

    def run_collectives(backend, dtypes, world_size=2, timeout=60.0, **kw):
        calls.append((backend.name, world_size, kw.get("dist_backend")))
        return [CaseResult(backend.name, "collective", f"all_reduce sum x{world_size}", dtype_name(dt), "pass",
                           op="all_reduce") for dt in dtypes]

    fake.run_collectives = run_collectives
    monkeypatch.setitem(sys.modules, "anyaccel.conformance.collectives", fake)


def test_world_size_and_dist_backend_reach_the_run(monkeypatch):
    calls = []
    _fake(monkeypatch, calls)
    bare = Backend.local(BackendDef(name="bare", vendor="tests", device_type="cpu"), [])
    rep = runner.run([bare], families=["collectives"], dtypes=(runner.DEFAULT_DTYPES[0],), examples=0,
                     world_size=4, dist_backend="vendorccl")
    assert calls == [("bare", 4, "vendorccl")]
    assert [(c.name, c.status) for c in rep.cases] == [("all_reduce sum x4", "pass")]
    assert rep.environment["world_size"] == 4 and rep.environment["dist_backend"] == "vendorccl"
    # without --dist-backend, a backend that declares no transport is unsupported, and nothing runs
    calls.clear()
    rep = runner.run([bare], families=["collectives"], dtypes=(runner.DEFAULT_DTYPES[0],), examples=0)
    assert calls == [] and {c.status for c in rep.cases} == {"unsupported"}


def test_cli_passes_the_flags(monkeypatch, capsys):
    calls = []
    _fake(monkeypatch, calls)
    rc = main(["conformance", "--backend", "cpu", "--family", "collectives", "--dtype", "fp32", "--world-size", "3",
               "--dist-backend", "gloo", "--quiet"])
    assert rc == 0, capsys.readouterr()
    assert calls == [("cpu", 3, "gloo")]


def test_world_size_below_two_is_a_usage_error(capsys):
    assert main(["conformance", "--backend", "cpu", "--family", "collectives", "--world-size", "1", "--quiet"]) == 2
    assert "world_size" in capsys.readouterr().err


def test_integer_dtypes_are_for_the_collectives_family_only(monkeypatch, capsys):
    calls = []
    _fake(monkeypatch, calls)
    assert main(["conformance", "--backend", "cpu", "--family", "collectives", "--dtype", "int8", "--dtype",
                 "float64", "--quiet"]) == 0
    assert calls == [("cpu", 2, None)]
    assert main(["conformance", "--backend", "cpu", "--family", "gemm", "--dtype", "int8", "--quiet"]) == 2
    assert "unknown dtype 'int8'" in capsys.readouterr().err
