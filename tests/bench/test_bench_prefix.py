"""bench.prefix and bench.kv_transfer: smoke runs on tiny shapes produce well-formed figures (the timings are not
asserted; the token counts, which do not depend on the machine, are)."""
from __future__ import annotations

import json
import os

from anyaccel.cli import main

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def test_bench_prefix_smoke(tmp_path, capsys):
    out = tmp_path / "p.json"
    # the tiny llama has 128-token blocks on cpu and 256 positions: a 140-token system prompt gives one full block
    rc = main(["bench", "prefix", "--model", "llama", "--sessions", "3", "--turns", "2", "--system-len", "140",
               "--user-len", "8", "--answer-len", "3", "--json", str(out)])
    assert rc == 0
    d = json.loads(out.read_text())
    assert d["off"]["cached_tokens"] == 0
    # round 1's three prompts are admitted in one step, before any block is registered; round 2 hits 3 x 1 block
    assert d["on"]["cached_tokens"] == 128 * 3
    assert d["off"]["prefill_tokens"] == d["prompt_tokens"]
    assert d["on"]["prefill_tokens"] == d["prompt_tokens"] - d["on"]["cached_tokens"]
    assert d["identical_answers"] is True
    assert d["ratios"]["prefill_tokens_off_over_on"] > 1
    text = capsys.readouterr().out
    assert "prefill tokens computed" in text and "TTFT p50" in text


def test_bench_prefix_rejects_bad_sizes(capsys):
    assert main(["bench", "prefix", "--model", "llama", "--sessions", "0"]) == 2
    assert "--sessions" in capsys.readouterr().err


def test_bench_kv_transfer_smoke(tmp_path):
    out = tmp_path / "kv.json"
    rc = main(["bench", "kv-transfer", "--blocks", "2", "--layers", "2", "--block-size", "16", "--repeats", "1",
               "--dir", str(tmp_path / "d"), "--json", str(out)])
    assert rc == 0
    d = json.loads(out.read_text())
    assert d["bit_exact"] is True and set(d["tiers"]) == {"raw copy", "host", "disk"}
    assert d["bytes"] == 2 * 2 * 2 * 16 * 3 * 64 * 4
    assert d["tiers"]["raw copy"]["save"]["vs_raw_copy"] == 1.0
