"""core.fused: validation before any kernel runs, the float64 references against independent math (and HF
transformers' own RMSNorm / rotary / RoPE-scaling code), the native fallback kernels, RopeScaling."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from anyaccel.core import Backend, BackendDef, InvalidArgumentError, KernelImpl
from anyaccel.core.fused import (GatedActivationCapability, GatedActivationSpec, GeluAndMul, LayerNorm,
                                 LayerNormSpec, NormCapability, RMSNorm, RMSNormSpec, RopeScaling, Rotary,
                                 RotaryCapability, RotarySpec, SiluAndMul, gelu_and_mul_reference,
                                 layer_norm_reference, rms_norm_reference, rope_cos_sin_cache, rope_inv_freq,
                                 rotary_reference, silu_and_mul_reference)

CALLS = []
OPS = ("rms_norm", "layer_norm", "rotary_embedding", "silu_and_mul", "gelu_and_mul")


def _spy_backend():
    def build(spec):
        def kernel(*args):
            CALLS.append(1)
        return kernel

    return Backend.local(BackendDef("spy", "tests", "cpu"), [KernelImpl(op, "spy", f"spy.{op}", build) for op in OPS])


@pytest.fixture
def spy():
    CALLS.clear()
    return _spy_backend()


@pytest.fixture(scope="module")
def bare():
    """A backend with no kernels: every op falls back to the core's native implementation."""
    return Backend.local(BackendDef("bare", "tests", "cpu"), [])


def _expect(argument, fragment, fn, *args, **kwargs):
    with pytest.raises(InvalidArgumentError) as e:
        fn(*args, **kwargs)
    assert e.value.argument == argument, str(e.value)
    msg = str(e.value)
    assert f"argument '{argument}'" in msg and fragment in msg and "received" in msg, msg
    assert CALLS == []


H = 8
X, W, R = torch.randn(3, H), torch.randn(H), torch.randn(3, H)
META = torch.randn(3, H, device="meta")


# ------------------------------------------------------------------------------------------------------ norms

@pytest.mark.parametrize("args,kwargs,argument,fragment", [
    ((torch.randn(3, 7), W, R), {}, "x", "H = 8"),
    ((torch.randn(3, H).int(), W, R), {}, "x", "dtype"),
    ((X.double(), W, R), {}, "x", "dtype"),
    ((torch.tensor(1.0), W, R), {}, "x", "[..., H]"),
    (("x", W, R), {}, "x", "torch.Tensor"),
    ((X, torch.randn(H + 1), R), {}, "weight", "shape [8]"),
    ((X, torch.randn(1, H), R), {}, "weight", "1-d"),
    ((X, W.half(), R), {}, "weight", "dtype"),
    ((X, W.to("meta"), R), {}, "weight", "a tensor on cpu"),
    ((META, W, R), {}, "weight", "a tensor on meta"),
    ((X, W, torch.randn(2, H)), {}, "residual", "shape [3, 8]"),
    ((X, W, R.bfloat16()), {}, "residual", "dtype"),
    ((X, W, R.to("meta")), {}, "residual", "a tensor on cpu"),
    ((X, W, None), {}, "residual", "spec.fused_residual is True"),
    ((X, W, R), {"out": torch.empty(3, H + 1)}, "out", "shape [3, 8]"),
    ((X, W, R), {"out": torch.empty(3, H, dtype=torch.float16)}, "out", "dtype"),
    ((X, W, R), {"out": torch.empty(H, 3).t()}, "out", "contiguous"),
    ((X, W, R), {"residual_out": torch.empty(3, 2)}, "residual_out", "shape [3, 8]"),
    ((X, W, R), {"residual_out": torch.empty(3, H, device="meta")}, "residual_out", "a tensor on cpu"),
])
def test_rms_norm_rejects_bad_input(spy, args, kwargs, argument, fragment):
    op = RMSNorm.build(RMSNormSpec(H, torch.float32, fused_residual=True), spy)
    _expect(argument, fragment, op, *args, **kwargs)


def test_rms_norm_rejects_residual_when_not_fused_and_aliased_outputs(spy):
    op = RMSNorm.build(RMSNormSpec(H, torch.float32), spy)
    _expect("residual", "spec.fused_residual is False", op, X, W, R)
    _expect("residual_out", "spec.fused_residual is False", op, X, W, residual_out=torch.empty(3, H))
    fused = RMSNorm.build(RMSNormSpec(H, torch.float32, fused_residual=True), spy)
    buf = torch.empty(3, H)
    _expect("residual_out", "distinct from 'out'", fused, X, W, R, out=buf, residual_out=buf)


