"""The shared Triton GEMM, run by the interpreter, through the core Gemm op, against the float64 reference."""
from __future__ import annotations

import pytest
import torch

from anyaccel.core.gemm import Gemm, GemmSpec

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _inputs(m, k, n, dtype, bias, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g).to(dtype)
    w = (torch.randn(n, k, generator=g) / k ** 0.5).to(dtype)
    b = torch.randn(n, generator=g).to(dtype) if bias else None
    return x, w, b


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m,k,n,bias", [(1, 64, 32, True), (7, 129, 63, False), (70, 300, 130, True)])
def test_gemm_matches_reference(interp, close, dtype, m, k, n, bias):
    op = Gemm.build(GemmSpec(dtype, has_bias=bias, in_features=k, out_features=n), interp, strict=True)
    assert op.selection.chosen == "triton-interpreter.gemm"
    x, w, b = _inputs(m, k, n, dtype, bias)
    out = torch.full((m, n), float("nan"), dtype=dtype)
    op(x, w, b, out=out)
    close(out, Gemm.reference(x, w, b), dtype)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_gemm_float32_output_from_half_inputs(interp, close, dtype):
    op = Gemm.build(GemmSpec(dtype, out_dtype=torch.float32, has_bias=True), interp, strict=True)
    x, w, b = _inputs(5, 96, 40, dtype, True, seed=1)
    y = op(x, w, b)
    assert y.dtype == torch.float32
    close(y, Gemm.reference(x, w, b), torch.float32, scale=10)   # only the accumulation order differs


def test_gemm_strided_output_and_leading_dims(interp, close):
    op = Gemm.build(GemmSpec(torch.float32), interp, strict=True)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 3, 40, generator=g)
    w = torch.randn(24, 40, generator=g)
    y = op(x, w)
    assert y.shape == (2, 3, 24)
    close(y, Gemm.reference(x, w), torch.float32, scale=10)


def test_gemm_declares_its_feature_limit(interp):
    """The interpreter tier declares a smaller shape range; a spec beyond it falls back, with the reason."""
    lim = 8192
    op = Gemm.build(GemmSpec(torch.float32, in_features=lim + 1, out_features=16), interp)
    assert op.selection.fallback
    rejected = [c for c in op.selection.candidates if c.name == "triton-interpreter.gemm"][0]
    assert any("above this kernel's declared range" in r for r in rejected.reasons)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mode", ["ids", "segments"])
def test_grouped_gemm(interp, close, dtype, mode):
    from anyaccel.core.gemm import GroupedGemm, GroupedGemmSpec

    E, M, K, N = 4, 37, 96, 40
    op = GroupedGemm.build(GroupedGemmSpec(dtype, num_experts=E, mode=mode), interp, strict=True)
    assert op.selection.chosen == "triton-interpreter.grouped_gemm"
    g = torch.Generator().manual_seed(2)
    x = torch.randn(M, K, generator=g).to(dtype)
    w = (torch.randn(E, N, K, generator=g) / K ** 0.5).to(dtype)
    if mode == "ids":
        groups = torch.randint(0, E, (M,), generator=g)
    else:
        groups = torch.tensor([10, 0, 20, 7])           # an expert with no rows
    out = torch.full((M, N), float("nan"), dtype=dtype)
    op(x, w, groups, out=out)
    close(out, GroupedGemm.reference(x, w, groups, mode), dtype)
