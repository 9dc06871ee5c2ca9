"""models.gguf: metadata -> HF config, GGUF names -> HF names, dequantization, and undoing llama.cpp's q/k row
permutation — on a tiny GGUF written here with gguf.GGUFWriter (no real checkpoint needed)."""
from __future__ import annotations

import os

import pytest
import torch

gguf = pytest.importorskip("gguf", reason="the 'gguf' package is not installed")

from anyaccel.core.errors import UnsupportedError  # noqa: E402
from anyaccel.models.gguf import (gguf_name_to_hf, permute_rotary_rows, read_gguf,  # noqa: E402
                                  unpermute_rotary_rows)

CFG = dict(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=8,
           num_key_value_heads=2, head_dim=8, rms_norm_eps=1e-5, rope_theta=50000.0, max_position_embeddings=128,
           bos_token_id=1, eos_token_id=2)

_LAYER = {"self_attn.q_proj.weight": "attn_q.weight", "self_attn.k_proj.weight": "attn_k.weight",
          "self_attn.v_proj.weight": "attn_v.weight", "self_attn.o_proj.weight": "attn_output.weight",
          "mlp.gate_proj.weight": "ffn_gate.weight", "mlp.up_proj.weight": "ffn_up.weight",
          "mlp.down_proj.weight": "ffn_down.weight", "input_layernorm.weight": "attn_norm.weight",
          "post_attention_layernorm.weight": "ffn_norm.weight"}


def tiny_state_dict(seed: int = 0, tied: bool = False):
    g = torch.Generator().manual_seed(seed)
    c = CFG
    h, d = c["hidden_size"], c["head_dim"]
    sd = {"model.embed_tokens.weight": torch.randn(c["vocab_size"], h, generator=g),
          "model.norm.weight": 1 + 0.1 * torch.randn(h, generator=g)}
    if not tied:
        sd["lm_head.weight"] = torch.randn(c["vocab_size"], h, generator=g) / h ** 0.5
    for i in range(c["num_hidden_layers"]):
        p = f"model.layers.{i}."
        shapes = {"self_attn.q_proj.weight": (c["num_attention_heads"] * d, h),
                  "self_attn.k_proj.weight": (c["num_key_value_heads"] * d, h),
                  "self_attn.v_proj.weight": (c["num_key_value_heads"] * d, h),
                  "self_attn.o_proj.weight": (h, c["num_attention_heads"] * d),
                  "mlp.gate_proj.weight": (c["intermediate_size"], h),
                  "mlp.up_proj.weight": (c["intermediate_size"], h),
                  "mlp.down_proj.weight": (h, c["intermediate_size"])}
        for n, s in shapes.items():
            sd[p + n] = torch.randn(*s, generator=g) / s[1] ** 0.5
        sd[p + "input_layernorm.weight"] = 1 + 0.1 * torch.randn(h, generator=g)
        sd[p + "post_attention_layernorm.weight"] = 1 + 0.1 * torch.randn(h, generator=g)
    return sd


def write_tiny_gguf(path: str, sd, quantize_ffn: bool = False) -> None:
    """Write ``sd`` (HF names) the way llama.cpp's converter would: renamed, q/k rows permuted."""
    from gguf import GGMLQuantizationType as Q
    from gguf.quants import quantize

    c = CFG
    w = gguf.GGUFWriter(path, "llama")
    w.add_block_count(c["num_hidden_layers"])
    w.add_context_length(c["max_position_embeddings"])
    w.add_embedding_length(c["hidden_size"])
    w.add_feed_forward_length(c["intermediate_size"])
    w.add_head_count(c["num_attention_heads"])
    w.add_head_count_kv(c["num_key_value_heads"])
    w.add_key_length(c["head_dim"])
    w.add_value_length(c["head_dim"])
    w.add_layer_norm_rms_eps(c["rms_norm_eps"])
    w.add_rope_freq_base(c["rope_theta"])
    w.add_rope_dimension_count(c["head_dim"])
    w.add_vocab_size(c["vocab_size"])
    w.add_bos_token_id(c["bos_token_id"])
    w.add_eos_token_id(c["eos_token_id"])
    w.add_chat_template("{{ messages[0]['content'] }}")
    inverse = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
               "lm_head.weight": "output.weight"}
    for name, t in sd.items():
        if name in inverse:
            gname = inverse[name]
        else:
            i, rest = name.removeprefix("model.layers.").split(".", 1)
            gname = f"blk.{i}.{_LAYER[rest]}"
        if gname.endswith("attn_q.weight"):
            t = permute_rotary_rows(t, c["num_attention_heads"])
        elif gname.endswith("attn_k.weight"):
            t = permute_rotary_rows(t, c["num_key_value_heads"])
        arr = t.float().numpy()
        if quantize_ffn and ".ffn_" in gname and "norm" not in gname:
            w.add_tensor(gname, quantize(arr, Q.Q8_0), raw_dtype=Q.Q8_0)
        else:
            w.add_tensor(gname, arr)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    sd = tiny_state_dict()
    path = str(tmp_path_factory.mktemp("gguf") / "tiny.gguf")
    write_tiny_gguf(path, sd)
    return path, sd


