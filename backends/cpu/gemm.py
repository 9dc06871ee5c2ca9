"""cpu GEMM: oneDNN/MKL through torch.addmm / torch.mm, writing straight into the preallocated output."""
from __future__ import annotations

import torch

from ...core.gemm import GemmCapability, GemmSpec, GroupedGemmCapability, GroupedGemmSpec
from ...core.dispatch import KernelImpl

_FLOATS = frozenset({torch.float32, torch.float16, torch.bfloat16})


def _build(spec: GemmSpec):
    if spec.result_dtype == spec.dtype and spec.dtype != torch.float32:
        # One row (batch-1 decode, the LM head of one sequence): torch.mv's half-precision GEMV streams the weight
        # at 1.4x (layer GEMMs) to 2.6x (a 49152 x 576 LM head) the rate of oneDNN's mm at M = 1 on this
        # project's development machine (bf16, one thread); from two rows on, mm wins and stays.
        def gemm_half(x_MK, w_NK, bias_N, out_MN):
            if x_MK.shape[0] == 1:
                if bias_N is None:
                    torch.mv(w_NK, x_MK[0], out=out_MN[0])
                else:
                    torch.addmv(bias_N, w_NK, x_MK[0], out=out_MN[0])
                return out_MN
            if bias_N is None:
                return torch.mm(x_MK, w_NK.t(), out=out_MN)
            return torch.addmm(bias_N, x_MK, w_NK.t(), out=out_MN)
        return gemm_half
    if spec.result_dtype == spec.dtype:
        def gemm(x_MK, w_NK, bias_N, out_MN):
            if bias_N is None:
                return torch.mm(x_MK, w_NK.t(), out=out_MN)
            return torch.addmm(bias_N, x_MK, w_NK.t(), out=out_MN)
        return gemm

    def gemm_cast(x_MK, w_NK, bias_N, out_MN):
        y = torch.mm(x_MK.float(), w_NK.float().t())
        if bias_N is not None:
            y += bias_N
        return out_MN.copy_(y)
    return gemm_cast


def _build_grouped(spec: GroupedGemmSpec):
    """One torch.mm per expert with rows, written into slices of the output (ids are sorted first)."""
    if spec.mode == "segments":
        def grouped_gemm_segments(x_MK, w_ENK, sizes_E, out_MN):
            start = 0
            for e, n in enumerate(sizes_E.tolist()):
                if n:
                    torch.mm(x_MK[start:start + n], w_ENK[e].t(), out=out_MN[start:start + n])
                    start += n
            return out_MN
        return grouped_gemm_segments

    def grouped_gemm_ids(x_MK, w_ENK, ids_M, out_MN):
        sorted_ids, order = torch.sort(ids_M)
        sizes = torch.bincount(sorted_ids, minlength=w_ENK.shape[0]).tolist()
        x_sorted = x_MK.index_select(0, order)
        y_sorted = torch.empty_like(out_MN)
        start = 0
        for e, n in enumerate(sizes):
            if n:
                torch.mm(x_sorted[start:start + n], w_ENK[e].t(), out=y_sorted[start:start + n])
                start += n
        out_MN.index_copy_(0, order, y_sorted)
        return out_MN
    return grouped_gemm_ids


KERNELS = [
    KernelImpl(op="gemm", backend="cpu", name="cpu.gemm.addmm", build=_build, priority=10,
               capability=GemmCapability(dtypes=_FLOATS, out_dtypes=_FLOATS),
               description="torch.addmm into the output buffer (oneDNN/MKL); torch.mv for one half-precision row"),
    KernelImpl(op="grouped_gemm", backend="cpu", name="cpu.grouped_gemm.mm_per_expert", build=_build_grouped,
               priority=10, capability=GroupedGemmCapability(dtypes=_FLOATS),
               description="rows sorted by expert, one torch.mm per expert into output slices"),
]
