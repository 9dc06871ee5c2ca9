"""The shared Triton weight-only GEMM: through the interpreter against the float64 reference (every format, every
dtype, the exact cases), its prepared layout, and ahead-of-time compilation for sm80, sm89, sm90 and gfx942."""
from __future__ import annotations

import warnings

import pytest
import torch

from anyaccel.conformance.ops import weight_only as fam
from anyaccel.conformance.tolerances import compare, tolerance
from anyaccel.core import InvalidArgumentError, WeightOnlyGemm, WeightOnlyGemmSpec, quantize_rtn
from anyaccel.plugins import discover

FORMATS = ("int4", "int8", "q4_0", "q4_1", "q8_0", "q4_k", "q6_k")


@pytest.fixture(scope="module")
def interp():
    return discover().get("triton-interpreter")


def _run(backend, case):
    op = case.op.build(case.spec, backend, strict=True)
    assert not op.selection.fallback and op.selection.chosen.endswith(".weight_only_gemm")
    inp = case.make(torch.device("cpu"), 1)
    at, rt = tolerance(case.tolerance_class, case.dtype)
    return compare(case.call(op, inp), case.reference(inp), at, rt)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("fmt", FORMATS)
def test_interpreter_weight_only_matches_reference(interp, fmt, dtype):
    k = 256 if fmt in ("q4_k", "q6_k") else 64
    for exact in (False, True):
        case = fam.make_case(dtype, fmt, 3, k, 24, 32, zeros=fmt == "int4", bias=not exact, exact=exact)
        r = _run(interp, case)
        assert r.passed, (case.name, r.reason)
        if exact:
            assert r.max_abs_err <= r.tolerance


def test_prepared_weight_is_tagged_with_the_kernel_layout(interp):
    spec = WeightOnlyGemmSpec(torch.float32, "int4", 64, 32, 32)
    op = WeightOnlyGemm.build(spec, interp, strict=True)
    prepared = op.prepare(quantize_rtn(torch.randn(32, 64), "int4", 32))
    assert prepared.layout == "triton.chunk_codes" and prepared.packed[0].dtype == torch.uint8
    cpu_op = WeightOnlyGemm.build(spec, discover().get("cpu"), strict=True)
    with pytest.raises(InvalidArgumentError, match="'weight'.*layout"):
        cpu_op(torch.randn(2, 64), prepared)


def _targets():
    compiler = pytest.importorskip("triton.backends.compiler")
    from anyaccel.backends.cuda.tuning import tuning_for as cuda
    from anyaccel.backends.rocm.tuning import tuning_for as rocm

    T = compiler.GPUTarget
    return {"sm80": (T("cuda", 80, 32), cuda((8, 0))), "sm89": (T("cuda", 89, 32), cuda((8, 9))),
            "sm90": (T("cuda", 90, 32), cuda((9, 0))), "gfx942": (T("hip", "gfx942", 64), rocm("gfx942"))}


@pytest.mark.slow
@pytest.mark.parametrize("name", ["sm80", "sm89", "sm90", "gfx942"])
def test_weight_only_kernel_compiles_for_gpu_targets(name):
    from anyaccel.backends.triton.aot import compile_only
    from anyaccel.backends.triton.weight_only import launch_weight_only_gemm, prepare_weight

    target, tun = _targets()[name]
    warnings.simplefilter("ignore")
    g = torch.Generator().manual_seed(0)
    with compile_only(target) as log:
        for fmt in ("int4", "q4_1", "q8_0", "q6_k"):
            w = fam.random_weight(fmt, 64, 256, g, group_size=128 if fmt == "int4" else None, zeros=fmt == "int4")
            packed = prepare_weight(w)
            for m in (1, 64):
                dt = torch.bfloat16
                launch_weight_only_gemm(torch.empty(m, 256, dtype=dt), packed, torch.empty(64, dtype=dt),
                                        torch.empty(m, 64, dtype=dt), tuning=tun, interpret=False)
    assert {n for n, _, _ in log} == {"weight_only_gemm_kernel"}
    # both the 4-bit path and the 8-bit path (chunks of 32 and of 16) were compiled
    variants = {(c["FOUR_BIT"], c["CHUNK"]) for _, _, c in log}
    assert variants == {(True, 32), (False, 32), (False, 16)}
