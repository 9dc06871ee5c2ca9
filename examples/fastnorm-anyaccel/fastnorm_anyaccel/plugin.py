"""Entry point of the fastnorm kernel provider (group ``anyaccel.plugins``, name ``fastnorm``).

A kernel provider implements only ``anyaccel_kernels`` and names a backend another plugin declares. Selection
orders candidates by declared priority: for the shapes its capability accepts, this kernel (priority 20) wins over
cpu's own (priority 10); for the others it answers with a reason and cpu's kernel is chosen.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, List

import torch

from anyaccel.core import KernelImpl, NormCapability, RMSNormSpec
from anyaccel.plugins import hookimpl

ANYACCEL_API_VERSION = 1

#: The backend this provider extends.
TARGET = "cpu"
#: Rows normalized per block: a block's float32 working copy stays in cache (256 x 4096 x 4 B = 4 MiB).
ROWS_PER_BLOCK = 256

__all__ = ["WideNormCapability", "TARGET", "ROWS_PER_BLOCK", "kernels"]


@dataclass(frozen=True)
class WideNormCapability(NormCapability):
    """A norm capability with a lower bound on the hidden size.

    :param min_hidden_size: the smallest H this kernel serves (narrower rows are faster on the backend's own).
    """

    min_hidden_size: int = 1024

    def not_supported_reasons(self, spec: Any) -> List[str]:
        reasons = super().not_supported_reasons(spec)
        h = getattr(spec, "hidden_size", None)
        if h is not None and h < self.min_hidden_size:
            reasons.append(f"hidden_size {h} is below min_hidden_size {self.min_hidden_size}")
        return reasons


def _build(spec: RMSNormSpec):
    eps = spec.eps

    def rms_norm_row_blocked(x_NH, w_H, residual_NH, out_NH, residual_out_NH):
        w32_H = w_H.float()
        for r0 in range(0, x_NH.shape[0], ROWS_PER_BLOCK):
            rows = slice(r0, r0 + ROWS_PER_BLOCK)
            h_BH = x_NH[rows].to(torch.float32, copy=True)      # a copy even for float32: out may be x
            if residual_NH is not None:
                h_BH += residual_NH[rows]
                residual_out_NH[rows] = h_BH
            inv_B1 = torch.rsqrt(h_BH.square().mean(-1, keepdim=True).add_(eps))
            out_NH[rows] = h_BH.mul_(inv_B1).mul_(w32_H)
        return out_NH

    return rms_norm_row_blocked


def kernels() -> List[KernelImpl]:
    return [KernelImpl(op="rms_norm", backend=TARGET, name="fastnorm.rms_norm.row_blocked", build=_build,
                       priority=20,
                       capability=WideNormCapability(dtypes=frozenset({torch.float32, torch.float16, torch.bfloat16}),
                                                     fused_residual=True, min_hidden_size=1024),
                       description=f"float32 math on blocks of {ROWS_PER_BLOCK} rows; fused residual add")]


@hookimpl
def anyaccel_kernels(ctx):
    if TARGET not in ctx.backends:  # the backend we extend is not loaded (allowlisted out): contribute nothing
        return []
    return kernels()
