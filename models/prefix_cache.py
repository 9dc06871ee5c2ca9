"""Automatic prefix caching: full KV blocks keyed by a chained content hash, shared by reference count.

A block that holds ``P`` computed tokens of a sequence gets a key::

    hash_i = sha256(hash_{i-1} | extra keys | the P token ids of block i)

so a key names the *whole prefix* up to the end of its block, not just the block's tokens: two sequences share
block ``i`` only if they agree on every token before it. ``extra keys`` name what else the KV depends on (the
model, its dtype, the block size, the KV layout...); two engines whose extras differ never share a key. The hash
is ``hashlib.sha256`` over a fixed byte encoding, so a key is the same in every process and on every machine
(Python's ``hash`` is salted per process and must never be used: the keys travel to other tiers and peers).

:class:`PrefixCachingAllocator` is a drop-in for :class:`~anyaccel.core.kv_cache.BlockAllocator` (``allocate``,
``free``, ``num_free``) that also remembers, for every block, the key of its content:

- :meth:`~PrefixCachingAllocator.match` finds the longest run of cached blocks for a sequence's keys and takes a
  reference on each (blocks are shared: nothing is ever written into a block whose key is registered);
- :meth:`~PrefixCachingAllocator.register` records a block's key once all its ``P`` tokens are computed;
- :meth:`~PrefixCachingAllocator.free` drops a reference; a block nobody references keeps its content and its key
  and becomes *evictable* (it still counts as free); when no never-used block is left, :meth:`allocate` takes the
  least recently used evictable block and forgets its key first.

A hit is capped below the sequence's length: the last token is always computed (its logits are needed), so a
prompt entirely cached still runs one token (vLLM's rule).
"""
from __future__ import annotations

import hashlib
import struct
from collections import OrderedDict
from dataclasses import dataclass
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

from ..core.errors import InvalidArgumentError
from ..core.kv_cache import OutOfBlocksError

__all__ = ["BlockHash", "block_hash", "hash_block_tokens", "engine_extra_keys", "PrefixCachingAllocator",
           "PrefixCacheStats"]

_OP = "prefix_cache"

#: a block key: 32 bytes of sha256
BlockHash = bytes

_ROOT = b"anyaccel-prefix-cache-v1"


def _encode_extra(extra: Sequence[object]) -> bytes:
    parts = []
    for x in extra:
        s = str(x).encode("utf-8")
        parts.append(struct.pack("<I", len(s)) + s)
    return b"".join(parts)


def block_hash(parent: Optional[BlockHash], token_ids: Sequence[int], extra: Sequence[object] = ()) -> BlockHash:
    """The key of one full block: sha256 over the parent's key (or a fixed root), the extra keys and the token
    ids (little-endian int64). Stable across processes and machines."""
    h = hashlib.sha256()
    h.update(parent if parent is not None else _ROOT)
    h.update(_encode_extra(extra))
    h.update(struct.pack(f"<{len(token_ids)}q", *token_ids))
    return h.digest()


