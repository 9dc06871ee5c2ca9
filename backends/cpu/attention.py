"""cpu attention: gather each sequence's K/V rows from the paged cache into reusable head-major buffers with one
``index_select`` per tensor, then run torch's SDPA (oneDNN/flash CPU kernel) on them.

- decode (q_len == 1), in cache order (:class:`_TileBatch`): with the HND layout, when the decode sequences'
  blocks are distinct and fill at least half of the block range they span, the (block, kv head) tiles are
  scored where they lie (the small query side is gathered instead of K), the softmax is reduced per sequence with
  scatter operations and ``P @ V`` tile outputs are summed per sequence: K and V are read once, sequentially;
- decode otherwise (shared blocks, a sparse range, the NHD layout): every decode sequence at once, by block
  *columns*: for a chunk of block
  columns one ``index_select`` gathers the (block, kv head) tiles of every sequence into a buffer small enough to be
  re-read from cache, and one ``bmm`` scores all sequences and kv heads (``[S*Hkv, G, D] x [S*Hkv, D, c*P]``); one
  masked softmax over all scores (positions past a sequence's end or before its window are -inf), then a second
  pass gathers V per column chunk and accumulates ``P @ V``. About ``2 * ctx / chunk`` large ops per call instead
  of hundreds of small ones. Decode uses torch's thread count; ``ANYACCEL_CPU_DECODE_THREADS=1`` runs it on one
  thread, which wins on a machine where other processes hold the cores (each op of a multi-threaded run ends in
  a barrier that then waits a scheduler time slice);
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
from .features import half_matmul_native

__all__ = ["KERNELS"]

_FLOATS = frozenset({torch.float32, torch.float16, torch.bfloat16})
_SCRATCH = "cpu.attention"
_MAX_SCORES = 1 << 23  # elements of one float32 score chunk in the soft-cap path (32 MB)
_MAX_GATHER = 1 << 26  # elements of one gathered K (or V) buffer before heads are processed in groups
# Decode column chunks: at most this many positions per sequence, and at most this many bytes of gathered K (or V)
# for all sequences together, so a chunk is re-read from cache by the matmul that follows its gather.
_CHUNK_TOKENS = 512
_CHUNK_BYTES = 16 << 20
# Decode tiles converted to the product dtype at most this many bytes at a time (stays in L2).
_CONVERT_BYTES = 1 << 20
# Decode runs on one intra-op thread unless ANYACCEL_CPU_DECODE_THREADS says otherwise ("all" = torch's setting).
_DECODE_THREADS = os.environ.get("ANYACCEL_CPU_DECODE_THREADS", "all").strip().lower()
# SDPA's CPU flash kernel, which also returns the log-sum-exp needed to merge chunks (private; optional).
_SDPA_LSE = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)


class _threads:
    """``with _threads(n)``: torch runs on at most ``n`` intra-op threads inside the block."""

    __slots__ = ("n", "prev")

    def __init__(self, n: int) -> None:
        self.n, self.prev = n, 0

    def __enter__(self) -> None:
        self.prev = torch.get_num_threads()
        if 0 < self.n < self.prev:
            torch.set_num_threads(self.n)

    def __exit__(self, *exc) -> None:
        if torch.get_num_threads() != self.prev:
            torch.set_num_threads(self.prev)


class _Plan:
    """What one sequence needs, derived once per batch: positions, the key range and gather rows."""

    __slots__ = ("start", "q_len", "ctx0", "k_lo", "L", "rows_kv", "chunks", "rows_q", "mask", "causal_square",
                 "blocks")

    def __init__(self, start: int, q_len: int, ctx0: int, k_lo: int, L: int) -> None:
        self.start, self.q_len, self.ctx0, self.k_lo, self.L = start, q_len, ctx0, k_lo, L
        self.rows_kv = None   # [Hkv * L] row ids, kv-head major
        self.chunks = None    # decode: [(first, end)] positions of each block-column chunk it takes part in
        self.blocks = None    # decode: the cache blocks of its key range
        self.rows_q = None    # [Hq * L] row ids, query-head major (GQA expanded)
        self.mask = None      # [q_len, L] bool, True = attend
        self.causal_square = False

def _chunk_blocks(spec: AttentionSpec, block_size: int, num_decode: int) -> int:
    """Decode gathers this many block columns per chunk: whole blocks, at most ``_CHUNK_TOKENS`` positions per
    sequence and ``_CHUNK_BYTES`` of K (or V) for all decode sequences together."""
    elem = torch.empty((), dtype=spec.cache_dtype).element_size()
    per_pos = max(1, num_decode) * spec.num_kv_heads * spec.head_size * elem
    tokens = max(block_size, min(_CHUNK_TOKENS, _CHUNK_BYTES // per_pos))
    return max(1, tokens // block_size)


class _DecodeBatch:
    """Every decode sequence of a batch, ordered by block count (longest first) so that the sequences still active
    in a block column are a prefix: per column chunk ``j`` the gather rows of its ``active[j]`` sequences, and a
    mask (True = not a position of the sequence's key range) over the chunk's positions."""

    __slots__ = ("tokens", "contiguous", "num", "c", "active", "rows", "mask", "masked_chunks")

    def __init__(self) -> None:
        self.tokens = None      # [S] token index of each decode sequence's query, in processing order
        self.contiguous = None  # first token if ``tokens`` is a run of consecutive tokens, else None
        self.num = 0
        self.c = 0              # blocks per column chunk
        self.active = []        # per chunk: number of sequences with a block in it
        self.rows = []          # per chunk: [active * Hkv * c] tile ids (HND) or [active * Hkv * c * P] row ids
        self.mask = None        # [chunks, S, 1, c * P] bool or None when every gathered position is valid
        self.masked_chunks = ()  # the chunks whose mask has a True (their gathered V rows are zeroed there)


def _decode_batch(meta, spec: AttentionSpec, plans: List[_Plan], c: int) -> _DecodeBatch:
    P, hkv = meta.block_size, spec.num_kv_heads
    dec = [p for p in plans if p.q_len == 1]
    spans = []  # (plan, first block index in the table, number of blocks)
    for p in dec:
        b0 = p.k_lo // P
        spans.append((p, b0, -(-(p.ctx0 + 1) // P) - b0))
    spans.sort(key=lambda x: -x[2])
    out = _DecodeBatch()
    out.num, out.c = len(spans), c
    starts = [p.start for p, _, _ in spans]
    out.tokens = torch.tensor(starts, dtype=torch.long)
    if starts == list(range(starts[0], starts[0] + len(starts))):
        out.contiguous = starts[0]
    nch = -(-spans[0][2] // c)
    cp = c * P
    table = meta.block_table.long()
    heads = torch.arange(hkv)
    mask = torch.zeros(nch, len(spans), 1, cp, dtype=torch.bool)
    need_mask = False
    local = torch.arange(nch * cp).view(nch, cp)
    for i, (p, b0, nb) in enumerate(spans):
        blocks = p.blocks
        padded = torch.full((nch * c,), int(blocks[0]), dtype=torch.long)
        padded[:nb] = blocks
        p.blocks = padded
        pos = local + b0 * P  # absolute positions of the gathered columns
        bad = (pos < p.k_lo) | (pos > p.ctx0)
        if bool(bad.any()):
            need_mask = True
            mask[:, i, 0] = bad
    for j in range(nch):
        n = sum(1 for _, _, nb in spans if nb > j * c)
        out.active.append(n)
        blk = torch.stack([p.blocks[j * c:(j + 1) * c] for p, _, _ in spans[:n]])  # [n, c]
        if spec.kv_layout == "HND":  # tiles [B * Hkv] of [P, D]
            rows = blk.unsqueeze(1) * hkv + heads.view(1, hkv, 1)  # [n, Hkv, c]
        else:  # rows [B * P * Hkv] of [D]: (blk * P + off) * Hkv + h
            off = torch.arange(P)
            rows = ((blk.unsqueeze(1).unsqueeze(-1) * P + off) * hkv + heads.view(1, hkv, 1, 1))  # [n, Hkv, c, P]
        out.rows.append(rows.reshape(-1))
    out.mask = mask if need_mask else None
    if need_mask:
        out.masked_chunks = tuple(j for j in range(nch) if bool(mask[j].any()))
    return out


class _TileBatch:
    """Decode in *cache order*: when the decode sequences' blocks are distinct and fill most of the block range
    they span (the common case for a block allocator), attention runs over the (block, kv head) tiles of that
    range where they lie, with no gather of K or V: each tile is scored against the query of the sequence that
    owns it (``[tiles, G, D] x [tiles, D, P]``, the small query side is gathered instead), a per-sequence softmax
    is reduced with scatter operations, and ``P @ V`` tile outputs are summed per sequence with ``index_add_``.
    K and V are each read once, sequentially. Unused blocks inside the range cost their reads and are masked."""

    __slots__ = ("lo", "hi", "tokens", "q_rows", "owner_rows", "valid", "num", "partial", "partial_valid")

    def __init__(self) -> None:
        self.lo = self.hi = 0
        self.tokens = None      # [S] token index of each decode sequence's query
        self.q_rows = None      # [span * Hkv] row of q viewed [T * Hkv, G, D] for each tile (0 for unused tiles)
        self.owner_rows = None  # [span * Hkv] accumulator row (seq * Hkv + h); unused tiles go to a spare row
        self.valid = None       # [span, 1, 1, P] bool: the slot is a key position of the tile's owner
        self.partial = None     # [n] owned (block, kv head) tile ids with a slot outside the owner's key range
        self.partial_valid = None  # [n, P, 1] bool: their valid slots
        self.num = 0


_TILE_MIN_DENSITY = 0.5


def _tile_batch(meta, spec: AttentionSpec, dec: List["_Plan"]) -> "_TileBatch | None":
    if spec.kv_layout != "HND" or not dec:
        return None
    P, hkv = meta.block_size, spec.num_kv_heads
    owners, firsts, blocks = [], [], []
    for i, p in enumerate(dec):
        b0 = p.k_lo // P
        owners.append(torch.full((p.blocks.numel(),), i, dtype=torch.long))
        firsts.append((torch.arange(p.blocks.numel()) + b0) * P)  # absolute position of each block's slot 0
        blocks.append(p.blocks)
    blk = torch.cat(blocks)
    lo, hi = int(blk.min()), int(blk.max()) + 1
    span = hi - lo
    if blk.numel() < _TILE_MIN_DENSITY * span or torch.unique(blk).numel() != blk.numel():
        return None  # sparse or shared blocks: the gathering path serves them
    S = len(dec)
    owner = torch.full((span,), S, dtype=torch.long)   # S = the spare accumulator row
    first = torch.zeros(span, dtype=torch.long)
    owner[blk - lo] = torch.cat(owners)
    first[blk - lo] = torch.cat(firsts)
    k_lo = torch.tensor([p.k_lo for p in dec] + [0])
    end = torch.tensor([p.ctx0 + 1 for p in dec] + [0])  # one past the last key position
    pos = first.unsqueeze(1) + torch.arange(P)  # [span, P]
    valid = (pos >= k_lo[owner].unsqueeze(1)) & (pos < end[owner].unsqueeze(1))
    tb = _TileBatch()
    tb.lo, tb.hi, tb.num = lo, hi, S
    tb.tokens = torch.tensor([p.start for p in dec] + [0], dtype=torch.long)
    heads = torch.arange(hkv)
    tb.q_rows = (tb.tokens[owner].unsqueeze(1) * hkv + heads).reshape(-1)
    tb.owner_rows = (owner.unsqueeze(1) * hkv + heads).reshape(-1)
    tb.valid = valid.view(span, 1, 1, P)
    # owned blocks with a slot outside the key range: those slots' V (never written, may hold anything, NaN
    # included) must not reach P @ V, where a zero probability times NaN would still give NaN
    part_B = ((owner < S) & ~valid.all(dim=1)).nonzero().flatten()
    tb.partial = (part_B.unsqueeze(1) * hkv + heads).reshape(-1)
    tb.partial_valid = valid[part_B].repeat_interleave(hkv, dim=0).unsqueeze(2)
    return tb


def _plan_key(spec: AttentionSpec) -> tuple:
    return (_SCRATCH, spec.kv_layout, spec.num_kv_heads, spec.num_heads, spec.sliding_window, spec.causal,
            spec.head_size, spec.cache_dtype)


class _Plans(list):
    """The batch's per-sequence plans, plus ``decode``: its decode sequences as one :class:`_DecodeBatch`."""

    decode = None
    tiles = None


def _plans(meta, spec: AttentionSpec) -> _Plans:
    key = _plan_key(spec)
    plans = meta.scratch.get(key)
    if plans is not None:
        return plans
    P, hkv, hq = meta.block_size, spec.num_kv_heads, spec.num_heads
    window, causal = spec.sliding_window, spec.causal
    num_decode = sum(1 for s in range(meta.num_seqs) if meta.query_lens_host[s] == 1)
    c = _chunk_blocks(spec, P, num_decode)
    plans = _Plans()
    for s in range(meta.num_seqs):
        q_len, L_all, start = meta.query_lens_host[s], meta.seq_lens_host[s], meta.query_starts_host[s]
        if q_len == 0:
            continue
        ctx0 = L_all - q_len
        k_lo = max(0, ctx0 - window + 1) if window is not None else 0
        plan = _Plan(start, q_len, ctx0, k_lo, L_all - k_lo)
        if q_len == 1:
            b0, b1 = k_lo // P, -(-L_all // P)
            plan.blocks = meta.block_table[s, b0:b1].long()
            # the position ranges of the block-column chunks this sequence takes part in
            plan.chunks = [(max(k_lo, (b0 + i) * P), min(L_all, (b0 + i + c) * P)) for i in range(0, b1 - b0, c)]
            plans.append(plan)
            continue
        pos_L = torch.arange(k_lo, L_all)
        blk_L = meta.block_table[s].long()[pos_L // P]
        off_L = pos_L % P
        heads = torch.arange(hkv).unsqueeze(1)  # [Hkv, 1]
        if spec.kv_layout == "NHD":  # cache rows [B, P, Hkv] -> (blk * P + off) * Hkv + h
            rows = (blk_L * P + off_L).unsqueeze(0) * hkv + heads
        else:  # HND: cache rows [B, Hkv, P] -> (blk * Hkv + h) * P + off
            rows = (blk_L.unsqueeze(0) * hkv + heads) * P + off_L.unsqueeze(0)
        plan.rows_kv = rows.reshape(-1)
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
    if num_decode:
        plans.tiles = _tile_batch(meta, spec, [p for p in plans if p.q_len == 1])
        if plans.tiles is None:
            plans.decode = _decode_batch(meta, spec, plans, c)
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
    # decode's matrix products run in the working dtype where the CPU multiplies it natively, else in float32 on
    # converted tiles (see backends/cpu/features.py: a half GEMM without the instructions is ~10x slower)
    mdt = dt if half_matmul_native(dt) else torch.float32
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

    def decode(q_THD, k_cache, v_cache, batch: _DecodeBatch, out_THD):
        """Every decode sequence at once, block column chunk by block column chunk (see the module docstring)."""
        S, c = batch.num, batch.c
        P = k_cache.shape[2] if layout == "HND" else k_cache.shape[1]
        cp, nch, sh = c * P, len(batch.rows), S * hkv
        if layout == "HND":
            k_src, v_src = k_cache.view(-1, P * d), v_cache.view(-1, P * d)
        else:
            k_src, v_src = k_cache.view(-1, d), v_cache.view(-1, d)
        t0 = batch.contiguous
        q_SHD = q_THD[t0:t0 + S] if t0 is not None else q_THD.index_select(0, batch.tokens)
        q_RGD = q_SHD.reshape(sh, g, d).to(mdt)  # R = S * Hkv
        scores = buffer("scores", nch * sh * g * cp, torch.float32).view(nch, sh, g, cp)
        kv_n = max(batch.active) * hkv * cp * d
        for j, rows in enumerate(batch.rows):
            n = batch.active[j] * hkv
            kb = buffer("kv", kv_n, cdt)[:n * cp * d].view(-1, k_src.shape[1])
            torch.index_select(k_src, 0, rows, out=kb)
            kb = kb.view(n, cp, d)
            if cdt != mdt:
                kb = kb.to(mdt)
            if mdt == torch.float32:
                torch.bmm(q_RGD[:n], kb.transpose(1, 2), out=scores[j, :n])
            else:  # rounded once to the dtype by the GEMM (float32 accumulation inside), softmax in float32
                scores[j, :n].copy_(torch.bmm(q_RGD[:n], kb.transpose(1, 2)))
        if cap is None:
            scores.mul_(scale)
        else:
            scores.mul_(scale / cap).tanh_().mul_(cap)
        if batch.mask is not None:
            scores.view(nch, S, hkv * g, cp).masked_fill_(batch.mask, float("-inf"))
        flat = scores.view(nch, sh * g, cp)
        flat.sub_(flat.amax(dim=(0, 2), keepdim=True)).exp_()
        denom = flat.sum(dim=(0, 2)).view(sh, g, 1)
        probs = scores if mdt == torch.float32 else scores.to(dt)
        acc = buffer("acc", sh * g * d, torch.float32).view(sh, g, d).zero_()
        for j, rows in enumerate(batch.rows):
            n = batch.active[j] * hkv
            vb = buffer("kv", kv_n, cdt)[:n * cp * d].view(-1, v_src.shape[1])
            torch.index_select(v_src, 0, rows, out=vb)
            vb = vb.view(n, cp, d)
            if j in batch.masked_chunks:  # positions outside a key range: zero V there (0 * NaN is NaN)
                vb.view(-1, hkv, cp, d).masked_fill_(batch.mask[j, :batch.active[j], :, :, None], 0)
            if cdt != mdt:
                vb = vb.to(mdt)
            if mdt == torch.float32:
                acc[:n].baddbmm_(probs[j, :n], vb)
            else:
                acc[:n].add_(torch.bmm(probs[j, :n], vb))
        o_SHD = acc.div_(denom).view(S, hq, d)
        if t0 is not None:
            out_THD[t0:t0 + S].copy_(o_SHD)
        else:
            out_THD.index_copy_(0, batch.tokens, o_SHD.to(dt))

    def tiles_bmm(a_TGX, b_TPD, transpose: bool) -> torch.Tensor:
        """``a @ b^T`` (scores) or ``a @ b`` (outputs) per tile; cache tiles in another dtype than ``mdt`` are
        converted a cache-sized group at a time (never the whole range at once: that would write and re-read it)."""
        if b_TPD.dtype == mdt:
            return torch.bmm(a_TGX, b_TPD.transpose(1, 2) if transpose else b_TPD)
        n, P = b_TPD.shape[0], b_TPD.shape[1]
        out = torch.empty(n, a_TGX.shape[1], P if transpose else d, dtype=mdt)
        step = max(1, _CONVERT_BYTES // (P * d * 4))
        for t0 in range(0, n, step):
            b = b_TPD[t0:t0 + step].to(mdt)
            torch.bmm(a_TGX[t0:t0 + step], b.transpose(1, 2) if transpose else b, out=out[t0:t0 + step])
        return out

    def decode_tiles(q_THD, k_cache, v_cache, tb: _TileBatch, out_THD):
        """Decode over the cache's tiles in place (see :class:`_TileBatch`)."""
        S, P = tb.num, k_cache.shape[2]
        span = tb.hi - tb.lo
        k_TPD = k_cache[tb.lo:tb.hi].view(span * hkv, P, d)  # tiles (block, kv head), a view: no copy
        v_TPD = v_cache[tb.lo:tb.hi].view(span * hkv, P, d)
        q_TGD = q_THD.reshape(-1, g, d).index_select(0, tb.q_rows).to(mdt)  # each tile's owner's query group
        s_TGP = tiles_bmm(q_TGD, k_TPD, True)
        s_TGP = s_TGP.float() if mdt != torch.float32 else s_TGP
        if cap is None:
            s_TGP.mul_(scale)
        else:
            s_TGP.mul_(scale / cap).tanh_().mul_(cap)
        s4 = s_TGP.view(span, hkv, g, P).masked_fill_(~tb.valid, float("-inf"))
        # softmax over each (sequence, kv head, query head)'s tiles: max and sum reduced by owner
        rows = tb.owner_rows
        m_TG = s_TGP.amax(dim=2)  # [tiles, G]
        m_RG = torch.full(((S + 1) * hkv, g), float("-inf")).scatter_reduce_(
            0, rows.unsqueeze(1).expand(-1, g), m_TG, "amax")
        m_RG.nan_to_num_(neginf=0.0)
        s_TGP.sub_(m_RG.index_select(0, rows).unsqueeze(2)).exp_()
        den_RG = torch.zeros((S + 1) * hkv, g).index_add_(0, rows, s_TGP.sum(dim=2))
        p_TGP = s_TGP if mdt == torch.float32 else s_TGP.to(dt)
        o_TGD = tiles_bmm(p_TGP, v_TPD, False)
        if tb.partial.numel():  # recompute the tiles with unused slots, their V zeroed there
            v_part = v_TPD.index_select(0, tb.partial).to(mdt).masked_fill_(~tb.partial_valid, 0)
            o_TGD.index_copy_(0, tb.partial, torch.bmm(p_TGP.index_select(0, tb.partial), v_part))
        o_TGD = o_TGD.float() if mdt != torch.float32 else o_TGD
        acc_RGD = torch.zeros((S + 1) * hkv, g, d).index_add_(0, rows, o_TGD)
        acc_RGD.div_(den_RG.unsqueeze(2))
        out_THD.index_copy_(0, tb.tokens[:S], acc_RGD[:S * hkv].view(S, hq, d).to(dt))

    def prefill(q_THD, k_rows, v_rows, plan, out_THD):
        L, t0, n = plan.L, plan.start, plan.q_len
        # Query heads are processed in groups of whole kv heads so the gathered buffers stay bounded.
        kv_per_group = max(1, min(hkv, _MAX_GATHER // max(1, g * L * d)))
        for h0 in range(0, hkv, kv_per_group):
            h1 = min(hkv, h0 + kv_per_group)
            nh = (h1 - h0) * g
            rows = plan.rows_q[h0 * g * L:h1 * g * L]
            # No thread-count switching here: resizing the intra-op pool costs more than these copies.
            k = gather(k_rows, rows, "k", nh, L)
            v = gather(v_rows, rows, "v", nh, L)
            # SDPA's CPU kernel is slower on a strided query: pay for one small copy instead.
            q_1HQD = q_THD[t0:t0 + n, h0 * g:h1 * g].transpose(0, 1).unsqueeze(0).contiguous()  # [1, nh, Q, D]
            # SDPA's CPU kernels mishandle a NaN in q or K (a zero row, or NaN leaking through the mask) where
            # the contract propagates it to exactly the queries that see it: such inputs take the explicit path
            # (the check is far cheaper than the op)
            if cap is None and not bool(torch.isnan(q_1HQD).any() | torch.isnan(k).any()):
                if plan.causal_square:
                    o = F.scaled_dot_product_attention(q_1HQD, k, v, is_causal=True, scale=scale)
                else:
                    o = F.scaled_dot_product_attention(q_1HQD, k, v, attn_mask=plan.mask, scale=scale)
                out_THD[t0:t0 + n, h0 * g:h1 * g].copy_(o[0].transpose(0, 1))
            else:
                explicit(q_1HQD, k, v, plan, out_THD, h0 * g, h1 * g)

    def explicit(q_1HQD, k, v, plan, out_THD, hq0, hq1):
        """Scores -> (soft-cap) -> mask -> softmax -> P @ V in float32, in query chunks."""
        n, L, t0 = plan.q_len, plan.L, plan.start
        nh = hq1 - hq0
        step = max(1, _MAX_SCORES // max(1, nh * L))
        mask = plan.mask
        if mask is None and plan.causal_square:
            mask = torch.ones(n, L, dtype=torch.bool).tril_()
        kT = k.transpose(2, 3)
        for c0 in range(0, n, step):
            c1 = min(n, c0 + step)
            s = torch.matmul(q_1HQD[:, :, c0:c1], kT).float()
            s = s.mul_(scale) if cap is None else s.mul_(scale / cap).tanh_().mul_(cap)
            if mask is not None:
                s.masked_fill_(~mask[c0:c1], float("-inf"))
            o = torch.matmul(torch.softmax(s, dim=-1).to(dt), v)  # [1, nh, c, D]
            out_THD[t0 + c0:t0 + c1, hq0:hq1].copy_(o[0].transpose(0, 1))

    def attention(q_THD, k_cache, v_cache, meta, out_THD):
        k_rows = k_cache.view(-1, d)
        v_rows = v_cache.view(-1, d)
        plans = _plans(meta, spec)
        for plan in plans:
            if plan.q_len > 1:
                prefill(q_THD, k_rows, v_rows, plan, out_THD)
        if plans.tiles is not None:
            with _threads(int(_DECODE_THREADS) if _DECODE_THREADS.isdigit() else 0):
                decode_tiles(q_THD, k_cache, v_cache, plans.tiles, out_THD)
        batch = plans.decode
        if batch is not None:
            with _threads(int(_DECODE_THREADS) if _DECODE_THREADS.isdigit() else 0):
                decode(q_THD, k_cache, v_cache, batch, out_THD)
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
               priority=10, capability=AttentionCapability(dtypes=_FLOATS, kv_cache_dtypes=_FLOATS,
                                                           batch_invariant=True),
               description="index_copy_ of each token's K/V rows into the cache (exact copies: batch invariant)"),
]
