"""serve.commands and the CLI commands on top: chat loop, embed, collect-env, bench serve, argument errors."""
from __future__ import annotations

import io
import json

import pytest

from anyaccel.cli import main
from anyaccel.serve import SamplingParams
from anyaccel.serve.commands import chat_loop


def _reader(lines):
    it = iter(lines)

    def read(prompt):
        try:
            return next(it)
        except StopIteration:
            raise EOFError from None
    return read


def test_chat_loop_keeps_history_streams_and_resets(tiny_llm, char_tokenizer):
    p = SamplingParams(max_new_tokens=6, ignore_eos=True)
    out = io.StringIO()
    hist = chat_loop(tiny_llm, p, system="sys", read=_reader(["hi", "", "more", "/reset", "again", "/exit", "x"]),
                     out=out)
    assert [m["role"] for m in hist] == ["system", "user", "assistant"]  # reset dropped the first exchange
    assert hist[1]["content"] == "again"
    first = tiny_llm.chat([{"role": "system", "content": "sys"}, {"role": "user", "content": "hi"}], p)[0].text
    text = out.getvalue()
    assert text.startswith(first + "\n") and "(history cleared)" in text
    assert "6-token budget" in text
    # the second turn saw the first answer: its prompt is the whole history through the template
    second = tiny_llm.chat([{"role": "system", "content": "sys"}, {"role": "user", "content": "hi"},
                            {"role": "assistant", "content": first}, {"role": "user", "content": "more"}], p)[0]
    assert second.text in text


def test_chat_on_a_model_without_tokenizer_fails_cleanly(capsys):
    assert main(["chat", "llama", "--max-tokens", "3"]) == 2
    err = capsys.readouterr().err
    assert "no tokenizer" in err and "Traceback" not in err


def test_embed_on_a_decoder_fails_cleanly(capsys):
    assert main(["embed", "llama", "some text"]) == 2
    assert "decoder" in capsys.readouterr().err


def test_bad_engine_option_names_it(capsys):
    assert main(["embed", "bert", "x", "--kv-cache-mib", "0"]) == 2
    assert "--kv-cache-mib" in capsys.readouterr().err


def test_collect_env_json(capsys):
    assert main(["collect-env", "--json"]) == 0
    env = json.loads(capsys.readouterr().out)
    assert env["packages"]["torch"] and env["default_backend"]
    assert any(b["name"] == "cpu" and b["available"] for b in env["backends"])
    assert env["explain_float32"].get("gemm") and not env["explain_float32"]["gemm"].startswith("error")


def test_bench_serve_in_process_on_a_tiny_model(tmp_path, capsys):
    out = tmp_path / "b.json"
    rc = main(["bench", "serve", "--model", "llama", "--concurrency", "3", "--num-requests", "6",
               "--prompt-len", "4:12", "--output-len", "4:8", "--json", str(out)])
    assert rc == 0
    r = json.loads(out.read_text())
    assert r["completed"] == 6 and r["output_tokens"] >= 6 * 4 and r["output_tokens"] <= 6 * 8
    assert r["ttft_s"]["p50"] > 0 and r["itl_s"]["p99"] >= r["itl_s"]["p50"] > 0
    assert r["server_vs_engine"] > 0
    assert "request throughput" in capsys.readouterr().out


def test_bench_serve_rejects_a_bad_range(capsys):
    assert main(["bench", "serve", "--model", "llama", "--prompt-len", "9:3"]) == 2
    assert "--prompt-len" in capsys.readouterr().err


def test_percentiles_pick_the_right_ranks():
    from anyaccel.bench.serve import percentiles

    p = percentiles([float(x) for x in range(1, 101)])
    assert (p["p50"], p["p90"], p["p99"]) == (50.0, 90.0, 99.0)
    assert percentiles([])["p50"] is None


@pytest.mark.slow
def test_serve_command_answers_curl_style_requests(tmp_path):
    """`anyaccel serve llama` as a subprocess on a free port: /health, /v1/models, a completion; SIGINT stops it."""
    import os
    import signal
    import socket
    import subprocess
    import sys
    import time

    import httpx

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ)
    proc = subprocess.Popen([sys.executable, "-m", "anyaccel", "serve", "llama", "--port", str(port),
                             "--kv-cache-mib", "8"], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            try:
                if httpx.get(url + "/health", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.5)
        assert httpx.get(url + "/v1/models", timeout=30).json()["data"][0]["id"] == "llama"
        r = httpx.post(url + "/v1/completions", json={"model": "llama", "prompt": [5, 6, 7], "max_tokens": 4,
                                                      "temperature": 0, "ignore_eos": True}, timeout=120).json()
        assert len(r["choices"][0]["token_ids"]) == 4 and r["choices"][0]["finish_reason"] == "length"
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, proc.stdout.read().decode()[-2000:]


def test_generate_and_chat_document_one_budget_spelling_and_accept_both():
    from anyaccel.cli import build_parser

    p = build_parser()
    sub = next(a for a in p._actions if a.choices and "chat" in a.choices).choices
    for cmd, default in (("generate", 32), ("chat", 256)):
        help_text = " ".join(sub[cmd].format_help().split())
        assert "--max-new-tokens" in help_text and f"(default {default}" in help_text, cmd
        assert "--max-tokens" not in help_text, cmd
    base = {"generate": ["generate", "--model", "llama", "--prompt-ids", "1"], "chat": ["chat", "llama"]}
    for cmd, argv in base.items():
        assert p.parse_args(argv + ["--max-tokens", "5"]).max_new_tokens == 5
        assert p.parse_args(argv + ["--max-new-tokens", "6"]).max_new_tokens == 6
