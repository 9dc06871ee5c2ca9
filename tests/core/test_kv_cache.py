"""core/kv_cache.py: the block allocator, cache sizing, per-sequence block tables and batch metadata."""
from __future__ import annotations

import pytest
import torch

from anyaccel.core.attention import Attention, AttentionSpec, ReshapeAndCache, attention_reference
from anyaccel.core.errors import AnyaccelError, InvalidArgumentError
from anyaccel.core.kv_cache import (BlockAllocator, OutOfBlocksError, PagedKVCache, SequenceBlocks, build_metadata,
                                    kv_cache_bytes_per_block, num_blocks_for_budget)


def test_allocate_and_free_roundtrip():
    a = BlockAllocator(6)
    x = a.allocate(4)
    assert len(set(x)) == 4 and all(0 <= b < 6 for b in x)
    assert a.num_free == 2 and a.num_used == 4
    a.free(x[:2])
    assert a.num_free == 4
    y = a.allocate(4)
    assert set(y).isdisjoint(x[2:]) and len(set(y)) == 4
    assert a.allocate(0) == []


def test_exhaustion_raises_and_changes_nothing():
    a = BlockAllocator(3)
    held = a.allocate(2)
    with pytest.raises(OutOfBlocksError) as ei:
        a.allocate(2)
    assert isinstance(ei.value, AnyaccelError)
    assert (ei.value.requested, ei.value.free, ei.value.total) == (2, 1, 3)
    assert "requested 2 blocks but only 1 of 3" in str(ei.value)
    assert a.num_free == 1  # nothing was taken
    last = a.allocate(1)
    assert set(last).isdisjoint(held)
    with pytest.raises(OutOfBlocksError):
        a.allocate(1)


def test_double_free_and_foreign_ids_are_errors_without_side_effects():
    a = BlockAllocator(4)
    x = a.allocate(3)
    a.free([x[0]])
    with pytest.raises(InvalidArgumentError) as ei:
        a.free([x[1], x[0]])  # x[0] is already free: nothing at all may be freed
    assert ei.value.argument == "blocks" and "double free" in str(ei.value)
    assert a.num_free == 2
    with pytest.raises(InvalidArgumentError, match="twice"):
        a.free([x[1], x[1]])
    with pytest.raises(InvalidArgumentError, match="out of range"):
        a.free([17])
    assert a.num_free == 2
    a.free([x[1], x[2]])
    assert a.num_free == 4 and sorted(a.allocate(4)) == [0, 1, 2, 3]


@pytest.mark.parametrize("bad", [-1, 1.5, True])
def test_allocator_argument_checks(bad):
    with pytest.raises(InvalidArgumentError):
        BlockAllocator(bad)
    with pytest.raises(InvalidArgumentError):
        BlockAllocator(2).allocate(bad)


def test_sizing():
    s = AttentionSpec(8, 2, 64, torch.bfloat16, block_size=16)
    per = 2 * 16 * 2 * 64 * 2
    assert kv_cache_bytes_per_block(s) == per
    assert kv_cache_bytes_per_block(s, num_layers=3) == 3 * per
    mixed = [s, AttentionSpec(8, 2, 64, torch.bfloat16, block_size=16, kv_cache_dtype=torch.float32)]
    assert kv_cache_bytes_per_block(mixed) == per + 2 * per
    assert num_blocks_for_budget(10 * per + 5, s) == 10
    assert num_blocks_for_budget(10 * per, s, num_layers=2) == 5
    with pytest.raises(InvalidArgumentError):
        num_blocks_for_budget(-1, s)


@pytest.mark.parametrize("layout", ["NHD", "HND"])
def test_paged_kv_cache_allocates_layers(layout):
    s = AttentionSpec(4, 2, 8, torch.float16, block_size=4, kv_layout=layout)
    c = PagedKVCache(s, num_blocks=5, num_layers=3)
    assert len(c) == 3 and c.block_size == 4 and c.allocator.num_free == 5
    k, v = c[1]
    assert k.shape == ((5, 4, 2, 8) if layout == "NHD" else (5, 2, 4, 8)) and k.dtype == torch.float16
    assert k.data_ptr() != v.data_ptr() and not k.any()
    assert c.nbytes == 3 * kv_cache_bytes_per_block(s) * 5
    b = PagedKVCache.for_budget(kv_cache_bytes_per_block(s, 3) * 7 + 1, s, num_layers=3)
    assert b.num_blocks == 7
    with pytest.raises(InvalidArgumentError):
        PagedKVCache.for_budget(10, s, num_layers=3)
    with pytest.raises(InvalidArgumentError):
        PagedKVCache([s, AttentionSpec(4, 2, 8, block_size=8)], 2)


