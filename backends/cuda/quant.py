"""Which quantized formats each NVIDIA generation runs, as data (read by the cuda backend's scaled GEMM).

The table is what the silicon does natively: int8 tensor-core MMA from Turing (sm75), fp8 e4m3 from Ada (sm89),
block-wise fp8 (per-block scales applied between K tiles, the DeepSeek-V3 recipe) from Hopper (sm90), whose
wgmma pipelines keep that epilogue cheap. e4m3fnuz is AMD's MI300 format and never runs here. A spec that needs
more than the device has is refused with the reason (``anyaccel explain scaled_gemm --backend cuda --scheme
fp8_e4m3fn``), and the core's dequantizing fallback serves it (or ``--strict`` refuses it).
"""
from __future__ import annotations

from typing import Dict, FrozenSet, Optional, Tuple

import torch

from ...core.scaled_gemm import ScaledGemmCapability

__all__ = ["MIN_CAPABILITY", "FEATURE_LABEL", "supported", "scaled_gemm_capability"]

#: feature -> the lowest compute capability that runs it natively (None: no NVIDIA GPU does)
MIN_CAPABILITY: Dict[str, Optional[Tuple[int, int]]] = {
    "int8": (7, 5),
    "fp8_e4m3fn": (8, 9),
    "fp8_e4m3fnuz": None,
    "block": (9, 0),
}

#: how a feature is named in a refusal
FEATURE_LABEL = {"int8": "int8", "fp8_e4m3fn": "fp8", "block": "block-wise fp8"}


def supported(cc: Tuple[int, int]) -> FrozenSet[str]:
    """The features of :data:`MIN_CAPABILITY` that a device of compute capability ``cc`` runs."""
    return frozenset(f for f, need in MIN_CAPABILITY.items() if need is not None and tuple(cc) >= need)


def _refusal(feature: str, cc: Tuple[int, int]) -> str:
    need = MIN_CAPABILITY[feature]
    if need is None:
        return ("float8_e4m3fnuz is AMD's MI300 (gfx942) format; NVIDIA GPUs run OCP e4m3fn (scheme fp8_e4m3fn); "
                "convert the weights to e4m3fn (every e4m3fnuz value but the smallest subnormals is exact in e4m3fn)")
    return (f"{FEATURE_LABEL[feature]} needs compute capability \u2265 {need[0]}.{need[1]}; "
            f"this device is {cc[0]}.{cc[1]}")


def scaled_gemm_capability(cc: Tuple[int, int], dtypes: FrozenSet[torch.dtype],
                           max_features: Optional[int] = None) -> ScaledGemmCapability:
    """The scaled-GEMM capability of the shared Triton kernel on a device of compute capability ``cc``."""
    have = supported(cc)
    schemes = frozenset(s for s in ("int8", "fp8_e4m3fn", "fp8_e4m3fnuz") if s in have)
    block = "block" in have and bool(schemes - {"int8"})
    refusals = tuple((f, _refusal(f, cc)) for f in MIN_CAPABILITY if f not in have)
    if not block:
        refusals += (("group", _refusal("block", cc) if "block" not in have else "no fp8 scheme here"),)
    return ScaledGemmCapability(
        dtypes=dtypes, schemes=schemes,
        weight_granularities=frozenset({"tensor", "channel"} | ({"block"} if block else set())),
        act_granularities=frozenset({"tensor", "token"} | ({"group"} if block else set())),
        asymmetric="int8" in schemes, block_sizes=None, max_features=max_features, refusals=refusals)
