"""Entry point of the ``triton-interpreter`` backend (group ``anyaccel.plugins``, name ``triton-interpreter``).

It registers exactly the kernels cuda and rocm launch (``backends/triton``), built for Triton's interpreter:
each program runs as numpy on CPU tensors. ``TRITON_INTERPRET`` need not be set; the interpreted kernels are
built explicitly, so a GPU backend in the same process still compiles.

The interpreter costs milliseconds per program and per loop step, so this tier is tuned for few programs with
large tiles, and it declares smaller limits than the GPU tiers (they show in ``anyaccel explain``).
"""
from __future__ import annotations

from typing import Optional

from ...core.backend import BackendDef
from ...plugins.hookspecs import hookimpl

ANYACCEL_API_VERSION = 1

NAME = "triton-interpreter"


def tuning():
    """The interpreter tier's tuning: big tiles, few programs, dot operands upcast (bfloat16 arithmetic)."""
    from ..triton.tuning import AttentionTuning, GemmConfig, Limits, TritonTuning

    return TritonTuning(
        name="interpreter",
        attention=AttentionTuning(block_m=64, block_m_decode=16, tile_n=64, split_kv_min_seq_len=512,
                                  split_kv_max_programs=64, split_kv_tiles_per_split=2, max_splits=4),
        gemm=(GemmConfig(16, 16, 256, 256, 1), GemmConfig(64, 64, 128, 128, 1), GemmConfig(1 << 62, 128, 128, 128, 1)),
        dot_upcast=True,
        rows_per_program=64,
        elementwise_block=4096,
        kv_write_tokens_per_program=64,
        rotary_rows_per_program=256,
        max_tile_elements=1 << 20,
        limits=Limits(max_head_size=256, max_hidden_size=16384, max_gemm_features=8192),
    )


def detect() -> Optional[str]:
    """None when triton (with its interpreter) imports here, else why not."""
    try:
        import triton  # noqa: F401
        from triton.runtime.interpreter import InterpretedFunction  # noqa: F401
    except Exception as e:  # ImportError, or a broken install
        return f"triton is not importable ({type(e).__name__}: {e}); install the 'test' extra (pip install triton)"
    return None


def _describe() -> dict:
    import triton

    return {"triton": triton.__version__, **tuning().describe()}


@hookimpl
def anyaccel_backends(ctx):
    return [BackendDef(name=NAME, vendor="anyaccel", device_type="cpu", kv_cache_layout="NHD",
                       distributed_backend="gloo", block_sizes=(16, 32, 64), detect=detect, describe=_describe,
                       # interpreted kernels take minutes per token of a 100M-parameter model: tiny models only
                       max_model_parameters=5_000_000,
                       description="the cuda/rocm Triton kernels run on CPU tensors by Triton's interpreter "
                                   "(conformance of GPU kernel code without a GPU; slow, smaller limits)")]


@hookimpl
def anyaccel_kernels(ctx):
    if detect() is not None:
        return []
    from ..triton import make_kernels

    return make_kernels(NAME, tuning(), interpret=True)
