"""Dense GEMM ``out[M, N] = x[M, K] @ w[N, K].T (+ bias[N])`` in Triton; shared by cuda, rocm and the interpreter.

Shape legend: M rows, N output features, K input features; tiles BM x BN x BK.

Programs are ordered in groups of ``GROUP_M`` row tiles so neighbouring programs reuse the same weight tiles
from L2. Rows past M are clamped (wrapped) on load rather than masked, and masked on store; K is masked only
when it is not a multiple of BK. The accumulator is float32; the output is cast once at the end.
"""
from __future__ import annotations

from typing import Callable

import torch
import triton.language as tl

from .runtime import cdiv, compile_kernel
from .tuning import TritonTuning

__all__ = ["gemm_kernel", "launch_gemm", "build_gemm", "grouped_gemm_kernel", "build_grouped_gemm"]


def gemm_kernel(
    x_ptr, w_ptr, bias_ptr, out_ptr,            # x [M, K], w [N, K], bias [N], out [M, N]
    M, N, K,
    stride_xm, stride_wn, stride_om,
    HAS_BIAS: tl.constexpr, EVEN_K: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    DOT_UPCAST: tl.constexpr, F32_PREC: tl.constexpr,
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

    acc_MN = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        if EVEN_K:
            x_MK = tl.load(x_ptrs)
            w_KN = tl.load(w_ptrs)
        else:
            k_ok = rk < K - k0
            x_MK = tl.load(x_ptrs, mask=k_ok[None, :], other=0.0)
            w_KN = tl.load(w_ptrs, mask=k_ok[:, None], other=0.0)
        if DOT_UPCAST:
            x_MK = x_MK.to(tl.float32)
            w_KN = w_KN.to(tl.float32)
        acc_MN = tl.dot(x_MK, w_KN, acc_MN, input_precision=F32_PREC)
        x_ptrs += BLOCK_K
        w_ptrs += BLOCK_K
    if HAS_BIAS:
        b_N = tl.load(bias_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)
        acc_MN = acc_MN + b_N[None, :]
    out_ptrs = out_ptr + rm.to(tl.int64)[:, None] * stride_om + rn[None, :]
    tl.store(out_ptrs, acc_MN.to(out_ptr.dtype.element_ty), mask=(rm[:, None] < M) & (rn[None, :] < N))


def launch_gemm(x_MK: torch.Tensor, w_NK: torch.Tensor, bias_N, out_MN: torch.Tensor, *, tuning: TritonTuning,
                interpret: bool) -> torch.Tensor:
    M, K = x_MK.shape
    N = w_NK.shape[0]
    if M == 0:
        return out_MN
    if K == 0:
        return out_MN.copy_(bias_N.expand(M, N)) if bias_N is not None else out_MN.zero_()
    if x_MK.stride(1) != 1:
        x_MK = x_MK.contiguous()
    if w_NK.stride(1) != 1:
        w_NK = w_NK.contiguous()
    target = out_MN if out_MN.stride(1) == 1 else torch.empty((M, N), dtype=out_MN.dtype, device=out_MN.device)
    c = tuning.gemm_config(M)
    kern = compile_kernel(gemm_kernel, interpret)
    grid = (cdiv(M, c.block_m) * cdiv(N, c.block_n),)
    kern[grid](
        x_MK, w_NK, bias_N if bias_N is not None else target, target, M, N, K,
        x_MK.stride(0), w_NK.stride(0), target.stride(0),
        HAS_BIAS=bias_N is not None, EVEN_K=K % c.block_k == 0, BLOCK_M=c.block_m, BLOCK_N=c.block_n,
        BLOCK_K=c.block_k, GROUP_M=c.group_m, DOT_UPCAST=tuning.dot_upcast, F32_PREC=tuning.fp32_dot_precision,
        num_warps=c.num_warps, num_stages=c.num_stages, **dict(tuning.launch_options))
    if target is not out_MN:
        out_MN.copy_(target)
    return out_MN


def build_gemm(spec, tuning: TritonTuning, interpret: bool) -> Callable:
    """``kernel(x_MK, w_NK, bias_N | None, out_MN) -> out_MN`` for a GEMM spec."""

    def gemm(x_MK, w_NK, bias_N, out_MN):
        return launch_gemm(x_MK, w_NK, bias_N, out_MN, tuning=tuning, interpret=interpret)

    return gemm


def grouped_gemm_kernel(
    x_ptr, w_ptr, ids_ptr, out_ptr,             # x [M, K], w [E, N, K], ids [M], out [M, N]
    M, N, K, E,
    stride_xm, stride_we, stride_wn, stride_om,
    EVEN_K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    DOT_UPCAST: tl.constexpr, F32_PREC: tl.constexpr,
):
    """Each row tile walks the experts and multiplies only by those its rows use; rows of other experts load
    as zeros, so one float32 accumulator collects every row's own product. Cost grows with E (declared)."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    m_ok = rm < M
    rn_in = (rn % N).to(tl.int64)
    ids_M = tl.load(ids_ptr + rm, mask=m_ok, other=-1).to(tl.int32)
    x_base = x_ptr + rm.to(tl.int64)[:, None] * stride_xm + rk[None, :]
    acc_MN = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for e in range(0, E):
        rows = ids_M == e
        if tl.sum(rows.to(tl.int32), axis=0) > 0:
            # (rn_in * 0 + e) is e as int64: an expert stack can exceed 2**31 elements
            w_base = w_ptr + ((rn_in * 0 + e) * stride_we + rn_in * stride_wn)[None, :] + rk[:, None]
            for k0 in range(0, K, BLOCK_K):
                if EVEN_K:
                    x_MK = tl.load(x_base + k0, mask=rows[:, None], other=0.0)
                    w_KN = tl.load(w_base + k0)
                else:
                    k_ok = rk < K - k0
                    x_MK = tl.load(x_base + k0, mask=rows[:, None] & k_ok[None, :], other=0.0)
                    w_KN = tl.load(w_base + k0, mask=k_ok[:, None], other=0.0)
                if DOT_UPCAST:
                    x_MK = x_MK.to(tl.float32)
                    w_KN = w_KN.to(tl.float32)
                acc_MN = tl.dot(x_MK, w_KN, acc_MN, input_precision=F32_PREC)
    tl.store(out_ptr + rm.to(tl.int64)[:, None] * stride_om + rn[None, :], acc_MN.to(out_ptr.dtype.element_ty),
             mask=m_ok[:, None] & (rn[None, :] < N))


def build_grouped_gemm(spec, tuning: TritonTuning, interpret: bool) -> Callable:
    """``kernel(x_MK, w_ENK, groups, out_MN) -> out_MN`` (groups: ids [M] or segment sizes [E], per spec.mode)."""
    kern = compile_kernel(grouped_gemm_kernel, interpret)
    segments = spec.mode == "segments"
    opts = dict(tuning.launch_options)

    def grouped_gemm(x_MK, w_ENK, groups, out_MN):
        M, K = x_MK.shape
        E, N, _ = w_ENK.shape
        if M == 0:
            return out_MN
        if K == 0:
            return out_MN.zero_()
        if segments:   # sizes -> an id per row, on the device (no host sync)
            groups = torch.repeat_interleave(torch.arange(E, device=groups.device), groups, output_size=M)
        x_MK = x_MK if x_MK.stride(1) == 1 else x_MK.contiguous()
        w_ENK = w_ENK if w_ENK.stride(2) == 1 else w_ENK.contiguous()
        c = tuning.gemm_config(M)
        kern[(cdiv(M, c.block_m), cdiv(N, c.block_n))](
            x_MK, w_ENK, groups, out_MN, M, N, K, E, x_MK.stride(0), w_ENK.stride(0), w_ENK.stride(1),
            out_MN.stride(0), EVEN_K=K % c.block_k == 0, BLOCK_M=c.block_m, BLOCK_N=c.block_n, BLOCK_K=c.block_k,
            DOT_UPCAST=tuning.dot_upcast, F32_PREC=tuning.fp32_dot_precision, num_warps=c.num_warps,
            num_stages=c.num_stages, **opts)
        return out_MN

    return grouped_gemm
