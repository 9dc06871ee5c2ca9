"""The cuda backend: shared Triton kernels with NVIDIA tuning, cuBLAS through torch, NCCL collectives."""
