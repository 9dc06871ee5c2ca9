"""Conformance cases for the weight-only quantized GEMM (int4/int8 groups, GGUF Q4_0/Q4_1/Q8_0/Q4_K/Q6_K).

Each case draws a packed weight in the format's canonical layout (random codes, float16 scales; GGUF blocks
written field by field), lets the op ``prepare`` it as a model load would, and compares the call, written into a
NaN-poisoned output, with the float64 product of ``x`` and the *exactly* dequantized weight. Dequantization is
exact, so only the fp32 accumulation and the output rounding remain, plus the one rounding mid-way the contract
allows (the dequantized weight, its scale and its offset rounded to the activation dtype), class ``weight_only``:
``mid_mag = |x| @ (|w| + |offset|)^T`` where ``offset`` is the format's additive term (``zero * scale``, Q4_0's
``8 d``, Q4_1's ``m``, Q4_K's ``dmin * min``). *Exact* cases (small integer activations, power-of-two scales,
codes chosen so every dequantized weight has at most 8 significant bits) leave only the final rounding (class
``exact``): a misplaced nibble, a zero point with the wrong sign or a scale from the neighbouring group shows in
every dtype.
"""
from __future__ import annotations

import math
from typing import Any, Dict, List, Optional, Tuple

import torch

from ...core.weight_only import (WEIGHT_FORMATS, QuantizedWeight, WeightOnlyGemm, WeightOnlyGemmSpec, dequantize,
                                 weight_only_gemm_reference)
from ..cases import OpCase, poison
from ..tolerances import allowance, with_allowance

__all__ = ["FAMILY", "fixed_cases", "case_strategy", "make_case", "random_weight", "offset_magnitude"]

FAMILY = "weight_only"


def _f16_bytes(v: torch.Tensor) -> torch.Tensor:
    """[..] float -> [.., 2] uint8 little-endian float16."""
    return v.to(torch.float16).contiguous().view(torch.int16).unsqueeze(-1).view(torch.uint8).reshape(*v.shape, 2)


def _pow2(shape, g: torch.Generator, lo: int, hi: int) -> torch.Tensor:
    return torch.pow(2.0, -torch.randint(lo, hi + 1, shape, generator=g).float())


def random_weight(fmt: str, n: int, k: int, g: torch.Generator, group_size: Optional[int] = None,
                  zeros: bool = False, scale_dtype: torch.dtype = torch.float16,
                  exact: bool = False) -> QuantizedWeight:
    """A random weight in ``fmt``'s canonical layout; ``exact``: power-of-two scales and codes keeping every
    dequantized value within 8 significant bits (representable in bf16, every product exact)."""
    f = WEIGHT_FORMATS[fmt]
    unit = 1.0 / math.sqrt(k)
    if not f.gguf:
        gs = k if group_size is None else group_size
        ng = k // gs
        top = 15 if fmt == "int4" else 255
        q = torch.randint(0, top + 1, (n, k), generator=g)
        if exact:
            s = _pow2((n, ng), g, 4, 7)
        else:
            s = (torch.rand(n, ng, generator=g) + 0.5) * unit / (4 if fmt == "int4" else 64)
        z = torch.randint(0, top + 1, (n, ng), generator=g) if zeros else None
        if fmt == "int4":
            data = (q[:, 0::2] | (q[:, 1::2] << 4)).to(torch.uint8)
            zt = None if z is None else z.to(torch.uint8)
        else:
            data = (q - 128).to(torch.int8)
            zt = None if z is None else (z - 128).to(torch.int8)
        return QuantizedWeight(fmt, (n, k), data.contiguous(), s.to(scale_dtype).contiguous(), zt, group_size)
    nb = k // f.block
    rb = torch.randint(0, 256, (n, nb, f.block_bytes), generator=g, dtype=torch.int64).to(torch.uint8)
    d = _pow2((n, nb), g, 4, 7) if exact else (torch.rand(n, nb, generator=g) + 0.5) * unit / 4
    if fmt == "q4_0":
        rb[..., 0:2] = _f16_bytes(d)
    elif fmt == "q4_1":
        if exact:
            m = -torch.randint(0, 16, (n, nb), generator=g).float() * d
        else:
            m = -torch.rand(n, nb, generator=g) * 8 * d
        rb[..., 0:2], rb[..., 2:4] = _f16_bytes(d), _f16_bytes(m)
    elif fmt == "q8_0":
        rb[..., 0:2] = _f16_bytes(d / 32)
    elif fmt == "q4_k":
        dk = d / 16
        rb[..., 0:2], rb[..., 2:4] = _f16_bytes(dk), _f16_bytes(dk if exact else dk * 2)
        if exact:  # 6-bit scales and mins kept below 16: d * sc * q - dmin * m within 8 bits
            rb[..., 4:16] &= 0x0F
    else:  # q6_k: scales int8
        sc = torch.randint(-8, 8, (n, nb, 16), generator=g) if exact else torch.randint(-128, 128, (n, nb, 16),
                                                                                        generator=g)
        rb[..., 192:208] = sc.to(torch.int8).view(torch.uint8)
        rb[..., 208:210] = _f16_bytes(d / 32 if not exact else d)
    return QuantizedWeight(fmt, (n, k), rb.reshape(n, -1).contiguous())


