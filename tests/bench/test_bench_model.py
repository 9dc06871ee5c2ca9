"""bench.model: the quick smoke run produces well-formed records (the ratios themselves are not asserted)."""
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


def test_quick_run_records(cpu_backend_for_bench):
    recs = bench_model.run(cpu_backend_for_bench, quick=True, dtypes=[torch.float32], batches=[2],
                           prompt_len=24, new_tokens=4)
    assert [r["metric"] for r in recs] == ["prefill", "decode", "peak_memory"], recs
    for r in recs:
        assert r["error"] == ""
        assert r["ours"] is not None and r["ours"] >= 0
        assert r["transformers"] is not None
        assert r["batch"] == 2 and r["dtype"] == "float32"
    pre, dec, _ = recs
    assert pre["ratio"] > 0 and dec["ratio"] > 0
    assert pre["target"] == 1.0 and dec["target"] == 1.0
    assert recs[0]["token_agreement"] == 1.0  # same weights, float32, greedy: same tokens
    bench_model.render(recs)


def test_peak_memory_sees_an_allocation():
    with bench_model.PeakMemory(torch.device("cpu")) as m:
        x = torch.ones(64 << 20, dtype=torch.uint8)  # 64 MiB, touched
        x += 1
        del x
    assert m.peak >= 32 << 20
