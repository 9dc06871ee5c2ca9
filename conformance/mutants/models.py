"""Model-level mutants: kernel bugs that only a whole model shows (a config value the kernel ignores, a shape
only a model produces, a batch layout only a decode loop produces).

Each mutant is a backend with ONE kernel: the core's correct implementation (``Op.native(spec)``) with one
planted deviation; every other op falls back to the core. Its ``models`` are the tiny built-in models
(:data:`anyaccel.conformance.models.TINY_CONFIGS`) that exercise the feature the bug lives in, and whose
default checks must catch it in every dtype. :func:`clean_backend` builds the same backend with the correct
kernel in the mutated slot (the "clean twin"), so a test can show the catch comes from the bug and not from the
backend's shape (one kernel, fallbacks for the rest).

Neutral code: kernels are built from the core's native implementations and plain torch only.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Dict, Optional, Tuple

import torch

from ...core.attention import Attention, AttentionCapability, AttentionMetadata
from ...core.backend import Backend, BackendDef
from ...core.dispatch import KernelImpl, Op, OpCapability
from ...core.fused import (GatedActivationCapability, GeluAndMul, NormCapability, RMSNorm, Rotary,
                           RotaryCapability, rope_cos_sin_cache)
from ...core.gemm import GroupedGemm, GroupedGemmCapability
from . import ALL_DTYPES, Mutant, register

__all__ = ["MODEL_MUTANTS", "clean_backend"]

FAMILY = "models"
VENDOR = "anyaccel-mutants"


@dataclasses.dataclass(frozen=True)
class _Slot:
    """The one kernel a model mutant replaces: the op, its capability class, and the buggy kernel's builder."""

    op: type
    capability: type
    build: Callable[[object], Callable]
    capability_kwargs: Tuple[Tuple[str, object], ...] = ()


_SLOTS: Dict[str, _Slot] = {}


def _backend(name: str, slot: _Slot, dtypes: Tuple[torch.dtype, ...], clean: bool) -> Backend:
    bname = ("clean-" if clean else "mutant-") + name.replace(".", "-").replace("_", "-")
    cap: OpCapability = slot.capability(dtypes=frozenset(dtypes), **dict(slot.capability_kwargs))
    build = slot.op.native if clean else slot.build
    kernel = KernelImpl(op=slot.op.name, backend=bname, name=f"{bname}.{slot.op.name}", build=build,
                        capability=cap, provider=VENDOR,
                        description=("the core's kernel (clean twin of " if clean else "planted bug: ") + name)
    return Backend.local(BackendDef(name=bname, vendor=VENDOR, device_type="cpu"), [kernel], package=VENDOR)


def clean_backend(name: str, dtypes: Optional[Tuple[torch.dtype, ...]] = None) -> Backend:
    """The clean twin of model mutant ``name``: the same single kernel slot and capability, correct kernel."""
    if name not in _SLOTS:
        raise KeyError(f"unknown model mutant {name!r}; known: {', '.join(sorted(_SLOTS))}")
    return _backend(name, _SLOTS[name], tuple(dtypes) if dtypes else ALL_DTYPES, clean=True)


def _mutant(bug: str, slot: _Slot, description: str, models: Tuple[str, ...],
            dtypes: Tuple[torch.dtype, ...] = ALL_DTYPES) -> Mutant:
    name = f"{FAMILY}.{bug}"
    _SLOTS[name] = slot
    return register(Mutant(name=name, family=FAMILY, op=slot.op.name, description=description,
                           make_backend=lambda dtypes, name=name, slot=slot: _backend(name, slot, tuple(dtypes),
                                                                                       clean=False),
                           dtypes=dtypes, models=models))


# -- rms_norm ------------------------------------------------------------------------------------------------------

def _rms_norm_fixed_eps(spec):
    """eps hard-coded to 1e-3 (a kernel written for one model family), whatever the model asks."""
    return RMSNorm.native(dataclasses.replace(spec, eps=1e-3))


