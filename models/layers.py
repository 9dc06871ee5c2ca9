"""Shared layers, written on core ops only. Every op is built ONCE, here, at model build time.

A layer owns its built ops and, after loading, plain weight tensors (``requires_grad`` False). Weights are
attached by :meth:`bind` from the model's dict of internal names (``layers.3.qkv.weight`` ...).

Shape legend: T tokens (packed over sequences), H hidden size, Hq / Hkv query / kv heads, D head size,
I intermediate size, E experts, k experts per token, V vocabulary.
"""
from __future__ import annotations

import math
from typing import Any, Dict, Mapping, Optional, Tuple

import torch
import torch.nn.functional as F

from ..core.attention import Attention, AttentionMetadata, AttentionSpec, ReshapeAndCache
from ..core.backend import Backend
from ..core.fused import (GatedActivationSpec, GeluAndMul, LayerNorm, LayerNormSpec, RMSNorm, RMSNormSpec,
                          RopeScaling, Rotary, RotarySpec, SiluAndMul, rope_cos_sin_cache)
from ..core.gemm import Gemm, GemmSpec, GroupedGemm, GroupedGemmSpec

__all__ = ["Linear", "RMSNormLayer", "LayerNormLayer", "RotaryEmbedding", "AttentionLayer", "GatedMLP", "PlainMLP",
           "MoE", "activation_fn", "soft_cap", "embed_scale"]

Weights = Mapping[str, torch.Tensor]


class Linear:
    """``y[..., N] = x[..., K] @ W[N, K].T (+ b)`` through the core Gemm op."""

    def __init__(self, key: str, in_features: int, out_features: int, bias: bool, backend: Backend,
                 dtype: torch.dtype, strict: bool = False, out_dtype: Optional[torch.dtype] = None) -> None:
        self.key = key
        self.in_features, self.out_features, self.has_bias = in_features, out_features, bias
        self.op = Gemm.build(GemmSpec(dtype=dtype, out_dtype=out_dtype, has_bias=bias, in_features=in_features,
                                      out_features=out_features), backend, strict=strict)
        self.weight: Optional[torch.Tensor] = None  # [N, K]
        self.bias: Optional[torch.Tensor] = None  # [N]

    def bind(self, w: Weights) -> None:
        self.weight = w[self.key + ".weight"]
        self.bias = w[self.key + ".bias"] if self.has_bias else None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x, self.weight, self.bias)


class RMSNormLayer:
    """RMSNorm with its plain and residual-fused forms (both built once)."""

    def __init__(self, key: str, hidden_size: int, eps: float, backend: Backend, dtype: torch.dtype,
                 strict: bool = False) -> None:
        self.key = key
        self.op = RMSNorm.build(RMSNormSpec(hidden_size, dtype, eps=eps), backend, strict=strict)
        self.fused = RMSNorm.build(RMSNormSpec(hidden_size, dtype, eps=eps, fused_residual=True), backend,
                                   strict=strict)
        self.weight: Optional[torch.Tensor] = None  # [H]

    def bind(self, w: Weights) -> None:
        self.weight = w[self.key + ".weight"]

    def __call__(self, x: torch.Tensor, residual: Optional[torch.Tensor] = None):
        """``norm(x)``; with ``residual``: ``(norm(x + residual), x + residual)``."""
        if residual is None:
            return self.op(x, self.weight)
        return self.fused(x, self.weight, residual)


class LayerNormLayer:
    def __init__(self, key: str, hidden_size: int, eps: float, backend: Backend, dtype: torch.dtype,
                 strict: bool = False, bias: bool = True) -> None:
        self.key = key
        self.has_bias = bias
        self.op = LayerNorm.build(LayerNormSpec(hidden_size, dtype, eps=eps, has_bias=bias), backend, strict=strict)
        self.weight: Optional[torch.Tensor] = None
        self.bias: Optional[torch.Tensor] = None

    def bind(self, w: Weights) -> None:
        self.weight = w[self.key + ".weight"]
        self.bias = w[self.key + ".bias"] if self.has_bias else None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x, self.weight, self.bias)


