"""backends/cpu/fused.py: registered through the plugin, selected over the native fallback, and equal to the
float64 references (through the conformance cases and tolerance table) for float32, float16 and bfloat16."""
from __future__ import annotations

import pytest
import torch

from anyaccel.backends.cpu import fused as cpu_fused
from anyaccel.backends.cpu import plugin as cpu_plugin
from anyaccel.conformance.ops import fused as fused_cases
from anyaccel.conformance.tolerances import compare, tolerance
from anyaccel.core import Backend, BackendDef, KernelImpl
from anyaccel.core.fused import (GatedActivationSpec, GeluAndMul, LayerNorm, LayerNormSpec, RMSNorm, RMSNormSpec,
                                 Rotary, RotarySpec, SiluAndMul, rms_norm_reference, rope_cos_sin_cache,
                                 rotary_reference)

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@pytest.fixture(scope="module")
def cpu():
    return Backend.local(BackendDef("cpu", "anyaccel", "cpu"), cpu_fused.KERNELS)


def _run(case, backend, seed=0):
    op = case.op.build(case.spec, backend, strict=True)     # strict: the cpu kernel, never the fallback
    inputs = case.make(backend.device, seed)
    outs = case.call(op, inputs)
    atol, rtol = tolerance(case.tolerance_class, case.dtype, case.reduction)
    return op, compare(outs, case.reference(inputs), atol, rtol)


def test_plugin_registers_every_fused_kernel():
    kernels = cpu_plugin.anyaccel_kernels(None)
    ops = {k.op for k in kernels if k.backend == "cpu"}
    assert {"rms_norm", "layer_norm", "rotary_embedding", "silu_and_mul", "gelu_and_mul"} <= ops
    for k in cpu_fused.KERNELS:
        assert k.priority == 10 and k.name.startswith("cpu.") and k.description
        assert k.capability.describe()["dtypes"] == ["bfloat16", "float16", "float32"]


@pytest.mark.parametrize("dtype", DTYPES)
def test_cpu_kernels_are_chosen_for_every_variant(cpu, dtype):
    specs = [(RMSNorm, RMSNormSpec(64, dtype)), (RMSNorm, RMSNormSpec(64, dtype, fused_residual=True)),
             (LayerNorm, LayerNormSpec(64, dtype)), (LayerNorm, LayerNormSpec(64, dtype, has_bias=False)),
             (Rotary, RotarySpec(64, 64, 4, 1, dtype, "neox", max_position=8)),
             (Rotary, RotarySpec(80, 32, 4, 4, dtype, "gptj", max_position=8)),
             (SiluAndMul, GatedActivationSpec(dtype)), (GeluAndMul, GatedActivationSpec(dtype, "tanh"))]
    for cls, spec in specs:
        op = cls.build(spec, cpu, strict=True)
        assert not op.selection.fallback and op.selection.chosen.startswith("cpu."), op.selection.explain()


@pytest.mark.parametrize("dtype", DTYPES)
def test_fixed_conformance_cases_pass(cpu, dtype):
    cases = fused_cases.fixed_cases(cpu, dtype)
    assert len({c.name for c in cases}) == len(cases)
    assert {c.tolerance_class for c in cases} == {"norm", "rotary", "activation"}
    failures = []
    for case in cases:
        _, cmp = _run(case, cpu)
        if not cmp.passed:
            failures.append(f"{case.name}: {cmp.reason}")
    assert not failures, "\n".join(failures)


@pytest.mark.parametrize("dtype", DTYPES)
def test_drawn_conformance_cases_pass(cpu, dtype):
    from hypothesis import HealthCheck, given, settings

    @settings(max_examples=12, derandomize=True, deadline=None, database=None,
              suppress_health_check=list(HealthCheck))
    @given(fused_cases.case_strategy(cpu, dtype))
    def check(case):
        _, cmp = _run(case, cpu, seed=3)
        assert cmp.passed, f"{case.name}: {cmp.reason}"

    check()


