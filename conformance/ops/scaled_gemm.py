"""Conformance cases of the scaled-GEMM family: ``scaled_gemm`` (w8a8) and ``quantize_activation``.

**scaled_gemm.** Activations ``x ~ N(0, 1)`` with row magnitudes spread over ``e**N(0, 0.5)`` and weights
``w ~ N(0, 1/K)`` with row (and block) magnitudes spread the same way are quantized by the core's own rules
(:func:`~anyaccel.core.scaled_gemm.quantize_reference`, :func:`~anyaccel.core.scaled_gemm.quantize_weight`), so
every scale differs from its neighbours and a scale read from the wrong row, column or block shows. The float64
reference multiplies the *exactly dequantized* operands; the error model is then the dense GEMM's (class
``scaled_gemm``): the output rounding plus ``c * u32 * sqrt(K) * (|x_hat| @ |w_hat|^T + |b|)`` for the fp32
accumulation and the float32 scale products. **Exact** cases take small integers (|v| <= 8, exact in int8 and in
both fp8 formats) with power-of-two scales and zero points: a correct kernel is exact up to the final rounding
(class ``exact``) in every output dtype. Fixed cases: every scheme x granularity (including block-wise fp8 with
K and N not multiples of the block, and an activation zero point), M = 1 decode rows, a 3-d ``x``, every output
dtype. Drawn cases stay within the backend's claims (three in four), one in four ignores them so a refusal is
checked too.

**quantize_activation.** The call dequantizes its own result, ``(q - zero) * scale``, and returns it with the
scale; the reference is the input itself with a per-element allowance of half a quantization step (int8: half
the reference scale; fp8: half an e4m3 ulp, ``2**-4 |x|``, or half the smallest subnormal times the scale), plus
``4 u32`` of the float32 scale. The scale is compared with the reference scale to ``4 u32``.
"""
from __future__ import annotations

import math
from typing import Any, Dict, List, Optional, Tuple

import torch

from ...core.scaled_gemm import (QUANT_DTYPES, QuantizeActivation, QuantizeSpec, ScaledGemm, ScaledGemmSpec,
                                 dequantize, quantize_reference, quantize_weight, scale_shape, scaled_gemm_reference)
from ...core.validation import dtype_name
from ..cases import OpCase, poison
from ..tolerances import UNIT_ROUNDOFF, allowance, with_allowance

__all__ = ["FAMILY", "fixed_cases", "case_strategy", "make_case", "make_quantize_case", "COMBOS"]

FAMILY = "scaled_gemm"

_U32 = UNIT_ROUNDOFF[torch.float32]

#: (scheme, weight granularity, activation granularity, act_symmetric): every combination the contract defines
COMBOS: Tuple[Tuple[str, str, str, bool], ...] = (
    ("int8", "channel", "token", True), ("int8", "tensor", "tensor", True), ("int8", "channel", "token", False),
    ("int8", "tensor", "tensor", False), ("int8", "channel", "tensor", True),
    ("fp8_e4m3fn", "channel", "token", True), ("fp8_e4m3fn", "tensor", "tensor", True),
    ("fp8_e4m3fn", "block", "group", True),
    ("fp8_e4m3fnuz", "channel", "token", True), ("fp8_e4m3fnuz", "tensor", "tensor", True),
    ("fp8_e4m3fnuz", "block", "group", True),
)


def _spread(g: torch.Generator, rows: int) -> torch.Tensor:
    return torch.exp(0.5 * torch.randn(rows, 1, generator=g, dtype=torch.float64))


def _exact_operands(g: torch.Generator, spec: ScaledGemmSpec, m: int, k: int, n: int):
    qdt = spec.quant_dtype
    xq = torch.randint(-8, 9, (m, k), generator=g).to(qdt)
    wq = torch.randint(-8, 9, (n, k), generator=g).to(qdt)

    def pow2(shape):
        return (2.0 ** -torch.randint(1, 5, shape, generator=g)).float()

    b = spec.group_size
    xs = pow2(scale_shape(spec.act_granularity, m, k, b))
    ws = pow2(scale_shape(spec.weight_granularity, n, k, b))
    xz = None if spec.act_symmetric else torch.randint(-8, 9, xs.shape, generator=g).to(torch.int32)
    return xq, xs, xz, wq, ws


