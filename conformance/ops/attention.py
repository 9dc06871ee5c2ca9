"""Conformance cases of the attention family: paged, varlen :class:`~anyaccel.core.attention.Attention` and the
KV write :class:`~anyaccel.core.attention.ReshapeAndCache`.

A case is a batch of sequences, each given as ``(q_len, seq_len)``: ``seq_len - q_len`` positions of past context
plus ``q_len`` new tokens. Inputs: ``q, K, V ~ N(0, 1)`` (scores of order one at the default scale); each
sequence's K/V are written into a cache of the backend's layout and first block size, on blocks drawn as a random
permutation (never contiguous), with every unused cache position filled with a large finite value so a kernel
that reads past a sequence's context fails loudly. The float64 oracle is
:func:`~anyaccel.core.attention.attention_reference` on the same (already rounded) values; it carries the
per-element allowance of the error model (:mod:`anyaccel.conformance.tolerances`): the scores and the
probabilities each rounded once to the dtype, plus fp32 accumulation of both matmuls (:func:`attention_magnitudes`).

Fixed cases: prefill, chunked prefill, decode, mixed batches, GQA/MQA, window, soft-cap, bidirectional, odd head
sizes; **head-size sentinels** (64, 80, 96, 112, 128, 256: plain causal, no GQA/window/cap, short contexts so an
interpreter stays cheap), and **uniform** cases (``q = 0``, values small integers: every allowed key gets the same
weight, so the output is the mean of the visible values and a mask, window, head mapping or block read that is
off by one moves it far beyond the bound even in bf16).

Drawn cases are taken **within what the backend declares** (three draws in four): the attention kernels'
capabilities give the head sizes, block sizes, features (window, soft-cap, bidirectional, GQA, custom scale) and
the largest GQA group, and only those combinations are drawn, so a backend that declines soft-cap still gets
drawn coverage of everything it claims. One draw in four ignores the claims (checked the other way: a strict
build must refuse, and the fallback must be right).

KV-write cases poison both caches (NaN), write, and compare only the written slots (tolerance class ``copy``);
one of them has padding slots (``-1``) that must be skipped.
"""
from __future__ import annotations

import math
from collections import OrderedDict
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch

from ...core.attention import (ATTENTION_FEATURES, Attention, AttentionMetadata, AttentionSpec, ReshapeAndCache,
                               attention_reference, kv_cache_shape)
from ..cases import OpCase, poison
from ..tolerances import allowance, with_allowance

__all__ = ["FAMILY", "fixed_cases", "case_strategy", "make_case", "make_write_case", "make_batch", "GARBAGE",
           "SENTINEL_HEAD_SIZES", "attention_magnitudes", "reference_with_allowance"]

#: Head sizes real models use; each gets a plain causal fixed case.
SENTINEL_HEAD_SIZES = (64, 80, 96, 112, 128, 256)

FAMILY = "attention"

#: The value every cache position no sequence owns holds: finite, and large enough to wreck any output it leaks into.
GARBAGE = 57.0


