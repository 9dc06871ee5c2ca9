"""The kill matrix: every op-level planted bug of the mutation catalog (``anyaccel.conformance.mutants``) must be
caught by the suite's **default** settings, in **every dtype it declares, one dtype at a time**.

For each (mutant, dtype) the mutant is built as a backend that declares only that dtype (the "half-only
accelerator" case: nothing it does in fp32 can rescue its fp16 or bf16 claims) and the runner runs its family with
``runner.DEFAULT_EXAMPLES`` drawn cases and seed 0, exactly as ``anyaccel conformance`` would.

**What counts as a kill:** at least one case *of the mutated op* with status ``"fail"`` (a compared output outside
its bound, or NaN poison left in place). An ``"error"`` (the kernel raised, or the claim and the behaviour disagree)
is not counted: a crash is caught by any suite, and counting it would let a mutant that merely raises pass as
"killed" by bounds that never saw its numbers. ``pass``, ``unsupported`` and fallback cases are not kills.

The clean twins (the same harness kernels with the bug switched off) must pass every case of their family in
every dtype: a kill means the bug, not the harness.
"""
from __future__ import annotations

import pytest
import torch

from anyaccel.conformance import runner
from anyaccel.conformance.mutants import catalog, mutant_backend
from anyaccel.conformance.mutants._kit import twin
from anyaccel.core.validation import dtype_name

#: the op families whose mutants this file runs (model and collective mutants have their own tests)
OP_FAMILIES = ("gemm", "grouped_gemm", "attention", "fused", "weight_only")
KILL_STATUSES = ("fail",)

_OP_MUTANTS = [m for m in catalog() if m.family in OP_FAMILIES]
_MATRIX = [(m.name, dt) for m in _OP_MUTANTS for dt in m.dtypes]
#: the families whose default run is slow: their items carry the slow mark (CI runs them too)
_SLOW_FAMILIES = ("attention",)


def _param(name: str, dtype: torch.dtype, family: str):
    marks = [pytest.mark.slow] if family in _SLOW_FAMILIES else []
    return pytest.param(name, dtype, id=f"{name}-{dtype_name(dtype)}", marks=marks)


def _run(backend, family: str, dtype: torch.dtype):
    return runner.run([backend], dtypes=(dtype,), families=[family], examples=runner.DEFAULT_EXAMPLES, seed=0)


def test_catalog_has_the_op_level_mutants():
    names = {m.name for m in _OP_MUTANTS}
    assert len(names) >= 22, sorted(names)
    for m in _OP_MUTANTS:
        assert m.dtypes and set(m.dtypes) <= {torch.float32, torch.float16, torch.bfloat16}, m
    # the half-only mutant says so: it has no meaning in fp32
    assert catalog_get("gemm.half_accumulator").dtypes == (torch.float16, torch.bfloat16)


def catalog_get(name: str):
    return next(m for m in _OP_MUTANTS if m.name == name)


@pytest.mark.parametrize("name,dtype", [_param(n, d, catalog_get(n).family) for n, d in _MATRIX])
def test_mutant_is_killed_by_default_settings(name, dtype):
    m = catalog_get(name)
    b = mutant_backend(name, (dtype,))
    # the backend declares exactly this dtype for the mutated op
    declared = {dt for k in b.kernels_for(m.op) for dt in k.capability.dtypes}
    assert declared == {dtype}, declared
    rep = _run(b, m.family, dtype)
    mine = [c for c in rep.cases if c.op == m.op]
    assert mine, f"no case of {m.op} ran for {name}"
    # the mutated kernel itself ran (no fallback): the declaration reached it
    assert any(not c.fallback for c in mine), [(c.name, c.reason) for c in mine][:3]
    kills = [c for c in mine if c.status in KILL_STATUSES]
    assert kills, (f"{name} ({m.description}) survived in {dtype_name(dtype)}: "
                   f"{[(c.name, c.status, c.max_abs_err, c.tolerance) for c in mine]}")
    assert rep.exit_code == 1


@pytest.mark.parametrize("family", OP_FAMILIES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=dtype_name)
def test_clean_twin_passes_everything(family, dtype):
    rep = _run(twin(family, (dtype,)), family, dtype)
    assert rep.cases
    bad = [(c.name, c.status, c.reason) for c in rep.cases if c.status != "pass"]
    assert not bad, bad
    assert any(not c.fallback for c in rep.cases)
