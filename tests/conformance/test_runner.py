"""The conformance runner: claims checked both ways, strict mode, broken families, reproducibility."""
from __future__ import annotations

import os
import sys
import types
from dataclasses import dataclass, field
from typing import List

import pytest
import torch

from anyaccel.backends.cpu.gemm import KERNELS as CPU_GEMM
from anyaccel.conformance import runner
from anyaccel.conformance.cases import CaseResult
from anyaccel.conformance.ops import gemm as gemm_cases
from anyaccel.core import Backend, BackendDef, GemmCapability, KernelImpl

F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16


def _backend(name: str, capability, build=None, **defkw) -> Backend:
    k = KernelImpl(op="gemm", backend=name, name=f"{name}.gemm", build=build or CPU_GEMM[0].build,
                   capability=capability, priority=5, provider="tests")
    return Backend.local(BackendDef(name=name, vendor="tests", device_type="cpu", **defkw), kernels=[k])


@pytest.fixture
def no_bf16() -> Backend:
    """Declares bf16 unsupported; its kernel refuses to be built for bf16 (so calling it would be loud)."""
    def build(spec):
        assert spec.dtype != BF16, "a kernel declared unsupported was built"
        return CPU_GEMM[0].build(spec)
    return _backend("nobf16", GemmCapability(dtypes=frozenset({F32, F16}), out_dtypes=frozenset({F32, F16})), build)


def _run(b, **kw):
    kw.setdefault("families", ["gemm"])
    kw.setdefault("examples", 0)
    return runner.run([b], **kw)


def test_claimed_cases_pass_on_a_correct_kernel(no_bf16):
    rep = _run(no_bf16, dtypes=(F32, F16))
    assert rep.cases and all(c.status == "pass" for c in rep.cases), [c.reason for c in rep.cases]
    # only the cases asking for a bfloat16 output fall back (the kernel declares out_dtypes={float32, float16})
    assert all(c.fallback == ("out=bfloat16" in c.name) for c in rep.cases)
    assert {c.kernel for c in rep.cases if not c.fallback} == {"nobf16.gemm"}
    assert all(c.max_abs_err is not None and c.max_abs_err <= c.tolerance for c in rep.cases)
    assert rep.exit_code == 0


def test_declared_unsupported_runs_through_the_recorded_fallback(no_bf16):
    rep = _run(no_bf16, dtypes=(BF16,))
    assert rep.cases
    for c in rep.cases:
        assert c.status == "pass" and c.fallback, c
        assert c.kernel == "native.gemm"
        assert "fallback" in c.reason and "bfloat16 not in supported dtypes" in c.reason
    assert rep.exit_code == 0
    assert any(s["fallback"] and s["chosen"] == "native.gemm" for s in rep.selections)


def test_strict_mode_turns_unsupported_into_errors_listing_reasons(no_bf16):
    rep = _run(no_bf16, dtypes=(BF16,), strict=True)
    assert rep.cases and all(c.status == "error" for c in rep.cases)
    assert all("strict mode" in c.reason and "nobf16.gemm" in c.reason for c in rep.cases)
    assert rep.exit_code == 1


@dataclass(frozen=True)
class _FlakyCapability(GemmCapability):
    """Says "unsupported" the first time it is asked, "supported" afterwards: claim and behaviour disagree."""

    calls: List[int] = field(default_factory=list, compare=False, hash=False)

    def not_supported_reasons(self, spec) -> List[str]:
        self.calls.append(1)
        return ["bf16 is not supported"] if len(self.calls) == 1 else []


def test_declared_unsupported_but_strict_build_succeeds_is_an_error():
    b = _backend("flaky", _FlakyCapability(dtypes=frozenset({F32, F16, BF16})))
    case = gemm_cases.make_case(BF16, (3,), 8, 4, False)
    res = runner.run_case(b, case, strict=False)
    assert res.status == "error"
    assert "did not raise UnsupportedError" in res.reason and "flaky.gemm" in res.reason


def test_kernel_claiming_support_but_refusing_strict_build_is_an_error():
    def build(spec):
        from anyaccel.core import UnsupportedError
        raise UnsupportedError("nope")
    b = _backend("liar", GemmCapability(), build)
    res = runner.run_case(b, gemm_cases.make_case(F32, (2,), 8, 4, True))
    assert res.status == "error" and "liar.gemm" in res.reason


def test_kernel_exception_is_an_error_not_a_crash():
    def build(spec):
        def k(x, w, b, out):
            raise RuntimeError("device lost")
        return k
    b = _backend("crashy", GemmCapability(), build)
    rep = _run(b, dtypes=(F32,))
    ran = [c for c in rep.cases if not c.fallback]      # another output dtype is not claimed: it falls back
    assert ran and all(c.status == "error" and "device lost" in c.reason for c in ran)
    assert all(c.status == "pass" for c in rep.cases if c.fallback)