def test_conformance_cases_catch_a_wrong_kernel():
    """The cases are strong enough to fail a kernel that forgets the residual, the weight or the rotary tail."""
    def bad_rms(spec):
        def k(x, w, residual, out, residual_out):
            out.copy_(x * torch.rsqrt(x.float().square().mean(-1, keepdim=True) + spec.eps))   # no weight
            if residual_out is not None:
                residual_out.copy_(x)                                                         # no add
        return k

    def bad_rotary(spec):
        good = cpu_fused._build_rotary(spec)

        def k(positions, q, k_, cache, q_out, k_out):
            good(positions, q, k_, cache, q_out, k_out)
            q_out[..., spec.rotary_dim:] = 0.0                                                 # tail dropped
        return k

    bad = Backend.local(BackendDef("bad", "tests", "cpu"), [KernelImpl("rms_norm", "bad", "bad.rms", bad_rms),
                                                            KernelImpl("rotary_embedding", "bad", "bad.rot", bad_rotary)])
    rms = fused_cases.rms_norm_case(torch.float32, (3,), 64, True, label="t")
    assert not _run(rms, bad)[1].passed
    partial = fused_cases.rotary_case(torch.float32, 4, 2, 1, 32, 16, "neox", 16, label="t")
    assert not _run(partial, bad)[1].passed


@pytest.mark.parametrize("dtype", DTYPES)
def test_cpu_rms_norm_in_place_residual_stream(cpu, dtype):
    op = RMSNorm.build(RMSNormSpec(128, dtype, fused_residual=True), cpu)
    x, r, w = torch.randn(5, 128).to(dtype), torch.randn(5, 128).to(dtype), torch.rand(128).to(dtype)
    ref_out, ref_res = rms_norm_reference(x, w, 1e-6, r)
    xi, ri = x.clone(), r.clone()
    out, res = op(xi, w, ri, out=xi, residual_out=ri)
    assert out is xi and res is ri
    atol, rtol = tolerance("norm", dtype, 128)
    ref_out = fused_cases.norm_with_allowance(ref_out, dtype, 128)  # the error model's per-element allowance
    assert compare((out, res), (ref_out, ref_res), atol, rtol).passed


@pytest.mark.parametrize("style", ["neox", "gptj"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_cpu_rotary_in_place_on_fused_qkv_views(cpu, style, dtype):
    hq, hkv, d, r = 4, 2, 32, 16
    op = Rotary.build(RotarySpec(d, r, hq, hkv, dtype, style, max_position=64), cpu)
    qkv = torch.randn(6, (hq + 2 * hkv) * d).to(dtype)
    q, k, _ = qkv.split([hq * d, hkv * d, hkv * d], dim=-1)
    q, k = q.view(6, hq, d), k.view(6, hkv, d)
    pos = torch.tensor([0, 1, 2, 40, 62, 63], dtype=torch.int32)
    cache = rope_cos_sin_cache(r, 64, 10000.0)
    q_ref, k_ref = fused_cases.rotary_with_allowance(pos, q, k, cache, style)  # with the error model's allowance
    q_out, k_out = op(pos, q, k, cache, q_out=q, k_out=k)     # in place, inside the qkv buffer
    assert q_out is q and k_out is k
    atol, rtol = tolerance("rotary", dtype)
    assert compare((q, k), (q_ref, k_ref), atol, rtol).passed
    assert torch.equal(q[..., r:].double(), q_ref[..., r:])    # the tail is untouched


@pytest.mark.parametrize("dtype", DTYPES)
def test_cpu_ops_accept_empty_batches(cpu, dtype):
    w = torch.ones(16, dtype=dtype)
    assert RMSNorm.build(RMSNormSpec(16, dtype, fused_residual=True), cpu)(
        torch.empty(0, 16, dtype=dtype), w, torch.empty(0, 16, dtype=dtype))[1].shape == (0, 16)
    assert LayerNorm.build(LayerNormSpec(16, dtype), cpu)(torch.empty(0, 16, dtype=dtype), w, w).shape == (0, 16)
    rot = Rotary.build(RotarySpec(16, 16, 2, 1, dtype, max_position=4), cpu)
    q_out, _ = rot(torch.empty(0, dtype=torch.int64), torch.empty(0, 2, 16, dtype=dtype),
                   torch.empty(0, 1, 16, dtype=dtype), rope_cos_sin_cache(16, 4, 1e4))
    assert q_out.shape == (0, 2, 16)
    assert SiluAndMul.build(GatedActivationSpec(dtype), cpu)(torch.empty(0, 6, dtype=dtype)).shape == (0, 3)
