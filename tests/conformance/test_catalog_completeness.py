"""Every op the core defines is covered three ways: a conformance case exercises it, its tolerance class has a
bound in every dtype, and the mutation catalog plants at least one bug in it. Adding an op to ``core.OPS``
without all three fails here."""
from __future__ import annotations

from typing import Dict, List, Set

import pytest
import torch

from anyaccel.conformance import runner
from anyaccel.conformance.mutants import catalog
from anyaccel.conformance.tolerances import TABLE
from anyaccel.core import OPS, Backend, BackendDef

DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _bare_backend() -> Backend:
    """A backend with no kernel at all: fixed cases must not depend on what a backend declares."""
    return Backend.local(BackendDef(name="bare", vendor="tests", device_type="cpu"), kernels=[])


def _fixed_case_classes() -> Dict[str, Set[str]]:
    """op name -> the tolerance classes of the fixed cases that exercise it (over every op family and dtype)."""
    import importlib

    seen: Dict[str, Set[str]] = {}
    b = _bare_backend()
    for fam in runner.families():
        if fam in (runner.COLLECTIVES, runner.MODELS):
            continue
        mod = importlib.import_module(f"anyaccel.conformance.ops.{fam}")
        for dt in DTYPES:
            for case in mod.fixed_cases(b, dt):
                seen.setdefault(case.op_name, set()).add(case.tolerance_class)
    return seen


def problems(op: str, cases: Dict[str, Set[str]], mutated: Set[str]) -> List[str]:
    """What is missing for ``op``: a fixed case, a bound per dtype for each of its tolerance classes, a mutant."""
    out = []
    if not cases.get(op):
        out.append(f"no fixed conformance case exercises op {op!r} (add one to conformance/ops/<family>.py)")
    for cls in sorted(cases.get(op, ())):
        if cls not in TABLE:
            out.append(f"op {op!r} uses tolerance class {cls!r}, absent from the table")
            continue
        missing = [str(dt) for dt in DTYPES if dt not in TABLE[cls]]
        if missing:
            out.append(f"tolerance class {cls!r} (op {op!r}) has no bound for {missing}")
    if op not in mutated:
        out.append(f"no mutant plants a bug in op {op!r} (register one in conformance/mutants/<family>.py)")
    return out


_CASES = _fixed_case_classes()
_MUTATED = {m.op for m in catalog()}


@pytest.mark.parametrize("op", sorted(OPS))
def test_op_has_a_case_bounds_and_a_mutant(op):
    assert not problems(op, _CASES, _MUTATED)


def test_each_check_reports_what_is_missing():
    """The checks are not vacuous: a missing case, a class without bounds and a missing mutant are each reported."""
    assert len(problems("not_an_op", _CASES, _MUTATED)) == 2          # no case, no mutant
    assert any("absent from the table" in p for p in problems("gemm", {"gemm": {"no_such_class"}}, _MUTATED))
    assert any("no mutant" in p for p in problems("gemm", _CASES, _MUTATED - {"gemm"}))
    assert not problems("gemm", _CASES, _MUTATED)
