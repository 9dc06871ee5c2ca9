"""``anyaccel bench ops --quick`` runs and reports all four ratios (timings are never asserted)."""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import torch

from anyaccel.bench import ops as bench_ops


def test_bench_ops_quick_reports_all_four_kinds(tmp_path):
    path = tmp_path / "bench.json"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "COLUMNS": "200"}
    r = subprocess.run([sys.executable, "-m", "anyaccel", "bench", "ops", "--backend", "cpu", "--quick", "--json",
                        str(path)], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr
    data = json.loads(path.read_text())
    recs = data["records"]
    kinds = {rec["kind"] for rec in recs}
    assert kinds == {"attention_prefill", "paged_decode", "gemm", "dispatch_overhead"}
    assert {rec["dtype"] for rec in recs} == {"float32", "bfloat16"}
    has_attention = importlib.util.find_spec("anyaccel.core.attention") is not None
    for rec in recs:
        if rec["kind"] in ("attention_prefill", "paged_decode") and not has_attention:
            assert rec["error"]  # reported, not crashed
            continue
        assert not rec["error"], rec
        assert rec["ratio"] is not None and rec["ratio"] == rec["ratio"]
        assert rec["passed"] in (True, False)
    for header in ("measured", "baseline", "ratio", "target"):
        assert header in r.stdout
    assert "gemm M=16" in r.stdout and "dispatch" in r.stdout and "prefill" in r.stdout and "decode" in r.stdout


def test_time_pair_is_interleaved_and_positive():
    calls = []
    a = lambda: calls.append("a")  # noqa: E731
    b = lambda: calls.append("b")  # noqa: E731
    ta, tb = bench_ops.time_pair(a, b, torch.device("cpu"), rounds=3, target_s=0.001)
    assert ta > 0 and tb > 0
    assert "a" in calls and "b" in calls
