"""Quantized models against their own dequantized float32 reference.

A quantized model computes with packed weights; its reference is the *same* model with every packed weight
replaced by its exact dequantized values in float32 (on the cpu backend). Dequantization being exact, the two
differ only by accumulation order, so greedy tokens must be identical (fp32) and teacher-forced logits close.

- :func:`write_tiny_quantized_gguf`: a two-layer Llama GGUF whose linear layers use every packed format (Q4_0,
  Q4_1, Q8_0, Q4_K, Q6_K), written with the ``gguf`` package (random blocks, valid scales).
- :func:`check_packed_gguf`: that file packed on a backend vs its dequantized float32 build on cpu.
- :func:`check_rtn`: a tiny float model quantized on the fly (``int4``/``int8``) vs the float model whose
  weights are the dequantized round-to-nearest values.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, List, Optional

import torch

from ..core.weight_only import WEIGHT_FORMATS, dequantize, quantize_rtn

__all__ = ["TINY_QUANT_CONFIG", "LAYER_FORMATS", "write_tiny_quantized_gguf", "check_packed_gguf", "check_rtn",
           "QuantModelCheck"]

#: a Llama small enough for the interpreter, with K = 256 so the 256-element K-quant blocks fit
TINY_QUANT_CONFIG = dict(vocab_size=160, hidden_size=256, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=64, max_position_embeddings=256,
                         rms_norm_eps=1e-6)
#: GGUF tensor -> format, per layer (the q/k/v of a layer share one so the fused qkv stays packed)
LAYER_FORMATS = [
    {"attn_q": "q4_0", "attn_k": "q4_0", "attn_v": "q4_0", "attn_output": "q4_1", "ffn_gate": "q4_k",
     "ffn_up": "q4_k", "ffn_down": "q6_k"},
    {"attn_q": "q8_0", "attn_k": "q8_0", "attn_v": "q8_0", "attn_output": "q6_k", "ffn_gate": "q4_1",
     "ffn_up": "q4_1", "ffn_down": "q4_k"},
]
OUTPUT_FORMAT = "q8_0"


@dataclass
class QuantModelCheck:
    """The outcome: greedy tokens of both, the largest teacher-forced logit difference, what was packed."""

    tokens: List[int]
    reference_tokens: List[int]
    max_logit_err: float
    logit_scale: float
    description: str

    @property
    def same_tokens(self) -> bool:
        return self.tokens == self.reference_tokens


def write_tiny_quantized_gguf(path: str, seed: int = 0) -> str:
    import gguf
    import numpy as np

    from .ops.weight_only import random_weight

    c = TINY_QUANT_CONFIG
    h, inter, d = c["hidden_size"], c["intermediate_size"], c["head_dim"]
    q, kv = c["num_attention_heads"] * d, c["num_key_value_heads"] * d
    shapes = {"attn_q": (q, h), "attn_k": (kv, h), "attn_v": (kv, h), "attn_output": (h, q),
              "ffn_gate": (inter, h), "ffn_up": (inter, h), "ffn_down": (h, inter)}
    g = torch.Generator().manual_seed(seed)
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(c["num_hidden_layers"])
    w.add_context_length(c["max_position_embeddings"])
    w.add_embedding_length(h)
    w.add_feed_forward_length(inter)
    w.add_head_count(c["num_attention_heads"])
    w.add_head_count_kv(c["num_key_value_heads"])
    w.add_key_length(d)
    w.add_value_length(d)
    w.add_layer_norm_rms_eps(c["rms_norm_eps"])
    w.add_vocab_size(c["vocab_size"])

    def packed(name: str, fmt: str, n: int, k: int) -> None:
        qw = random_weight(fmt, n, k, g)
        w.add_tensor(name, qw.data.numpy(), raw_dtype=gguf.GGMLQuantizationType(
            WEIGHT_FORMATS[fmt].ggml_type))

    w.add_tensor("token_embd.weight", (torch.randn(c["vocab_size"], h, generator=g) * 0.5).numpy())
    w.add_tensor("output_norm.weight", (1 + 0.1 * torch.randn(h, generator=g)).numpy())
    packed("output.weight", OUTPUT_FORMAT, c["vocab_size"], h)
    for i, fmts in enumerate(LAYER_FORMATS):
        for t, fmt in fmts.items():
            packed(f"blk.{i}.{t}.weight", fmt, *shapes[t])
        for t in ("attn_norm", "ffn_norm"):
            w.add_tensor(f"blk.{i}.{t}.weight", (1 + 0.1 * torch.randn(h, generator=g)).numpy().astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return str(path)


def _greedy(model: Any, prompt: List[int], n: int) -> List[int]:
    from ..models.runner import Engine
    from ..models.sampling import SamplingParams

    return Engine(model, num_blocks=8).generate([prompt], SamplingParams(max_new_tokens=n))[0]


def _compare(model: Any, ref: Any, prompt: List[int], n: int) -> QuantModelCheck:
    from ..models.quant import describe_quantization
    from ..models.runner import teacher_forced_logits

    toks = _greedy(model, prompt, n)
    ref_toks = _greedy(ref, prompt, n)
    la = teacher_forced_logits(model, prompt + ref_toks).double()
    lb = teacher_forced_logits(ref, prompt + ref_toks).double()
    return QuantModelCheck(toks, ref_toks, float((la - lb).abs().max()), float(lb.abs().max()),
                           describe_quantization(model))


def _prompt(vocab: int, n: int = 12, seed: int = 3) -> List[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (n,), generator=g).tolist()


def check_packed_gguf(backend: Any, path: str, dtype: torch.dtype = torch.float32, new_tokens: int = 12,
                      reference_backend: Optional[Any] = None) -> QuantModelCheck:
    """The GGUF at ``path`` run packed on ``backend`` vs its dequantized float32 build on ``reference_backend``
    (the cpu backend by default)."""
    from ..models.gguf import build_gguf_model

    if reference_backend is None:
        from ..plugins import discover

        reference_backend = discover().get("cpu")
    model, ck = build_gguf_model(path, backend, dtype, dequantize=False)
    ref, _ = build_gguf_model(path, reference_backend, torch.float32)
    return _compare(model, ref, _prompt(ck.config["vocab_size"]), new_tokens)


def check_rtn(backend: Any, config: Dict[str, Any], scheme: str, dtype: torch.dtype = torch.float32,
              new_tokens: int = 12, seed: int = 0, reference_backend: Optional[Any] = None) -> QuantModelCheck:
    """A tiny float model (``config``, realistic seeded init) quantized on the fly with ``scheme`` on
    ``backend`` vs the float32 model holding the dequantized round-to-nearest weights."""
    from ..models.base import build_model
    from ..models.quant import QuantizedLinear, linear_layers, quantize_model
    from .models import make_reference

    if reference_backend is None:
        from ..plugins import discover

        reference_backend = discover().get("cpu")
    hf = make_reference(config, seed)
    model = build_model(hf, backend, dtype)
    ref = build_model(hf, reference_backend, torch.float32)
    quantize_model(model, scheme)
    packed = {lay.key: lay for _, _, lay in linear_layers(model) if isinstance(lay, QuantizedLinear)}
    for _, _, lay in linear_layers(ref):
        if lay.key in packed:
            fmt = packed[lay.key]
            spec = fmt.op.spec
            qw = quantize_rtn(lay.weight, spec.format, spec.group_size, spec.has_zeros, spec.scale_dtype)
            lay.weight = dequantize(qw).float().contiguous()
    return _compare(model, ref, _prompt(config["vocab_size"]), new_tokens)
