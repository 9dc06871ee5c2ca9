"""Unified paged attention and the KV-cache write, in Triton; shared by cuda, rocm and the interpreter tier.

Shape legend: T tokens (packed), S sequences, Hq query heads, Hkv kv heads, G = Hq / Hkv query heads per kv
head, D head size, P block size (tokens per KV block), N keys per tile, R rows per program, X splits.

One launch serves a whole batch of prefills, chunked prefills and decodes. A program owns one *query block*
(``BLOCK_Q`` consecutive new tokens of one sequence) and one kv head; its rows are the pairs
(token, query head of that kv head), so the GQA group shares every K/V tile it loads. The program finds its
sequence by a binary search over ``query_start_loc`` (query blocks are numbered sequence after sequence, with
at most one partial block per sequence, so ``T // BLOCK_Q + S`` programs along axis 0 always suffice). It
walks the key tiles the causal / window rule lets its rows see, gathers them through the block table, and
keeps an online softmax in float32.

The split-KV path (long contexts with few programs) runs the same kernel with ``NUM_SPLITS > 1``: each split
walks a slice of the key tiles and writes an unnormalised partial (acc, running max, running sum) to a float32
workspace; :func:`attention_merge_kernel` combines the splits.

Cache layout is carried by strides, so ``NHD`` ([B, P, Hkv, D]) and ``HND`` ([B, Hkv, P, D]) share the code.
"""
from __future__ import annotations

import math
from typing import Callable

import torch
import triton.language as tl

from .runtime import cdiv, compile_kernel, next_power_of_2
from .tuning import TritonTuning

__all__ = [
    "unified_attention_kernel",
    "attention_merge_kernel",
    "reshape_and_cache_kernel",
    "launch_attention",
    "build_attention",
    "build_reshape_and_cache",
]

