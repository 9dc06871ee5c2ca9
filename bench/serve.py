"""``anyaccel bench serve``: load a running OpenAI-compatible server, in the spirit of ``vllm bench serve``.

A fixed, seeded set of requests (prompt and output lengths varied over the given ranges, ``ignore_eos`` so each
produces exactly its output length) is sent as streaming ``/v1/completions`` at a fixed concurrency. Reported:
request throughput, output tokens/s, time to first token and inter-token latency (p50/p90/p99).

Without ``--url`` the model is served in this process on a free loopback port and loaded by a child process
(``bench serve --url``, so the client never competes with the server for the interpreter lock); the engine's
own batched decode rate (the same prompts through :meth:`LLM.generate`, no HTTP) is measured first, so the
report shows what the server layer costs: ``server output tok/s / engine tok/s`` (after one untimed warm-up
pass of the same requests through the engine).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import math
import random
import statistics
import time
from typing import Any, Dict, List, Optional, Tuple

__all__ = ["add_bench_serve_arguments", "make_requests", "run_load", "percentiles", "bench_serve_main"]


def add_bench_serve_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="smollm2", help="model to serve in-process (default smollm2), or the model "
                                                       "id to send with --url")
    p.add_argument("--url", help="an already running server (e.g. http://127.0.0.1:8000); default: serve here")
    p.add_argument("--backend")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--num-requests", dest="num_requests", type=int, default=32)
    p.add_argument("--prompt-len", dest="prompt_len", default="16:96", help="MIN:MAX prompt tokens (default 16:96)")
    p.add_argument("--output-len", dest="output_len", default="16:64", help="MIN:MAX new tokens (default 16:64)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--vocab-size", dest="vocab_size", type=int, default=1000,
                   help="with --url: prompt ids are drawn below this (default 1000)")
    p.add_argument("--api-key", dest="api_key", help="with --url: the server's API key")
    p.add_argument("--max-prefill-tokens-while-decoding", dest="max_prefill_tokens_while_decoding", type=int,
                   default=None, help="in-process server: prompt tokens per engine step while others decode "
                                      "(default: the LLM's default; 0: no cap, the whole budget)")
    p.add_argument("--json", metavar="PATH", help="write the figures as JSON")
    p.add_argument("--vllm", action="store_true",
                   help="then run the same load against `vllm serve` from the peers venv (smollm2 only: the same "
                        "weights written out as a Hugging Face directory); reports ours / vLLM")
    p.add_argument("--peers-venv", dest="peers_venv", metavar="PATH",
                   help="the peers' virtual environment (default: $ANYACCEL_PEERS_VENV or .venv-peers)")


def _range(text: str, name: str) -> Tuple[int, int]:
    try:
        lo, hi = (int(x) for x in text.split(":"))
    except ValueError:
        raise ValueError(f"--{name}: expected MIN:MAX integers, received {text!r}") from None
    if not 1 <= lo <= hi:
        raise ValueError(f"--{name}: expected 1 <= MIN <= MAX, received {text!r}")
    return lo, hi


def make_requests(n: int, prompt_len: Tuple[int, int], output_len: Tuple[int, int], vocab: int,
                  seed: int) -> List[Tuple[List[int], int]]:
    """``n`` (prompt token ids, output length) pairs, seeded; ids avoid the first 16 (special tokens)."""
    rng = random.Random(seed)
    return [([rng.randrange(16, vocab) for _ in range(rng.randint(*prompt_len))], rng.randint(*output_len))
            for _ in range(n)]


def percentiles(xs: List[float]) -> Dict[str, Optional[float]]:
    if not xs:
        return {"p50": None, "p90": None, "p99": None, "mean": None}
    s = sorted(xs)

    def q(p: float) -> float:  # nearest rank: the smallest value with at least p of the sample at or below it
        return s[min(len(s) - 1, max(0, math.ceil(p * len(s)) - 1))]

    return {"p50": q(0.5), "p90": q(0.9), "p99": q(0.99), "mean": statistics.fmean(s)}


async def _one(client, url: str, model: str, prompt: List[int], n: int, headers: Dict[str, str],
               extra: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    body = {"model": model, "prompt": prompt, "max_tokens": n, "temperature": 0, "stream": True, "ignore_eos": True,
            **(extra or {})}
    t0 = time.perf_counter()
    times: List[float] = []
    async with client.stream("POST", url + "/v1/completions", json=body, headers=headers) as r:
        if r.status_code != 200:
            return {"ok": False, "error": f"HTTP {r.status_code}: {(await r.aread())[:200]!r}"}
        async for line in r.aiter_lines():
            if not line.startswith("data:") or line.strip() == "data: [DONE]":
                continue
            ids = json.loads(line[5:])["choices"][0].get("token_ids") or []
            times.extend([time.perf_counter()] * len(ids))
    if not times:
        return {"ok": False, "error": "no token received"}
    return {"ok": True, "ttft": times[0] - t0, "itl": [b - a for a, b in zip(times, times[1:])],
            "tokens": len(times), "latency": times[-1] - t0}


async def _load(url: str, model: str, reqs, concurrency: int, api_key: Optional[str],
                extra: Optional[Dict[str, Any]] = None) -> Tuple[list, float]:
    import httpx

    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    sem = asyncio.Semaphore(concurrency)
    limits = httpx.Limits(max_connections=concurrency + 4)
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:
        async def guarded(p, n):
            async with sem:
                return await _one(client, url, model, p, n, headers, extra)

        t0 = time.perf_counter()
        res = await asyncio.gather(*(guarded(p, n) for p, n in reqs))
        return res, time.perf_counter() - t0


def run_load(url: str, model: str, reqs, concurrency: int, api_key: Optional[str] = None,
             extra_body: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """Send ``reqs`` at ``concurrency``; the figures (seconds, tokens/s) as a dict. ``extra_body``: more request
    fields (vLLM returns the generated ids only with ``return_token_ids``)."""
    res, wall = asyncio.run(_load(url.rstrip("/"), model, reqs, concurrency, api_key, extra_body))
    ok = [r for r in res if r["ok"]]
    out_tokens = sum(r["tokens"] for r in ok)
    return {"requests": len(reqs), "completed": len(ok), "failed": [r["error"] for r in res if not r["ok"]][:5],
            "concurrency": concurrency, "duration_s": wall, "request_throughput": len(ok) / wall,
            "output_tokens": out_tokens, "output_tok_s": out_tokens / wall,
            "ttft_s": percentiles([r["ttft"] for r in ok]),
            "itl_s": percentiles([x for r in ok for x in r["itl"]])}


def _engine_rate(llm, reqs) -> float:
    """Output tokens/s of the engine alone (one LLM.generate over all requests, no HTTP); the LLM's
    ``max_num_seqs`` is the concurrency, so the engine keeps that many in flight by continuous batching too."""
    import threading

    from ..serve import SamplingParams

    # In a worker thread, as the server's engine loop steps: on a loaded CPU the main thread's torch calls were
    # measured 3-5x slower than the same calls from a worker thread, which would flatter the server.
    box = {}

    def run():
        try:
            t0 = time.perf_counter()
            outs = llm.generate([p for p, _ in reqs],
                                [SamplingParams(max_new_tokens=n, ignore_eos=True) for _, n in reqs])
            box["rate"] = sum(len(o.token_ids) for o in outs) / (time.perf_counter() - t0)
        except BaseException as e:  # re-raised in the caller's thread
            box["error"] = e

    t = threading.Thread(target=run, name="anyaccel-bench-engine")
    t.start()
    t.join()
    if "error" in box:
        raise box["error"]
    return box["rate"]


def _load_from_another_process(url: str, model: str, args: argparse.Namespace, vocab: int) -> Dict[str, Any]:
    """Run the load client as ``anyaccel bench serve --url`` in a child process (the same seeded requests), as
    ``vllm bench serve`` runs beside its server: in this process the client's SSE parsing would share the server's
    interpreter lock and inflate the server's latencies."""
    import os
    import subprocess
    import sys
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "load.json")
        cmd = [sys.executable, "-m", "anyaccel", "bench", "serve", "--url", url, "--model", model,
               "--concurrency", str(args.concurrency), "--num-requests", str(args.num_requests),
               "--prompt-len", args.prompt_len, "--output-len", args.output_len, "--seed", str(args.seed),
               "--vocab-size", str(vocab), "--json", path]
        r = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        if not os.path.exists(path):
            raise RuntimeError(f"the load client failed (exit {r.returncode}): {r.stderr.strip()[-2000:]}")
        with open(path, encoding="utf-8") as f:
            out = json.load(f)
    out.pop("model", None)
    return out