def make_case(dtype: torch.dtype, scheme: str, wg: str, ag: str, sym: bool, lead: Tuple[int, ...], k: int, n: int,
              bias: bool, block_size: int = 128, label: str = "", exact: bool = False) -> OpCase:
    """One scaled-GEMM case ``x_q[*lead, K]``, ``w_q[N, K]`` with output (and bias) dtype ``dtype``."""
    spec = ScaledGemmSpec(dtype=dtype, scheme=scheme, weight_granularity=wg, act_granularity=ag,
                          act_symmetric=sym, group_size=block_size, has_bias=bias, in_features=k, out_features=n)
    m = math.prod(lead)

    def make(device: torch.device, seed: int) -> Dict[str, Any]:
        g = torch.Generator().manual_seed(seed)
        if exact:
            xq, xs, xz, wq, ws = _exact_operands(g, spec, m, k, n)
            bb = (torch.randint(-64, 65, (n,), generator=g) * 2.0 ** -4) if bias else None
        else:
            x = torch.randn(m, k, generator=g, dtype=torch.float64) * _spread(g, m)
            if not sym:
                x = x + 0.7 * _spread(g, m)        # a skewed range: the zero point is far from 0
            w = torch.randn(n, k, generator=g, dtype=torch.float64) / k ** 0.5 * _spread(g, n)
            if wg == "block":                      # column blocks of different magnitudes too
                w = w * _spread(g, math.ceil(k / block_size)).repeat_interleave(block_size, 0)[:k].T
            qs = QuantizeSpec(dtype=torch.float32, scheme=scheme, granularity=ag, symmetric=sym,
                              group_size=block_size)
            xq, xs, xz = quantize_reference(qs, x.float())
            wq, ws = quantize_weight(w.float(), scheme, wg, block_size)
            bb = torch.randn(n, generator=g) if bias else None
        if ag != "tensor":
            xs = xs.reshape(*lead, xs.shape[-1])
            xz = None if xz is None else xz.reshape(*lead, 1)
        return {"x_q": xq.reshape(*lead, k).to(device), "x_scale": xs.to(device),
                "x_zero": None if xz is None else xz.to(device), "weight": wq.to(device),
                "weight_scale": ws.to(device), "bias": None if bb is None else bb.to(device=device, dtype=dtype)}

    def call(op: ScaledGemm, inp: Dict[str, Any]) -> Tuple[torch.Tensor, ...]:
        prepared = op.prepare(inp["weight"], inp["weight_scale"])
        out = poison(torch.empty(*lead, n, dtype=dtype, device=inp["x_q"].device))
        y = op(inp["x_q"], inp["x_scale"], inp["weight"], inp["weight_scale"], inp["bias"], inp["x_zero"],
               prepared, out=out)
        return (y,)

    def reference(inp: Dict[str, Any]) -> Tuple[torch.Tensor, ...]:
        cpu = {key: (v.cpu() if isinstance(v, torch.Tensor) else v) for key, v in inp.items()}
        ref = scaled_gemm_reference(spec, cpu["x_q"], cpu["x_scale"], cpu["weight"], cpu["weight_scale"],
                                    cpu["bias"], cpu["x_zero"])
        if exact:
            return (ref,)
        return (with_allowance(ref, allowance("scaled_gemm", dtype, acc_mag=math.sqrt(k) * magnitude(spec, cpu))),)

    shape = "x".join(str(s) for s in lead)
    zp = " zp" if not sym else ""
    blk = f" B={block_size}" if wg == "block" else ""
    name = (f"{label + ' ' if label else ''}{scheme} w={wg} x={ag}{zp}{blk} x=[{shape}, {k}] N={n}"
            f"{' bias' if bias else ''}")
    return OpCase(op=ScaledGemm, spec=spec, name=name, tolerance_class="exact" if exact else "scaled_gemm",
                  reduction=k, make=make, call=call, reference=reference,
                  tags=("fixed",) if label else ("drawn",))


