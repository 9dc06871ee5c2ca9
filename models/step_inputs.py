"""One engine step's inputs, from the host lists the scheduler already holds, in one transfer and no device sync.

The scheduler knows every value of a step before it runs (token ids, positions, cache slots, the varlen offsets,
the block table). :func:`upload_step` validates the attention layout on the host
(:meth:`AttentionMetadata.from_host`, the same errors as :meth:`AttentionMetadata.build`) and moves the step to the
device as ONE packed int64 buffer, cut into views; nothing is read back.

Shape legend: T tokens of the step (packed), S sequences, B max blocks per sequence.
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch

from ..core.attention import AttentionMetadata

__all__ = ["upload_step"]


def upload_step(device: torch.device, ids: Sequence[int], positions: Sequence[int], starts: Sequence[int],
                seq_lens: Sequence[int], table: Sequence[Sequence[int]], slots: Sequence[int],
                block_size: int, packed: Optional[bool] = None) -> Tuple[torch.Tensor, torch.Tensor, AttentionMetadata]:
    """``(input_ids_T, positions_T, meta)`` on ``device``; ``table`` rows padded to equal length by the caller.

    On the host device the tensors are made directly (there is nothing to transfer). Elsewhere (or with
    ``packed=True``) one int64 buffer goes over and is cut into views; the index tensors of the metadata become
    int32 copies made on the device (asynchronous casts, no sync).
    """
    T, S = len(ids), len(seq_lens)
    B = len(table[0]) if S else 0
    flat_table: List[int] = [b for row in table for b in row]
    i64, i32 = torch.int64, torch.int32
    if not (packed if packed is not None else device.type != "cpu"):
        ids_T = torch.tensor(ids, dtype=i64)
        pos_T = torch.tensor(positions, dtype=i64)
        slots_T = torch.tensor(slots, dtype=i64)
        qsl_S1 = torch.tensor(starts, dtype=i32)
        lens_S = torch.tensor(seq_lens, dtype=i32)
        table_SB = torch.tensor(flat_table, dtype=i32).view(S, B)
    else:
        host = torch.tensor(list(ids) + list(positions) + list(slots) + list(starts) + list(seq_lens) + flat_table,
                            dtype=i64)
        buf = host.to(device)  # the step's one transfer
        ids_T, pos_T, slots_T = buf[:T], buf[T:2 * T], buf[2 * T:3 * T]
        rest = buf[3 * T:]
        qsl_S1 = rest[:S + 1].to(i32)
        lens_S = rest[S + 1:2 * S + 1].to(i32)
        table_SB = rest[2 * S + 1:].to(i32).view(S, B)
    meta = AttentionMetadata.from_host(starts, seq_lens, table, block_size, slots,
                                       tensors=(qsl_S1, lens_S, table_SB, slots_T))
    return ids_T, pos_T, meta