class RotaryEmbedding:
    """Rotary position embedding: the cos/sin cache is computed once (scaling variants change only the cache)."""

    def __init__(self, head_size: int, rotary_dim: int, num_heads: int, num_kv_heads: int, max_position: int,
                 base: float, scaling: Optional[Mapping[str, Any]], backend: Backend, dtype: torch.dtype,
                 strict: bool = False, style: str = "neox") -> None:
        self.op = Rotary.build(RotarySpec(head_size=head_size, rotary_dim=rotary_dim, num_heads=num_heads,
                                          num_kv_heads=num_kv_heads, dtype=dtype, style=style,
                                          max_position=max_position), backend, strict=strict)
        rs = RopeScaling.from_hf(dict(scaling), max_position) if scaling else None
        self.cos_sin_cache = rope_cos_sin_cache(rotary_dim, max_position, base, rs, device=backend.device)

    def __call__(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor) -> Tuple[torch.Tensor, ...]:
        return self.op(positions, q, k, self.cos_sin_cache)


class AttentionLayer:
    """Write this step's K/V into the paged cache (``meta.slot_mapping``), then attend over the cache."""

    def __init__(self, spec: AttentionSpec, backend: Backend, strict: bool = False) -> None:
        self.spec = spec
        self.write = ReshapeAndCache.build(spec, backend, strict=strict)
        self.attn = Attention.build(spec, backend, strict=strict)

    def __call__(self, q_THD: torch.Tensor, k_THD: torch.Tensor, v_THD: torch.Tensor,
                 kv_cache: Tuple[torch.Tensor, torch.Tensor], meta: AttentionMetadata) -> torch.Tensor:
        k_cache, v_cache = kv_cache
        self.write(k_THD, v_THD, k_cache, v_cache, meta)
        return self.attn(q_THD, k_cache, v_cache, meta)


def activation_fn(act: str, backend: Backend, dtype: torch.dtype, strict: bool = False):
    """The gated activation op for ``act`` (``silu``, ``gelu``, ``gelu_tanh``): ``f(x[..., :d]) * x[..., d:]``."""
    if act == "silu":
        return SiluAndMul.build(GatedActivationSpec(dtype), backend, strict=strict)
    if act in ("gelu", "gelu_tanh"):
        approx = "tanh" if act == "gelu_tanh" else "none"
        return GeluAndMul.build(GatedActivationSpec(dtype, approximate=approx), backend, strict=strict)
    raise ValueError(f"no gated form of activation {act!r}")


class GatedMLP:
    """``down(act(gate(x)) * up(x))`` with gate and up fused into one GEMM (``gate_up`` rows: gate, then up)."""

    def __init__(self, key: str, hidden: int, inter: int, act: str, bias: bool, backend: Backend,
                 dtype: torch.dtype, strict: bool = False) -> None:
        self.gate_up = Linear(key + ".gate_up", hidden, 2 * inter, bias, backend, dtype, strict)
        self.down = Linear(key + ".down", inter, hidden, bias, backend, dtype, strict)
        self.act = activation_fn(act, backend, dtype, strict)

    def bind(self, w: Weights) -> None:
        self.gate_up.bind(w)
        self.down.bind(w)

    def __call__(self, x_TH: torch.Tensor) -> torch.Tensor:
        return self.down(self.act(self.gate_up(x_TH)))


class PlainMLP:
    """``proj(act(fc(x)))`` (GPT-2, BERT). The core has no ungated activation op; torch's gelu runs here."""

    def __init__(self, key: str, hidden: int, inter: int, act: str, backend: Backend, dtype: torch.dtype,
                 strict: bool = False) -> None:
        self.fc = Linear(key + ".fc", hidden, inter, True, backend, dtype, strict)
        self.proj = Linear(key + ".proj", inter, hidden, True, backend, dtype, strict)
        self.approximate = "tanh" if act == "gelu_tanh" else "none"
        if act not in ("gelu", "gelu_tanh", "relu"):
            raise ValueError(f"activation {act!r} is not supported in an ungated MLP")
        self.relu = act == "relu"

    def bind(self, w: Weights) -> None:
        self.fc.bind(w)
        self.proj.bind(w)

    def __call__(self, x_TH: torch.Tensor) -> torch.Tensor:
        h_TI = self.fc(x_TH)
        h_TI = F.relu(h_TI) if self.relu else F.gelu(h_TI, approximate=self.approximate)
        return self.proj(h_TI)


