"""cpu attention: gather each sequence's K/V rows from the paged cache into reusable head-major buffers with one
``index_select`` per tensor, then run torch's SDPA (oneDNN/flash CPU kernel) on them.

- decode (q_len == 1): the G query heads of a kv head are folded into SDPA's query length, so K/V are gathered
  once per kv head and no mask is needed (the window only trims the gathered range); a long context is done in
  chunks of whole blocks small enough to stay in L2 between the gather and SDPA, merged by log-sum-exp;
- prefill: K/V rows are gathered once per *query* head (GQA expanded by the gather itself) and SDPA runs with
  ``is_causal`` when queries and keys line up, else with a bottom-right-aligned boolean mask (chunked prefill,
  sliding window);
- soft-cap (SDPA cannot): explicit scores -> tanh -> mask -> softmax in float32, in query chunks.

Row indices and masks are derived once per batch and memoized in ``meta.scratch`` (shared by every layer).
"""
from __future__ import annotations

import os
from typing import Dict, List

import torch
import torch.nn.functional as F

from ...core.attention import AttentionCapability, AttentionSpec
from ...core.dispatch import KernelImpl

__all__ = ["KERNELS"]

_FLOATS = frozenset({torch.float32, torch.float16, torch.bfloat16})
_SCRATCH = "cpu.attention"
_MAX_SCORES = 1 << 23  # elements of one float32 score chunk in the soft-cap path (32 MB)
_MAX_GATHER = 1 << 26  # elements of one gathered K (or V) buffer before heads are processed in groups
# Decode chunks: at most this many positions, and at most this many bytes of K (and of V), so both stay in a
# core's L2 between the gather and SDPA (measured best on a 2 MB-L2 Xeon: 128 positions for fp32 and bf16).
_CHUNK_TOKENS = 128
_CHUNK_BYTES = 1 << 20
_DECODE_ONE_THREAD = os.environ.get("ANYACCEL_CPU_DECODE_ONE_THREAD", "").strip().lower() in ("1", "true", "yes")
# SDPA's CPU flash kernel, which also returns the log-sum-exp needed to merge chunks (private; optional).
_SDPA_LSE = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)


class _Plan:
    """What one sequence needs, derived once per batch: positions, the key range and gather rows."""

    __slots__ = ("start", "q_len", "ctx0", "k_lo", "L", "rows_kv", "chunks", "rows_q", "mask", "causal_square")

    def __init__(self, start: int, q_len: int, ctx0: int, k_lo: int, L: int) -> None:
        self.start, self.q_len, self.ctx0, self.k_lo, self.L = start, q_len, ctx0, k_lo, L
        self.rows_kv = None   # [Hkv * L] row ids, kv-head major
        self.chunks = None    # decode: [(rows [Hkv * n], n)] over consecutive position ranges
        self.rows_q = None    # [Hq * L] row ids, query-head major (GQA expanded)
        self.mask = None      # [q_len, L] bool, True = attend
        self.causal_square = False

