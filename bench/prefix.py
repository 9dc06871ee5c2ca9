"""``anyaccel bench prefix``: prefix caching on a shared-prefix chat workload, cache on vs off in the same run.

Workload (synthetic token ids, seeded): ``--sessions`` chat sessions share one ``--system-len``-token system prompt.
In each of ``--turns`` rounds every session sends its whole history (system prompt, earlier user turns and the
model's own earlier answers) plus a new ``--user-len``-token user turn, all sessions at once, and gets a greedy
``--answer-len``-token answer that joins its history. The requests go through the engine's request API
(:meth:`Engine.add_request` / :meth:`Engine.step`, the server's engine loop without HTTP), so a request's TTFT is
the time from its submission to the step that produced its first token, queueing behind the round's other
requests included.

Reported per mode: TTFT p50/p90, prompt tokens computed (prefill) and taken from the cache, wall time; and the
ratios off/on. Modes alternate (off, on, on, off, ... over ``--repeats``) on one model, each on a fresh engine, so
machine load drifts into both; the ratios are the figures to read, not the absolute seconds.
"""
from __future__ import annotations

import argparse
import json
import random
import statistics
import time
from typing import Any, Dict, List, Optional

__all__ = ["add_bench_prefix_arguments", "make_sessions", "run_workload", "bench_prefix_main"]


def add_bench_prefix_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="smollm2", help="model (default smollm2; a built-in tiny model for a smoke run)")
    p.add_argument("--backend")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--sessions", type=int, default=20)
    p.add_argument("--turns", type=int, default=3)
    p.add_argument("--system-len", dest="system_len", type=int, default=1000)
    p.add_argument("--user-len", dest="user_len", type=int, default=40)
    p.add_argument("--answer-len", dest="answer_len", type=int, default=16)
    p.add_argument("--repeats", type=int, default=1, help="off/on pairs, alternated (default 1)")
    p.add_argument("--kv-cache-mib", dest="kv_cache_mib", type=int, default=512)
    p.add_argument("--max-num-seqs", dest="max_num_seqs", type=int, default=8)
    p.add_argument("--max-num-batched-tokens", dest="max_num_batched_tokens", type=int, default=512)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", metavar="PATH", help="write the figures as JSON")


def make_sessions(sessions: int, turns: int, system_len: int, user_len: int, vocab: int, seed: int):
    """``(system prompt ids, [[user turn ids] * turns] * sessions)``, seeded; ids avoid the first 16."""
    rng = random.Random(seed)
    system = [rng.randrange(16, vocab) for _ in range(system_len)]
    users = [[[rng.randrange(16, vocab) for _ in range(user_len)] for _ in range(turns)] for _ in range(sessions)]
    return system, users


def _pct(xs: List[float], q: float) -> float:
    xs = sorted(xs)
    if not xs:
        return float("nan")
    k = (len(xs) - 1) * q
    lo = int(k)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def run_workload(model: Any, system: List[int], users: List[List[List[int]]], answer_len: int, *,
                 prefix_caching: bool, kv_budget_bytes: int, max_num_seqs: int, max_num_batched_tokens: int
                 ) -> Dict[str, Any]:
    """Play the chat workload on a fresh engine; returns TTFTs, token counts, the answers and the wall time."""
    from ..models.runner import Engine
    from ..models.sampling import SamplingParams

    e = Engine(model, kv_budget_bytes=kv_budget_bytes, max_num_seqs=max_num_seqs,
               max_num_batched_tokens=max_num_batched_tokens, prefix_caching=prefix_caching)
    params = SamplingParams(max_new_tokens=answer_len, ignore_eos=True)
    history = [list(system) for _ in users]
    ttft: List[float] = []
    answers: List[List[int]] = [[] for _ in users]
    prefill = decode = prompt_tokens = 0
    t_start = time.perf_counter()
    for turn in range(len(users[0]) if users else 0):
        sent: Dict[str, float] = {}
        out: Dict[str, List[int]] = {}
        for i, u in enumerate(users):
            history[i] += u[turn]
            rid = f"s{i}t{turn}"
            prompt_tokens += len(history[i])
            e.add_request(rid, history[i], params)
            sent[rid] = time.perf_counter()
            out[rid] = []
        while e.has_unfinished_requests():
            for r in e.step():
                if r.new_token_ids and not out[r.request_id]:
                    ttft.append(time.perf_counter() - sent[r.request_id])
                out[r.request_id].extend(r.new_token_ids)
            prefill += e.stats.prefill_tokens
            decode += e.stats.decode_tokens
            e.stats.prefill_tokens = e.stats.decode_tokens = 0
        for i in range(len(users)):
            ans = out[f"s{i}t{turn}"]
            answers[i].append(ans)
            history[i] += ans
    wall = time.perf_counter() - t_start
    return {"prefix_caching": prefix_caching, "ttft_s": ttft, "ttft_p50_s": _pct(ttft, 0.5),
            "ttft_p90_s": _pct(ttft, 0.9), "prompt_tokens": prompt_tokens, "prefill_tokens": prefill,
            "cached_tokens": e.stats.prefix_hit_tokens, "decode_tokens": decode, "wall_s": wall,
            "answers": answers}


