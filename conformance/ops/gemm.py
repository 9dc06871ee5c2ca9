"""Conformance cases of the GEMM family: ``y[..., N] = x[..., K] @ w[N, K].T (+ b[N])``.

Inputs are drawn so that outputs are of order one whatever K is: ``x ~ N(0, 1)``, ``w ~ N(0, 1/K)``,
``b ~ N(0, 1)``; the float64 reference is :func:`anyaccel.core.gemm.gemm_reference` on the same (already rounded)
values, carrying the per-element allowance of the error model (``sqrt(K) * (|x| @ |w|^T + |b|)`` times
``c * u32``, see :mod:`anyaccel.conformance.tolerances`; the magnitude is bounded by ``||x_m|| ||w_n|| + |b_n|``,
which costs no GEMM). Fixed cases cover M = 1 (decode, with and without bias,
up to K = 4096), K not a multiple of 32 (a kernel's K tail), odd N, a 3-d ``x``, a float32 output from half
inputs (when the backend claims one), one benchmark-sized row block (K = N = 4096), and **exact** cases: small
integers times powers of two, where a correct fp32-accumulating kernel is exact up to the final rounding in
every dtype (tolerance class ``exact``), so a dropped term or a half-type accumulator shows even in bf16.

Drawn cases stay within what the backend's GEMM kernels declare (dtypes, output dtypes, a declared K/N range
read from ``min_features``/``max_features`` when the capability has them); one draw in four ignores the claims,
so a declared-unsupported case is still checked to refuse.
"""
from __future__ import annotations

import math
from typing import Any, Dict, List, Optional, Tuple

import torch

from ...core.gemm import Gemm, GemmSpec, gemm_reference
from ...core.validation import dtype_name
from ..cases import OpCase, poison
from ..tolerances import allowance, with_allowance

__all__ = ["FAMILY", "fixed_cases", "case_strategy", "make_case"]

FAMILY = "gemm"


def make_case(dtype: torch.dtype, lead: Tuple[int, ...], k: int, n: int, bias: bool,
              out_dtype: Optional[torch.dtype] = None, label: str = "", exact: bool = False) -> OpCase:
    """One GEMM case: ``x[*lead, K]``, ``w[N, K]``, optional ``b[N]``.

    ``exact``: integers in [-32, 32] for ``x``, ``w`` times ``2**-5``, ``b`` integers: every partial sum is exact
    in fp32, so only the final rounding is allowed (class ``exact``).
    """
    spec = GemmSpec(dtype=dtype, out_dtype=out_dtype, has_bias=bias, in_features=k, out_features=n)
    result_dtype = spec.result_dtype

    def make(device: torch.device, seed: int) -> Dict[str, Any]:
        g = torch.Generator().manual_seed(seed)
        if exact:
            x = torch.randint(-32, 33, (*lead, k), generator=g).float()
            w = torch.randint(-32, 33, (n, k), generator=g).float() * 2.0 ** -5
            b = torch.randint(-64, 65, (n,), generator=g).float() if bias else None
        else:
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
        ref = gemm_reference(inp["x"], inp["weight"], inp["bias"])
        if exact:
            return (ref,)
        return (with_allowance(ref, allowance("gemm", result_dtype, acc_mag=math.sqrt(k) * magnitude(inp))),)

    shape = "x".join(str(s) for s in lead)
    name = f"{label + ' ' if label else ''}x=[{shape}, {k}] N={n}{' bias' if bias else ''}"
    if out_dtype is not None and out_dtype != dtype:
        name += f" out={dtype_name(out_dtype)}"
    return OpCase(op=Gemm, spec=spec, name=name, tolerance_class="exact" if exact else "gemm", reduction=k,
                  make=make, call=call, reference=reference, tags=("fixed",) if label else ("drawn",))


