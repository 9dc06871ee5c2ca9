"""The shared attention kernels through the core ops (Attention, ReshapeAndCache) on the triton-interpreter
backend, against the core's float64 references: write a batch's new K/V into the paged cache, then attend."""
from __future__ import annotations

import math

import pytest
import torch

from anyaccel.core.attention import (Attention, AttentionMetadata, AttentionSpec, ReshapeAndCache,
                                     attention_reference, kv_cache_shape, reshape_and_cache_reference)

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _batch(spec, qlens, ctxs, seed=0):
    """A paged batch: random earlier context in the cache, the new tokens' slots after it, shuffled blocks."""
    g = torch.Generator().manual_seed(seed)
    P = spec.block_size
    per = [math.ceil(c / P) for c in ctxs]
    nb = sum(per) + 2
    k_cache = torch.randn(*kv_cache_shape(spec, nb), generator=g).to(spec.dtype)
    v_cache = torch.randn(*kv_cache_shape(spec, nb), generator=g).to(spec.dtype)
    perm = torch.randperm(nb, generator=g)
    bt = torch.zeros(len(ctxs), max(per), dtype=torch.int32)
    slots = []
    i = 0
    for s, (ql, c) in enumerate(zip(qlens, ctxs)):
        bt[s, :per[s]] = perm[i:i + per[s]]
        i += per[s]
        for pos in range(c - ql, c):
            slots.append(int(bt[s, pos // P]) * P + pos % P)
    qsl = torch.tensor([0, *torch.tensor(qlens).cumsum(0).tolist()], dtype=torch.int32)
    meta = AttentionMetadata.build(qsl, torch.tensor(ctxs, dtype=torch.int32), bt, P,
                                   torch.tensor(slots, dtype=torch.int64))
    T = int(qsl[-1])
    q = torch.randn(T, spec.num_heads, spec.head_size, generator=g).to(spec.dtype)
    k = torch.randn(T, spec.num_kv_heads, spec.head_size, generator=g).to(spec.dtype)
    v = torch.randn(T, spec.num_kv_heads, spec.head_size, generator=g).to(spec.dtype)
    return q, k, v, k_cache, v_cache, meta


SPECS = {
    "llama GQA causal": (dict(num_heads=8, num_kv_heads=2, head_size=64), [7, 1, 20], [30, 45, 20]),
    "gemma window+softcap": (dict(num_heads=4, num_kv_heads=2, head_size=128, sliding_window=24, soft_cap=50.0,
                                  scale=0.0625), [16, 1], [40, 70]),
    "bert bidirectional D=96 HND": (dict(num_heads=4, num_kv_heads=4, head_size=96, causal=False, kv_layout="HND",
                                         block_size=32), [25, 9], [25, 9]),
}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", list(SPECS))
def test_write_then_attend(interp, close, dtype, case):
    kw, qlens, ctxs = SPECS[case]
    spec = AttentionSpec(dtype=dtype, **{"block_size": 16, **kw})
    write = ReshapeAndCache.build(spec, interp, strict=True)
    attend = Attention.build(spec, interp, strict=True)
    assert (write.selection.chosen, attend.selection.chosen) == (
        "triton-interpreter.reshape_and_cache", "triton-interpreter.attention")
    q, k, v, k_cache, v_cache, meta = _batch(spec, qlens, ctxs)
    ref_k, ref_v = reshape_and_cache_reference(k, v, k_cache, v_cache, meta.slot_mapping, spec.kv_layout)
    write(k, v, k_cache, v_cache, meta)
    assert torch.equal(k_cache.double(), ref_k) and torch.equal(v_cache.double(), ref_v)
    out = torch.full_like(q, float("nan"))
    attend(q, k_cache, v_cache, meta, out=out)
    close(out, attention_reference(q, k_cache, v_cache, meta, spec), dtype)


def test_long_context_decode_takes_split_kv_and_matches(interp, close):
    spec = AttentionSpec(num_heads=4, num_kv_heads=1, head_size=64, dtype=torch.bfloat16, block_size=64)
    op = Attention.build(spec, interp, strict=True)
    q, _, _, k_cache, v_cache, meta = _batch(spec, [1, 1], [900, 600], seed=4)
    out = op(q, k_cache, v_cache, meta)
    close(out, attention_reference(q, k_cache, v_cache, meta, spec), torch.bfloat16)


def test_declared_limits_reject_with_reasons(interp):
    big = AttentionSpec(num_heads=2, num_kv_heads=1, head_size=512, dtype=torch.float16)
    op = Attention.build(big, interp)
    assert op.selection.fallback
    why = [c for c in op.selection.candidates if c.name == "triton-interpreter.attention"][0].reasons
    assert any("exceeds the maximum 256" in r for r in why)
    fp8 = AttentionSpec(num_heads=2, num_kv_heads=1, head_size=64, dtype=torch.float16,
                        kv_cache_dtype=torch.float8_e4m3fn)
    assert Attention.build(fp8, interp).selection.fallback