@pytest.mark.parametrize("args,kwargs,argument,fragment", [
    ((torch.randn(3, 5), W, W), {}, "x", "H = 8"),
    ((X.long(), W, W), {}, "x", "dtype"),
    ((X, torch.randn(4), W), {}, "weight", "shape [8]"),
    ((X, W, torch.randn(4)), {}, "bias", "shape [8]"),
    ((X, W, W.bfloat16()), {}, "bias", "dtype"),
    ((X, W, W.to("meta")), {}, "bias", "a tensor on cpu"),
    ((X, W, None), {}, "bias", "spec.has_bias is True"),
    ((X, W, W), {"out": torch.empty(3, H, dtype=torch.bfloat16)}, "out", "dtype"),
    ((X, W, W), {"out": torch.empty(2, H)}, "out", "shape [3, 8]"),
])
def test_layer_norm_rejects_bad_input(spy, args, kwargs, argument, fragment):
    op = LayerNorm.build(LayerNormSpec(H, torch.float32), spy)
    _expect(argument, fragment, op, *args, **kwargs)


def test_layer_norm_without_bias_rejects_a_bias(spy):
    op = LayerNorm.build(LayerNormSpec(H, torch.float32, has_bias=False), spy)
    _expect("bias", "spec.has_bias is False", op, X, W, W)


@pytest.mark.parametrize("cls,spec,argument", [
    (RMSNorm, RMSNormSpec(0, torch.float32), "spec.hidden_size"),
    (RMSNorm, RMSNormSpec(8, torch.float32, eps=0.0), "spec.eps"),
    (RMSNorm, RMSNormSpec(8, torch.float32, eps=-1e-6), "spec.eps"),
    (RMSNorm, RMSNormSpec(8, torch.int32), "spec.dtype"),
    (LayerNorm, LayerNormSpec(-4, torch.float16), "spec.hidden_size"),
    (LayerNorm, LayerNormSpec(8, torch.float64), "spec.dtype"),
    (LayerNorm, LayerNormSpec(8, torch.float32, eps=float("nan")), "spec.eps"),
    (RMSNorm, LayerNormSpec(8, torch.float32), "spec"),
])
def test_bad_norm_spec_is_rejected_at_build(spy, cls, spec, argument):
    with pytest.raises(InvalidArgumentError) as e:
        cls.build(spec, spy)
    assert e.value.argument == argument


def test_norm_capability_reasons():
    cap = NormCapability(max_hidden_size=1024, fused_residual=False, bias=False)
    assert cap.not_supported_reasons(RMSNormSpec(1024, torch.float32)) == []
    reasons = cap.not_supported_reasons(RMSNormSpec(2048, torch.float32, fused_residual=True))
    assert any("2048" in r for r in reasons) and any("fused residual" in r for r in reasons)
    assert any("bias" in r for r in cap.not_supported_reasons(LayerNormSpec(64, torch.float32)))
    half_only = NormCapability(dtypes=frozenset({torch.float16}))
    assert any("float32" in r for r in half_only.not_supported_reasons(LayerNormSpec(64, torch.float32)))


def test_rms_norm_reference_matches_hf_llama_rms_norm():
    llama = pytest.importorskip("transformers.models.llama.modeling_llama")
    torch.manual_seed(0)
    x = torch.randn(4, 5, 64)
    norm = llama.LlamaRMSNorm(64, eps=1e-5)
    with torch.no_grad():
        norm.weight.copy_(1 + 0.1 * torch.randn(64))
        hf = norm(x)
    ours = rms_norm_reference(x, norm.weight.detach(), 1e-5)
    assert ours.dtype == torch.float64
    torch.testing.assert_close(ours, hf.double(), rtol=1e-5, atol=1e-6)


def test_rms_norm_reference_fused_is_the_norm_of_the_sum():
    x, r, w = torch.randn(3, 16, dtype=torch.float64), torch.randn(3, 16, dtype=torch.float64), torch.rand(16)
    out, res = rms_norm_reference(x, w, 1e-6, r)
    h = x + r
    torch.testing.assert_close(res, h)
    expected = h / torch.sqrt((h * h).sum(-1, keepdim=True) / 16 + 1e-6) * w.double()
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)


