"""Mixtral: the Mistral body with a sparse MoE MLP (softmax router, top-k renormalised, no shared expert).

Checkpoints on disk name experts one by one (``block_sparse_moe.experts.{e}.w1/w2/w3``: gate/down/up);
transformers 5 model objects hold them fused (``mlp.experts.gate_up_proj [E, 2I, H]``, ``down_proj [E, H, I]``).
Both load.
"""
from __future__ import annotations

from typing import Any, Dict, List

from .base import WeightRule, WeightSource, single, stack_experts
from .layers import MoE
from .llama import DecoderForCausalLM

__all__ = ["MixtralForCausalLM", "expert_rules"]


def expert_rules(t: str, h: int, inter: int, e: int, fused_prefix: str, legacy_prefix: str,
                 legacy_names=("gate_proj", "up_proj", "down_proj")) -> List[WeightRule]:
    """Rules for ``{t}.w13`` and ``{t}.w2`` from the fused or the per-expert spelling."""
    gate, up, down = legacy_names
    fused_13 = WeightSource((f"{fused_prefix}.gate_up_proj",), ((e, 2 * inter, h),), lambda ts: ts[0])
    fused_2 = WeightSource((f"{fused_prefix}.down_proj",), ((e, h, inter),), lambda ts: ts[0])
    legacy_13 = stack_experts([[f"{legacy_prefix}.{j}.{gate}.weight", f"{legacy_prefix}.{j}.{up}.weight"]
                               for j in range(e)], [(inter, h), (inter, h)])
    legacy_2 = stack_experts([[f"{legacy_prefix}.{j}.{down}.weight"] for j in range(e)], [(h, inter)])
    return [WeightRule(t + ".w13", (legacy_13, fused_13)), WeightRule(t + ".w2", (legacy_2, fused_2))]


class MixtralForCausalLM(DecoderForCausalLM):
    architectures = ("MixtralForCausalLM",)
    model_types = ("mixtral",)
    windows_on_all_layers = True

    @classmethod
    def family_fields(cls, d: Dict[str, Any], kw: Dict[str, Any]) -> Dict[str, Any]:
        return {"num_experts": int(d["num_local_experts"]), "num_experts_per_tok": int(d["num_experts_per_tok"]),
                "moe_intermediate_size": kw["intermediate_size"], "norm_topk_prob": True,
                "moe_layers": (True,) * kw["num_layers"]}

    def make_mlp(self, i: int):
        c = self.config
        return MoE(f"layers.{i}.mlp", c.hidden_size, c.moe_intermediate_size, c.num_experts, c.num_experts_per_tok,
                   c.norm_topk_prob, c.hidden_act, self.backend, self.dtype, self.strict)

    def mlp_rules(self, i: int) -> List[WeightRule]:
        c = self.config
        t = f"layers.{i}.mlp"
        h, e = c.hidden_size, c.num_experts
        router = WeightRule(t + ".router.weight", (
            WeightSource((f"layers.{i}.block_sparse_moe.gate.weight",), ((e, h),), lambda ts: ts[0]),
            WeightSource((f"layers.{i}.mlp.gate.weight",), ((e, h),), lambda ts: ts[0])))
        return [router] + expert_rules(t, h, c.moe_intermediate_size, e, f"layers.{i}.mlp.experts",
                                       f"layers.{i}.block_sparse_moe.experts", ("w1", "w3", "w2"))
