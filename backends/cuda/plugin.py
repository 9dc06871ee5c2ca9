"""Entry point of the built-in cuda backend (group ``anyaccel.plugins``, name ``cuda``)."""
from __future__ import annotations

from typing import Optional

import torch

from ...core.backend import BackendDef
from ...plugins.hookspecs import hookimpl

ANYACCEL_API_VERSION = 1


def detect() -> Optional[str]:
    """None when an NVIDIA GPU is usable through this torch, else why not."""
    if getattr(torch.version, "hip", None):
        return f"this torch is a ROCm build (HIP {torch.version.hip}); its 'cuda' device is an AMD GPU: use rocm"
    if torch.version.cuda is None:
        return f"this torch ({torch.__version__}) was built without CUDA"
    if not torch.cuda.is_available():
        return f"torch {torch.__version__} has CUDA {torch.version.cuda} but sees no NVIDIA GPU"
    return None


def _describe() -> dict:
    from .tuning import tuning_for

    p = torch.cuda.get_device_properties(0)
    return {"device_name": p.name, "compute_capability": f"{p.major}.{p.minor}",
            "sm_count": p.multi_processor_count, "memory_gib": round(p.total_memory / 2**30, 1),
            "cuda": torch.version.cuda, **tuning_for((p.major, p.minor)).describe()}


@hookimpl
def anyaccel_backends(ctx):
    return [BackendDef(name="cuda", vendor="NVIDIA", device_type="cuda", kv_cache_layout="NHD",
                       distributed_backend="nccl", block_sizes=(16, 32, 64), detect=detect, describe=_describe,
                       description="Triton kernels tuned for NVIDIA GPUs, cuBLAS via torch, NCCL")]


@hookimpl
def anyaccel_kernels(ctx):
    """The shared Triton kernels with the tuning of this GPU's compute capability, plus cuBLAS for GEMM."""
    from . import gemm
    from .tuning import device_capability, tuning_for

    try:
        from ..triton import make_kernels

        triton_kernels = make_kernels("cuda", tuning_for(device_capability()), interpret=False,
                                      gemm_min_features=gemm.TRITON_GEMM_MIN_FEATURES)
        triton_kernels += _scaled_gemm_kernels(device_capability())
    except ImportError:  # no triton here: cuBLAS still serves GEMM; the other ops fall back to the core
        triton_kernels = []
    return [*triton_kernels, *gemm.KERNELS]


def _scaled_gemm_kernels(cc):
    """The w8a8 Triton kernel with what compute capability ``cc`` runs natively (``quant.py``'s table)."""
    from ..triton.scaled_gemm import make_scaled_gemm_kernels
    from .quant import scaled_gemm_capability
    from .tuning import tuning_for

    t = tuning_for(cc)
    return make_scaled_gemm_kernels("cuda", t, False, scaled_gemm_capability(cc, frozenset(t.limits.dtypes),
                                                                             t.limits.max_gemm_features))
