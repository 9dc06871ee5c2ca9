"""backends/cpu/features.py: CPU feature detection, and the decode kernels' float32 path for CPUs without native
half-precision matrix instructions (forced here with ANYACCEL_CPU_ISA, since the test machine may have them)."""
import pytest
import torch

from anyaccel.backends.cpu import features
from anyaccel.backends.cpu.attention import KERNELS
from anyaccel.conformance.ops.attention import make_batch, reference_with_allowance
from anyaccel.conformance.tolerances import compare, tolerance
from anyaccel.core.attention import Attention, AttentionSpec


@pytest.fixture
def isa(monkeypatch):
    def force(value):
        monkeypatch.setenv("ANYACCEL_CPU_ISA", value)
        features.detect.cache_clear()
    yield force
    monkeypatch.delenv("ANYACCEL_CPU_ISA", raising=False)
    features.detect.cache_clear()


def test_detection_reports_flags_and_torch_level():
    f = features.detect()
    assert f.vector == str(torch.backends.cpu.get_cpu_capability())
    assert features.half_matmul_native(torch.float32)
    assert features.half_matmul_native(torch.bfloat16) == f.bf16_native
    assert f.bf16_native == bool({"avx512_bf16", "amx_bf16"} & f.flags)
    assert "native half matmul" in f.summary()


def test_override(isa):
    isa("generic")
    assert not features.half_matmul_native(torch.bfloat16) and not features.half_matmul_native(torch.float16)
    isa("native")
    assert features.half_matmul_native(torch.bfloat16) and features.half_matmul_native(torch.float16)


@pytest.mark.parametrize("mode", ["generic", "native"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("layout_extra", [("HND", 2), ("HND", 60), ("NHD", 2)], ids=["tiles", "gather", "NHD"])
def test_decode_both_arithmetic_paths_match_reference(make_backend, isa, mode, dtype, layout_extra):
    isa(mode)
    layout, extra = layout_extra
    be = make_backend(KERNELS, layout=layout, block_sizes=(8,))
    spec = AttentionSpec(8, 2, 24, dtype, block_size=8, kv_layout=layout)
    b = make_batch(spec, [(1, 70), (1, 9), (3, 20), (1, 33)], torch.device("cpu"), seed=5, extra_blocks=extra)
    op = Attention.build(spec, be, strict=True)  # the arithmetic is chosen here, from the forced features
    out = torch.full_like(b["q"], float("nan"))
    op(b["q"], b["k_cache"], b["v_cache"], b["meta"], out=out)
    atol, rtol = tolerance("attention", dtype, 70)
    c = compare((out,), (reference_with_allowance(b, spec),), atol, rtol)
    assert c.passed, c.reason