def offset_magnitude(w: QuantizedWeight) -> torch.Tensor:
    """``|offset|`` per element [N, K] (float64): the additive term a kernel may round separately."""
    n, k = w.shape
    f = WEIGHT_FORMATS[w.format]
    if not f.gguf:
        gs = k if w.group_size is None else w.group_size
        z = (8.0 if w.format == "int4" else 0.0) if w.zeros is None else w.zeros.double()
        o = (torch.as_tensor(z, dtype=torch.float64) * w.scales.double()).abs()
        return o.repeat_interleave(gs, dim=1)
    if w.format in ("q8_0", "q6_k"):
        return torch.zeros(n, k, dtype=torch.float64)
    # the all-zero codes dequantize to minus the offset (Q4_0: -8d, Q4_1: m, Q4_K: -dmin*m); Q4_K's kernels may also
    # re-express it around code 8 (8 d sc - dmin m): take the larger
    data = w.data.reshape(n, -1, f.block_bytes).clone()
    lo = slice(2, 18) if w.format == "q4_0" else (slice(4, 20) if w.format == "q4_1" else slice(16, 144))
    data[..., lo] = 0
    o0 = dequantize(QuantizedWeight(w.format, w.shape, data.reshape(n, -1))).abs()
    data[..., lo] = 0x88
    o8 = dequantize(QuantizedWeight(w.format, w.shape, data.reshape(n, -1))).abs()
    return torch.maximum(o0, o8)


def make_case(dtype: torch.dtype, fmt: str, m: int, k: int, n: int, group_size: Optional[int] = None,
              zeros: bool = False, scale_dtype: torch.dtype = torch.float16, bias: bool = False, tag: str = "",
              exact: bool = False) -> OpCase:
    spec = WeightOnlyGemmSpec(dtype=dtype, format=fmt, in_features=k, out_features=n,
                              group_size=None if WEIGHT_FORMATS[fmt].gguf else group_size,
                              has_zeros=zeros and not WEIGHT_FORMATS[fmt].gguf, scale_dtype=scale_dtype,
                              has_bias=bias)

    def make(device: torch.device, seed: int) -> Dict[str, Any]:
        g = torch.Generator().manual_seed(seed)
        w = random_weight(fmt, n, k, g, spec.group_size, spec.has_zeros, scale_dtype, exact)
        x = torch.randint(-8, 9, (m, k), generator=g).float() if exact else torch.randn(m, k, generator=g)
        b = (torch.randint(-8, 9, (n,), generator=g).float() if exact else torch.randn(n, generator=g)) if bias \
            else None
        dev = lambda t: None if t is None else t.to(device)  # noqa: E731
        w = QuantizedWeight(w.format, w.shape, dev(w.data), dev(w.scales), dev(w.zeros), w.group_size)
        return {"x": x.to(device, dtype), "weight": w, "bias": None if b is None else b.to(device, dtype)}

    def call(op: WeightOnlyGemm, inp: Dict[str, Any]) -> Tuple[torch.Tensor, ...]:
        prepared = op.prepare(inp["weight"])
        out = poison(torch.empty(m, n, dtype=dtype, device=inp["x"].device))
        return (op(inp["x"], prepared, inp["bias"], out=out),)

    def reference(inp: Dict[str, Any]) -> Tuple[torch.Tensor, ...]:
        w = inp["weight"]
        w = QuantizedWeight(w.format, w.shape, w.data.cpu(), None if w.scales is None else w.scales.cpu(),
                            None if w.zeros is None else w.zeros.cpu(), w.group_size)
        x = inp["x"].cpu()
        b = None if inp["bias"] is None else inp["bias"].cpu()
        ref = weight_only_gemm_reference(x, w, b)
        if exact:
            return (ref,)
        ax = x.double().abs()
        wd = dequantize(w).abs()
        mid = ax @ (wd + offset_magnitude(w)).T
        acc = math.sqrt(k) * (ax @ wd.T + (0 if b is None else b.double().abs()))
        return (with_allowance(ref, allowance("weight_only", dtype, mid_mag=mid, acc_mag=acc)),)

    grp = "" if WEIGHT_FORMATS[fmt].gguf else f" G={group_size or 'K'}{' zeros' if spec.has_zeros else ''}"
    sdt = "" if WEIGHT_FORMATS[fmt].gguf or scale_dtype == torch.float16 else f" scales={str(scale_dtype)[6:]}"
    name = f"{tag + ' ' if tag else ''}{fmt}{grp}{sdt} M={m} K={k} N={n}{' bias' if bias else ''}"
    return OpCase(op=WeightOnlyGemm, spec=spec, name=name, tolerance_class="exact" if exact else "weight_only",
                  reduction=k, make=make, call=call, reference=reference, tags=(FAMILY, fmt))


