"""NVIDIA tuning of the shared Triton kernels, chosen by compute capability (sm70 ... sm90+)."""
from __future__ import annotations

from dataclasses import replace
from typing import Tuple

import torch

from ..triton.tuning import AttentionTuning, GemmConfig, Limits, TritonTuning

__all__ = ["tuning_for", "device_capability"]

_HALF = frozenset({torch.float32, torch.float16})

# M <= 16: thin tiles, deep K, many programs along N (GEMV-like decode); then medium; then the big-tile config.
_GEMM_SM90 = (
    GemmConfig(16, 16, 64, 256, 8, 4, 4),
    GemmConfig(64, 64, 64, 128, 8, 4, 4),
    GemmConfig(256, 128, 128, 64, 8, 8, 3),
    GemmConfig(1 << 62, 128, 256, 64, 8, 8, 3),
)
_GEMM_SM80 = (
    GemmConfig(16, 16, 64, 128, 8, 4, 4),
    GemmConfig(64, 64, 64, 64, 8, 4, 4),
    GemmConfig(1 << 62, 128, 128, 32, 8, 4, 4),
)
_GEMM_OLD = (
    GemmConfig(16, 16, 64, 64, 8, 4, 2),
    GemmConfig(1 << 62, 64, 64, 32, 8, 4, 2),
)


def tuning_for(capability: Tuple[int, int]) -> TritonTuning:
    """The tuning for an NVIDIA GPU of compute capability ``(major, minor)``."""
    major, minor = capability
    if major >= 9:   # Hopper and later: large smem, deep pipelines
        return TritonTuning(
            name=f"nvidia-sm{major}{minor}",
            attention=AttentionTuning(block_m=128, block_m_decode=16, tile_n=64, num_warps=8, num_warps_decode=4,
                                      num_stages=3, num_stages_decode=4, split_kv_min_seq_len=4096,
                                      split_kv_max_programs=264, split_kv_tiles_per_split=16),
            gemm=_GEMM_SM90, rows_per_program=1, kv_write_tokens_per_program=1, rotary_rows_per_program=4)
    if major == 8:   # Ampere / Ada
        smem_small = minor in (6, 7, 9)   # sm86/87/89 have ~100 KiB of shared memory per SM
        return TritonTuning(
            name=f"nvidia-sm{major}{minor}",
            attention=AttentionTuning(block_m=64 if smem_small else 128, block_m_decode=16, tile_n=64, num_warps=4,
                                      num_warps_decode=4, num_stages=2, num_stages_decode=3,
                                      split_kv_max_programs=2 * 108),
            gemm=_GEMM_SM80 if not smem_small else tuple(replace(c, num_stages=min(c.num_stages, 3))
                                                         for c in _GEMM_SM80))
    # Volta / Turing: no bfloat16 tensor cores; declare fp32/fp16 only
    return TritonTuning(
        name=f"nvidia-sm{major}{minor}",
        attention=AttentionTuning(block_m=64, block_m_decode=16, tile_n=32, num_warps=4, num_stages=1,
                                  num_stages_decode=2),
        gemm=_GEMM_OLD, limits=Limits(dtypes=_HALF))


def device_capability() -> Tuple[int, int]:
    """The first GPU's compute capability, or sm90 when none is visible (the kernels are then unusable anyway)."""
    try:
        if torch.cuda.is_available() and torch.version.cuda is not None:
            return tuple(torch.cuda.get_device_capability(0))  # type: ignore[return-value]
    except Exception:
        pass
    return (9, 0)
