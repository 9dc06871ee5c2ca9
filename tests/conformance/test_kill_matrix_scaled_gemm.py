"""The kill matrix of the scaled-GEMM family (same rules as tests/conformance/test_kill_matrix.py): every planted
bug of ``conformance/mutants/scaled_gemm.py`` is caught by the family's default cases in every dtype it declares,
one dtype at a time, by a ``fail`` of the mutated op; the clean twin passes every case."""
from __future__ import annotations

import pytest
import torch

from anyaccel.conformance import runner
from anyaccel.conformance.mutants import catalog, mutant_backend
from anyaccel.conformance.mutants._kit import twin
from anyaccel.core.validation import dtype_name

FAMILY = "scaled_gemm"
_MUTANTS = [m for m in catalog() if m.family == FAMILY]


def _run(backend, dtype):
    return runner.run([backend], dtypes=(dtype,), families=[FAMILY], examples=runner.DEFAULT_EXAMPLES, seed=0)


def test_the_family_plants_bugs_in_both_ops():
    assert {m.op for m in _MUTANTS} == {"scaled_gemm", "quantize_activation"}
    assert {"scaled_gemm.w_scale_per_row", "scaled_gemm.zero_point_sign", "scaled_gemm.fp8_fnuz_as_fn",
            "scaled_gemm.block_off_by_one"} <= {m.name for m in _MUTANTS}


@pytest.mark.slow
@pytest.mark.parametrize("name,dtype", [pytest.param(m.name, dt, id=f"{m.name}-{dtype_name(dt)}")
                                        for m in _MUTANTS for dt in m.dtypes])
def test_mutant_is_killed_by_default_settings(name, dtype):
    m = next(x for x in _MUTANTS if x.name == name)
    rep = _run(mutant_backend(name, (dtype,)), dtype)
    kills = [c for c in rep.cases if c.status == "fail" and c.op == m.op]
    assert kills, f"{name} survived in {dtype_name(dtype)}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=dtype_name)
def test_clean_twin_passes(dtype):
    rep = _run(twin(FAMILY, (dtype,)), dtype)
    bad = [(c.name, c.status, c.reason) for c in rep.cases if c.status != "pass"]
    assert rep.cases and not bad, bad
