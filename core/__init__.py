"""The hardware-neutral core: op specs, validation, float64 references, capabilities, selection, KV cache.

Nothing here names a vendor or a backend, and nothing here imports the rest of anyaccel.
"""
from .backend import KV_LAYOUTS, Backend, BackendDef
from .dispatch import (Candidate, KernelImpl, Op, OpCapability, Selection, clear_selections, select,
                       selections)
from .errors import (AnyaccelError, InvalidArgumentError, PluginError, SelectionConflictError, StrictModeError,
                     UnsupportedError)
from .gemm import Gemm, GemmCapability, GemmSpec, gemm_reference
from .version import API_VERSION

__all__ = [
    "API_VERSION", "KV_LAYOUTS", "Backend", "BackendDef", "Candidate", "KernelImpl", "Op", "OpCapability",
    "Selection", "clear_selections", "select", "selections",
    "AnyaccelError", "InvalidArgumentError", "PluginError", "SelectionConflictError", "StrictModeError",
    "UnsupportedError",
    "Gemm", "GemmCapability", "GemmSpec", "gemm_reference",
]