def _rms_norm_tail_dropped(spec):
    """The mean of squares sums only whole 16-lane chunks of the row, but still divides by H: rows whose H is
    not a multiple of 16 (Qwen3's per-head q/k norms, head_dim 24) are normalised by a too-small RMS."""
    h, eps = spec.hidden_size, spec.eps
    whole = (h // 16) * 16

    def rms_norm_tail_dropped(x_NH, w_H, residual_NH, out_NH, residual_out_NH):
        h_NH = x_NH.float()
        if residual_NH is not None:
            h_NH = h_NH + residual_NH
            residual_out_NH.copy_(h_NH)
        ms_N1 = h_NH[:, :whole].square().sum(-1, keepdim=True) / h
        return out_NH.copy_(h_NH * torch.rsqrt(ms_N1 + eps) * w_H)

    return rms_norm_tail_dropped


# -- rotary --------------------------------------------------------------------------------------------------------

def _rotary_default_base(spec):
    """Ignores the model's cos/sin cache and uses its own, built for base 10000 without scaling: every model
    with another rope_theta (Mixtral 1e6) or a scaling variant (Llama 3) is rotated wrongly."""
    native = Rotary.native(spec)
    own_PR = rope_cos_sin_cache(spec.rotary_dim, spec.max_position, 10000.0)

    def rotary_default_base(positions_T, q_TQD, k_TKD, cache_PR, q_out_TQD, k_out_TKD):
        return native(positions_T, q_TQD, k_TKD, own_PR.to(cache_PR.device), q_out_TQD, k_out_TKD)

    return rotary_default_base


def _rotary_tail_unwritten(spec):
    """Writes only the rotated dims: the pass-through dims ``R:`` of a partial rotary (Phi-3) are zero in
    the output instead of copied from the input."""
    native = Rotary.native(spec)
    r = spec.rotary_dim

    def rotary_tail_unwritten(positions_T, q_TQD, k_TKD, cache_PR, q_out_TQD, k_out_TKD):
        native(positions_T, q_TQD, k_TKD, cache_PR, q_out_TQD, k_out_TKD)
        q_out_TQD[..., r:] = 0
        k_out_TKD[..., r:] = 0

    return rotary_tail_unwritten


# -- attention -----------------------------------------------------------------------------------------------------

def _attention_window_ignored(spec):
    """Attends to the whole causal context: the sliding window (Mistral, Gemma 2) is not applied."""
    return Attention.native(dataclasses.replace(spec, sliding_window=None))


def _attention_soft_cap_ignored(spec):
    """The attention logit soft-cap (Gemma 2) is not applied."""
    return Attention.native(dataclasses.replace(spec, soft_cap=None))


def _attention_decode_stale_length(spec):
    """Decode rows (one new token) attend over ``seq_len - 1`` keys: the context length is read before the new
    token's K/V was counted, so a decoding token never sees itself. Prefill is right."""
    native = Attention.native(spec)

    def attention_decode_stale_length(q_THD, k_cache, v_cache, meta, out_THD):
        if 1 not in meta.query_lens_host:
            return native(q_THD, k_cache, v_cache, meta, out_THD)
        stale = [s - 1 if (q == 1 and s > 1) else s for q, s in zip(meta.query_lens_host, meta.seq_lens_host)]
        bad = AttentionMetadata.build(meta.query_start_loc, torch.tensor(stale, dtype=meta.seq_lens.dtype,
                                                                         device=meta.seq_lens.device),
                                      meta.block_table, meta.block_size, meta.slot_mapping)
        return native(q_THD, k_cache, v_cache, bad, out_THD)

    return attention_decode_stale_length


# -- gelu_and_mul ----------------------------------------------------------------------------------------------------

def _gelu_erf_for_tanh(spec):
    """Always the exact (erf) GELU, although the model asks for the tanh approximation (Gemma)."""
    return GeluAndMul.native(dataclasses.replace(spec, approximate="none"))


# -- grouped gemm (MoE experts) --------------------------------------------------------------------------------------

def _grouped_gemm_compacted_experts(spec):
    """Skips empty experts and then indexes the weights by the position among the NON-empty segments: after an
    expert with no tokens (always the case in a decode step, k of E experts chosen), tokens run through the
    previous expert's weights. Op cases whose every expert gets rows never see it."""
    if spec.mode != "segments":
        return GroupedGemm.native(spec)

    def grouped_gemm_compacted(x_MK, w_ENK, groups, out_MN):
        start, j = 0, 0
        for n in groups.tolist():
            if n:
                torch.mm(x_MK[start:start + n], w_ENK[j].t(), out=out_MN[start:start + n])
                start += n
                j += 1
        return out_MN

    return grouped_gemm_compacted


MODEL_MUTANTS: Tuple[Mutant, ...] = (
    _mutant("rms_norm_eps_1e-3", _Slot(RMSNorm, NormCapability, _rms_norm_fixed_eps),
            "rms_norm uses eps 1e-3 whatever the model's rms_norm_eps (1e-6 in the tiny models)", ("qwen3",)),
    _mutant("rms_norm_tail_dropped", _Slot(RMSNorm, NormCapability, _rms_norm_tail_dropped),
            "rms_norm leaves the H % 16 tail out of the mean of squares: Qwen3's per-head q/k norms (head_dim "
            "24) are wrong, the hidden-size norms (H = 64) are right", ("qwen3_moe",)),
    _mutant("rope_default_base", _Slot(Rotary, RotaryCapability, _rotary_default_base),
            "rotary ignores the model's cos/sin cache and uses base 10000 without scaling (rope_theta and "
            "Llama-3 scaling lost)", ("llama",)),
    _mutant("rope_tail_unwritten", _Slot(Rotary, RotaryCapability, _rotary_tail_unwritten),
            "partial rotary: the pass-through dims are zeroed instead of copied (Phi-3, partial_rotary_factor "
            "0.5)", ("phi3",)),
    _mutant("window_ignored", _Slot(Attention, AttentionCapability, _attention_window_ignored),
            "attention ignores the sliding window", ("mistral",)),
    _mutant("soft_cap_ignored", _Slot(Attention, AttentionCapability, _attention_soft_cap_ignored),
            "attention ignores the logit soft-cap", ("gemma2",)),
    _mutant("decode_stale_length", _Slot(Attention, AttentionCapability, _attention_decode_stale_length),
            "a decoding token attends over seq_len - 1 keys (not itself); prefill is right", ("llama",)),
    _mutant("gelu_erf_for_tanh", _Slot(GeluAndMul, GatedActivationCapability, _gelu_erf_for_tanh),
            "gelu_and_mul computes the erf GELU when the model asks for the tanh approximation (float32 only: "
            "the two differ by <= 2e-4 per element, below half-precision noise at model level; the fused op "
            "family's cases are where half precision must catch it)", ("gemma2",), dtypes=(torch.float32,)),
    _mutant("moe_compacted_experts", _Slot(GroupedGemm, GroupedGemmCapability, _grouped_gemm_compacted_experts),
            "grouped GEMM indexes expert weights by the rank among non-empty segments, so tokens after an "
            "empty expert use the wrong expert", ("mixtral",)),
)
