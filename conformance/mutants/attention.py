"""Planted bugs of the attention family: the paged attention kernel and the KV write.

The harness (:func:`attention_kernel`) is paged attention written to the contract: per sequence, gather the
context's K/V through the block table, score ``q . k * scale`` in float32, soft-cap, mask (causal, window),
softmax, weight the values, round once. Each bug is one line a kernel author gets wrong.
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch

from ...core.attention import AttentionCapability, AttentionSpec
from . import Mutant, register
from ._kit import TWINS, backend

__all__ = ["attention_kernel", "write_kernel", "BUGS", "WRITE_BUGS"]

#: bug -> what the kernel gets wrong
BUGS = {
    "scale_1_over_d": "softmax scale 1/D instead of 1/sqrt(D) (when the spec gives no scale)",
    "scale_wrong_d128": "softmax scale 1/D instead of 1/sqrt(D), only for head size 128 (a specialised path)",
    "custom_scale_ignored": "the spec's custom scale is ignored: always 1/sqrt(D)",
    "causal_off_by_one": "causal mask lets each query see one key past its own position",
    "window_too_wide": "sliding window keeps query_pos - key_pos <= W (one key too many)",
    "window_too_narrow": "sliding window keeps query_pos - key_pos < W - 1 (one key too few)",
    "softcap_after_softmax": "soft-cap applied to the probabilities after the softmax instead of to the scores",
    "gqa_modulo": "GQA head mapping h % Hkv instead of h // (Hq / Hkv)",
    "neighbour_block": "every block after a sequence's first is read from the next physical block",
    "stale_slot": "the context's last position is read from the slot before it (a stale, previous slot)",
    "bidirectional_ignored": "an encoder (bidirectional) spec still gets the causal mask",
}
WRITE_BUGS = {
    "kv_write_slot_plus_one": "the KV write stores token t at slot_mapping[t] + 1 (one slot too far)",
}


def attention_kernel(spec: AttentionSpec, bug: Optional[str] = None):
    """The harness paged attention for ``spec`` (NHD caches) with ``bug`` planted (``None``: correct)."""
    hq, hkv, d = spec.num_heads, spec.num_kv_heads, spec.head_size
    scale = spec.softmax_scale
    if bug == "scale_1_over_d" and spec.scale is None:
        scale = 1.0 / d
    elif bug == "scale_wrong_d128" and spec.scale is None and d == 128:
        scale = 1.0 / d
    elif bug == "custom_scale_ignored":
        scale = 1.0 / math.sqrt(d)
    heads = torch.arange(hq) % hkv if bug == "gqa_modulo" else torch.arange(hq) // (hq // hkv)
    causal = spec.causal or bug == "bidirectional_ignored"
    cap, window = spec.soft_cap, spec.sliding_window

    def kernel(q_THD, k_cache, v_cache, meta, out_THD):
        P, n_blocks = meta.block_size, k_cache.shape[0]
        for s in range(meta.num_seqs):
            q_len, L, start = meta.query_lens_host[s], meta.seq_lens_host[s], meta.query_starts_host[s]
            if q_len == 0:
                continue
            nb = -(-L // P)
            blocks = meta.block_table[s, :nb].long().clone()
            if bug == "neighbour_block" and nb > 1:
                blocks[1:] = (blocks[1:] + 1) % n_blocks
            k_LHD = k_cache.index_select(0, blocks).reshape(nb * P, hkv, d)[:L].float()
            v_LHD = v_cache.index_select(0, blocks).reshape(nb * P, hkv, d)[:L].float()
            if bug == "stale_slot" and L > 1:
                k_LHD[L - 1], v_LHD[L - 1] = k_LHD[L - 2].clone(), v_LHD[L - 2].clone()
            q_QHD = q_THD[start:start + q_len].float()
            s_HQL = torch.einsum("qhd,lhd->hql", q_QHD, k_LHD[:, heads]) * scale
            if cap is not None and bug != "softcap_after_softmax":
                s_HQL = cap * torch.tanh(s_HQL / cap)
            q_pos = torch.arange(L - q_len, L).unsqueeze(1)
            k_pos = torch.arange(L).unsqueeze(0)
            keep = torch.ones(q_len, L, dtype=torch.bool)
            if causal:
                keep &= k_pos <= q_pos + (1 if bug == "causal_off_by_one" else 0)
            if window is not None:
                if bug == "window_too_wide":
                    keep &= (q_pos - k_pos) <= window
                elif bug == "window_too_narrow":
                    keep &= (q_pos - k_pos) < window - 1
                else:
                    keep &= (q_pos - k_pos) < window
            p_HQL = torch.softmax(s_HQL.masked_fill(~keep, float("-inf")), dim=-1).nan_to_num_(0.0)
            if cap is not None and bug == "softcap_after_softmax":
                p_HQL = cap * torch.tanh(p_HQL / cap)
            out_THD[start:start + q_len] = torch.einsum("hql,lhd->qhd", p_HQL, v_LHD[:, heads]).to(out_THD.dtype)
        return out_THD

    return kernel


def write_kernel(spec: AttentionSpec, bug: Optional[str] = None):
    """The harness KV write (NHD caches) with ``bug`` planted."""
    shift = 1 if bug == "kv_write_slot_plus_one" else 0

    def kernel(key_THD, value_THD, k_cache, v_cache, slot_mapping_T):
        P, total = k_cache.shape[1], k_cache.shape[0] * k_cache.shape[1]
        keep = slot_mapping_T >= 0
        slots = (slot_mapping_T[keep].long() + shift) % total
        k_cache[slots // P, slots % P] = key_THD[keep].to(k_cache.dtype)
        v_cache[slots // P, slots % P] = value_THD[keep].to(v_cache.dtype)

    return kernel


def _cap(dtypes: Tuple[torch.dtype, ...]) -> AttentionCapability:
    return AttentionCapability(dtypes=frozenset(dtypes), kv_layouts=frozenset({"NHD"}))


def _attention_backend(name: str, bug: Optional[str], write_bug: Optional[str], dtypes: Tuple[torch.dtype, ...]):
    return backend(name, [("attention", lambda spec: attention_kernel(spec, bug), _cap(dtypes)),
                          ("reshape_and_cache", lambda spec: write_kernel(spec, write_bug), _cap(dtypes))])


for _bug, _what in BUGS.items():
    register(Mutant(name=f"attention.{_bug}", family="attention", op="attention", description=_what,
                    make_backend=lambda dts, _b=_bug: _attention_backend(f"attention.{_b}", _b, None, dts)))
for _bug, _what in WRITE_BUGS.items():
    register(Mutant(name=f"attention.{_bug}", family="attention", op="reshape_and_cache", description=_what,
                    make_backend=lambda dts, _b=_bug: _attention_backend(f"attention.{_b}", None, _b, dts)))
TWINS["attention"] = lambda dts: _attention_backend("attention.clean", None, None, dts)