def bench_serve_main(args: argparse.Namespace, builtins=None, print_fn=print) -> int:
    if args.concurrency < 1 or args.num_requests < 1:
        raise ValueError(f"--concurrency and --num-requests must be >= 1, received {args.concurrency} and "
                         f"{args.num_requests}")
    plen, olen = _range(args.prompt_len, "prompt-len"), _range(args.output_len, "output-len")
    report: Dict[str, Any] = {"model": args.model}
    if args.url:
        vocab = args.vocab_size
        reqs = make_requests(args.num_requests, plen, olen, vocab, args.seed)
        report.update(run_load(args.url, args.model, reqs, args.concurrency, args.api_key))
    else:
        from ..serve import LLM
        from ..serve.app import ServerThread, build_app

        cap = getattr(args, "max_prefill_tokens_while_decoding", None)
        extra = {} if cap is None else {"max_prefill_tokens_while_decoding": cap or None}
        llm = LLM(args.model, backend=args.backend, dtype=args.dtype, max_num_seqs=max(args.concurrency, 1),
                  builtins=builtins, **extra)
        report["max_prefill_tokens_while_decoding"] = llm.engine.max_prefill_tokens_while_decoding
        reqs = make_requests(args.num_requests, plen, olen, int(llm.model.config.vocab_size), args.seed)
        # Warm-up: one untimed pass over the same requests. The first time a batch shape is seen costs far more
        # than later ones (allocator growth, per-shape kernel setup), and the server pass would otherwise see
        # only warm shapes while the engine pass saw cold ones.
        _engine_rate(llm, reqs)
        _forget_prefixes(llm)
        report["engine_output_tok_s"] = _engine_rate(llm, reqs)
        _forget_prefixes(llm)  # each pass starts with an empty prefix cache: the same prompts would all hit
        report["backend"] = llm.backend.name
        with ServerThread(build_app(llm, max_queue=max(64, args.num_requests))) as srv:
            report.update(_load_from_another_process(srv.url, llm.name, args, int(llm.model.config.vocab_size)))
        report["server_vs_engine"] = report["output_tok_s"] / report["engine_output_tok_s"]
    if getattr(args, "vllm", False):
        from .serve_peer import vllm_serve_load

        report["vllm"] = vllm_serve_load(args, reqs, print_fn)
        if report["vllm"].get("output_tok_s") and report.get("output_tok_s"):
            report["ours_vs_vllm_output_tok_s"] = report["output_tok_s"] / report["vllm"]["output_tok_s"]
    _render(report, print_fn)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(report, f, indent=2)
            f.write("\n")
    return 0 if report["completed"] == report["requests"] else 1


