"""AMD tuning of the shared Triton kernels: 64-wide wavefronts (a "warp" is 64 lanes, so fewer warps per
program), and the AMD launch options ``waves_per_eu`` (occupancy hint) and ``matrix_instr_nonkdim`` (MFMA
16x16 vs 32x32 instructions), chosen by gfx architecture."""
from __future__ import annotations

import torch

from ..triton.tuning import AttentionTuning, GemmConfig, TritonTuning

__all__ = ["tuning_for", "device_arch"]

_GEMM_CDNA3 = (
    GemmConfig(16, 16, 64, 256, 8, 4, 2),
    GemmConfig(64, 64, 64, 128, 8, 4, 2),
    GemmConfig(1 << 62, 256, 256, 64, 4, 8, 2),
)
_GEMM_DEFAULT = (
    GemmConfig(16, 16, 64, 128, 8, 4, 2),
    GemmConfig(1 << 62, 128, 128, 32, 8, 4, 2),
)


def tuning_for(arch: str) -> TritonTuning:
    """The tuning for an AMD GPU whose ``gcnArchName`` starts with ``arch`` (``"gfx942"``, ``"gfx90a"``...)."""
    base = arch.split(":")[0]
    if base in ("gfx940", "gfx941", "gfx942", "gfx950"):    # MI300 / MI325 / MI355 (CDNA3+)
        return TritonTuning(
            name=f"amd-{base}",
            attention=AttentionTuning(block_m=128, block_m_decode=16, tile_n=64, num_warps=4, num_warps_decode=4,
                                      num_stages=2, num_stages_decode=2, split_kv_max_programs=2 * 304),
            gemm=_GEMM_CDNA3, norm_num_warps=4, elementwise_num_warps=4,
            launch_options=(("waves_per_eu", 2), ("matrix_instr_nonkdim", 16)))
    if base == "gfx90a":                                     # MI200 (CDNA2)
        return TritonTuning(
            name="amd-gfx90a",
            attention=AttentionTuning(block_m=64, block_m_decode=16, tile_n=64, num_warps=4, num_stages=1,
                                      num_stages_decode=1, split_kv_max_programs=2 * 110),
            gemm=_GEMM_DEFAULT, launch_options=(("waves_per_eu", 2), ("matrix_instr_nonkdim", 16)))
    # RDNA and unknown parts: conservative tiles, no CDNA-only options
    return TritonTuning(
        name=f"amd-{base or 'unknown'}",
        attention=AttentionTuning(block_m=64, block_m_decode=16, tile_n=32, num_warps=4, num_stages=1,
                                  num_stages_decode=1),
        gemm=_GEMM_DEFAULT)


def device_arch() -> str:
    """The first GPU's gfx architecture, or gfx942 when none is visible (the kernels are then unusable anyway)."""
    try:
        if torch.cuda.is_available() and getattr(torch.version, "hip", None):
            return getattr(torch.cuda.get_device_properties(0), "gcnArchName", "") or "gfx942"
    except Exception:
        pass
    return "gfx942"
