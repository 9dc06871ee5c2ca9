"""Planted bugs of the weight-only quantized GEMM.

The harness (:func:`weight_only_kernel`) decodes the canonical packed weight itself -- codes, zero points, one
scale per group, the GGUF blocks through the core's exact dequantizer -- and multiplies in float32, rounding once.
Each bug is a decoding mistake a kernel author makes with these layouts.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from ...core.weight_only import WeightOnlyGemmCapability, WeightOnlyGemmSpec, dequantize, dequantize_gguf_blocks
from . import Mutant, register
from ._kit import TWINS, backend

__all__ = ["weight_only_kernel", "BUGS"]

BUGS = {
    "q4_interleaved_nibbles": ("Q4_0/Q4_1 blocks decoded as if the nibbles interleaved (element 2j in the low "
                               "nibble of byte j, 2j+1 in the high one) instead of elements 0-15 low, 16-31 high"),
    "zero_point_sign": "the zero point added instead of subtracted: w = (q + zero) * scale",
    "group_off_by_one": ("the group of element k taken as (k + 1) // G: the last element of every group uses the "
                         "next group's scale and zero point"),
    "scale_per_row": ("the [N, K/G] scales read as if stored [K/G, N] (a scale per row of the transposed "
                      "layout instead of per output column)"),
    "int4_nibble_order": "int4 codes read high nibble first (element 2j from the high nibble)",
    "q4_k_scale_min_swapped": "Q4_K's 6-bit sub-block scales and mins swapped when unpacking the 12 scale bytes",
}


def _int_weight(qw, bug: Optional[str]) -> torch.Tensor:
    n, k = qw.shape
    d = qw.data
    if qw.format == "int4":
        lo, hi = d & 0x0F, d >> 4
        if bug == "int4_nibble_order":
            lo, hi = hi, lo
        q = torch.stack([lo, hi], dim=-1).reshape(n, k).double()
        z0 = 8.0
    else:
        q = d.double()
        z0 = 0.0
    g = k if qw.group_size is None else qw.group_size
    ng = k // g
    s = qw.scales.double()
    z = torch.full((n, ng), z0, dtype=torch.float64) if qw.zeros is None else qw.zeros.double()
    if bug == "scale_per_row":
        s = s.reshape(-1).reshape(ng, n).t()
    idx = torch.arange(k) // g
    if bug == "group_off_by_one":
        idx = torch.clamp((torch.arange(k) + 1) // g, max=ng - 1)
    sign = 1.0 if bug == "zero_point_sign" else -1.0
    return (q + sign * z[:, idx]) * s[:, idx]


def _gguf_weight(qw, bug: Optional[str]) -> torch.Tensor:
    n, k = qw.shape
    if bug == "q4_interleaved_nibbles" and qw.format in ("q4_0", "q4_1"):
        off = 2 if qw.format == "q4_0" else 4
        b = qw.data.reshape(n, -1, off + 16).clone()
        qs = b[..., off:off + 16]
        vals = torch.stack([qs & 0x0F, qs >> 4], dim=-1).reshape(*qs.shape[:-1], 32)  # the interleaved reading
        b[..., off:off + 16] = vals[..., :16] | (vals[..., 16:] << 4)  # re-encode so the correct decoder reads it
        return dequantize_gguf_blocks(qw.format, b.reshape(n, -1)).reshape(n, k)
    if bug == "q4_k_scale_min_swapped" and qw.format == "q4_k":
        b = qw.data.reshape(n, -1, 144).clone()
        s = b[..., 4:16].clone()
        # scales of sub-blocks 0-3 live in bytes 0-3, their mins in bytes 4-7 (low 6 bits): swap them; the
        # high sub-blocks' 4-bit halves share bytes 8-11: swap the nibbles
        b[..., 4:8] = (s[..., 0:4] & 0xC0) | (s[..., 4:8] & 0x3F)
        b[..., 8:12] = (s[..., 4:8] & 0xC0) | (s[..., 0:4] & 0x3F)
        b[..., 12:16] = ((s[..., 8:12] & 0x0F) << 4) | (s[..., 8:12] >> 4)
        return dequantize_gguf_blocks("q4_k", b.reshape(n, -1)).reshape(n, k)
    return dequantize(qw)


def weight_only_kernel(spec: WeightOnlyGemmSpec, bug: Optional[str] = None):
    """The harness kernel ``kernel(x_MK, weight, bias_N, out_MN)`` with ``bug`` planted (``None``: correct)."""

    def kernel(x_MK, qw, bias_N, out_MN):
        w = _int_weight(qw, bug) if qw.scales is not None else _gguf_weight(qw, bug)
        y = x_MK.float() @ w.float().T
        if bias_N is not None:
            y += bias_N.float()
        return out_MN.copy_(y)

    return kernel


def _backend(name: str, bug: Optional[str], dtypes: Tuple[torch.dtype, ...]):
    cap = WeightOnlyGemmCapability(dtypes=frozenset(dtypes))
    return backend(name, [("weight_only_gemm", lambda spec: weight_only_kernel(spec, bug), cap)])


for _bug, _what in BUGS.items():
    register(Mutant(name=f"weight_only.{_bug}", family="weight_only", op="weight_only_gemm", description=_what,
                    make_backend=lambda dts, _b=_bug: _backend(f"weight_only.{_b}", _b, dts)))
TWINS["weight_only"] = lambda dts: _backend("weight_only.clean", None, dts)
