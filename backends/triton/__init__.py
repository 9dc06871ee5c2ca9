"""The one source of Triton kernels, shared by the cuda and rocm backends and run on CPU tensors by the
``triton-interpreter`` tier. Backends pass their own :class:`TritonTuning` to :func:`make_kernels`.

Importing this package does not import triton: :func:`make_kernels` does, so a backend without triton installed
still loads (and says so) instead of being quarantined.
"""
from .kernels import PRIORITY, ShapeRangeGemmCapability, make_kernels
from .tuning import AttentionTuning, GemmConfig, Limits, TritonTuning

__all__ = ["make_kernels", "ShapeRangeGemmCapability", "PRIORITY", "TritonTuning", "AttentionTuning", "GemmConfig",
           "Limits"]
