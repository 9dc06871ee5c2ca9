"""The Llama family and the shared pre-norm decoder every RMSNorm decoder family builds on.

Serves Llama 2/3 (rope scaling variants), Mistral (sliding window on every layer), Qwen2 (q/k/v bias, windows
per ``layer_types``) and Qwen3 (per-head q/k RMSNorm). Gemma, Phi-3, Mixtral and the Qwen MoE families subclass
:class:`DecoderForCausalLM`, overriding config parsing, weight names and the MLP.

Shape legend: T tokens, H hidden, Hq/Hkv heads, D head size, V vocabulary.
"""
from __future__ import annotations

import math
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch

from ..core.attention import AttentionMetadata, AttentionSpec
from ..core.backend import Backend
from .base import Model, WeightRule, WeightSource, concat, single
from .config import ConfigError, ModelConfig, layer_windows, parse_common
from .layers import AttentionLayer, GatedMLP, Linear, RMSNormLayer, RotaryEmbedding, embed_scale, soft_cap

__all__ = ["DecoderForCausalLM", "LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM",
           "SelfAttention", "DecoderLayer"]

KVCache = Tuple[torch.Tensor, torch.Tensor]


class SelfAttention:
    """qkv GEMM -> (q/k norm) -> rotary -> KV write + paged attention -> output GEMM."""

    def __init__(self, key: str, c: ModelConfig, spec: AttentionSpec, rotary: RotaryEmbedding, backend: Backend,
                 dtype: torch.dtype, strict: bool) -> None:
        self.hq, self.hkv, self.d = c.num_heads, c.num_kv_heads, c.head_size
        self.sizes = [self.hq * self.d, self.hkv * self.d, self.hkv * self.d]
        self.qkv = Linear(key + ".qkv", c.hidden_size, sum(self.sizes), c.attention_bias, backend, dtype, strict)
        self.o = Linear(key + ".o", self.hq * self.d, c.hidden_size, c.o_bias, backend, dtype, strict)
        self.q_norm = RMSNormLayer(key + ".q_norm", self.d, c.norm_eps, backend, dtype, strict) if c.qk_norm else None
        self.k_norm = RMSNormLayer(key + ".k_norm", self.d, c.norm_eps, backend, dtype, strict) if c.qk_norm else None
        self.rotary = rotary
        self.attn = AttentionLayer(spec, backend, strict)

    def bind(self, w: Dict[str, torch.Tensor]) -> None:
        for layer in (self.qkv, self.o, self.q_norm, self.k_norm):
            if layer is not None:
                layer.bind(w)

    def __call__(self, x_TH: torch.Tensor, positions_T: torch.Tensor, kv_cache: KVCache,
                 meta: AttentionMetadata) -> torch.Tensor:
        t = x_TH.shape[0]
        q, k, v = self.qkv(x_TH).split(self.sizes, dim=-1)
        q_THD = q.reshape(t, self.hq, self.d)
        k_THD = k.reshape(t, self.hkv, self.d)
        v_THD = v.reshape(t, self.hkv, self.d).contiguous()
        if self.q_norm is not None:
            q_THD = self.q_norm(q_THD)
            k_THD = self.k_norm(k_THD)
        q_THD, k_THD = self.rotary(positions_T, q_THD, k_THD)
        o_THD = self.attn(q_THD, k_THD, v_THD, kv_cache, meta)
        return self.o(o_THD.reshape(t, self.hq * self.d))


