"""Entry point of the ``triton-interpreter`` backend (group ``anyaccel.plugins``, name ``triton-interpreter``).

It registers exactly the kernels cuda and rocm launch (``backends/triton``), built for Triton's interpreter:
each program runs as numpy on CPU tensors. ``TRITON_INTERPRET`` need not be set; the interpreted kernels are
built explicitly, so a GPU backend in the same process still compiles.

The interpreter costs milliseconds per program and per loop step, so this tier is tuned for few programs with
large tiles, and it declares smaller limits than the GPU tiers (they show in ``anyaccel explain``).

``ANYACCEL_INTERPRETER_TUNING`` runs the GPU tile configurations instead. Its value names one GPU tuning
(:data:`GPU_TUNINGS`: ``sm80`` and ``sm90`` from the cuda backend's table, ``gfx942`` from the rocm backend's);
the kernels are then launched with that tuning's tiles, GEMM configs, split-KV thresholds and launch options,
so CI executes the exact constexpr combinations a GPU would compile, on CPU tensors. Two things stay the
interpreter's own: ``dot_upcast`` (the interpreter has no bfloat16 dot) and the declared :class:`Limits` (the
same cases are claimed, whatever the tiles). Unset or empty means the interpreter's own big-tile tuning. The
variable is read each time the plugin builds its kernels (at discovery), and an unknown value raises a
``ValueError`` naming the accepted ones, which quarantines the plugin with that message.
"""
from __future__ import annotations

import os
from dataclasses import replace
from typing import Callable, Dict, Optional

from ...core.backend import BackendDef
from ...plugins.hookspecs import hookimpl

ANYACCEL_API_VERSION = 1

NAME = "triton-interpreter"


#: The environment variable that forces a GPU tuning onto the interpreter (see the module docstring).
TUNING_ENV = "ANYACCEL_INTERPRETER_TUNING"


def _sm(major: int, minor: int) -> Callable[[], object]:
    def make():
        from ..cuda.tuning import tuning_for

        return tuning_for((major, minor))
    return make


def _gfx(arch: str) -> Callable[[], object]:
    def make():
        from ..rocm.tuning import tuning_for

        return tuning_for(arch)
    return make


#: The GPU tunings ``ANYACCEL_INTERPRETER_TUNING`` accepts, by value: each builds the tuning that the cuda or
#: rocm backend would pick on that GPU (the tables themselves live with those backends and are not copied).
GPU_TUNINGS: Dict[str, Callable[[], object]] = {"sm80": _sm(8, 0), "sm90": _sm(9, 0), "gfx942": _gfx("gfx942")}


def tuning():
    """The tuning the interpreted kernels are built with: the interpreter's own, or the GPU tuning that
    ``ANYACCEL_INTERPRETER_TUNING`` names (with the interpreter's ``dot_upcast`` and declared limits)."""
    own = interpreter_tuning()
    forced = os.environ.get(TUNING_ENV, "").strip()
    if not forced:
        return own
    return gpu_tuning(forced, own)


def gpu_tuning(name: str, own=None):
    """The GPU tuning ``name`` (a key of :data:`GPU_TUNINGS`) made runnable by the interpreter.

    Raises ``ValueError`` naming the accepted values when ``name`` is not one of them.
    """
    make = GPU_TUNINGS.get(name.strip().lower())
    if make is None:
        raise ValueError(f"{TUNING_ENV}={name!r} is not a known GPU tuning; expected one of "
                         f"{', '.join(sorted(GPU_TUNINGS))} (or unset for the interpreter's own tuning)")
    own = own if own is not None else interpreter_tuning()
    gpu = make()
    # the GPU's tiles and launch options; the interpreter's bf16-capable dots and its declared limits
    return replace(gpu, name=f"interpreter-{gpu.name}", dot_upcast=True, limits=own.limits)


def interpreter_tuning():
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
    from ..triton.scaled_gemm import make_scaled_gemm_kernels
    from ...core.scaled_gemm import ScaledGemmCapability

    t = tuning()
    # the interpreter represents int8, e4m3fn and e4m3fnuz exactly: every scheme and granularity is declared
    quant = ScaledGemmCapability(dtypes=frozenset(t.limits.dtypes), max_features=t.limits.max_gemm_features)
    return make_kernels(NAME, t, interpret=True) + make_scaled_gemm_kernels(NAME, t, True, quant)
