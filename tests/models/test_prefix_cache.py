"""models.prefix_cache: chained block keys stable across processes, the ref-counted LRU block manager, and the
engine's prefix caching (hits, the last token always computed, off switch)."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from anyaccel.core.errors import InvalidArgumentError
from anyaccel.core.kv_cache import OutOfBlocksError
from anyaccel.models import build_model
from anyaccel.models.prefix_cache import PrefixCachingAllocator, block_hash, hash_block_tokens
from anyaccel.models.runner import Engine
from anyaccel.models.sampling import SamplingParams

P = 4
EXTRA = ("model=m", "dtype=torch.float32")


def test_keys_chain_over_the_prefix_and_the_extra_keys():
    toks = list(range(10, 22))  # 3 full blocks
    keys = hash_block_tokens(toks, P, EXTRA)
    assert len(keys) == 3 and len(set(keys)) == 3 and all(len(k) == 32 for k in keys)
    assert hash_block_tokens(toks + [1, 2], P, EXTRA) == keys  # a partial block has no key
    changed = hash_block_tokens([9] + toks[1:], P, EXTRA)  # first token differs: every later key differs
    assert all(a != b for a, b in zip(keys, changed))
    assert hash_block_tokens(toks, P, ("model=m", "dtype=torch.bfloat16")) != keys
    # the same block content after another prefix gets another key
    assert hash_block_tokens(toks[4:8], P, EXTRA)[0] != keys[1]
    # continuing a chain in place gives the keys of hashing everything at once
    part = hash_block_tokens(toks[:5], P, EXTRA)
    assert hash_block_tokens(toks, P, EXTRA, part) == keys and part == keys


def test_keys_are_stable_across_processes():
    code = ("from anyaccel.models.prefix_cache import hash_block_tokens;"
            "print(','.join(k.hex() for k in hash_block_tokens(list(range(10, 22)), 4, ('model=m', 'x'))))")
    outs = set()
    for seed in ("1", "2"):
        env = dict(os.environ, PYTHONHASHSEED=seed)
        outs.add(subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                                check=True).stdout.strip())
    here = ",".join(k.hex() for k in hash_block_tokens(list(range(10, 22)), 4, ("model=m", "x")))
    assert outs == {here}


def test_key_encoding_is_pinned():
    """A change of the byte encoding would silently invalidate every key stored on another tier."""
    import hashlib
    import struct

    h = hashlib.sha256(b"anyaccel-prefix-cache-v1" + struct.pack("<I", 1) + b"a" + struct.pack("<3q", 1, 2, 3))
    assert block_hash(None, [1, 2, 3], ("a",)) == h.digest()


def test_match_register_share_and_evict_lru():
    a = PrefixCachingAllocator(6, P)
    toks = list(range(100, 113))  # 3 full blocks + 1 token
    keys = hash_block_tokens(toks, P, EXTRA)
    blocks = a.allocate(4)
    assert a.match(keys, len(toks)) == []  # nothing registered yet
    for b, k in zip(blocks, keys):
        assert a.register(b, k)
    assert not a.register(a.allocate(1)[0], keys[0])  # a second block with the same key stays private
    # a second sequence shares the 3 cached blocks (13 tokens: the cap leaves token 12 to compute)
    hit = a.match(keys, len(toks))
    assert hit == blocks[:3] and a.num_free == 1
    # the whole of 12 tokens is cached, but the last token must be computed: 2 blocks only
    assert a.match(keys, 12) == blocks[:2]
    a.free(blocks[:2])
    a.free(hit)
    a.free(blocks)  # last reference: 3 keyed blocks turn evictable, the partial 4th goes back empty
    assert a.num_free == 5 and a.num_cached == 3
    # the empty blocks go first, then the evictable ones, least recently used (the tail) first
    got = a.allocate(3)
    assert blocks[3] in got and blocks[2] in got and a.lookup(keys[2]) is None
    assert a.lookup(keys[0]) == blocks[0] and a.stats.evictions == 1
    assert a.match(keys, len(toks)) == blocks[:2]  # the chain stops at the first evicted key
    with pytest.raises(OutOfBlocksError):
        a.allocate(3)


def test_free_validates():
    a = PrefixCachingAllocator(3, P)
    b = a.allocate(1)
    with pytest.raises(InvalidArgumentError):
        a.free(b + b)
    a.free(b)
    with pytest.raises(InvalidArgumentError, match="double free"):
        a.free(b)
    with pytest.raises(InvalidArgumentError):
        PrefixCachingAllocator(3, 0)


@pytest.fixture(scope="module")
def llama(cpu_backend, reference_models):
    return build_model(reference_models("llama"), cpu_backend, torch.float32, block_size=16)


def test_engine_reuses_a_shared_prefix(llama):
    g = torch.Generator().manual_seed(3)
    system = torch.randint(3, 160, (50,), generator=g).tolist()
    p1 = system + [5, 6, 7]
    p2 = system + [8, 9, 10, 11]
    params = SamplingParams(max_new_tokens=5, ignore_eos=True)
    cold = Engine(llama, num_blocks=32, prefix_caching=False)
    expected = [cold.generate([p], params)[0] for p in (p1, p2)]
    e = Engine(llama, num_blocks=32)  # on by default
    assert e.generate([p1], params)[0] == expected[0]
    assert e.stats.prefix_hit_tokens == 0
    assert e.generate([p2], params)[0] == expected[1]
    assert e.stats.prefix_hit_tokens == 48 and e.stats.prefill_tokens == len(p2) - 48
    # the whole prompt again: every full block hits, the last token is computed
    assert e.generate([p1[:48]], params)[0] == cold.generate([p1[:48]], params)[0]
    assert e.stats.prefix_hit_tokens == 32 and e.stats.prefill_tokens == 16
    assert e.prefix_cache.stats.hit_tokens == 80
    assert cold.prefix_cache is None and cold.stats.prefix_hit_tokens == 0


def test_engine_prefix_caching_argument(llama):
    with pytest.raises(InvalidArgumentError, match="prefix_caching"):
        Engine(llama, num_blocks=8, prefix_caching="yes")
    made = []

    def factory(n, p):
        made.append((n, p))
        return PrefixCachingAllocator(n, p)

    e = Engine(llama, num_blocks=8, prefix_caching=factory)
    assert made == [(8, 16)] and e.allocator is e.prefix_cache
    # the keys name the model: another checkpoint name gives other keys
    e2 = Engine(llama, num_blocks=8, prefix_cache_key="other")
    assert e2.prefix_extra_keys != e.prefix_extra_keys


def test_reset_forgets_unused_blocks_only():
    a = PrefixCachingAllocator(4, P)
    keys = hash_block_tokens(list(range(12)), P, EXTRA)
    blocks = a.allocate(3)
    for b, k in zip(blocks, keys):
        a.register(b, k)
    a.free(blocks[1:])
    assert a.reset() == 2 and a.num_cached == 1 and a.num_free == 3
    assert a.lookup(keys[0]) == blocks[0] and a.lookup(keys[1]) is None