def _chunk_tokens(spec: AttentionSpec) -> int:
    """Decode gathers K and V in chunks of this many positions, so each chunk stays in the core's L2 cache."""
    elem = torch.empty((), dtype=spec.cache_dtype).element_size()
    return max(16, min(_CHUNK_TOKENS, _CHUNK_BYTES // (spec.num_kv_heads * spec.head_size * elem)))


def _plans(meta, spec: AttentionSpec) -> List[_Plan]:
    chunk = _chunk_tokens(spec)
    key = (_SCRATCH, spec.kv_layout, spec.num_kv_heads, spec.num_heads, spec.sliding_window, spec.causal, chunk)
    plans = meta.scratch.get(key)
    if plans is not None:
        return plans
    P, hkv, hq = meta.block_size, spec.num_kv_heads, spec.num_heads
    window, causal = spec.sliding_window, spec.causal
    plans = []
    for s in range(meta.num_seqs):
        q_len, L_all, start = meta.query_lens_host[s], meta.seq_lens_host[s], meta.query_starts_host[s]
        if q_len == 0:
            continue
        ctx0 = L_all - q_len
        k_lo = max(0, ctx0 - window + 1) if window is not None else 0
        plan = _Plan(start, q_len, ctx0, k_lo, L_all - k_lo)
        pos_L = torch.arange(k_lo, L_all)
        blk_L = meta.block_table[s].long()[pos_L // P]
        off_L = pos_L % P
        heads = torch.arange(hkv).unsqueeze(1)  # [Hkv, 1]
        if spec.kv_layout == "NHD":  # cache rows [B, P, Hkv] -> (blk * P + off) * Hkv + h
            rows = (blk_L * P + off_L).unsqueeze(0) * hkv + heads
        else:  # HND: cache rows [B, Hkv, P] -> (blk * Hkv + h) * P + off
            rows = (blk_L.unsqueeze(0) * hkv + heads) * P + off_L.unsqueeze(0)
        plan.rows_kv = rows.reshape(-1)
        if q_len == 1 and plan.L > chunk:
            # Whole blocks per chunk (one large row per block and kv head: far cheaper to gather than positions);
            # (rows, a, b): positions a..b of the gathered chunk are the context's.
            blocks = meta.block_table[s].long()[k_lo // P:-(-L_all // P)]
            cb = max(1, chunk // P)
            plan.chunks = []
            for i in range(0, blocks.numel(), cb):
                blk = blocks[i:i + cb]
                a = k_lo - (k_lo // P + i) * P if i == 0 else 0
                b = min(blk.numel() * P, L_all - (k_lo // P + i) * P)
                if spec.kv_layout == "HND":
                    blk = (blk.unsqueeze(0) * hkv + heads).reshape(-1)  # [Hkv * nb] rows of [P, D]
                plan.chunks.append((blk, a, b))
        if q_len > 1:
            g = hq // hkv
            plan.rows_q = rows.repeat_interleave(g, dim=0).reshape(-1) if g > 1 else plan.rows_kv
            q_pos = torch.arange(ctx0, L_all).unsqueeze(1)
            if causal and window is None and k_lo == ctx0:
                plan.causal_square = True
            elif causal or window is not None:
                allowed = torch.ones(q_len, plan.L, dtype=torch.bool)
                if causal:
                    allowed &= pos_L.unsqueeze(0) <= q_pos
                if window is not None:
                    allowed &= (q_pos - pos_L.unsqueeze(0)) < window
                plan.mask = allowed
        plans.append(plan)
    meta.scratch[key] = plans
    return plans


def _build(spec: AttentionSpec):
    hq, hkv, d = spec.num_heads, spec.num_kv_heads, spec.head_size
    g = hq // hkv
    scale = spec.softmax_scale
    cap = spec.soft_cap
    dt = spec.dtype
    cdt = spec.cache_dtype
    layout = spec.kv_layout
    bufs: Dict[str, torch.Tensor] = {}

    def buffer(name: str, n: int, dtype: torch.dtype) -> torch.Tensor:
        b = bufs.get(name)
        if b is None or b.numel() < n:
            b = torch.empty(max(n, 1 << 16), dtype=dtype)
            bufs[name] = b
        return b[:n]

    def gather(cache_R_D: torch.Tensor, rows: torch.Tensor, name: str, h: int, L: int) -> torch.Tensor:
        """Rows of the cache into a reusable buffer, as [1, h, L, D] in the working dtype."""
        buf = buffer(name, rows.numel() * d, cdt).view(rows.numel(), d)
        torch.index_select(cache_R_D, 0, rows, out=buf)
        x = buf.view(1, h, L, d)
        return x if cdt == dt else x.to(dt)

    def decode(q_THD, k_rows, v_rows, plan, out_THD, k_cache, v_cache):
        """One query token: fold the G query heads of each kv head into SDPA's query length."""
        L, t = plan.L, plan.start
        q_1HGD = q_THD[t].view(1, hkv, g, d)
        if plan.chunks is not None and cap is None and _SDPA_LSE is not None:
            return decode_chunked(q_1HGD, k_cache, v_cache, plan, out_THD)
        k = gather(k_rows, plan.rows_kv, "k", hkv, L)
        v = gather(v_rows, plan.rows_kv, "v", hkv, L)
        if cap is None:
            o = F.scaled_dot_product_attention(q_1HGD, k, v, scale=scale)
        else:
            s = torch.matmul(q_1HGD, k.transpose(2, 3)).float().mul_(scale / cap).tanh_().mul_(cap)
            o = torch.matmul(torch.softmax(s, dim=-1).to(dt), v)
        out_THD[t].view(hkv, g, d).copy_(o[0])

    def gather_blocks(cache_rows: torch.Tensor, rows: torch.Tensor, name: str, a: int, b: int) -> torch.Tensor:
        """Whole blocks into a reusable buffer; positions a..b as [1, Hkv, b - a, D] (a strided view for NHD)."""
        n = rows.numel() * cache_rows.shape[1]
        buf = buffer(name, n, cdt).view(rows.numel(), cache_rows.shape[1])
        torch.index_select(cache_rows, 0, rows, out=buf)
        if layout == "HND":
            x = buf.view(1, hkv, -1, d)[:, :, a:b]
        else:
            x = buf.view(-1, hkv, d)[a:b].transpose(0, 1).unsqueeze(0)
        return x if cdt == dt else x.to(dt)

    def decode_chunked(q_1HGD, k_cache, v_cache, plan, out_THD):
        """Long context: attend chunk by chunk (each gathered chunk is re-read from cache, not memory), then merge
        the partial outputs with their log-sum-exps."""
        rows_per_block = k_cache.numel() // (k_cache.shape[0] * (hkv if layout == "HND" else 1))
        k_block_rows = k_cache.view(-1, rows_per_block)
        v_block_rows = v_cache.view(-1, rows_per_block)
        outs, lses = [], []
        for rows, a, b in plan.chunks:
            k = gather_blocks(k_block_rows, rows, "k", a, b)
            v = gather_blocks(v_block_rows, rows, "v", a, b)
            o, lse = _SDPA_LSE(q_1HGD, k, v, scale=scale)  # [1, Hkv, G, D], [1, Hkv, G]
            outs.append(o)
            lses.append(lse)
        w_CHG1 = torch.softmax(torch.cat(lses).float(), dim=0).unsqueeze(-1)
        o_HGD = (torch.cat(outs).float() * w_CHG1).sum(0)
        out_THD[plan.start].view(hkv, g, d).copy_(o_HGD)

    def prefill(q_THD, k_rows, v_rows, plan, out_THD):
        L, t0, n = plan.L, plan.start, plan.q_len
        # Query heads are processed in groups of whole kv heads so the gathered buffers stay bounded.
        kv_per_group = max(1, min(hkv, _MAX_GATHER // max(1, g * L * d)))
        for h0 in range(0, hkv, kv_per_group):
            h1 = min(hkv, h0 + kv_per_group)
            nh = (h1 - h0) * g
            rows = plan.rows_q[h0 * g * L:h1 * g * L]
            k = gather(k_rows, rows, "k", nh, L)
            v = gather(v_rows, rows, "v", nh, L)
            # SDPA's CPU kernel is markedly slower on a strided query: pay for one small copy instead.
            q_1HQD = q_THD[t0:t0 + n, h0 * g:h1 * g].transpose(0, 1).unsqueeze(0).contiguous()  # [1, nh, Q, D]
            if cap is None:
                if plan.causal_square:
                    o = F.scaled_dot_product_attention(q_1HQD, k, v, is_causal=True, scale=scale)
                else:
                    o = F.scaled_dot_product_attention(q_1HQD, k, v, attn_mask=plan.mask, scale=scale)
                out_THD[t0:t0 + n, h0 * g:h1 * g].copy_(o[0].transpose(0, 1))
            else:
                capped(q_1HQD, k, v, plan, out_THD, h0 * g, h1 * g)

    def capped(q_1HQD, k, v, plan, out_THD, hq0, hq1):
        n, L, t0 = plan.q_len, plan.L, plan.start
        nh = hq1 - hq0
        step = max(1, _MAX_SCORES // max(1, nh * L))
        mask = plan.mask
        if mask is None and plan.causal_square:
            mask = torch.ones(n, L, dtype=torch.bool).tril_()
        kT = k.transpose(2, 3)
        for c0 in range(0, n, step):
            c1 = min(n, c0 + step)
            s = torch.matmul(q_1HQD[:, :, c0:c1], kT).float().mul_(scale / cap).tanh_().mul_(cap)
            if mask is not None:
                s.masked_fill_(~mask[c0:c1], float("-inf"))
            o = torch.matmul(torch.softmax(s, dim=-1).to(dt), v)  # [1, nh, c, D]
            out_THD[t0 + c0:t0 + c1, hq0:hq1].copy_(o[0].transpose(0, 1))

    def attention(q_THD, k_cache, v_cache, meta, out_THD):
        k_rows = k_cache.view(-1, d)
        v_rows = v_cache.view(-1, d)
        plans = _plans(meta, spec)
        # Chunked decode is hundreds of small ops; with several intra-op threads each one ends in a barrier that
        # stalls whenever another process holds a core (measured: 100x slower on an oversubscribed 2-core
        # machine, yet 1.7x faster than one thread on an idle one). ANYACCEL_CPU_DECODE_ONE_THREAD=1 runs them on
        # one thread for shared machines.
        threads = torch.get_num_threads()
        single = _DECODE_ONE_THREAD and threads > 1 and any(p.chunks is not None for p in plans)
        if single:
            torch.set_num_threads(1)
        try:
            for plan in plans:
                if plan.q_len == 1:
                    decode(q_THD, k_rows, v_rows, plan, out_THD, k_cache, v_cache)
                else:
                    prefill(q_THD, k_rows, v_rows, plan, out_THD)
        finally:
            if single:
                torch.set_num_threads(threads)
        return out_THD

    return attention

def _build_write(spec: AttentionSpec):
    hkv, d, layout = spec.num_kv_heads, spec.head_size, spec.kv_layout
    heads = torch.arange(hkv)

    def reshape_and_cache(key_THD, value_THD, k_cache, v_cache, slot_mapping_T):
        slots = slot_mapping_T.long()
        if slots.numel() and int(slots.min()) < 0:
            keep = slots >= 0
            slots, key_THD, value_THD = slots[keep], key_THD[keep], value_THD[keep]
        if layout == "NHD":  # rows [B * P, Hkv, D]: the slot is the row
            k_cache.view(-1, hkv, d).index_copy_(0, slots, key_THD.to(k_cache.dtype))
            v_cache.view(-1, hkv, d).index_copy_(0, slots, value_THD.to(v_cache.dtype))
        else:  # HND: rows [B, Hkv, P] of D -> (blk * Hkv + h) * P + off
            P = k_cache.shape[2]
            rows = ((slots // P).unsqueeze(1) * hkv + heads) * P + (slots % P).unsqueeze(1)  # [T, Hkv]
            rows = rows.reshape(-1)
            k_cache.view(-1, d).index_copy_(0, rows, key_THD.reshape(-1, d).to(k_cache.dtype))
            v_cache.view(-1, d).index_copy_(0, rows, value_THD.reshape(-1, d).to(v_cache.dtype))

    return reshape_and_cache

_CAPABILITY = AttentionCapability(dtypes=_FLOATS, kv_cache_dtypes=_FLOATS)

KERNELS = [
    KernelImpl(op="attention", backend="cpu", name="cpu.attention.sdpa_paged", build=_build, priority=10,
               capability=_CAPABILITY,
               description="per-sequence index_select gather into head-major buffers + torch SDPA (flash CPU); "
                           "explicit float32 path for soft-cap"),
    KernelImpl(op="reshape_and_cache", backend="cpu", name="cpu.reshape_and_cache.index_copy", build=_build_write,
               priority=10, capability=_CAPABILITY,
               description="index_copy_ of each token's K/V rows into the cache"),
]
