"""Entry point of the built-in cpu backend (group ``anyaccel.plugins``, name ``cpu``)."""
from __future__ import annotations

import os
import platform

import torch

from ...core.backend import BackendDef
from ...plugins.hookspecs import hookimpl
from . import features

ANYACCEL_API_VERSION = 1


def _describe() -> dict:
    return {
        "device_name": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "mkldnn": torch.backends.mkldnn.is_available(),
        "isa": features.detect().summary(),
    }


@hookimpl
def anyaccel_backends(ctx):
    return [BackendDef(name="cpu", vendor="anyaccel", device_type="cpu", kv_cache_layout="HND",
                       distributed_backend="gloo", block_sizes=(128, 64, 32, 16),
                       description="torch CPU kernels (oneDNN/MKL, SDPA) and gloo collectives",
                       describe=_describe)]


@hookimpl
def anyaccel_kernels(ctx):
    from . import attention, fused, gemm, invariant, scaled_gemm, weight_only

    return [*gemm.KERNELS, *fused.KERNELS, *attention.KERNELS, *invariant.KERNELS, *scaled_gemm.KERNELS,
            *weight_only.KERNELS]
