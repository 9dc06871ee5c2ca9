"""Deterministic (batch-invariant) mode: selection refuses non-invariant kernels, and a model's per-step logits
are bitwise equal alone, in mixed batches and under chunked prefill; the default mode is not (on cpu)."""
from __future__ import annotations

import pytest
import torch

from anyaccel.conformance import determinism as D
from anyaccel.core import Gemm, GemmSpec, KernelImpl, UnsupportedError
from anyaccel.core.dispatch import deterministic_mode, NOT_BATCH_INVARIANT
from anyaccel.core.gemm import GemmCapability


def _k(name, invariant, prio):
    return KernelImpl(op="gemm", backend="test", name=name, priority=prio,
                      build=lambda spec: (lambda x, w, b, out: torch.mm(x, w.t(), out=out)),
                      capability=GemmCapability(batch_invariant=invariant))


def test_selection_refuses_non_invariant_kernels_with_a_reason(make_backend):
    be = make_backend([_k("fast", False, 10), _k("inv", True, 1)])
    assert Gemm.build(GemmSpec(), be, deterministic=False).selection.chosen == "fast"
    sel = Gemm.build(GemmSpec(), be, deterministic=True).selection
    assert sel.chosen == "inv" and sel.deterministic
    fast = next(c for c in sel.candidates if c.name == "fast")
    assert NOT_BATCH_INVARIANT in fast.reasons
    assert "mode: deterministic" in sel.explain()
    with deterministic_mode():  # the context (what build_model(deterministic=True) uses) selects the same way
        assert Gemm.build(GemmSpec(), be).selection.chosen == "inv"


def test_backend_without_invariant_kernels_says_so(make_backend, monkeypatch):
    be = make_backend([_k("fast", False, 10)])
    monkeypatch.setenv("ANYACCEL_DETERMINISTIC", "1")
    with pytest.raises(UnsupportedError, match="batch-invariant") as e:
        Gemm.build(GemmSpec(), be)
    assert any("fast" in r and "not batch invariant" in r for r in e.value.reasons)


def test_cpu_fixed_row_gemm_rows_do_not_depend_on_the_batch():
    from anyaccel.backends.cpu.invariant import fixed_rows_mm

    g = torch.Generator().manual_seed(0)
    w = torch.randn(96, 72, generator=g)
    x = torch.randn(40, 72, generator=g)
    alone = fixed_rows_mm(x[5:6], w, torch.empty(1, 96))
    for m in (6, 17, 40):
        assert torch.equal(fixed_rows_mm(x[:m], w, torch.empty(m, 96))[5:6], alone)


def _assert_all_pass(cases):
    assert cases, "no case ran"
    bad = [(c.name, c.status, c.reason) for c in cases if c.status != "pass"]
    assert not bad, bad


def test_cpu_deterministic_mode_is_bitwise_batch_invariant(cpu_backend):
    _assert_all_pass(D.run_invariance(cpu_backend, torch.float32, batch_sizes=(1, 3, 32), chunk_sizes=(None, 7)))


def test_cpu_default_mode_is_not_bitwise_batch_invariant(cpu_backend):
    """The check can fail: torch's CPU matmul takes other code paths for other row counts."""
    res = D.sensitivity(cpu_backend, torch.float32, batch_sizes=(1, 3), chunk_sizes=(None, 7))
    assert res["differs"], [(c.name, c.status) for c in res["cases"]]


@pytest.mark.slow
def test_cpu_deterministic_bfloat16(cpu_backend):
    _assert_all_pass(D.run_invariance(cpu_backend, torch.bfloat16, batch_sizes=(1, 4), chunk_sizes=(None, 5)))


@pytest.mark.slow
def test_triton_interpreter_deterministic_mode_is_bitwise_batch_invariant():
    pytest.importorskip("triton")
    from anyaccel.plugins.manager import get_registry

    be = get_registry().get("triton-interpreter")
    _assert_all_pass(D.run_invariance(be, torch.float32, batch_sizes=(1, 4), chunk_sizes=(None, 7)))


@pytest.mark.parametrize("name", ["determinism.gemm_one_call", "determinism.gemm_split_k_small_m"])
def test_planted_non_invariant_gemm_is_caught(cpu_backend, name):
    from anyaccel.conformance.mutants.determinism import mutant_backend

    be = mutant_backend(name, cpu_backend)
    cases = D.run_invariance(be, torch.float32, batch_sizes=(1, 9), chunk_sizes=(None,))
    assert cases and any(c.status == "fail" for c in cases), [(c.name, c.status) for c in cases]


def test_cli_deterministic_flag_shows_the_mode_in_explain(monkeypatch, capsys):
    from anyaccel import cli

    monkeypatch.setenv("ANYACCEL_DETERMINISTIC", "")  # restored after the test (main sets it)
    assert cli.main(["--deterministic", "explain", "gemm", "--backend", "cpu", "--dtype", "float32"]) == 0
    out = capsys.readouterr().out
    assert "mode: deterministic" in out and "cpu.gemm.fixed_rows" in out and "not batch invariant" in out
