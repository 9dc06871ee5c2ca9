"""Planted bugs of the grouped (mixture-of-experts) GEMM.

The harness (:func:`grouped_gemm_kernel`) finds each row's expert from either group encoding and computes
``x[m] @ w[expert(m)].T`` in float32, rounding once. Each bug is an off-by-one in the routing a kernel gets wrong.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from ...core.gemm import GroupedGemmCapability, GroupedGemmSpec
from . import Mutant, register
from ._kit import TWINS, backend

__all__ = ["grouped_gemm_kernel", "BUGS"]

BUGS = {
    "boundary_token": ("the first row of each expert's segment (after the first non-empty one) is sent to the "
                       "previous expert: an off-by-one in the segment offsets"),
    "empty_expert_compacted": ("experts with no rows are compacted away, but the weights are indexed by the "
                               "compacted position: every expert after an empty one uses the wrong weights"),
}


def grouped_gemm_kernel(spec: GroupedGemmSpec, bug: Optional[str] = None):
    """The harness kernel ``kernel(x_MK, w_ENK, groups, out_MN)`` with ``bug`` planted (``None``: correct)."""
    mode = spec.mode

    def kernel(x_MK, w_ENK, groups, out_MN):
        e = w_ENK.shape[0]
        if mode == "ids":
            ids = groups.long().clone()
        else:
            ids = torch.repeat_interleave(torch.arange(e), groups.long(), output_size=x_MK.shape[0])
        if bug == "boundary_token" and ids.numel() > 1:
            order = torch.argsort(ids, stable=True)
            sorted_ids = ids[order]
            shifted = sorted_ids.clone()
            first = torch.nonzero(sorted_ids[1:] != sorted_ids[:-1]).flatten() + 1
            shifted[first] = sorted_ids[first - 1]
            ids[order] = shifted
        elif bug == "empty_expert_compacted":
            used = torch.bincount(ids, minlength=e) > 0
            ids = torch.cumsum(used.long(), 0)[ids] - 1
        y = torch.einsum("mk,mnk->mn", x_MK.float(), w_ENK.float()[ids])
        return out_MN.copy_(y)

    return kernel


def _backend(name: str, bug: Optional[str], dtypes: Tuple[torch.dtype, ...]):
    cap = GroupedGemmCapability(dtypes=frozenset(dtypes))
    return backend(name, [("grouped_gemm", lambda spec: grouped_gemm_kernel(spec, bug), cap)])


for _bug, _what in BUGS.items():
    register(Mutant(name=f"grouped_gemm.{_bug}", family="grouped_gemm", op="grouped_gemm", description=_what,
                    make_backend=lambda dts, _b=_bug: _backend(f"grouped_gemm.{_b}", _b, dts)))
TWINS["grouped_gemm"] = lambda dts: _backend("grouped_gemm.clean", None, dts)
