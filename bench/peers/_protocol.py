"""The worker side of the peer protocol (standard library only: it runs in the peers' own virtual environment).

A side of ``anyaccel bench model`` (ours, transformers, vLLM, llama.cpp) is a script that calls :func:`serve`
with two functions. The parent writes one JSON request per line on the worker's stdin and reads one JSON reply
per line; the worker's fd 1 is moved to stderr first, so whatever a library prints (vLLM logs to stdout) never
mixes with the replies.

Requests: ``{"op": "load", ...}`` -> ``load(request)`` returns a dict (versions, notes) and keeps its state;
``{"op": "measure", "prompts": [[ids]], "new_tokens": N, "warmup": true}`` -> :func:`measure` with the
worker's ``generate(prompts, n) -> tokens`` (greedy, ``n`` new tokens per prompt, end-of-sequence ignored);
``{"op": "exit"}`` ends the loop. A failure is a reply ``{"error": "..."}``; the worker keeps serving.
"""
from __future__ import annotations

import json
import os
import sys
import time
import traceback
from typing import Any, Callable, Dict, List, Optional

Generate = Callable[[List[List[int]], int], List[List[int]]]


def measure(generate: Generate, prompts: List[List[int]], new_tokens: int, warmup: bool = True,
            sync: Optional[Callable[[], None]] = None) -> Dict[str, Any]:
    """Time one configuration the same way on every side.

    prefill: the time of a 1-token generate over ``prompts``; decode: (time of ``new_tokens + 1`` tokens - time
    of 1 token), i.e. the time of ``new_tokens`` decode steps. A warm-up generate (2 tokens, the same prompts)
    runs first when ``warmup``.
    """
    sync = sync or (lambda: None)
    if warmup:
        generate(prompts, 2)
    sync()
    t0 = time.perf_counter()
    generate(prompts, 1)
    sync()
    t_one = time.perf_counter() - t0
    t0 = time.perf_counter()
    tokens = generate(prompts, new_tokens + 1)
    sync()
    t_all = time.perf_counter() - t0
    return {"prefill_s": t_one, "decode_s": max(t_all - t_one, 0.0), "total_s": t_all,
            "tokens": [list(map(int, t)) for t in tokens]}


def serve(load: Callable[[Dict[str, Any]], Dict[str, Any]],
          measure_fn: Callable[[Dict[str, Any]], Dict[str, Any]]) -> None:
    """Answer requests from stdin until ``exit`` or end of input (see the module docstring)."""
    reply_fd = os.dup(1)
    os.dup2(2, 1)  # library output to stderr from now on
    sys.stdout = sys.stderr
    out = os.fdopen(reply_fd, "w", buffering=1)

    def reply(obj: Dict[str, Any]) -> None:
        out.write(json.dumps(obj) + "\n")
        out.flush()

    reply({"ready": True, "pid": os.getpid()})
    for line in sys.stdin:
        if not line.strip():
            continue
        try:
            req = json.loads(line)
            op = req.get("op")
            if op == "exit":
                reply({"bye": True})
                break
            if op == "load":
                reply(load(req))
            elif op == "measure":
                reply(measure_fn(req))
            else:
                reply({"error": f"unknown op {op!r}"})
        except BaseException as e:  # noqa: BLE001 - report to the parent, keep serving
            traceback.print_exc(file=sys.stderr)
            reply({"error": f"{type(e).__name__}: {e}".splitlines()[0][:500]})
            if isinstance(e, KeyboardInterrupt):
                break
    out.close()


def set_threads(n: int) -> None:
    """Environment for ``n`` threads (before the numeric libraries are imported)."""
    for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[k] = str(n)