def magnitude(spec: ScaledGemmSpec, inp: Dict[str, Any]) -> torch.Tensor:
    """``|x_hat| @ |w_hat|^T + |b|`` on the exactly dequantized operands (float64; the cases are small)."""
    k = inp["x_q"].shape[-1]
    xs = inp["x_scale"]
    xs = xs.reshape(-1, xs.shape[-1]) if xs.dim() > 1 else xs
    xz = inp["x_zero"]
    xz = None if xz is None else (xz.reshape(-1) if xz.dim() > 1 else xz)
    x = dequantize(inp["x_q"].reshape(-1, k), xs, spec.act_granularity, spec.group_size, xz).abs()
    w = dequantize(inp["weight"], inp["weight_scale"], spec.weight_granularity, spec.group_size).abs()
    mag = x @ w.T
    if inp["bias"] is not None:
        mag = mag + inp["bias"].double().abs()
    return mag.reshape(*inp["x_q"].shape[:-1], w.shape[0])


# -------------------------------------------------------------------------------------------- quantize cases

#: half the smallest subnormal of each fp8 format (e4m3fn: 2**-9, e4m3fnuz: 2**-10), in units of the scale
_FP8_HALF_SUBNORMAL = {"fp8_e4m3fn": 2.0 ** -10, "fp8_e4m3fnuz": 2.0 ** -11}
#: half an ulp of e4m3 relative to the value (3 mantissa bits)
_FP8_HALF_ULP = 2.0 ** -4


def make_quantize_case(dtype: torch.dtype, scheme: str, granularity: str, sym: bool, lead: Tuple[int, ...], k: int,
                       group_size: int = 128, label: str = "") -> OpCase:
    spec = QuantizeSpec(dtype=dtype, scheme=scheme, granularity=granularity, symmetric=sym, group_size=group_size)

    def make(device: torch.device, seed: int) -> Dict[str, Any]:
        g = torch.Generator().manual_seed(seed)
        m = math.prod(lead)
        x = torch.randn(m, k, generator=g, dtype=torch.float64) * _spread(g, m)
        if granularity == "group":
            x = x * _spread(g, math.ceil(k / group_size)).repeat_interleave(group_size, 0)[:k].T
        if not sym:
            x = x + 0.7 * _spread(g, m)
        return {"x": x.reshape(*lead, k).to(device=device, dtype=dtype)}

    def _dequant(q: torch.Tensor, s: torch.Tensor, z: Optional[torch.Tensor]) -> torch.Tensor:
        q2 = q.reshape(-1, k).cpu()
        s2 = s.cpu().reshape(-1, s.shape[-1]) if s.dim() > 1 else s.cpu()
        z2 = None if z is None else (z.cpu().reshape(-1) if z.dim() > 1 else z.cpu())
        return dequantize(q2, s2, granularity, group_size, z2).reshape(*lead, k)

    def call(op: QuantizeActivation, inp: Dict[str, Any]) -> Tuple[torch.Tensor, ...]:
        out = poison(torch.empty(inp["x"].shape, dtype=QUANT_DTYPES[scheme], device=inp["x"].device)) \
            if scheme == "int8" else torch.full(inp["x"].shape, float("nan"), device=inp["x"].device).to(
                QUANT_DTYPES[scheme])
        q, s, z = op(inp["x"], out=out)
        return (_dequant(q, s, z), s.double().cpu())

    def reference(inp: Dict[str, Any]) -> Tuple[torch.Tensor, ...]:
        x = inp["x"].cpu()
        _, s_ref, _ = quantize_reference(spec, x)
        xd = x.double()
        s2 = s_ref.reshape(-1, s_ref.shape[-1]) if s_ref.dim() > 1 else s_ref
        step = dequantize(torch.ones(math.prod(lead), k, dtype=torch.float64), s2, granularity,
                          group_size).reshape(*lead, k)                    # the reference scale of each element
        if scheme == "int8":
            bound = 0.5 * step + 4 * _U32 * xd.abs() + 128 * 4 * _U32 * step
        else:
            bound = _FP8_HALF_ULP * xd.abs() + _FP8_HALF_SUBNORMAL[scheme] * step + 4 * _U32 * xd.abs()
        return (with_allowance(xd, bound), with_allowance(s_ref.double(), 4 * _U32 * s_ref.double().abs()))

    shape = "x".join(str(s) for s in lead)
    g = f" B={group_size}" if granularity == "group" else ""
    name = f"{label + ' ' if label else ''}quantize {scheme} {granularity}{'' if sym else ' zp'}{g} x=[{shape}, {k}]"
    return OpCase(op=QuantizeActivation, spec=spec, name=name, tolerance_class="quantize", reduction=k, make=make,
                  call=call, reference=reference, tags=("fixed",) if label else ("drawn",))


