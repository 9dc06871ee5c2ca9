"""The runner: a paged KV cache, a block allocator, and continuous batching of prefill and decode.

Each :meth:`Engine.step` runs ONE forward over every scheduled sequence, packed varlen: running sequences
contribute their next token (decode) or their next prompt chunk (prefill, possibly chunked), and waiting
sequences are admitted in the same step while the token budget and the free blocks allow. Sequences of
different lengths and in different phases share the batch; the attention metadata
(``query_start_loc``, ``seq_lens``, ``block_table``, ``slot_mapping``) is built and validated once per step
and shared by every layer.

KV memory is a fixed pool of blocks sized from a byte budget. When a running sequence needs a block and none
is free, the most recently admitted sequence is **preempted**: its blocks go back to the pool, it returns to
the front of the waiting queue keeping the tokens it generated, and it is recomputed (its prompt and output
re-prefilled) when blocks free up. Nothing is ever written into a block another sequence owns. With
``preemption=False`` running out of blocks raises :class:`OutOfKVBlocksError` instead. A sequence that could
not fit even alone is refused up front, before anything runs.

Prefix caching (on by default, ``prefix_caching=False`` turns it off): every full block a sequence computed is
kept under a chained content hash (:mod:`anyaccel.models.prefix_cache`); a sequence admitted later starts from
the longest cached run of its blocks (shared by reference count, never written) and computes only the rest.
Cached blocks nobody uses count as free and are evicted least recently used first.

Shape legend: T tokens of a step (packed), S sequences in the step, V vocabulary, H hidden size.
"""
from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field
from typing import Deque, List, Optional, Sequence, Set, Union

import torch

from ..core.attention import AttentionMetadata
from ..core.errors import AnyaccelError, InvalidArgumentError
from ..core.kv_cache import BlockAllocator, kv_cache_bytes_per_block, num_blocks_for_budget
from .config import check_memory
from .prefix_cache import PrefixCachingAllocator, engine_extra_keys
from .sampling import Sampler, SamplingParams, make_generator, token_logprobs
from .step_inputs import upload_step

__all__ = ["Engine", "EngineStats", "OutOfKVBlocksError"]

_OP = "Engine"


class OutOfKVBlocksError(AnyaccelError):
    """The KV cache cannot hold what was asked (and preemption is off, or a sequence is too long for it)."""


@dataclass
class EngineStats:
    """Counters of one :meth:`Engine.generate` call (reset at its start).

    ``prefill_seconds`` sums the steps that carried any prompt tokens, ``decode_seconds`` the steps that were
    pure decode; ``peak_blocks`` is the largest number of KV blocks in use at once.
    """

    steps: int = 0
    prefill_tokens: int = 0
    decode_tokens: int = 0
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0
    preemptions: int = 0
    peak_blocks: int = 0
    prefix_hit_tokens: int = 0  # prompt tokens whose K/V came from the prefix cache (not computed)


@dataclass(eq=False)
class _Seq:
    index: int
    prompt: List[int]
    params: SamplingParams
    generator: Optional[torch.Generator]
    output: List[int] = field(default_factory=list)
    blocks: List[int] = field(default_factory=list)
    num_computed: int = 0  # tokens whose K/V are in this sequence's blocks
    recomputing: bool = False  # preempted: its next prefill re-creates the cache of prompt + output
    block_hashes: List[bytes] = field(default_factory=list)  # prefix-cache keys of its full blocks so far
    num_registered: int = 0  # leading blocks already offered to the prefix cache
    logprobs: List[tuple] = field(default_factory=list)  # one entry per output token when params.logprobs is set

    @property
    def tokens(self) -> List[int]:
        return self.prompt + self.output if self.output else self.prompt

    @property
    def num_tokens(self) -> int:
        return len(self.prompt) + len(self.output)


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