def test_layer_norm_reference_matches_torch_in_float64():
    x, w, b = torch.randn(5, 33, dtype=torch.float64) + 2, torch.randn(33), torch.randn(33)
    torch.testing.assert_close(layer_norm_reference(x, w, b, 1e-5),
                               F.layer_norm(x, (33,), w.double(), b.double(), 1e-5), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(layer_norm_reference(x, w, None, 1e-5),
                               F.layer_norm(x, (33,), w.double(), None, 1e-5), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_native_norms_match_the_reference(bare, dtype):
    tol = {"atol": 2e-5, "rtol": 2e-5} if dtype == torch.float32 else {"atol": 3e-2, "rtol": 2e-2}
    x, r, w, b = (torch.randn(2, 3, 96).to(dtype), torch.randn(2, 3, 96).to(dtype), torch.rand(96).to(dtype),
                  torch.randn(96).to(dtype))
    rms = RMSNorm.build(RMSNormSpec(96, dtype), bare)
    assert rms.selection.fallback and rms.selection.chosen == "native.rms_norm"
    torch.testing.assert_close(rms(x, w).double(), rms_norm_reference(x, w), **tol)
    fused = RMSNorm.build(RMSNormSpec(96, dtype, fused_residual=True), bare)
    out, res = fused(x, w, r)
    ref_out, ref_res = rms_norm_reference(x, w, 1e-6, r)
    torch.testing.assert_close(out.double(), ref_out, **tol)
    torch.testing.assert_close(res.double(), ref_res, **tol)
    ln = LayerNorm.build(LayerNormSpec(96, dtype), bare)
    torch.testing.assert_close(ln(x, w, b).double(), layer_norm_reference(x, w, b), **tol)


def test_native_rms_norm_in_place_and_strided(bare):
    op = RMSNorm.build(RMSNormSpec(32, torch.float32, fused_residual=True), bare)
    x, r, w = torch.randn(4, 32), torch.randn(4, 32), torch.rand(32)
    ref_out, ref_res = rms_norm_reference(x, w, 1e-6, r)
    xi, ri = x.clone(), r.clone()
    out, res = op(xi, w, ri, out=xi, residual_out=ri)        # the residual stream updated in place
    assert out is xi and res is ri
    torch.testing.assert_close(out.double(), ref_out, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(res.double(), ref_res, rtol=1e-6, atol=1e-6)
    wide = torch.randn(4, 64)
    xs = wide[:, 16:48]                                       # strided rows
    plain = RMSNorm.build(RMSNormSpec(32, torch.float32), bare)
    torch.testing.assert_close(plain(xs, w).double(), rms_norm_reference(xs, w), rtol=1e-5, atol=1e-5)
    empty = plain(torch.empty(0, 32), w)
    assert empty.shape == (0, 32)


# ----------------------------------------------------------------------------------------------------- rotary

RSPEC = RotarySpec(head_size=16, rotary_dim=8, num_heads=4, num_kv_heads=2, dtype=torch.float32, style="neox",
                   max_position=32)
POS, Q, K = torch.arange(5), torch.randn(5, 4, 16), torch.randn(5, 2, 16)
CACHE = rope_cos_sin_cache(8, 32, 10000.0)


@pytest.mark.parametrize("args,kwargs,argument,fragment", [
    ((POS.float(), Q, K, CACHE), {}, "positions", "dtype in (int32, int64)"),
    ((POS[:4], Q, K, CACHE), {}, "positions", "shape [5]"),
    ((POS.view(5, 1), Q, K, CACHE), {}, "positions", "1-d"),
    ((POS.to("meta"), Q, K, CACHE), {}, "positions", "a tensor on cpu"),
    ((POS, Q.view(5, 64), K, CACHE), {}, "q", "3-d"),
    ((POS, torch.randn(5, 3, 16), K, CACHE), {}, "q", "shape [5, 4, 16]"),
    ((POS, Q.half(), K, CACHE), {}, "q", "dtype"),
    ((POS, Q.int(), K, CACHE), {}, "q", "dtype"),
    ((POS, torch.randn(5, 16, 4).transpose(1, 2), K, CACHE), {}, "q", "unit stride"),
    ((POS, Q, torch.randn(5, 4, 16), CACHE), {}, "k", "shape [5, 2, 16]"),
    ((POS, Q, torch.randn(4, 2, 16), CACHE), {}, "k", "shape [5, 2, 16]"),
    ((POS, Q, K.bfloat16(), CACHE), {}, "k", "dtype"),
    ((POS, Q, K.to("meta"), CACHE), {}, "k", "a tensor on cpu"),
    ((POS, Q, K, CACHE.half()), {}, "cos_sin_cache", "dtype in (float32)"),
    ((POS, Q, K, CACHE[:16]), {}, "cos_sin_cache", "shape [32, 8]"),
    ((POS, Q, K, rope_cos_sin_cache(16, 32, 1e4)), {}, "cos_sin_cache", "shape [32, 8]"),
    ((POS, Q, K, CACHE.to("meta")), {}, "cos_sin_cache", "a tensor on cpu"),
    ((POS, Q, K, CACHE), {"q_out": torch.empty(5, 2, 16)}, "q_out", "shape [5, 4, 16]"),
    ((POS, Q, K, CACHE), {"k_out": torch.empty(5, 2, 16, dtype=torch.bfloat16)}, "k_out", "dtype"),
    ((POS, Q, K, CACHE), {"k_out": torch.empty(5, 16, 2).transpose(1, 2)}, "k_out", "unit stride"),
    ((POS, Q, K, CACHE), {"q_out": "q"}, "q_out", "torch.Tensor"),
])
def test_rotary_rejects_bad_input(spy, args, kwargs, argument, fragment):
    op = Rotary.build(RSPEC, spy)
    _expect(argument, fragment, op, *args, **kwargs)


@pytest.mark.parametrize("changes,argument", [
    ({"rotary_dim": 7}, "spec.rotary_dim"),
    ({"rotary_dim": 18}, "spec.rotary_dim"),
    ({"rotary_dim": 0}, "spec.rotary_dim"),
    ({"head_size": 0}, "spec.head_size"),
    ({"num_heads": 0}, "spec.num_heads"),
    ({"num_kv_heads": -1}, "spec.num_kv_heads"),
    ({"max_position": 0}, "spec.max_position"),
    ({"style": "glm"}, "spec.style"),
    ({"dtype": torch.int64}, "spec.dtype"),
])
def test_bad_rotary_spec_is_rejected_at_build(spy, changes, argument):
    import dataclasses

    with pytest.raises(InvalidArgumentError) as e:
        Rotary.build(dataclasses.replace(RSPEC, **changes), spy)
    assert e.value.argument == argument


def test_rotary_spec_needs_max_position_by_keyword():
    with pytest.raises(TypeError):
        RotarySpec(16, 8, 4, 2, torch.float32)  # type: ignore[call-arg]
    assert RotarySpec(16, 8, 4, 2, torch.float32, "gptj", max_position=7).max_position == 7


def test_rotary_capability_reasons():
    cap = RotaryCapability(styles=frozenset({"neox"}), head_sizes=frozenset({64, 128}), partial=False)
    assert cap.not_supported_reasons(RotarySpec(128, 128, 8, 8, torch.float16, max_position=8)) == []
    reasons = cap.not_supported_reasons(RotarySpec(80, 32, 8, 8, torch.float16, "gptj", max_position=8))
    assert len(reasons) == 3 and any("gptj" in r for r in reasons) and any("80" in r for r in reasons)
    assert any("partial" in r for r in reasons)


def _hf_rope(x, cos, sin):
    """HF's neox-style rotation: x * cos + rotate_half(x) * sin on the leading rotary dims."""
    llama = pytest.importorskip("transformers.models.llama.modeling_llama")
    q_embed, _ = llama.apply_rotary_pos_emb(x, x, cos, sin, unsqueeze_dim=1)
    return q_embed


def test_rotary_reference_neox_matches_hf_apply_rotary_pos_emb():
    torch.manual_seed(0)
    d, r, p = 32, 16, 64
    cache = rope_cos_sin_cache(r, p, 10000.0, dtype=torch.float64)
    inv, _ = rope_inv_freq(r, 10000.0)
    pos = torch.tensor([0, 3, 63, 17, 5])
    q, k = torch.randn(5, 4, d, dtype=torch.float64), torch.randn(5, 2, d, dtype=torch.float64)
    freqs = pos[:, None].double() * inv                          # HF: emb = cat(freqs, freqs)
    cos, sin = torch.cat((freqs, freqs), -1).cos(), torch.cat((freqs, freqs), -1).sin()
    q_ref, k_ref = rotary_reference(pos, q, k, cache, "neox")
    torch.testing.assert_close(q_ref[..., :r], _hf_rope(q[..., :r], cos, sin), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(k_ref[..., :r], _hf_rope(k[..., :r], cos, sin), rtol=1e-12, atol=1e-12)
    assert torch.equal(q_ref[..., r:], q[..., r:]) and torch.equal(k_ref[..., r:], k[..., r:])


def test_rotary_reference_gptj_is_a_complex_rotation_of_pairs():
    torch.manual_seed(1)
    d, r, p = 24, 16, 40
    cache = rope_cos_sin_cache(r, p, 500.0, dtype=torch.float64)
    inv, _ = rope_inv_freq(r, 500.0)
    pos = torch.tensor([39, 0, 7], dtype=torch.int32)
    q, k = torch.randn(3, 2, d, dtype=torch.float64), torch.randn(3, 1, d, dtype=torch.float64)
    q_ref, k_ref = rotary_reference(pos, q, k, cache, "gptj")
    turn = torch.polar(torch.ones(3, r // 2, dtype=torch.float64), pos[:, None].double() * inv)[:, None]
    for x, got in ((q, q_ref), (k, k_ref)):
        z = torch.view_as_complex(x[..., :r].reshape(*x.shape[:2], r // 2, 2).contiguous())
        expected = torch.view_as_real(z * turn).reshape(*x.shape[:2], r)
        torch.testing.assert_close(got[..., :r], expected, rtol=1e-12, atol=1e-12)
        assert torch.equal(got[..., r:], x[..., r:])


def test_rotary_preserves_norms_and_position_zero_is_identity():
    cache = rope_cos_sin_cache(16, 8, 10000.0)
    q, k = torch.randn(2, 3, 16), torch.randn(2, 1, 16)
    for style in ("neox", "gptj"):
        q_ref, k_ref = rotary_reference(torch.tensor([0, 5]), q, k, cache, style)
        torch.testing.assert_close(q_ref[0], q[0].double())
        torch.testing.assert_close(q_ref.norm(dim=-1), q.double().norm(dim=-1), rtol=1e-6, atol=1e-6)
        assert not torch.allclose(q_ref[1], q[1].double())


@pytest.mark.parametrize("style", ["neox", "gptj"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_native_rotary_matches_the_reference(bare, style, dtype):
    spec = RotarySpec(32, 24, 6, 2, dtype, style, max_position=50)
    op = Rotary.build(spec, bare)
    assert op.selection.fallback
    cache = rope_cos_sin_cache(24, 50, 10000.0, RopeScaling("linear", 2.0))
    pos = torch.randint(0, 50, (7,), dtype=torch.int32)
    q, k = torch.randn(7, 6, 32).to(dtype), torch.randn(7, 2, 32).to(dtype)
    q_ref, k_ref = rotary_reference(pos, q, k, cache, style)
    tol = {"atol": 1e-5, "rtol": 1e-5} if dtype == torch.float32 else {"atol": 1e-2, "rtol": 2e-2}
    q_out, k_out = op(pos, q, k, cache)
    torch.testing.assert_close(q_out.double(), q_ref, **tol)
    torch.testing.assert_close(k_out.double(), k_ref, **tol)
    assert torch.equal(q_out[..., 24:], q[..., 24:])        # the tail passes through bit-exactly
    qi, ki = q.clone(), k.clone()                               # in place
    q_in, k_in = op(pos.long(), qi, ki, cache, q_out=qi, k_out=ki)
    assert q_in is qi and k_in is ki
    assert torch.equal(qi, q_out) and torch.equal(ki, k_out)


def test_native_rotary_on_views_of_a_fused_qkv(bare):
    spec = RotarySpec(16, 16, 4, 2, torch.float32, max_position=16)
    op = Rotary.build(spec, bare)
    qkv = torch.randn(3, (4 + 2 + 2) * 16)
    q, k, _ = qkv.split([64, 32, 32], dim=-1)
    q, k = q.view(3, 4, 16), k.view(3, 2, 16)
    assert not q.is_contiguous()
    cache = rope_cos_sin_cache(16, 16, 10000.0)
    pos = torch.tensor([1, 2, 15])
    q_ref, k_ref = rotary_reference(pos, q, k, cache)
    q_out, k_out = op(pos, q, k, cache)
    torch.testing.assert_close(q_out.double(), q_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(k_out.double(), k_ref, rtol=1e-5, atol=1e-5)
    q_empty, k_empty = op(pos[:0], q[:0], k[:0], cache)
    assert q_empty.shape == (0, 4, 16) and k_empty.shape == (0, 2, 16)


# ------------------------------------------------------------------------------------------ RoPE scaling & cache

def test_rope_scaling_from_hf_maps_each_variant():
    assert RopeScaling.from_hf(None) is None
    assert RopeScaling.from_hf({"rope_type": "default", "rope_theta": 1e4}) is None
    lin = RopeScaling.from_hf({"type": "linear", "factor": 2.0})
    assert lin == RopeScaling("linear", 2.0)
    dyn = RopeScaling.from_hf({"type": "dynamic", "factor": 4.0}, max_position_embeddings=2048)
    assert dyn.rope_type == "dynamic" and dyn.original_max_position_embeddings == 2048
    l3 = RopeScaling.from_hf({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                              "original_max_position_embeddings": 8192, "rope_theta": 500000.0})
    assert (l3.factor, l3.low_freq_factor, l3.high_freq_factor, l3.original_max_position_embeddings) == (
        8.0, 1.0, 4.0, 8192)
    yarn = RopeScaling.from_hf({"rope_type": "yarn", "factor": 40, "original_max_position_embeddings": 4096,
                                "beta_fast": 32, "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0})
    assert yarn.attention_scaling == pytest.approx(1.0)
    plain = RopeScaling.from_hf({"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 4096})
    assert plain.attention_scaling == pytest.approx(0.1 * math.log(4.0) + 1.0)
    implied = RopeScaling.from_hf({"rope_type": "yarn", "original_max_position_embeddings": 1024}, 4096)
    assert implied.factor == 4.0
    assert RopeScaling("linear", 2.0).attention_scaling == 1.0


@pytest.mark.parametrize("params,argument", [
    ({"rope_type": "longrope", "short_factor": [1.0]}, "rope_type"),
    ({"type": "su"}, "type"),
    ({"rope_type": "linear"}, "factor"),
    ({"rope_type": "llama3", "factor": 8.0, "original_max_position_embeddings": 8192}, "low_freq_factor"),
    ({"rope_type": "yarn", "factor": 4.0}, "original_max_position_embeddings"),
    ({"rope_type": "linear", "factor": -1.0}, "factor"),
    ({"full_attention": {"rope_type": "default"}, "sliding_attention": {"rope_type": "linear", "factor": 2.0}},
     "rope_parameters"),
    ({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 4.0, "high_freq_factor": 4.0,
      "original_max_position_embeddings": 8192}, "high_freq_factor"),
])
def test_rope_scaling_from_hf_names_the_bad_key(params, argument):
    with pytest.raises(InvalidArgumentError) as e:
        RopeScaling.from_hf(params)
    assert e.value.argument == argument and f"'{argument}'" in str(e.value)


def test_rope_cache_rejects_bad_arguments():
    for kwargs, argument in (({"rotary_dim": 7}, "rotary_dim"), ({"max_position": 0}, "max_position"),
                             ({"base": -1.0}, "base"), ({"scaling": {"type": "linear"}}, "scaling"),
                             ({"rotary_dim": 2, "scaling": RopeScaling("dynamic", 2.0, 16)}, "rotary_dim")):
        args = {"rotary_dim": 8, "max_position": 16, "base": 10000.0, **kwargs}
        with pytest.raises(InvalidArgumentError) as e:
            rope_cos_sin_cache(**args)
        assert e.value.argument == argument


def test_rope_cache_layout_is_cos_then_sin():
    cache = rope_cos_sin_cache(8, 10, 100.0, dtype=torch.float64)
    assert cache.shape == (10, 8) and cache.dtype == torch.float64
    assert rope_cos_sin_cache(8, 10, 100.0).dtype == torch.float32
    inv = 1.0 / 100.0 ** (torch.arange(0, 8, 2, dtype=torch.float64) / 8)
    ang = 7 * inv
    torch.testing.assert_close(cache[7], torch.cat((ang.cos(), ang.sin())))


HF_VARIANTS = [
    {"rope_type": "linear", "factor": 4.0},
    {"rope_type": "dynamic", "factor": 2.0},
    {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
     "original_max_position_embeddings": 1024},
    {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 1024},
    {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 1024, "beta_fast": 16, "beta_slow": 2,
     "mscale": 1.0, "mscale_all_dim": 0.5},
    {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 1024, "attention_factor": 1.25,
     "truncate": False},
]


@pytest.mark.parametrize("partial", [1.0, 0.5])
@pytest.mark.parametrize("params", HF_VARIANTS, ids=lambda p: "-".join(f"{k[:6]}={v}" for k, v in p.items()))
def test_rope_cache_matches_transformers(params, partial):
    rope = pytest.importorskip("transformers.modeling_rope_utils")
    from transformers import LlamaConfig

    head_dim, max_pos, theta = 64, 4096, 500000.0
    cfg = LlamaConfig(hidden_size=4 * head_dim, num_attention_heads=4, head_dim=head_dim,
                      max_position_embeddings=max_pos,
                      rope_parameters={**params, "rope_theta": theta, "partial_rotary_factor": partial})
    kind = params.get("rope_type", params.get("type"))
    cache_len = 2 * max_pos if kind == "dynamic" else max_pos      # dynamic: frequencies for this length
    hf_inv, hf_attn = rope.ROPE_INIT_FUNCTIONS[kind](cfg, "cpu", seq_len=cache_len if kind == "dynamic" else None)
    scaling = RopeScaling.from_hf(params, max_position_embeddings=max_pos)
    r = int(head_dim * partial)
    inv, attn = rope_inv_freq(r, theta, scaling, max_position=cache_len)
    torch.testing.assert_close(inv, hf_inv.double(), rtol=2e-6, atol=0)   # HF computes in float32
    assert attn == pytest.approx(hf_attn, rel=1e-12)
    cache = rope_cos_sin_cache(r, cache_len, theta, scaling, dtype=torch.float64)
    pos = torch.tensor([0, 1, 17, 1023, cache_len - 1], dtype=torch.float64)
    ang = pos[:, None] * hf_inv.double()
    expected = torch.cat((ang.cos(), ang.sin()), -1) * hf_attn
    # float32 frequencies give an angle error of about pos * 1e-7 rad
    torch.testing.assert_close(cache[pos.long()], expected, rtol=0, atol=2e-3)


def test_default_rope_cache_matches_hf_rotary_embedding_module():
    llama = pytest.importorskip("transformers.models.llama.modeling_llama")
    from transformers import LlamaConfig

    cfg = LlamaConfig(hidden_size=128, num_attention_heads=2, max_position_embeddings=256, rope_theta=10000.0)
    emb = llama.LlamaRotaryEmbedding(cfg)
    pos = torch.tensor([[0, 5, 100, 255]])
    cos, sin = emb(torch.zeros(1, dtype=torch.float32), pos)
    cache = rope_cos_sin_cache(64, 256, 10000.0)
    torch.testing.assert_close(cache[pos[0], :32], cos[0, :, :32], rtol=0, atol=1e-4)
    torch.testing.assert_close(cache[pos[0], 32:], sin[0, :, :32], rtol=0, atol=1e-4)


def test_dynamic_rope_does_not_scale_within_the_original_context():
    plain = rope_cos_sin_cache(16, 128, 10000.0)
    dyn = rope_cos_sin_cache(16, 128, 10000.0, RopeScaling("dynamic", 4.0, original_max_position_embeddings=128))
    assert torch.equal(plain, dyn)
    longer = rope_cos_sin_cache(16, 512, 10000.0, RopeScaling("dynamic", 4.0, original_max_position_embeddings=128))
    assert not torch.allclose(longer[:128], plain)


# ------------------------------------------------------------------------------------------ gated activations

@pytest.mark.parametrize("cls", [SiluAndMul, GeluAndMul])
@pytest.mark.parametrize("args,kwargs,argument,fragment", [
    ((torch.randn(3, 7),), {}, "x", "even"),
    ((torch.randn(3, 0),), {}, "x", "non-zero"),
    ((torch.tensor(2.0),), {}, "x", "[..., 2d]"),
    ((torch.randn(3, 8).long(),), {}, "x", "dtype"),
    ((torch.randn(3, 8).half(),), {}, "x", "dtype"),
    ((None,), {}, "x", "torch.Tensor"),
    ((torch.randn(3, 8),), {"out": torch.empty(3, 8)}, "out", "shape [3, 4]"),
    ((torch.randn(3, 8),), {"out": torch.empty(3, 4, dtype=torch.bfloat16)}, "out", "dtype"),
    ((torch.randn(3, 8),), {"out": torch.empty(3, 4, device="meta")}, "out", "a tensor on cpu"),
    ((torch.randn(3, 8),), {"out": torch.empty(4, 3).t()}, "out", "contiguous"),
])
def test_gated_activation_rejects_bad_input(spy, cls, args, kwargs, argument, fragment):
    op = cls.build(GatedActivationSpec(torch.float32), spy)
    _expect(argument, fragment, op, *args, **kwargs)


def test_bad_activation_spec_is_rejected_at_build(spy):
    for cls, spec, argument in ((SiluAndMul, GatedActivationSpec(torch.float32, "tanh"), "spec.approximate"),
                                (GeluAndMul, GatedActivationSpec(torch.float32, "sigmoid"), "spec.approximate"),
                                (GeluAndMul, GatedActivationSpec(torch.int8), "spec.dtype")):
        with pytest.raises(InvalidArgumentError) as e:
            cls.build(spec, spy)
        assert e.value.argument == argument


def test_gated_activation_capability_reasons():
    cap = GatedActivationCapability(approximations=frozenset({"none"}))
    assert cap.not_supported_reasons(GatedActivationSpec(torch.float16)) == []
    assert any("tanh" in r for r in cap.not_supported_reasons(GatedActivationSpec(torch.float16, "tanh")))


def test_activation_references_match_torch_in_float64():
    x = torch.randn(4, 3, 20, dtype=torch.float64) * 3
    a, b = x[..., :10], x[..., 10:]
    torch.testing.assert_close(silu_and_mul_reference(x), F.silu(a) * b, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(gelu_and_mul_reference(x), F.gelu(a) * b, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(gelu_and_mul_reference(x, "tanh"), F.gelu(a, approximate="tanh") * b,
                               rtol=1e-12, atol=1e-12)
    assert not torch.allclose(gelu_and_mul_reference(x, "tanh"), gelu_and_mul_reference(x), rtol=0, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_native_activations_match_the_reference(bare, dtype):
    tol = {"atol": 1e-5, "rtol": 1e-5} if dtype == torch.float32 else {"atol": 1e-2, "rtol": 2e-2}
    x = torch.randn(2, 5, 66).to(dtype)
    silu = SiluAndMul.build(GatedActivationSpec(dtype), bare)
    assert silu.selection.fallback and silu(x).shape == (2, 5, 33)
    torch.testing.assert_close(silu(x).double(), silu_and_mul_reference(x), **tol)
    for approx in ("none", "tanh"):
        gelu = GeluAndMul.build(GatedActivationSpec(dtype, approx), bare)
        torch.testing.assert_close(gelu(x).double(), gelu_and_mul_reference(x, approx), **tol)
    strided = torch.randn(4, 100).to(dtype)[:, 10:76]
    torch.testing.assert_close(silu(strided).double(), silu_and_mul_reference(strided), **tol)
    assert silu(torch.empty(0, 8, dtype=dtype)).shape == (0, 4)


def test_references_are_exposed_on_the_ops():
    x = torch.randn(2, 8)
    assert torch.equal(SiluAndMul.reference(x), silu_and_mul_reference(x))
    assert torch.equal(GeluAndMul.reference(x, "tanh"), gelu_and_mul_reference(x, "tanh"))
    assert RMSNorm.reference is rms_norm_reference and Rotary.reference is rotary_reference
    assert LayerNorm.reference is layer_norm_reference


# -- memory safety: positions, caches and weights a kernel reads through raw offsets ------------------------------

def _rotary_op(backend, P=8):
    return Rotary.build(RotarySpec(head_size=8, rotary_dim=8, num_heads=2, num_kv_heads=1, dtype=torch.float32,
                                   max_position=P), backend)


@pytest.mark.parametrize("bad", [8, 9, -1, 10 ** 6])
def test_rotary_rejects_positions_outside_the_cache(spy, bad):
    op = _rotary_op(spy)
    pos = torch.tensor([0, bad, 3])
    _expect("positions", "values in [0, 8)", op, pos, torch.randn(3, 2, 8), torch.randn(3, 1, 8),
            rope_cos_sin_cache(8, 8, 10000.0))
    assert CALLS == []


def test_rotary_reads_a_positions_tensor_once_until_it_is_written(spy, monkeypatch):
    op = _rotary_op(spy)
    reads = []
    real = torch.aminmax
    monkeypatch.setattr(torch, "aminmax", lambda t: reads.append(1) or real(t))
    pos, cache = torch.tensor([0, 5, 7]), rope_cos_sin_cache(8, 8, 10000.0)
    q, k = torch.randn(3, 2, 8), torch.randn(3, 1, 8)
    for _ in range(4):  # the layers of one forward pass share the batch's positions
        op(pos, q, k, cache)
    assert len(reads) == 1 and len(CALLS) == 4
    pos[1] = 8  # written in place: the version counter moves and the range is read again
    with pytest.raises(InvalidArgumentError, match="'positions'"):
        op(pos, q, k, cache)
    assert len(reads) == 2 and len(CALLS) == 4


def test_rotary_copies_strided_positions_and_rejects_a_strided_cache(spy):
    op = _rotary_op(spy)
    seen = []
    op.kernel = lambda positions, *rest: seen.append(positions.is_contiguous())
    pos = torch.stack([torch.tensor([1, 2, 3]), torch.tensor([10 ** 6] * 3)], 1)[:, 0]
    cache = rope_cos_sin_cache(8, 8, 10000.0)
    op(pos, torch.randn(3, 2, 8), torch.randn(3, 1, 8), cache)
    assert seen == [True]
    _expect("cos_sin_cache", "contiguous", op, pos, torch.randn(3, 2, 8), torch.randn(3, 1, 8), cache.t().contiguous().t())


@pytest.mark.parametrize("cls,spec", [(RMSNorm, RMSNormSpec(8, torch.float32)), (LayerNorm, LayerNormSpec(8, torch.float32))])
def test_norms_reject_a_strided_weight_or_bias(spy, cls, spec):
    op = cls.build(spec, spy)
    w = torch.randn(16)[::2]
    args = (torch.randn(3, 8), w) + ((torch.randn(8),) if cls is LayerNorm else ())
    _expect("weight", "contiguous", op, *args)
    if cls is LayerNorm:
        _expect("bias", "contiguous", op, torch.randn(3, 8), w.contiguous(), torch.randn(16)[::2])
    assert CALLS == []


@pytest.mark.parametrize("cls,spec,argument", [
    (RMSNorm, RMSNormSpec(8, torch.float32, fused_residual=1), "spec.fused_residual"),
    (LayerNorm, LayerNormSpec(8, torch.float32, has_bias="yes"), "spec.has_bias"),
    (Rotary, RotarySpec(8, 8, 2, 1, torch.float32, max_position=10 ** 12), "spec.max_position"),
])
def test_more_spec_fields_are_checked_at_build(spy, cls, spec, argument):
    _expect(argument, "", cls.build, spec, spy)


@pytest.mark.parametrize("kw,argument", [
    (dict(rope_type="yarn", beta_fast=0.0), "beta_fast"),
    (dict(rope_type="yarn", beta_fast=float("nan")), "beta_fast"),
    (dict(rope_type="yarn", beta_slow=-1.0), "beta_slow"),
    (dict(rope_type="yarn", mscale=float("inf")), "mscale"),
    (dict(rope_type="yarn", mscale=1.0, mscale_all_dim=-10 / math.log(4.0)), "mscale_all_dim"),
    (dict(rope_type="yarn", attention_factor=float("inf")), "attention_factor"),
    (dict(rope_type="llama3", low_freq_factor=0.0), "low_freq_factor"),
    (dict(rope_type="linear", factor=10 ** 400), "factor"),
])
def test_rope_scaling_rejects_degenerate_parameters_at_construction(kw, argument):
    base = dict(factor=4.0, original_max_position_embeddings=64)
    base.update(kw)
    with pytest.raises(InvalidArgumentError) as e:
        RopeScaling(**base)
    assert e.value.argument == argument


def test_rope_cache_rejects_yarn_base_one_and_absurd_lengths():
    yarn = RopeScaling(rope_type="yarn", factor=4.0, original_max_position_embeddings=64)
    _expect("base", "> 1 for yarn", rope_cos_sin_cache, 8, 16, 1.0, yarn)
    _expect("base", "finite", rope_cos_sin_cache, 8, 16, float("inf"))
    _expect("max_position", "2**31", rope_cos_sin_cache, 8, 10 ** 12, 10000.0)
    dyn = RopeScaling(rope_type="dynamic", factor=1e300, original_max_position_embeddings=1)
    _expect("scaling", "finite", rope_cos_sin_cache, 8, 64, 10000.0, dyn)