# ---------------------------------------------------------------------------------------------------- lists


def fixed_cases(backend: Any, dtype: torch.dtype) -> List[OpCase]:
    cases: List[OpCase] = []
    for scheme, wg, ag, sym in COMBOS:
        blocked = wg == "block"
        k, n = (200, 96) if blocked else (96, 40)      # block: a partial last block along K and N
        bs = 64 if blocked else 128
        cases.append(make_case(dtype, scheme, wg, ag, sym, (7,), k, n, True, bs, label="combo"))
        cases.append(make_case(dtype, scheme, wg, ag, sym, (5,), k, n, not sym, bs, label="exact", exact=True))
    cases += [
        make_case(dtype, "int8", "channel", "token", True, (1,), 256, 64, True, label="decode M=1"),
        make_case(dtype, "fp8_e4m3fn", "channel", "token", True, (1,), 256, 64, False, label="decode M=1"),
        make_case(dtype, "fp8_e4m3fnuz", "block", "group", True, (1,), 256, 130, True, label="decode M=1"),
        make_case(dtype, "int8", "channel", "token", False, (2, 3), 72, 24, True, label="3-d x"),
        make_case(dtype, "fp8_e4m3fn", "block", "group", True, (17,), 128, 128, False, 128, label="B=128 one block"),
    ]
    for scheme in ("int8", "fp8_e4m3fn", "fp8_e4m3fnuz"):
        cases.append(make_quantize_case(dtype, scheme, "token", True, (6,), 80, label="fixed"))
        cases.append(make_quantize_case(dtype, scheme, "tensor", True, (2, 3), 40, label="fixed"))
    cases.append(make_quantize_case(dtype, "int8", "token", False, (5,), 64, label="fixed"))
    cases.append(make_quantize_case(dtype, "int8", "tensor", False, (4,), 48, label="fixed"))
    cases.append(make_quantize_case(dtype, "fp8_e4m3fn", "group", True, (3,), 200, 64, label="fixed"))
    cases.append(make_quantize_case(dtype, "fp8_e4m3fnuz", "group", True, (3,), 200, 64, label="fixed"))
    return cases


def _claimed(backend: Any, op: type, spec: Any) -> bool:
    try:
        return any(not k.capability.not_supported_reasons(spec) for k in backend.kernels_for(op.name))
    except Exception:
        return False


def case_strategy(backend: Any, dtype: torch.dtype):
    """Combinations the backend claims (three draws in four; all when it claims none) and any (one in four)."""
    from hypothesis import strategies as st

    claimed = [c for c in COMBOS if _claimed(backend, ScaledGemm, ScaledGemmSpec(
        dtype=dtype, scheme=c[0], weight_granularity=c[1], act_granularity=c[2], act_symmetric=c[3],
        group_size=64 if c[1] == "block" else 128))] or list(COMBOS)

    @st.composite
    def draw(draw_, within: bool) -> OpCase:
        scheme, wg, ag, sym = draw_(st.sampled_from(claimed if within else list(COMBOS)))
        m = draw_(st.one_of(st.just(1), st.integers(1, 24)))
        k = draw_(st.integers(1, 160))
        n = draw_(st.integers(1, 96))
        bias = draw_(st.booleans())
        if draw_(st.integers(0, 3)) == 0:
            gran = {"token": "token", "tensor": "tensor", "group": "group"}[ag]
            return make_quantize_case(dtype, scheme, gran, sym, (m,), k, 32)
        return make_case(dtype, scheme, wg, ag, sym, (m,), k, n, bias, 32 if wg == "block" else 128)

    return st.one_of(draw(True), draw(True), draw(True), draw(False))