def unified_attention_kernel(
    q_ptr, k_ptr, v_ptr, out_ptr,                 # q [T, Hq, D], caches (layout by strides), out [T, Hq, D]
    block_table_ptr, seq_lens_ptr, query_start_ptr,  # [S, max_blocks], [S], [S+1]
    ws_acc_ptr, ws_ml_ptr,                        # split workspace: acc [T, Hq, X, D_PAD], (m, l) [T, Hq, X, 2]
    num_seqs,
    stride_qt, stride_qh, stride_ot, stride_oh,
    stride_kb, stride_kp, stride_kh, stride_vb, stride_vp, stride_vh,
    stride_bt,
    scale, soft_cap, window,
    QPK: tl.constexpr, HEAD: tl.constexpr, HEAD_PAD: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_Q: tl.constexpr, TILE_N: tl.constexpr,
    CAUSAL: tl.constexpr, USE_WINDOW: tl.constexpr, USE_SOFTCAP: tl.constexpr,
    NUM_SPLITS: tl.constexpr, DOT_UPCAST: tl.constexpr, F32_PREC: tl.constexpr,
):
    q_block_global = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)

    # The sequence owning this query block: the last s with query_start[s] // BLOCK_Q + s <= q_block_global.
    lo = q_block_global * 0
    hi = lo + num_seqs
    while lo < hi:
        mid = (lo + hi) // 2
        first_block = tl.load(query_start_ptr + mid).to(tl.int32) // BLOCK_Q + mid
        if first_block <= q_block_global:
            lo = mid + 1
        else:
            hi = mid
    seq = lo - 1

    q_start = tl.load(query_start_ptr + seq).to(tl.int32)
    q_len = tl.load(query_start_ptr + seq + 1).to(tl.int32) - q_start
    q_block = q_block_global - (q_start // BLOCK_Q + seq)
    if q_block * BLOCK_Q >= q_len:
        return
    seq_len = tl.load(seq_lens_ptr + seq).to(tl.int32)
    ctx_len = seq_len - q_len                      # keys that precede this step's new tokens

    offs_m = tl.arange(0, BLOCK_M)                 # [R] rows: (token, head in group)
    offs_d = tl.arange(0, HEAD_PAD)                # [D_PAD]
    offs_n = tl.arange(0, TILE_N)                  # [N]
    q_tok = q_block * BLOCK_Q + offs_m // QPK      # [R] token index within the sequence's new tokens
    head = kv_head * QPK + offs_m % QPK            # [R] query head
    row_ok = (offs_m // QPK < BLOCK_Q) & (q_tok < q_len)
    d_ok = offs_d < HEAD
    q_pos = ctx_len + q_tok                        # [R] absolute positions
    tok = (q_start + q_tok).to(tl.int64)           # [R] packed token index

    q_RD = tl.load(q_ptr + tok[:, None] * stride_qt + head[:, None] * stride_qh + offs_d[None, :],
                   mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    if DOT_UPCAST:
        q_RD = q_RD.to(tl.float32)

    # Keys any row of this block may see: [key_lo, key_hi).
    last_q_pos = ctx_len + tl.minimum((q_block + 1) * BLOCK_Q, q_len) - 1
    key_hi = seq_len
    if CAUSAL:
        key_hi = last_q_pos + 1
    key_lo = key_hi * 0
    if USE_WINDOW:
        key_lo = tl.maximum(key_lo, ctx_len + q_block * BLOCK_Q - window + 1)
    tile_lo = key_lo // TILE_N
    tile_hi = (key_hi + TILE_N - 1) // TILE_N
    if NUM_SPLITS > 1:
        per_split = (tile_hi - tile_lo + NUM_SPLITS - 1) // NUM_SPLITS
        tile_lo = tile_lo + split * per_split
        tile_hi = tl.minimum(tile_lo + per_split, tile_hi)

    m_R = tl.full([BLOCK_M], float("-inf"), tl.float32)     # running max (log2 domain)
    l_R = tl.zeros([BLOCK_M], dtype=tl.float32)             # running sum
    acc_RD = tl.zeros([BLOCK_M, HEAD_PAD], dtype=tl.float32)
    qk_scale = scale * 1.4426950408889634
    for t in range(tile_lo, tile_hi):
        k_pos = t * TILE_N + offs_n                             # [N]
        k_ok = k_pos < key_hi
        blk = tl.load(block_table_ptr + seq * stride_bt + k_pos // BLOCK_SIZE, mask=k_ok, other=0).to(tl.int64)
        in_blk = k_pos % BLOCK_SIZE
        k_off = blk * stride_kb + in_blk * stride_kp + kv_head * stride_kh     # [N]
        v_off = blk * stride_vb + in_blk * stride_vp + kv_head * stride_vh     # [N]
        k_DN = tl.load(k_ptr + k_off[None, :] + offs_d[:, None], mask=k_ok[None, :] & d_ok[:, None], other=0.0)
        v_ND = tl.load(v_ptr + v_off[:, None] + offs_d[None, :], mask=k_ok[:, None] & d_ok[None, :], other=0.0)
        if DOT_UPCAST:
            k_DN = k_DN.to(tl.float32)
        s_RN = tl.dot(q_RD, k_DN, input_precision=F32_PREC)
        if USE_SOFTCAP:
            # cap * tanh(score / cap), tanh(x) = 1 - 2 / (exp(2x) + 1)
            s_RN = soft_cap * (1.0 - 2.0 / (tl.exp(2.0 * scale * s_RN / soft_cap) + 1.0)) * 1.4426950408889634
        else:
            s_RN = s_RN * qk_scale
        keep = row_ok[:, None] & k_ok[None, :]
        if CAUSAL:
            keep = keep & (k_pos[None, :] <= q_pos[:, None])
        if USE_WINDOW:
            keep = keep & (q_pos[:, None] - k_pos[None, :] < window)
        s_RN = tl.where(keep, s_RN, float("-inf"))
        m_new = tl.maximum(m_R, tl.max(s_RN, axis=1))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        p_RN = tl.exp2(s_RN - m_use[:, None])
        alpha = tl.exp2(m_R - m_use)
        l_R = l_R * alpha + tl.sum(p_RN, axis=1)
        acc_RD = acc_RD * alpha[:, None]
        if DOT_UPCAST:
            acc_RD = tl.dot(p_RN, v_ND.to(tl.float32), acc_RD, input_precision=F32_PREC)
        else:
            acc_RD = tl.dot(p_RN.to(v_ND.dtype), v_ND, acc_RD, input_precision=F32_PREC)
        m_R = m_new

    if NUM_SPLITS == 1:
        l_safe = tl.where(l_R == 0.0, 1.0, l_R)
        o_RD = acc_RD / l_safe[:, None]
        tl.store(out_ptr + tok[:, None] * stride_ot + head[:, None] * stride_oh + offs_d[None, :],
                 o_RD.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])
    else:
        # workspace index of (token, head, split)
        w_idx = (tok * (tl.num_programs(1) * QPK) + head) * NUM_SPLITS + split     # [R]
        tl.store(ws_acc_ptr + w_idx[:, None] * HEAD_PAD + offs_d[None, :], acc_RD, mask=row_ok[:, None])
        tl.store(ws_ml_ptr + w_idx * 2, m_R, mask=row_ok)
        tl.store(ws_ml_ptr + w_idx * 2 + 1, l_R, mask=row_ok)


def attention_merge_kernel(
    ws_acc_ptr, ws_ml_ptr, out_ptr,              # [T, Hq, X, D_PAD], [T, Hq, X, 2], out [T, Hq, D]
    num_rows, num_heads, stride_ot, stride_oh,
    HEAD: tl.constexpr, HEAD_PAD: tl.constexpr, NUM_SPLITS: tl.constexpr, SPLITS_PAD: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)         # [R] row = token * Hq + head
    x = tl.arange(0, SPLITS_PAD)                                   # [X]
    d = tl.arange(0, HEAD_PAD)                                     # [D_PAD]
    r_ok = r < num_rows
    x_ok = x < NUM_SPLITS
    rx = r.to(tl.int64)[:, None] * NUM_SPLITS + x[None, :]         # [R, X]
    rx_ok = r_ok[:, None] & x_ok[None, :]
    m_RX = tl.load(ws_ml_ptr + rx * 2, mask=rx_ok, other=float("-inf"))
    l_RX = tl.load(ws_ml_ptr + rx * 2 + 1, mask=rx_ok, other=0.0)
    m_R = tl.max(m_RX, axis=1)
    m_use = tl.where(m_R == float("-inf"), 0.0, m_R)
    w_RX = tl.exp2(m_RX - m_use[:, None])                          # a split that saw no key weighs 0
    l_R = tl.sum(l_RX * w_RX, axis=1)
    acc_RXD = tl.load(ws_acc_ptr + rx[:, :, None] * HEAD_PAD + d[None, None, :], mask=rx_ok[:, :, None], other=0.0)
    o_RD = tl.sum(acc_RXD * w_RX[:, :, None], axis=1) / tl.where(l_R == 0.0, 1.0, l_R)[:, None]
    tok = (r // num_heads).to(tl.int64)
    head = r % num_heads
    tl.store(out_ptr + tok[:, None] * stride_ot + head[:, None] * stride_oh + d[None, :],
             o_RD.to(out_ptr.dtype.element_ty), mask=r_ok[:, None] & (d[None, :] < HEAD))


def reshape_and_cache_kernel(
    key_ptr, value_ptr, k_cache_ptr, v_cache_ptr, slot_ptr,       # key/value [T, Hkv, D], slots [T]
    num_tokens,
    stride_kt, stride_kh, stride_vt, stride_vh,
    stride_kb, stride_kp, stride_kch, stride_vb, stride_vp, stride_vch,
    HKV: tl.constexpr, HEAD: tl.constexpr, COLS_PAD: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    BLOCK_T: tl.constexpr,
):
    t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)        # [T_blk]
    t_ok = t < num_tokens
    slot = tl.load(slot_ptr + t, mask=t_ok, other=-1).to(tl.int64)
    ok = t_ok & (slot >= 0)                                        # a negative slot is padding
    blk = tl.where(ok, slot, 0) // BLOCK_SIZE
    off = tl.where(ok, slot, 0) % BLOCK_SIZE
    c = tl.arange(0, COLS_PAD)                                     # [C] = (kv head, d) flattened
    h = c // HEAD
    d = c % HEAD
    mask = ok[:, None] & (c < HKV * HEAD)[None, :]
    t64 = t.to(tl.int64)
    k = tl.load(key_ptr + t64[:, None] * stride_kt + h[None, :] * stride_kh + d[None, :], mask=mask)
    v = tl.load(value_ptr + t64[:, None] * stride_vt + h[None, :] * stride_vh + d[None, :], mask=mask)
    tl.store(k_cache_ptr + (blk * stride_kb + off * stride_kp)[:, None] + h[None, :] * stride_kch + d[None, :],
             k.to(k_cache_ptr.dtype.element_ty), mask=mask)
    tl.store(v_cache_ptr + (blk * stride_vb + off * stride_vp)[:, None] + h[None, :] * stride_vch + d[None, :],
             v.to(v_cache_ptr.dtype.element_ty), mask=mask)


def _cache_strides(cache: torch.Tensor, layout: str):
    """(block, position-in-block, kv-head) strides of a cache in ``layout``."""
    if layout == "HND":
        return cache.stride(0), cache.stride(2), cache.stride(1)
    return cache.stride(0), cache.stride(1), cache.stride(2)


def _last_dim_contiguous(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def launch_attention(q, k_cache, v_cache, query_start_loc, seq_lens, block_table, out, *,
                     num_kv_heads: int, block_size: int, layout: str, causal: bool, scale: float,
                     sliding_window, soft_cap, max_query_len: int, max_seq_len: int,
                     tuning: TritonTuning, interpret: bool, num_splits: int | None = None):
    """Run unified attention into ``out [T, Hq, D]``. ``num_splits`` forces the path (1: one pass; tests)."""
    a = tuning.attention
    T, Hq, D = q.shape
    S = seq_lens.shape[0]
    qpk = Hq // num_kv_heads
    decode = max_query_len <= 1 and not tuning.batch_invariant
    block_m = max(a.block_m_decode if decode else a.block_m, next_power_of_2(qpk), 16)
    block_q = block_m // qpk
    head_pad = max(next_power_of_2(D), 16)
    grid0 = T // block_q + S
    if num_splits is None:
        num_splits = 1
        if not tuning.batch_invariant and max_seq_len >= a.split_kv_min_seq_len and grid0 * num_kv_heads < a.split_kv_max_programs:
            tiles = cdiv(max_seq_len, a.tile_n)
            num_splits = max(1, min(a.max_splits, cdiv(tiles, a.split_kv_tiles_per_split)))
    q = _last_dim_contiguous(q)
    target = out if out.stride(-1) == 1 else torch.empty_like(out, memory_format=torch.contiguous_format)
    kb, kp, kh = _cache_strides(k_cache, layout)
    vb, vp, vh = _cache_strides(v_cache, layout)
    if num_splits > 1:
        ws_acc = torch.empty((T, Hq, num_splits, head_pad), dtype=torch.float32, device=q.device)
        ws_ml = torch.empty((T, Hq, num_splits, 2), dtype=torch.float32, device=q.device)
    else:
        ws_acc = ws_ml = target   # never touched
    opts = dict(tuning.launch_options)
    kern = compile_kernel(unified_attention_kernel, interpret)
    kern[(grid0, num_kv_heads, num_splits)](
        q, k_cache, v_cache, target, block_table, seq_lens, query_start_loc, ws_acc, ws_ml, S,
        q.stride(0), q.stride(1), target.stride(0), target.stride(1), kb, kp, kh, vb, vp, vh,
        block_table.stride(0), float(scale), float(soft_cap or 1.0), int(sliding_window or 0),
        QPK=qpk, HEAD=D, HEAD_PAD=head_pad, BLOCK_SIZE=block_size, BLOCK_M=block_m, BLOCK_Q=block_q,
        TILE_N=a.tile_n, CAUSAL=bool(causal), USE_WINDOW=sliding_window is not None,
        USE_SOFTCAP=soft_cap is not None, NUM_SPLITS=num_splits, DOT_UPCAST=tuning.dot_upcast,
        F32_PREC=tuning.fp32_dot_precision,
        num_warps=a.num_warps_decode if decode else a.num_warps,
        num_stages=a.num_stages_decode if decode else a.num_stages, **opts)
    if num_splits > 1:
        rows = T * Hq
        block_r = max(1, min(tuning.rows_per_program, next_power_of_2(rows)))
        merge = compile_kernel(attention_merge_kernel, interpret)
        merge[(cdiv(rows, block_r),)](
            ws_acc, ws_ml, target, rows, Hq, target.stride(0), target.stride(1),
            HEAD=D, HEAD_PAD=head_pad, NUM_SPLITS=num_splits, SPLITS_PAD=next_power_of_2(num_splits),
            BLOCK_R=block_r, num_warps=4, **opts)
    if target is not out:
        out.copy_(target)
    return out


def _meta_field(meta, *names):
    for n in names:
        if hasattr(meta, n):
            return getattr(meta, n)
    raise AttributeError(f"attention metadata has none of {names}")


def build_attention(spec, tuning: TritonTuning, interpret: bool, layout: str = "NHD") -> Callable:
    """``kernel(q, k_cache, v_cache, meta, out) -> out`` for an attention spec."""
    scale = spec.scale if spec.scale is not None else 1.0 / math.sqrt(spec.head_size)
    layout = getattr(spec, "kv_layout", None) or layout
    fixed = dict(num_kv_heads=spec.num_kv_heads, block_size=spec.block_size, layout=layout, causal=spec.causal,
                 scale=scale, sliding_window=spec.sliding_window, soft_cap=spec.soft_cap, tuning=tuning,
                 interpret=interpret)

    def attention(q, k_cache, v_cache, meta, out):
        return launch_attention(
            q, k_cache, v_cache, meta.query_start_loc, meta.seq_lens, meta.block_table, out,
            max_query_len=int(_meta_field(meta, "max_query_len")), max_seq_len=int(_meta_field(meta, "max_seq_len")),
            **fixed)

    return attention


def build_reshape_and_cache(spec, tuning: TritonTuning, interpret: bool, layout: str = "NHD") -> Callable:
    """``kernel(key, value, k_cache, v_cache, slot_mapping) -> None`` for an attention spec."""
    layout = getattr(spec, "kv_layout", None) or layout
    block_size = spec.block_size
    kern = compile_kernel(reshape_and_cache_kernel, interpret)
    opts = dict(tuning.launch_options)

    def reshape_and_cache(key, value, k_cache, v_cache, slot_mapping):
        T, hkv, d = key.shape
        if T == 0:
            return None
        key = _last_dim_contiguous(key)
        value = _last_dim_contiguous(value)
        kb, kp, kh = _cache_strides(k_cache, layout)
        vb, vp, vh = _cache_strides(v_cache, layout)
        block_t = max(1, min(tuning.kv_write_tokens_per_program, next_power_of_2(T)))
        kern[(cdiv(T, block_t),)](
            key, value, k_cache, v_cache, slot_mapping, T,
            key.stride(0), key.stride(1), value.stride(0), value.stride(1), kb, kp, kh, vb, vp, vh,
            HKV=hkv, HEAD=d, COLS_PAD=next_power_of_2(hkv * d), BLOCK_SIZE=block_size, BLOCK_T=block_t,
            num_warps=tuning.elementwise_num_warps, **opts)
        return None

    return reshape_and_cache
