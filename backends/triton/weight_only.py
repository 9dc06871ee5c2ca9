"""Weight-only quantized GEMM in Triton: ``out[M, N] = x[M, K] @ (codes * scale + offset)[N, K].T (+ bias[N])``.

Shape legend: M rows, N output features, K input features, C elements per chunk (32; 16 for Q6_K), J = C / 2
bytes of one 4-bit chunk.

``prepare`` (once, at load) turns any format into this kernel's layout through the core's exact
:func:`~anyaccel.core.weight_only.decompose`: integer codes (4-bit formats: ``[N, K/2]`` uint8, each 32-element
chunk's 16 bytes holding elements 0-15 in the low nibbles and 16-31 in the high ones, ggml's own Q4 order;
8-bit formats: ``[N, K]`` int8) and one float32 (scale, offset) pair per chunk and output column (exact: a
float16 scale times a small integer). A call dequantizes in the kernel without ever materialising the weight:
per chunk, ``x_chunk @ codes_chunk`` (integer codes are exact in every dot dtype) is scaled per column and the
offset enters as ``rowsum(x_chunk) * offset``, all in the float32 accumulator; the output is rounded once.
"""
from __future__ import annotations

from typing import Callable

import torch
import triton.language as tl

from ...core.weight_only import WEIGHT_FORMATS, decompose
from .runtime import cdiv, compile_kernel
from .tuning import TritonTuning

__all__ = ["weight_only_gemm_kernel", "prepare_weight", "launch_weight_only_gemm", "build_weight_only_gemm"]


def weight_only_gemm_kernel(
    x_ptr, q_ptr, s_ptr, o_ptr, bias_ptr, out_ptr,   # x [M, K], q [N, K/2] u8 or [N, K] i8, s/o [N, K/C], out [M, N]
    M, N, NCHUNK,
    stride_xm, stride_qn, stride_sn, stride_om,
    HAS_BIAS: tl.constexpr, FOUR_BIT: tl.constexpr, CHUNK: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DOT_UPCAST: tl.constexpr, F32_PREC: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)               # [BM]
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)               # [BN]
    rm_in = (rm % M).to(tl.int64)                              # wrapped: loads stay in bounds without a mask
    rn_in = (rn % N).to(tl.int64)
    x_rows = x_ptr + rm_in[:, None] * stride_xm                # [BM, 1]
    q_cols = q_ptr + rn_in[None, :] * stride_qn                # [1, BN]
    s_cols = s_ptr + rn_in * stride_sn                         # [BN]
    o_cols = o_ptr + rn_in * stride_sn
    acc_MN = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for c in range(0, NCHUNK):
        s_N = tl.load(s_cols + c)
        o_N = tl.load(o_cols + c)
        if FOUR_BIT:
            rj = tl.arange(0, CHUNK // 2)                      # [J]
            b_JN = tl.load(q_cols + c * (CHUNK // 2) + rj[:, None])          # [J, BN] uint8
            lo_JN = b_JN & 15                                  # elements 0..J-1 of the chunk
            hi_JN = b_JN >> 4                                  # elements J..C-1
            x_lo = tl.load(x_rows + c * CHUNK + rj[None, :])                 # [BM, J]
            x_hi = tl.load(x_rows + c * CHUNK + (CHUNK // 2) + rj[None, :])
            xs_M = tl.sum(x_lo.to(tl.float32), axis=1) + tl.sum(x_hi.to(tl.float32), axis=1)
            if DOT_UPCAST:
                part = tl.dot(x_lo.to(tl.float32), lo_JN.to(tl.float32), input_precision=F32_PREC)
                part = tl.dot(x_hi.to(tl.float32), hi_JN.to(tl.float32), part, input_precision=F32_PREC)
            else:
                part = tl.dot(x_lo, lo_JN.to(x_ptr.dtype.element_ty), input_precision=F32_PREC)
                part = tl.dot(x_hi, hi_JN.to(x_ptr.dtype.element_ty), part, input_precision=F32_PREC)
        else:
            rc = tl.arange(0, CHUNK)                           # [C]
            q_CN = tl.load(q_cols + c * CHUNK + rc[:, None])                  # [C, BN] int8
            x_MC = tl.load(x_rows + c * CHUNK + rc[None, :])                  # [BM, C]
            xs_M = tl.sum(x_MC.to(tl.float32), axis=1)
            if DOT_UPCAST:
                part = tl.dot(x_MC.to(tl.float32), q_CN.to(tl.float32), input_precision=F32_PREC)
            else:
                part = tl.dot(x_MC, q_CN.to(x_ptr.dtype.element_ty), input_precision=F32_PREC)
        acc_MN += part * s_N[None, :] + xs_M[:, None] * o_N[None, :]
    if HAS_BIAS:
        b_N = tl.load(bias_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)
        acc_MN = acc_MN + b_N[None, :]
    out_ptrs = out_ptr + rm.to(tl.int64)[:, None] * stride_om + rn[None, :]
    tl.store(out_ptrs, acc_MN.to(out_ptr.dtype.element_ty), mask=(rm[:, None] < M) & (rn[None, :] < N))


def prepare_weight(qw):
    """(codes, scale_N_KC f32, offset_N_KC f32, four_bit, chunk) for this kernel, from a canonical weight."""
    dc = decompose(qw)
    n, k = qw.shape
    four = WEIGHT_FORMATS[qw.format].bits == 4
    chunk = 16 if dc.chunk == 16 else 32
    rep = dc.chunk // chunk
    s = dc.scale.repeat_interleave(rep, dim=1).float().contiguous()
    o = dc.offset.repeat_interleave(rep, dim=1).float().contiguous()
    if four:
        c = dc.codes.to(torch.uint8).reshape(n, k // 32, 2, 16)
        q = (c[:, :, 0] | (c[:, :, 1] << 4)).reshape(n, k // 2).contiguous()
    else:
        q = dc.codes.to(torch.int8).contiguous()
    return q, s, o, four, chunk


def launch_weight_only_gemm(x_MK, packed, bias_N, out_MN, *, tuning: TritonTuning, interpret: bool):
    q, s, o, four, chunk = packed
    M, K = x_MK.shape
    N = s.shape[0]
    if x_MK.stride(1) != 1:
        x_MK = x_MK.contiguous()
    c = tuning.gemm_config(M)
    kern = compile_kernel(weight_only_gemm_kernel, interpret)
    kern[(cdiv(M, c.block_m), cdiv(N, c.block_n))](
        x_MK, q, s, o, bias_N if bias_N is not None else out_MN, out_MN, M, N, K // chunk,
        x_MK.stride(0), q.stride(0), s.stride(0), out_MN.stride(0),
        HAS_BIAS=bias_N is not None, FOUR_BIT=four, CHUNK=chunk, BLOCK_M=c.block_m, BLOCK_N=c.block_n,
        DOT_UPCAST=tuning.dot_upcast, F32_PREC=tuning.fp32_dot_precision, num_warps=c.num_warps,
        num_stages=c.num_stages, **dict(tuning.launch_options))
    return out_MN


def build_weight_only_gemm(spec, tuning: TritonTuning, interpret: bool) -> Callable:
    """``kernel(x_MK, packed, bias_N | None, out_MN)`` with ``kernel.prepare`` (the layout above)."""

    def weight_only_gemm(x_MK, packed, bias_N, out_MN):
        return launch_weight_only_gemm(x_MK, packed, bias_N, out_MN, tuning=tuning, interpret=interpret)

    weight_only_gemm.prepare = prepare_weight
    weight_only_gemm.layout = "triton.chunk_codes"
    return weight_only_gemm