def bench_prefix_main(args: argparse.Namespace, builtins: Optional[Dict[str, Any]] = None, out=None) -> int:
    import sys

    from ..models.base import parse_dtype
    from ..models.cli_support import load_generation_model
    from ..serve.llm import choose_backend

    out = out or sys.stdout
    for k in ("sessions", "turns", "system_len", "user_len", "answer_len", "repeats", "kv_cache_mib",
              "max_num_seqs", "max_num_batched_tokens"):
        if getattr(args, k) < 1:
            raise ValueError(f"--{k.replace('_', '-')}: expected an integer >= 1, received {getattr(args, k)}")
    backend = choose_backend(args.backend)
    model, _ = load_generation_model(args.model, backend, parse_dtype(args.dtype), builtins=builtins)
    system, users = make_sessions(args.sessions, args.turns, args.system_len, args.user_len,
                                  int(model.config.vocab_size), args.seed)
    kw = dict(kv_budget_bytes=args.kv_cache_mib * 1024 * 1024, max_num_seqs=args.max_num_seqs,
              max_num_batched_tokens=args.max_num_batched_tokens)
    order = []
    for r in range(args.repeats):
        order += [False, True] if r % 2 == 0 else [True, False]
    runs: Dict[bool, List[Dict[str, Any]]] = {False: [], True: []}
    for mode in order:
        res = run_workload(model, system, users, args.answer_len, prefix_caching=mode, **kw)
        runs[mode].append(res)
        print(f"  prefix cache {'on ' if mode else 'off'}: TTFT p50 {res['ttft_p50_s'] * 1e3:8.1f} ms  p90 "
              f"{res['ttft_p90_s'] * 1e3:8.1f} ms  prefill tokens {res['prefill_tokens']:7d}  cached "
              f"{res['cached_tokens']:7d}  wall {res['wall_s']:7.1f} s", file=out, flush=True)
    same = all(r["answers"] == runs[False][0]["answers"] for m in (False, True) for r in runs[m])

    def med(mode: bool, key: str) -> float:
        return statistics.median(r[key] for r in runs[mode])

    summary = {
        "model": args.model, "backend": backend.name, "dtype": args.dtype, "sessions": args.sessions,
        "turns": args.turns, "system_len": args.system_len, "user_len": args.user_len,
        "answer_len": args.answer_len, "repeats": args.repeats,
        "off": {k: med(False, k) for k in ("ttft_p50_s", "ttft_p90_s", "prefill_tokens", "cached_tokens", "wall_s")},
        "on": {k: med(True, k) for k in ("ttft_p50_s", "ttft_p90_s", "prefill_tokens", "cached_tokens", "wall_s")},
        "prompt_tokens": runs[True][0]["prompt_tokens"], "identical_answers": same,
    }
    off, on = summary["off"], summary["on"]
    summary["ratios"] = {"prefill_tokens_off_over_on": off["prefill_tokens"] / max(on["prefill_tokens"], 1),
                         "ttft_p50_off_over_on": off["ttft_p50_s"] / on["ttft_p50_s"],
                         "ttft_p90_off_over_on": off["ttft_p90_s"] / on["ttft_p90_s"],
                         "wall_off_over_on": off["wall_s"] / on["wall_s"]}
    r = summary["ratios"]
    print(f"{args.model} on {backend.name} ({args.dtype}), {args.sessions} sessions x {args.turns} turns, system "
          f"prompt {args.system_len} tokens, user turns {args.user_len}, answers {args.answer_len} "
          f"(medians of {args.repeats} alternated run(s) per mode):", file=out)
    print(f"  prefill tokens computed: off {off['prefill_tokens']:.0f}, on {on['prefill_tokens']:.0f} -> "
          f"{r['prefill_tokens_off_over_on']:.2f}x fewer (target >= 5x)", file=out)
    print(f"  TTFT p50: off {off['ttft_p50_s'] * 1e3:.1f} ms, on {on['ttft_p50_s'] * 1e3:.1f} ms -> "
          f"{r['ttft_p50_off_over_on']:.2f}x lower (target >= 3x)", file=out)
    print(f"  TTFT p90: off {off['ttft_p90_s'] * 1e3:.1f} ms, on {on['ttft_p90_s'] * 1e3:.1f} ms -> "
          f"{r['ttft_p90_off_over_on']:.2f}x lower", file=out)
    print(f"  wall: {r['wall_off_over_on']:.2f}x; greedy answers identical with and without the cache: {same}",
          file=out)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(summary, f, indent=2)
            f.write("\n")
    return 0
