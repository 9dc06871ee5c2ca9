"""core/scaled_gemm.py: spec checks, call validation naming the argument, native against the float64 reference,
the quantize rule, the prepare hook."""
from __future__ import annotations

import pytest
import torch

from anyaccel.core import Backend, BackendDef, InvalidArgumentError, KernelImpl, StrictModeError
from anyaccel.core.scaled_gemm import (QMAX, QUANT_DTYPES, QuantizeActivation, QuantizeSpec, ScaledGemm,
                                       ScaledGemmCapability, ScaledGemmSpec, dequantize, quantize_reference,
                                       quantize_weight, scale_shape, scaled_gemm_reference)
from anyaccel.conformance.ops.scaled_gemm import COMBOS

DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _bare():
    return Backend.local(BackendDef(name="bare", vendor="tests", device_type="cpu"), kernels=[])


def _operands(spec, m=5, k=96, n=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g)
    w = torch.randn(n, k, generator=g) / k ** 0.5
    xq, xs, xz = quantize_reference(QuantizeSpec(torch.float32, spec.scheme, spec.act_granularity,
                                                 spec.act_symmetric, spec.group_size), x)
    wq, ws = quantize_weight(w, spec.scheme, spec.weight_granularity, spec.group_size)
    return x, w, xq, xs, xz, wq, ws


@pytest.mark.parametrize("bad,arg", [
    (dict(scheme="int4"), "spec.scheme"),
    (dict(scheme="fp8"), "spec.scheme"),
    (dict(weight_granularity="row"), "spec.weight_granularity"),
    (dict(weight_granularity="block", act_granularity="token", scheme="fp8_e4m3fn"), "spec.act_granularity"),
    (dict(weight_granularity="channel", act_granularity="group"), "spec.act_granularity"),
    (dict(weight_granularity="block", act_granularity="group"), "spec.weight_granularity"),   # int8 block
    (dict(scheme="fp8_e4m3fn", act_symmetric=False), "spec.act_symmetric"),
    (dict(group_size=0), "spec.group_size"),
    (dict(dtype=torch.int8), "spec.dtype"),
    (dict(has_bias=1), "spec.has_bias"),
    (dict(in_features=-3), "spec.in_features"),
])
def test_check_spec_names_the_field(bad, arg):
    with pytest.raises(InvalidArgumentError) as e:
        ScaledGemm.build(ScaledGemmSpec(**bad), _bare())
    assert e.value.argument == arg


@pytest.mark.parametrize("bad,arg", [(dict(scheme="nf4"), "spec.scheme"), (dict(granularity="row"), "spec.granularity"),
                                     (dict(scheme="fp8_e4m3fnuz", symmetric=False), "spec.symmetric"),
                                     (dict(group_size=-1), "spec.group_size")])
def test_quantize_check_spec_names_the_field(bad, arg):
    with pytest.raises(InvalidArgumentError) as e:
        QuantizeActivation.build(QuantizeSpec(**bad), _bare())
    assert e.value.argument == arg


