"""The paged KV cache: a block allocator, per-layer cache tensors, and per-sequence block tables.

Shape legend: B cache blocks, P block size, Hkv kv heads, D head size, S sequences, T tokens.

A cache block holds ``P`` consecutive positions of one sequence for every layer (each layer has its own
``k_cache``/``v_cache`` tensors, indexed by the same block ids). :class:`BlockAllocator` hands out block ids;
:class:`SequenceBlocks` grows one sequence's block list as tokens arrive and says which slots
(``block * P + offset``) the new tokens go to; :func:`build_metadata` packs a batch of sequences into the
:class:`~anyaccel.core.attention.AttentionMetadata` every layer shares.
"""
from __future__ import annotations

from typing import Dict, Iterable, List, Optional, Sequence, Tuple, Union

import torch

from .attention import AttentionMetadata, AttentionSpec, kv_cache_shape
from .errors import AnyaccelError, InvalidArgumentError

__all__ = [
    "OutOfBlocksError",
    "BlockAllocator",
    "PagedKVCache",
    "SequenceBlocks",
    "build_metadata",
    "kv_cache_bytes_per_block",
    "num_blocks_for_budget",
]

_OP = "kv_cache"


class OutOfBlocksError(AnyaccelError):
    """The allocator has fewer free blocks than requested; nothing was allocated."""

    def __init__(self, requested: int, free: int, total: int) -> None:
        self.requested, self.free, self.total = requested, free, total
        super().__init__(f"kv cache: requested {requested} blocks but only {free} of {total} are free; free "
                         f"finished sequences' blocks, preempt a sequence, or allocate a larger cache")


class BlockAllocator:
    """Hands out the block ids ``0 .. num_blocks-1``. All-or-nothing: a failed call changes nothing.

    Freed blocks are reused last-freed-first (their cache lines are the warmest).
    """

    __slots__ = ("num_blocks", "_free", "_used")

    def __init__(self, num_blocks: int) -> None:
        if isinstance(num_blocks, bool) or not isinstance(num_blocks, int) or num_blocks < 0:
            raise InvalidArgumentError(_OP, "num_blocks", "a non-negative int", repr(num_blocks))
        self.num_blocks = num_blocks
        self._free: List[int] = list(range(num_blocks - 1, -1, -1))  # a stack: pop() gives 0 first
        self._used: set = set()

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return len(self._used)

    def allocate(self, n: int) -> List[int]:
        """``n`` distinct free block ids; raises :class:`OutOfBlocksError` (changing nothing) if too few are free."""
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise InvalidArgumentError(_OP, "n", "a non-negative int", repr(n))
        if n > len(self._free):
            raise OutOfBlocksError(n, len(self._free), self.num_blocks)
        out = [self._free.pop() for _ in range(n)]
        self._used.update(out)
        return out

    def free(self, blocks: Iterable[int]) -> None:
        """Return ``blocks`` to the pool. Every id must be allocated and appear once; otherwise nothing is freed."""
        blocks = list(blocks)
        seen = set()
        for b in blocks:
            if b not in self._used:
                what = "a block id out of range" if not (isinstance(b, int) and 0 <= b < self.num_blocks) else (
                    "a block that is not allocated (double free?)")
                raise InvalidArgumentError(_OP, "blocks", "ids of allocated blocks", f"{b!r}: {what}")
            if b in seen:
                raise InvalidArgumentError(_OP, "blocks", "each id once", f"{b} twice (double free)")
            seen.add(b)
        self._used.difference_update(blocks)
        self._free.extend(reversed(blocks))

    def __repr__(self) -> str:
        return f"BlockAllocator({self.num_free} of {self.num_blocks} free)"


def kv_cache_bytes_per_block(specs: Union[AttentionSpec, Sequence[AttentionSpec]], num_layers: int = 1) -> int:
    """Bytes one block id costs across all layers (K and V). ``specs``: one spec per layer, or one spec used by
    ``num_layers`` layers."""
    if isinstance(specs, AttentionSpec):
        specs = [specs] * num_layers
    total = 0
    for s in specs:
        elem = torch.empty((), dtype=s.cache_dtype).element_size()
        total += 2 * s.block_size * s.num_kv_heads * s.head_size * elem
    return total


def num_blocks_for_budget(budget_bytes: int, specs: Union[AttentionSpec, Sequence[AttentionSpec]],
                          num_layers: int = 1) -> int:
    """How many blocks fit in ``budget_bytes`` (K and V of every layer)."""
    if isinstance(budget_bytes, bool) or not isinstance(budget_bytes, int) or budget_bytes < 0:
        raise InvalidArgumentError(_OP, "budget_bytes", "a non-negative int", repr(budget_bytes))
    per = kv_cache_bytes_per_block(specs, num_layers)
    return budget_bytes // per if per else 0


