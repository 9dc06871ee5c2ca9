"""The hardware-neutral core: op specs, validation, float64 references, capabilities, selection, KV cache.

Nothing here names a vendor or a backend, and nothing here imports the rest of anyaccel. The public surface is
the union of the op-family modules' ``__all__`` (see docs/op-contracts.md).
"""
from . import attention, collectives, fused, gemm, kv_cache, weight_only
from .attention import *  # noqa: F401,F403
from .backend import KV_LAYOUTS, Backend, BackendDef
from .collectives import *  # noqa: F401,F403
from .dispatch import (Candidate, KernelImpl, Op, OpCapability, Selection, clear_selections, select,
                       selections)
from .errors import (AnyaccelError, InvalidArgumentError, PluginError, SelectionConflictError, StrictModeError,
                     UnsupportedError)
from .fused import *  # noqa: F401,F403
from .gemm import *  # noqa: F401,F403
from .kv_cache import *  # noqa: F401,F403
from .weight_only import *  # noqa: F401,F403
from .version import API_VERSION

#: Every op class the core defines, by op name (what KernelImpl.op refers to).
OPS = {cls.name: cls for cls in (
    gemm.Gemm, gemm.GroupedGemm, attention.Attention, attention.ReshapeAndCache, fused.RMSNorm, fused.LayerNorm,
    fused.Rotary, fused.SiluAndMul, fused.GeluAndMul, weight_only.WeightOnlyGemm)}

__all__ = [
    "API_VERSION", "KV_LAYOUTS", "OPS", "Backend", "BackendDef", "Candidate", "KernelImpl", "Op", "OpCapability",
    "Selection", "clear_selections", "select", "selections",
    "AnyaccelError", "InvalidArgumentError", "PluginError", "SelectionConflictError", "StrictModeError",
    "UnsupportedError",
    *attention.__all__, *collectives.__all__, *fused.__all__, *gemm.__all__, *kv_cache.__all__,
    *weight_only.__all__,
]