def _forget_prefixes(llm) -> None:
    if getattr(llm.engine, "prefix_cache", None) is not None:
        llm.engine.prefix_cache.reset()


def _ms(x: Optional[float]) -> str:
    return "-" if x is None else f"{x * 1000:.1f}"


def _render(r: Dict[str, Any], print_fn) -> None:
    print_fn(f"bench serve: {r['model']}" + (f" on {r['backend']}" if "backend" in r else "") +
             f", {r['requests']} requests at concurrency {r['concurrency']}")
    print_fn(f"  completed            {r['completed']}/{r['requests']}" +
             (f"  (failures: {r['failed']})" if r["failed"] else ""))
    print_fn(f"  duration             {r['duration_s']:.2f} s")
    print_fn(f"  request throughput   {r['request_throughput']:.3f} req/s")
    print_fn(f"  output tokens/s      {r['output_tok_s']:.1f}")
    if "engine_output_tok_s" in r:
        print_fn(f"  engine alone tok/s   {r['engine_output_tok_s']:.1f}  (server / engine = "
                 f"{r['server_vs_engine']:.2f})")
    for key, label in (("ttft_s", "TTFT"), ("itl_s", "ITL")):
        p = r[key]
        print_fn(f"  {label:<5} ms  p50 {_ms(p['p50'])}  p90 {_ms(p['p90'])}  p99 {_ms(p['p99'])}  "
                 f"mean {_ms(p['mean'])}")
    v = r.get("vllm")
    if v is not None:
        if "absent" in v:
            print_fn(f"  vLLM serve: absent - {v['absent']}")
        else:
            print_fn(f"  vLLM serve ({v.get('version', '?')}): completed {v['completed']}/{v['requests']}, output "
                     f"tokens/s {v['output_tok_s']:.1f}, TTFT p50 {_ms(v['ttft_s']['p50'])} ms, ITL p50 "
                     f"{_ms(v['itl_s']['p50'])} p99 {_ms(v['itl_s']['p99'])} ms")
            if "ours_vs_vllm_output_tok_s" in r:
                print_fn(f"  ours / vLLM output tokens/s: {r['ours_vs_vllm_output_tok_s']:.2f}")