def test_call_validation_names_the_argument():
    spec = ScaledGemmSpec(torch.float32, "int8", "channel", "token", act_symmetric=False, has_bias=True,
                          in_features=96)
    op = ScaledGemm.build(spec, _bare())
    _, _, xq, xs, xz, wq, ws = _operands(spec)
    b = torch.zeros(24)
    ok = (xq, xs, wq, ws, b, xz)
    op(*ok)  # the good call passes

    def bad(i, v):
        args = list(ok)
        args[i] = v
        with pytest.raises(InvalidArgumentError) as e:
            op(*args)
        return e.value.argument

    assert bad(0, xq.float()) == "x_q"                                   # not quantized
    assert bad(0, xq[:, :90].contiguous()) == "x_q"                      # K mismatch
    assert bad(1, xs[:1]) == "x_scale"                                   # per-tensor scale for a per-token spec
    assert bad(1, xs.double()) == "x_scale"
    assert bad(2, wq.view(torch.uint8)) == "weight"
    assert bad(2, wq[:, :48].contiguous()) == "weight"                   # spec.in_features
    assert bad(3, ws.reshape(-1)) == "weight_scale"                      # [N] instead of [N, 1]
    assert bad(4, torch.zeros(23)) == "bias"
    assert bad(4, None) == "bias"                                        # spec.has_bias
    assert bad(5, None) == "x_zero"                                      # asymmetric needs a zero point
    assert bad(5, xz.float()) == "x_zero"
    with pytest.raises(InvalidArgumentError) as e:
        op(xq, xs, wq, ws, b, xz, out=torch.empty(5, 24, dtype=torch.float16))
    assert e.value.argument == "out"
    with pytest.raises(InvalidArgumentError) as e:
        op(xq.t().contiguous().t(), xs, wq, ws, b, xz)                   # strided x_q
    assert e.value.argument == "x_q"
    sym = ScaledGemm.build(ScaledGemmSpec(torch.float32, "int8"), _bare())
    with pytest.raises(InvalidArgumentError) as e:
        sym(xq, xs, wq, ws, None, xz)
    assert e.value.argument == "x_zero"
    blk = ScaledGemm.build(ScaledGemmSpec(torch.float32, "fp8_e4m3fn", "block", "group", group_size=32), _bare())
    with pytest.raises(InvalidArgumentError) as e:
        blk(torch.zeros(2, 96, dtype=torch.float8_e4m3fn), torch.ones(2, 3),
            torch.zeros(24, 96, dtype=torch.float8_e4m3fn), torch.ones(1, 3))    # ceil(24/32) = 1 row block: ok
        blk(torch.zeros(2, 96, dtype=torch.float8_e4m3fn), torch.ones(2, 3),
            torch.zeros(24, 96, dtype=torch.float8_e4m3fn), torch.ones(1, 4))    # 4 K blocks for K = 96: refused
    assert e.value.argument == "weight_scale"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("combo", COMBOS, ids=lambda c: "-".join(str(v) for v in c))
def test_native_matches_reference(combo, dtype):
    scheme, wg, ag, sym = combo
    spec = ScaledGemmSpec(dtype, scheme, wg, ag, sym, group_size=32, has_bias=True)
    op = ScaledGemm.build(spec, _bare())
    assert op.selection.fallback
    x, w, xq, xs, xz, wq, ws = _operands(spec, k=80, n=40)
    b = torch.randn(40).to(dtype)
    y = op(xq, xs, wq, ws, b, xz, op.prepare(wq, ws))
    ref = scaled_gemm_reference(spec, xq, xs, wq, ws, b, xz)
    u = {torch.float32: 2 ** -24, torch.float16: 2 ** -11, torch.bfloat16: 2 ** -8}[dtype]
    assert ((y.double() - ref).abs() <= 2 * u * ref.abs() + 1e-4).all()
    # the quantized product approximates the float one (a sanity bound, loose for fp8's 3 mantissa bits)
    full = x.double() @ w.double().T + b.double()
    tol = 0.05 if scheme == "int8" else 0.25
    assert (ref - full).abs().max() < tol * full.abs().max()


@pytest.mark.parametrize("scheme", list(QUANT_DTYPES))
@pytest.mark.parametrize("gran", ["token", "tensor", "group"])
def test_quantize_rule(scheme, gran):
    spec = QuantizeSpec(torch.float32, scheme, gran, group_size=32)
    x = torch.randn(6, 100) * torch.exp(torch.randn(6, 1))
    q, s, z = QuantizeActivation.build(spec, _bare())(x)
    assert q.dtype == QUANT_DTYPES[scheme] and z is None
    assert s.shape == scale_shape("group" if gran == "group" else gran, 6, 100, 32) and s.dtype == torch.float32
    rq, rs, _ = quantize_reference(spec, x)
    torch.testing.assert_close(s, rs, rtol=4 * 2 ** -24, atol=0)
    s2 = s if gran == "tensor" else s
    xhat = dequantize(q, s2, gran, 32)
    # every value within half a step (int8) / half an e4m3 ulp of its scaled value; amax maps to QMAX exactly
    assert q.float().abs().max() <= QMAX[scheme]
    if scheme == "int8":
        step = dequantize(torch.ones(6, 100), s2, gran, 32)
        assert ((xhat - x.double()).abs() <= 0.5 * step * (1 + 1e-5)).all()
    else:
        assert ((xhat - x.double()).abs() <= 2 ** -4 * x.double().abs() + 2 ** -9 * xhat.abs().max()).all()