def test_config_from_metadata(tiny):
    path, _ = tiny
    ck = read_gguf(path)
    c = ck.config
    assert c["architectures"] == ["LlamaForCausalLM"]
    for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
              "num_key_value_heads", "head_dim", "max_position_embeddings", "bos_token_id", "eos_token_id"):
        assert c[k] == CFG[k], k
    assert c["rms_norm_eps"] == pytest.approx(CFG["rms_norm_eps"])
    assert c["rope_theta"] == CFG["rope_theta"]
    assert c["tie_word_embeddings"] is False
    assert ck.chat_template == "{{ messages[0]['content'] }}"


def test_weights_round_trip_exactly_with_qk_rows_restored(tiny):
    path, sd = tiny
    got = dict(read_gguf(path).weights())
    assert set(got) == set(sd)
    for name, t in sd.items():
        assert got[name].dtype == torch.float32
        assert torch.equal(got[name], t), name


def test_quantized_tensors_are_dequantized(tmp_path):
    sd = tiny_state_dict(seed=1, tied=True)
    path = str(tmp_path / "q8.gguf")
    write_tiny_gguf(path, sd, quantize_ffn=True)
    ck = read_gguf(path)
    assert ck.quant_types()["Q8_0"] == 3 * CFG["num_hidden_layers"]
    assert ck.config["tie_word_embeddings"] is True
    got = dict(ck.weights())
    assert "lm_head.weight" not in got
    w = sd["model.layers.0.mlp.up_proj.weight"]
    err = (got["model.layers.0.mlp.up_proj.weight"] - w).abs().max()
    assert 0 < err < 0.02 * w.abs().max()  # Q8_0: lossy but close


def test_unpermute_inverts_the_converter_and_is_not_identity():
    w = torch.arange(6 * 8 * 3, dtype=torch.float32).reshape(48, 3)
    p = permute_rotary_rows(w, 6)
    assert not torch.equal(p, w)
    assert torch.equal(unpermute_rotary_rows(p, 6), w)
    # within one head of size 8, rows [0..3 | 4..7] become interleaved [0, 4, 1, 5, ...]
    assert p[:8, 0].tolist() == [w[r, 0].item() for r in (0, 4, 1, 5, 2, 6, 3, 7)]


def test_names_map_and_unknown_names_fail_loudly():
    assert gguf_name_to_hf("blk.11.ffn_down.weight") == "model.layers.11.mlp.down_proj.weight"
    assert gguf_name_to_hf("output.weight") == "lm_head.weight"
    assert gguf_name_to_hf("rope_freqs.weight") is None
    with pytest.raises(UnsupportedError, match="blk.0.ssm_conv1d.weight"):
        gguf_name_to_hf("blk.0.ssm_conv1d.weight")


def test_unsupported_architecture_is_named(tmp_path):
    path = str(tmp_path / "other.gguf")
    w = gguf.GGUFWriter(path, "mamba")
    w.add_block_count(1)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(UnsupportedError, match="'mamba'"):
        read_gguf(path)


def test_matches_transformers_own_gguf_loader(tiny):
    """transformers' loader (the reference for the real checkpoint) reads the same tensors from the same file."""
    pytest.importorskip("transformers")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModelForCausalLM

    path, sd = tiny
    hf = AutoModelForCausalLM.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path),
                                              dtype=torch.float32)
    ref = hf.state_dict()
    for name, t in read_gguf(path).weights():
        assert torch.equal(t, ref[name]), name


def test_model_from_gguf_matches_transformers_logits(tiny, cpu_backend):
    """Built from the GGUF, our Llama gives transformers' logits for the same weights."""
    transformers = pytest.importorskip("transformers")
    from anyaccel.models.gguf import build_gguf_model
    from anyaccel.models.runner import teacher_forced_logits

    path, sd = tiny
    model, _ = build_gguf_model(path, cpu_backend, torch.float32)
    cfg = transformers.LlamaConfig(**{k: v for k, v in read_gguf(path).config.items()
                                      if k not in ("architectures", "model_type")})
    hf = transformers.LlamaForCausalLM(cfg).eval()
    hf.load_state_dict(sd, strict=False)
    ids = [5, 17, 3, 44, 90, 12, 7]
    with torch.no_grad():
        ref = hf(torch.tensor([ids])).logits[0]
    ours = teacher_forced_logits(model, ids)
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-4)
