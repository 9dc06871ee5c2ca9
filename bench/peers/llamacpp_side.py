"""llama.cpp (``llama-cpp-python``) on the GGUF file itself, as a side of ``anyaccel bench model``.

Batch 1 only (the bindings' high-level API runs one sequence): ``eval`` of the prompt tokens, then single-token
``eval`` calls on the greedy token. The weights are the file's own quantized ones (e.g. Q4_1), not the dense
weights the other sides run: compare it as "what a llama.cpp user gets from the same file".
"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _protocol import measure, serve, set_threads  # noqa: E402

_state: dict = {}


def load(req: dict) -> dict:
    import llama_cpp

    threads = int(req["threads"])
    llm = llama_cpp.Llama(model_path=req["gguf"], n_ctx=int(req["max_model_len"]), n_batch=512,
                          n_threads=threads, n_threads_batch=threads, verbose=False, seed=0)
    _state["llm"] = llm
    return {"version": llama_cpp.__version__, "threads": threads}


def _argmax_last(llm) -> int:
    """The greedy token after the last ``eval``: with ``logits_all=False`` the bindings keep no scores (0.3.x),
    so the last row of logits is read from the context."""
    import llama_cpp
    import numpy as np

    ptr = llama_cpp.llama_get_logits(llm._ctx.ctx)
    return int(np.argmax(np.ctypeslib.as_array(ptr, shape=(llm.n_vocab(),))))


def run(req: dict) -> dict:
    prompts = req["prompts"]
    if len(prompts) != 1:
        return {"unsupported": "batch > 1 (llama-cpp-python's API runs one sequence)"}
    llm = _state["llm"]

    def generate(ps, k):
        llm.reset()
        llm.eval(list(ps[0]))
        out = [_argmax_last(llm)]
        while len(out) < k:
            llm.eval([out[-1]])
            out.append(_argmax_last(llm))
        return [out]

    return measure(generate, prompts, int(req["new_tokens"]), warmup=req.get("warmup", True))


if __name__ == "__main__":
    set_threads(int(os.environ.get("ANYACCEL_BENCH_THREADS", "0")) or os.cpu_count() or 1)
    serve(load, run)