class PagedKVCache:
    """Zeroed ``(k_cache, v_cache)`` per layer, each of :func:`~anyaccel.core.attention.kv_cache_shape`, plus the
    allocator of their block ids."""

    def __init__(self, specs: Union[AttentionSpec, Sequence[AttentionSpec]], num_blocks: int, num_layers: int = 1,
                 device: Union[str, torch.device] = "cpu") -> None:
        if isinstance(specs, AttentionSpec):
            specs = [specs] * num_layers
        self.specs: List[AttentionSpec] = list(specs)
        if not self.specs:
            raise InvalidArgumentError(_OP, "specs", "at least one layer's AttentionSpec", "none")
        sizes = {s.block_size for s in self.specs}
        if len(sizes) != 1:
            raise InvalidArgumentError(_OP, "specs", "one block size for every layer", sorted(sizes))
        self.block_size = sizes.pop()
        self.num_blocks = num_blocks
        self.allocator = BlockAllocator(num_blocks)
        self.device = torch.device(device)
        self.layers: List[Tuple[torch.Tensor, torch.Tensor]] = []
        for s in self.specs:
            shape = kv_cache_shape(s, num_blocks)
            self.layers.append((torch.zeros(shape, dtype=s.cache_dtype, device=self.device),
                                torch.zeros(shape, dtype=s.cache_dtype, device=self.device)))

    @classmethod
    def for_budget(cls, budget_bytes: int, specs: Union[AttentionSpec, Sequence[AttentionSpec]], num_layers: int = 1,
                   device: Union[str, torch.device] = "cpu") -> "PagedKVCache":
        n = num_blocks_for_budget(budget_bytes, specs, num_layers)
        if n < 1:
            per = kv_cache_bytes_per_block(specs, num_layers)
            raise InvalidArgumentError(_OP, "budget_bytes", f">= one block ({per} bytes)", budget_bytes)
        return cls(specs, n, num_layers, device)

    def __len__(self) -> int:
        return len(self.layers)

    def __getitem__(self, layer: int) -> Tuple[torch.Tensor, torch.Tensor]:
        return self.layers[layer]

    @property
    def nbytes(self) -> int:
        return sum(k.numel() * k.element_size() + v.numel() * v.element_size() for k, v in self.layers)


class SequenceBlocks:
    """One sequence's blocks: grows as tokens are appended and maps positions to cache slots."""

    __slots__ = ("allocator", "block_size", "blocks", "num_tokens")

    def __init__(self, allocator: BlockAllocator, block_size: int) -> None:
        if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size <= 0:
            raise InvalidArgumentError(_OP, "block_size", "a positive int", repr(block_size))
        self.allocator = allocator
        self.block_size = block_size
        self.blocks: List[int] = []
        self.num_tokens = 0

    def blocks_needed(self, n: int) -> int:
        """Blocks :meth:`append` would allocate for ``n`` more tokens."""
        return max(0, -(-(self.num_tokens + n) // self.block_size) - len(self.blocks))

    def append(self, n: int) -> List[int]:
        """Reserve positions for ``n`` new tokens (allocating blocks as needed, all-or-nothing) and return their
        slots ``block * P + offset``."""
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise InvalidArgumentError(_OP, "n", "a non-negative int", repr(n))
        self.blocks.extend(self.allocator.allocate(self.blocks_needed(n)))
        start = self.num_tokens
        self.num_tokens += n
        return self.slots(start, self.num_tokens)

    def slots(self, start: int, stop: int) -> List[int]:
        P = self.block_size
        return [self.blocks[p // P] * P + p % P for p in range(start, stop)]

    def free(self) -> None:
        self.allocator.free(self.blocks)
        self.blocks = []
        self.num_tokens = 0


def build_metadata(seqs: Sequence[SequenceBlocks], query_lens: Sequence[int],
                   device: Union[str, torch.device] = "cpu") -> AttentionMetadata:
    """The batch of ``seqs`` whose last ``query_lens[i]`` tokens are new (already appended), with the slot mapping
    of those new tokens."""
    if len(seqs) != len(query_lens):
        raise InvalidArgumentError(_OP, "query_lens", f"{len(seqs)} lengths (one per sequence)", len(query_lens))
    if not seqs:
        raise InvalidArgumentError(_OP, "seqs", "at least one sequence", "none")
    P = seqs[0].block_size
    starts, lens, slots, rows = [0], [], [], []
    width = max(max(len(s.blocks) for s in seqs), 1)
    for s, q in zip(seqs, query_lens):
        starts.append(starts[-1] + q)
        lens.append(s.num_tokens)
        slots.extend(s.slots(s.num_tokens - q, s.num_tokens))
        rows.append(s.blocks + [0] * (width - len(s.blocks)))
    i32 = torch.int32
    dev = torch.device(device)
    return AttentionMetadata.build(torch.tensor(starts, dtype=i32, device=dev), torch.tensor(lens, dtype=i32,
                                   device=dev), torch.tensor(rows, dtype=i32, device=dev), P,
                                   slot_mapping=torch.tensor(slots, dtype=torch.int64, device=dev))