def test_unwritten_output_fails_because_outputs_are_poisoned():
    def build(spec):
        real = CPU_GEMM[0].build(spec)

        def k(x, w, b, out):
            real(x[:-1], w, b, out[:-1]) if x.shape[0] > 1 else None  # forgets the last row
            return out
        return k
    b = _backend("lazy", GemmCapability(), build)
    res = runner.run_case(b, gemm_cases.make_case(F32, (4,), 16, 8, False))
    assert res.status == "fail" and "NaN" in res.reason


def test_missing_and_broken_family_modules_are_error_records(monkeypatch):
    b = _backend("ok", GemmCapability())
    broken = types.ModuleType("anyaccel.conformance.ops.brokenfam")
    broken.FAMILY = "brokenfam"

    def fixed_cases(backend, dtype):
        raise ValueError("bad shapes")
    broken.fixed_cases = fixed_cases
    monkeypatch.setitem(sys.modules, "anyaccel.conformance.ops.brokenfam", broken)
    rep = runner.run([b], families=["nosuchfamily", "brokenfam"], dtypes=(F32,), examples=0)
    assert [c.status for c in rep.cases] == ["error", "error"]
    assert "missing" in rep.cases[0].reason and "nosuchfamily" in rep.cases[0].reason
    assert "fixed_cases()" in rep.cases[1].reason and "bad shapes" in rep.cases[1].reason
    assert rep.exit_code == 1


def _fake_collectives(monkeypatch, run_collectives, names=("all_reduce sum", "all_gather")):
    """A collectives module with two dtype-bound cases and a dtype-free barrier."""
    fake = types.ModuleType("anyaccel.conformance.collectives")
    fake.collective_cases = lambda world_size: [
        *(types.SimpleNamespace(name=n, dtype_free=False) for n in names),
        types.SimpleNamespace(name="barrier", dtype_free=True)]
    fake.run_collectives = run_collectives
    monkeypatch.setitem(sys.modules, "anyaccel.conformance.collectives", fake)


def test_collectives_run_once_per_backend_and_give_one_unit_per_case(monkeypatch):
    calls = []

    def run_collectives(backend, dtypes, world_size=2, timeout=60.0):
        calls.append((backend.name, tuple(dtypes), world_size))
        if not backend.definition.distributed_backend:
            return [CaseResult(backend.name, "collective", "collectives", "all", "unsupported",
                               reason="declares no distributed_backend", op="collectives")]
        recs = [CaseResult(backend.name, "collective", n, dt, "pass", 0.0, 0.0, op=n.split()[0])
                for dt in ("float32", "bfloat16") for n in ("all_reduce sum", "all_gather")]
        return recs + [CaseResult(backend.name, "collective", "barrier", "-", "pass", op="barrier")]
    _fake_collectives(monkeypatch, run_collectives)
    with_dist = _backend("dist", GemmCapability(), distributed_backend="gloo")
    without = _backend("nodist", GemmCapability())
    seen = []
    rep = runner.run([with_dist, without], families=["collectives"], dtypes=(F32, BF16), examples=0,
                     progress=lambda done, total, label: seen.append((done, total)))
    assert [c[0] for c in calls] == ["dist"]  # once per backend, not once per case; never without a transport
    assert seen[-1] == (10, 10)  # 2 cases x 2 dtypes + barrier, per backend
    dist = [(c.name, c.dtype, c.status) for c in rep.cases if c.backend == "dist"]
    assert dist == [("all_reduce sum", "float32", "pass"), ("all_gather", "float32", "pass"), ("barrier", "-", "pass"),
                    ("all_reduce sum", "bfloat16", "pass"), ("all_gather", "bfloat16", "pass")]
    nodist = [c for c in rep.cases if c.backend == "nodist"]
    assert len(nodist) == 5 and all(c.status == "unsupported" and "distributed_backend" in c.reason for c in nodist)
    assert {c.name for c in nodist} == {"all_reduce sum", "all_gather", "barrier"}


def test_collectives_missing_and_unexpected_records_are_not_lost(monkeypatch):
    def run_collectives(backend, dtypes, world_size=2, timeout=60.0):
        return [CaseResult(backend.name, "collective", "all_reduce sum", "float32", "pass", op="all_reduce"),
                CaseResult(backend.name, "collective", "surprise", "float32", "fail", reason="x", op="surprise")]
    _fake_collectives(monkeypatch, run_collectives)
    rep = runner.run([_backend("dist3", GemmCapability(), distributed_backend="gloo")], families=["collectives"],
                     dtypes=(F32,))
    by = {c.name: c for c in rep.cases}
    assert by["all_reduce sum"].status == "pass" and by["surprise"].status == "fail"
    assert by["all_gather"].status == "error" and "no record" in by["all_gather"].reason
    assert by["barrier"].status == "error"
    assert len(rep.cases) == 4 and rep.exit_code == 1


