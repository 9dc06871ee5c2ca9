"""Prefix-cache conformance: a run that reuses cached KV blocks gives the outputs of a cold run.

Each scenario is a script of engine requests (add, step, drain) played twice on the same model: once on an
engine with prefix caching off (the cold run) and once with it on (the warm run; the caching engine's block
manager can be swapped for a planted bug). Every logits row that chose a token, and every token, of every request
is compared. One record of kind ``"model"`` per scenario, named ``"<model> prefix <scenario>"``:

- ``mid-prompt``: a second prompt shares 40 tokens (2.5 blocks) with the first: the hit ends inside the prompt
  and the rest of the shared part is computed;
- ``whole-prompt``: the same prompt again (3 full blocks + 1 token: everything but the last token is a hit) and its
  first 3 blocks alone (a hit capped one block short, so that the last token is computed);
- ``shifted``: the blocks of an earlier prompt in another order: equal block contents at other positions must
  not hit (the key chains over the prefix);
- ``eviction``: a pool too small to keep everything: cached blocks are evicted and reused for other prompts
  before the first prompt comes back;
- ``shared-live``: a request hits the blocks of one still running; the first finishes and a long prompt needs
  every block nobody holds: the shared blocks must survive.

Bounds: the model's bound (:func:`~anyaccel.conformance.models.model_tolerance`, the bound of the model family's
``paged`` and ``batch`` checks, which also compare our model with itself) times the largest |logit|, in every
dtype, float32 included. float32 is bitwise where the kernels compute the same thing: a hit reads exactly the
K/V bits a cold run writes (measured 0 difference in ``mid-prompt`` and ``shifted`` on cpu and
triton-interpreter). It is not bitwise in general because a warm engine's blocks lie elsewhere in the pool: the
cpu backend's decode attention scores contiguous, unshared blocks where they lie and gathers scattered or shared
ones, two summation orders (measured up to 3.4e-6 x scale in float32 with no hit at all, ``eviction``). Each
record's ``max_abs_err`` shows which it was; the planted bugs move logits by O(scale). A scenario that expects a
hit and got none fails: it would have tested nothing.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch

from ..core.validation import dtype_name
from .cases import CaseResult

__all__ = ["SCENARIOS", "PREFIX_BLOCK_SIZE", "Scenario", "play", "run_prefix_checks"]

#: block size of the model the checks build (small, so short prompts span several blocks)
PREFIX_BLOCK_SIZE = 16


@dataclass(frozen=True)
class Scenario:
    """A script: ``("add", rid, prompt, max_new_tokens)``, ``("step", k)`` (k engine steps) or ``("drain",)``
    (step until no request is left); run on ``num_blocks`` blocks. ``min_hit`` prompt tokens must come from the
    cache in the warm run."""

    name: str
    events: Tuple[tuple, ...]
    num_blocks: int = 64
    min_hit: int = 0


def _toks(seed: int, n: int, vocab: int) -> List[int]:
    g = torch.Generator().manual_seed(5000 + seed)
    return torch.randint(3, vocab, (n,), generator=g).tolist()


def scenarios(vocab: int, P: int = PREFIX_BLOCK_SIZE) -> List[Scenario]:
    shared = _toks(1, 40, vocab)
    a, b = shared + _toks(2, 13, vocab), shared + _toks(3, 9, vocab)
    whole = _toks(4, 3 * P + 1, vocab)
    x, y = _toks(5, P, vocab), _toks(6, P, vocab)
    lone = _toks(7, 40, vocab)
    others = [_toks(8 + i, 40, vocab) for i in range(2)]
    long = _toks(12, 120, vocab)
    return [
        Scenario("mid-prompt", (("add", "a", a, 4), ("drain",), ("add", "b", b, 4), ("drain",)), min_hit=2 * P),
        Scenario("whole-prompt", (("add", "w1", whole, 3), ("drain",), ("add", "w2", whole, 3), ("drain",),
                                  ("add", "w3", whole[:3 * P], 3), ("drain",)), min_hit=3 * P + 2 * P),
        Scenario("shifted", (("add", "xy", x + y + _toks(13, 5, vocab), 3), ("drain",),
                             ("add", "yx", y + x + _toks(14, 5, vocab), 3), ("drain",))),
        # 6 blocks: each 40-token prompt (+3 new) takes 3, so the third prompt evicts the first one's blocks
        Scenario("eviction", (("add", "l1", lone, 3), ("drain",))
                 + tuple(ev for i, o in enumerate(others) for ev in (("add", f"o{i}", o, 3), ("drain",)))
                 + (("add", "l2", lone, 3), ("drain",)), num_blocks=6),
        # 10 blocks: s1 takes 4, s2 shares 2 of them and adds 2; when s1 is done only 6 blocks are free (8 if s2's
        # shared ones were wrongly free), so the 8-block prompt must wait for s2
        Scenario("shared-live", (("add", "s1", shared + _toks(15, 8, vocab), 2), ("step", 1),
                                 ("add", "s2", shared + _toks(16, 9, vocab), 8), ("step", 2),
                                 ("add", "long", long, 3), ("drain",)), num_blocks=10, min_hit=2 * P),
    ]


def play(model: Any, sc: Scenario, prefix_caching: Any) -> Tuple[Dict[str, List[int]], Dict[str, torch.Tensor], int]:
    """Run ``sc`` on a fresh engine; returns each request's tokens, its logits rows ``[n, V]`` and the engine's
    prefix-hit tokens."""
    from ..models.runner import Engine
    from ..models.sampling import SamplingParams

    e = Engine(model, num_blocks=sc.num_blocks, prefix_caching=prefix_caching, max_num_batched_tokens=256)
    rows: Dict[str, List[torch.Tensor]] = {}
    toks: Dict[str, List[int]] = {}
    owner: Dict[int, str] = {}
    sample = e.sampler

    def recording_sampler(logits_SV, params, generators):
        for row_V, p in zip(logits_SV, params):
            rows[owner[id(p)]].append(row_V.detach().double().clone())
        return sample(logits_SV, params, generators)

    e.sampler = recording_sampler

    def step():
        for out in e.step():
            toks[out.request_id].extend(out.new_token_ids)

    keep = []
    with torch.no_grad():
        for ev in sc.events:
            if ev[0] == "add":
                _, rid, prompt, n = ev
                p = SamplingParams(max_new_tokens=n, ignore_eos=True)
                keep.append(p)
                owner[id(p)] = rid
                rows[rid], toks[rid] = [], []
                e.add_request(rid, prompt, p)
            elif ev[0] == "step":
                for _ in range(ev[1]):
                    step()
            else:
                while e.has_unfinished_requests():
                    step()
    return toks, {r: torch.stack(v) if v else torch.empty(0) for r, v in rows.items()}, e.stats.prefix_hit_tokens


def run_prefix_checks(backend: Any, dtype: torch.dtype, name: str = "llama", seed: int = 0, model: Any = None,
                      prefix_caching: Any = True, only: Optional[Sequence[str]] = None) -> List[CaseResult]:
    """The prefix-cache records of one (backend, model, dtype). ``prefix_caching``: the warm engine's setting
    (a block-manager factory plants a bug); ``only``: run these scenarios alone."""
    from ..models import build_model
    from .models import TINY_CONFIGS, make_reference, model_tolerance

    dn = dtype_name(dtype)
    recs: List[CaseResult] = []
    if model is None:
        try:
            model = build_model(make_reference(TINY_CONFIGS[name], seed), backend, dtype,
                                block_size=PREFIX_BLOCK_SIZE)
        except Exception as e:  # noqa: BLE001 - the build failure is the record
            from ..core.errors import UnsupportedError
            return [CaseResult(backend=backend.name, kind="model", name=f"{name} prefix build", dtype=dn,
                               status="unsupported" if isinstance(e, UnsupportedError) else "error",
                               reason=f"{type(e).__name__}: {e}")]
    rel = model_tolerance(name, dtype)
    for sc in scenarios(model.config.vocab_size, model.block_size):
        if only and sc.name not in only:
            continue
        t0 = time.perf_counter()
        r = CaseResult(backend=backend.name, kind="model", name=f"{name} prefix {sc.name}", dtype=dn, status="error",
                       op="model")
        recs.append(r)
        try:
            cold_t, cold_l, cold_hit = play(model, sc, False)
            warm_t, warm_l, warm_hit = play(model, sc, prefix_caching)
            why = []
            err, scale = 0.0, 1.0
            for rid, ref in cold_l.items():
                got = warm_l.get(rid)
                if got is None or got.shape != ref.shape:
                    why.append(f"request {rid}: {0 if got is None else got.shape[0]} logits rows, cold run "
                               f"{ref.shape[0]}")
                    err = math.inf
                    continue
                if ref.numel():
                    err = max(err, float((got - ref).abs().max()))
                    scale = max(scale, float(ref.abs().max()))
                if warm_t[rid] != cold_t[rid]:
                    first = next(i for i, (u, v) in enumerate(zip(warm_t[rid], cold_t[rid])) if u != v)
                    why.append(f"request {rid}: token {first} is {warm_t[rid][first]}, cold run "
                               f"{cold_t[rid][first]}")
            tol = rel * scale
            if not err <= tol:
                why.insert(0, f"logits with prefix hits vs cold: max |err| {err:.3g} > bound {tol:.3g} "
                              f"({rel:g} x scale {scale:.3g})")
            if warm_hit < sc.min_hit:
                why.append(f"only {warm_hit} prompt tokens came from the cache, the scenario needs >= {sc.min_hit}: "
                           f"it tested nothing")
            if cold_hit:
                why.append(f"the cold run hit the cache ({cold_hit} tokens)")
            r.max_abs_err, r.tolerance = err, tol
            r.status = "fail" if why else "pass"
            r.reason = "; ".join(why) or (f"{warm_hit} prompt tokens from the cache; logits "
                                          + ("bitwise equal" if err == 0 else f"within {err:.3g}"))
        except Exception as e:  # noqa: BLE001 - a crash is this case's record
            r.reason = f"{type(e).__name__}: {e}"
        r.seconds = time.perf_counter() - t0
    return recs
