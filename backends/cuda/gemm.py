"""cuda GEMMs: the shared Triton GEMM (from ``make_kernels``) and cuBLAS through torch as the declared
alternative for shapes outside the Triton GEMM's range; priority and ranges show in ``anyaccel explain``."""
from __future__ import annotations

from ..triton.blas import TRITON_GEMM_MIN_FEATURES, blas_gemm_kernel

__all__ = ["KERNELS", "TRITON_GEMM_MIN_FEATURES"]

KERNELS = [blas_gemm_kernel("cuda", "cuBLAS")]
