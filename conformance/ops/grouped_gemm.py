"""Conformance cases for the grouped GEMM (mixture-of-experts) op.

Each case draws rows routed to experts (some experts get no row, some get many) in both group encodings, and
compares the built op, writing into a NaN-poisoned output, with the float64 reference.
"""
from __future__ import annotations

from typing import Any, Dict, List, Tuple

import torch

from ...core.gemm import GroupedGemm, GroupedGemmSpec, grouped_gemm_reference
from ...core.validation import dtype_name
from ..cases import OpCase, poison

__all__ = ["FAMILY", "fixed_cases", "case_strategy", "make_case"]

FAMILY = "grouped_gemm"


def make_case(dtype: torch.dtype, m: int, k: int, n: int, e: int, mode: str, skew: float = 0.0,
              tag: str = "") -> OpCase:
    """A case of ``m`` rows over ``e`` experts; ``skew`` > 0 concentrates rows on the low experts."""
    spec = GroupedGemmSpec(dtype=dtype, num_experts=e, mode=mode, in_features=k, out_features=n)

    def make(device: torch.device, seed: int) -> Dict[str, Any]:
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(m, k, generator=g)
        w = torch.randn(e, n, k, generator=g) / k ** 0.5
        probs = torch.exp(-skew * torch.arange(e, dtype=torch.float32))
        ids = torch.multinomial(probs, m, replacement=True, generator=g)
        if mode == "segments":
            ids, _ = torch.sort(ids)
            groups = torch.bincount(ids, minlength=e)
        else:
            groups = ids
        return {"x": x.to(device, dtype), "weight": w.to(device, dtype), "groups": groups.to(device)}

    def call(op: GroupedGemm, inp: Dict[str, Any]) -> Tuple[torch.Tensor, ...]:
        out = poison(torch.empty(m, n, dtype=dtype, device=inp["x"].device))
        return (op(inp["x"], inp["weight"], inp["groups"], out=out),)

    def reference(inp: Dict[str, Any]) -> Tuple[torch.Tensor, ...]:
        return (grouped_gemm_reference(inp["x"].cpu(), inp["weight"].cpu(), inp["groups"].cpu(), mode),)

    name = f"{tag + ' ' if tag else ''}M={m} K={k} N={n} E={e} mode={mode}{f' skew={skew:g}' if skew else ''}"
    return OpCase(op=GroupedGemm, spec=spec, name=name, tolerance_class="gemm", reduction=k, make=make, call=call,
                  reference=reference, tags=(FAMILY, mode))


def fixed_cases(backend: Any, dtype: torch.dtype) -> List[OpCase]:
    """Named shapes: a decode step, a prefill-sized batch, empty experts, and a Mixtral-like layer."""
    return [
        make_case(dtype, 1, 64, 96, 4, "segments", tag="decode"),
        make_case(dtype, 7, 64, 96, 4, "ids", tag="odd rows"),
        make_case(dtype, 128, 96, 80, 8, "segments", skew=1.0, tag="skewed prefill"),
        make_case(dtype, 64, 128, 64, 16, "ids", skew=2.0, tag="many empty experts"),
        make_case(dtype, 256, 512, 384, 8, "segments", tag="mixtral-like"),
    ]


def case_strategy(backend: Any, dtype: torch.dtype):
    """Hypothesis strategy drawing grouped GEMM cases (sizes kept small so the reference stays fast)."""
    from hypothesis import strategies as st

    return st.builds(
        lambda m, k, n, e, mode, skew: make_case(dtype, m, k, n, e, mode, skew),
        st.integers(1, 96), st.integers(1, 160), st.integers(1, 160), st.integers(1, 12),
        st.sampled_from(["ids", "segments"]), st.sampled_from([0.0, 0.5, 2.0]),
    )
