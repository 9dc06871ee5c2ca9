"""The vendor BLAS GEMM through torch (cuBLAS on cuda, hipBLAS on rocm), declared beside the shared Triton GEMM.

Shared by cuda and rocm like the Triton kernels; each backend registers it under its own name."""
from __future__ import annotations

import torch

from ...core.dispatch import KernelImpl
from ...core.gemm import GemmCapability, GemmSpec

__all__ = ["blas_gemm_kernel", "BLAS_PRIORITY", "TRITON_GEMM_MIN_FEATURES"]

#: below the Triton GEMM's priority: the BLAS runs where the Triton GEMM declares itself out of range
BLAS_PRIORITY = 10
#: the Triton GEMM is declared for K, N >= this; smaller or unstated shapes go to the BLAS (launch-bound, odd tiles)
TRITON_GEMM_MIN_FEATURES = 256


def _build(spec: GemmSpec):
    if spec.result_dtype == spec.dtype:
        def gemm_blas(x_MK, w_NK, bias_N, out_MN):
            if bias_N is None:
                return torch.mm(x_MK, w_NK.t(), out=out_MN)
            return torch.addmm(bias_N, x_MK, w_NK.t(), out=out_MN)
        return gemm_blas

    def gemm_blas_upcast(x_MK, w_NK, bias_N, out_MN):
        y_MN = torch.mm(x_MK.float(), w_NK.float().t())
        if bias_N is not None:
            y_MN += bias_N
        return out_MN.copy_(y_MN)
    return gemm_blas_upcast


def blas_gemm_kernel(backend: str, vendor_blas: str) -> KernelImpl:
    """The vendor BLAS GEMM (cuBLAS on cuda, hipBLAS/hipBLASLt on rocm: torch picks by build) for ``backend``."""
    floats = frozenset({torch.float32, torch.float16, torch.bfloat16})
    return KernelImpl(op="gemm", backend=backend, name=f"{backend}.gemm.{vendor_blas.lower()}", build=_build,
                      priority=BLAS_PRIORITY, capability=GemmCapability(dtypes=floats, out_dtypes=floats),
                      description=f"{vendor_blas} through torch.addmm; the declared alternative for GEMMs "
                                  f"outside the Triton GEMM's range (K or N < {TRITON_GEMM_MIN_FEATURES} or unknown)")
