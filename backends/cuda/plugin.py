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
    p = torch.cuda.get_device_properties(0)
    return {"device_name": p.name, "compute_capability": f"{p.major}.{p.minor}",
            "sm_count": p.multi_processor_count, "memory_gib": round(p.total_memory / 2**30, 1),
            "cuda": torch.version.cuda}


@hookimpl
def anyaccel_backends(ctx):
    return [BackendDef(name="cuda", vendor="NVIDIA", device_type="cuda", kv_cache_layout="NHD",
                       distributed_backend="nccl", block_sizes=(16, 32, 64), detect=detect, describe=_describe,
                       description="Triton kernels tuned for NVIDIA GPUs, cuBLAS via torch, NCCL")]


@hookimpl
def anyaccel_kernels(ctx):
    return []
