"""Sampling: what a request asks for (:class:`SamplingParams`) and how the next token is drawn from logits.

Greedy (``temperature == 0``) takes the argmax. Otherwise the logits are divided by the temperature, filtered
by top-k then top-p (nucleus), and one token is drawn with the sequence's own ``torch.Generator``. A sequence
with a ``seed`` gets a generator seeded with it, so its tokens do not depend on which other sequences share
its batch, on the batch order, or on a preemption that recomputes its cache.

Shape legend: S sequences sampled this step, V vocabulary size.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import List, Optional, Sequence, Tuple

import torch

from ..core.errors import InvalidArgumentError

__all__ = ["SamplingParams", "Sampler", "apply_top_k_top_p", "make_generator", "token_logprobs", "MAX_LOGPROBS"]

_OP = "SamplingParams"

#: The most alternatives ``SamplingParams.logprobs`` may ask for (OpenAI's ``top_logprobs`` limit).
MAX_LOGPROBS = 20


@dataclass(frozen=True)
class SamplingParams:
    """How to continue one prompt.

    :param max_new_tokens: the token budget: generation stops after this many new tokens.
    :param temperature: ``0`` is greedy; ``> 0`` samples from ``softmax(logits / temperature)``.
    :param top_k: keep only the ``top_k`` most likely tokens (``None`` or ``0``: no limit).
    :param top_p: keep the smallest set of most likely tokens whose probability reaches ``top_p`` (``1.0``: all).
    :param seed: seeds this sequence's generator; ``None`` draws from torch's global generator.
    :param stop_token_ids: generation stops after emitting any of these (the token is kept in the output).
    :param ignore_eos: do not stop at the model's end-of-sequence token (benchmarks).
    :param stop: stop strings, applied to the decoded text by the serving layer (:mod:`anyaccel.serve`): the
        text ends just before the first one found. The engine itself works on token ids and ignores them.
    :param logprobs: ``None`` (default): none. ``k >= 0``: with each generated token the engine returns its
        log-probability under the model (``log_softmax`` of the raw logits, before temperature or top-k/top-p)
        and the ``k`` most likely tokens with theirs (OpenAI's ``logprobs`` / ``top_logprobs``), ``k <= 20``.
    :param n: choices per prompt (the serving layer runs ``n`` requests; with a ``seed``, choice ``i`` uses
        ``seed + i``). The engine itself runs one sequence per request and ignores it.
    """

    max_new_tokens: int = 16
    temperature: float = 0.0
    top_k: Optional[int] = None
    top_p: float = 1.0
    seed: Optional[int] = None
    stop_token_ids: Tuple[int, ...] = field(default=())
    ignore_eos: bool = False
    stop: Tuple[str, ...] = field(default=())
    logprobs: Optional[int] = None
    n: int = 1

    def __post_init__(self) -> None:
        m = self.max_new_tokens
        if isinstance(m, bool) or not isinstance(m, int) or m < 1:
            raise InvalidArgumentError(_OP, "max_new_tokens", "an int >= 1", repr(m))
        t = self.temperature
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t) or t < 0:
            raise InvalidArgumentError(_OP, "temperature", "a finite number >= 0 (0 means greedy)", repr(t))
        k = self.top_k
        if k is not None and (isinstance(k, bool) or not isinstance(k, int) or k < 0):
            raise InvalidArgumentError(_OP, "top_k", "None, 0 (no limit) or a positive int", repr(k))
        p = self.top_p
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not (0.0 < p <= 1.0):
            raise InvalidArgumentError(_OP, "top_p", "a number in (0, 1]", repr(p))
        s = self.seed
        if s is not None and (isinstance(s, bool) or not isinstance(s, int) or not 0 <= s < 2**63):
            raise InvalidArgumentError(_OP, "seed", "None or an int in [0, 2**63)", repr(s))
        stops = self.stop_token_ids
        if isinstance(stops, int) or not isinstance(stops, (tuple, list)) or \
                any(isinstance(x, bool) or not isinstance(x, int) or x < 0 for x in stops):
            raise InvalidArgumentError(_OP, "stop_token_ids", "a sequence of non-negative token ids", repr(stops))
        object.__setattr__(self, "stop_token_ids", tuple(stops))
        ss = self.stop
        if isinstance(ss, str):
            ss = (ss,)
        if not isinstance(ss, (tuple, list)) or any(not isinstance(x, str) or not x for x in ss):
            raise InvalidArgumentError(_OP, "stop", "a string or a sequence of non-empty strings", repr(ss))
        object.__setattr__(self, "stop", tuple(ss))
        lp = self.logprobs
        if lp is not None and (isinstance(lp, bool) or not isinstance(lp, int) or not 0 <= lp <= MAX_LOGPROBS):
            raise InvalidArgumentError(_OP, "logprobs", f"None or an int in [0, {MAX_LOGPROBS}]", repr(lp))
        n = self.n
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise InvalidArgumentError(_OP, "n", "an int >= 1", repr(n))
        object.__setattr__(self, "temperature", float(t))
        object.__setattr__(self, "top_p", float(p))

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def check_vocab(self, vocab_size: int) -> None:
        """Raise if a stop token is outside the model's vocabulary."""
        bad = [x for x in self.stop_token_ids if x >= vocab_size]
        if bad:
            raise InvalidArgumentError(_OP, "stop_token_ids", f"ids < vocab_size {vocab_size}", bad)


def make_generator(params: SamplingParams, device: torch.device) -> Optional[torch.Generator]:
    """A generator for one sequence: seeded when the params have a seed, else ``None`` (global RNG)."""
    if params.greedy or params.seed is None:
        return None
    g = torch.Generator(device=device)
    g.manual_seed(params.seed)
    return g


def apply_top_k_top_p(logits_V: torch.Tensor, top_k: Optional[int], top_p: float) -> torch.Tensor:
    """Return a copy of 1-d ``logits_V`` with every token outside the top-k / top-p set at ``-inf``.

    Top-k keeps the ``top_k`` largest logits (ties at the boundary are all kept, so the result does not
    depend on sort order). Top-p keeps the most likely tokens, in order, until their cumulative probability
    reaches ``top_p``; the token that crosses the threshold is kept, so at least one token survives.
    """
    out = logits_V.float().clone()
    vocab = out.shape[-1]
    if top_k is not None and 0 < top_k < vocab:
        kth = torch.topk(out, top_k).values[-1]
        out[out < kth] = float("-inf")
    if top_p < 1.0:
        probs = torch.softmax(out, dim=-1)
        sorted_p, order = torch.sort(probs, descending=True)
        before = torch.cumsum(sorted_p, dim=-1) - sorted_p  # mass of the strictly more likely tokens
        drop_sorted = before >= top_p
        drop_sorted[0] = False
        drop = torch.zeros_like(drop_sorted)
        drop[order] = drop_sorted
        out[drop] = float("-inf")
    return out


class Sampler:
    """Draws one token per sequence from ``logits[S, V]`` (float32), each with its own params and generator."""

    def __call__(self, logits_SV: torch.Tensor, params: Sequence[SamplingParams],
                 generators: Sequence[Optional[torch.Generator]]) -> List[int]:
        if all(p.greedy for p in params):
            return torch.argmax(logits_SV, dim=-1).tolist()
        # every row's token stays on the device until ONE host read at the end (no sync per sequence)
        picked_S = torch.argmax(logits_SV, dim=-1)
        for i, p in enumerate(params):
            if p.greedy:
                continue
            filtered = apply_top_k_top_p(logits_SV[i] / p.temperature, p.top_k, p.top_p)
            probs = torch.softmax(filtered, dim=-1)
            picked_S[i:i + 1] = torch.multinomial(probs, 1, generator=generators[i])
        return picked_S.tolist()


def token_logprobs(logits_SV: torch.Tensor, tokens: Sequence[int], k: Sequence[int]) -> List[tuple]:
    """For each row: ``(logprob of tokens[i], ((id, logprob), ...) of the k[i] most likely tokens)``, from the
    float32 ``log_softmax`` of the raw logits."""
    lp_SV = torch.log_softmax(logits_SV.float(), dim=-1)
    kmax = min(max(k) if k else 0, lp_SV.shape[-1])  # never more alternatives than the vocabulary has
    top_v, top_i = torch.topk(lp_SV, kmax, dim=-1) if kmax else (None, None)
    chosen = lp_SV.gather(1, torch.tensor(list(tokens), dtype=torch.int64, device=lp_SV.device)[:, None])[:, 0]
    chosen_l = chosen.tolist()
    tv = top_v.tolist() if kmax else None
    ti = top_i.tolist() if kmax else None
    return [(chosen_l[i], tuple(zip(ti[i][:k[i]], tv[i][:k[i]])) if kmax else ()) for i in range(len(chosen_l))]
