"""Which quantized formats each AMD Instinct generation runs, as data (read by the rocm backend's scaled GEMM).

int8 MFMA on CDNA (gfx908 MI100, gfx90a MI200, gfx942 MI300, gfx950 MI350); fp8 e4m3 in the *fnuz* variant
(exponent bias 8, no negative zero, max 240) on gfx942, and the OCP *e4m3fn* variant (max 448, NVIDIA's) on gfx950,
which dropped fnuz; block-wise fp8 wherever fp8 runs. An architecture not in the table declares nothing: a kernel
is never elected on a GPU whose formats were not written down here.
"""
from __future__ import annotations

from typing import Dict, FrozenSet, Optional

import torch

from ...core.scaled_gemm import ScaledGemmCapability

__all__ = ["ARCH_FEATURES", "normalize_arch", "supported", "scaled_gemm_capability"]

#: gfx architecture -> the features it runs natively
ARCH_FEATURES: Dict[str, FrozenSet[str]] = {
    "gfx908": frozenset({"int8"}),
    "gfx90a": frozenset({"int8"}),
    "gfx942": frozenset({"int8", "fp8_e4m3fnuz", "block"}),
    "gfx950": frozenset({"int8", "fp8_e4m3fn", "block"}),
}

_WHERE = {"int8": "CDNA (gfx908, gfx90a, gfx942, gfx950)", "fp8_e4m3fnuz": "gfx942 (MI300), the fnuz format",
          "fp8_e4m3fn": "gfx950 (MI350), OCP e4m3fn", "block": "an fp8 architecture (gfx942, gfx950)"}
_LABEL = {"int8": "int8", "fp8_e4m3fnuz": "fp8 e4m3fnuz", "fp8_e4m3fn": "fp8 e4m3fn", "block": "block-wise fp8"}


def normalize_arch(arch: str) -> str:
    """``"gfx942:sramecc+:xnack-"`` -> ``"gfx942"``."""
    return (arch or "").split(":")[0].strip().lower()


def supported(arch: str) -> FrozenSet[str]:
    return ARCH_FEATURES.get(normalize_arch(arch), frozenset())


def scaled_gemm_capability(arch: str, dtypes: FrozenSet[torch.dtype],
                           max_features: Optional[int] = None) -> ScaledGemmCapability:
    """The scaled-GEMM capability of the shared Triton kernel on gfx architecture ``arch``."""
    a = normalize_arch(arch)
    have = supported(a)
    known = "" if a in ARCH_FEATURES else f" ({a} is not in the table of known architectures)"
    refusals = tuple((f, f"{_LABEL[f]} needs {_WHERE[f]}; this device is {a}{known}")
                     for f in ("int8", "fp8_e4m3fnuz", "fp8_e4m3fn", "block") if f not in have)
    schemes = frozenset(s for s in ("int8", "fp8_e4m3fn", "fp8_e4m3fnuz") if s in have)
    block = "block" in have
    if not block:
        refusals += (("group", f"group activation scales go with block-wise fp8, which needs {_WHERE['block']}; "
                               f"this device is {a}"),)
    return ScaledGemmCapability(
        dtypes=dtypes, schemes=schemes,
        weight_granularities=frozenset({"tensor", "channel"} | ({"block"} if block else set())),
        act_granularities=frozenset({"tensor", "token"} | ({"group"} if block else set())),
        asymmetric="int8" in schemes, block_sizes=None, max_features=max_features, refusals=refusals)
