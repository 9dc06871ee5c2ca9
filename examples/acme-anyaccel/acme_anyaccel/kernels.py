"""The example backend's kernels. The core validates every call and preallocates every output; a kernel only
computes and writes ``out`` (the conformance suite fills it with NaN first, so every element must be written).

Shape legend: M rows, K input features, N output features, H hidden size.
"""
from __future__ import annotations

import torch

from anyaccel.core import GemmCapability, GemmSpec, KernelImpl, NormCapability, RMSNormSpec

__all__ = ["K_CHUNK", "kernels"]

#: K is reduced in chunks of this many columns, each chunk's product accumulated in float32.
K_CHUNK = 256

# Honest capabilities: no float16 anywhere (those calls fall back to the core, recorded).
_DTYPES = frozenset({torch.float32, torch.bfloat16})


def _build_gemm(spec: GemmSpec):
    def gemm_k_chunked(x_MK, w_NK, bias_N, out_MN):
        k = x_MK.shape[1]
        acc_MN = torch.zeros(out_MN.shape, dtype=torch.float32, device=out_MN.device)
        for k0 in range(0, k, K_CHUNK):
            x_chunk = x_MK[:, k0:k0 + K_CHUNK].float()
            w_chunk = w_NK[:, k0:k0 + K_CHUNK].float()
            acc_MN.addmm_(x_chunk, w_chunk.t())
        if bias_N is not None:
            acc_MN.add_(bias_N)
        return out_MN.copy_(acc_MN)

    return gemm_k_chunked


def _build_rms_norm(spec: RMSNormSpec):
    eps, h = spec.eps, spec.hidden_size

    def rms_norm_einsum(x_NH, w_H, residual_NH, out_NH, residual_out_NH):
        h_NH = x_NH.float()
        if residual_NH is not None:
            h_NH = h_NH + residual_NH.float()
            residual_out_NH.copy_(h_NH)
        ms_N = torch.einsum("nh,nh->n", h_NH, h_NH) / h
        scale_N1 = torch.rsqrt(ms_N + eps).unsqueeze(1)
        return out_NH.copy_(h_NH * scale_N1 * w_H.float())

    return rms_norm_einsum


def kernels(backend: str) -> list:
    return [
        KernelImpl(op="gemm", backend=backend, name="example.gemm.k_chunked", build=_build_gemm, priority=10,
                   capability=GemmCapability(dtypes=_DTYPES),
                   description=f"float32 accumulation over K in chunks of {K_CHUNK}"),
        KernelImpl(op="rms_norm", backend=backend, name="example.rms_norm.einsum", build=_build_rms_norm,
                   priority=10, capability=NormCapability(dtypes=_DTYPES, fused_residual=True),
                   description="mean of squares by einsum in float32; fused residual add"),
    ]
