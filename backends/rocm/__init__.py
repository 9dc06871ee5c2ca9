"""The rocm backend: shared Triton kernels with AMD tuning, hipBLAS through torch, RCCL collectives."""