def test_sequence_blocks_slots():
    a = BlockAllocator(10)
    seq = SequenceBlocks(a, 4)
    slots = seq.append(6)
    assert len(seq.blocks) == 2 and seq.num_tokens == 6
    b0, b1 = seq.blocks
    assert slots == [b0 * 4, b0 * 4 + 1, b0 * 4 + 2, b0 * 4 + 3, b1 * 4, b1 * 4 + 1]
    assert seq.blocks_needed(2) == 0 and seq.blocks_needed(3) == 1
    assert seq.append(1) == [b1 * 4 + 2]
    seq.free()
    assert a.num_free == 10 and seq.blocks == [] and seq.num_tokens == 0


def test_sequence_blocks_out_of_blocks_keeps_state():
    a = BlockAllocator(2)
    seq = SequenceBlocks(a, 4)
    seq.append(5)
    with pytest.raises(OutOfBlocksError):
        seq.append(4)
    assert seq.num_tokens == 5 and len(seq.blocks) == 2


@pytest.mark.parametrize("layout", ["NHD", "HND"])
def test_paged_decode_equals_full_recompute(make_backend, layout):
    """Prefill two sequences, then decode them in one batch: every step equals a fresh prefill of the prefix."""
    spec = AttentionSpec(4, 2, 16, torch.float32, block_size=4, kv_layout=layout)
    be = make_backend(layout=layout)
    attn, write = Attention.build(spec, be), ReshapeAndCache.build(spec, be)
    cache = PagedKVCache(spec, num_blocks=12)
    kc, vc = cache[0]
    g = torch.Generator().manual_seed(0)
    lens = [7, 3]
    toks = {i: (torch.randn(12, 4, 16, generator=g), torch.randn(12, 2, 16, generator=g),
                torch.randn(12, 2, 16, generator=g)) for i in range(2)}
    seqs = [SequenceBlocks(cache.allocator, 4) for _ in lens]
    # step 1: prefill both
    for s, n in zip(seqs, lens):
        s.append(n)
    meta = build_metadata(seqs, lens)
    q = torch.cat([toks[i][0][:n] for i, n in enumerate(lens)])
    k = torch.cat([toks[i][1][:n] for i, n in enumerate(lens)])
    v = torch.cat([toks[i][2][:n] for i, n in enumerate(lens)])
    write(k, v, kc, vc, meta)
    attn(q, kc, vc, meta)
    # steps 2..4: decode both
    for step in range(3):
        for s in seqs:
            s.append(1)
        meta = build_metadata(seqs, [1, 1])
        pos = [s.num_tokens - 1 for s in seqs]
        q = torch.stack([toks[i][0][p] for i, p in enumerate(pos)])
        k = torch.stack([toks[i][1][p] for i, p in enumerate(pos)])
        v = torch.stack([toks[i][2][p] for i, p in enumerate(pos)])
        write(k, v, kc, vc, meta)
        out = attn(q, kc, vc, meta)
        for i, p in enumerate(pos):
            # a fresh cache holding only this prefix, prefilled at once
            fresh = PagedKVCache(spec, num_blocks=4)
            fs = SequenceBlocks(fresh.allocator, 4)
            fs.append(p + 1)
            fm = build_metadata([fs], [p + 1])
            fk, fv = fresh[0]
            write(toks[i][1][:p + 1], toks[i][2][:p + 1], fk, fv, fm)
            full = attn(toks[i][0][:p + 1], fk, fv, fm)
            torch.testing.assert_close(out[i], full[-1], rtol=1e-5, atol=1e-6)
            ref = attention_reference(q, kc, vc, meta, spec)
            torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-6)
    for s in seqs:
        s.free()
    assert cache.allocator.num_free == 12


def test_build_metadata_checks():
    a = BlockAllocator(4)
    s = SequenceBlocks(a, 4)
    s.append(3)
    with pytest.raises(InvalidArgumentError):
        build_metadata([s], [1, 1])
    with pytest.raises(InvalidArgumentError):
        build_metadata([], [])
    with pytest.raises(InvalidArgumentError) as ei:
        build_metadata([s], [4])  # more new tokens than the sequence holds
    assert ei.value.argument == "seq_lens"
    m = build_metadata([s], [2])
    assert m.slot_mapping.tolist() == s.slots(1, 3) and m.seq_lens_host == (3,)
