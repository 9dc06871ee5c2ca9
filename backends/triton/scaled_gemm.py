"""Scaled GEMM (w8a8: int8, fp8 e4m3fn, fp8 e4m3fnuz) in Triton; shared by cuda, rocm and the interpreter.

Shape legend: M rows, N output features, K input features; tiles BM x BN x BK; QB the block size of block-wise
scales (a multiple of BK, so a K tile never straddles two scale groups).

- int8: ``tl.dot`` of int8 tiles into an int32 accumulator (exact); the activation zero point is removed at the
  end with the weight's column sums (``prepare``, once per weight); scales in float32 in the epilogue.
- fp8 per-tensor / per-channel / per-token: ``tl.dot`` of fp8 tiles into float32, scales in the epilogue.
- fp8 block-wise: each K tile's float32 partial product is scaled by its activation-group scale [BM] and weight-
  block scale [BN] before it is added (DeepSeek-V3 style).

Which schemes a backend declares is hardware-generation data of that backend (``backends/cuda/quant.py``,
``backends/rocm/quant.py``); the interpreter tier runs all of them (Triton 3.9's interpreter loads int8 and both
fp8 formats exactly; ``tests/backends/triton/test_scaled_gemm.py`` checks it).
"""
from __future__ import annotations

from dataclasses import replace
from typing import Callable, List

import torch
import triton.language as tl

from ...core.dispatch import KernelImpl
from ...core.scaled_gemm import QuantizeActivation, QuantizeCapability, ScaledGemmCapability
from .runtime import cdiv, compile_kernel
from .tuning import TritonTuning

__all__ = ["scaled_gemm_kernel", "build_scaled_gemm", "make_scaled_gemm_kernels", "BLOCK_SIZES"]

#: block sizes of block-wise scales the kernel serves (powers of two: a K tile divides the block)
BLOCK_SIZES = frozenset({32, 64, 128, 256})

_ACT = {"tensor": 0, "token": 1, "group": 2}
_WGT = {"tensor": 0, "channel": 1, "block": 2}