def fixed_cases(backend: Any, dtype: torch.dtype) -> List[OpCase]:
    """Every format x group (x zero points) at a decode and a small prefill shape, SmolLM2's decode shape in
    Q4_1, and an exact case per format."""
    cases: List[OpCase] = []
    for fmt in ("int4", "int8"):
        for gs in (32, 64, 128, None):
            for zeros in (False, True):
                cases.append(make_case(dtype, fmt, 1 if zeros else 5, 256, 48, gs, zeros))
    cases.append(make_case(dtype, "int4", 3, 128, 32, 32, scale_dtype=torch.bfloat16))
    cases.append(make_case(dtype, "int8", 3, 128, 32, 64, scale_dtype=torch.float32, bias=True))
    for fmt in ("q4_0", "q4_1", "q8_0"):
        cases.append(make_case(dtype, fmt, 1, 128, 48, tag="decode"))
        cases.append(make_case(dtype, fmt, 9, 96, 40, bias=True))
    for fmt in ("q4_k", "q6_k"):
        cases.append(make_case(dtype, fmt, 1, 256, 32, tag="decode"))
        cases.append(make_case(dtype, fmt, 6, 512, 24, bias=True))
    cases.append(make_case(dtype, "q4_1", 1, 576, 192, tag="smollm2 k_proj decode"))
    # exact cases: every format, grouped scales (a neighbouring group's or a transposed scale shows)
    cases += [make_case(dtype, "int4", 4, 128, 32, 32, True, tag="exact", exact=True),
              make_case(dtype, "int4", 3, 256, 16, 128, False, tag="exact", exact=True),
              make_case(dtype, "int8", 4, 128, 32, 64, True, tag="exact", exact=True),
              make_case(dtype, "int8", 2, 96, 16, None, False, tag="exact", exact=True)]
    cases += [make_case(dtype, fmt, 3, 256 if fmt in ("q4_k", "q6_k") else 64, 16, tag="exact", exact=True)
              for fmt in ("q4_0", "q4_1", "q8_0", "q4_k", "q6_k")]
    return cases


def case_strategy(backend: Any, dtype: torch.dtype):
    """Hypothesis strategy: any format, group, zero points, small shapes (the reference dequantizes in float64)."""
    from hypothesis import strategies as st

    def build(fmt, m, kb, n16, gs, zeros, bias, sdt):
        f = WEIGHT_FORMATS[fmt]
        unit = f.block if f.gguf else (gs or 32)
        k = unit * kb
        return make_case(dtype, fmt, m, k, 16 * n16, gs, zeros, sdt, bias)

    return st.builds(build, st.sampled_from(sorted(WEIGHT_FORMATS)), st.integers(1, 12), st.integers(1, 3),
                     st.integers(1, 4), st.sampled_from([32, 64, 128, None]), st.booleans(), st.booleans(),
                     st.sampled_from([torch.float16, torch.bfloat16, torch.float32]))