def test_quantize_asymmetric_covers_the_range_with_a_zero_point():
    x = torch.rand(4, 64) * 3 + 0.5                       # all positive: symmetric int8 would waste half the codes
    q, s, z = QuantizeActivation.build(QuantizeSpec(torch.float32, "int8", "token", symmetric=False), _bare())(x)
    assert z.dtype == torch.int32 and z.shape == (4, 1)
    assert (z == -128).all() and int(q.max()) == 127       # min(x, 0) = 0 is code -128, each row's max code 127
    xhat = (q.double() - z.double()) * s.double()
    assert ((xhat - x.double()).abs() <= 0.5 * s.double() * (1 + 1e-5)).all()


def test_prepare_runs_once_and_is_required_by_a_preparing_kernel():
    calls = []

    def build(spec):
        def kernel(xq, xs, xz, wq, ws, prepared, bias, out):
            assert prepared == ("packed", wq.shape)
            return out.zero_()

        def prepare(wq, ws):
            calls.append(1)
            return ("packed", wq.shape)

        kernel.prepare = prepare
        return kernel

    be = Backend.local(BackendDef(name="p", vendor="tests", device_type="cpu"),
                       [KernelImpl(op="scaled_gemm", backend="p", name="p.sg", build=build,
                                   capability=ScaledGemmCapability(), priority=1)])
    spec = ScaledGemmSpec(torch.float32)
    op = ScaledGemm.build(spec, be, strict=True)
    _, _, xq, xs, xz, wq, ws = _operands(spec)
    prep = op.prepare(wq, ws)
    for _ in range(3):
        op(xq, xs, wq, ws, prepared=prep)
    assert calls == [1]
    with pytest.raises(InvalidArgumentError) as e:
        op(xq, xs, wq, ws)
    assert e.value.argument == "prepared"
    with pytest.raises(InvalidArgumentError) as e:
        op.prepare(wq, ws[:3])
    assert e.value.argument == "weight_scale"


def test_capability_refusals_carry_the_declared_reason():
    cap = ScaledGemmCapability(schemes=frozenset({"int8"}), refusals=(("fp8_e4m3fn", "fp8 needs X; this is Y"),))
    assert cap.not_supported_reasons(ScaledGemmSpec(scheme="fp8_e4m3fn")) == ["fp8 needs X; this is Y"]
    assert "fp8_e4m3fnuz" in cap.not_supported_reasons(ScaledGemmSpec(scheme="fp8_e4m3fnuz"))[0]
    assert cap.not_supported_reasons(ScaledGemmSpec(scheme="int8")) == []
    be = Backend.local(BackendDef(name="c", vendor="tests", device_type="cpu"),
                       [KernelImpl(op="scaled_gemm", backend="c", name="c.sg", build=lambda s: None, capability=cap)])
    with pytest.raises(StrictModeError, match="fp8 needs X; this is Y"):
        ScaledGemm.build(ScaledGemmSpec(scheme="fp8_e4m3fn"), be, strict=True)


def test_fp8_formats_are_different_numbers():
    """The same byte is twice as large in e4m3fn as in e4m3fnuz: a kernel must know which it reads."""
    v = torch.tensor([1.0, -3.5, 96.0, 2.0 ** -6]).to(torch.float8_e4m3fnuz)
    assert torch.equal(v.view(torch.float8_e4m3fn).float(), 2 * v.float())
