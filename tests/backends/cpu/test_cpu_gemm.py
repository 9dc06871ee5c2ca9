"""The cpu GEMM kernel through the core op, every dtype, against the float64 reference."""
from __future__ import annotations

import pytest
import torch

from anyaccel.core import Gemm, GemmSpec
from anyaccel.plugins import discover


@pytest.fixture(scope="module")
def cpu():
    return discover().get("cpu")


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.float16, 1e-2), (torch.bfloat16, 5e-2)])
@pytest.mark.parametrize("m", [1, 7, 64])
@pytest.mark.parametrize("bias", [False, True])
def test_cpu_gemm_matches_reference(cpu, dtype, tol, m, bias):
    op = Gemm.build(GemmSpec(dtype, has_bias=bias), cpu, strict=True)
    assert op.selection.chosen == "cpu.gemm.addmm" and not op.selection.fallback
    g = torch.Generator().manual_seed(m)
    x = torch.randn(m, 96, generator=g).to(dtype)
    w = (torch.randn(33, 96, generator=g) / 10).to(dtype)
    b = torch.randn(33, generator=g).to(dtype) if bias else None
    out = torch.full((m, 33), float("nan"), dtype=dtype)
    op(x, w, b, out=out)
    torch.testing.assert_close(out.double(), Gemm.reference(x, w, b), rtol=tol, atol=tol)


def test_cpu_gemm_mixed_output_dtype(cpu):
    op = Gemm.build(GemmSpec(torch.bfloat16, out_dtype=torch.float32, has_bias=True), cpu, strict=True)
    x, w, b = torch.randn(5, 32).bfloat16(), torch.randn(6, 32).bfloat16(), torch.randn(6).bfloat16()
    y = op(x, w, b)
    assert y.dtype == torch.float32
    torch.testing.assert_close(y.double(), Gemm.reference(x, w, b), rtol=1e-5, atol=1e-4)
