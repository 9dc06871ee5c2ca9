"""``python -m anyaccel.bench.scaled_gemm --quick`` runs and reports a ratio per case (timings never asserted)."""
from __future__ import annotations

import json
import os
import subprocess
import sys


def test_quick_run_reports_every_case(tmp_path):
    path = tmp_path / "q.json"
    r = subprocess.run([sys.executable, "-m", "anyaccel.bench.scaled_gemm", "--quick", "--json", str(path)],
                       capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=300)
    assert r.returncode == 0, r.stderr
    recs = json.loads(path.read_text())["records"]
    cases = {rec["case"] for rec in recs}
    assert {"int8 GEMM", "int8 dynamic (quantize + GEMM)"} <= cases
    for rec in recs:
        if rec["case"].startswith("int8"):
            assert not rec["error"] and rec["speedup_vs_bf16"] > 0 and rec["kernel"] == "cpu.scaled_gemm.int_mm"
    assert "x bf16" in r.stdout and "environment" in r.stdout
