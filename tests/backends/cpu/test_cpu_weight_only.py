"""The cpu weight-only GEMM kernels: which kernel serves which format and shape (as declared), each against the
float64 reference through the conformance cases, and the packed layout made once at prepare."""
from __future__ import annotations

import pytest
import torch

from anyaccel.conformance.ops import weight_only as fam
from anyaccel.conformance.tolerances import compare, tolerance
from anyaccel.core import WeightOnlyGemm, WeightOnlyGemmSpec, quantize_rtn
from anyaccel.plugins import discover


@pytest.fixture(scope="module")
def cpu():
    return discover().get("cpu")


@pytest.mark.parametrize("fmt,n,k,group,kernel", [
    ("int4", 32, 256, 128, "int4pack"), ("q4_0", 48, 64, None, "int4pack"), ("q4_1", 192, 576, None, "int4pack"),
    ("q4_k", 16, 256, None, "int4pack"), ("int8", 32, 96, None, "int8pack"), ("int8", 32, 128, 32, "int8_groups"),
    ("q8_0", 32, 64, None, "int8_groups"), ("q6_k", 32, 256, None, "int8_groups"),
    ("q4_1", 40, 96, None, "int8_groups"),   # N % 16 != 0: the int4 packed kernel declares it cannot
    ("int4", 32, 96, None, "int8_groups"),   # per-channel int4: torch's int4 kernel takes groups 32..256 only
])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_kernel_per_format_and_exactness(cpu, fmt, n, k, group, kernel, dtype):
    case = fam.make_case(dtype, fmt, 3, k, n, group, tag="exact", exact=True)
    op = WeightOnlyGemm.build(case.spec, cpu, strict=True)
    if kernel == "int4pack" and dtype == torch.float32:
        kernel = "int8_groups"  # torch's int4 CPU kernel is declared for half activations only (slow in float32)
    assert op.selection.chosen == f"cpu.weight_only_gemm.{kernel}"
    inp = case.make(torch.device("cpu"), 0)
    at, rt = tolerance(case.tolerance_class, dtype)
    r = compare(case.call(op, inp), case.reference(inp), at, rt)
    assert r.passed, r.reason


def test_int4pack_prepares_once_into_torch_tiles(cpu):
    op = WeightOnlyGemm.build(WeightOnlyGemmSpec(torch.bfloat16, "int4", 128, 64, 32), cpu, strict=True)
    pw = op.prepare(quantize_rtn(torch.randn(64, 128), "int4", 32))
    packed, group, scales_zeros = pw.packed
    assert pw.layout == "cpu.int4pack" and group == 32 and scales_zeros.shape == (4, 64, 2)
    assert scales_zeros.dtype == torch.bfloat16 and packed.dtype == torch.uint8
    x = torch.randn(2, 128).bfloat16()
    assert torch.equal(op(x, pw), op(x, pw))  # calls reuse the prepared tiles
