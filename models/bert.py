"""BERT: a bidirectional post-norm encoder with token types; :meth:`BertModel.encode` returns hidden states.

Attention is the same paged op with ``causal=False``: each call writes K/V into caches (temporary ones when the
caller passes none) and every query sees every key of its own sequence. Shape legend: T tokens, H hidden.
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch

from ..core.attention import AttentionMetadata, AttentionSpec
from ..core.backend import Backend
from .base import Model, WeightRule, allocate_kv_caches, concat, single
from .config import ModelConfig, parse_common
from .layers import AttentionLayer, LayerNormLayer, Linear, PlainMLP

__all__ = ["BertModel"]


class _Layer:
    def __init__(self, i: int, m: "BertModel") -> None:
        c, be, dt, st = m.config, m.backend, m.dtype, m.strict
        p = f"layer.{i}"
        self.qkv = Linear(p + ".qkv", c.hidden_size, 3 * c.hidden_size, True, be, dt, st)
        self.o = Linear(p + ".o", c.hidden_size, c.hidden_size, True, be, dt, st)
        self.attn = AttentionLayer(m.kv_cache_specs()[i], be, st)
        self.ln_attn = LayerNormLayer(p + ".ln_attn", c.hidden_size, c.norm_eps, be, dt, st)
        self.mlp = PlainMLP(p + ".mlp", c.hidden_size, c.intermediate_size, c.hidden_act, be, dt, st)
        self.ln_out = LayerNormLayer(p + ".ln_out", c.hidden_size, c.norm_eps, be, dt, st)

    def bind(self, w: Dict[str, torch.Tensor]) -> None:
        for x in (self.qkv, self.o, self.ln_attn, self.mlp, self.ln_out):
            x.bind(w)


class BertModel(Model):
    architectures = ("BertModel", "BertForMaskedLM")
    model_types = ("bert",)
    is_causal = False
    strip_prefixes = ("bert.",)
    ignore_patterns = (r"pooler\..*", r"cls\..*", r"embeddings\.position_ids")

    def __init__(self, config: ModelConfig, backend: Backend, dtype: torch.dtype, strict: bool = False,
                 block_size: Optional[int] = None) -> None:
        super().__init__(config, backend, dtype, strict, block_size)
        c = config
        if c.raw.get("position_embedding_type", "absolute") != "absolute":
            from .config import ConfigError
            raise ConfigError(f"BertModel: position_embedding_type {c.raw.get('position_embedding_type')!r} is not "
                              f"supported (supported: 'absolute')")
        self._specs = [AttentionSpec(num_heads=c.num_heads, num_kv_heads=c.num_heads, head_size=c.head_size,
                                     dtype=dtype, block_size=self.block_size, kv_layout=self.kv_layout, causal=False)
                       for _ in range(c.num_layers)]
        self.layers = [_Layer(i, self) for i in range(c.num_layers)]
        self.ln_embed = LayerNormLayer("ln_embed", c.hidden_size, c.norm_eps, backend, dtype, strict)

    @classmethod
    def parse_config(cls, d: Dict[str, Any], architecture: str) -> ModelConfig:
        kw = parse_common(d, architecture)
        kw["norm_eps"] = float(d.get("layer_norm_eps", 1e-12))
        kw["hidden_act"] = kw["hidden_act"] if d.get("hidden_act") else "gelu"
        kw["type_vocab_size"] = int(d.get("type_vocab_size", 2))
        return ModelConfig(**kw)

    def kv_cache_specs(self) -> List[AttentionSpec]:
        return list(self._specs)

    def weight_rules(self) -> List[WeightRule]:
        c = self.config
        h, inter = c.hidden_size, c.intermediate_size
        e = "embeddings"
        rules = [single("word", f"{e}.word_embeddings.weight", (c.vocab_size, h)),
                 single("pos", f"{e}.position_embeddings.weight", (c.max_position, h)),
                 single("type", f"{e}.token_type_embeddings.weight", (c.type_vocab_size, h)),
                 single("ln_embed.weight", f"{e}.LayerNorm.weight", (h,)),
                 single("ln_embed.bias", f"{e}.LayerNorm.bias", (h,))]
        for i in range(c.num_layers):
            p, t = f"encoder.layer.{i}", f"layer.{i}"
            a = p + ".attention.self"
            for kind in ("weight", "bias"):
                shape = (h, h) if kind == "weight" else (h,)
                rules.append(WeightRule(f"{t}.qkv.{kind}", (concat(
                    [f"{a}.query.{kind}", f"{a}.key.{kind}", f"{a}.value.{kind}"], [shape] * 3),)))
                rules += [single(f"{t}.o.{kind}", f"{p}.attention.output.dense.{kind}", shape),
                          single(f"{t}.ln_attn.{kind}", f"{p}.attention.output.LayerNorm.{kind}", (h,)),
                          single(f"{t}.mlp.fc.{kind}", f"{p}.intermediate.dense.{kind}",
                                 (inter, h) if kind == "weight" else (inter,)),
                          single(f"{t}.mlp.proj.{kind}", f"{p}.output.dense.{kind}",
                                 (h, inter) if kind == "weight" else (h,)),
                          single(f"{t}.ln_out.{kind}", f"{p}.output.LayerNorm.{kind}", (h,))]
        return rules

    def bind(self, w: Dict[str, torch.Tensor]) -> None:
        self.word, self.pos, self.type = w["word"], w["pos"], w["type"]
        self.ln_embed.bind(w)
        for layer in self.layers:
            layer.bind(w)

    def encode(self, input_ids: torch.Tensor, token_type_ids: Optional[torch.Tensor], positions: torch.Tensor,
               meta: AttentionMetadata, kv_caches: Optional[Sequence[Tuple[torch.Tensor, torch.Tensor]]] = None
               ) -> torch.Tensor:
        """Last hidden states [T, H] of the packed sequences described by ``meta`` (bidirectional attention)."""
        self._check_loaded()
        c = self.config
        t, hq, d = input_ids.shape[0], c.num_heads, c.head_size
        if kv_caches is None:
            kv_caches = allocate_kv_caches(self._specs, meta.max_block_index + 1, self.device)
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        h_TH = (self.word.index_select(0, input_ids) + self.type.index_select(0, token_type_ids)
                + self.pos.index_select(0, positions))
        h_TH = self.ln_embed(h_TH)
        for i, layer in enumerate(self.layers):
            q, k, v = layer.qkv(h_TH).split(hq * d, dim=-1)
            o_THD = layer.attn(q.reshape(t, hq, d).contiguous(), k.reshape(t, hq, d).contiguous(),
                               v.reshape(t, hq, d).contiguous(), kv_caches[i], meta)
            h_TH = layer.ln_attn(h_TH + layer.o(o_THD.reshape(t, hq * d)))
            h_TH = layer.ln_out(h_TH + layer.mlp(h_TH))
        return h_TH

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                kv_caches: Sequence[Tuple[torch.Tensor, torch.Tensor]], meta: AttentionMetadata) -> torch.Tensor:
        """The decoder-shaped entry: :meth:`encode` with token type 0."""
        return self.encode(input_ids, None, positions, meta, kv_caches)