def scaled_gemm_kernel(
    x_ptr, xs_ptr, xz_ptr, w_ptr, ws_ptr, wsum_ptr, bias_ptr, out_ptr,   # xq [M, K], wq [N, K], out [M, N]
    M, N, K,
    stride_xm, stride_wn, stride_om, stride_xs, stride_ws,               # stride_xs/ws: row strides of 2-d scales
    IS_INT: tl.constexpr, ACT: tl.constexpr, WGT: tl.constexpr, HAS_ZP: tl.constexpr, HAS_BIAS: tl.constexpr,
    EVEN_K: tl.constexpr, QB: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    DOT_UPCAST: tl.constexpr,
):
    pid = tl.program_id(0)
    tiles_m = (M + BLOCK_M - 1) // BLOCK_M
    tiles_n = (N + BLOCK_N - 1) // BLOCK_N
    per_group = GROUP_M * tiles_n
    group = pid // per_group
    first_m = group * GROUP_M
    group_rows = tl.minimum(tiles_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % group_rows
    pid_n = (pid % per_group) // group_rows

    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)           # [BM]
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)           # [BN]
    rm_in = (rm % M).to(tl.int64)                          # wrapped: loads stay in bounds without a mask
    rn_in = (rn % N).to(tl.int64)
    rk = tl.arange(0, BLOCK_K)                             # [BK]
    x_ptrs = x_ptr + rm_in[:, None] * stride_xm + rk[None, :]      # [BM, BK]
    w_ptrs = w_ptr + rn_in[None, :] * stride_wn + rk[:, None]      # [BK, BN] = w.T tile

    if IS_INT:
        acc_MN = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.int32)
    else:
        acc_MN = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        if EVEN_K:
            x_MK = tl.load(x_ptrs)
            w_KN = tl.load(w_ptrs)
        else:
            # masked lanes load the byte 0 (+0.0 in both fp8 formats, 0 in int8) through a byte pointer: an
            # `other` literal cannot be cast to fp8
            k_ok = rk < K - k0
            x_MK = tl.load(x_ptrs.to(tl.pointer_type(tl.int8)), mask=k_ok[None, :], other=0).to(
                x_ptr.dtype.element_ty, bitcast=True)
            w_KN = tl.load(w_ptrs.to(tl.pointer_type(tl.int8)), mask=k_ok[:, None], other=0).to(
                w_ptr.dtype.element_ty, bitcast=True)
        if IS_INT:
            acc_MN += tl.dot(x_MK, w_KN, out_dtype=tl.int32)
        else:
            if DOT_UPCAST:
                x_MK = x_MK.to(tl.float32)
                w_KN = w_KN.to(tl.float32)
            if WGT == 2:
                g = k0 // QB
                xs_M = tl.load(xs_ptr + rm_in * stride_xs + g)                  # [BM] this K group's scales
                ws_N = tl.load(ws_ptr + (rn_in // QB) * stride_ws + g)          # [BN] this K block's scales
                acc_MN += tl.dot(x_MK, w_KN) * xs_M[:, None] * ws_N[None, :]
            else:
                acc_MN = tl.dot(x_MK, w_KN, acc_MN)
        x_ptrs += BLOCK_K
        w_ptrs += BLOCK_K
    if IS_INT:
        if HAS_ZP:
            wsum_N = tl.load(wsum_ptr + rn_in)                                  # [BN] int32 column sums
            if ACT == 0:
                acc_MN = acc_MN - tl.load(xz_ptr) * wsum_N[None, :]
            else:
                zp_M = tl.load(xz_ptr + rm_in)                                  # [BM]
                acc_MN = acc_MN - zp_M[:, None] * wsum_N[None, :]
        y_MN = acc_MN.to(tl.float32)
    else:
        y_MN = acc_MN
    if WGT != 2:
        if ACT == 0:
            y_MN = y_MN * tl.load(xs_ptr)
        else:
            y_MN = y_MN * tl.load(xs_ptr + rm_in * stride_xs)[:, None]
        if WGT == 0:
            y_MN = y_MN * tl.load(ws_ptr)
        else:
            y_MN = y_MN * tl.load(ws_ptr + rn_in)[None, :]
    if HAS_BIAS:
        b_N = tl.load(bias_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)
        y_MN = y_MN + b_N[None, :]
    out_ptrs = out_ptr + rm.to(tl.int64)[:, None] * stride_om + rn[None, :]
    tl.store(out_ptrs, y_MN.to(out_ptr.dtype.element_ty), mask=(rm[:, None] < M) & (rn[None, :] < N))


def build_scaled_gemm(spec, tuning: TritonTuning, interpret: bool) -> Callable:
    """``kernel(xq_MK, x_scale, x_zero | None, wq_NK, w_scale, prepared | None, bias_N | None, out_MN)``."""
    kern = compile_kernel(scaled_gemm_kernel, interpret)
    is_int = spec.scheme == "int8"
    act, wgt = _ACT[spec.act_granularity], _WGT[spec.weight_granularity]
    qb = spec.group_size if wgt == 2 else 1
    has_zp = not spec.act_symmetric
    opts = dict(tuning.launch_options)

    def scaled_gemm(xq_MK, x_scale, x_zero, wq_NK, w_scale, prepared, bias_N, out_MN):
        M, K = xq_MK.shape
        N = wq_NK.shape[0]
        if K == 0:
            return out_MN.copy_(bias_N.expand(M, N)) if bias_N is not None else out_MN.zero_()
        c = tuning.gemm_config(M)
        bk = min(c.block_k, qb) if wgt == 2 else c.block_k
        wsum = prepared if has_zp else None
        dummy = out_MN
        kern[(cdiv(M, c.block_m) * cdiv(N, c.block_n),)](
            xq_MK, x_scale, x_zero if has_zp else dummy, wq_NK, w_scale, wsum if wsum is not None else dummy,
            bias_N if bias_N is not None else dummy, out_MN, M, N, K,
            xq_MK.stride(0), wq_NK.stride(0), out_MN.stride(0),
            x_scale.stride(0) if x_scale.dim() == 2 else 0, w_scale.stride(0) if w_scale.dim() == 2 else 0,
            IS_INT=is_int, ACT=act, WGT=wgt, HAS_ZP=has_zp, HAS_BIAS=bias_N is not None, EVEN_K=K % bk == 0,
            QB=qb, BLOCK_M=c.block_m, BLOCK_N=c.block_n, BLOCK_K=bk, GROUP_M=c.group_m,
            DOT_UPCAST=tuning.dot_upcast and not is_int, num_warps=c.num_warps, num_stages=c.num_stages, **opts)
        return out_MN

    if has_zp:
        scaled_gemm.prepare = lambda wq_NK, w_scale: wq_NK.sum(dim=1, dtype=torch.int32)  # [N], once per weight
    return scaled_gemm


def make_scaled_gemm_kernels(backend_name: str, tuning: TritonTuning, interpret: bool,
                             capability: ScaledGemmCapability, *, priority: int = 20) -> List[KernelImpl]:
    """The scaled GEMM for ``backend_name`` with the ``capability`` its hardware generation allows, plus the
    activation quantize (the core's torch implementation, elementwise, on the backend's device)."""
    capability = replace(capability, block_sizes=BLOCK_SIZES)
    tier = "Triton interpreter" if interpret else "Triton"
    pre = f"{backend_name}.triton" if not interpret else backend_name
    out = [KernelImpl(op="scaled_gemm", backend=backend_name, name=f"{pre}.scaled_gemm",
                      build=lambda spec: build_scaled_gemm(spec, tuning, interpret), capability=capability,
                      priority=priority,
                      description=f"w8a8 GEMM: int8 (int32 accumulate) / fp8 (fp32 accumulate), per-tensor, "
                                  f"per-channel/token and block-wise scales ({tier}, tuning {tuning.name})")]
    schemes = capability.schemes
    if schemes:
        out.append(KernelImpl(
            op="quantize_activation", backend=backend_name, name=f"{pre}.quantize_activation.torch",
            build=QuantizeActivation.native, priority=priority,
            capability=QuantizeCapability(dtypes=capability.dtypes, schemes=schemes, refusals=capability.refusals),
            description=f"dynamic activation quantize in torch on the device (amax, scale, round, cast) ({tier}, "
                        f"tuning {tuning.name})"))
    return out
