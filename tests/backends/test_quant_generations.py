"""Quantized formats per hardware generation (backends/cuda/quant.py, backends/rocm/quant.py): for every simulated
device and every scaled-GEMM spec the contract allows, the Triton kernel is elected exactly when the device runs
the spec's formats natively -- checked against ground truth written here independently of the tables (the
issue's list) -- and a refusal carries the device's reason. A kernel elected on hardware it does not support
would show as a chosen kernel for a spec the ground truth rejects."""
from __future__ import annotations

import itertools

import pytest
import torch

from anyaccel.backends.cuda import quant as cuda_quant
from anyaccel.backends.rocm import quant as rocm_quant
from anyaccel.core import Backend, BackendDef, InvalidArgumentError, StrictModeError
from anyaccel.core.scaled_gemm import (ACT_GRANULARITIES, SCHEMES, WEIGHT_GRANULARITIES, ScaledGemm,
                                       ScaledGemmSpec, QuantizeActivation, QuantizeSpec)

FLOATS = frozenset({torch.float32, torch.float16, torch.bfloat16})

CUDA_CCS = [(6, 1), (7, 0), (7, 5), (8, 0), (8, 6), (8, 7), (8, 9), (9, 0), (10, 0), (12, 0)]
GFX = ["gfx906", "gfx908", "gfx90a", "gfx942", "gfx942:sramecc+:xnack-", "gfx950", "gfx1100"]


def cuda_truth(cc, scheme, block):
    """The issue's list: int8 from 7.5, fp8 (OCP e4m3fn) from 8.9, block-wise fp8 from 9.0, never fnuz."""
    ok = {"int8": cc >= (7, 5), "fp8_e4m3fn": cc >= (8, 9), "fp8_e4m3fnuz": False}[scheme]
    return ok and (not block or cc >= (9, 0))


def rocm_truth(arch, scheme, block):
    """int8 on CDNA (gfx908+), e4m3fnuz on gfx942 (MI300), OCP e4m3fn on gfx950 (MI350); block fp8 with fp8."""
    a = arch.split(":")[0]
    ok = {"int8": a in ("gfx908", "gfx90a", "gfx942", "gfx950"), "fp8_e4m3fnuz": a == "gfx942",
          "fp8_e4m3fn": a == "gfx950"}[scheme]
    return ok


def all_specs():
    out = []
    for scheme, wg, ag, sym, dt in itertools.product(SCHEMES, WEIGHT_GRANULARITIES, ACT_GRANULARITIES,
                                                     (True, False), (torch.float16, torch.bfloat16)):
        spec = ScaledGemmSpec(dtype=dt, scheme=scheme, weight_granularity=wg, act_granularity=ag, act_symmetric=sym)
        try:
            ScaledGemm.check_spec(spec)
        except InvalidArgumentError:
            continue
        out.append(spec)
    return out


SPECS = all_specs()


def _backend(name, kernels):
    return Backend.local(BackendDef(name=name, vendor="tests", device_type="cpu"), kernels=kernels)


def _cuda_backend(cc):
    from anyaccel.backends.cuda.plugin import _scaled_gemm_kernels

    return _backend("cuda", _scaled_gemm_kernels(cc))


def _rocm_backend(arch):
    from anyaccel.backends.rocm.plugin import _scaled_gemm_kernels

    return _backend("rocm", _scaled_gemm_kernels(arch))


def test_every_valid_spec_is_enumerated():
    # int8: {tensor, channel} x {tensor, token} x {symmetric, zero point}; each fp8: 4 symmetric + block/group
    assert len(SPECS) == 2 * (2 * 2 * 2 + 2 * (2 * 2 + 1))


@pytest.mark.parametrize("cc", CUDA_CCS, ids=lambda c: f"sm{c[0]}{c[1]}")
def test_cuda_selection_per_compute_capability(cc):
    pytest.importorskip("triton")
    be = _cuda_backend(cc)
    bf16_ok = cc >= (8, 0)   # the tuning's own limit: Volta/Turing declare fp32/fp16 only
    for spec in SPECS:
        want = cuda_truth(cc, spec.scheme, spec.weight_granularity == "block")
        want = want and (bf16_ok or spec.dtype != torch.bfloat16)
        op = ScaledGemm.build(spec, be, strict=False)
        elected = not op.selection.fallback
        assert elected == want, (cc, str(spec), op.selection.explain())
        if not want:
            with pytest.raises(StrictModeError):
                ScaledGemm.build(spec, be, strict=True)


