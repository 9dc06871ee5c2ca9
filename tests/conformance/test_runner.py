"""The conformance runner: claims checked both ways, strict mode, broken families, reproducibility."""
from __future__ import annotations

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
    assert not any(c.fallback for c in rep.cases)
    assert {c.kernel for c in rep.cases} == {"nobf16.gemm"}
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
    assert rep.cases and all(c.status == "error" and "device lost" in c.reason for c in rep.cases)


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


def test_collectives_are_delegated_when_a_distributed_backend_is_declared(monkeypatch):
    calls = []
    fake = types.ModuleType("anyaccel.conformance.collectives")

    def run_collectives(backend, dtypes, world_size=2, timeout=60.0):
        calls.append((backend.name, tuple(dtypes), world_size))
        return [CaseResult(backend.name, "collective", "all_reduce sum", "float32", "pass", 0.0, 0.0,
                           op="all_reduce")]
    fake.run_collectives = run_collectives
    monkeypatch.setitem(sys.modules, "anyaccel.conformance.collectives", fake)
    with_dist = _backend("dist", GemmCapability(), distributed_backend="gloo")
    without = _backend("nodist", GemmCapability())
    rep = runner.run([with_dist, without], families=["collectives"], dtypes=(F32,), examples=0)
    assert calls == [("dist", (F32,), 2)]
    assert [(c.backend, c.status) for c in rep.cases] == [("dist", "pass"), ("nodist", "unsupported")]


def test_broken_collectives_module_is_an_error(monkeypatch):
    fake = types.ModuleType("anyaccel.conformance.collectives")

    def run_collectives(backend, dtypes, world_size=2, timeout=60.0):
        raise RuntimeError("gloo exploded")
    fake.run_collectives = run_collectives
    monkeypatch.setitem(sys.modules, "anyaccel.conformance.collectives", fake)
    rep = runner.run([_backend("dist2", GemmCapability(), distributed_backend="gloo")], families=["collectives"],
                     dtypes=(F32,))
    assert rep.cases[0].status == "error" and "gloo exploded" in rep.cases[0].reason


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


def test_models_family_is_delegated_filtered_and_guarded(monkeypatch):
    fake = types.ModuleType("anyaccel.conformance.models")
    fake.TINY_CONFIGS = {"llama": {}, "gpt2": {}}
    real = types.ModuleType("anyaccel.conformance.real_models")
    real.REAL_MODEL_NAMES = ("smollm2",)
    seen = []

    def run_models(backend, dtypes, models=None):
        seen.append((tuple(dtypes), tuple(models)))
        return [CaseResult(backend.name, "model", f"{m} logits", "float32", "pass", 1e-6, 1e-5, op=m) for m in models]

    def run_real_models(backend, dtypes, models=None):
        seen.append(("real", tuple(models)))
        return [CaseResult(backend.name, "model", "smollm2 greedy", "float32", "unsupported", reason="not installed")]
    fake.run_models = run_models
    real.run_real_models = run_real_models
    monkeypatch.setitem(sys.modules, "anyaccel.conformance.models", fake)
    monkeypatch.setitem(sys.modules, "anyaccel.conformance.real_models", real)
    b = _backend("m", GemmCapability())
    rep = runner.run([b], families=["models"], dtypes=(F32,))
    assert seen == [((F32,), ("llama", "gpt2")), ("real", ("smollm2",))]
    assert [c.status for c in rep.cases] == ["pass", "pass", "unsupported"]
    seen.clear()
    rep = runner.run([b], families=["models"], dtypes=(F32,), models=["gpt2"])
    assert seen == [((F32,), ("gpt2",))] and [c.name for c in rep.cases] == ["gpt2 logits"]

    def broken(backend, dtypes, models=None):
        raise ImportError("transformers missing")
    fake.run_models = broken
    rep = runner.run([b], families=["models"], dtypes=(F32,))
    assert rep.cases[0].status == "error" and "transformers missing" in rep.cases[0].reason
    assert rep.cases[1].status == "unsupported"  # the real-checkpoint source still ran


def test_real_checkpoints_respect_a_declared_model_size_limit():
    from anyaccel.conformance.real_models import run_real_models
    from anyaccel.core import Backend, BackendDef

    slow = Backend.local(BackendDef("slowtier", "tests", "cpu", max_model_parameters=1_000_000), [])
    recs = run_real_models(slow, (F32,))
    assert [r.status for r in recs] == ["unsupported", "unsupported"]
    assert all("max_model_parameters=1,000,000" in r.reason or "not installed" in r.reason for r in recs)
