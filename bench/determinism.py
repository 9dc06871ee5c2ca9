"""``anyaccel bench determinism``: the cost of deterministic (batch-invariant) mode, as ratios.

The same model (SmolLM2-135M-shaped random Llama, or the tiny config with ``--quick``) is built twice on one
backend: default kernels (A) and batch-invariant kernels (B). Rounds alternate A and B on the same prompts
(so drift in machine load hits both), and the best round of each gives prefill and decode tokens/s; the ratio
B / A is the figure (1.0 = free; 0.85 = a 15% cost). A shared machine makes single rounds noisy: read ratios.
"""
from __future__ import annotations

import time
from typing import Any, Dict, List

import torch

__all__ = ["run", "main"]

_SMOL = dict(architectures=["LlamaForCausalLM"], model_type="llama", vocab_size=49152, hidden_size=576,
             intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
             max_position_embeddings=2048, rms_norm_eps=1e-5, rope_theta=100000.0, tie_word_embeddings=True)


def _engine_run(model: Any, prompts: List[List[int]], new_tokens: int) -> Dict[str, float]:
    from ..models.runner import Engine
    from ..models.sampling import SamplingParams

    P = model.block_size
    blocks = sum(-(-(len(p) + new_tokens) // P) for p in prompts) + len(prompts)
    eng = Engine(model, num_blocks=blocks, max_num_seqs=len(prompts),
                 max_num_batched_tokens=max(256, sum(len(p) for p in prompts)),
                 prefix_caching=False)
    c0 = time.process_time()
    eng.generate(prompts, SamplingParams(max_new_tokens=new_tokens, ignore_eos=True))
    cpu = time.process_time() - c0
    st = eng.stats
    return {"prefill": st.prefill_tokens / st.prefill_seconds if st.prefill_seconds else 0.0,
            "decode": st.decode_tokens / st.decode_seconds if st.decode_seconds else 0.0,
            # tokens per CPU second of this process, prefill and decode together: less noisy on a shared machine
            "generate_per_cpu_s": (st.prefill_tokens + st.decode_tokens) / cpu if cpu > 0 else 0.0}


def run(backend: Any, *, dtype: torch.dtype = torch.float32, batch: int = 4, prompt_len: int = 128,
        new_tokens: int = 32, rounds: int = 3, quick: bool = False) -> List[Dict[str, Any]]:
    from ..conformance.models import TINY_CONFIGS
    from ..models import build_model
    from .model import _hf_model

    config = dict(TINY_CONFIGS["llama"]) if quick else dict(_SMOL)
    hf = _hf_model(config, None, torch.float32)
    models = {det: build_model(hf, backend, dtype, deterministic=det) for det in (False, True)}
    g = torch.Generator().manual_seed(1)
    prompts = torch.randint(3, int(config["vocab_size"]), (batch, prompt_len), generator=g).tolist()
    best: Dict[bool, Dict[str, float]] = {False: {}, True: {}}
    for det in (False, True):  # warm-up
        _engine_run(models[det], [p[:16] for p in prompts], 4)
    for _ in range(rounds):
        for det in (False, True):
            r = _engine_run(models[det], prompts, new_tokens)
            for k, v in r.items():
                best[det][k] = max(best[det].get(k, 0.0), v)
    out = []
    for metric in ("prefill", "decode", "generate_per_cpu_s"):
        a, b = best[False][metric], best[True][metric]
        out.append(dict(metric=metric, backend=backend.name, dtype=str(dtype).removeprefix("torch."), batch=batch,
                        prompt_len=prompt_len, new_tokens=new_tokens, default_tok_s=a, deterministic_tok_s=b,
                        ratio=(b / a) if a else None))
    return out


def main(args: Any, backend: Any) -> int:
    from ..models.base import parse_dtype

    if getattr(args, "threads", None):
        torch.set_num_threads(args.threads)
    recs = run(backend, dtype=parse_dtype(args.dtype), batch=args.batch, prompt_len=args.prompt_len,
               new_tokens=args.new_tokens, rounds=args.rounds, quick=args.quick)
    print(f"deterministic mode cost on {backend.name} ({recs[0]['dtype']}, batch {args.batch}, prompt "
          f"{args.prompt_len}, {args.new_tokens} new tokens, {torch.get_num_threads()} threads, best of "
          f"{args.rounds} alternating rounds; generate_per_cpu_s = tokens per CPU second of the whole generate)")
    for r in recs:
        ratio = f"{r['ratio']:.3f}" if r["ratio"] else "-"
        print(f"  {r['metric']:18s} default {r['default_tok_s']:10.1f} tok/s   deterministic "
              f"{r['deterministic_tok_s']:10.1f} tok/s   ratio {ratio}")
    return 0