def test_broken_collectives_module_is_an_error(monkeypatch):
    def run_collectives(backend, dtypes, world_size=2, timeout=60.0):
        raise RuntimeError("gloo exploded")
    _fake_collectives(monkeypatch, run_collectives)
    rep = runner.run([_backend("dist2", GemmCapability(), distributed_backend="gloo")], families=["collectives"],
                     dtypes=(F32,))
    assert len(rep.cases) == 3
    assert all(c.status == "error" and "gloo exploded" in c.reason for c in rep.cases)


def test_drawn_cases_are_reproducible_and_seeded():
    strat = gemm_cases.case_strategy(None, F32)
    a = [c.name for c in runner.draw_cases(strat, 6, seed=1)]
    b = [c.name for c in runner.draw_cases(strat, 6, seed=1)]
    c = [c.name for c in runner.draw_cases(strat, 6, seed=2)]
    assert a == b and len(a) == 6
    assert a != c


def test_run_counts_progress_and_environment(no_bf16):
    seen = []
    rep = runner.run([no_bf16], families=["gemm"], dtypes=(F32,), examples=3,
                     progress=lambda done, total, label: seen.append((done, total)))
    fixed = len(gemm_cases.fixed_cases(no_bf16, F32))
    assert fixed < len(rep.cases) <= fixed + 3
    assert seen[0][0] == 0 and seen[-1][0] == seen[-1][1] == len(rep.cases)
    env = rep.environment
    assert env["torch"] == torch.__version__ and env["backends"]["nobf16"]["package"] == "local"
    assert rep.summary["total"] == len(rep.cases) and rep.summary["pass"] == len(rep.cases)


def test_unavailable_backend_is_refused():
    b = Backend.local(BackendDef(name="gone", vendor="t", device_type="cpu", detect=lambda: "no such chip"), [])
    from anyaccel.core import UnsupportedError
    with pytest.raises(UnsupportedError, match="no such chip"):
        runner.run([b], families=["gemm"])


def _fake_models(monkeypatch, run_model_checks, make_reference=lambda config, seed=0: object()):
    fake = types.ModuleType("anyaccel.conformance.models")
    fake.TINY_CONFIGS = {"llama": {}, "gpt2": {}}
    fake.run_model_checks = run_model_checks
    fake.make_reference = make_reference
    real = types.ModuleType("anyaccel.conformance.real_models")
    real.REAL_MODEL_NAMES = ()
    monkeypatch.setitem(sys.modules, "anyaccel.conformance.models", fake)
    monkeypatch.setitem(sys.modules, "anyaccel.conformance.real_models", real)
    # `from . import models` reads the package attribute once an earlier test imported the real module
    import anyaccel.conformance as pkg

    monkeypatch.setattr(pkg, "models", fake, raising=False)
    monkeypatch.setattr(pkg, "real_models", real, raising=False)


def test_models_are_one_unit_per_model_and_dtype_with_the_reference_built_once(monkeypatch):
    seen, built = [], []

    def make_reference(config, seed=0):
        built.append(seed)
        return object()

    def run_model_checks(backend, name, dtype, hf=None):
        seen.append((name, dtype, id(hf)))
        return [CaseResult(backend.name, "model", f"{name} logits", str(dtype), "pass", 1e-6, 1e-5, op="model")]
    _fake_models(monkeypatch, run_model_checks, make_reference)
    b = _backend("m", GemmCapability())
    progress = []
    rep = runner.run([b], families=["models"], dtypes=(F32, BF16),
                     progress=lambda done, total, label: progress.append((done, total, label)))
    assert [(n, d) for n, d, _ in seen] == [("llama", F32), ("llama", BF16), ("gpt2", F32), ("gpt2", BF16)]
    assert len(built) == 2 and seen[0][2] == seen[1][2]  # one reference per model, shared by its dtypes
    assert progress[-1][:2] == (4, 4) and progress[1][2] == "m-models-float32-llama"
    assert [c.status for c in rep.cases] == ["pass"] * 4
    seen.clear()
    rep = runner.run([b], families=["models"], dtypes=(F32,), models=["gpt2"])
    assert [n for n, _, _ in seen] == ["gpt2"] and [c.name for c in rep.cases] == ["gpt2 logits"]

    def broken(backend, name, dtype, hf=None):
        raise RuntimeError("weights exploded")
    _fake_models(monkeypatch, broken)
    rep = runner.run([b], families=["models"], dtypes=(F32,))
    assert [c.status for c in rep.cases] == ["error", "error"]  # each unit guarded on its own
    assert all("weights exploded" in c.reason for c in rep.cases)