class MoE:
    """Mixture of experts: softmax router, top-k, experts through grouped GEMMs, optional gated shared expert.

    Internal weights: ``{key}.router.weight [E, H]``, ``{key}.w13 [E, 2I, H]`` (gate rows, then up rows),
    ``{key}.w2 [E, H, I]``, and for a shared expert ``{key}.shared.*`` plus ``{key}.shared_gate.weight [1, H]``.
    """

    def __init__(self, key: str, hidden: int, inter: int, num_experts: int, top_k: int, norm_topk_prob: bool,
                 act: str, backend: Backend, dtype: torch.dtype, strict: bool = False, shared_inter: int = 0,
                 shared_gate: bool = False) -> None:
        self.key = key
        self.num_experts, self.top_k, self.norm_topk_prob = num_experts, top_k, norm_topk_prob
        self.dtype = dtype
        self.router = Linear(key + ".router", hidden, num_experts, False, backend, dtype, strict)
        self.up = GroupedGemm.build(GroupedGemmSpec(dtype=dtype, num_experts=num_experts, mode="segments",
                                                    in_features=hidden, out_features=2 * inter), backend,
                                    strict=strict)
        self.down = GroupedGemm.build(GroupedGemmSpec(dtype=dtype, num_experts=num_experts, mode="segments",
                                                      in_features=inter, out_features=hidden), backend,
                                      strict=strict)
        self.act = activation_fn(act, backend, dtype, strict)
        self.shared = (GatedMLP(key + ".shared", hidden, shared_inter, act, False, backend, dtype, strict)
                       if shared_inter else None)
        self.shared_gate = Linear(key + ".shared_gate", hidden, 1, False, backend, dtype, strict) \
            if shared_inter and shared_gate else None
        self.w13: Optional[torch.Tensor] = None  # [E, 2I, H]
        self.w2: Optional[torch.Tensor] = None  # [E, H, I]

    def bind(self, w: Weights) -> None:
        self.router.bind(w)
        self.w13 = w[self.key + ".w13"]
        self.w2 = w[self.key + ".w2"]
        if self.shared is not None:
            self.shared.bind(w)
        if self.shared_gate is not None:
            self.shared_gate.bind(w)

    def route(self, x_TH: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """``(weights[T, k] float32, expert ids[T, k])``: softmax in float32, then top-k (renormalised or not)."""
        probs_TE = torch.softmax(self.router(x_TH).float(), dim=-1)
        top_w_Tk, top_i_Tk = torch.topk(probs_TE, self.top_k, dim=-1)
        if self.norm_topk_prob:
            top_w_Tk = top_w_Tk / top_w_Tk.sum(dim=-1, keepdim=True)
        return top_w_Tk, top_i_Tk

    def __call__(self, x_TH: torch.Tensor) -> torch.Tensor:
        t, k = x_TH.shape[0], self.top_k
        top_w_Tk, top_i_Tk = self.route(x_TH)
        ids_R = top_i_Tk.reshape(-1)  # R = T * k routed rows
        order_R = torch.argsort(ids_R, stable=True)
        sizes_E = torch.bincount(ids_R, minlength=self.num_experts)
        token_R = order_R // k
        xs_RH = x_TH.index_select(0, token_R)
        h_RI = self.act(self.up(xs_RH, self.w13, sizes_E))
        y_RH = self.down(h_RI, self.w2, sizes_E)
        y_RH = (y_RH.float() * top_w_Tk.reshape(-1)[order_R, None]).to(x_TH.dtype)
        out_TH = torch.zeros_like(x_TH).index_add_(0, token_R, y_RH)
        if self.shared is not None:
            s_TH = self.shared(x_TH)
            if self.shared_gate is not None:
                s_TH = torch.sigmoid(self.shared_gate(x_TH)) * s_TH
            out_TH = out_TH + s_TH
        return out_TH


def soft_cap(x: torch.Tensor, cap: Optional[float]) -> torch.Tensor:
    return x if not cap else torch.tanh(x / cap) * cap


def embed_scale(hidden: int, dtype: torch.dtype) -> torch.Tensor:
    """Gemma's ``sqrt(H)`` embedding normaliser, rounded to the model dtype as transformers does."""
    return torch.tensor(math.sqrt(hidden), dtype=dtype)
