"""Conformance cases of the GEMM family: ``y[..., N] = x[..., K] @ w[N, K].T (+ b[N])``.

Inputs are drawn so that outputs are of order one whatever K is: ``x ~ N(0, 1)``, ``w ~ N(0, 1/K)``,
``b ~ N(0, 1)``; the float64 reference is :func:`anyaccel.core.gemm.gemm_reference` on the same (already rounded)
values. Fixed cases cover M = 1 (decode), odd K and N, a 3-d ``x``, with and without bias, a float32 output from
half inputs, and one benchmark-sized row block (K = N = 4096).
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Tuple

import torch

from ...core.gemm import Gemm, GemmSpec, gemm_reference
from ...core.validation import dtype_name
from ..cases import OpCase, poison

__all__ = ["FAMILY", "fixed_cases", "case_strategy", "make_case"]

FAMILY = "gemm"


def make_case(dtype: torch.dtype, lead: Tuple[int, ...], k: int, n: int, bias: bool,
              out_dtype: Optional[torch.dtype] = None, label: str = "") -> OpCase:
    """One GEMM case: ``x[*lead, K]``, ``w[N, K]``, optional ``b[N]``."""
    spec = GemmSpec(dtype=dtype, out_dtype=out_dtype, has_bias=bias, in_features=k, out_features=n)
    result_dtype = spec.result_dtype

    def make(device: torch.device, seed: int) -> Dict[str, Any]:
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(*lead, k, generator=g)
        w = torch.randn(n, k, generator=g) / k ** 0.5
        b = torch.randn(n, generator=g) if bias else None
        return {"x": x.to(device=device, dtype=dtype), "weight": w.to(device=device, dtype=dtype),
                "bias": None if b is None else b.to(device=device, dtype=dtype)}

    def call(op: Gemm, inp: Dict[str, Any]) -> Tuple[torch.Tensor, ...]:
        x = inp["x"]
        out = poison(torch.empty(*x.shape[:-1], n, dtype=result_dtype, device=x.device))
        y = op(x, inp["weight"], inp["bias"], out=out)
        return (y,)

    def reference(inp: Dict[str, Any]) -> Tuple[torch.Tensor, ...]:
        return (gemm_reference(inp["x"], inp["weight"], inp["bias"]),)

    shape = "x".join(str(s) for s in lead)
    name = f"{label + ' ' if label else ''}x=[{shape}, {k}] N={n}{' bias' if bias else ''}"
    if out_dtype is not None and out_dtype != dtype:
        name += f" out={dtype_name(out_dtype)}"
    return OpCase(op=Gemm, spec=spec, name=name, tolerance_class="gemm", reduction=k, make=make, call=call,
                  reference=reference, tags=("fixed",) if label else ("drawn",))


def fixed_cases(backend: Any, dtype: torch.dtype) -> List[OpCase]:
    cases = [
        make_case(dtype, (1,), 64, 32, True, label="decode M=1"),
        make_case(dtype, (1,), 33, 17, False, label="decode M=1 odd"),
        make_case(dtype, (7,), 129, 63, True, label="odd K N"),
        make_case(dtype, (64,), 256, 128, False, label="square-ish"),
        make_case(dtype, (2, 5), 48, 24, True, label="3-d x"),
        make_case(dtype, (16,), 4096, 4096, False, label="bench rows"),
    ]
    if dtype != torch.float32:
        cases.append(make_case(dtype, (8,), 96, 40, True, out_dtype=torch.float32, label="fp32 out"))
    return cases


def case_strategy(backend: Any, dtype: torch.dtype):
    from hypothesis import strategies as st

    @st.composite
    def draw(draw_) -> OpCase:
        m = draw_(st.integers(1, 48))
        lead: Tuple[int, ...] = (m,)
        if draw_(st.booleans()):
            lead = (draw_(st.integers(1, 3)), m)
        k = draw_(st.integers(1, 320))
        n = draw_(st.integers(1, 160))
        bias = draw_(st.booleans())
        return make_case(dtype, lead, k, n, bias)

    return draw()