def test_missing_transformers_makes_model_cases_not_run_and_the_exit_code_non_zero(monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)  # import transformers -> ImportError
    b = _backend("m2", GemmCapability())
    rep = runner.run([b], families=["models"], dtypes=(F32,), models=["llama", "smollm2"])
    assert [c.status for c in rep.cases] == ["not run", "not run"], [c.reason for c in rep.cases]
    assert all("pip install 'anyaccel[reference]'" in c.reason and "transformers" in c.reason for c in rep.cases)
    assert rep.summary["not run"] == 2 and rep.exit_code == 1
    allowed = runner.run([b], families=["models"], dtypes=(F32,), models=["llama"], allow_unsupported=True)
    assert allowed.cases[0].status == "not run" and allowed.exit_code == 0


def test_strict_applies_to_model_cases_and_restores_the_environment(monkeypatch):
    monkeypatch.setenv("ANYACCEL_STRICT", "no")  # what the user had: restored after the models ran
    b = _backend("gemmonly", GemmCapability())  # every other op of a model falls back to the core
    rep = runner.run([b], families=["models"], dtypes=(F32,), models=["llama"], strict=True)
    assert rep.cases and all(c.status == "error" and "strict mode" in c.reason for c in rep.cases), \
        [(c.status, c.reason) for c in rep.cases]
    assert "registers no kernel" in rep.cases[0].reason and rep.exit_code == 1
    assert os.environ["ANYACCEL_STRICT"] == "no"


def test_strict_environment_is_set_for_the_model_build_and_removed_after(monkeypatch):
    from anyaccel.core.dispatch import strict_default

    monkeypatch.delenv("ANYACCEL_STRICT", raising=False)
    with runner._StrictEnv(True):
        assert strict_default()
    assert "ANYACCEL_STRICT" not in os.environ
    monkeypatch.setenv("ANYACCEL_STRICT", "1")
    with runner._StrictEnv(False):
        assert not strict_default()
    assert os.environ["ANYACCEL_STRICT"] == "1"


def test_strict_turns_a_model_that_ran_on_fallbacks_into_an_error():
    recs = [CaseResult("b", "model", "llama logits", "float32", "pass", 1e-6, 1e-5, op="model", fallback=True,
                       kernel="b.gemm,native.rms_norm"),
            CaseResult("b", "model", "gpt2 logits", "float32", "pass", op="model", kernel="b.gemm")]
    out = runner._strict_models(recs, True)
    assert out[0].status == "error" and "native.rms_norm" in out[0].reason
    assert out[1].status == "pass"
    assert runner._strict_models([CaseResult("b", "model", "x", "float32", "pass", fallback=True)], False)[0].status \
        == "pass"


def test_real_checkpoints_respect_a_declared_model_size_limit():
    from anyaccel.conformance.real_models import run_real_models
    from anyaccel.core import Backend, BackendDef

    slow = Backend.local(BackendDef("slowtier", "tests", "cpu", max_model_parameters=1_000_000), [])
    recs = run_real_models(slow, (F32,))
    assert [r.status for r in recs] == ["unsupported", "unsupported"]
    assert all("max_model_parameters=1,000,000" in r.reason or "not installed" in r.reason for r in recs)


def test_plugins_not_loaded_come_from_the_registry_and_reach_the_report():
    from anyaccel.plugins.manager import Quarantined

    gone = Backend.local(BackendDef(name="gone", vendor="t", device_type="cpu", detect=lambda: "no such chip"), [])
    here = _backend("here", GemmCapability())
    reg = types.SimpleNamespace(backends={"gone": gone, "here": here},
                                quarantined=[Quarantined("bad", "ImportError: boom", "bad-pkg", "1.0")])
    nl = runner.not_loaded(reg)
    assert nl["unavailable_backends"] == [{"name": "gone", "reason": "no such chip", "package": "local"}]
    assert nl["quarantined"] == [{"name": "bad", "error": "ImportError: boom", "package": "bad-pkg",
                                  "version": "1.0"}]
    rep = runner.run([here], families=["gemm"], dtypes=(F32,), examples=0)
    from anyaccel.plugins import get_registry
    assert rep.environment["not_loaded"] == runner.not_loaded(get_registry())
    assert rep.summary["unavailable_backends"] == len(rep.environment["not_loaded"]["unavailable_backends"])
