"""Selection: priority, capability reasons, fallback recording, strict mode, conflicts."""
from __future__ import annotations

import pytest
import torch

from anyaccel.core import (Backend, BackendDef, Gemm, GemmCapability, GemmSpec, KernelImpl, SelectionConflictError,
                           StrictModeError, UnsupportedError, clear_selections, selections)


def _k(name, priority=0, dtypes=(torch.float32,), tag=None):
    def build(spec):
        def kernel(x, w, b, out):
            torch.mm(x, w.t(), out=out)
            if tag is not None:
                out.fill_(tag)
            return out
        return kernel

    return KernelImpl(op="gemm", backend="t", name=name, build=build, priority=priority,
                      capability=GemmCapability(dtypes=frozenset(dtypes)), provider="tests")


def _backend(*kernels):
    return Backend.local(BackendDef("t", "tests", "cpu"), list(kernels))


def test_highest_declared_priority_wins_regardless_of_registration_order():
    for order in ((_k("low", 1, tag=1.0), _k("high", 5, tag=5.0)), (_k("high", 5, tag=5.0), _k("low", 1, tag=1.0))):
        op = Gemm.build(GemmSpec(torch.float32), _backend(*order))
        assert op.selection.chosen == "high"
        assert op(torch.ones(2, 3), torch.ones(4, 3)).eq(5.0).all()


def test_unsupported_candidate_is_skipped_with_its_reason():
    op = Gemm.build(GemmSpec(torch.bfloat16), _backend(_k("fp32only", 9), _k("any", 1, dtypes=(torch.float32, torch.bfloat16))))
    assert op.selection.chosen == "any"
    rejected = {c.name: c.reasons for c in op.selection.candidates if not c.chosen}
    assert "bfloat16" in rejected["fp32only"][0]
    text = op.selection.explain()
    assert "fp32only" in text and "bfloat16 not in supported dtypes" in text


def test_fallback_is_recorded_and_correct():
    clear_selections()
    op = Gemm.build(GemmSpec(torch.bfloat16, has_bias=True), _backend(_k("fp32only")))
    assert op.selection.fallback and op.selection.chosen == "native.gemm"
    assert selections()[-1] is op.selection
    x, w, b = torch.randn(3, 8).bfloat16(), torch.randn(5, 8).bfloat16(), torch.randn(5).bfloat16()
    torch.testing.assert_close(op(x, w, b).double(), Gemm.reference(x, w, b), rtol=2e-2, atol=2e-2)


def test_strict_mode_turns_fallback_into_an_error_listing_reasons(monkeypatch):
    with pytest.raises(StrictModeError) as e:
        Gemm.build(GemmSpec(torch.bfloat16), _backend(_k("fp32only")), strict=True)
    assert isinstance(e.value, UnsupportedError)
    assert "fp32only" in str(e.value) and "bfloat16" in str(e.value)
    monkeypatch.setenv("ANYACCEL_STRICT", "1")
    with pytest.raises(StrictModeError, match="registers no kernel"):
        Gemm.build(GemmSpec(torch.float32), _backend())


def test_equal_priority_is_a_reported_conflict():
    with pytest.raises(SelectionConflictError, match="'a'|a, b"):
        Gemm.build(GemmSpec(torch.float32), _backend(_k("a", 3), _k("b", 3)))
    # equal priority is fine when only one of them supports the call
    op = Gemm.build(GemmSpec(torch.bfloat16), _backend(_k("a", 3), _k("b", 3, dtypes=(torch.bfloat16,))))
    assert op.selection.chosen == "b"


def test_selection_happens_once_at_build_not_per_call():
    builds = []

    def build(spec):
        builds.append(spec)
        return lambda x, w, b, out: torch.mm(x, w.t(), out=out)

    be = Backend.local(BackendDef("t", "tests", "cpu"), [KernelImpl("gemm", "t", "counted", build)])
    op = Gemm.build(GemmSpec(torch.float32), be)
    for _ in range(5):
        op(torch.ones(2, 2), torch.ones(2, 2))
    assert len(builds) == 1
