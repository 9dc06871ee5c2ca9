"""Attention family: one unified call over a paged KV cache (prefill, chunked prefill and decode in one batch),
and the KV write that fills the cache (``reshape_and_cache``).

Shape legend: T tokens of a batch (packed), S sequences, Hq query heads, Hkv kv heads, G = Hq // Hkv query heads
per kv head, D head size, B cache blocks, P block size, L a sequence's context length.

The contract (docs/op-contracts.md, "attention"), pinned so every backend computes the same thing:

- ``q [T, Hq, D]`` packs the new tokens of all sequences; ``query_start_loc [S+1]`` splits them per sequence.
- ``k_cache, v_cache`` are ``[B, P, Hkv, D]`` (layout ``NHD``) or ``[B, Hkv, P, D]`` (layout ``HND``);
  ``block_table [S, max_blocks]`` maps a sequence's i-th block of ``P`` positions to a cache block;
  ``seq_lens [S]`` is each sequence's total context *including* its new tokens, already written to the cache.
- A sequence's ``q_len`` new tokens are the LAST ``q_len`` positions of its context: query ``i`` sits at
  position ``seq_len - q_len + i``. Causal: key position <= query position. Window ``W``: keep keys with
  ``query_pos - key_pos < W``. Soft-cap: ``cap * tanh(score / cap)`` before the softmax. Bidirectional
  (``causal=False``): every query sees every key of its own sequence (a window still applies if set).
  Scale defaults to ``1 / sqrt(D)``.

Kernel contracts (what a backend's ``build(spec)`` returns)::

    attention kernel(q_THD, k_cache, v_cache, meta, out_THD) -> out_THD
    reshape_and_cache kernel(key_THD, value_THD, k_cache, v_cache, slot_mapping_T) -> None

``meta`` is an :class:`AttentionMetadata`, validated once per batch and shared by every layer; it carries host
copies of the lengths (so a kernel needs no device sync) and a ``scratch`` dict where a kernel may memoize what it
derives from the batch (gather indices, masks), keyed by its own name.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, FrozenSet, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from .dispatch import Op, OpCapability
from .errors import InvalidArgumentError
from .validation import FLOAT_DTYPES, INDEX_DTYPES, check_tensor, dtype_name

__all__ = [
    "ATTENTION_FEATURES",
    "AttentionSpec",
    "AttentionCapability",
    "AttentionMetadata",
    "Attention",
    "ReshapeAndCache",
    "attention_reference",
    "reshape_and_cache_reference",
    "kv_cache_shape",
    "gather_kv_reference",
]

#: Every feature a spec can ask for; a capability declares the subset it serves.
ATTENTION_FEATURES: FrozenSet[str] = frozenset(
    {"causal", "bidirectional", "sliding_window", "soft_cap", "gqa", "custom_scale"})

_LAYOUTS = ("NHD", "HND")


@dataclass(frozen=True)
class AttentionSpec:
    """An attention layer as it is built.

    :param num_heads: Hq, query heads.
    :param num_kv_heads: Hkv, key/value heads; ``num_heads % num_kv_heads == 0`` (GQA; 1 is MQA).
    :param head_size: D.
    :param dtype: dtype of ``q``, the new ``key``/``value`` and the output.
    :param block_size: P, cache positions per block.
    :param kv_cache_dtype: dtype of the caches; ``None`` means ``dtype``.
    :param kv_layout: ``"NHD"`` ([B, P, Hkv, D]) or ``"HND"`` ([B, Hkv, P, D]): the backend's declared layout.
    :param causal: ``False`` for encoders (every query sees its whole sequence).
    :param sliding_window: W; keys with ``query_pos - key_pos >= W`` are masked. ``None``: no window.
    :param soft_cap: logits become ``cap * tanh(score / cap)`` before the softmax. ``None``: no cap.
    :param scale: the softmax scale; ``None`` means ``1 / sqrt(head_size)``.
    """

    num_heads: int
    num_kv_heads: int
    head_size: int
    dtype: torch.dtype = torch.float32
    block_size: int = 16
    kv_cache_dtype: Optional[torch.dtype] = None
    kv_layout: str = "NHD"
    causal: bool = True
    sliding_window: Optional[int] = None
    soft_cap: Optional[float] = None
    scale: Optional[float] = None

    @property
    def cache_dtype(self) -> torch.dtype:
        return self.kv_cache_dtype if self.kv_cache_dtype is not None else self.dtype

    @property
    def softmax_scale(self) -> float:
        return float(self.scale) if self.scale is not None else 1.0 / math.sqrt(self.head_size)

    @property
    def num_queries_per_kv(self) -> int:
        return self.num_heads // self.num_kv_heads

    @property
    def features(self) -> FrozenSet[str]:
        """The features this spec needs, named as in :data:`ATTENTION_FEATURES`."""
        f = {"causal" if self.causal else "bidirectional"}
        if self.sliding_window is not None:
            f.add("sliding_window")
        if self.soft_cap is not None:
            f.add("soft_cap")
        if self.num_heads != self.num_kv_heads:
            f.add("gqa")
        if self.scale is not None:
            f.add("custom_scale")
        return frozenset(f)

    def __str__(self) -> str:
        extra = []
        if self.kv_cache_dtype is not None and self.kv_cache_dtype != self.dtype:
            extra.append(f"kv_cache_dtype={dtype_name(self.kv_cache_dtype)}")
        if self.sliding_window is not None:
            extra.append(f"window={self.sliding_window}")
        if self.soft_cap is not None:
            extra.append(f"soft_cap={self.soft_cap}")
        if self.scale is not None:
            extra.append(f"scale={self.scale}")
        tail = (", " + ", ".join(extra)) if extra else ""
        return (f"attention(Hq={self.num_heads}, Hkv={self.num_kv_heads}, D={self.head_size}, "
                f"dtype={dtype_name(self.dtype)}, P={self.block_size}, layout={self.kv_layout}, "
                f"{'causal' if self.causal else 'bidirectional'}{tail})")


def kv_cache_shape(spec: AttentionSpec, num_blocks: int) -> Tuple[int, int, int, int]:
    """The shape of one of a layer's two caches (K or V) with ``num_blocks`` blocks, in ``spec.kv_layout``."""
    if spec.kv_layout == "HND":
        return (num_blocks, spec.num_kv_heads, spec.block_size, spec.head_size)
    return (num_blocks, spec.block_size, spec.num_kv_heads, spec.head_size)


