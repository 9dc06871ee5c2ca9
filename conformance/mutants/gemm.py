"""Planted bugs of the dense GEMM.

The harness (:func:`gemm_kernel`) computes ``x @ w.T + b`` in float32 and rounds once to the output dtype, as
the contract asks; each bug is a realistic tiling, accumulation or epilogue mistake.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from ...core.gemm import GemmCapability, GemmSpec
from . import ALL_DTYPES, Mutant, register
from ._kit import TWINS, backend

__all__ = ["gemm_kernel", "BUGS", "CHUNK"]

#: the K chunk of the buggy half-type accumulator and the K tile of the tail bug
CHUNK = 32

_HALF = (torch.float16, torch.bfloat16)

#: bug -> (what the kernel gets wrong, the dtypes it is run in)
BUGS = {
    "half_accumulator": ("the running sum is kept in the input's half type: each 32-wide K chunk is summed in "
                         "float32, then added to an fp16/bf16 accumulator (fp32 inputs are unaffected, so the "
                         "mutant declares fp16 and bf16 only)", _HALF),
    "bias_dropped_m1": ("the bias is skipped on the M == 1 (decode) path", ALL_DTYPES),
    "k_tail_dropped": ("K is walked in tiles of 32 and the last partial tile (K % 32 != 0) is dropped", ALL_DTYPES),
    "out_rounding": ("the epilogue rounds through the wrong type: an fp16 result through bf16, a float32 result "
                     "of half inputs through the input type (no fp32 path exists to get wrong)", _HALF),
    "m_tail_unwritten": ("rows are processed in tiles of 16 and the last partial tile (M % 16 rows) is never "
                         "written", ALL_DTYPES),
}


def gemm_kernel(spec: GemmSpec, bug: Optional[str] = None):
    """The harness GEMM kernel ``kernel(x_MK, w_NK, bias_N, out_MN)`` with ``bug`` planted (``None``: correct)."""

    def kernel(x_MK, w_NK, bias_N, out_MN):
        m, k = x_MK.shape
        x, w = x_MK.float(), w_NK.float()
        if bug == "k_tail_dropped" and k % CHUNK:
            x, w = x[:, :k - k % CHUNK], w[:, :k - k % CHUNK]
        if bug == "half_accumulator" and x_MK.dtype in _HALF:
            acc = torch.zeros(m, w.shape[0], dtype=x_MK.dtype)
            for c0 in range(0, k, CHUNK):
                acc = (acc.float() + x[:, c0:c0 + CHUNK] @ w[:, c0:c0 + CHUNK].T).to(x_MK.dtype)
            y = acc.float()
        else:
            y = x @ w.T
        if bias_N is not None and not (bug == "bias_dropped_m1" and m == 1):
            y = y + bias_N.float()
        if bug == "out_rounding":
            if out_MN.dtype == torch.float16:
                y = y.to(torch.bfloat16).float()
            elif out_MN.dtype == torch.float32 and x_MK.dtype != torch.float32:
                y = y.to(x_MK.dtype).float()
        if bug == "m_tail_unwritten":
            full = m - m % 16
            out_MN[:full] = y[:full]
            return out_MN
        return out_MN.copy_(y)

    return kernel


def _backend(name: str, bug: Optional[str], dtypes: Tuple[torch.dtype, ...]):
    cap = GemmCapability(dtypes=frozenset(dtypes), out_dtypes=frozenset(dtypes) | {torch.float32})
    return backend(name, [("gemm", lambda spec: gemm_kernel(spec, bug), cap)])


for _bug, (_what, _dts) in BUGS.items():
    register(Mutant(name=f"gemm.{_bug}", family="gemm", op="gemm", description=_what, dtypes=_dts,
                    make_backend=lambda dts, _b=_bug: _backend(f"gemm.{_b}", _b, dts)))
TWINS["gemm"] = lambda dts: _backend("gemm.clean", None, dts)
