"""Entry point of the built-in rocm backend (group ``anyaccel.plugins``, name ``rocm``)."""
from __future__ import annotations

from typing import Optional

import torch

from ...core.backend import BackendDef
from ...plugins.hookspecs import hookimpl

ANYACCEL_API_VERSION = 1


def detect() -> Optional[str]:
    """None when an AMD GPU is usable through this torch, else why not.

    A ROCm build of torch also names its device "cuda"; ``torch.version.hip`` is what tells them apart.
    """
    hip = getattr(torch.version, "hip", None)
    if not hip:
        built = f"CUDA {torch.version.cuda}" if torch.version.cuda else "CPU only"
        return f"this torch ({torch.__version__}, {built}) is not a ROCm build"
    if not torch.cuda.is_available():
        return f"torch {torch.__version__} has HIP {hip} but sees no AMD GPU"
    return None


def _describe() -> dict:
    from .tuning import tuning_for

    p = torch.cuda.get_device_properties(0)
    arch = getattr(p, "gcnArchName", "")
    return {"device_name": p.name, "gcn_arch": arch, "cu_count": p.multi_processor_count,
            "memory_gib": round(p.total_memory / 2**30, 1), "hip": torch.version.hip,
            **tuning_for(arch).describe()}


@hookimpl
def anyaccel_backends(ctx):
    return [BackendDef(name="rocm", vendor="AMD", device_type="cuda", kv_cache_layout="NHD",
                       distributed_backend="nccl", block_sizes=(16, 32, 64), detect=detect, describe=_describe,
                       description="Triton kernels tuned for AMD GPUs (64-wide wavefronts), hipBLAS via torch, RCCL")]


@hookimpl
def anyaccel_kernels(ctx):
    """The shared Triton kernels with the tuning of this GPU's architecture, plus hipBLAS for GEMM."""
    from . import gemm
    from .tuning import device_arch, tuning_for

    try:
        from ..triton import make_kernels

        triton_kernels = make_kernels("rocm", tuning_for(device_arch()), interpret=False,
                                      gemm_min_features=gemm.TRITON_GEMM_MIN_FEATURES)
        triton_kernels += _scaled_gemm_kernels(device_arch())
    except ImportError:  # no triton here: hipBLAS still serves GEMM; the other ops fall back to the core
        triton_kernels = []
    return [*triton_kernels, *gemm.KERNELS]


def _scaled_gemm_kernels(arch):
    """The w8a8 Triton kernel with what gfx architecture ``arch`` runs natively (``quant.py``'s table)."""
    from ..triton.scaled_gemm import make_scaled_gemm_kernels
    from .quant import scaled_gemm_capability
    from .tuning import tuning_for

    t = tuning_for(arch)
    return make_scaled_gemm_kernels("rocm", t, False, scaled_gemm_capability(arch, frozenset(t.limits.dtypes),
                                                                             t.limits.max_gemm_features))
