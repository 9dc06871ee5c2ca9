"""Planted bugs of the scaled-GEMM family (``scaled_gemm`` and ``quantize_activation``).

The harness kernels follow the contract in plain torch: dequantize in float64 (exact), multiply, round once to the
output dtype; quantize by the documented rule in float32. Each bug is a mistake a quantized-kernel author makes:
a scale indexed by the wrong dimension, a zero point with the wrong sign, the two fp8 formats confused, a block
boundary off by one, truncation instead of rounding.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from ...core.scaled_gemm import (QMAX, QuantizeActivation, QuantizeCapability, QuantizeSpec, ScaledGemmCapability,
                                 ScaledGemmSpec, dequantize)
from . import ALL_DTYPES, Mutant, register
from ._kit import TWINS, backend

__all__ = ["GEMM_BUGS", "QUANT_BUGS", "scaled_gemm_kernel", "quantize_kernel"]

#: bug -> what the scaled-GEMM kernel gets wrong
GEMM_BUGS = {
    "w_scale_per_row": "the per-channel weight scale is indexed by the output row m instead of the column n",
    "zero_point_sign": "the activation zero point is added instead of subtracted ((x_q + zero) * scale)",
    "fp8_fnuz_as_fn": "e4m3fnuz operands are decoded as OCP e4m3fn (exponent bias 7 instead of 8: every value x2)",
    "block_off_by_one": "block-wise scales are looked up at (k + 1) // B: the last column of each block takes the "
                        "next block's scale",
    "token_scale_first_row": "per-token activation scales are read with stride 0: every row uses row 0's scale",
}
#: bug -> what the quantize kernel gets wrong
QUANT_BUGS = {
    "fnuz_qmax_448": "e4m3fnuz is scaled to OCP e4m3fn's maximum 448 instead of 240 (out-of-range values saturate)",
    "per_tensor_scale": "the per-token (or per-group) scale is one amax over the whole tensor",
    "zero_point_sign": "the zero point is subtracted from the quantized value instead of added",
    "truncate_not_round": "values are truncated toward zero (a bare cast) instead of rounded to nearest",
}


def _expand_rows(s: torch.Tensor, gran: str, rows: int, k: int, b: int, bug: Optional[str]) -> torch.Tensor:
    """Scales [R, K] for each element (float64), the harness's own indexing with ``bug`` planted."""
    s = s.double()
    if gran == "tensor":
        return s.reshape(1, 1).expand(rows, k)
    if gran in ("channel", "token"):
        return s.reshape(-1, 1).expand(rows, k)
    kidx = torch.arange(k)
    kg = (kidx + 1) // b if bug == "block_off_by_one" else kidx // b
    kg = kg.clamp(max=s.shape[1] - 1)
    if gran == "block":
        return s[(torch.arange(rows) // b)][:, kg]
    return s[:, kg]


def scaled_gemm_kernel(spec: ScaledGemmSpec, bug: Optional[str] = None):
    b = spec.group_size

    def kernel(xq_MK, x_scale, x_zero, wq_NK, w_scale, prepared, bias_N, out_MN):
        m, k = xq_MK.shape
        n = wq_NK.shape[0]
        xq, wq = xq_MK, wq_NK
        if bug == "fp8_fnuz_as_fn" and xq.dtype == torch.float8_e4m3fnuz:
            xq, wq = xq.view(torch.float8_e4m3fn), wq.view(torch.float8_e4m3fn)
        x = xq.double()
        if x_zero is not None:
            z = x_zero.double().reshape(-1, 1) if x_zero.numel() > 1 else x_zero.double().reshape(())
            x = x + z if bug == "zero_point_sign" else x - z
        xs = x_scale
        if bug == "token_scale_first_row" and spec.act_granularity == "token":
            xs = x_scale[:1].expand(m, 1)
        x = x * _expand_rows(xs, spec.act_granularity, m, k, b, bug)
        w = wq.double() * _expand_rows(w_scale, spec.weight_granularity, n, k, b, bug)
        y = x @ w.T
        if bug == "w_scale_per_row" and spec.weight_granularity == "channel":
            ws = w_scale.double().reshape(-1)
            y = y / ws.reshape(1, -1) * ws[torch.arange(m) % n].reshape(-1, 1)
        if bias_N is not None:
            y = y + bias_N.double()
        return out_MN.copy_(y)

    return kernel


def quantize_kernel(spec: QuantizeSpec, bug: Optional[str] = None):
    if bug is None:
        return QuantizeActivation.native(spec)
    from ...core import scaled_gemm as sg

    def kernel(x_MK, q_out_MK, scale_out, zero_out):
        s = spec
        if bug == "per_tensor_scale" and s.granularity != "tensor":
            q, sc, z = sg._quantize(x_MK, QuantizeSpec(s.dtype, s.scheme, "tensor", s.symmetric, s.group_size),
                                    torch.float32)
            q_out_MK.copy_(q)
            scale_out.copy_(sc.expand_as(scale_out))
            if zero_out is not None:
                zero_out.copy_(z.expand_as(zero_out))
            return
        qmax = dict(QMAX)
        if bug == "fnuz_qmax_448":
            qmax["fp8_e4m3fnuz"] = 448.0
        x = x_MK.float()
        rows = sg._rows_view(x, s.granularity, s.group_size)
        if s.symmetric:
            amax = rows.abs().amax(dim=1)
            sc = torch.where(amax > 0, amax / qmax[s.scheme], torch.ones_like(amax))
            z = None
        else:
            lo, hi = rows.amin(dim=1).clamp(max=0), rows.amax(dim=1).clamp(min=0)
            sc = torch.where(hi > lo, (hi - lo) / 255.0, torch.ones_like(hi))
            z = (-128 - torch.round(lo / sc)).clamp(-128, 127)
        v = rows / sc[:, None]
        if s.scheme == "int8":
            v = torch.trunc(v) if bug == "truncate_not_round" else torch.round(v)
            if z is not None:
                v = v - z[:, None] if bug == "zero_point_sign" else v + z[:, None]
            q = v.clamp(-128 if z is not None else -127, 127).to(torch.int8)
        else:
            if bug == "truncate_not_round":   # toward zero onto the e4m3 grid (3 mantissa bits)
                lowest = -6.0 if s.scheme == "fp8_e4m3fn" else -7.0   # the smallest normal exponent
                e = torch.floor(torch.log2(v.abs().clamp(min=1e-30))).clamp(min=lowest)
                ulp = torch.exp2(e - 3)
                v = torch.trunc(v / ulp) * ulp
            q = v.clamp(-qmax[s.scheme], qmax[s.scheme]).to(sg.QUANT_DTYPES[s.scheme])
        m, k = x_MK.shape
        if s.granularity == "group":
            g = sc.numel() // m
            q = q.reshape(m, g * s.group_size)[:, :k]
        q_out_MK.copy_(q.reshape(m, k))
        scale_out.copy_(sc.reshape(scale_out.shape))
        if zero_out is not None:
            zero_out.copy_(z.reshape(zero_out.shape).to(torch.int32))

    return kernel


def _gemm_backend(name: str, bug: Optional[str], dtypes: Tuple[torch.dtype, ...]):
    return backend(name, [("scaled_gemm", lambda spec: scaled_gemm_kernel(spec, bug),
                           ScaledGemmCapability(dtypes=frozenset(dtypes))),
                          ("quantize_activation", lambda spec: quantize_kernel(spec, None),
                           QuantizeCapability(dtypes=frozenset(dtypes)))])


def _quant_backend(name: str, bug: Optional[str], dtypes: Tuple[torch.dtype, ...]):
    return backend(name, [("scaled_gemm", lambda spec: scaled_gemm_kernel(spec, None),
                           ScaledGemmCapability(dtypes=frozenset(dtypes))),
                          ("quantize_activation", lambda spec: quantize_kernel(spec, bug),
                           QuantizeCapability(dtypes=frozenset(dtypes)))])


for _bug, _what in GEMM_BUGS.items():
    register(Mutant(name=f"scaled_gemm.{_bug}", family="scaled_gemm", op="scaled_gemm", description=_what,
                    dtypes=ALL_DTYPES, make_backend=lambda dts, _b=_bug: _gemm_backend(f"scaled_gemm.{_b}", _b, dts)))
for _bug, _what in QUANT_BUGS.items():
    register(Mutant(name=f"quantize_activation.{_bug}", family="scaled_gemm", op="quantize_activation",
                    description=_what, dtypes=ALL_DTYPES,
                    make_backend=lambda dts, _b=_bug: _quant_backend(f"quantize_activation.{_b}", _b, dts)))
TWINS["scaled_gemm"] = lambda dts: _gemm_backend("scaled_gemm.clean", None, dts)
