"""cpu fused small ops: torch's vectorized CPU kernels, writing into the preallocated outputs.

Norms accumulate in float32 for fp16/bf16 (one float32 working copy per call, rounded once into ``out``); the
float32 paths allocate only an [N, 1] scale. Rotary gathers the cos/sin rows once for q and k and computes in
float32. Activations write the activation straight into ``out`` and multiply in place (no temporaries).
Aliasing honoured as the core documents: ``out`` may be ``x``, ``residual_out`` may be ``residual``,
``q_out``/``k_out`` may be ``q``/``k``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ...core.dispatch import KernelImpl
from ...core.fused import (GatedActivationCapability, GatedActivationSpec, LayerNormSpec, NormCapability,
                           RMSNormSpec, RotaryCapability, RotarySpec)

_FLOATS = frozenset({torch.float32, torch.float16, torch.bfloat16})
_vector_norm = torch.linalg.vector_norm
# torch._C._nn's out= variants cost ~1 us a call against ~4 us through torch.ops.aten (same kernels).
_silu_out = getattr(torch._C._nn, "silu", None) or torch.ops.aten.silu.out
_gelu_out = getattr(torch._C._nn, "gelu", None) or torch.ops.aten.gelu.out


def _build_rms_norm(spec: RMSNormSpec):
    h, eps = spec.hidden_size, spec.eps
    inv_h = 1.0 / h

    def inv_rms(h_NH):  # float32 [N, 1]: 1 / sqrt(mean(h**2) + eps), accumulated in float32
        return _vector_norm(h_NH, 2, -1, keepdim=True, dtype=torch.float32).square_().mul_(inv_h).add_(eps).rsqrt_()

    if spec.dtype == torch.float32:
        def rms_norm_fp32(x_NH, w_H, residual_NH, out_NH, residual_out_NH):
            if residual_NH is not None:
                x_NH = torch.add(x_NH, residual_NH, out=residual_out_NH)
            torch.mul(x_NH, inv_rms(x_NH), out=out_NH)
            return out_NH.mul_(w_H)
        return rms_norm_fp32

    def rms_norm_half(x_NH, w_H, residual_NH, out_NH, residual_out_NH):
        h_NH = x_NH.float()                               # float32 working copy
        if residual_NH is not None:
            h_NH.add_(residual_NH)
            residual_out_NH.copy_(h_NH)
        h_NH.mul_(inv_rms(h_NH)).mul_(w_H)
        return out_NH.copy_(h_NH)
    return rms_norm_half


def _build_layer_norm(spec: LayerNormSpec):
    shape, eps = (spec.hidden_size,), spec.eps

    def layer_norm(x_NH, w_H, b_H, out_NH):
        # torch's CPU layer_norm accumulates half types in float32 and rounds once
        return out_NH.copy_(F.layer_norm(x_NH, shape, w_H, b_H, eps))
    return layer_norm


def _build_rotary(spec: RotarySpec):
    r, half = spec.rotary_dim, spec.rotary_dim // 2
    a, b = (slice(0, half), slice(half, r)) if spec.style == "neox" else (slice(0, r, 2), slice(1, r, 2))
    partial = r < spec.head_size

    def rotate(x_THD, out_THD, cos_T1R2, sin_T1R2):
        x1, x2 = x_THD[..., a], x_THD[..., b]
        y1 = x1 * cos_T1R2                                # float32 (the cache is float32)
        y1.addcmul_(x2, sin_T1R2, value=-1.0)
        y2 = x2 * cos_T1R2
        y2.addcmul_(x1, sin_T1R2)
        out_THD[..., a] = y1                              # written after both are computed: out may be x
        out_THD[..., b] = y2
        if partial and out_THD is not x_THD:
            out_THD[..., r:] = x_THD[..., r:]

    def rotary(positions_T, q_THqD, k_THkvD, cache_PR, q_out, k_out):
        cs_TR = cache_PR.index_select(0, positions_T)
        cos_T1R2, sin_T1R2 = cs_TR[:, None, :half], cs_TR[:, None, half:]
        rotate(q_THqD, q_out, cos_T1R2, sin_T1R2)
        rotate(k_THkvD, k_out, cos_T1R2, sin_T1R2)
    return rotary


def _build_silu_and_mul(spec: GatedActivationSpec):
    def silu_and_mul(x_N2d, out_Nd):
        d = out_Nd.shape[1]
        _silu_out(x_N2d[:, :d], out=out_Nd)
        return out_Nd.mul_(x_N2d[:, d:])
    return silu_and_mul


def _build_gelu_and_mul(spec: GatedActivationSpec):
    approximate = spec.approximate

    def gelu_and_mul(x_N2d, out_Nd):
        d = out_Nd.shape[1]
        _gelu_out(x_N2d[:, :d], approximate=approximate, out=out_Nd)
        return out_Nd.mul_(x_N2d[:, d:])
    return gelu_and_mul


KERNELS = [
    KernelImpl(op="rms_norm", backend="cpu", name="cpu.rms_norm.torch", build=_build_rms_norm, priority=10,
               capability=NormCapability(dtypes=_FLOATS, max_hidden_size=None, fused_residual=True),
               description="vector_norm scale (float32 accumulation) and in-place scaling; fused residual add"),
    KernelImpl(op="layer_norm", backend="cpu", name="cpu.layer_norm.torch", build=_build_layer_norm, priority=10,
               capability=NormCapability(dtypes=_FLOATS, max_hidden_size=None, bias=True),
               description="torch.nn.functional.layer_norm (float32 accumulation), copied into the output"),
    KernelImpl(op="rotary_embedding", backend="cpu", name="cpu.rotary_embedding.torch", build=_build_rotary,
               priority=10, capability=RotaryCapability(dtypes=_FLOATS, styles=frozenset({"neox", "gptj"}),
                                                        head_sizes=None, partial=True),
               description="cos/sin gathered once per call, float32 rotation of strided halves or pairs"),
    KernelImpl(op="silu_and_mul", backend="cpu", name="cpu.silu_and_mul.torch", build=_build_silu_and_mul,
               priority=10, capability=GatedActivationCapability(dtypes=_FLOATS, approximations=frozenset({"none"})),
               description="silu written into the output, multiplied in place"),
    KernelImpl(op="gelu_and_mul", backend="cpu", name="cpu.gelu_and_mul.torch", build=_build_gelu_and_mul,
               priority=10, capability=GatedActivationCapability(dtypes=_FLOATS,
                                                                 approximations=frozenset({"none", "tanh"})),
               description="gelu (erf or tanh) written into the output, multiplied in place"),
]