class DecoderLayer:
    def __init__(self, i: int, model: "DecoderForCausalLM") -> None:
        c, be, dt, st = model.config, model.backend, model.dtype, model.strict
        p = f"layers.{i}"
        self.attn_norm = RMSNormLayer(p + ".attn_norm", c.hidden_size, c.norm_eps, be, dt, st)
        self.attn = SelfAttention(p + ".attn", c, model.kv_cache_specs()[i], model.rotary, be, dt, st)
        self.mlp_norm = RMSNormLayer(p + ".mlp_norm", c.hidden_size, c.norm_eps, be, dt, st)
        self.post_attn_norm = RMSNormLayer(p + ".post_attn_norm", c.hidden_size, c.norm_eps, be, dt, st) \
            if c.sandwich_norms else None
        self.post_mlp_norm = RMSNormLayer(p + ".post_mlp_norm", c.hidden_size, c.norm_eps, be, dt, st) \
            if c.sandwich_norms else None
        self.mlp = model.make_mlp(i)

    def bind(self, w: Dict[str, torch.Tensor]) -> None:
        for layer in (self.attn_norm, self.attn, self.mlp_norm, self.post_attn_norm, self.post_mlp_norm, self.mlp):
            if layer is not None:
                layer.bind(w)


class DecoderForCausalLM(Model):
    """A pre-norm RMSNorm decoder with rotary attention: the body shared by every decoder family but GPT-2."""

    strip_prefixes = ("model.",)
    #: checkpoint names of the attention projections (after prefix stripping), per layer prefix.
    fused_qkv: bool = False
    fused_gate_up: bool = False
    windows_on_all_layers: bool = False
    tie_default: bool = False

    def __init__(self, config: ModelConfig, backend: Backend, dtype: torch.dtype, strict: bool = False,
                 block_size: Optional[int] = None) -> None:
        super().__init__(config, backend, dtype, strict, block_size)
        c = config
        self._specs = [self._attention_spec(i) for i in range(c.num_layers)]
        self.rotary = RotaryEmbedding(c.head_size, c.rotary_dim, c.num_heads, c.num_kv_heads, c.max_position,
                                      c.rope_theta, c.rope_scaling, backend, dtype, strict)
        self.layers = [DecoderLayer(i, self) for i in range(c.num_layers)]
        self.final_norm = RMSNormLayer("final_norm", c.hidden_size, c.norm_eps, backend, dtype, strict)
        # In the model dtype, then upcast (as transformers does): a float32-output GEMM from half inputs has no
        # fast CPU path, and the logits' rounding is far inside the model tolerance.
        self.lm_head = Linear("lm_head", c.hidden_size, c.vocab_size, False, backend, dtype, strict)
        self.embed_multiplier = embed_scale(c.hidden_size, dtype).to(self.device) if c.embed_scale else None
        self.embed: Optional[torch.Tensor] = None  # [V, H]

    # -- config -------------------------------------------------------------------------------------------------
    @classmethod
    def parse_config(cls, d: Dict[str, Any], architecture: str) -> ModelConfig:
        kw = parse_common(d, architecture, cls.tie_default)
        kw["sliding_windows"] = layer_windows(d, kw["num_layers"], cls.windows_on_all_layers)
        kw.update(cls.family_fields(d, kw))
        return ModelConfig(**kw)

    @classmethod
    def family_fields(cls, d: Dict[str, Any], kw: Dict[str, Any]) -> Dict[str, Any]:
        """Fields particular to a family (overridden)."""
        return {}

    def _attention_spec(self, i: int) -> AttentionSpec:
        c = self.config
        return AttentionSpec(num_heads=c.num_heads, num_kv_heads=c.num_kv_heads, head_size=c.head_size,
                             dtype=self.dtype, block_size=self.block_size, kv_layout=self.kv_layout, causal=True,
                             sliding_window=c.sliding_windows[i], soft_cap=c.attn_soft_cap, scale=c.attn_scale)

    def kv_cache_specs(self) -> List[AttentionSpec]:
        return list(self._specs)

    def make_mlp(self, i: int):
        c = self.config
        return GatedMLP(f"layers.{i}.mlp", c.hidden_size, c.intermediate_size, c.hidden_act, c.mlp_bias,
                        self.backend, self.dtype, self.strict)

    # -- weights ------------------------------------------------------------------------------------------------
    def _norm_rule(self, target: str, name: str, size: int) -> WeightRule:
        offset = (lambda w: w + 1.0) if self.config.norm_offset else None
        return single(target + ".weight", name, (size,), offset)

    def attention_rules(self, i: int) -> List[WeightRule]:
        c = self.config
        p, t = f"layers.{i}.self_attn", f"layers.{i}.attn"
        hq, hkv, d, h = c.num_heads, c.num_kv_heads, c.head_size, c.hidden_size
        rules = []
        if self.fused_qkv:
            rules.append(single(t + ".qkv.weight", p + ".qkv_proj.weight", ((hq + 2 * hkv) * d, h)))
        else:
            names = [f"{p}.{x}_proj.weight" for x in "qkv"]
            rules.append(WeightRule(t + ".qkv.weight", (concat(names, [(hq * d, h), (hkv * d, h), (hkv * d, h)]),)))
        if c.attention_bias:
            names = [f"{p}.{x}_proj.bias" for x in "qkv"]
            rules.append(WeightRule(t + ".qkv.bias", (concat(names, [(hq * d,), (hkv * d,), (hkv * d,)]),)))
        rules.append(single(t + ".o.weight", p + ".o_proj.weight", (h, hq * d)))
        if c.o_bias:
            rules.append(single(t + ".o.bias", p + ".o_proj.bias", (h,)))
        if c.qk_norm:
            rules.append(self._norm_rule(t + ".q_norm", p + ".q_norm.weight", d))
            rules.append(self._norm_rule(t + ".k_norm", p + ".k_norm.weight", d))
        return rules

    def mlp_rules(self, i: int) -> List[WeightRule]:
        c = self.config
        p, t = f"layers.{i}.mlp", f"layers.{i}.mlp"
        h, inter = c.hidden_size, c.intermediate_size
        rules = []
        if self.fused_gate_up:
            rules.append(single(t + ".gate_up.weight", p + ".gate_up_proj.weight", (2 * inter, h)))
        else:
            rules.append(WeightRule(t + ".gate_up.weight", (concat([p + ".gate_proj.weight", p + ".up_proj.weight"],
                                                                   [(inter, h), (inter, h)]),)))
        rules.append(single(t + ".down.weight", p + ".down_proj.weight", (h, inter)))
        if c.mlp_bias:
            rules.append(WeightRule(t + ".gate_up.bias", (concat([p + ".gate_proj.bias", p + ".up_proj.bias"],
                                                                 [(inter,), (inter,)]),)))
            rules.append(single(t + ".down.bias", p + ".down_proj.bias", (h,)))
        return rules

    def norm_names(self, i: int) -> List[Tuple[str, str]]:
        """(internal, checkpoint) names of a layer's norms."""
        p = f"layers.{i}"
        if self.config.sandwich_norms:
            return [("attn_norm", "input_layernorm"), ("post_attn_norm", "post_attention_layernorm"),
                    ("mlp_norm", "pre_feedforward_layernorm"), ("post_mlp_norm", "post_feedforward_layernorm")]
        return [("attn_norm", "input_layernorm"), ("mlp_norm", "post_attention_layernorm")]

    def weight_rules(self) -> List[WeightRule]:
        c = self.config
        rules = [single("embed", "embed_tokens.weight", (c.vocab_size, c.hidden_size))]
        for i in range(c.num_layers):
            for ours, theirs in self.norm_names(i):
                rules.append(self._norm_rule(f"layers.{i}.{ours}", f"layers.{i}.{theirs}.weight", c.hidden_size))
            rules += self.attention_rules(i)
            rules += self.mlp_rules(i)
        rules.append(self._norm_rule("final_norm", "norm.weight", c.hidden_size))
        if not c.tie_word_embeddings:
            rules.append(single("lm_head.weight", "lm_head.weight", (c.vocab_size, c.hidden_size)))
        return rules

    @property
    def ignore_patterns(self) -> Tuple[str, ...]:  # type: ignore[override]
        pats = (r".*rotary_emb\.inv_freq$",)
        return pats + ((r"lm_head\.weight",) if self.config.tie_word_embeddings else ())

    def bind(self, w: Dict[str, torch.Tensor]) -> None:
        self.embed = w["embed"]
        for layer in self.layers:
            layer.bind(w)
        self.final_norm.bind(w)
        if self.config.tie_word_embeddings:
            self.lm_head.bind({"lm_head.weight": w["embed"]})
        else:
            self.lm_head.bind(w)

    # -- forward ------------------------------------------------------------------------------------------------
    def embed_tokens(self, input_ids_T: torch.Tensor) -> torch.Tensor:
        h_TH = self.embed.index_select(0, input_ids_T)
        if self.embed_multiplier is not None:
            h_TH = h_TH * self.embed_multiplier
        return h_TH

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, kv_caches: Sequence[KVCache],
                meta: AttentionMetadata) -> torch.Tensor:
        """Hidden states after the final norm, [T, H]; K/V of the new tokens are written into ``kv_caches``."""
        self._check_loaded()
        if len(kv_caches) != len(self.layers):
            raise ValueError(f"{self.config.architecture}: {len(kv_caches)} kv caches for {len(self.layers)} layers")
        h_TH = self.embed_tokens(input_ids)
        residual_TH = None
        for i, layer in enumerate(self.layers):
            if residual_TH is None:
                residual_TH = h_TH
                x_TH = layer.attn_norm(h_TH)
            else:
                x_TH, residual_TH = layer.attn_norm(h_TH, residual_TH)
            a_TH = layer.attn(x_TH, positions, kv_caches[i], meta)
            if layer.post_attn_norm is not None:
                a_TH = layer.post_attn_norm(a_TH)
            x_TH, residual_TH = layer.mlp_norm(a_TH, residual_TH)
            h_TH = layer.mlp(x_TH)
            if layer.post_mlp_norm is not None:
                h_TH = layer.post_mlp_norm(h_TH)
        if residual_TH is None:
            return self.final_norm(h_TH)
        out_TH, _ = self.final_norm(h_TH, residual_TH)
        return out_TH

    def compute_logits(self, hidden_TH: torch.Tensor) -> torch.Tensor:
        """Logits [T, V] in float32 (a final soft-cap if the family has one)."""
        return soft_cap(self.lm_head(hidden_TH).float(), self.config.final_soft_cap)


