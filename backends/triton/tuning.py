"""Tuning of the shared Triton kernels, as data: each backend passes its own :class:`TritonTuning`.

Nothing here changes *what* a kernel computes; it changes tile sizes, launch options and which of two
equivalent paths (one pass, or split-KV + merge) a call takes. The cuda backend picks a tuning by compute
capability, the rocm backend by its 64-wide wavefronts and gfx architecture, the interpreter tier by the cost
model of Triton's interpreter (a program costs milliseconds, so: few programs, large blocks).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import FrozenSet, Optional, Tuple

import torch

__all__ = ["GemmConfig", "AttentionTuning", "Limits", "TritonTuning"]


@dataclass(frozen=True)
class GemmConfig:
    """Tiles for GEMM calls with at most ``max_m`` rows (the first config whose ``max_m >= M`` is used)."""

    max_m: int
    block_m: int
    block_n: int
    block_k: int
    group_m: int = 8
    num_warps: int = 4
    num_stages: int = 3


@dataclass(frozen=True)
class AttentionTuning:
    """Tiles of the unified paged-attention kernel.

    :param block_m: rows (query tokens x the query heads of one kv head) per program for prefill batches.
    :param block_m_decode: the same for batches whose longest query is one token.
    :param tile_n: keys per inner-loop step.
    :param split_kv_min_seq_len: take the split-KV path when a batch's longest context reaches this ...
    :param split_kv_max_programs: ... and the one-pass grid (query blocks x kv heads) has fewer programs than this.
    :param split_kv_tiles_per_split: aim for this many key tiles per split (the split count follows).
    :param max_splits: at most this many splits.
    """

    block_m: int = 128
    block_m_decode: int = 16
    tile_n: int = 64
    num_warps: int = 8
    num_warps_decode: int = 4
    num_stages: int = 2
    num_stages_decode: int = 3
    split_kv_min_seq_len: int = 8192
    split_kv_max_programs: int = 256
    split_kv_tiles_per_split: int = 16
    max_splits: int = 32


@dataclass(frozen=True)
class Limits:
    """What a tier declares it accepts, checked against each spec (reported by ``anyaccel explain``).

    ``None`` means unlimited.
    """

    dtypes: FrozenSet[torch.dtype] = frozenset({torch.float32, torch.float16, torch.bfloat16})
    max_head_size: int = 256
    max_hidden_size: Optional[int] = None
    max_gemm_features: Optional[int] = None
    max_kv_heads_x_head_size: Optional[int] = None
    max_experts: Optional[int] = 256


@dataclass(frozen=True)
class TritonTuning:
    """Everything a backend chooses about the shared kernels.

    :param name: shown by ``anyaccel backends`` (e.g. ``"nvidia-sm90"``).
    :param dot_upcast: upcast ``tl.dot`` operands to float32 (required by the interpreter for bfloat16; on a GPU
        it would forfeit the tensor cores' 16-bit paths).
    :param fp32_dot_precision: ``tl.dot`` input precision for float32 operands (``"ieee"`` keeps fp32 results
        within fp32 tolerances; ``"tf32"`` is faster and less exact).
    :param rows_per_program: rows of a norm / activation per program.
    :param launch_options: extra launch keywords for every GPU launch (AMD: ``waves_per_eu``,
        ``matrix_instr_nonkdim``), as (name, value) pairs.
    :param batch_invariant: launch shapes never depend on the batch: one GEMM config for every M (no split-K
        exists), one attention row block for prefill and decode and no split-KV (a fixed key tile, never a
        number of splits that follows the batch), fixed rows per program for norms and elementwise ops. Made by
        :func:`batch_invariant_tuning`; the kernels built with it declare ``batch_invariant``.
    """

    name: str
    attention: AttentionTuning = field(default_factory=AttentionTuning)
    gemm: Tuple[GemmConfig, ...] = (
        GemmConfig(16, 16, 64, 128, 8, 4, 4),
        GemmConfig(64, 64, 64, 64, 8, 4, 4),
        GemmConfig(1 << 62, 128, 128, 64, 8, 8, 3),
    )
    dot_upcast: bool = False
    fp32_dot_precision: str = "ieee"
    rows_per_program: int = 1
    norm_num_warps: int = 4
    elementwise_block: int = 1024
    elementwise_num_warps: int = 4
    kv_write_tokens_per_program: int = 1
    rotary_rows_per_program: int = 4
    max_tile_elements: int = 16384
    launch_options: Tuple[Tuple[str, object], ...] = ()
    limits: Limits = field(default_factory=Limits)
    batch_invariant: bool = False

    def gemm_config(self, m: int) -> GemmConfig:
        for c in self.gemm:
            if m <= c.max_m:
                return c
        return self.gemm[-1]

    def describe(self) -> dict:
        a = self.attention
        return {
            "tuning": self.name,
            "attention_tiles": f"block_m={a.block_m}/{a.block_m_decode} tile_n={a.tile_n}",
            "split_kv": f"seq_len>={a.split_kv_min_seq_len}, grid<{a.split_kv_max_programs}",
            "gemm_configs": len(self.gemm),
            "launch_options": dict(self.launch_options),
        }


def batch_invariant_tuning(t: TritonTuning) -> TritonTuning:
    """``t`` with every batch-dependent launch choice fixed (see ``TritonTuning.batch_invariant``): the GEMM config
    ``t`` uses for mid-sized M serves every M, decode uses the prefill row block, split-KV is off."""
    import dataclasses

    mid = t.gemm[min(1, len(t.gemm) - 1)]
    a = dataclasses.replace(t.attention, block_m_decode=t.attention.block_m,
                            num_warps_decode=t.attention.num_warps, num_stages_decode=t.attention.num_stages,
                            split_kv_min_seq_len=1 << 62)
    return dataclasses.replace(t, gemm=(dataclasses.replace(mid, max_m=1 << 62),),
                               attention=a, batch_invariant=True)
