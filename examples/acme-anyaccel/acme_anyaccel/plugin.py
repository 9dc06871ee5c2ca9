"""Entry point of the ``example`` backend (group ``anyaccel.plugins``, name ``example``).

The whole contract with anyaccel is the two hooks below: one declares the backend, the other its kernels.
Everything the backend does not implement (fp16 GEMM, grouped GEMM, attention, layer_norm, rotary, activations)
is served by the core's native implementation, and every such fallback is recorded (``anyaccel explain``,
``anyaccel conformance``); ``--strict`` turns them into errors.
"""
from __future__ import annotations

import os
import platform

import torch

from anyaccel.core import BackendDef
from anyaccel.plugins import hookimpl

from . import kernels

ANYACCEL_API_VERSION = 1

BACKEND = "example"


def _describe() -> dict:
    return {"device_name": f"Acme Example on {platform.machine() or 'cpu'}", "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "gemm_k_chunk": kernels.K_CHUNK}


@hookimpl
def anyaccel_backends(ctx):
    return [BackendDef(name=BACKEND, vendor="Acme Example", device_type="cpu", kv_cache_layout="NHD",
                       distributed_backend="gloo", block_sizes=(16, 32),
                       description="example vendor backend: own GEMM and RMSNorm, core fallback elsewhere",
                       describe=_describe)]


@hookimpl
def anyaccel_kernels(ctx):
    return kernels.kernels(BACKEND)
