"""Gemma and Gemma 2: GeGLU (tanh gelu), RMSNorm applied as ``1 + w``, embeddings scaled by ``sqrt(H)``, tied
LM head; Gemma 2 adds norms after attention and after the MLP, attention and final logit soft-caps, alternating
sliding-window layers and ``query_pre_attn_scalar`` as the attention scale.
"""
from __future__ import annotations

from typing import Any, Dict

from .llama import DecoderForCausalLM

__all__ = ["GemmaForCausalLM", "Gemma2ForCausalLM"]


class GemmaForCausalLM(DecoderForCausalLM):
    architectures = ("GemmaForCausalLM",)
    model_types = ("gemma",)
    tie_default = True

    @classmethod
    def family_fields(cls, d: Dict[str, Any], kw: Dict[str, Any]) -> Dict[str, Any]:
        return {"embed_scale": True, "norm_offset": True}


class Gemma2ForCausalLM(DecoderForCausalLM):
    architectures = ("Gemma2ForCausalLM",)
    model_types = ("gemma2",)
    tie_default = True

    @classmethod
    def family_fields(cls, d: Dict[str, Any], kw: Dict[str, Any]) -> Dict[str, Any]:
        out: Dict[str, Any] = {"embed_scale": True, "norm_offset": True, "sandwich_norms": True,
                               "attn_soft_cap": d.get("attn_logit_softcapping") or None,
                               "final_soft_cap": d.get("final_logit_softcapping") or None}
        scalar = d.get("query_pre_attn_scalar")
        if scalar:
            out["attn_scale"] = float(scalar) ** -0.5
        if not d.get("layer_types") and d.get("sliding_window"):
            # Gemma 2 before ``layer_types``: even layers slide, odd layers attend globally.
            out["sliding_windows"] = tuple(int(d["sliding_window"]) if i % 2 == 0 else None
                                           for i in range(kw["num_layers"]))
        return out