class Engine:
    """Batched generation over a paged KV cache for one model.

    :param model: a built model (see :mod:`anyaccel.models.base`) with weights loaded.
    :param kv_budget_bytes: memory for the KV cache of all layers; converted to a number of blocks.
    :param num_blocks: the number of blocks, instead of a byte budget (exactly one of the two).
    :param block_size: tokens per block; default: the block size the model's attention was built for.
    :param max_num_seqs: at most this many sequences run at once.
    :param max_num_batched_tokens: at most this many tokens go through one forward (longer prompts are
        prefilled in chunks).
    :param preemption: on running out of blocks, preempt and recompute (default) or raise.
    :param prefix_caching: reuse the KV of full blocks already computed for the same prefix (default on);
        ``False`` turns it off; a callable ``(num_blocks, block_size) -> PrefixCachingAllocator`` supplies the
        block manager (tests plant bugs this way).
    :param prefix_cache_key: names the weights in the cache keys (e.g. the checkpoint), so that keys exported to
        another tier or process never match another model's blocks.
    :param max_prefill_tokens_while_decoding: while any sequence decodes, at most this many prompt tokens join a
        step (chunked prefill), so admitting a long prompt lengthens each decode step by a bounded amount (the
        inter-token latency tail) instead of by the whole prompt; ``None`` (default): only
        ``max_num_batched_tokens`` bounds them. A step with no decode still prefills up to the full budget.
    """

    def __init__(self, model, kv_budget_bytes: Optional[int] = None, num_blocks: Optional[int] = None,
                 block_size: Optional[int] = None, *, max_num_seqs: int = 64, max_num_batched_tokens: int = 4096,
                 preemption: bool = True, prefix_caching=True, prefix_cache_key: Optional[str] = None,
                 max_prefill_tokens_while_decoding: Optional[int] = None) -> None:
        if not getattr(model, "is_causal", True):
            raise InvalidArgumentError(_OP, "model", "a causal decoder", f"{type(model).__name__} (an encoder)",
                                       "Encoders run through model.encode(...), not the generation engine")
        self.model = model
        self.specs = list(model.kv_cache_specs())
        spec_block = self.specs[0].block_size if self.specs else None
        if block_size is None:
            block_size = spec_block
        if block_size is None or block_size != spec_block:
            raise InvalidArgumentError(_OP, "block_size", f"the block size the model was built with ({spec_block})",
                                       block_size, "Build the model with block_size=... to use another one")
        self.block_size = int(block_size)
        per_block = kv_cache_bytes_per_block(self.specs)
        if (kv_budget_bytes is None) == (num_blocks is None):
            raise InvalidArgumentError(_OP, "kv_budget_bytes/num_blocks", "exactly one of the two",
                                       f"kv_budget_bytes={kv_budget_bytes}, num_blocks={num_blocks}")
        if num_blocks is None:
            if not isinstance(kv_budget_bytes, int) or kv_budget_bytes < per_block:
                raise InvalidArgumentError(_OP, "kv_budget_bytes",
                                           f"an int >= one block of all layers ({per_block} bytes)", kv_budget_bytes)
            num_blocks = num_blocks_for_budget(kv_budget_bytes, self.specs)
        if isinstance(num_blocks, bool) or not isinstance(num_blocks, int) or num_blocks < 1:
            raise InvalidArgumentError(_OP, "num_blocks", "an int >= 1", num_blocks)
        for name, v in (("max_num_seqs", max_num_seqs), ("max_num_batched_tokens", max_num_batched_tokens)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise InvalidArgumentError(_OP, name, "an int >= 1", v)
        cap = max_prefill_tokens_while_decoding
        if cap is not None and (isinstance(cap, bool) or not isinstance(cap, int) or cap < 1):
            raise InvalidArgumentError(_OP, "max_prefill_tokens_while_decoding", "None or an int >= 1", cap)
        self.max_prefill_tokens_while_decoding = cap
        self.num_blocks = num_blocks
        self.bytes_per_block = per_block
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.preemption = preemption
        self.device = model.device
        # The pool is compared with the memory budget before a byte of it is allocated.
        check_memory(f"a KV cache of {num_blocks} blocks x {per_block} bytes", num_blocks * per_block, model.device,
                     "lower num_blocks / kv_budget_bytes, or max_new_tokens")
        self.prefix_cache: Optional[PrefixCachingAllocator] = None
        if prefix_caching is True:
            self.prefix_cache = PrefixCachingAllocator(num_blocks, self.block_size)
        elif callable(prefix_caching):
            self.prefix_cache = prefix_caching(num_blocks, self.block_size)
        elif prefix_caching is not False:
            raise InvalidArgumentError(_OP, "prefix_caching", "True, False or a block-manager factory",
                                       repr(prefix_caching))
        self.prefix_extra_keys = engine_extra_keys(model, self.block_size, prefix_cache_key)
        self.allocator = self.prefix_cache if self.prefix_cache is not None else BlockAllocator(num_blocks)
        self.kv_caches = model.allocate_kv_caches(num_blocks)
        self.sampler = Sampler()
        eos = getattr(model, "eos_token_id", None)
        cfg_eos = getattr(getattr(model, "config", None), "eos_token_ids", None)
        self.eos_ids: Set[int] = set(cfg_eos or ()) | ({eos} if isinstance(eos, int) else set())
        self.vocab_size = int(model.config.vocab_size)
        self.max_model_len = int(getattr(model.config, "max_position", 0) or 0) or None
        self.stats = EngineStats()

    @property
    def kv_cache_bytes(self) -> int:
        return self.num_blocks * self.bytes_per_block

    # -- public ---------------------------------------------------------------------------------------------------
    def generate(self, prompts: Sequence[Sequence[int]],
                 params: Union[SamplingParams, Sequence[SamplingParams], None] = None) -> List[List[int]]:
        """Continue every prompt; returns the generated tokens only, one list per prompt, in prompt order.

        ``params`` is one :class:`SamplingParams` for all prompts or one per prompt (default: greedy, 16 tokens).
        """
        seqs = self._make_seqs(prompts, params)
        self.stats = EngineStats()
        waiting: Deque[_Seq] = deque(seqs)
        running: List[_Seq] = []
        try:
            with torch.no_grad():
                while waiting or running:
                    self._step(waiting, running)
        finally:
            for s in list(running) + list(waiting):
                self._free(s)
        return [s.output for s in seqs]

    # -- validation -----------------------------------------------------------------------------------------------
    def _make_seqs(self, prompts, params) -> List[_Seq]:
        if isinstance(prompts, (str, bytes)) or not isinstance(prompts, Sequence) or not prompts:
            raise InvalidArgumentError(_OP, "prompts", "a non-empty list of token-id lists", repr(prompts)[:80])
        if params is None:
            params = SamplingParams()
        if isinstance(params, SamplingParams):
            plist = [params] * len(prompts)
        else:
            plist = list(params)
            if len(plist) != len(prompts) or not all(isinstance(p, SamplingParams) for p in plist):
                raise InvalidArgumentError(_OP, "params", f"one SamplingParams or {len(prompts)} of them",
                                           repr(params)[:80])
        blocks_total = self.num_blocks
        seqs = []
        for i, (prompt, p) in enumerate(zip(prompts, plist)):
            if isinstance(prompt, torch.Tensor):
                prompt = prompt.tolist()
            if isinstance(prompt, (str, bytes)) or not isinstance(prompt, Sequence) or not prompt:
                raise InvalidArgumentError(_OP, f"prompts[{i}]", "a non-empty list of token ids", repr(prompt)[:80])
            ids = list(prompt)
            if any(isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < self.vocab_size for t in ids):
                bad = next(t for t in ids if isinstance(t, bool) or not isinstance(t, int)
                           or not 0 <= t < self.vocab_size)
                raise InvalidArgumentError(_OP, f"prompts[{i}]", f"token ids in [0, {self.vocab_size})", bad)
            p.check_vocab(self.vocab_size)
            total = len(ids) + p.max_new_tokens
            if self.max_model_len is not None and total > self.max_model_len:
                raise InvalidArgumentError(_OP, f"prompts[{i}]",
                                           f"prompt + max_new_tokens <= the model's {self.max_model_len} positions",
                                           f"{len(ids)} + {p.max_new_tokens} = {total}")
            # The last generated token is never fed back, so the cache holds at most total - 1 tokens.
            need = _cdiv(total - 1, self.block_size)
            if need > blocks_total:
                raise OutOfKVBlocksError(
                    f"sequence {i} needs {need} KV blocks ({len(ids)} prompt + {p.max_new_tokens} new tokens, block "
                    f"size {self.block_size}) but the cache has only {blocks_total} blocks "
                    f"({self.kv_cache_bytes} bytes); raise kv_budget_bytes or lower max_new_tokens")
            seqs.append(_Seq(i, ids, p, make_generator(p, self.device)))
        return seqs

    # -- scheduling -----------------------------------------------------------------------------------------------
    def _free(self, s: _Seq) -> None:
        if s.blocks:
            self.allocator.free(s.blocks)
            s.blocks = []

    def _grow(self, s: _Seq, num_tokens: int) -> bool:
        """Give ``s`` enough blocks for ``num_tokens`` cached tokens; False when the pool is short."""
        extra = _cdiv(num_tokens, self.block_size) - len(s.blocks)
        if extra <= 0:
            return True
        if self.allocator.num_free < extra:
            return False
        s.blocks.extend(self.allocator.allocate(extra))
        return True

    def _match_prefix(self, s: _Seq) -> None:
        """Start a sequence with no blocks from the longest cached run of its full blocks."""
        toks = s.tokens
        self.prefix_cache.hash_blocks(toks, self.prefix_extra_keys, s.block_hashes)
        hit = self.prefix_cache.match(s.block_hashes, len(toks))
        s.blocks = list(hit)
        s.num_registered = len(hit)
        s.num_computed = len(hit) * self.block_size

    def _register_blocks(self, s: _Seq) -> None:
        """Offer the sequence's newly completed full blocks to the prefix cache."""
        full = s.num_computed // self.block_size
        if full <= s.num_registered:
            return
        self.prefix_cache.hash_blocks(s.tokens[:full * self.block_size], self.prefix_extra_keys,
                                      s.block_hashes)
        for i in range(s.num_registered, full):
            self.prefix_cache.register(s.blocks[i], s.block_hashes[i])
        s.num_registered = full

    def _preempt(self, s: _Seq, running: List[_Seq], waiting: Deque[_Seq]) -> None:
        self._free(s)
        s.num_computed = s.num_registered = 0
        s.recomputing = True
        running.remove(s)
        waiting.appendleft(s)
        self.stats.preemptions += 1

    def _schedule(self, waiting: Deque[_Seq], running: List[_Seq]) -> List[tuple]:
        budget = self.max_num_batched_tokens
        # Prompt tokens allowed in this step: capped while some sequence decodes (one token left to feed).
        cap = self.max_prefill_tokens_while_decoding
        prefill_budget = budget
        if cap is not None and any(s.num_tokens - s.num_computed == 1 for s in running):
            prefill_budget = cap
        batch: List[tuple] = []  # (seq, q_len)
        for s in list(running):
            if s not in running:  # preempted while making room for an earlier one
                continue
            left = s.num_tokens - s.num_computed
            q = min(left, budget) if left == 1 else min(left, budget, prefill_budget)
            if q <= 0:
                if budget <= 0:
                    break
                continue  # a prompt chunk waits for the next step; decodes behind it still run
            while not self._grow(s, s.num_computed + q):
                if not self.preemption:
                    raise OutOfKVBlocksError(
                        f"out of KV blocks: sequence {s.index} needs a block for token {s.num_computed + q} and "
                        f"all {self.num_blocks} blocks are in use by {len(running)} running sequences; raise "
                        f"kv_budget_bytes, lower max_num_seqs, or enable preemption")
                victim = running[-1]
                self._preempt(victim, running, waiting)
                if victim is s:
                    break
            else:
                batch.append((s, q))
                budget -= q
                if left > 1:
                    prefill_budget -= q
        while waiting and budget > 0 and len(running) < self.max_num_seqs:
            s = waiting[0]
            matched = 0
            if self.prefix_cache is not None and not s.blocks:
                self._match_prefix(s)
                matched = s.num_computed
            left = s.num_tokens - s.num_computed
            q = min(left, budget) if left == 1 else min(left, budget, prefill_budget)
            if q <= 0 or not self._grow(s, s.num_computed + q):
                if matched or s.blocks:  # give the hit back: it is matched again at the next admission try
                    self._free(s)
                    s.num_computed = s.num_registered = 0
                break
            self.stats.prefix_hit_tokens += matched
            waiting.popleft()
            running.append(s)
            batch.append((s, q))
            budget -= q
            if left > 1:
                prefill_budget -= q
        if not batch:
            # Unreachable with the up-front size check; kept so a logic error can never spin forever.
            raise OutOfKVBlocksError(f"no sequence could be scheduled with {self.allocator.num_free} of "
                                     f"{self.num_blocks} KV blocks free")
        return batch

    # -- one step -------------------------------------------------------------------------------------------------
    def _step(self, waiting: Deque[_Seq], running: List[_Seq]) -> None:
        t0 = time.perf_counter()
        batch = self._schedule(waiting, running)
        P = self.block_size
        ids: List[int] = []
        positions: List[int] = []
        slots: List[int] = []
        starts = [0]
        seq_lens: List[int] = []
        max_blocks = max(len(s.blocks) for s, _ in batch)
        table: List[List[int]] = []
        sample_rows: List[int] = []
        sampled: List[_Seq] = []
        prefill_tokens = 0
        for s, q in batch:
            lo, hi = s.num_computed, s.num_computed + q
            ids.extend(s.tokens[lo:hi])
            positions.extend(range(lo, hi))
            blocks = s.blocks
            slots.extend(blocks[p // P] * P + p % P for p in range(lo, hi))
            starts.append(starts[-1] + q)
            seq_lens.append(hi)
            table.append(blocks + [0] * (max_blocks - len(blocks)))
            if hi == s.num_tokens:
                sample_rows.append(starts[-1] - 1)
                sampled.append(s)
            if q > 1 or s.recomputing or s.num_computed < len(s.prompt):
                prefill_tokens += q
        dev = self.device
        i64 = torch.int64
        input_ids_T, positions_T, meta = upload_step(dev, ids, positions, starts, seq_lens, table, slots, P)
        hidden_TH = self.model.forward(input_ids_T, positions_T, self.kv_caches, meta)
        for s, q in batch:
            s.num_computed += q
            if self.prefix_cache is not None:
                self._register_blocks(s)
        used = self.num_blocks - self.allocator.num_free
        self.stats.peak_blocks = max(self.stats.peak_blocks, used)
        if sampled:
            if len(sample_rows) == len(ids):  # pure decode: every row samples, no gather
                logits_SV = self.model.compute_logits(hidden_TH)
            else:  # the LM head only for the rows that sample
                rows = torch.tensor(sample_rows, dtype=i64, device=dev)
                logits_SV = self.model.compute_logits(hidden_TH.index_select(0, rows))
            new_tokens = self.sampler(logits_SV, [s.params for s in sampled], [s.generator for s in sampled])
            want = [i for i, s in enumerate(sampled) if s.params.logprobs is not None]
            if want:  # the log-probabilities the request asked for, beside each token
                rows_lp = token_logprobs(logits_SV[want], [new_tokens[i] for i in want],
                                         [sampled[i].params.logprobs for i in want])
                for i, lp in zip(want, rows_lp):
                    sampled[i].logprobs.append(lp)
            for s, tok in zip(sampled, new_tokens):
                s.recomputing = False
                s.output.append(tok)
                p = s.params
                if len(s.output) >= p.max_new_tokens or tok in p.stop_token_ids or \
                        (not p.ignore_eos and tok in self.eos_ids):
                    self._free(s)
                    running.remove(s)
        dt = time.perf_counter() - t0
        st = self.stats
        st.steps += 1
        st.prefill_tokens += prefill_tokens
        st.decode_tokens += len(ids) - prefill_tokens
        if prefill_tokens:
            st.prefill_seconds += dt
        else:
            st.decode_seconds += dt

    # -- request API: the serving loop adds, steps and aborts requests one at a time ------------------------------
    # Additive to generate(): requests live in the engine between calls, so sequences join and leave the running
    # batch at every step. Do not call generate() while requests added here are unfinished (they share the pool).
    def _requests(self):
        if not hasattr(self, "_req_by_id"):
            self._req_by_id = {}
            self._req_waiting: Deque[_Seq] = deque()
            self._req_running: List[_Seq] = []
        return self._req_by_id

    def add_request(self, request_id: str, prompt: Sequence[int], params: Optional[SamplingParams] = None) -> None:
        """Queue one prompt (token ids) under ``request_id``; it joins the running batch at a coming :meth:`step`.

        Validation is :meth:`generate`'s (token ids in the vocabulary, prompt + ``max_new_tokens`` within the
        model's positions and the KV cache); a duplicate ``request_id`` is an error.
        """
        reqs = self._requests()
        if request_id in reqs:
            raise InvalidArgumentError(_OP, "request_id", "an id not already in use", repr(request_id),
                                       "Wait for the earlier request to finish or abort it")
        seq = self._make_seqs([prompt], params)[0]
        reqs[request_id] = seq
        self._req_waiting.append(seq)

    def abort(self, request_id: str) -> bool:
        """Drop a request whether waiting or running and free its KV blocks; False if it is unknown or finished."""
        seq = self._requests().pop(request_id, None)
        if seq is None:
            return False
        if seq in self._req_running:
            self._req_running.remove(seq)
        if seq in self._req_waiting:
            self._req_waiting.remove(seq)
        self._free(seq)
        return True

    def has_unfinished_requests(self) -> bool:
        return bool(self._requests())

    @property
    def num_waiting(self) -> int:
        """Requests queued (never admitted, or preempted and waiting to be recomputed)."""
        self._requests()
        return len(self._req_waiting)

    @property
    def num_running(self) -> int:
        self._requests()
        return len(self._req_running)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - self.allocator.num_free

    def step(self) -> List["RequestStep"]:
        """Run ONE forward over the requests added with :meth:`add_request`; one record per request that gained a
        token or finished in this step (a step that only prefilled a prompt chunk reports nothing for it)."""
        reqs = self._requests()
        if not reqs:
            return []
        before = {rid: len(s.output) for rid, s in reqs.items()}
        before_lp = {rid: len(s.logprobs) for rid, s in reqs.items()}
        try:
            with torch.no_grad():
                self._step(self._req_waiting, self._req_running)
        except Exception:
            # A failed forward leaves sequences half-advanced: drop them all rather than serve wrong tokens.
            for rid in list(reqs):
                self.abort(rid)
            raise
        out: List[RequestStep] = []
        live = set(map(id, self._req_running)) | set(map(id, self._req_waiting))
        for rid, s in list(reqs.items()):
            new = tuple(s.output[before[rid]:])
            done = id(s) not in live
            if done:
                del reqs[rid]
            if new or done:
                reason = None
                if done:
                    reason = "length" if len(s.output) >= s.params.max_new_tokens else "stop"
                out.append(RequestStep(rid, new, done, reason, tuple(s.logprobs[before_lp[rid]:])))
        return out


@dataclass(frozen=True)
class RequestStep:
    """What one :meth:`Engine.step` did for one request.

    :param new_token_ids: the tokens generated in this step (one, or none for a finishing-only record).
    :param finish_reason: ``"stop"`` (an end-of-sequence or stop token, kept in the output) or ``"length"`` (the
        ``max_new_tokens`` budget) once ``finished``; ``None`` before.
    :param logprobs: when the request's params ask for them, one ``(logprob, ((id, logprob), ...))`` per new
        token (see :func:`~anyaccel.models.sampling.token_logprobs`); else empty.
    """

    request_id: str
    new_token_ids: tuple
    finished: bool
    finish_reason: Optional[str]
    logprobs: tuple = ()


__all__ += ["RequestStep"]


def teacher_forced_logits(model, ids: Sequence[int]) -> torch.Tensor:
    """Float32 logits ``[L, V]`` of every position of one sequence, from one paged prefill on a fresh cache."""
    n = len(ids)
    P = model.block_size
    nb = _cdiv(n, P)
    dev = model.device
    caches = model.allocate_kv_caches(nb)
    meta = AttentionMetadata.build(torch.tensor([0, n], dtype=torch.int32, device=dev),
                                   torch.tensor([n], dtype=torch.int32, device=dev),
                                   torch.arange(nb, dtype=torch.int32, device=dev).unsqueeze(0), P,
                                   slot_mapping=torch.arange(n, dtype=torch.int64, device=dev))
    with torch.no_grad():
        hidden_LH = model.forward(torch.tensor(list(ids), dtype=torch.int64, device=dev),
                                  torch.arange(n, dtype=torch.int64, device=dev), caches, meta)
        return model.compute_logits(hidden_LH)


__all__ += ["teacher_forced_logits"]