def hash_block_tokens(token_ids: Sequence[int], block_size: int, extra: Sequence[object] = (),
                      hashes: Optional[List[BlockHash]] = None) -> List[BlockHash]:
    """Keys of every FULL block of ``token_ids`` (a partial last block has none).

    ``hashes``: the keys already computed for the first blocks of the same sequence; the chain continues from
    them (appended in place and returned), so a growing sequence hashes each block once.
    """
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
        raise InvalidArgumentError(_OP, "block_size", "an int >= 1", repr(block_size))
    out = hashes if hashes is not None else []
    parent = out[-1] if out else None
    P = block_size
    for i in range(len(out), len(token_ids) // P):
        parent = block_hash(parent, token_ids[i * P:(i + 1) * P], extra)
        out.append(parent)
    return out


def engine_extra_keys(model, block_size: int, model_key: Optional[str] = None) -> Tuple[str, ...]:
    """What a model's KV depends on besides the tokens, as strings: ``model_key`` (the checkpoint's name, when the
    caller knows one), the architecture and sizes, the compute dtype, and every layer's cache spec."""
    cfg = getattr(model, "config", None)
    parts = [f"model={model_key or ''}", f"arch={getattr(cfg, 'architecture', type(model).__name__)}",
             f"dtype={getattr(model, 'dtype', '')}", f"block={block_size}"]
    for f in ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads", "head_size", "max_position"):
        if cfg is not None and hasattr(cfg, f):
            parts.append(f"{f}={getattr(cfg, f)}")
    for i, s in enumerate(model.kv_cache_specs()):
        parts.append(f"layer{i}={s.num_kv_heads}x{s.head_size}:{s.cache_dtype}:w{s.sliding_window}")
    return tuple(parts)


@dataclass
class PrefixCacheStats:
    """Counters since the allocator was built: lookups (sequences admitted), the tokens they asked for and the
    tokens found cached, blocks registered and blocks evicted."""

    queries: int = 0
    query_tokens: int = 0
    hit_tokens: int = 0
    registered: int = 0
    evictions: int = 0

    @property
    def hit_rate(self) -> float:
        return self.hit_tokens / self.query_tokens if self.query_tokens else 0.0


class PrefixCachingAllocator:
    """A block allocator that keeps computed full blocks for reuse (see the module doc).

    ``num_free`` counts blocks with no reference: never used ones and evictable cached ones.
    """

    def __init__(self, num_blocks: int, block_size: int) -> None:
        if isinstance(num_blocks, bool) or not isinstance(num_blocks, int) or num_blocks < 0:
            raise InvalidArgumentError(_OP, "num_blocks", "a non-negative int", repr(num_blocks))
        if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
            raise InvalidArgumentError(_OP, "block_size", "an int >= 1", repr(block_size))
        self.num_blocks = num_blocks
        self.block_size = block_size
        self._empty: List[int] = list(range(num_blocks - 1, -1, -1))  # never used or forgotten; pop() gives 0 first
        self._evictable: "OrderedDict[int, None]" = OrderedDict()  # ref 0, key kept; oldest first
        self._ref: Dict[int, int] = {}
        self._key_of: Dict[int, BlockHash] = {}
        self._block_of: Dict[BlockHash, int] = {}
        self.stats = PrefixCacheStats()

    # -- the BlockAllocator interface -------------------------------------------------------------------------
    @property
    def num_free(self) -> int:
        return len(self._empty) + len(self._evictable)

    @property
    def num_used(self) -> int:
        return len(self._ref)

    @property
    def num_cached(self) -> int:
        """Blocks holding a registered key (in use or evictable)."""
        return len(self._key_of)

    def allocate(self, n: int) -> List[int]:
        """``n`` blocks for new content (reference 1 each); evicts LRU cached blocks when no empty block is left.
        All-or-nothing."""
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise InvalidArgumentError(_OP, "n", "a non-negative int", repr(n))
        if n > self.num_free:
            raise OutOfBlocksError(n, self.num_free, self.num_blocks)
        out = []
        for _ in range(n):
            if self._empty:
                b = self._empty.pop()
            else:
                b, _ = self._evictable.popitem(last=False)
                self._evict(b)
            self._ref[b] = 1
            out.append(b)
        return out

    def _evict(self, b: int) -> None:
        """Forget the key of block ``b`` (about to hold new content)."""
        key = self._key_of.pop(b, None)
        if key is not None and self._block_of.get(key) == b:
            del self._block_of[key]
        self.stats.evictions += 1

    def free(self, blocks: Iterable[int]) -> None:
        """Drop one reference on each block (a sequence finished or was preempted). A block nobody references
        becomes evictable if it has a key (most recently used last), empty otherwise. Validated first: an id not
        in use, or repeated, frees nothing."""
        blocks = list(blocks)
        seen = set()
        for b in blocks:
            if b not in self._ref:
                raise InvalidArgumentError(_OP, "blocks", "ids of blocks in use",
                                           f"{b!r}: not in use (double free or out of range)")
            if b in seen:
                raise InvalidArgumentError(_OP, "blocks", "each id once", f"{b} twice (double free)")
            seen.add(b)
        # The tail of a sequence is its least reusable part: free it first so it is evicted first.
        for b in reversed(blocks):
            r = self._ref[b] - 1
            if r:
                self._ref[b] = r
                continue
            del self._ref[b]
            if b in self._key_of:
                self._evictable[b] = None
            else:
                self._empty.append(b)

    # -- caching ----------------------------------------------------------------------------------------------
    def hash_blocks(self, token_ids: Sequence[int], extra: Sequence[object],
                    hashes: Optional[List[BlockHash]] = None) -> List[BlockHash]:
        """The keys of ``token_ids``' full blocks (:func:`hash_block_tokens`), continuing ``hashes`` in place."""
        return hash_block_tokens(token_ids, self.block_size, extra, hashes)

    def match(self, hashes: Sequence[BlockHash], num_tokens: int) -> List[int]:
        """The blocks of the longest cached prefix of ``hashes`` (the keys of a sequence of ``num_tokens`` tokens),
        capped so that at least the last token is left to compute; takes one reference on each."""
        limit = max(0, (num_tokens - 1) // self.block_size)
        out: List[int] = []
        for key in hashes[:limit]:
            b = self._block_of.get(key)
            if b is None:
                break
            out.append(b)
        for b in out:
            if b in self._evictable:
                del self._evictable[b]
                self._ref[b] = 1
            else:
                self._ref[b] += 1
        st = self.stats
        st.queries += 1
        st.query_tokens += num_tokens
        st.hit_tokens += len(out) * self.block_size
        return out

    def register(self, block: int, key: BlockHash) -> bool:
        """Record that ``block`` (in use) now holds the full content named ``key``. False (and nothing recorded)
        when another block already holds that key (two sequences computed the same prefix at once): this one
        stays private and is freed as usual."""
        if block not in self._ref:
            raise InvalidArgumentError(_OP, "block", "a block in use", repr(block))
        if key in self._block_of or block in self._key_of:
            return False
        self._block_of[key] = block
        self._key_of[block] = key
        self.stats.registered += 1
        return True

    def lookup(self, key: BlockHash) -> Optional[int]:
        """The block holding ``key``, or None (no reference taken)."""
        return self._block_of.get(key)

    def cached_keys(self) -> List[BlockHash]:
        """Every key held (for a router's index or a KV-transfer tier)."""
        return list(self._block_of)

    def reset(self) -> int:
        """Forget every evictable block's key (in-use blocks keep theirs); returns how many were dropped."""
        n = len(self._evictable)
        while self._evictable:
            b, _ = self._evictable.popitem(last=False)
            key = self._key_of.pop(b)
            if self._block_of.get(key) == b:
                del self._block_of[key]
            self._empty.append(b)
        return n

    def __repr__(self) -> str:
        return (f"PrefixCachingAllocator({self.num_free} of {self.num_blocks} free, {len(self._evictable)} of them "
                f"cached, {self.num_cached} cached in all)")
