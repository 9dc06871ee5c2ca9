"""Batch invariance of a whole model: per-step logits of one sequence, compared BITWISE across batches.

A target sequence is generated alone (one prefill, then decode); then inside batches of 1..32 mixed sequences
(other prompts of other lengths, the target at another row), and under chunked prefill of several sizes (the
engine's ``max_num_batched_tokens``), alone and in a batch. Every step's float32 logits row of the target must
equal the alone run's bit for bit (``torch.equal``); the record's ``max_abs_err`` is the largest difference seen
and ``tolerance`` is 0.

Deterministic mode (``build_model(..., deterministic=True)``, ``--deterministic``) selects only kernels that
declare ``batch_invariant``; there every case must pass. :func:`sensitivity` runs the same cases in the default
mode and reports whether ANY differs: that is the proof that the check can fail (the default kernels pick other
code paths by batch size), so a pass in deterministic mode means something.

Nothing here names a backend: it runs on whatever backend it is given.
"""
from __future__ import annotations

import random
import time
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch

from ..core.errors import UnsupportedError
from ..core.validation import dtype_name
from .cases import CaseResult

__all__ = ["BATCH_SIZES", "CHUNK_SIZES", "run_invariance", "sensitivity", "TargetLogits"]

#: batch sizes the target is run in (1 = alone, then mixed batches)
BATCH_SIZES = (1, 3, 8, 32)
#: chunked-prefill sizes (tokens per forward); None = the whole prompt in one forward
CHUNK_SIZES = (None, 7, 16)
_PROMPT_LEN = 37
_NEW_TOKENS = 5


class TargetLogits:
    """Wraps an engine's sampler and keeps the float32 logits row of one sequence (found by its params object)
    at every step it is sampled."""

    def __init__(self, inner: Any, target_params: Any) -> None:
        self.inner, self.target, self.rows = inner, target_params, []

    def __call__(self, logits_SV, params, generators):
        for i, p in enumerate(params):
            if p is self.target:
                self.rows.append(logits_SV[i].detach().float().clone())
        return self.inner(logits_SV, params, generators)


def _prompts(vocab: int, n_others: int, seed: int) -> Tuple[List[int], List[List[int]]]:
    rng = random.Random(seed)
    target = [rng.randrange(3, vocab) for _ in range(_PROMPT_LEN)]
    others = [[rng.randrange(3, vocab) for _ in range(rng.randrange(1, 60))] for _ in range(n_others)]
    return target, others


def _run(model: Any, target: List[int], others: List[List[int]], chunk: Optional[int]) -> List[torch.Tensor]:
    """Generate greedily for ``others`` with ``target`` in the middle; the target's logits rows per step."""
    from ..models.runner import Engine
    from ..models.sampling import SamplingParams

    prompts = list(others)
    pos = len(prompts) // 2
    prompts.insert(pos, target)
    params = [SamplingParams(max_new_tokens=_NEW_TOKENS + (i % 3), ignore_eos=True) for i in range(len(prompts))]
    params[pos] = SamplingParams(max_new_tokens=_NEW_TOKENS, ignore_eos=True)
    P = model.block_size
    blocks = sum(-(-(len(p) + _NEW_TOKENS + 3) // P) for p in prompts) + 4
    engine = Engine(model, num_blocks=blocks, max_num_seqs=len(prompts),
                    max_num_batched_tokens=chunk or 4096)
    rec = TargetLogits(engine.sampler, params[pos])
    engine.sampler = rec
    engine.generate(prompts, params)
    return rec.rows


def _compare(alone: Sequence[torch.Tensor], other: Sequence[torch.Tensor]) -> Tuple[bool, float, str]:
    if len(alone) != len(other):
        return False, float("inf"), f"{len(other)} steps sampled, {len(alone)} alone"
    worst, first = 0.0, ""
    for k, (a, b) in enumerate(zip(alone, other)):
        if not torch.equal(a, b):
            d = float((a - b).abs().max())
            worst = max(worst, d)
            if not first:
                first = f"step {k}: logits differ (max |diff| {d:.3g})"
    return not first, worst, first


def run_invariance(backend: Any, dtype: torch.dtype = torch.float32, *, deterministic: bool = True,
                   family: str = "llama", seed: int = 0, batch_sizes: Sequence[int] = BATCH_SIZES,
                   chunk_sizes: Sequence[Optional[int]] = CHUNK_SIZES) -> List[CaseResult]:
    """One record per (batch size, chunk size) other than (1, None), the baseline it is compared with."""
    from ..models import build_model
    from .models import TINY_CONFIGS, make_reference

    mode = "deterministic" if deterministic else "default"
    dt = dtype_name(dtype)
    name0 = f"invariance/{family}/{mode}"
    try:
        model = build_model(make_reference(TINY_CONFIGS[family], seed=seed), backend, dtype,
                            deterministic=deterministic)
    except UnsupportedError as e:
        return [CaseResult(backend.name, "model", name0, dt, "unsupported", reason=str(e).splitlines()[0])]
    target, others = _prompts(int(model.config.vocab_size), max(batch_sizes) - 1, seed)
    with torch.no_grad():
        alone = _run(model, target, [], None)
    out: List[CaseResult] = []
    for chunk in chunk_sizes:
        for b in batch_sizes:
            if b == 1 and chunk is None:
                continue
            t0 = time.perf_counter()
            with torch.no_grad():
                rows = _run(model, target, others[:b - 1], chunk)
            ok, worst, why = _compare(alone, rows)
            out.append(CaseResult(backend.name, "model", f"{name0}/batch{b}/chunk{chunk or 'none'}", dt,
                                  "pass" if ok else "fail", max_abs_err=worst, tolerance=0.0, reason=why,
                                  seconds=time.perf_counter() - t0))
    return out


def sensitivity(backend: Any, dtype: torch.dtype = torch.float32, **kw: Any) -> Dict[str, Any]:
    """The default mode on the same cases: ``{"differs": bool, "cases": [...]}``; ``differs`` is True when at
    least one case is not bitwise equal (what makes the deterministic-mode check meaningful)."""
    cases = run_invariance(backend, dtype, deterministic=False, **kw)
    return {"differs": any(c.status == "fail" for c in cases), "cases": cases}
