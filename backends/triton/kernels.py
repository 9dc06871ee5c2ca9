"""``make_kernels``: the shared Triton kernels as :class:`KernelImpl` objects for one backend and one tuning.

cuda, rocm and triton-interpreter all call :func:`make_kernels` with their own name, tuning and tier; the kernel
source is the same for all three. Capabilities are data, built from the tuning's :class:`Limits`, so a tier's
limits (smaller shapes for the interpreter) show up in ``anyaccel explain`` as reasons.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, List, Optional

import torch

from ...core.attention import ATTENTION_FEATURES, AttentionCapability
from ...core.dispatch import KernelImpl
from ...core.fused import GatedActivationCapability, NormCapability, RotaryCapability
from ...core.gemm import GemmCapability, GroupedGemmCapability
from ...core.weight_only import WeightOnlyGemmCapability
from .tuning import TritonTuning, batch_invariant_tuning

__all__ = ["make_kernels", "ShapeRangeGemmCapability", "FLOATS", "PRIORITY"]

FLOATS = frozenset({torch.float32, torch.float16, torch.bfloat16})

#: priority of the shared Triton kernels on their backends (a vendor's kernel provider can outrank it)
PRIORITY = 20


@dataclass(frozen=True)
class ShapeRangeGemmCapability(GemmCapability):
    """A GEMM capability with a declared range of K (in_features) and N (out_features).

    :param min_features: smallest K and N accepted (a spec must then state both).
    :param max_features: largest K and N accepted (an unstated K or N is accepted).
    """

    min_features: Optional[int] = None
    max_features: Optional[int] = None

    def not_supported_reasons(self, spec: Any) -> List[str]:
        reasons = super().not_supported_reasons(spec)
        for label, v in (("in_features (K)", spec.in_features), ("out_features (N)", spec.out_features)):
            if self.min_features is not None:
                if v is None:
                    reasons.append(f"{label} unknown at build time; this kernel is declared for "
                                   f">= {self.min_features} only")
                elif v < self.min_features:
                    reasons.append(f"{label} {v} < {self.min_features}, below this kernel's declared range")
            if self.max_features is not None and v is not None and v > self.max_features:
                reasons.append(f"{label} {v} > {self.max_features}, above this kernel's declared range")
        return reasons


#: how far below the tuned kernels their batch-invariant variants rank (deterministic mode rejects the others)
INVARIANT_PRIORITY_DROP = 10


def make_kernels(backend_name: str, tuning: TritonTuning, interpret: bool, *,
                 gemm_min_features: Optional[int] = None, priority: int = PRIORITY) -> List[KernelImpl]:
    """Every shared Triton kernel, registered for ``backend_name``, twice: tuned, and (``INVARIANT_PRIORITY_DROP``
    lower) built with :func:`batch_invariant_tuning`, declaring ``batch_invariant`` for deterministic mode.

    :param tuning: tile sizes and launch options of this backend.
    :param interpret: run through Triton's interpreter on CPU tensors (the ``triton-interpreter`` tier).
    :param gemm_min_features: declare the GEMM only for K, N >= this (the backend has a faster alternative below).
    """
    tuned = _make_kernels(backend_name, tuning, interpret, gemm_min_features=gemm_min_features, priority=priority)
    inv_t = batch_invariant_tuning(tuning)
    inv = _make_kernels(backend_name, inv_t, interpret, gemm_min_features=gemm_min_features,
                        priority=priority - INVARIANT_PRIORITY_DROP)
    return tuned + [dataclasses.replace(k, name=f"{k.name}.batch_invariant",
                                        capability=dataclasses.replace(k.capability, batch_invariant=True),
                                        description=f"batch invariant (fixed launch shapes): {k.description}")
                    for k in inv]


def _make_kernels(backend_name: str, tuning: TritonTuning, interpret: bool, *,
                  gemm_min_features: Optional[int] = None, priority: int = PRIORITY) -> List[KernelImpl]:
    from . import attention, fused, gemm, weight_only

    lim = tuning.limits
    dt = frozenset(lim.dtypes)
    tier = "Triton interpreter" if interpret else "Triton"
    pre = f"{backend_name}.triton" if not interpret else backend_name
    t = tuning

    def k(op: str, name: str, build, capability, description: str) -> KernelImpl:
        return KernelImpl(op=op, backend=backend_name, name=f"{pre}.{name}", build=build, capability=capability,
                          priority=priority, description=f"{description} ({tier}, tuning {t.name})")

    kernels = [
        k("gemm", "gemm", lambda spec: gemm.build_gemm(spec, t, interpret),
          ShapeRangeGemmCapability(dtypes=dt, out_dtypes=dt, min_features=gemm_min_features,
                                   max_features=lim.max_gemm_features),
          "tiled GEMM, fp32 accumulate, grouped tile order, fused bias"),
        k("grouped_gemm", "grouped_gemm", lambda spec: gemm.build_grouped_gemm(spec, t, interpret),
          GroupedGemmCapability(dtypes=dt, max_experts=lim.max_experts),
          "grouped (MoE) GEMM: each row tile walks the experts its rows use"),
        k("weight_only_gemm", "weight_only_gemm",
          lambda spec: weight_only.build_weight_only_gemm(spec, t, interpret),
          WeightOnlyGemmCapability(dtypes=dt, min_k_multiple=32),
          "weight-only GEMM, every format: integer codes dequantized in-kernel, per-chunk scale and offset in the "
          "fp32 accumulator"),
        k("rms_norm", "rms_norm", lambda spec: fused.build_rms_norm(spec, t, interpret),
          NormCapability(dtypes=dt, max_hidden_size=lim.max_hidden_size, fused_residual=True),
          "one-pass RMSNorm with the residual add fused"),
        k("layer_norm", "layer_norm", lambda spec: fused.build_layer_norm(spec, t, interpret),
          NormCapability(dtypes=dt, max_hidden_size=lim.max_hidden_size, bias=True),
          "one-pass LayerNorm"),
        k("rotary_embedding", "rotary", lambda spec: fused.build_rotary(spec, t, interpret),
          RotaryCapability(dtypes=dt, styles=frozenset({"neox", "gptj"}), partial=True, head_sizes=None),
          "rotary embedding, neox and gptj, partial rotary"),
        k("silu_and_mul", "silu_and_mul", lambda spec: fused.build_gated_activation(spec, t, interpret, "silu"),
          GatedActivationCapability(dtypes=dt, approximations=frozenset({"none"})),
          "silu(a) * b"),
        k("gelu_and_mul", "gelu_and_mul", lambda spec: fused.build_gated_activation(spec, t, interpret, "gelu"),
          GatedActivationCapability(dtypes=dt, approximations=frozenset({"none", "tanh"})),
          "gelu(a) * b, erf or tanh"),
    ]
    kernels.extend(_attention_kernels(t, interpret, dt, k))
    return kernels


def _attention_kernels(t: TritonTuning, interpret: bool, dt, k) -> List[KernelImpl]:
    from . import attention

    lim = t.limits
    # any block size, either layout (strides carry it), every feature, any GQA group; same-dtype caches
    cap = AttentionCapability(dtypes=dt, max_head_size=lim.max_head_size, kv_cache_dtypes=None, block_sizes=None,
                              kv_layouts=frozenset({"NHD", "HND"}), features=ATTENTION_FEATURES)
    return [
        k("attention", "attention", lambda spec: attention.build_attention(spec, t, interpret), cap,
          "unified paged attention: prefill, chunked prefill and decode in one launch; GQA, causal/bidirectional, "
          "sliding window, soft-cap; split-KV for long-context decode"),
        k("reshape_and_cache", "reshape_and_cache",
          lambda spec: attention.build_reshape_and_cache(spec, t, interpret), cap,
          "KV-cache write through the slot mapping (negative slots skipped)"),
    ]
