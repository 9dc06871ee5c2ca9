"""GPT-2: learned absolute positions, pre-norm LayerNorm, ungated tanh-GELU MLP, tied LM head.

Checkpoint weights are ``Conv1D`` ([in, out], the transpose of a linear's [out, in]); they are transposed once at
load time. Shape legend: T tokens, H hidden, Hq heads, D head size.
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch

from ..core.attention import AttentionMetadata, AttentionSpec
from ..core.backend import Backend
from .base import Model, WeightRule, single
from .config import ModelConfig, parse_common
from .layers import AttentionLayer, LayerNormLayer, Linear, PlainMLP

__all__ = ["GPT2LMHeadModel"]


def _t(w: torch.Tensor) -> torch.Tensor:
    return w.t()


class _Block:
    def __init__(self, i: int, m: "GPT2LMHeadModel") -> None:
        c, be, dt, st = m.config, m.backend, m.dtype, m.strict
        p = f"h.{i}"
        self.ln_1 = LayerNormLayer(p + ".ln_1", c.hidden_size, c.norm_eps, be, dt, st)
        self.qkv = Linear(p + ".qkv", c.hidden_size, 3 * c.hidden_size, True, be, dt, st)
        self.o = Linear(p + ".o", c.hidden_size, c.hidden_size, True, be, dt, st)
        self.attn = AttentionLayer(m.kv_cache_specs()[i], be, st)
        self.ln_2 = LayerNormLayer(p + ".ln_2", c.hidden_size, c.norm_eps, be, dt, st)
        self.mlp = PlainMLP(p + ".mlp", c.hidden_size, c.intermediate_size, c.hidden_act, be, dt, st)

    def bind(self, w: Dict[str, torch.Tensor]) -> None:
        for x in (self.ln_1, self.qkv, self.o, self.ln_2, self.mlp):
            x.bind(w)


class GPT2LMHeadModel(Model):
    architectures = ("GPT2LMHeadModel",)
    model_types = ("gpt2",)
    strip_prefixes = ("transformer.",)
    ignore_patterns = (r"h\.\d+\.attn\.(masked_)?bias", r"lm_head\.weight")

    def __init__(self, config: ModelConfig, backend: Backend, dtype: torch.dtype, strict: bool = False,
                 block_size: Optional[int] = None) -> None:
        super().__init__(config, backend, dtype, strict, block_size)
        c = config
        inverse_layer = bool(c.raw.get("scale_attn_by_inverse_layer_idx", False))
        self._specs = [AttentionSpec(num_heads=c.num_heads, num_kv_heads=c.num_heads, head_size=c.head_size,
                                     dtype=dtype, block_size=self.block_size, kv_layout=self.kv_layout, causal=True,
                                     scale=(c.head_size ** -0.5) / (i + 1 if inverse_layer else 1))
                       for i in range(c.num_layers)]
        self.blocks = [_Block(i, self) for i in range(c.num_layers)]
        self.ln_f = LayerNormLayer("ln_f", c.hidden_size, c.norm_eps, backend, dtype, strict)
        # In the model dtype, then upcast (as transformers does): a float32-output GEMM from half inputs has no
        # fast CPU path, and the logits' rounding is far inside the model tolerance.
        self.lm_head = Linear("lm_head", c.hidden_size, c.vocab_size, False, backend, dtype, strict)

    @classmethod
    def parse_config(cls, d: Dict[str, Any], architecture: str) -> ModelConfig:
        kw = parse_common(d, architecture, tie_default=True)
        kw["hidden_act"] = kw["hidden_act"] if d.get("activation_function") else "gelu_tanh"
        kw["tie_word_embeddings"] = True
        if d.get("reorder_and_upcast_attn"):
            kw["raw"]["_note"] = "reorder_and_upcast_attn only changes precision inside attention"
        return ModelConfig(**kw)

    def kv_cache_specs(self) -> List[AttentionSpec]:
        return list(self._specs)

    def weight_rules(self) -> List[WeightRule]:
        c = self.config
        h, inter = c.hidden_size, c.intermediate_size
        rules = [single("wte", "wte.weight", (c.vocab_size, h)), single("wpe", "wpe.weight", (c.max_position, h))]
        for i in range(c.num_layers):
            p = f"h.{i}"
            for ln in ("ln_1", "ln_2"):
                rules += [single(f"{p}.{ln}.weight", f"{p}.{ln}.weight", (h,)),
                          single(f"{p}.{ln}.bias", f"{p}.{ln}.bias", (h,))]
            rules += [single(p + ".qkv.weight", p + ".attn.c_attn.weight", (h, 3 * h), _t),
                      single(p + ".qkv.bias", p + ".attn.c_attn.bias", (3 * h,)),
                      single(p + ".o.weight", p + ".attn.c_proj.weight", (h, h), _t),
                      single(p + ".o.bias", p + ".attn.c_proj.bias", (h,)),
                      single(p + ".mlp.fc.weight", p + ".mlp.c_fc.weight", (h, inter), _t),
                      single(p + ".mlp.fc.bias", p + ".mlp.c_fc.bias", (inter,)),
                      single(p + ".mlp.proj.weight", p + ".mlp.c_proj.weight", (inter, h), _t),
                      single(p + ".mlp.proj.bias", p + ".mlp.c_proj.bias", (h,))]
        rules += [single("ln_f.weight", "ln_f.weight", (h,)), single("ln_f.bias", "ln_f.bias", (h,))]
        return rules

    def bind(self, w: Dict[str, torch.Tensor]) -> None:
        self.wte, self.wpe = w["wte"], w["wpe"]
        for b in self.blocks:
            b.bind(w)
        self.ln_f.bind(w)
        self.lm_head.bind({"lm_head.weight": w["wte"]})

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                kv_caches: Sequence[Tuple[torch.Tensor, torch.Tensor]], meta: AttentionMetadata) -> torch.Tensor:
        self._check_loaded()
        c = self.config
        t, hq, d = input_ids.shape[0], c.num_heads, c.head_size
        h_TH = self.wte.index_select(0, input_ids) + self.wpe.index_select(0, positions)
        for i, b in enumerate(self.blocks):
            q, k, v = b.qkv(b.ln_1(h_TH)).split(hq * d, dim=-1)
            o_THD = b.attn(q.reshape(t, hq, d).contiguous(), k.reshape(t, hq, d).contiguous(),
                           v.reshape(t, hq, d).contiguous(), kv_caches[i], meta)
            h_TH = h_TH + b.o(o_THD.reshape(t, hq * d))
            h_TH = h_TH + b.mlp(b.ln_2(h_TH))
        return self.ln_f(h_TH)

    def compute_logits(self, hidden_TH: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden_TH).float()
