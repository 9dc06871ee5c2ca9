"""Conformance cases for the grouped GEMM (mixture-of-experts) op.

Each case draws rows routed to experts (some experts get no row, some get many) in both group encodings, and
compares the built op, writing into a NaN-poisoned output, with the float64 reference (carrying the GEMM
allowance of the error model, ``c * u32 * sqrt(K) * |x| @ |w_e|^T``). Exact cases (small integers times powers of
two, class ``exact``) leave only the final rounding, so a row sent to the wrong expert shows even in bf16. Drawn
cases respect a declared ``max_experts`` and the declared group encodings three draws in four.
"""
from __future__ import annotations

import math
from typing import Any, Dict, List, Tuple

import torch

from ...core.gemm import GroupedGemm, GroupedGemmSpec, grouped_gemm_reference
from ...core.validation import dtype_name
from ..cases import OpCase, poison
from ..tolerances import allowance, with_allowance

__all__ = ["FAMILY", "fixed_cases", "case_strategy", "make_case"]

FAMILY = "grouped_gemm"


def make_case(dtype: torch.dtype, m: int, k: int, n: int, e: int, mode: str, skew: float = 0.0,
              tag: str = "", exact: bool = False) -> OpCase:
    """A case of ``m`` rows over ``e`` experts; ``skew`` > 0 concentrates rows on the low experts; ``exact``: integer
    ``x`` in [-32, 32], ``w`` integers times ``2**-5`` (every partial sum exact in fp32)."""
    spec = GroupedGemmSpec(dtype=dtype, num_experts=e, mode=mode, in_features=k, out_features=n)

    def make(device: torch.device, seed: int) -> Dict[str, Any]:
        g = torch.Generator().manual_seed(seed)
        if exact:
            x = torch.randint(-32, 33, (m, k), generator=g).float()
            w = torch.randint(-32, 33, (e, n, k), generator=g).float() * 2.0 ** -5
        else:
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
        x, w, groups = inp["x"].cpu(), inp["weight"].cpu(), inp["groups"].cpu()
        ref = grouped_gemm_reference(x, w, groups, mode)
        if exact:
            return (ref,)
        # |x_m| . |w_e(m),n| bounded by ||x_m|| ||w_e(m),n|| (Cauchy-Schwarz), without a second grouped GEMM
        ids = groups.long() if mode == "ids" else torch.repeat_interleave(torch.arange(e), groups.long(),
                                                                          output_size=m)
        mag = x.double().norm(dim=-1, keepdim=True) * w.double().norm(dim=-1)[ids]
        return (with_allowance(ref, allowance("gemm", dtype, acc_mag=math.sqrt(k) * mag)),)

    name = f"{tag + ' ' if tag else ''}M={m} K={k} N={n} E={e} mode={mode}{f' skew={skew:g}' if skew else ''}"
    return OpCase(op=GroupedGemm, spec=spec, name=name, tolerance_class="exact" if exact else "gemm", reduction=k,
                  make=make, call=call, reference=reference, tags=(FAMILY, mode))


def fixed_cases(backend: Any, dtype: torch.dtype) -> List[OpCase]:
    """Named shapes: a decode step, a prefill-sized batch, empty experts, and a Mixtral-like layer."""
    return [
        make_case(dtype, 1, 64, 96, 4, "segments", tag="decode"),
        make_case(dtype, 7, 64, 96, 4, "ids", tag="odd rows"),
        make_case(dtype, 128, 96, 80, 8, "segments", skew=1.0, tag="skewed prefill"),
        make_case(dtype, 64, 128, 64, 16, "ids", skew=2.0, tag="many empty experts"),
        make_case(dtype, 96, 256, 192, 8, "segments", tag="mixtral-like"),
        make_case(dtype, 24, 40, 16, 5, "segments", tag="exact", exact=True),
        make_case(dtype, 17, 72, 24, 6, "ids", skew=0.5, tag="exact", exact=True),
    ]


def case_strategy(backend: Any, dtype: torch.dtype):
    """Hypothesis strategy drawing grouped GEMM cases (sizes kept small so the reference stays fast)."""
    from hypothesis import strategies as st

    caps = [k.capability for k in backend.kernels_for(GroupedGemm.name) if dtype in getattr(k.capability, "dtypes", ())]
    modes = sorted(set().union(*[getattr(c, "modes", {"ids", "segments"}) for c in caps])) or ["ids", "segments"]
    tops = [c.max_experts for c in caps if getattr(c, "max_experts", None) is not None]
    top = min(12, max(tops)) if caps and len(tops) == len(caps) else 12

    def any_of(within: bool):
        return st.builds(
            lambda m, k, n, e, mode, skew: make_case(dtype, m, k, n, e, mode, skew),
            st.integers(1, 96), st.integers(1, 160), st.integers(1, 160), st.integers(1, top if within else 12),
            st.sampled_from(modes if within else ["ids", "segments"]), st.sampled_from([0.0, 0.5, 2.0]),
        )

    return st.one_of(any_of(True), any_of(True), any_of(True), any_of(False))
