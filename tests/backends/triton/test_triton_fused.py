"""The shared Triton norms, rotary and gated activations, run by the interpreter, through the core ops."""
from __future__ import annotations

import pytest
import torch

from anyaccel.core.fused import (GatedActivationSpec, GeluAndMul, LayerNorm, LayerNormSpec, RMSNorm, RMSNormSpec,
                                 Rotary, RotarySpec, SiluAndMul, rope_cos_sin_cache)

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _randn(*shape, dtype, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("fused", [False, True])
def test_rms_norm(interp, close, dtype, fused):
    H = 300
    op = RMSNorm.build(RMSNormSpec(H, dtype, eps=1e-5, fused_residual=fused), interp, strict=True)
    assert op.selection.chosen == "triton-interpreter.rms_norm"
    x = _randn(3, 5, H, dtype=dtype)
    w = _randn(H, dtype=dtype, seed=1)
    if fused:
        r = _randn(3, 5, H, dtype=dtype, seed=2)
        out, res_out = op(x, w, r)
        ref_out, ref_res = RMSNorm.reference(x, w, 1e-5, r)
        close(res_out, ref_res, dtype)
        close(out, ref_out, dtype, scale=2)
    else:
        close(op(x, w), RMSNorm.reference(x, w, 1e-5), dtype)


def test_rms_norm_in_place(interp, close):
    dtype = torch.bfloat16
    op = RMSNorm.build(RMSNormSpec(128, dtype, fused_residual=True), interp, strict=True)
    x, w, r = _randn(9, 128, dtype=dtype), _randn(128, dtype=dtype, seed=1), _randn(9, 128, dtype=dtype, seed=2)
    ref_out, ref_res = RMSNorm.reference(x, w, 1e-6, r)
    out, res_out = op(x, w, r, out=x, residual_out=r)
    assert out is x and res_out is r
    close(r, ref_res, dtype)
    close(x, ref_out, dtype, scale=2)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bias", [False, True])
def test_layer_norm(interp, close, dtype, bias):
    H = 200
    op = LayerNorm.build(LayerNormSpec(H, dtype, has_bias=bias), interp, strict=True)
    x = (_randn(17, H, dtype=torch.float32) * 3 + 1).to(dtype)
    w = _randn(H, dtype=dtype, seed=1)
    b = _randn(H, dtype=dtype, seed=2) if bias else None
    close(op(x, w, b), LayerNorm.reference(x, w, b), dtype, scale=2)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("style", ["neox", "gptj"])
@pytest.mark.parametrize("rot", [64, 32])
def test_rotary(interp, close, dtype, style, rot):
    T, Hq, Hkv, D, P = 11, 4, 2, 64, 100
    op = Rotary.build(RotarySpec(D, rot, Hq, Hkv, dtype, style, max_position=P), interp, strict=True)
    assert op.selection.chosen == "triton-interpreter.rotary"
    cache = rope_cos_sin_cache(rot, P, 10000.0)
    pos = torch.randint(0, P, (T,), generator=torch.Generator().manual_seed(5))
    q, k = _randn(T, Hq, D, dtype=dtype), _randn(T, Hkv, D, dtype=dtype, seed=1)
    rq, rk = Rotary.reference(pos, q, k, cache, style)
    qo, ko = op(pos, q, k, cache)
    close(qo, rq, dtype)
    close(ko, rk, dtype)


def test_rotary_in_place_on_a_qkv_view(interp, close):
    """q and k as strided views of a fused qkv projection, rotated in place; v must stay untouched."""
    dtype, T, Hq, Hkv, D = torch.float16, 6, 4, 2, 32
    op = Rotary.build(RotarySpec(D, D, Hq, Hkv, dtype, "neox", max_position=64), interp, strict=True)
    qkv = _randn(T, (Hq + 2 * Hkv) * D, dtype=dtype)
    q = qkv[:, :Hq * D].view(T, Hq, D)
    k = qkv[:, Hq * D:(Hq + Hkv) * D].view(T, Hkv, D)
    v_before = qkv[:, (Hq + Hkv) * D:].clone()
    cache = rope_cos_sin_cache(D, 64, 10000.0)
    pos = torch.arange(T, dtype=torch.int32) * 7
    rq, rk = Rotary.reference(pos, q, k, cache, "neox")
    op(pos, q, k, cache, q_out=q, k_out=k)
    close(q, rq, dtype)
    close(k, rk, dtype)
    assert torch.equal(qkv[:, (Hq + Hkv) * D:], v_before)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("cls,approx", [(SiluAndMul, "none"), (GeluAndMul, "none"), (GeluAndMul, "tanh")])
def test_gated_activation(interp, close, dtype, cls, approx):
    op = cls.build(GatedActivationSpec(dtype, approx), interp, strict=True)
    assert not op.selection.fallback
    x = (_randn(4, 3, 2 * 150, dtype=torch.float32) * 3).to(dtype)
    close(op(x), cls.reference(x, approx), dtype, scale=4)
