"""core/weight_only.py: the exact dequantizers against gguf-py's, decompose, round-to-nearest, check_spec, the
per-weight and per-call validation (each error names its argument), native vs reference in every dtype."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from anyaccel.conformance.ops.weight_only import random_weight
from anyaccel.core import (Backend, BackendDef, InvalidArgumentError, PreparedWeight, QuantizedWeight,
                           WeightOnlyGemm, WeightOnlyGemmSpec, WEIGHT_FORMATS, decompose, dequantize,
                           quantize_rtn, weight_only_gemm_reference)

GGUF = [f for f, d in WEIGHT_FORMATS.items() if d.gguf]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _bare():
    return Backend.local(BackendDef(name="bare", vendor="tests", device_type="cpu"), kernels=[])


@pytest.mark.parametrize("fmt", GGUF)
def test_gguf_dequantization_is_ggmls_byte_layout(fmt):
    quants = pytest.importorskip("gguf.quants")
    w = random_weight(fmt, 6, 512, torch.Generator().manual_seed(1))
    theirs = quants.dequantize(w.data.numpy(), WEIGHT_FORMATS[fmt].ggml_type)
    ours = dequantize(w)
    # gguf-py computes in float32; ours is exact (float64): equal to float32 rounding
    np.testing.assert_allclose(ours.numpy(), theirs.astype(np.float64), rtol=2e-7, atol=1e-12)


@pytest.mark.parametrize("fmt", list(WEIGHT_FORMATS))
def test_decompose_is_exact(fmt):
    gguf = WEIGHT_FORMATS[fmt].gguf
    w = random_weight(fmt, 8, 256, torch.Generator().manual_seed(2), None if gguf else 64, zeros=not gguf)
    d = decompose(w)
    v = d.codes.double() * d.scale.repeat_interleave(d.chunk, 1) + d.offset.repeat_interleave(d.chunk, 1)
    assert torch.equal(v, dequantize(w))


def test_q4_1_keeps_elements_0_to_15_in_low_nibbles():
    blocks = torch.zeros(1, 20, dtype=torch.uint8)
    blocks[0, 0:2] = torch.tensor([0x00, 0x3C], dtype=torch.uint8)  # d = 1.0 (fp16 0x3C00), m = 0
    blocks[0, 4] = 0x21  # byte 0: low nibble 1 -> element 0, high nibble 2 -> element 16
    v = dequantize(QuantizedWeight("q4_1", (1, 32), blocks))[0]
    assert v[0] == 1 and v[16] == 2 and v[1] == 0


@pytest.mark.parametrize("fmt,zeros", [("int4", False), ("int4", True), ("int8", False), ("int8", True)])
def test_round_to_nearest_error_is_at_most_half_a_step(fmt, zeros):
    w = torch.randn(16, 128)
    qw = quantize_rtn(w, fmt, 32, zeros)
    err = (dequantize(qw) - w.double()).abs().reshape(16, 4, 32).amax(-1)
    assert bool((err <= qw.scales.double() * 0.5 + 1e-6).all())


@pytest.mark.parametrize("spec,arg", [
    (WeightOnlyGemmSpec(dtype=torch.int8), "spec.dtype"),
    (WeightOnlyGemmSpec(format="q5_0"), "spec.format"),
    (WeightOnlyGemmSpec(in_features=0), "spec.in_features"),
    (WeightOnlyGemmSpec(in_features=4000, group_size=128), "spec.in_features"),
    (WeightOnlyGemmSpec(group_size=48), "spec.group_size"),
    (WeightOnlyGemmSpec(format="q4_0", group_size=32), "spec.group_size"),
    (WeightOnlyGemmSpec(format="q4_k", in_features=4000, group_size=None), "spec.in_features"),
    (WeightOnlyGemmSpec(format="q8_0", group_size=None, has_zeros=True), "spec.has_zeros"),
    (WeightOnlyGemmSpec(scale_dtype=torch.int8), "spec.scale_dtype"),
])
def test_check_spec_names_the_field(spec, arg):
    with pytest.raises(InvalidArgumentError) as e:
        WeightOnlyGemm.build(spec, _bare())
    assert e.value.argument == arg


def _op(**kw):
    spec = WeightOnlyGemmSpec(**{"dtype": torch.float32, "format": "int4", "in_features": 64, "out_features": 16,
                                 "group_size": 32, **kw})
    return WeightOnlyGemm.build(spec, _bare())


def test_prepare_validates_each_field_by_name():
    op = _op(has_zeros=True)
    good = quantize_rtn(torch.randn(16, 64), "int4", 32, zeros=True)
    rep = lambda **kw: QuantizedWeight(**{**good.__dict__, **kw})  # noqa: E731
    bad = {
        "weight": object(),
        "weight.format": rep(format="int8"),
        "weight.shape": rep(shape=(16, 32)),
        "weight.data": rep(data=good.data[:, :16].contiguous()),
        "weight.scales": rep(scales=good.scales[:8]),
        "weight.zeros": rep(zeros=None),
        "weight.group_size": rep(group_size=64),
    }
    for arg, w in bad.items():
        with pytest.raises(InvalidArgumentError) as e:
            op.prepare(w)
        assert e.value.argument == arg, (arg, str(e.value))
    with pytest.raises(InvalidArgumentError, match="0..15"):
        op.prepare(rep(zeros=torch.full_like(good.zeros, 16)))


def test_call_validates_x_weight_bias_out():
    op = _op(has_bias=True)
    pw = op.prepare(quantize_rtn(torch.randn(16, 64), "int4", 32))
    x, b = torch.randn(3, 64), torch.randn(16)
    cases = [("x", lambda: op(torch.randn(3, 63), pw, b)), ("x", lambda: op(x.half(), pw, b)),
             ("weight", lambda: op(x, quantize_rtn(torch.randn(16, 64), "int4", 32), b)),
             ("weight", lambda: op(x, PreparedWeight(pw.packed, "someone.else", pw.packed), b)),
             ("bias", lambda: op(x, pw, None)), ("bias", lambda: op(x, pw, torch.randn(15))),
             ("out", lambda: op(x, pw, b, out=torch.empty(3, 15)))]
    for arg, call in cases:
        with pytest.raises(InvalidArgumentError) as e:
            call()
        assert e.value.argument == arg


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("fmt", list(WEIGHT_FORMATS))
def test_native_matches_reference(fmt, dtype):
    gguf = WEIGHT_FORMATS[fmt].gguf
    k = 256
    w = random_weight(fmt, 24, k, torch.Generator().manual_seed(3), None if gguf else 128, zeros=not gguf)
    op = WeightOnlyGemm.build(WeightOnlyGemmSpec(dtype, fmt, k, 24, None if gguf else 128, not gguf), _bare())
    assert op.selection.fallback
    x = torch.randn(2, 5, k).to(dtype)
    y = op(x, op.prepare(w))
    assert y.shape == (2, 5, 24) and y.dtype == dtype
    ref = weight_only_gemm_reference(x, w)
    tol = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}[dtype]
    torch.testing.assert_close(y.double(), ref, rtol=tol, atol=tol * float(ref.abs().max()))
