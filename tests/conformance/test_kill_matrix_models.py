"""The kill matrix of the model-level and collective mutants: every planted bug is caught by the DEFAULT
conformance run, in every dtype it declares, one dtype at a time, with a backend that claims only that dtype.

Each (mutant, dtype) is one pytest item. A clean twin (the same one-kernel backend with the core's correct
kernel in the mutated slot, or the core's Communicator) must pass the same run, so each catch comes from the
bug and not from the backend's shape. Half-precision items are the slow part (marked slow; CI runs them).
"""
from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from anyaccel.conformance import runner  # noqa: E402
from anyaccel.conformance.mutants import catalog, mutant_backend  # noqa: E402
from anyaccel.conformance.mutants import collectives as coll_mutants  # noqa: E402
from anyaccel.conformance.mutants import models as model_mutants  # noqa: E402
from anyaccel.core.validation import dtype_name  # noqa: E402

pytest.importorskip("transformers", reason="the model family's reference is transformers")

MODEL_MUTANTS = [m for m in catalog() if m.family == "models"]
COLLECTIVE_MUTANTS = [m for m in catalog() if m.family == "collectives"]
DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _param(m, dt):
    marks = [pytest.mark.slow] if dt != torch.float32 else []
    return pytest.param(m, dt, id=f"{m.name}-{dtype_name(dt)}", marks=marks)


def _model_run(backend, dt, models):
    return runner.run([backend], dtypes=(dt,), families=["models"], models=list(models)).cases


def _lines(cases):
    return "\n".join(f"{c.name} {c.dtype}: {c.status} {c.reason}" for c in cases)


def test_the_catalog_has_the_promised_mutants():
    assert len(MODEL_MUTANTS) >= 6 and len(COLLECTIVE_MUTANTS) >= 3
    for m in MODEL_MUTANTS:
        assert m.models, f"{m.name} declares no models that must catch it"
        from anyaccel.conformance.models import TINY_CONFIGS
        assert set(m.models) <= set(TINY_CONFIGS), m.name


@pytest.mark.parametrize("mutant,dtype", [_param(m, dt) for m in MODEL_MUTANTS for dt in m.dtypes])
def test_model_mutant_is_caught(mutant, dtype):
    b = mutant_backend(mutant.name, (dtype,))
    cases = _model_run(b, dtype, mutant.models)
    assert cases and all(c.kind == "model" for c in cases)
    # the mutated kernel really ran (it is not a fallback that hid the bug)
    assert any(f"{b.name}." in (c.kernel or "") for c in cases), _lines(cases)
    assert any(c.status == "fail" for c in cases), f"{mutant.name} survived in {dtype_name(dtype)}:\n" + _lines(cases)
    assert not any(c.status == "error" for c in cases), _lines(cases)


_SLOTS = {}
for _m in MODEL_MUTANTS:
    _SLOTS.setdefault(_m.op, (_m.name, set()))[1].update(_m.models)


@pytest.mark.parametrize("op", sorted(_SLOTS))
@pytest.mark.parametrize("dtype", [torch.float32, pytest.param(torch.float16, marks=pytest.mark.slow),
                                   pytest.param(torch.bfloat16, marks=pytest.mark.slow)], ids=dtype_name)
def test_clean_twin_passes(op, dtype):
    name, models = _SLOTS[op]
    b = model_mutants.clean_backend(name, (dtype,))
    cases = _model_run(b, dtype, sorted(models))
    assert cases and all(c.status == "pass" for c in cases), _lines(cases)


# ---------------------------------------------------------------------------------------------- collectives
# One spawn per mutant covers the three dtypes (a Communicator declares no dtypes: a run restricted to one dtype
# exercises the same code); each (mutant, dtype) is still its own item, judged on that dtype's records.

@pytest.fixture(scope="module")
def collective_runs():
    cache = {}

    def get(name):
        if name not in cache:
            b = coll_mutants.clean_backend() if name is None else mutant_backend(name)
            cache[name] = runner.run([b], dtypes=DTYPES, families=["collectives"]).cases
        return cache[name]

    return get


@pytest.mark.slow
@pytest.mark.parametrize("mutant,dtype", [pytest.param(m, dt, id=f"{m.name}-{dtype_name(dt)}")
                                          for m in COLLECTIVE_MUTANTS for dt in DTYPES])
def test_collective_mutant_is_caught(collective_runs, mutant, dtype):
    cases = [c for c in collective_runs(mutant.name) if c.dtype == dtype_name(dtype)]
    assert cases, "no collective case ran in this dtype"
    failed = [c for c in cases if c.status == "fail"]
    assert failed, f"{mutant.name} survived in {dtype_name(dtype)}:\n" + _lines(cases)
    assert all(c.op == mutant.op for c in failed), _lines(failed)
    assert not any(c.status == "error" for c in cases), _lines(cases)


@pytest.mark.slow
def test_collective_clean_twin_passes(collective_runs):
    cases = collective_runs(None)
    assert {c.dtype for c in cases} >= {dtype_name(d) for d in DTYPES}
    assert all(c.status == "pass" for c in cases), _lines(cases)
