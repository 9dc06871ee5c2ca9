"""bench.serve_peer: `bench serve --vllm` says why vLLM is absent instead of failing (CI has no vLLM)."""
from __future__ import annotations

import argparse

from anyaccel.bench import serve as bench_serve
from anyaccel.bench import serve_peer


def _args(**kw):
    p = argparse.ArgumentParser()
    bench_serve.add_bench_serve_arguments(p)
    return p.parse_args(kw.pop("argv"))


def test_vllm_absent_reasons(tmp_path, monkeypatch):
    monkeypatch.delenv("ANYACCEL_PEERS_VENV", raising=False)
    reqs = [([20, 21, 22], 4)]
    r = serve_peer.vllm_serve_load(_args(argv=["--model", "llama", "--vllm"]), reqs, print_fn=lambda m: None)
    assert "smollm2 only" in r["absent"]
    r = serve_peer.vllm_serve_load(_args(argv=["--vllm", "--peers-venv", str(tmp_path / "none")]), reqs,
                                   print_fn=lambda m: None)
    assert "make bench-peers" in r["absent"] and "none" in r["absent"]


def test_render_names_the_absent_peer_and_the_ratio():
    base = {"model": "smollm2", "requests": 2, "completed": 2, "failed": [], "concurrency": 2, "duration_s": 1.0,
            "request_throughput": 2.0, "output_tok_s": 50.0,
            "ttft_s": {"p50": 0.1, "p90": 0.1, "p99": 0.1, "mean": 0.1},
            "itl_s": {"p50": 0.01, "p90": 0.01, "p99": 0.02, "mean": 0.01}}
    lines = []
    bench_serve._render(dict(base, vllm={"absent": "no peers virtual environment"}), lines.append)
    assert any("vLLM serve: absent - no peers virtual environment" in x for x in lines)
    lines = []
    v = dict(base, version="0.32.0", output_tok_s=100.0)
    bench_serve._render(dict(base, vllm=v, ours_vs_vllm_output_tok_s=0.5), lines.append)
    assert any("vLLM serve (0.32.0)" in x and "100.0" in x for x in lines)
    assert any("ours / vLLM output tokens/s: 0.50" in x for x in lines)


def test_vllm_serve_command_turns_prefix_caching_off():
    cmd = serve_peer.vllm_serve_command("py", "/m", 8000, "bfloat16", 512, 8, "smollm2")
    assert "--no-enable-prefix-caching" in cmd and "--skip-tokenizer-init" in cmd
    assert cmd[cmd.index("--max-num-seqs") + 1] == "8" and cmd[cmd.index("--dtype") + 1] == "bfloat16"
