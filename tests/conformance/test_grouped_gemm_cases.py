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
    op = case.op.build(case.spec, backend)
    inputs = case.make(torch.device("cpu"), 0)
    (got,), (ref,) = case.call(op, inputs), case.reference(inputs)
    return float((got.double() - ref).abs().max())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fixed_cases_pass(cpu, dtype):
    cases = fam.fixed_cases(cpu, dtype)
    assert fam.FAMILY == "grouped_gemm" and len({c.name for c in cases}) == len(cases)
    for c in cases:
        err = _run(c, cpu)
        bound = 1e-5 * c.reduction ** 0.5 if dtype == torch.float32 else 2e-2 * c.reduction ** 0.5
        assert err < bound, (c.name, err)


def test_strategy_draws_valid_cases(cpu):
    from hypothesis import HealthCheck, given, settings

    @settings(max_examples=15, derandomize=True, deadline=None, suppress_health_check=list(HealthCheck))
    @given(fam.case_strategy(cpu, torch.float32))
    def check(case):
        assert _run(case, cpu) < 1e-4

    check()
