"""bench.quant: the quick smoke run produces well-formed records (the ratios themselves are not asserted)."""
from __future__ import annotations

import io

import pytest

from anyaccel.bench import quant as bench_quant
from anyaccel.plugins import discover

pytest.importorskip("gguf")


def test_quick_gemm_records_name_the_packed_kernels():
    cpu = discover().get("cpu")
    recs = bench_quant.run_gemm(cpu, quick=True)
    assert {r["variant"] for r in recs} == {"int4", "int8", "q4_1"}
    for r in recs:
        assert r["seconds"] > 0 and r["baseline_seconds"] > 0 and r["ratio"] == pytest.approx(
            r["baseline_seconds"] / r["seconds"])
        assert r["kernel"].startswith("cpu.weight_only_gemm.") and r["baseline_kernel"] == "cpu.gemm.addmm"
    buf = io.StringIO()
    bench_quant.render(recs, cpu, out=buf)
    assert "int4" in buf.getvalue() and "target 3x" in buf.getvalue()


def test_quick_decode_records_compare_packed_models_with_bf16():
    recs = bench_quant.run_decode(discover().get("cpu"), quick=True, batches=(2,), new_tokens=3, rounds=1)
    assert [r["variant"] for r in recs] == ["q4_1 packed", "int4"]
    for r in recs:
        assert r["batch"] == 2 and r["tokens_per_s"] > 0 and r["baseline_tokens_per_s"] > 0
    assert "linear layers packed" in recs[0]["quantization"] and "q4_1" in recs[0]["quantization"]