@pytest.mark.parametrize("arch", GFX)
def test_rocm_selection_per_gfx_architecture(arch):
    pytest.importorskip("triton")
    be = _rocm_backend(arch)
    for spec in SPECS:
        want = rocm_truth(arch, spec.scheme, spec.weight_granularity == "block")
        op = ScaledGemm.build(spec, be, strict=False)
        assert (not op.selection.fallback) == want, (arch, str(spec), op.selection.explain())


def test_quantize_op_is_declared_only_for_schemes_the_device_runs():
    pytest.importorskip("triton")
    be = _cuda_backend((8, 0))
    assert not QuantizeActivation.build(QuantizeSpec(torch.float16, "int8"), be).selection.fallback
    assert QuantizeActivation.build(QuantizeSpec(torch.float16, "fp8_e4m3fn"), be).selection.fallback
    assert _cuda_backend((7, 0)).kernels_for("quantize_activation") == []


@pytest.mark.parametrize("cc,scheme,gran,reason", [
    ((8, 0), "fp8_e4m3fn", "channel", "fp8 needs compute capability \u2265 8.9; this device is 8.0"),
    ((7, 0), "int8", "channel", "int8 needs compute capability \u2265 7.5; this device is 7.0"),
    ((8, 9), "fp8_e4m3fn", "block", "block-wise fp8 needs compute capability \u2265 9.0; this device is 8.9"),
    ((9, 0), "fp8_e4m3fnuz", "channel", "float8_e4m3fnuz is AMD's MI300 (gfx942) format"),
])
def test_cuda_refusal_names_the_requirement_and_the_device(cc, scheme, gran, reason):
    pytest.importorskip("triton")
    spec = ScaledGemmSpec(torch.float16, scheme, gran, "group" if gran == "block" else "token")
    sel = ScaledGemm.build(spec, _cuda_backend(cc), strict=False).selection
    assert sel.fallback and reason in sel.explain()


@pytest.mark.parametrize("arch,scheme,reason", [
    ("gfx942", "fp8_e4m3fn", "fp8 e4m3fn needs gfx950 (MI350), OCP e4m3fn; this device is gfx942"),
    ("gfx950", "fp8_e4m3fnuz", "fp8 e4m3fnuz needs gfx942 (MI300), the fnuz format; this device is gfx950"),
    ("gfx1100", "int8", "this device is gfx1100 (gfx1100 is not in the table of known architectures)"),
])
def test_rocm_refusal_names_the_requirement_and_the_device(arch, scheme, reason):
    pytest.importorskip("triton")
    sel = ScaledGemm.build(ScaledGemmSpec(torch.float16, scheme), _rocm_backend(arch), strict=False).selection
    assert sel.fallback and reason in sel.explain()


def test_tables_are_the_declared_data():
    assert cuda_quant.supported((8, 9)) == {"int8", "fp8_e4m3fn"}
    assert cuda_quant.supported((9, 0)) == {"int8", "fp8_e4m3fn", "block"}
    assert cuda_quant.supported((7, 0)) == frozenset()
    assert rocm_quant.supported("gfx942:sramecc+:xnack-") == {"int8", "fp8_e4m3fnuz", "block"}
    assert rocm_quant.supported("gfx1100") == frozenset()


def test_explain_prints_the_refusal_for_a_simulated_device(monkeypatch, capsys):
    pytest.importorskip("triton")
    from anyaccel import cli
    from anyaccel.backends.cuda import tuning

    from anyaccel.plugins import manager

    monkeypatch.setattr(tuning, "device_capability", lambda: (8, 0))
    manager.reset_registry()       # discovery reads the (simulated) device; a cached registry would not
    try:
        rc = cli.main(["explain", "scaled_gemm", "--backend", "cuda", "--scheme", "fp8_e4m3fn", "--dtype", "bf16"])
    finally:
        monkeypatch.undo()
        manager.reset_registry()
    out = capsys.readouterr().out
    assert rc in (0, None)
    assert "fp8 needs compute capability \u2265 8.9; this device is 8.0" in out, out
    assert "native.scaled_gemm" in out