def make_batch(spec: AttentionSpec, seqs: Sequence[Tuple[int, int]], device: torch.device, seed: int,
               extra_blocks: int = 3, uniform: bool = False) -> Dict[str, Any]:
    """Random inputs of one attention batch in ``spec``'s layout, deterministic in ``seed``.

    Returns ``q [T, Hq, D]``, ``k_cache``, ``v_cache``, ``meta`` and the dense per-sequence ``keys``/``values``
    (``[L, Hkv, D]`` each, in the cache dtype) that were written into the caches. ``uniform``: ``q = 0`` and
    values are integers in [-8, 8] (every allowed key weighs the same).
    """
    g = torch.Generator().manual_seed(seed)
    P, hq, hkv, d = spec.block_size, spec.num_heads, spec.num_kv_heads, spec.head_size
    need = [-(-L // P) for _, L in seqs]
    num_blocks = sum(need) + extra_blocks
    perm = torch.randperm(num_blocks, generator=g).tolist()
    max_blocks = max(need + [1])
    table, starts, lens, used = [], [0], [], 0
    for (q_len, L), nb in zip(seqs, need):
        row = perm[used:used + nb]
        used += nb
        table.append(row + [0] * (max_blocks - nb))
        starts.append(starts[-1] + q_len)
        lens.append(L)
    cdt = spec.cache_dtype
    shape = kv_cache_shape(spec, num_blocks)
    k_cache = torch.full(shape, GARBAGE, dtype=cdt)
    v_cache = torch.full(shape, -GARBAGE, dtype=cdt)
    keys, values = [], []
    for s, (_, L) in enumerate(seqs):
        k = torch.randn(L, hkv, d, generator=g).to(cdt)
        v = torch.randn(L, hkv, d, generator=g)
        v = (torch.randint(-8, 9, (L, hkv, d), generator=g).float() if uniform else v).to(cdt)
        keys.append(k)
        values.append(v)
        for pos in range(0, L, P):
            blk, n = table[s][pos // P], min(P, L - pos)
            if spec.kv_layout == "NHD":
                k_cache[blk, :n] = k[pos:pos + n]
                v_cache[blk, :n] = v[pos:pos + n]
            else:
                k_cache[blk, :, :n] = k[pos:pos + n].transpose(0, 1)
                v_cache[blk, :, :n] = v[pos:pos + n].transpose(0, 1)
    q = torch.randn(starts[-1], hq, d, generator=g).to(spec.dtype)
    if uniform:
        q.zero_()
    i32 = torch.int32
    meta = AttentionMetadata.build(torch.tensor(starts, dtype=i32, device=device),
                                   torch.tensor(lens, dtype=i32, device=device),
                                   torch.tensor(table, dtype=i32, device=device), P)
    return {"q": q.to(device), "k_cache": k_cache.to(device), "v_cache": v_cache.to(device), "meta": meta,
            "keys": keys, "values": values}


def _spec_for(backend: Any, dtype: torch.dtype, hq: int, hkv: int, d: int, **kw: Any) -> AttentionSpec:
    return AttentionSpec(num_heads=hq, num_kv_heads=hkv, head_size=d, dtype=dtype, block_size=backend.block_sizes[0],
                         kv_layout=backend.kv_cache_layout, **kw)


def _describe(spec: AttentionSpec, seqs: Sequence[Tuple[int, int]]) -> str:
    parts = [f"S={len(seqs)}", f"Hq={spec.num_heads}", f"Hkv={spec.num_kv_heads}", f"D={spec.head_size}",
             f"P={spec.block_size}", "q/ctx=" + ",".join(f"{q}/{L}" for q, L in seqs)]
    if not spec.causal:
        parts.append("bidirectional")
    if spec.sliding_window is not None:
        parts.append(f"W={spec.sliding_window}")
    if spec.soft_cap is not None:
        parts.append(f"cap={spec.soft_cap}")
    if spec.scale is not None:
        parts.append(f"scale={spec.scale}")
    return " ".join(parts)


def attention_magnitudes(inp: Dict[str, Any], spec: AttentionSpec) -> Tuple[torch.Tensor, torch.Tensor]:
    """The error model's magnitudes of every output element, ``(mid_mag, acc_mag)``, each ``[T, Hq, D]``:

    with ``M = sum_j p_j |v_j|`` over the allowed keys,

    * ``mid_mag = (1 + 2 * max_j |s_j|) * M``: the probabilities rounded to the dtype move the output by at most
      ``u * M``; the scores ``s_j = scale * q . k_j`` rounded to the dtype once (as a GEMM in the dtype returns
      them: Hugging Face's eager attention, torch's math SDPA, the cpu backend's decode path) move each
      probability by a factor ``exp(+-u |s_j|)``, hence the output by at most ``2 u max_j |s_j| * M``;
    * ``acc_mag = (sqrt(L) + 2 sqrt(D) * max_j |scale| |q| . |k_j|) * M``: fp32 accumulation of P.V over the L
      keys and of Q.K over D (a score error moves the output by at most twice itself times ``M``).

    Computed (in float32: a bound needs no more) from the dense keys and values, with the reference's mask.
    """
    meta = inp["meta"]
    # float32 is plenty for a bound on rounding errors, and halves the cost of the reference
    q = inp["q"].detach().cpu().float()
    hq, hkv, d = spec.num_heads, spec.num_kv_heads, spec.head_size
    heads = torch.arange(hq) // (hq // hkv)
    scale = spec.softmax_scale
    mid = torch.zeros(q.shape, dtype=torch.float64)
    acc = torch.zeros(q.shape, dtype=torch.float64)
    for s in range(meta.num_seqs):
        q_len, L, start = meta.query_lens_host[s], meta.seq_lens_host[s], meta.query_starts_host[s]
        if q_len == 0:
            continue
        k_HLD = inp["keys"][s].float()[:, heads].transpose(0, 1)            # [Hq, L, D]
        v_HLD = inp["values"][s].float()[:, heads].transpose(0, 1).abs()
        q_HQD = q[start:start + q_len].transpose(0, 1)
        raw_HQL = torch.bmm(q_HQD, k_HLD.transpose(1, 2)) * scale
        absdot_HQL = torch.bmm(q_HQD.abs(), k_HLD.abs().transpose(1, 2)) * abs(scale)
        scores_HQL = raw_HQL if spec.soft_cap is None else spec.soft_cap * torch.tanh(raw_HQL / spec.soft_cap)
        q_pos = torch.arange(L - q_len, L).unsqueeze(1)
        k_pos = torch.arange(L).unsqueeze(0)
        keep = torch.ones(q_len, L, dtype=torch.bool)
        if spec.causal:
            keep &= k_pos <= q_pos
        if spec.sliding_window is not None:
            keep &= (q_pos - k_pos) < spec.sliding_window
        p_HQL = torch.softmax(scores_HQL.masked_fill(~keep, float("-inf")), dim=-1)
        m_QHD = torch.bmm(p_HQL, v_HLD).transpose(0, 1).double()
        smax_QH1 = absdot_HQL.masked_fill(~keep, 0.0).amax(-1).transpose(0, 1).unsqueeze(-1).double()
        sabs_QH1 = raw_HQL.abs().masked_fill(~keep, 0.0).amax(-1).transpose(0, 1).unsqueeze(-1).double()
        mid[start:start + q_len] = (1 + 2 * sabs_QH1) * m_QHD
        acc[start:start + q_len] = (math.sqrt(L) + 2 * math.sqrt(d) * smax_QH1) * m_QHD
    return mid, acc


#: Recent oracles by (spec, batch, fingerprint of the inputs): the kill matrix runs the same cases on many
#: backends, and the float64 oracle is most of an attention case's cost. Bounded; see :func:`_fingerprint`.
_MEMO: "OrderedDict[Tuple[Any, ...], torch.Tensor]" = OrderedDict()
_MEMO_SIZE = 256


def _fingerprint(inp: Dict[str, Any]) -> Tuple[Any, ...]:
    """A checksum of every input the oracle reads (values and positions), so a kernel that scribbled on its
    inputs gets a fresh oracle, exactly as without the memo."""
    out: List[Any] = []
    for name in ("q", "k_cache", "v_cache"):
        t = inp[name].detach().cpu().double().flatten()
        w = torch.arange(1, t.numel() + 1, dtype=torch.float64).remainder_(977.0)
        out += [tuple(t.shape), float(t.nan_to_num(7.0).sum()), float((t.nan_to_num(7.0) * w).sum())]
    meta = inp["meta"]
    for t in (meta.query_start_loc, meta.seq_lens, meta.block_table):
        out.append(tuple(t.cpu().flatten().tolist()))
    return tuple(out)


def reference_with_allowance(inp: Dict[str, Any], spec: AttentionSpec) -> torch.Tensor:
    """The float64 oracle of a :func:`make_batch` batch, carrying the error model's per-element allowance
    (compare it with :func:`anyaccel.conformance.tolerances.compare` and ``tolerance("attention", dtype)``)."""
    key = (spec, _fingerprint(inp))
    hit = _MEMO.get(key)
    if hit is not None:
        _MEMO.move_to_end(key)
        return hit
    ref = attention_reference(inp["q"], inp["k_cache"], inp["v_cache"], inp["meta"], spec).cpu()
    mid, acc = attention_magnitudes(inp, spec)
    ref = with_allowance(ref, allowance("attention", spec.dtype, mid_mag=mid, acc_mag=acc))
    _MEMO[key] = ref
    while len(_MEMO) > _MEMO_SIZE:
        _MEMO.popitem(last=False)
    return ref


def make_case(spec: AttentionSpec, seqs: Sequence[Tuple[int, int]], label: str = "",
              uniform: bool = False) -> OpCase:
    """One attention case over the batch ``seqs`` of ``(q_len, seq_len)`` (``uniform``: see :func:`make_batch`)."""
    seqs = [(int(q), int(L)) for q, L in seqs]

    def make(device: torch.device, seed: int) -> Dict[str, Any]:
        return make_batch(spec, seqs, device, seed, uniform=uniform)

    def call(op: Attention, inp: Dict[str, Any]) -> Tuple[torch.Tensor, ...]:
        q = inp["q"]
        out = poison(torch.empty_like(q))
        return (op(q, inp["k_cache"], inp["v_cache"], inp["meta"], out=out),)

    def reference(inp: Dict[str, Any]) -> Tuple[torch.Tensor, ...]:
        return (reference_with_allowance(inp, spec),)

    name = f"{label + ' ' if label else ''}{_describe(spec, seqs)}"
    return OpCase(op=Attention, spec=spec, name=name, tolerance_class="attention",
                  reduction=max(L for _, L in seqs), make=make, call=call, reference=reference,
                  tags=("fixed",) if label else ("drawn",))


def make_write_case(spec: AttentionSpec, num_tokens: int, num_blocks: int, pad_every: int = 0,
                    label: str = "") -> OpCase:
    """One KV-write case: ``num_tokens`` tokens to distinct random slots of ``num_blocks`` blocks; every
    ``pad_every``-th token (when > 0) is padding (slot ``-1``)."""
    P, hkv, d = spec.block_size, spec.num_kv_heads, spec.head_size

    def make(device: torch.device, seed: int) -> Dict[str, Any]:
        g = torch.Generator().manual_seed(seed)
        slots = torch.randperm(num_blocks * P, generator=g)[:num_tokens]
        if pad_every > 0:
            slots[::pad_every] = -1
        key = torch.randn(num_tokens, hkv, d, generator=g).to(spec.dtype)
        value = torch.randn(num_tokens, hkv, d, generator=g).to(spec.dtype)
        i32 = torch.int32
        meta = AttentionMetadata.build(torch.tensor([0, num_tokens], dtype=i32, device=device),
                                       torch.tensor([num_tokens], dtype=i32, device=device),
                                       torch.zeros(1, -(-num_tokens // P), dtype=i32, device=device), P,
                                       slot_mapping=slots.to(device))
        return {"key": key.to(device), "value": value.to(device), "meta": meta, "slots": slots}

    def written(cache: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
        s = slots[slots >= 0].to(cache.device).long()
        blk, off = s // P, s % P
        return cache[blk, off] if spec.kv_layout == "NHD" else cache[blk, :, off]

    def call(op: ReshapeAndCache, inp: Dict[str, Any]) -> Tuple[torch.Tensor, ...]:
        key = inp["key"]
        shape = kv_cache_shape(spec, num_blocks)
        k_cache = poison(torch.empty(shape, dtype=spec.cache_dtype, device=key.device))
        v_cache = poison(torch.empty(shape, dtype=spec.cache_dtype, device=key.device))
        op(key, inp["value"], k_cache, v_cache, inp["meta"])
        return written(k_cache, inp["slots"]), written(v_cache, inp["slots"])

    def reference(inp: Dict[str, Any]) -> Tuple[torch.Tensor, ...]:
        keep = inp["slots"] >= 0
        cdt = spec.cache_dtype
        return (inp["key"].cpu()[keep].to(cdt).double(), inp["value"].cpu()[keep].to(cdt).double())

    name = (f"{label + ' ' if label else ''}kv write T={num_tokens} B={num_blocks} P={P} Hkv={hkv} D={d}"
            f"{f' pad every {pad_every}' if pad_every else ''}")
    return OpCase(op=ReshapeAndCache, spec=spec, name=name, tolerance_class="copy", reduction=1, make=make,
                  call=call, reference=reference, tags=("fixed",) if label else ("drawn",))


def fixed_cases(backend: Any, dtype: torch.dtype) -> List[OpCase]:
    P = backend.block_sizes[0]

    def spec(hq: int = 4, hkv: int = 4, d: int = 64, **kw: Any) -> AttentionSpec:
        return _spec_for(backend, dtype, hq, hkv, d, **kw)

    return [
        make_case(spec(), [(100, 100)], "pure prefill"),
        make_case(spec(), [(37, 37), (5, 5)], "two prefills"),
        make_case(spec(), [(40, 3 * P + 9)], "chunked prefill"),
        make_case(spec(hq=8, hkv=2), [(1, 2 * P + 3), (1, 1), (1, 5 * P)], "decode GQA 4"),
        make_case(spec(hq=8, hkv=2), [(1, 70), (33, 33), (20, 90), (1, 2 * P)], "mixed batch"),
        make_case(spec(hq=8, hkv=2), [(60, 60), (1, 64)], "GQA 4"),
        make_case(spec(hq=6, hkv=1), [(24, 50), (1, 45)], "MQA"),
        make_case(spec(sliding_window=16), [(64, 64), (1, 3 * P + 1), (10, 50)], "window shorter than prompt"),
        make_case(spec(soft_cap=5.0), [(48, 48), (1, 60), (8, 40)], "soft-cap"),
        make_case(spec(hq=4, hkv=2, soft_cap=3.0, sliding_window=20), [(30, 50)], "soft-cap window GQA"),
        make_case(spec(causal=False), [(30, 30), (17, 17)], "bidirectional"),
        make_case(spec(d=80, hq=4, hkv=2), [(20, 50), (1, 33)], "odd head size 80"),
        make_case(spec(d=72, scale=0.2), [(9, 40)], "head size 72 custom scale"),
        *[make_case(spec(hq=2, hkv=2, d=d), [(7, 7), (1, P + 3)], f"head size {d}") for d in SENTINEL_HEAD_SIZES],
        make_case(spec(hq=4, hkv=2), [(20, 20), (1, 2 * P + 1), (6, P + 2)], "uniform causal GQA", uniform=True),
        make_case(spec(hq=3, hkv=3, sliding_window=5), [(12, 12), (1, P + 6), (4, 9)], "uniform window",
                  uniform=True),
        make_case(spec(hq=2, hkv=2, causal=False), [(9, 9), (5, 5)], "uniform bidirectional", uniform=True),
        make_write_case(spec(hq=4, hkv=2), 50, 8, label="kv write"),
        make_write_case(spec(hq=4, hkv=2, d=80), 40, 6, pad_every=7, label="kv write padding"),
    ]


#: Head sizes drawn when a kernel declares no list of its own.
_DRAW_HEAD_SIZES = (16, 32, 48, 64, 80, 96, 112, 128, 256)


def _claims(backend: Any, dtype: torch.dtype) -> List[Any]:
    """The capabilities of the backend's attention kernels that accept ``dtype`` and the backend's layout."""
    out = []
    for k in backend.kernels_for(Attention.name):
        cap = k.capability
        if dtype in getattr(cap, "dtypes", ()) and backend.kv_cache_layout in getattr(cap, "kv_layouts",
                                                                                        (backend.kv_cache_layout,)):
            out.append(cap)
    return out


def case_strategy(backend: Any, dtype: torch.dtype):
    """Attention batches within the backend's declared capabilities (3 in 4) and unconstrained ones (1 in 4),
    plus KV writes."""
    from hypothesis import strategies as st

    claims = _claims(backend, dtype)

    def seqs_of(draw_: Any, max_len: int) -> List[Tuple[int, int]]:
        seqs = []
        for _ in range(draw_(st.integers(1, 4))):
            L = draw_(st.integers(1, max_len))
            seqs.append((draw_(st.one_of(st.just(1), st.just(L), st.integers(1, L))), L))
        return seqs

    @st.composite
    def within(draw_) -> OpCase:
        cap = draw_(st.sampled_from(claims))
        feats = getattr(cap, "features", ATTENTION_FEATURES)
        sizes = [p for p in backend.block_sizes if cap.block_sizes is None or p in cap.block_sizes]
        P = draw_(st.sampled_from(sizes[:2] or list(backend.block_sizes[:1])))
        heads = sorted(cap.head_sizes) if cap.head_sizes is not None else list(_DRAW_HEAD_SIZES)
        heads = [h for h in heads if cap.max_head_size is None or h <= cap.max_head_size] or heads
        d = draw_(st.sampled_from(heads))
        modes = [c for c, f in ((True, "causal"), (False, "bidirectional")) if f in feats] or [True]
        causal = draw_(st.sampled_from(modes))
        groups = [1]
        if "gqa" in feats:
            top = cap.max_num_queries_per_kv or 8
            groups += [g for g in (2, 4, 8) if g <= top]
        g = draw_(st.sampled_from(groups))
        hkv = draw_(st.integers(1, 3))
        window = draw_(st.one_of(st.none(), st.integers(1, 64))) if "sliding_window" in feats else None
        soft = draw_(st.one_of(st.none(), st.floats(1.0, 30.0))) if "soft_cap" in feats else None
        scale = draw_(st.one_of(st.none(), st.floats(0.05, 0.5))) if "custom_scale" in feats else None
        spec = AttentionSpec(num_heads=hkv * g, num_kv_heads=hkv, head_size=d, dtype=dtype, block_size=P,
                             kv_layout=backend.kv_cache_layout, causal=causal, sliding_window=window,
                             soft_cap=None if soft is None else round(soft, 2),
                             scale=None if scale is None else round(scale, 3))
        return make_case(spec, seqs_of(draw_, 160 if d <= 128 else 64))

    @st.composite
    def draw(draw_) -> OpCase:
        P = draw_(st.sampled_from(list(backend.block_sizes[:2])))
        hkv = draw_(st.integers(1, 3))
        g = draw_(st.sampled_from([1, 2, 4]))
        d = draw_(st.sampled_from([16, 32, 48, 64, 80, 96, 128]))
        causal = draw_(st.booleans())
        window: Optional[int] = draw_(st.one_of(st.none(), st.integers(1, 64)))
        cap: Optional[float] = draw_(st.one_of(st.none(), st.floats(1.0, 30.0)))
        spec = AttentionSpec(num_heads=hkv * g, num_kv_heads=hkv, head_size=d, dtype=dtype, block_size=P,
                             kv_layout=backend.kv_cache_layout, causal=causal, sliding_window=window,
                             soft_cap=None if cap is None else round(cap, 2))
        return make_case(spec, seqs_of(draw_, 160))

    @st.composite
    def draw_write(draw_) -> OpCase:
        P = draw_(st.sampled_from(list(backend.block_sizes[:2])))
        spec = AttentionSpec(num_heads=2, num_kv_heads=draw_(st.integers(1, 4)),
                             head_size=draw_(st.sampled_from([8, 64, 80, 128])), dtype=dtype, block_size=P,
                             kv_layout=backend.kv_cache_layout)
        spec = AttentionSpec(**{**spec.__dict__, "num_heads": spec.num_kv_heads * 2})
        blocks = draw_(st.integers(1, 6))
        tokens = draw_(st.integers(1, blocks * P))
        return make_write_case(spec, tokens, blocks, pad_every=draw_(st.sampled_from([0, 0, 3])))

    if claims:
        return st.one_of(within(), within(), within(), draw(), draw_write())
    return st.one_of(draw(), draw(), draw(), draw_write())
