"""Prefix-cache mutants: block managers with one planted bug each, that the prefix-cache conformance
(:mod:`anyaccel.conformance.prefix_cache`) must catch in every dtype.

The bug lives in the runner's block manager, not in a kernel, so a mutant is a
:class:`~anyaccel.models.prefix_cache.PrefixCachingAllocator` subclass handed to the engine as its
``prefix_caching`` factory (the clean twin is the class itself). They are not in the kernel :data:`CATALOG`
(which holds backends); :data:`PREFIX_MUTANTS` lists them and tests/conformance/test_prefix_cache.py runs them.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Type

from ...models.prefix_cache import BlockHash, PrefixCachingAllocator, block_hash

__all__ = ["PREFIX_MUTANTS", "DESCRIPTIONS", "CLEAN"]


class UnchainedHash(PrefixCachingAllocator):
    """A block's key covers its own tokens only, not the prefix before it: equal blocks at other positions (or
    after another prefix) hit, and their K/V were rotated for other positions and attended to other tokens."""

    def hash_blocks(self, token_ids: Sequence[int], extra: Sequence[object],
                    hashes: Optional[List[BlockHash]] = None) -> List[BlockHash]:
        out = hashes if hashes is not None else []
        P = self.block_size
        for i in range(len(out), len(token_ids) // P):
            out.append(block_hash(None, token_ids[i * P:(i + 1) * P], extra))
        return out


class StaleKeyAfterEvict(PrefixCachingAllocator):
    """Eviction reuses the block but leaves its key in the table: a later lookup of the evicted prefix hits a
    block that now holds another sequence's K/V."""

    def _evict(self, b: int) -> None:
        self._key_of.pop(b, None)  # the key -> block entry stays
        self.stats.evictions += 1

    def match(self, hashes: Sequence[BlockHash], num_tokens: int) -> List[int]:
        for key in hashes:  # a stale entry may name a block that is empty again: take it out of the empty list
            b = self._block_of.get(key)
            if b is not None and b in self._empty:
                self._empty.remove(b)
                self._evictable[b] = None
        return super().match(hashes, num_tokens)


class HitWithoutReference(PrefixCachingAllocator):
    """A hit on a block some running sequence holds takes no reference of its own: when that sequence finishes
    the block turns evictable while the new one still reads it, and the next allocation overwrites it."""

    def match(self, hashes: Sequence[BlockHash], num_tokens: int) -> List[int]:
        limit = max(0, (num_tokens - 1) // self.block_size)
        out = []
        for key in hashes[:limit]:
            b = self._block_of.get(key)
            if b is None:
                break
            out.append(b)
        for b in out:
            if b in self._evictable:
                del self._evictable[b]
                self._ref[b] = 1
        self.stats.queries += 1
        self.stats.query_tokens += num_tokens
        self.stats.hit_tokens += len(out) * self.block_size
        return out

    def free(self, blocks) -> None:  # its own double frees would raise first; the bug is the missing reference
        super().free([b for b in blocks if b in self._ref])


CLEAN: Type[PrefixCachingAllocator] = PrefixCachingAllocator

#: mutant name -> block-manager class (a factory ``(num_blocks, block_size) -> allocator``)
PREFIX_MUTANTS: Dict[str, Type[PrefixCachingAllocator]] = {
    "prefix.unchained_hash": UnchainedHash,
    "prefix.stale_key_after_evict": StaleKeyAfterEvict,
    "prefix.hit_without_reference": HitWithoutReference,
}
DESCRIPTIONS: Dict[str, str] = {name: (cls.__doc__ or "").split("\n\n")[0] for name, cls in PREFIX_MUTANTS.items()}
