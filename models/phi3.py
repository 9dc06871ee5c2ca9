"""Phi-3: the Llama body with fused ``qkv_proj`` and ``gate_up_proj`` checkpoint tensors, partial rotary and an
optional sliding window on every layer."""
from __future__ import annotations

from typing import Any, Dict

from .config import ConfigError
from .llama import DecoderForCausalLM

__all__ = ["Phi3ForCausalLM"]


class Phi3ForCausalLM(DecoderForCausalLM):
    architectures = ("Phi3ForCausalLM",)
    model_types = ("phi3",)
    fused_qkv = True
    fused_gate_up = True
    windows_on_all_layers = True

    @classmethod
    def family_fields(cls, d: Dict[str, Any], kw: Dict[str, Any]) -> Dict[str, Any]:
        scaling = kw.get("rope_scaling")
        if scaling and scaling.get("rope_type") in ("longrope", "su"):
            raise ConfigError("Phi3ForCausalLM: rope scaling 'longrope' is not supported yet "
                              "(supported: linear, dynamic, llama3, yarn)")
        return {}
