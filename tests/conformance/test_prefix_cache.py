"""conformance.prefix_cache: outputs with prefix-cache hits equal a cold run, on cpu and triton-interpreter, and
every planted block-manager bug (conformance/mutants/prefix_cache.py) is caught in every dtype."""
from __future__ import annotations

import pytest
import torch

from anyaccel.conformance.mutants.prefix_cache import CLEAN, PREFIX_MUTANTS
from anyaccel.conformance.prefix_cache import PREFIX_BLOCK_SIZE, run_prefix_checks, scenarios
from anyaccel.models import build_model

_F32, _F16, _BF16 = torch.float32, torch.float16, torch.bfloat16

#: the scenario that must catch each mutant (the others pass it: the bug is invisible there)
CATCHES = {"prefix.unchained_hash": "shifted", "prefix.stale_key_after_evict": "eviction",
           "prefix.hit_without_reference": "shared-live"}


@pytest.fixture(scope="module")
def models(cpu_backend, reference_models):
    cache = {}

    def get(dtype):
        if dtype not in cache:
            cache[dtype] = build_model(reference_models("llama"), cpu_backend, dtype, block_size=PREFIX_BLOCK_SIZE)
        return cache[dtype]

    return get


def test_every_mutant_has_its_scenario():
    assert set(CATCHES) == set(PREFIX_MUTANTS)
    assert set(CATCHES.values()) <= {s.name for s in scenarios(160)}


@pytest.mark.parametrize("dtype", [_F32, pytest.param(_BF16, marks=pytest.mark.slow)])
def test_clean_block_manager_passes_every_scenario(cpu_backend, models, dtype):
    recs = run_prefix_checks(cpu_backend, dtype, model=models(dtype), prefix_caching=CLEAN)
    assert [r.name for r in recs] == [f"llama prefix {s.name}" for s in scenarios(160)]
    assert all(r.status == "pass" for r in recs), [(r.name, r.reason) for r in recs if r.status != "pass"]
    hits = {r.name.split()[-1]: r.reason for r in recs}
    assert "32 prompt tokens from the cache" in hits["mid-prompt"]


@pytest.mark.parametrize("dtype", [_F32, pytest.param(_F16, marks=pytest.mark.slow),
                                   pytest.param(_BF16, marks=pytest.mark.slow)])
@pytest.mark.parametrize("mutant", sorted(PREFIX_MUTANTS))
def test_mutant_is_caught(cpu_backend, models, mutant, dtype):
    scenario = CATCHES[mutant]
    (rec,) = run_prefix_checks(cpu_backend, dtype, model=models(dtype), prefix_caching=PREFIX_MUTANTS[mutant],
                               only=[scenario])
    assert rec.status == "fail", (mutant, rec.reason)
    assert "logits with prefix hits vs cold" in rec.reason


@pytest.mark.slow
def test_triton_interpreter_hits_equal_cold(reference_models):
    """The same scenarios on the Triton kernels (interpreted on the CPU)."""
    pytest.importorskip("triton", reason="the triton-interpreter tier needs triton installed")
    from anyaccel.plugins import discover

    b = discover().get("triton-interpreter")
    assert b.available, b.reason
    model = build_model(reference_models("llama"), b, _F32, block_size=PREFIX_BLOCK_SIZE)
    recs = run_prefix_checks(b, _F32, model=model, only=["mid-prompt", "whole-prompt", "shared-live"])
    assert all(r.status == "pass" for r in recs), [(r.name, r.reason) for r in recs if r.status != "pass"]
