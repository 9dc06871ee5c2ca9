"""cpu GEMM: oneDNN/MKL through torch.addmm / torch.mm, writing straight into the preallocated output."""
from __future__ import annotations

import torch

from ...core.gemm import GemmCapability, GemmSpec
from ...core.dispatch import KernelImpl

_FLOATS = frozenset({torch.float32, torch.float16, torch.bfloat16})


def _build(spec: GemmSpec):
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


KERNELS = [
    KernelImpl(op="gemm", backend="cpu", name="cpu.gemm.addmm", build=_build, priority=10,
               capability=GemmCapability(dtypes=_FLOATS, out_dtypes=_FLOATS),
               description="torch.addmm into the output buffer (oneDNN/MKL)"),
]
