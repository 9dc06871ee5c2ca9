"""The shared Triton scaled GEMM: run by the interpreter tier in CI (every scheme: Triton 3.9's interpreter
represents int8, e4m3fn and e4m3fnuz exactly, checked below), and compiled ahead of time, without a GPU, for the
targets whose generation declares each scheme (sm80 int8, sm89 int8 + fp8, sm90 fp8 + block fp8, gfx942 int8 +
fnuz + block fnuz), with and without a K tail (the masked byte loads)."""
from __future__ import annotations

import warnings

import pytest
import torch

triton = pytest.importorskip("triton")

from anyaccel.conformance import runner  # noqa: E402
from anyaccel.core.scaled_gemm import QUANT_DTYPES, ScaledGemmSpec, scale_shape  # noqa: E402


def _interpreter():
    from anyaccel.plugins import discover

    return discover().backends["triton-interpreter"]


@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.float8_e4m3fnuz, torch.int8])
def test_the_interpreter_loads_each_quantized_type_exactly(dtype):
    import triton.language as tl
    from anyaccel.backends.triton.runtime import compile_kernel

    def upcast(x_ptr, o_ptr, N: tl.constexpr):
        r = tl.arange(0, N)
        tl.store(o_ptr + r, tl.load(x_ptr + r).to(tl.float32))

    vals = torch.tensor([1.0, -2.0, 0.5, 13.0, -0.0, 2.0 ** -7, 96.0, -120.0])
    x = vals.round().to(dtype) if dtype == torch.int8 else vals.to(dtype)
    out = torch.full((8,), float("nan"))
    compile_kernel(upcast, True)[(1,)](x, out, N=8)
    assert torch.equal(out, x.float())


def test_the_interpreter_declares_every_scheme_and_runs_its_own_kernel():
    be = _interpreter()
    rep = runner.run([be], dtypes=(torch.bfloat16,), families=["scaled_gemm"], examples=runner.DEFAULT_EXAMPLES,
                     seed=0)
    cases = [c for c in rep.cases if c.kind == "op"]
    assert cases and all(c.status == "pass" for c in cases), [(c.name, c.reason) for c in cases if c.status != "pass"]
    gemm = [c for c in cases if c.op == "scaled_gemm"]
    assert all(c.kernel == "triton-interpreter.scaled_gemm" and not c.fallback for c in gemm)
    assert {n.split()[1] for n in (c.name for c in gemm if c.name.startswith("combo"))} == set(QUANT_DTYPES)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_interpreter_conformance_other_dtypes(dtype):
    rep = runner.run([_interpreter()], dtypes=(dtype,), families=["scaled_gemm"], examples=runner.DEFAULT_EXAMPLES,
                     seed=0)
    assert all(c.status == "pass" for c in rep.cases), [(c.name, c.reason) for c in rep.cases if c.status != "pass"]


def _targets():
    from triton.backends.compiler import GPUTarget

    from anyaccel.backends.cuda.tuning import tuning_for as cuda
    from anyaccel.backends.rocm.tuning import tuning_for as rocm

    return {
        "sm80": (GPUTarget("cuda", 80, 32), cuda((8, 0)), [("int8", "channel", "token", False)]),
        "sm89": (GPUTarget("cuda", 89, 32), cuda((8, 9)), [("int8", "tensor", "tensor", True),
                                                            ("fp8_e4m3fn", "channel", "token", True)]),
        "sm90": (GPUTarget("cuda", 90, 32), cuda((9, 0)), [("fp8_e4m3fn", "tensor", "tensor", True),
                                                            ("fp8_e4m3fn", "block", "group", True)]),
        "gfx942": (GPUTarget("hip", "gfx942", 64), rocm("gfx942"), [("int8", "channel", "token", False),
                                                                     ("fp8_e4m3fnuz", "channel", "token", True),
                                                                     ("fp8_e4m3fnuz", "block", "group", True)]),
    }


@pytest.mark.slow
@pytest.mark.parametrize("target", ["sm80", "sm89", "sm90", "gfx942"])
def test_scaled_gemm_compiles_for_the_generations_that_declare_it(target):
    from anyaccel.backends.triton.aot import compile_only
    from anyaccel.backends.triton.scaled_gemm import build_scaled_gemm

    tgt, tun, combos = _targets()[target]
    warnings.simplefilter("ignore")
    compiled = []
    for scheme, wg, ag, sym in combos:
        spec = ScaledGemmSpec(torch.bfloat16, scheme, wg, ag, sym, has_bias=True)
        qd = QUANT_DTYPES[scheme]
        kern = build_scaled_gemm(spec, tun, False)
        for m, k, n in ((16, 512, 256), (300, 500, 384)):          # decode tiles, and a K tail with big tiles
            with compile_only(tgt) as log:
                kern(torch.empty(m, k, dtype=qd), torch.empty(scale_shape(ag, m, k, 128)),
                     None if sym else torch.empty(m, 1, dtype=torch.int32), torch.empty(n, k, dtype=qd),
                     torch.empty(scale_shape(wg, n, k, 128)), None if sym else torch.empty(n, dtype=torch.int32),
                     torch.empty(n, dtype=torch.bfloat16), torch.empty(m, n, dtype=torch.bfloat16))
            assert len(log) == 1 and log[0][0] == "scaled_gemm_kernel"
            compiled.append((scheme, wg, log[0][2]["EVEN_K"]))
    assert {c[2] for c in compiled} == {True, False}