@dataclass(frozen=True)
class AttentionCapability(OpCapability):
    """What an attention kernel supports.

    :param head_sizes: the head sizes served; ``None`` means any (up to ``max_head_size``).
    :param max_head_size: the largest head size served; ``None`` means no limit.
    :param kv_cache_dtypes: cache dtypes served; ``None`` means "the same dtype as ``q`` only".
    :param block_sizes: block sizes served; ``None`` means any.
    :param kv_layouts: cache layouts served.
    :param features: the subset of :data:`ATTENTION_FEATURES` served.
    :param max_num_queries_per_kv: the largest GQA group ``Hq // Hkv`` served; ``None`` means any.
    """

    head_sizes: Optional[FrozenSet[int]] = None
    max_head_size: Optional[int] = None
    kv_cache_dtypes: Optional[FrozenSet[torch.dtype]] = None
    block_sizes: Optional[FrozenSet[int]] = None
    kv_layouts: FrozenSet[str] = frozenset(_LAYOUTS)
    features: FrozenSet[str] = ATTENTION_FEATURES
    max_num_queries_per_kv: Optional[int] = None

    def not_supported_reasons(self, spec: AttentionSpec) -> List[str]:
        reasons = super().not_supported_reasons(spec)
        d = spec.head_size
        if self.head_sizes is not None and d not in self.head_sizes:
            reasons.append(f"head_size {d} not in supported head sizes {sorted(self.head_sizes)}")
        if self.max_head_size is not None and d > self.max_head_size:
            reasons.append(f"head_size {d} exceeds the maximum {self.max_head_size}")
        cdt = spec.cache_dtype
        if self.kv_cache_dtypes is None:
            if cdt != spec.dtype:
                reasons.append(f"kv_cache_dtype {dtype_name(cdt)} differs from dtype {dtype_name(spec.dtype)}; "
                               f"only same-dtype caches are supported")
        elif cdt not in self.kv_cache_dtypes:
            names = ", ".join(sorted(dtype_name(x) for x in self.kv_cache_dtypes))
            reasons.append(f"kv_cache_dtype {dtype_name(cdt)} not in supported cache dtypes {{{names}}}")
        if self.block_sizes is not None and spec.block_size not in self.block_sizes:
            reasons.append(f"block_size {spec.block_size} not in supported block sizes {sorted(self.block_sizes)}")
        if spec.kv_layout not in self.kv_layouts:
            reasons.append(f"kv_layout {spec.kv_layout} not in supported layouts {sorted(self.kv_layouts)}")
        missing = sorted(spec.features - self.features)
        if missing:
            reasons.append(f"feature(s) {', '.join(missing)} not supported (supported: {sorted(self.features)})")
        g = spec.num_heads // max(spec.num_kv_heads, 1)
        if self.max_num_queries_per_kv is not None and g > self.max_num_queries_per_kv:
            reasons.append(f"{g} query heads per kv head exceeds the maximum {self.max_num_queries_per_kv}")
        return reasons


# -- batch metadata ------------------------------------------------------------------------------------------------

_META_OP = "attention_metadata"


def _check_index_tensor(name: str, t: object, ndim: int, dims: str, device: Optional[torch.device]) -> None:
    check_tensor(_META_OP, name, t, ndim=ndim, dims=dims, dtypes=INDEX_DTYPES, device=device)


def _check_slots(slot_mapping: torch.Tensor) -> Tuple[int, int]:
    """``(max_slot, num_padding)`` of a non-empty ``slot_mapping``, from one host copy; raises when two tokens
    write the same slot (negative slots are padding and may repeat)."""
    host = slot_mapping if slot_mapping.device.type == "cpu" else slot_mapping.cpu()
    n = host.numel()
    if n <= 64:  # a decode batch: plain ints beat a sort's fixed cost
        vals = host.tolist()
        live = [v for v in vals if v >= 0]
        if len(set(live)) == len(live):
            return max(vals + [-1]), n - len(live)
    else:  # a prefill batch: one numpy sort (several times faster than torch's on the host); padding sorts first
        srt = np.sort(host.numpy())
        pad = int(np.searchsorted(srt, 0))
        live = srt[pad:]
        if not (live.size > 1 and bool((live[1:] == live[:-1]).any())):
            return (int(srt[-1]) if live.size else -1), pad
        vals = host.tolist()
    seen: Dict[int, int] = {}
    for t, v in enumerate(vals):
        if v >= 0:
            if v in seen:
                raise InvalidArgumentError(_META_OP, "slot_mapping", "distinct slots (one cache slot per new token; "
                                           "negative values are padding)",
                                           f"slot_mapping[{seen[v]}] = slot_mapping[{t}] = {v}",
                                           "Two tokens would write the same cache slot")
            seen[v] = t
    raise AssertionError("unreachable: a duplicate slot was found but not located")  # pragma: no cover


