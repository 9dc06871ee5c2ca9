"""bench.model: the quick smoke run (ours and transformers as worker processes) produces well-formed records.

The ratios themselves are not asserted; the greedy tokens are (same weights, float32: the same tokens)."""
from __future__ import annotations

import os

import pytest
import torch

from anyaccel.bench import model as bench_model

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def cpu_backend_for_bench():
    from anyaccel.plugins.manager import get_registry

    return get_registry().get("cpu")


@pytest.mark.slow
def test_quick_run_records(cpu_backend_for_bench):
    recs = bench_model.run(cpu_backend_for_bench, quick=True, dtypes=[torch.float32], batches=[2],
                           prompt_len=24, new_tokens=6, peers=["transformers"], threads=1)
    assert [r["metric"] for r in recs] == ["prefill", "decode", "peak_memory"], recs
    for r in recs:
        assert r["error"] == "" and r["notes"] == {}, r
        assert r["batch"] == 2 and r["dtype"] == "float32"
        assert r["versions"]["ours"] and r["versions"]["transformers"]
    pre, dec, mem = recs
    assert pre["ours"] > 0 and pre["transformers"] > 0
    assert pre["ratio"] == pytest.approx(pre["ours"] / pre["transformers"])
    assert pre["target"] == bench_model.TARGETS[("prefill", None)]
    assert dec["target"] == bench_model.TARGETS[("decode", 1)]  # batch 2: the batch-1 target applies
    # each side's process tree holds at least torch and the model; ours includes its KV pool
    assert mem["ours"] > 50 and mem["transformers"] > 50 and mem["kv_cache_mib"] > 0
    assert recs[0]["token_agreement"] == {"transformers": 1.0}  # same weights, float32, greedy: same tokens
    bench_model.render(recs)


def test_peak_memory_sees_an_allocation():
    with bench_model.PeakMemory(torch.device("cpu")) as m:
        x = torch.ones(64 << 20, dtype=torch.uint8)  # 64 MiB, touched
        x += 1
        del x
    assert m.peak >= 32 << 20
