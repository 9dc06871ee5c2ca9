"""Qwen MoE families: Qwen2-MoE (q/k/v bias, a shared expert behind a sigmoid gate, top-k not renormalised by
default) and Qwen3-MoE (per-head q/k norms, no shared expert). ``decoder_sparse_step`` and ``mlp_only_layers``
choose which layers are sparse; the others use a dense gated MLP.
"""
from __future__ import annotations

from typing import Any, Dict, List

from .base import WeightRule, single
from .layers import GatedMLP, MoE
from .llama import DecoderForCausalLM, _qwen_windows
from .mixtral import expert_rules

__all__ = ["Qwen2MoeForCausalLM", "Qwen3MoeForCausalLM"]


def _num_experts(d: Dict[str, Any]) -> int:
    """The expert count under either spelling: ``num_experts`` (Qwen2-MoE, Qwen3-MoE config.json files and
    transformers < 5) or ``num_local_experts`` (what transformers 5 writes for Qwen3-MoE); 0 when neither."""
    for key in ("num_experts", "num_local_experts"):
        if d.get(key) is not None:
            return int(d[key])
    return 0


def _moe_layers(d: Dict[str, Any], n: int) -> tuple:
    step = int(d.get("decoder_sparse_step", 1) or 1)
    dense = set(d.get("mlp_only_layers") or ())
    e = _num_experts(d)
    return tuple(i not in dense and e > 0 and (i + 1) % step == 0 for i in range(n))


class Qwen2MoeForCausalLM(DecoderForCausalLM):
    architectures = ("Qwen2MoeForCausalLM",)
    model_types = ("qwen2_moe",)
    shared_expert = True

    @classmethod
    def family_fields(cls, d: Dict[str, Any], kw: Dict[str, Any]) -> Dict[str, Any]:
        e = _num_experts(d)
        if e <= 0:
            from .config import ConfigError
            raise ConfigError(f"config of {d.get('architectures', [cls.architectures[0]])[0]}: missing field "
                              f"'num_experts' / 'num_local_experts' (the number of experts, > 0)")
        out = {"num_experts": e, "num_experts_per_tok": int(d["num_experts_per_tok"]),
               "moe_intermediate_size": int(d["moe_intermediate_size"]),
               "norm_topk_prob": bool(d.get("norm_topk_prob", False)),
               "moe_layers": _moe_layers(d, kw["num_layers"]), **_qwen_windows(d, kw)}
        if cls.shared_expert:
            out.update(attention_bias=bool(d.get("qkv_bias", True)), o_bias=False,
                       shared_expert_intermediate_size=int(d.get("shared_expert_intermediate_size", 0) or 0))
        else:
            out.update(qk_norm=True)
        return out

    def make_mlp(self, i: int):
        c = self.config
        if not c.moe_layers[i]:
            return GatedMLP(f"layers.{i}.mlp", c.hidden_size, c.intermediate_size, c.hidden_act, False,
                            self.backend, self.dtype, self.strict)
        return MoE(f"layers.{i}.mlp", c.hidden_size, c.moe_intermediate_size, c.num_experts, c.num_experts_per_tok,
                   c.norm_topk_prob, c.hidden_act, self.backend, self.dtype, self.strict,
                   shared_inter=c.shared_expert_intermediate_size, shared_gate=True)

    def mlp_rules(self, i: int) -> List[WeightRule]:
        c = self.config
        if not c.moe_layers[i]:
            return super().mlp_rules(i)
        p = f"layers.{i}.mlp"
        h, e, si = c.hidden_size, c.num_experts, c.shared_expert_intermediate_size
        rules = [single(p + ".router.weight", p + ".gate.weight", (e, h))]
        rules += expert_rules(p, h, c.moe_intermediate_size, e, p + ".experts", p + ".experts")
        if si:
            from .base import concat
            rules.append(WeightRule(p + ".shared.gate_up.weight", (concat(
                [p + ".shared_expert.gate_proj.weight", p + ".shared_expert.up_proj.weight"], [(si, h), (si, h)]),)))
            rules.append(single(p + ".shared.down.weight", p + ".shared_expert.down_proj.weight", (h, si)))
            rules.append(single(p + ".shared_gate.weight", p + ".shared_expert_gate.weight", (1, h)))
        return rules


class Qwen3MoeForCausalLM(Qwen2MoeForCausalLM):
    architectures = ("Qwen3MoeForCausalLM",)
    model_types = ("qwen3_moe",)
    shared_expert = False
