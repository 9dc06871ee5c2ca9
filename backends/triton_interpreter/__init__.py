"""The ``triton-interpreter`` backend: the cuda/rocm Triton kernels, run on CPU tensors by Triton's interpreter so
every kernel is conformance-tested on a machine without a GPU."""
