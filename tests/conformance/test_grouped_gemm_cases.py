"""The grouped GEMM conformance family: its fixed cases and drawn cases pass on cpu against the reference."""
from __future__ import annotations

import pytest
import torch

from anyaccel.conformance.ops import grouped_gemm as fam


@pytest.fixture(scope="module")
def cpu():
    from anyaccel.plugins.manager import get_registry

    return get_registry().get("cpu")


def _run(case, backend):
    """The case judged by the suite's own rule (its tolerance class and the reference's allowance)."""
    from anyaccel.conformance.tolerances import compare, tolerance

    op = case.op.build(case.spec, backend)
    inputs = case.make(torch.device("cpu"), 0)
    outs, refs = case.call(op, inputs), case.reference(inputs)
    atol, rtol = tolerance(case.tolerance_class, outs[0].dtype, case.reduction)
    return compare(outs, refs, atol, rtol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fixed_cases_pass(cpu, dtype):
    cases = fam.fixed_cases(cpu, dtype)
    assert fam.FAMILY == "grouped_gemm" and len({c.name for c in cases}) == len(cases)
    assert any(c.tolerance_class == "exact" for c in cases)
    for c in cases:
        res = _run(c, cpu)
        assert res.passed, (c.name, res.reason)


def test_strategy_draws_valid_cases(cpu):
    from hypothesis import HealthCheck, given, settings

    @settings(max_examples=15, derandomize=True, deadline=None, suppress_health_check=list(HealthCheck))
    @given(fam.case_strategy(cpu, torch.float32))
    def check(case):
        assert _run(case, cpu).passed

    check()
