"""cpu scaled GEMM: int8 through torch._int_mm is elected for every int8 spec it declares and passes the family's
conformance cases; fp8 is refused with the measured reason and served by the core's recorded fallback."""
from __future__ import annotations

import torch

from anyaccel.conformance import runner
from anyaccel.core.scaled_gemm import ScaledGemm, ScaledGemmSpec


def _cpu():
    from anyaccel.plugins import discover

    return discover().backends["cpu"]


def test_int8_elects_int_mm_and_fp8_falls_back_with_the_reason():
    cpu = _cpu()
    for sym in (True, False):
        sel = ScaledGemm.build(ScaledGemmSpec(torch.bfloat16, "int8", act_symmetric=sym), cpu).selection
        assert sel.chosen == "cpu.scaled_gemm.int_mm" and not sel.fallback
    sel = ScaledGemm.build(ScaledGemmSpec(torch.bfloat16, "fp8_e4m3fn"), cpu).selection
    assert sel.fallback and "emulated" in sel.explain()


def test_cpu_conformance_every_dtype():
    rep = runner.run([_cpu()], dtypes=(torch.float32, torch.float16, torch.bfloat16), families=["scaled_gemm"],
                     examples=runner.DEFAULT_EXAMPLES, seed=0)
    bad = [(c.name, c.reason) for c in rep.cases if c.status != "pass"]
    assert not bad, bad
    own = [c for c in rep.cases if c.kernel == "cpu.scaled_gemm.int_mm"]
    assert len(own) >= 3 * 8 and all(c.status == "pass" for c in own)


def test_prepare_transposes_once_and_sums_columns_for_the_zero_point():
    op = ScaledGemm.build(ScaledGemmSpec(torch.float32, "int8", act_symmetric=False), _cpu())
    wq = torch.randint(-127, 128, (6, 10), dtype=torch.int8)
    w_kn, wsum = op.prepare(wq, torch.ones(6, 1))
    assert w_kn.shape == (10, 6) and w_kn.is_contiguous() and torch.equal(w_kn, wq.t())
    assert torch.equal(wsum, wq.sum(1, dtype=torch.int32))
