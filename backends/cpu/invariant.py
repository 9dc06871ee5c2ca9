"""cpu batch-invariant kernels: what deterministic mode (``--deterministic``) selects on the cpu backend.

Each kernel computes a row (token) of its result the same way, bit for bit, whatever batch it sits in. The
default kernels do not: torch's CPU matmul picks another code path per M (a float32 row computed alone differs
from the same row inside 2, 16 or 512 rows; measured on this project's Xeon, see docs/determinism.md), reductions
split differently with the row count, and the vectorized elementwise loops finish a call with a scalar tail whose
transcendental functions round differently from the vector lanes. The constructions here:

- **GEMM**: rows go through ``torch.mm`` in blocks of exactly ``GEMM_ROWS`` rows (the last block zero-padded),
  so every call has one shape and one code path, and a row's result does not depend on its position in the
  block (measured for every dtype; ``tests/backends/cpu/test_invariant.py`` checks it). Never split-K.
- **reductions** (norm statistics, softmax sums) are a fixed pairwise tree of elementwise adds over the
  row (:func:`tree_sum`): each add is one correctly rounded IEEE operation, so the order is the code's, not a
  library's, and identical for any number of rows.
- **transcendental functions** (exp, tanh, silu, gelu) run on a flattened copy padded to a multiple of
  ``_VEC`` elements, in calls of fewer than torch's parallel grain, so every element goes through the same
  vector lanes on one thread (:func:`lanewise`).
- **attention**: keys in fixed tiles of ``ATTN_TILE`` absolute positions (a fixed split size, not a fixed number
  of splits); per (token, kv head) one ``bmm`` of fixed shape ``[G, D] x [D, ATTN_TILE]`` per tile (its result is
  independent of the batch count: measured), a max over the token's own valid keys, and the tiles' sums and
  ``P @ V`` outputs added in tile order. Masked positions contribute exact zeros, so a query's result does not
  depend on how many other queries, tiles or sequences share the call, or on the prefill chunk it is in.
- **rotary, the KV write**: separate correctly rounded multiplies and adds (no fused multiply-add whose use
  could differ between vector and scalar loops), and exact copies.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from ...core.attention import AttentionCapability, AttentionSpec
from ...core.dispatch import KernelImpl
from ...core.fused import (GatedActivationCapability, GatedActivationSpec, LayerNormSpec, NormCapability,
                           RMSNormSpec, RotaryCapability, RotarySpec)
from ...core.gemm import GemmCapability, GemmSpec, GroupedGemmCapability, GroupedGemmSpec

__all__ = ["KERNELS", "GEMM_ROWS", "ATTN_TILE", "tree_sum", "lanewise", "fixed_rows_mm"]

_FLOATS = frozenset({torch.float32, torch.float16, torch.bfloat16})
#: rows of every GEMM call (one tile configuration for every M)
GEMM_ROWS = 16
#: keys per attention tile (aligned to absolute positions)
ATTN_TILE = 64
_VEC = 128            # a multiple of two vector widths of every dtype torch vectorizes on x86 and arm
_SERIAL = 32768 - _VEC  # below torch's parallel grain (32768): one thread, no chunk boundary inside a call
_PRIORITY = 5         # below the default kernels (10): chosen only when deterministic mode rejects those


def tree_sum(x: torch.Tensor) -> torch.Tensor:
    """Sum over the last dim by a fixed pairwise tree of elementwise adds; returns ``[..., 1]``."""
    n = x.shape[-1]
    while n > 1:
        h = n // 2
        y = x[..., :h] + x[..., h:2 * h]
        if n % 2:
            y[..., :1] += x[..., 2 * h:]
        x, n = y, h
    return x


def lanewise(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """``fn`` (an elementwise torch function) applied so that every element takes the same vector path: on a
    flattened copy padded to a multiple of ``_VEC`` elements, in serial calls of at most ``_SERIAL`` elements."""
    flat = x.reshape(-1)
    n = flat.numel()
    padded = -(-n // _VEC) * _VEC
    buf = torch.zeros(padded, dtype=x.dtype)
    buf[:n] = flat
    out = torch.empty_like(buf)
    for i in range(0, padded, _SERIAL):
        out[i:i + _SERIAL] = fn(buf[i:i + _SERIAL])
    return out[:n].view(x.shape)


def fixed_rows_mm(x_MK: torch.Tensor, w_NK: torch.Tensor, out_MN: torch.Tensor,
                  bias_N: "torch.Tensor | None" = None) -> torch.Tensor:
    """``out = x @ w.T (+ bias)`` through ``torch.mm`` (``torch.addmm``: the bias added before the one rounding)
    calls of exactly ``GEMM_ROWS`` rows (the last block zero-padded). ``out`` has the dtype of the product."""
    M = x_MK.shape[0]
    wt = w_NK.t()
    full = M - M % GEMM_ROWS
    for i in range(0, full, GEMM_ROWS):
        if bias_N is None:
            torch.mm(x_MK[i:i + GEMM_ROWS], wt, out=out_MN[i:i + GEMM_ROWS])
        else:
            torch.addmm(bias_N, x_MK[i:i + GEMM_ROWS], wt, out=out_MN[i:i + GEMM_ROWS])
    if full < M:
        pad = x_MK.new_zeros((GEMM_ROWS, x_MK.shape[1]))
        pad[:M - full] = x_MK[full:]
        y = torch.mm(pad, wt) if bias_N is None else torch.addmm(bias_N, pad, wt)
        out_MN[full:] = y[:M - full]
    return out_MN


# ---------------------------------------------------------------------------------------------------------- gemm

def _build_gemm(spec: GemmSpec):
    same = spec.result_dtype == spec.dtype

    def gemm_fixed_rows(x_MK, w_NK, bias_N, out_MN):
        if same:
            return fixed_rows_mm(x_MK, w_NK, out_MN, bias_N)
        y = fixed_rows_mm(x_MK.float(), w_NK.float(), torch.empty(out_MN.shape, dtype=torch.float32))
        if bias_N is not None:
            y += bias_N
        return out_MN.copy_(y)
    return gemm_fixed_rows


def _build_grouped(spec: GroupedGemmSpec):
    def grouped_fixed_rows(x_MK, w_ENK, groups, out_MN):
        if spec.mode == "segments":
            sizes = groups.tolist()
            ids = torch.repeat_interleave(torch.arange(len(sizes)), groups.long())
        else:
            ids = groups.long()
        for e in torch.unique(ids).tolist():
            rows = (ids == e).nonzero().flatten()
            y = fixed_rows_mm(x_MK.index_select(0, rows), w_ENK[e], torch.empty(rows.numel(), out_MN.shape[1],
                                                                                 dtype=out_MN.dtype))
            out_MN.index_copy_(0, rows, y)
        return out_MN
    return grouped_fixed_rows


# ---------------------------------------------------------------------------------------------------------- norms

def _build_rms_norm(spec: RMSNormSpec):
    inv_h, eps = 1.0 / spec.hidden_size, spec.eps

    def rms_norm_tree(x_NH, w_H, residual_NH, out_NH, residual_out_NH):
        h_NH = x_NH.float()
        if residual_NH is not None:
            h_NH = h_NH + residual_NH.float()
            residual_out_NH.copy_(h_NH)
        ms_N1 = tree_sum(h_NH * h_NH).mul_(inv_h).add_(eps)
        inv_N1 = torch.reciprocal(torch.sqrt(ms_N1))
        return out_NH.copy_((h_NH * inv_N1) * w_H.float())
    return rms_norm_tree


def _build_layer_norm(spec: LayerNormSpec):
    inv_h, eps = 1.0 / spec.hidden_size, spec.eps

    def layer_norm_tree(x_NH, w_H, b_H, out_NH):
        h_NH = x_NH.float()
        c_NH = h_NH - tree_sum(h_NH).mul_(inv_h)
        var_N1 = tree_sum(c_NH * c_NH).mul_(inv_h).add_(eps)
        y_NH = (c_NH * torch.reciprocal(torch.sqrt(var_N1))) * w_H.float()
        if b_H is not None:
            y_NH += b_H.float()
        return out_NH.copy_(y_NH)
    return layer_norm_tree


# ---------------------------------------------------------------------------------------------------------- rotary

def _build_rotary(spec: RotarySpec):
    r, half = spec.rotary_dim, spec.rotary_dim // 2
    a, b = (slice(0, half), slice(half, r)) if spec.style == "neox" else (slice(0, r, 2), slice(1, r, 2))
    partial = r < spec.head_size

    def rotate(x_THD, out_THD, cos_T1R2, sin_T1R2):
        x1, x2 = x_THD[..., a].float(), x_THD[..., b].float()
        y1 = (x1 * cos_T1R2) - (x2 * sin_T1R2)   # separate rounded products: no fused multiply-add anywhere
        y2 = (x2 * cos_T1R2) + (x1 * sin_T1R2)
        out_THD[..., a] = y1
        out_THD[..., b] = y2
        if partial and out_THD is not x_THD:
            out_THD[..., r:] = x_THD[..., r:]

    def rotary_separate(positions_T, q_THqD, k_THkvD, cache_PR, q_out, k_out):
        cs_TR = cache_PR.index_select(0, positions_T).float()
        cos_T1R2, sin_T1R2 = cs_TR[:, None, :half], cs_TR[:, None, half:]
        rotate(q_THqD, q_out, cos_T1R2, sin_T1R2)
        rotate(k_THkvD, k_out, cos_T1R2, sin_T1R2)
    return rotary_separate


# ---------------------------------------------------------------------------------------------------------- gated

def _build_gated(spec: GatedActivationSpec, kind: str):
    if kind == "silu":
        act = F.silu
    else:
        approximate = spec.approximate

        def act(t):  # in float64, rounded once: torch's float32 vector erf loses digits on small outputs
            return F.gelu(t.double(), approximate=approximate).to(t.dtype)

    def gated_lanewise(x_N2d, out_Nd):
        d = out_Nd.shape[1]
        out_Nd.copy_(lanewise(act, x_N2d[:, :d]))
        return out_Nd.mul_(x_N2d[:, d:])
    return gated_lanewise


# ---------------------------------------------------------------------------------------------------------- attention

def _build_attention(spec: AttentionSpec):
    hq, hkv, d = spec.num_heads, spec.num_kv_heads, spec.head_size
    g = hq // hkv
    scale, cap = spec.softmax_scale, spec.soft_cap
    window, causal, layout = spec.sliding_window, spec.causal, spec.kv_layout
    KB = ATTN_TILE
    tile_pos = torch.arange(KB)
    heads = torch.arange(hkv)
    # tokens per group: bounds the gathered K/V ([n, Hkv, tiles * KB, D] each)
    budget = 1 << 24

    def attention_fixed_tiles(q_THD, k_cache, v_cache, meta, out_THD):
        P = meta.block_size
        k_rows, v_rows = k_cache.reshape(-1, d), v_cache.reshape(-1, d)
        table = meta.block_table.long()
        for s in range(meta.num_seqs):
            q_len, L = meta.query_lens_host[s], meta.seq_lens_host[s]
            if q_len == 0:
                continue
            t0, ctx0 = meta.query_starts_host[s], L - q_len
            pos_n = torch.arange(ctx0, L)                         # each new token's position
            hi_n = pos_n if causal else torch.full_like(pos_n, L - 1)
            lo_n = (pos_n - window + 1).clamp_(min=0) if window is not None else torch.zeros_like(pos_n)
            first_t, last_t = int(lo_n.min()) // KB, int(hi_n.max()) // KB
            nt = last_t - first_t + 1
            step = max(1, budget // max(1, hkv * nt * KB * d))
            for c0 in range(0, q_len, step):
                c1 = min(q_len, c0 + step)
                n = c1 - c0
                kpos_K = first_t * KB + torch.arange(nt * KB)        # absolute key positions of the tiles
                blk_K = table[s, (kpos_K // P).clamp_(max=table.shape[1] - 1)]
                off_K = kpos_K % P
                if layout == "NHD":
                    rows_HK = (blk_K * P + off_K).unsqueeze(0) * hkv + heads.unsqueeze(1)
                else:
                    rows_HK = (blk_K.unsqueeze(0) * hkv + heads.unsqueeze(1)) * P + off_K.unsqueeze(0)
                K_HKD = k_rows.index_select(0, rows_HK.reshape(-1)).view(hkv, nt * KB, d).float()
                V_HKD = v_rows.index_select(0, rows_HK.reshape(-1)).view(hkv, nt * KB, d).float()
                lo, hi = lo_n[c0:c1], hi_n[c0:c1]
                valid_nK = (kpos_K >= lo.unsqueeze(1)) & (kpos_K <= hi.unsqueeze(1)) & (kpos_K < L)
                # per token its own copy of the tiles: every bmm matrix has the same shape [G, D] x [D, KB]
                Kt = K_HKD.view(1, hkv, nt, KB, d).expand(n, hkv, nt, KB, d).reshape(-1, KB, d)
                q_RGD = q_THD[t0 + c0:t0 + c1].float().reshape(n, hkv, 1, g, d).expand(n, hkv, nt, g, d)
                s_RGK = torch.bmm(q_RGD.reshape(-1, g, d), Kt.transpose(1, 2))  # [n*Hkv*nt, G, KB]
                s5 = s_RGK.view(n, hkv, nt, g, KB)
                if cap is None:
                    s5.mul_(scale)
                else:
                    s5.copy_(lanewise(torch.tanh, s5 * (scale / cap)).mul_(cap))
                mask = ~valid_nK.view(n, 1, nt, 1, KB)
                s5.masked_fill_(mask, float("-inf"))
                m = s5.amax(dim=(2, 4), keepdim=True)                 # exact: a max has no order
                p5 = lanewise(torch.exp, s5 - m)
                l_parts = tree_sum(p5).view(n, hkv, nt, g, 1)
                V_HKD[:, kpos_K >= L] = 0.0                          # slots past the context: never written
                Vt = V_HKD.view(1, hkv, nt, KB, d).expand(n, hkv, nt, KB, d)
                if not bool(torch.isfinite(V_HKD).all()):  # a p of 0 times NaN is NaN: zero V where masked
                    Vt = Vt.masked_fill(mask.view(n, 1, nt, KB, 1), 0.0)
                Vt = Vt.reshape(-1, KB, d)
                o5 = torch.bmm(p5.view(-1, g, KB), Vt).view(n, hkv, nt, g, d)
                acc = o5[:, :, 0].clone()
                den = l_parts[:, :, 0].clone()
                for t in range(1, nt):                                # tiles added in order
                    acc += o5[:, :, t]
                    den += l_parts[:, :, t]
                out_THD[t0 + c0:t0 + c1] = (acc / den).view(n, hq, d)
        return out_THD
    return attention_fixed_tiles


_INVARIANT = dict(batch_invariant=True)

KERNELS = [
    KernelImpl(op="gemm", backend="cpu", name="cpu.gemm.fixed_rows", build=_build_gemm, priority=_PRIORITY,
               capability=GemmCapability(dtypes=_FLOATS, out_dtypes=_FLOATS, **_INVARIANT),
               description=f"batch invariant: torch.mm in blocks of exactly {GEMM_ROWS} rows, no split-K"),
    KernelImpl(op="grouped_gemm", backend="cpu", name="cpu.grouped_gemm.fixed_rows", build=_build_grouped,
               priority=_PRIORITY, capability=GroupedGemmCapability(dtypes=_FLOATS, **_INVARIANT),
               description=f"batch invariant: each expert's rows in torch.mm blocks of exactly {GEMM_ROWS} rows"),
    KernelImpl(op="rms_norm", backend="cpu", name="cpu.rms_norm.tree", build=_build_rms_norm, priority=_PRIORITY,
               capability=NormCapability(dtypes=_FLOATS, max_hidden_size=None, fused_residual=True, **_INVARIANT),
               description="batch invariant: float32 pairwise-tree sum of squares per row"),
    KernelImpl(op="layer_norm", backend="cpu", name="cpu.layer_norm.tree", build=_build_layer_norm,
               priority=_PRIORITY,
               capability=NormCapability(dtypes=_FLOATS, max_hidden_size=None, bias=True, **_INVARIANT),
               description="batch invariant: float32 pairwise-tree mean and variance per row"),
    KernelImpl(op="rotary_embedding", backend="cpu", name="cpu.rotary_embedding.separate", build=_build_rotary,
               priority=_PRIORITY,
               capability=RotaryCapability(dtypes=_FLOATS, styles=frozenset({"neox", "gptj"}), head_sizes=None,
                                           partial=True, **_INVARIANT),
               description="batch invariant: float32 rotation from separately rounded products"),
    KernelImpl(op="silu_and_mul", backend="cpu", name="cpu.silu_and_mul.lanewise",
               build=lambda spec: _build_gated(spec, "silu"), priority=_PRIORITY,
               capability=GatedActivationCapability(dtypes=_FLOATS, approximations=frozenset({"none"}),
                                                    **_INVARIANT),
               description="batch invariant: silu on padded serial calls (every element in vector lanes)"),
    KernelImpl(op="gelu_and_mul", backend="cpu", name="cpu.gelu_and_mul.lanewise",
               build=lambda spec: _build_gated(spec, "gelu"), priority=_PRIORITY,
               capability=GatedActivationCapability(dtypes=_FLOATS, approximations=frozenset({"none", "tanh"}),
                                                    **_INVARIANT),
               description="batch invariant: gelu on padded serial calls (every element in vector lanes)"),
    KernelImpl(op="attention", backend="cpu", name="cpu.attention.fixed_tiles", build=_build_attention,
               priority=_PRIORITY,
               capability=AttentionCapability(dtypes=_FLOATS, kv_cache_dtypes=_FLOATS, **_INVARIANT),
               description=f"batch invariant: keys in fixed tiles of {ATTN_TILE} positions, fixed-shape bmm per "
                           "token, float32 softmax with tree sums, tiles added in order"),
]
