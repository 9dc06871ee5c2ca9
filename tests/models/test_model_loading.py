"""Loading errors name the tensor; unknown architectures list the supported ones; no pickle."""
from __future__ import annotations

import pytest
import torch

from anyaccel.conformance.models import TINY_CONFIGS
from anyaccel.core.errors import UnsupportedError
from anyaccel.models import WeightLoadError, build_model


def _state(hf):
    return dict(hf.state_dict())


def test_missing_tensor_is_named(cpu_backend, reference_models):
    hf = reference_models("llama")
    sd = _state(hf)
    del sd["model.layers.1.self_attn.k_proj.weight"]
    model = build_model(TINY_CONFIGS["llama"], cpu_backend, torch.float32)
    with pytest.raises(WeightLoadError, match=r"missing tensor 'layers\.1\.self_attn\.k_proj\.weight'"):
        model.load_weights(sd.items())


def test_wrong_shape_is_named(cpu_backend, reference_models):
    sd = _state(reference_models("gpt2"))
    sd["transformer.h.0.mlp.c_fc.weight"] = torch.zeros(64, 100)
    model = build_model(TINY_CONFIGS["gpt2"], cpu_backend, torch.float32)
    with pytest.raises(WeightLoadError, match=r"h\.0\.mlp\.c_fc\.weight' has shape \[64, 100\], expected \[64, 256\]"):
        model.load_weights(sd.items())


def test_unexpected_tensor_is_named_unless_allowed(cpu_backend, reference_models):
    sd = _state(reference_models("mixtral"))
    sd["model.layers.0.mystery.weight"] = torch.zeros(3)
    model = build_model(TINY_CONFIGS["mixtral"], cpu_backend, torch.float32)
    with pytest.raises(WeightLoadError, match="layers.0.mystery.weight"):
        model.load_weights(sd.items())
    model.load_weights(sd.items(), allow_unexpected=True)
    assert model.loaded


def test_unknown_architecture_lists_supported(cpu_backend):
    with pytest.raises(UnsupportedError, match="FalconForCausalLM.*supported architectures:.*LlamaForCausalLM"):
        build_model({"architectures": ["FalconForCausalLM"], "model_type": "falcon"}, cpu_backend, torch.float32)


def test_forward_before_loading_is_a_clear_error(cpu_backend):
    model = build_model(TINY_CONFIGS["qwen3"], cpu_backend, torch.float32)
    with pytest.raises(WeightLoadError, match="no weights loaded"):
        model.forward(torch.tensor([1]), torch.tensor([0]), [], None)


def test_directory_without_safetensors_refuses_pickle(tmp_path, cpu_backend):
    import json

    (tmp_path / "config.json").write_text(json.dumps(TINY_CONFIGS["llama"]))
    (tmp_path / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(WeightLoadError, match="pickle"):
        build_model(str(tmp_path), cpu_backend, torch.float32)


def test_weights_are_plain_tensors(cpu_backend, reference_models):
    model = build_model(reference_models("qwen2_moe"), cpu_backend, torch.bfloat16)
    assert all(type(t) is torch.Tensor and not t.requires_grad for t in model.weights.values())
    assert all(t.dtype == torch.bfloat16 for t in model.weights.values())
    assert model.weights["layers.0.mlp.w13"].shape == (6, 96, 64)