def magnitude(inp: Dict[str, Any]) -> torch.Tensor:
    """An upper bound of the magnitude summed into each output, ``|x| @ |w|^T + |b|``, that costs no GEMM:
    ``||x_m|| * ||w_n|| + |b_n|`` (Cauchy-Schwarz; about 1.6 times the exact sum for Gaussian inputs)."""
    x = inp["x"].detach().cpu().double()
    x = x.reshape(-1, x.shape[-1])
    w = inp["weight"].detach().cpu().double()
    mag = torch.outer(x.norm(dim=-1), w.norm(dim=-1))
    if inp["bias"] is not None:
        mag = mag + inp["bias"].detach().cpu().double().abs()
    return mag.reshape(*inp["x"].shape[:-1], w.shape[0])


def _claims(backend: Any) -> List[Any]:
    """The capabilities of the backend's GEMM kernels (empty: every case falls back to the core)."""
    try:
        return [k.capability for k in backend.kernels_for(Gemm.name)]
    except Exception:
        return []


def _claimed(backend: Any, spec: GemmSpec) -> bool:
    return any(not c.not_supported_reasons(spec) for c in _claims(backend))


def fixed_cases(backend: Any, dtype: torch.dtype) -> List[OpCase]:
    cases = [
        make_case(dtype, (1,), 64, 32, True, label="decode M=1"),
        make_case(dtype, (1,), 33, 17, False, label="decode M=1 odd"),
        make_case(dtype, (1,), 4096, 512, True, label="decode M=1 llama"),
        make_case(dtype, (1,), 2048, 256, False, label="decode M=1 wide"),
        make_case(dtype, (7,), 129, 63, True, label="odd K N"),
        make_case(dtype, (3,), 100, 48, False, label="K tail"),
        make_case(dtype, (64,), 256, 128, False, label="square-ish"),
        make_case(dtype, (2, 5), 48, 24, True, label="3-d x"),
        make_case(dtype, (16,), 4096, 4096, False, label="bench rows"),
        make_case(dtype, (5,), 96, 40, True, label="exact", exact=True),
        make_case(dtype, (1,), 72, 24, True, label="exact decode M=1", exact=True),
        make_case(dtype, (19,), 320, 33, False, label="exact", exact=True),
    ]
    if dtype != torch.float32:
        cases.append(make_case(dtype, (8,), 96, 40, True, out_dtype=torch.float32, label="fp32 out"))
        cases.append(make_case(dtype, (3,), 80, 16, True, out_dtype=torch.float32, label="exact fp32 out",
                               exact=True))
    # every other output dtype a GEMM spec may ask for (rounded once, to the output dtype)
    for out in (torch.float16, torch.bfloat16):
        if out != dtype:
            cases.append(make_case(dtype, (6,), 72, 24, True, out_dtype=out, label=f"{dtype_name(out)} out"))
    return cases


def case_strategy(backend: Any, dtype: torch.dtype):
    """Shapes within the backend's GEMM claims (three draws in four), and any shape (one in four)."""
    from hypothesis import strategies as st

    out_dtypes: List[Optional[torch.dtype]] = [None]
    if dtype != torch.float32 and (not _claims(backend) or _claimed(
            backend, GemmSpec(dtype=dtype, out_dtype=torch.float32, has_bias=False, in_features=64,
                              out_features=64))):
        out_dtypes.append(torch.float32)
    lo, hi = 1, 320
    floors = [getattr(c, "min_features", None) for c in _claims(backend)]
    if floors and all(f is not None for f in floors):
        lo = min(int(f) for f in floors)  # every kernel declares a K/N floor: draw above it
        hi = max(hi, lo + 64)

    @st.composite
    def draw(draw_, within: bool) -> OpCase:
        m = draw_(st.one_of(st.just(1), st.integers(1, 48)))
        lead: Tuple[int, ...] = (m,)
        if draw_(st.booleans()):
            lead = (draw_(st.integers(1, 3)), m)
        k = draw_(st.integers(lo if within else 1, hi))
        n = draw_(st.integers(lo if within else 1, max(160, lo + 32) if within else 160))
        bias = draw_(st.booleans())
        out = draw_(st.sampled_from(out_dtypes)) if within else None
        return make_case(dtype, lead, k, n, bias, out_dtype=out)

    return st.one_of(draw(True), draw(True), draw(True), draw(False))