@dataclass(frozen=True)
class AttentionMetadata:
    """One batch's layout of sequences over the paged cache, validated once and shared by every layer.

    Build it with :meth:`build`. Besides the device tensors it keeps host-side facts, so per-call checks and
    kernels need no device sync:

    :param query_start_loc: ``[S+1]`` offsets of each sequence's new tokens in the packed batch.
    :param seq_lens: ``[S]`` each sequence's context length including its new tokens.
    :param block_table: ``[S, max_blocks]`` cache block of each sequence's i-th block.
    :param block_size: P.
    :param slot_mapping: ``[T]`` cache slot (``block * P + offset``) each new token is written to; negative
        means padding (skipped). ``None`` when the batch writes nothing.
    :param query_starts_host, query_lens_host, seq_lens_host: host copies (tuples of ints).
    :param max_block_index: the largest block id any sequence uses (``-1`` if none); must be ``< B``.
    :param max_slot: the largest slot in ``slot_mapping`` (``-1`` if none or all padding); must be ``< B * P``.
    :param scratch: per-batch memo for kernels (``meta.scratch[kernel_name] = ...``); not part of equality.
    """

    query_start_loc: torch.Tensor
    seq_lens: torch.Tensor
    block_table: torch.Tensor
    block_size: int
    slot_mapping: Optional[torch.Tensor]
    num_seqs: int
    num_tokens: int
    max_query_len: int
    max_seq_len: int
    max_block_index: int
    max_slot: int
    num_padding_slots: int
    query_starts_host: Tuple[int, ...]
    query_lens_host: Tuple[int, ...]
    seq_lens_host: Tuple[int, ...]
    scratch: Dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    @property
    def device(self) -> torch.device:
        return self.seq_lens.device

    @property
    def is_pure_decode(self) -> bool:
        """Every sequence has exactly one new token."""
        return self.max_query_len == 1 and all(n == 1 for n in self.query_lens_host)

    @classmethod
    def build(cls, query_start_loc: torch.Tensor, seq_lens: torch.Tensor, block_table: torch.Tensor,
              block_size: int, slot_mapping: Optional[torch.Tensor] = None) -> "AttentionMetadata":
        """Validate one batch's layout (shapes, dtypes, devices and values) and keep its host-side facts.

        Raises :class:`InvalidArgumentError` naming the argument for: wrong rank/dtype/device, mismatched
        numbers of sequences, ``query_start_loc`` not starting at 0 or decreasing, a negative ``seq_len``,
        ``q_len > seq_len``, a sequence needing more blocks than its ``block_table`` row has, a negative block id
        among the blocks a sequence uses, ``slot_mapping`` not ``[T]``, two tokens of ``slot_mapping`` writing
        the same slot (a race on a parallel device, and one token's K/V silently lost).

        Memory layout: kernels index these four tensors as dense arrays (a raw pointer plus an index), so a strided
        view would make them read the wrong sequences' lengths, blocks or slots, or past the allocation. Each
        non-contiguous one is therefore **copied to a contiguous tensor here** (once per batch; they are small
        index tensors) and the metadata keeps the copy: every kernel receives contiguous index tensors.

        Cost: the host copies of ``query_start_loc``/``seq_lens`` and one host copy of ``slot_mapping`` (the
        range, padding and duplicate checks run on it), once per batch; per-layer calls compare only the kept
        ``max_block_index``/``max_slot`` with the cache size.
        """
        if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size <= 0:
            raise InvalidArgumentError(_META_OP, "block_size", "a positive int", repr(block_size))
        _check_index_tensor("seq_lens", seq_lens, 1, "S", None)
        dev = seq_lens.device
        num_seqs = seq_lens.shape[0]
        check_tensor(_META_OP, "query_start_loc", query_start_loc, shape=(num_seqs + 1,), dims="S+1",
                     dtypes=INDEX_DTYPES, device=dev)
        check_tensor(_META_OP, "block_table", block_table, ndim=2, dims="S, max_blocks", dtypes=INDEX_DTYPES,
                     device=dev)
        if block_table.shape[0] != num_seqs:
            raise InvalidArgumentError(_META_OP, "block_table", f"{num_seqs} rows (one per sequence in seq_lens)",
                                       f"shape {list(block_table.shape)}")
        # dense copies of strided views: kernels index these with a pointer and an offset (see the docstring)
        if not query_start_loc.is_contiguous():
            query_start_loc = query_start_loc.contiguous()
        if not seq_lens.is_contiguous():
            seq_lens = seq_lens.contiguous()
        if not block_table.is_contiguous():
            block_table = block_table.contiguous()
        starts = [int(x) for x in query_start_loc.tolist()]
        lens = [int(x) for x in seq_lens.tolist()]
        if starts[0] != 0:
            raise InvalidArgumentError(_META_OP, "query_start_loc", "query_start_loc[0] == 0", starts[0])
        q_lens = [starts[i + 1] - starts[i] for i in range(num_seqs)]
        for i, n in enumerate(q_lens):
            if n < 0:
                raise InvalidArgumentError(_META_OP, "query_start_loc", "non-decreasing offsets",
                                           f"query_start_loc[{i}] = {starts[i]} > query_start_loc[{i + 1}] = "
                                           f"{starts[i + 1]}")
        for i, (n, L) in enumerate(zip(q_lens, lens)):
            if L < 0:
                raise InvalidArgumentError(_META_OP, "seq_lens", "non-negative lengths", f"seq_lens[{i}] = {L}")
            if n > L:
                raise InvalidArgumentError(_META_OP, "seq_lens",
                                           f"seq_lens[{i}] >= its query length {n} (the new tokens are part of the "
                                           f"context)", f"seq_lens[{i}] = {L}")
        max_blocks = block_table.shape[1]
        need = [-(-L // block_size) for L in lens]
        for i, nb in enumerate(need):
            if nb > max_blocks:
                raise InvalidArgumentError(_META_OP, "block_table",
                                           f"at least {nb} blocks per row for seq_lens[{i}] = {lens[i]} with "
                                           f"block_size {block_size}",
                                           f"shape {list(block_table.shape)} (sequence {i} does not fit its blocks)")
        max_block = -1
        if num_seqs and max(need) > 0:
            cols = torch.arange(max_blocks, device=dev)
            need_t = torch.tensor(need, device=dev)
            used = cols.unsqueeze(0) < need_t.unsqueeze(1)  # [S, max_blocks]
            if used.any():
                vals = block_table[used]
                lo = int(vals.min())
                if lo < 0:
                    bad = (block_table < 0) & used
                    s, j = (int(v) for v in bad.nonzero()[0].tolist())
                    raise InvalidArgumentError(_META_OP, "block_table", "non-negative block ids in the blocks a "
                                               "sequence uses", f"block_table[{s}, {j}] = {lo}")
                max_block = int(vals.max())
        num_tokens = starts[-1]
        max_slot = -1
        num_pad = 0
        if slot_mapping is not None:
            check_tensor(_META_OP, "slot_mapping", slot_mapping, shape=(num_tokens,), dims="T", dtypes=INDEX_DTYPES,
                         device=dev)
            if not slot_mapping.is_contiguous():
                slot_mapping = slot_mapping.contiguous()
            if num_tokens:
                max_slot, num_pad = _check_slots(slot_mapping)
        return cls(query_start_loc=query_start_loc, seq_lens=seq_lens, block_table=block_table,
                   block_size=block_size, slot_mapping=slot_mapping, num_seqs=num_seqs, num_tokens=num_tokens,
                   max_query_len=max(q_lens, default=0), max_seq_len=max(lens, default=0),
                   max_block_index=max_block, max_slot=max_slot, num_padding_slots=num_pad,
                   query_starts_host=tuple(starts), query_lens_host=tuple(q_lens), seq_lens_host=tuple(lens))


    @classmethod
    def from_host(cls, query_start_loc: Sequence[int], seq_lens: Sequence[int],
                  block_table: Sequence[Sequence[int]], block_size: int,
                  slot_mapping: Optional[Sequence[int]] = None, *, device: Union[str, torch.device, None] = None,
                  tensors: Optional[Tuple[torch.Tensor, torch.Tensor, torch.Tensor, Optional[torch.Tensor]]] = None
                  ) -> "AttentionMetadata":
        """The same metadata as :meth:`build`, from host lists of ints: validated on the host, no device sync.

        The engine knows every value before the step runs; :meth:`build` would copy the uploaded tensors back to
        the host to check them. Here the checks (the same errors as :meth:`build`) run on the lists, and the
        tensors are either uploaded in ONE transfer (``tensors=None``: a packed host buffer to ``device``, then
        views; ``query_start_loc``, ``seq_lens`` and ``block_table`` int32, ``slot_mapping`` int64), or given by
        the caller as ``tensors = (query_start_loc, seq_lens, block_table, slot_mapping)`` already on the device
        (a caller that packs its other step inputs into the same transfer). Given tensors must hold exactly the
        listed values: their shapes, dtypes and devices are checked, their values are not (that would be the
        sync this avoids).

        :param block_table: ``S`` rows of equal length (pad with any non-negative id past a sequence's blocks).
        """
        if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size <= 0:
            raise InvalidArgumentError(_META_OP, "block_size", "a positive int", repr(block_size))
        starts = [int(x) for x in query_start_loc]
        lens = [int(x) for x in seq_lens]
        rows = [list(r) for r in block_table]
        num_seqs = len(lens)
        if len(starts) != num_seqs + 1:
            raise InvalidArgumentError(_META_OP, "query_start_loc", f"{num_seqs + 1} offsets (S+1)", len(starts))
        if len(rows) != num_seqs:
            raise InvalidArgumentError(_META_OP, "block_table", f"{num_seqs} rows (one per sequence in seq_lens)",
                                       f"{len(rows)} rows")
        max_blocks = len(rows[0]) if rows else 0
        for i, r in enumerate(rows):
            if len(r) != max_blocks:
                raise InvalidArgumentError(_META_OP, "block_table", f"rows of equal length {max_blocks}",
                                           f"row {i} of length {len(r)}")
        if starts[0] != 0:
            raise InvalidArgumentError(_META_OP, "query_start_loc", "query_start_loc[0] == 0", starts[0])
        q_lens = [starts[i + 1] - starts[i] for i in range(num_seqs)]
        max_block = -1
        for i, (n, L) in enumerate(zip(q_lens, lens)):
            if n < 0:
                raise InvalidArgumentError(_META_OP, "query_start_loc", "non-decreasing offsets",
                                           f"query_start_loc[{i}] = {starts[i]} > query_start_loc[{i + 1}] = "
                                           f"{starts[i + 1]}")
            if L < 0:
                raise InvalidArgumentError(_META_OP, "seq_lens", "non-negative lengths", f"seq_lens[{i}] = {L}")
            if n > L:
                raise InvalidArgumentError(_META_OP, "seq_lens",
                                           f"seq_lens[{i}] >= its query length {n} (the new tokens are part of the "
                                           f"context)", f"seq_lens[{i}] = {L}")
            nb = -(-L // block_size)
            if nb > max_blocks:
                raise InvalidArgumentError(_META_OP, "block_table",
                                           f"at least {nb} blocks per row for seq_lens[{i}] = {L} with "
                                           f"block_size {block_size}",
                                           f"shape {[num_seqs, max_blocks]} (sequence {i} does not fit its blocks)")
            if nb:
                used = rows[i][:nb]
                lo = min(used)
                if lo < 0:
                    j = used.index(lo)
                    raise InvalidArgumentError(_META_OP, "block_table", "non-negative block ids in the blocks a "
                                               "sequence uses", f"block_table[{i}, {j}] = {lo}")
                max_block = max(max_block, max(used))
        num_tokens = starts[-1]
        max_slot, num_pad = -1, 0
        slots = None
        if slot_mapping is not None:
            slots = [int(x) for x in slot_mapping]
            if len(slots) != num_tokens:
                raise InvalidArgumentError(_META_OP, "slot_mapping", f"shape [{num_tokens}] (T)",
                                           f"shape [{len(slots)}]")
            live = [v for v in slots if v >= 0]
            if len(set(live)) != len(live):
                seen: Dict[int, int] = {}
                for t, v in enumerate(slots):
                    if v >= 0 and v in seen:
                        raise InvalidArgumentError(_META_OP, "slot_mapping", "distinct slots (one cache slot per new "
                                                   "token; negative values are padding)",
                                                   f"slot_mapping[{seen[v]}] = slot_mapping[{t}] = {v}",
                                                   "Two tokens would write the same cache slot")
                    seen.setdefault(v, t)
            max_slot, num_pad = max(slots, default=-1), num_tokens - len(live)
        if tensors is None:
            dev = torch.device(device) if device is not None else torch.device("cpu")
            flat = starts + lens + [b for r in rows for b in r]
            packed = torch.tensor(flat, dtype=torch.int32)
            if dev.type != "cpu":
                packed = packed.to(dev)
            qsl_t = packed[:num_seqs + 1]
            lens_t = packed[num_seqs + 1:2 * num_seqs + 1]
            table_t = packed[2 * num_seqs + 1:].view(num_seqs, max_blocks)
            slots_t = None if slots is None else torch.tensor(slots, dtype=torch.int64, device=dev)
        else:
            qsl_t, lens_t, table_t, slots_t = tensors
            dev = lens_t.device
            check_tensor(_META_OP, "query_start_loc", qsl_t, shape=(num_seqs + 1,), dims="S+1", dtypes=INDEX_DTYPES,
                         device=dev)
            check_tensor(_META_OP, "seq_lens", lens_t, shape=(num_seqs,), dims="S", dtypes=INDEX_DTYPES, device=dev)
            check_tensor(_META_OP, "block_table", table_t, shape=(num_seqs, max_blocks), dims="S, max_blocks",
                         dtypes=INDEX_DTYPES, device=dev)
            for name, t in (("query_start_loc", qsl_t), ("seq_lens", lens_t), ("block_table", table_t)):
                if not t.is_contiguous():
                    raise InvalidArgumentError(_META_OP, name, "a contiguous tensor", "a strided view")
            if (slots is None) != (slots_t is None):
                raise InvalidArgumentError(_META_OP, "tensors", "a slot_mapping tensor exactly when slot_mapping is "
                                           "given", "one without the other")
            if slots_t is not None:
                check_tensor(_META_OP, "slot_mapping", slots_t, shape=(num_tokens,), dims="T", dtypes=INDEX_DTYPES,
                             device=dev)
                if not slots_t.is_contiguous():
                    raise InvalidArgumentError(_META_OP, "slot_mapping", "a contiguous tensor", "a strided view")
        return cls(query_start_loc=qsl_t, seq_lens=lens_t, block_table=table_t, block_size=block_size,
                   slot_mapping=slots_t, num_seqs=num_seqs, num_tokens=num_tokens,
                   max_query_len=max(q_lens, default=0), max_seq_len=max(lens, default=0),
                   max_block_index=max_block, max_slot=max_slot, num_padding_slots=num_pad,
                   query_starts_host=tuple(starts), query_lens_host=tuple(q_lens), seq_lens_host=tuple(lens))


# -- references (float64 oracles) --------------------------------------------------------------------------------

def gather_kv_reference(cache: torch.Tensor, block_table_row: Sequence[int], length: int, block_size: int,
                        layout: str) -> torch.Tensor:
    """Positions ``0 .. length-1`` of one sequence from a paged cache, as ``[L, Hkv, D]`` (a copy)."""
    if length == 0:
        hkv, d = (cache.shape[2], cache.shape[3]) if layout == "NHD" else (cache.shape[1], cache.shape[3])
        return cache.new_empty((0, hkv, d))
    rows = []
    for pos in range(length):
        blk = int(block_table_row[pos // block_size])
        off = pos % block_size
        rows.append(cache[blk, off] if layout == "NHD" else cache[blk, :, off])
    return torch.stack(rows)


def attention_reference(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttentionMetadata,
                        spec: AttentionSpec) -> torch.Tensor:
    """The float64 oracle: ``[T, Hq, D]`` in float64, one sequence at a time, with an explicit mask per pair."""
    hq, hkv, d = spec.num_heads, spec.num_kv_heads, spec.head_size
    g = hq // hkv
    scale = spec.softmax_scale
    out = torch.zeros(q.shape[0], hq, d, dtype=torch.float64, device=q.device)
    table = meta.block_table.tolist()
    for s in range(meta.num_seqs):
        q_len, seq_len, start = meta.query_lens_host[s], meta.seq_lens_host[s], meta.query_starts_host[s]
        if q_len == 0:
            continue
        k_LHD = gather_kv_reference(k_cache, table[s], seq_len, meta.block_size, spec.kv_layout).double()
        v_LHD = gather_kv_reference(v_cache, table[s], seq_len, meta.block_size, spec.kv_layout).double()
        q_QHD = q[start:start + q_len].double()
        q_pos = torch.arange(seq_len - q_len, seq_len, device=q.device).unsqueeze(1)  # [Q, 1]
        k_pos = torch.arange(seq_len, device=q.device).unsqueeze(0)  # [1, L]
        allowed_QL = torch.ones(q_len, seq_len, dtype=torch.bool, device=q.device)
        if spec.causal:
            allowed_QL &= k_pos <= q_pos
        if spec.sliding_window is not None:
            allowed_QL &= (q_pos - k_pos) < spec.sliding_window
        for h in range(hq):
            kh = h // g
            scores_QL = (q_QHD[:, h, :] @ k_LHD[:, kh, :].T) * scale
            if spec.soft_cap is not None:
                scores_QL = spec.soft_cap * torch.tanh(scores_QL / spec.soft_cap)
            scores_QL = scores_QL.masked_fill(~allowed_QL, float("-inf"))
            probs_QL = torch.softmax(scores_QL, dim=-1)
            out[start:start + q_len, h, :] = probs_QL @ v_LHD[:, kh, :]
    return out


def reshape_and_cache_reference(key: torch.Tensor, value: torch.Tensor, k_cache: torch.Tensor,
                                v_cache: torch.Tensor, slot_mapping: torch.Tensor, layout: str = "NHD"
                                ) -> Tuple[torch.Tensor, torch.Tensor]:
    """Float64 copies of both caches after writing token ``t`` to slot ``slot_mapping[t]`` (negative: skipped)."""
    kc, vc = k_cache.double().clone(), v_cache.double().clone()
    p = kc.shape[1] if layout == "NHD" else kc.shape[2]
    for t, slot in enumerate(slot_mapping.tolist()):
        if slot < 0:
            continue
        blk, off = slot // p, slot % p
        if layout == "NHD":
            kc[blk, off] = key[t].double()
            vc[blk, off] = value[t].double()
        else:
            kc[blk, :, off] = key[t].double()
            vc[blk, :, off] = value[t].double()
    return kc, vc


# -- native kernels (the core's own torch implementation) --------------------------------------------------------

def _native_attention(spec: AttentionSpec) -> Callable:
    hq, hkv, d = spec.num_heads, spec.num_kv_heads, spec.head_size
    g = hq // hkv
    scale = spec.softmax_scale
    cap, window, causal, layout = spec.soft_cap, spec.sliding_window, spec.causal, spec.kv_layout
    dt = spec.dtype
    q_chunk = 512

    def attention_native(q_THD, k_cache, v_cache, meta, out_THD):
        P = meta.block_size
        for s in range(meta.num_seqs):
            q_len, seq_len, start = meta.query_lens_host[s], meta.seq_lens_host[s], meta.query_starts_host[s]
            if q_len == 0:
                continue
            ctx0 = seq_len - q_len
            k_lo = max(0, ctx0 - window + 1) if window is not None else 0
            b_lo, b_hi = k_lo // P, -(-seq_len // P)
            blocks = meta.block_table[s, b_lo:b_hi].long()
            if layout == "NHD":
                k_LHD = k_cache.index_select(0, blocks).flatten(0, 1)
                v_LHD = v_cache.index_select(0, blocks).flatten(0, 1)
            else:
                k_LHD = k_cache.index_select(0, blocks).transpose(1, 2).flatten(0, 1)
                v_LHD = v_cache.index_select(0, blocks).transpose(1, 2).flatten(0, 1)
            off = k_lo - b_lo * P
            L = seq_len - k_lo
            k_HLD = k_LHD[off:off + L].to(torch.float32).transpose(0, 1)  # [Hkv, L, D]
            v_HLD = v_LHD[off:off + L].to(torch.float32).transpose(0, 1)
            k_pos = torch.arange(k_lo, seq_len, device=q_THD.device)
            for c0 in range(0, q_len, q_chunk):
                c1 = min(q_len, c0 + q_chunk)
                n = c1 - c0
                q_HGnD = q_THD[start + c0:start + c1].to(torch.float32).view(n, hkv, g, d).permute(1, 2, 0, 3)
                scores = torch.matmul(q_HGnD.reshape(hkv, g * n, d), k_HLD.transpose(1, 2)) * scale  # [Hkv, G*n, L]
                if cap is not None:
                    scores = torch.tanh(scores / cap) * cap
                q_pos = torch.arange(ctx0 + c0, ctx0 + c1, device=q_THD.device).unsqueeze(1)
                allowed = torch.ones(n, L, dtype=torch.bool, device=q_THD.device)
                if causal:
                    allowed &= k_pos.unsqueeze(0) <= q_pos
                if window is not None:
                    allowed &= (q_pos - k_pos.unsqueeze(0)) < window
                scores = scores.view(hkv, g, n, L).masked_fill(~allowed, float("-inf"))
                probs = torch.softmax(scores, dim=-1).view(hkv, g * n, L)
                o = torch.matmul(probs, v_HLD).view(hkv, g, n, d).permute(2, 0, 1, 3)  # [n, Hkv, G, D]
                out_THD[start + c0:start + c1].copy_(o.reshape(n, hq, d).to(dt))
        return out_THD

    return attention_native


def _native_reshape_and_cache(spec: AttentionSpec) -> Callable:
    layout = spec.kv_layout

    def reshape_and_cache_native(key_THD, value_THD, k_cache, v_cache, slot_mapping_T):
        keep = slot_mapping_T >= 0
        slots = slot_mapping_T[keep].long()
        P = k_cache.shape[1] if layout == "NHD" else k_cache.shape[2]
        blk, off = slots // P, slots % P
        key, value = key_THD[keep].to(k_cache.dtype), value_THD[keep].to(v_cache.dtype)
        if layout == "NHD":
            k_cache[blk, off] = key
            v_cache[blk, off] = value
        else:
            k_cache[blk, :, off] = key
            v_cache[blk, :, off] = value

    return reshape_and_cache_native


# -- the ops -----------------------------------------------------------------------------------------------------

def _check_attention_spec(op: str, spec: AttentionSpec) -> None:
    if spec.dtype not in FLOAT_DTYPES:
        raise InvalidArgumentError(op, "spec.dtype", "one of float32, float16, bfloat16", dtype_name(spec.dtype))
    kcd = spec.kv_cache_dtype
    if kcd is not None and not (isinstance(kcd, torch.dtype) and kcd.is_floating_point):
        # an integer cache holds no scale: the native fallback would silently truncate K and V to integers
        raise InvalidArgumentError(op, "spec.kv_cache_dtype", "a floating torch.dtype or None", repr(kcd))
    if not isinstance(spec.causal, bool):
        raise InvalidArgumentError(op, "spec.causal", "a bool", repr(spec.causal))
    for name in ("num_heads", "num_kv_heads", "head_size", "block_size"):
        v = getattr(spec, name)
        if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
            raise InvalidArgumentError(op, f"spec.{name}", "a positive int", repr(v))
    if spec.num_heads % spec.num_kv_heads != 0:
        raise InvalidArgumentError(op, "spec.num_kv_heads", f"a divisor of num_heads = {spec.num_heads}",
                                   spec.num_kv_heads, "Each kv head serves num_heads // num_kv_heads query heads")
    if spec.kv_layout not in _LAYOUTS:
        raise InvalidArgumentError(op, "spec.kv_layout", f"one of {_LAYOUTS}", repr(spec.kv_layout))
    w = spec.sliding_window
    if w is not None and (isinstance(w, bool) or not isinstance(w, int) or w < 1):
        raise InvalidArgumentError(op, "spec.sliding_window", "an int >= 1 or None", repr(w))
    c = spec.soft_cap
    if c is not None and (isinstance(c, bool) or not isinstance(c, (int, float)) or not c > 0
                          or not math.isfinite(c)):
        raise InvalidArgumentError(op, "spec.soft_cap", "a finite number > 0 or None", repr(c))
    sc = spec.scale
    if sc is not None and (isinstance(sc, bool) or not isinstance(sc, (int, float)) or not sc > 0
                           or not math.isfinite(sc)):
        raise InvalidArgumentError(op, "spec.scale", "a finite number > 0 or None", repr(sc))


def _cache_dims(spec: AttentionSpec) -> str:
    return "B, P, Hkv, D" if spec.kv_layout == "NHD" else "B, Hkv, P, D"


class _PagedOp(Op):
    """Shared per-call checks of the two ops that touch the paged caches."""

    __slots__ = ("_dt", "_cdt", "_hq", "_hkv", "_d", "_p", "_cache_tail")

    @classmethod
    def check_spec(cls, spec: AttentionSpec) -> None:
        _check_attention_spec(cls.name, spec)

    def __init__(self, spec: AttentionSpec, kernel: Callable, selection=None) -> None:
        super().__init__(spec, kernel, selection)
        self._dt = spec.dtype
        self._cdt = spec.cache_dtype
        self._hq = spec.num_heads
        self._hkv = spec.num_kv_heads
        self._d = spec.head_size
        self._p = spec.block_size
        # Every dim of a cache but the first (B), in the spec's layout.
        if spec.kv_layout == "NHD":
            self._cache_tail = (spec.block_size, spec.num_kv_heads, spec.head_size)
        else:
            self._cache_tail = (spec.num_kv_heads, spec.block_size, spec.head_size)

    def _check_caches(self, k_cache: torch.Tensor, v_cache: torch.Tensor, device: torch.device) -> None:
        """Slow path: find which cache argument is wrong and say how."""
        spec = self.spec
        shape = (None, *self._cache_tail)
        check_tensor(self.name, "k_cache", k_cache, shape=shape, dims=_cache_dims(spec) + f" (layout "
                     f"{spec.kv_layout})", dtypes=(self._cdt,), device=device)
        check_tensor(self.name, "v_cache", v_cache, shape=tuple(k_cache.shape), dims=_cache_dims(spec),
                     dtypes=(self._cdt,), device=device)
        for name, c in (("k_cache", k_cache), ("v_cache", v_cache)):
            if not c.is_contiguous():
                raise InvalidArgumentError(self.name, name, "a contiguous tensor", "a strided view")

    def _check_meta(self, meta: object, device: torch.device) -> None:
        if not isinstance(meta, AttentionMetadata):
            raise InvalidArgumentError(self.name, "meta", "an AttentionMetadata (AttentionMetadata.build(...))",
                                       type(meta).__name__)
        if meta.block_size != self._p:
            raise InvalidArgumentError(self.name, "meta", f"block_size {self._p} (spec.block_size)",
                                       f"block_size {meta.block_size}")
        if meta.seq_lens.device != device:
            raise InvalidArgumentError(self.name, "meta", f"tensors on {device} (the device of the inputs)",
                                       f"tensors on {meta.seq_lens.device}")


class Attention(_PagedOp):
    """``out[T, Hq, D] = attention(q[T, Hq, D], k_cache, v_cache, meta)``: paged, varlen, one call per batch."""

    name = "attention"
    spec_type = AttentionSpec
    __slots__ = ()

    @classmethod
    def native(cls, spec: AttentionSpec) -> Callable:
        return _native_attention(spec)

    reference = staticmethod(attention_reference)

    def __call__(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttentionMetadata,
                 out: Optional[torch.Tensor] = None) -> torch.Tensor:
        # The good path is a few attribute reads and comparisons; messages are built only on failure.
        try:
            qs = q.shape
            ks = k_cache.shape
            dev = q.device
            ok = (q.dtype == self._dt and len(qs) == 3 and qs[1] == self._hq and qs[2] == self._d
                  and qs[0] == meta.num_tokens and k_cache.dtype == self._cdt and ks[1:] == self._cache_tail
                  and v_cache.shape == ks and v_cache.dtype == self._cdt and k_cache.device == dev
                  and v_cache.device == dev and meta.block_size == self._p and meta.seq_lens.device == dev
                  and meta.max_block_index < ks[0] and k_cache.is_contiguous() and v_cache.is_contiguous())
        except (AttributeError, IndexError, TypeError, ValueError):
            ok = False
        if not ok:
            self._fail(q, k_cache, v_cache, meta)
        if out is None:
            out = torch.empty(qs, dtype=self._dt, device=dev)
        else:
            try:
                ok = out.shape == qs and out.dtype == self._dt and out.device == dev and out.is_contiguous()
            except AttributeError:
                ok = False
            if not ok:
                check_tensor(self.name, "out", out, shape=tuple(qs), dims="T, Hq, D", dtypes=(self._dt,),
                             device=dev)
                raise InvalidArgumentError(self.name, "out", "a contiguous tensor", "a strided view")
        return self.kernel(q, k_cache, v_cache, meta, out)

    def _fail(self, q: object, k_cache: object, v_cache: object, meta: object) -> None:
        spec = self.spec
        check_tensor(self.name, "q", q, ndim=3, dims="T, Hq, D", dtypes=(spec.dtype,))
        dev = q.device
        check_tensor(self.name, "q", q, shape=(None, spec.num_heads, spec.head_size), dims="T, Hq, D")
        self._check_caches(k_cache, v_cache, dev)
        self._check_meta(meta, dev)
        if q.shape[0] != meta.num_tokens:
            raise InvalidArgumentError(self.name, "q", f"{meta.num_tokens} tokens (query_start_loc[-1] of meta)",
                                       f"shape {list(q.shape)}")
        if meta.max_block_index >= k_cache.shape[0]:
            raise InvalidArgumentError(self.name, "block_table", f"block ids < {k_cache.shape[0]} (the cache's "
                                       f"number of blocks)", f"block id {meta.max_block_index}",
                                       "The block table points past the cache")
        raise InvalidArgumentError(self.name, "q", "arguments consistent with the spec", "an unexplained mismatch")


class ReshapeAndCache(_PagedOp):
    """Write each new token's ``key[t], value[t]`` (``[T, Hkv, D]``) to cache slot ``meta.slot_mapping[t]``."""

    name = "reshape_and_cache"
    spec_type = AttentionSpec
    native_batch_invariant = True  # exact copies, one per token
    __slots__ = ()

    @classmethod
    def native(cls, spec: AttentionSpec) -> Callable:
        return _native_reshape_and_cache(spec)

    reference = staticmethod(reshape_and_cache_reference)

    def __call__(self, key: torch.Tensor, value: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                 meta: AttentionMetadata) -> None:
        try:
            ks = key.shape
            cs = k_cache.shape
            dev = key.device
            sm = meta.slot_mapping
            ok = (key.dtype == self._dt and len(ks) == 3 and ks[1] == self._hkv and ks[2] == self._d
                  and value.shape == ks and value.dtype == self._dt and value.device == dev
                  and k_cache.dtype == self._cdt and cs[1:] == self._cache_tail and v_cache.shape == cs
                  and v_cache.dtype == self._cdt and k_cache.device == dev and v_cache.device == dev
                  and sm is not None and ks[0] == meta.num_tokens and meta.block_size == self._p
                  and sm.device == dev and meta.max_slot < cs[0] * self._p
                  and k_cache.is_contiguous() and v_cache.is_contiguous())
        except (AttributeError, IndexError, TypeError, ValueError):
            ok = False
        if not ok:
            self._fail(key, value, k_cache, v_cache, meta)
        self.kernel(key, value, k_cache, v_cache, sm)

    def _fail(self, key: object, value: object, k_cache: object, v_cache: object, meta: object) -> None:
        spec = self.spec
        shape = (None, spec.num_kv_heads, spec.head_size)
        check_tensor(self.name, "key", key, shape=shape, dims="T, Hkv, D", dtypes=(spec.dtype,))
        dev = key.device
        check_tensor(self.name, "value", value, shape=tuple(key.shape), dims="T, Hkv, D", dtypes=(spec.dtype,),
                     device=dev)
        self._check_caches(k_cache, v_cache, dev)
        self._check_meta(meta, dev)
        if meta.slot_mapping is None:
            raise InvalidArgumentError(self.name, "slot_mapping", "a [T] tensor in meta (AttentionMetadata.build("
                                       "..., slot_mapping=...))", "None")
        if key.shape[0] != meta.num_tokens:
            raise InvalidArgumentError(self.name, "key", f"{meta.num_tokens} tokens (the length of "
                                       f"meta.slot_mapping)", f"shape {list(key.shape)}")
        n = k_cache.shape[0] * self._p
        if meta.max_slot >= n:
            raise InvalidArgumentError(self.name, "slot_mapping", f"slots < {n} (num_blocks * block_size)",
                                       f"slot {meta.max_slot}", "The slot mapping points past the cache")
        raise InvalidArgumentError(self.name, "key", "arguments consistent with the spec", "an unexplained mismatch")
