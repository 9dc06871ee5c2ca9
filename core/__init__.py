"""The hardware-neutral core: op specs, validation, float64 references, capabilities, selection, KV cache.

Nothing here names a vendor or a backend, and nothing here imports the rest of anyaccel. The public surface is
the union of the op-family modules' ``__all__`` (see docs/op-contracts.md).
"""
from . import activation, attention, collectives, gemm, kv_cache, norm, rotary, scaled_gemm, weight_only
from .activation import *  # noqa: F401,F403
from .attention import *  # noqa: F401,F403
from .backend import KV_LAYOUTS, Backend, BackendDef
from .collectives import *  # noqa: F401,F403
from .dispatch import (Candidate, KernelImpl, Op, OpCapability, Selection, clear_selections, select,
                       selections)
from .errors import (AnyaccelError, InvalidArgumentError, PluginError, SelectionConflictError, StrictModeError,
                     UnsupportedError)
from .gemm import *  # noqa: F401,F403
from .kv_cache import *  # noqa: F401,F403
from .norm import *  # noqa: F401,F403
from .rotary import *  # noqa: F401,F403
from .scaled_gemm import *  # noqa: F401,F403
from .weight_only import *  # noqa: F401,F403
from .version import API_VERSION

#: Every op class the core defines, by op name (what KernelImpl.op refers to).
OPS = {cls.name: cls for cls in (
    gemm.Gemm, gemm.GroupedGemm, attention.Attention, attention.ReshapeAndCache, norm.RMSNorm, norm.LayerNorm,
    rotary.Rotary, activation.SiluAndMul, activation.GeluAndMul, scaled_gemm.ScaledGemm,
    scaled_gemm.QuantizeActivation, weight_only.WeightOnlyGemm)}

__all__ = [
    "API_VERSION", "KV_LAYOUTS", "OPS", "Backend", "BackendDef", "Candidate", "KernelImpl", "Op", "OpCapability",
    "Selection", "clear_selections", "select", "selections",
    "AnyaccelError", "InvalidArgumentError", "PluginError", "SelectionConflictError", "StrictModeError",
    "UnsupportedError",
    *attention.__all__, *collectives.__all__, *gemm.__all__, *kv_cache.__all__, *norm.__all__, *rotary.__all__,
    *activation.__all__, *scaled_gemm.__all__, *weight_only.__all__,
]