class LlamaForCausalLM(DecoderForCausalLM):
    architectures = ("LlamaForCausalLM",)
    model_types = ("llama",)


class MistralForCausalLM(DecoderForCausalLM):
    architectures = ("MistralForCausalLM",)
    model_types = ("mistral",)
    windows_on_all_layers = True


def _qwen_windows(d: Dict[str, Any], kw: Dict[str, Any]) -> Dict[str, Any]:
    if d.get("layer_types"):
        return {}
    if not d.get("use_sliding_window") or not d.get("sliding_window"):
        return {"sliding_windows": (None,) * kw["num_layers"]}
    first = int(d.get("max_window_layers", kw["num_layers"]))
    return {"sliding_windows": tuple(int(d["sliding_window"]) if i >= first else None
                                     for i in range(kw["num_layers"]))}


class Qwen2ForCausalLM(DecoderForCausalLM):
    architectures = ("Qwen2ForCausalLM",)
    model_types = ("qwen2",)

    @classmethod
    def family_fields(cls, d: Dict[str, Any], kw: Dict[str, Any]) -> Dict[str, Any]:
        return {"attention_bias": True, "o_bias": False, **_qwen_windows(d, kw)}


class Qwen3ForCausalLM(DecoderForCausalLM):
    architectures = ("Qwen3ForCausalLM",)
    model_types = ("qwen3",)

    @classmethod
    def family_fields(cls, d: Dict[str, Any], kw: Dict[str, Any]) -> Dict[str, Any]:
        return {"qk_norm": True, **_qwen_windows(d, kw)}
