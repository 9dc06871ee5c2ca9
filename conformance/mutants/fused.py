"""Planted bugs of the fused small ops: rms_norm (and its fused residual add), layer_norm, rotary embedding and
the gated activations.

The harnesses compute in float32 and round once, as the core's native kernels do; each bug is a realistic slip
(a variance divided by H - 1, an epsilon outside the square root, a rotary cache built with the default base...).
"""
from __future__ import annotations

import math
from typing import Callable, Dict, Optional, Tuple

import torch
import torch.nn.functional as F

from ...core.fused import (GatedActivationCapability, NormCapability, RotaryCapability, rope_cos_sin_cache)
from . import Mutant, register
from ._kit import TWINS, backend

__all__ = ["rms_norm_kernel", "layer_norm_kernel", "rotary_kernel", "silu_and_mul_kernel", "gelu_and_mul_kernel",
           "BUGS"]


def rms_norm_kernel(spec, bug: Optional[str] = None):
    eps = spec.eps

    def kernel(x, weight, residual, out, residual_out):
        h = x.float()
        if residual is not None:
            h = h + residual.float()
        w = weight.float()
        ms = ((h * w) if bug == "rms_of_weighted_x" else h).square().mean(-1, keepdim=True)
        if bug == "eps_outside_sqrt":
            y = h / (ms.sqrt() + eps) * w
        else:
            y = h * torch.rsqrt(ms + eps) * w
        if residual is not None:
            residual_out.copy_(residual if bug == "residual_not_returned" else h)
        return out.copy_(y)

    return kernel


def layer_norm_kernel(spec, bug: Optional[str] = None):
    eps, n = spec.eps, spec.hidden_size

    def kernel(x, weight, bias, out):
        h = x.float()
        c = h - h.mean(-1, keepdim=True)
        var = c.square().sum(-1, keepdim=True) / ((n - 1) if bug == "unbiased_variance" else n)
        y = c * torch.rsqrt(var + eps) * weight.float()
        if bias is not None and bug != "bias_dropped":
            y = y + bias.float()
        return out.copy_(y)

    return kernel


def rotary_kernel(spec, bug: Optional[str] = None):
    r, d, half = spec.rotary_dim, spec.head_size, spec.rotary_dim // 2
    style = spec.style
    if bug == "style_swapped":
        style = "gptj" if style == "neox" else "neox"
    a, b = (slice(0, half), slice(half, r)) if style == "neox" else (slice(0, r, 2), slice(1, r, 2))
    own_cache = rope_cos_sin_cache(r, spec.max_position, 10000.0) if bug == "wrong_base" else None

    def kernel(positions, q, k, cache, q_out, k_out):
        cache = own_cache if own_cache is not None else cache
        pos = positions.long()
        if bug == "position_off_by_one":
            pos = (pos + 1).clamp(max=cache.shape[0] - 1)
        cs = cache.float()[pos]
        cos, sin = cs[:, None, :half], cs[:, None, half:]
        for x, out in ((q, q_out), (k, k_out)):
            x1, x2 = x[..., a].float(), x[..., b].float()
            y1, y2 = x1 * cos - x2 * sin, x2 * cos + x1 * sin
            tail = x[..., r:].clone()
            out[..., a] = y1.to(out.dtype)
            out[..., b] = y2.to(out.dtype)
            if r < d:
                out[..., r:] = tail
        return q_out, k_out

    return kernel


def silu_and_mul_kernel(spec, bug: Optional[str] = None):
    def kernel(x, out):
        dd = out.shape[-1]
        gate, up = x[..., :dd].float(), x[..., dd:].float()
        if bug == "gate_up_swapped":
            gate, up = up, gate
        return out.copy_(F.silu(gate) * up)

    return kernel


def gelu_and_mul_kernel(spec, bug: Optional[str] = None):
    approximate = "tanh" if bug == "tanh_for_erf" else spec.approximate

    def kernel(x, out):
        dd = out.shape[-1]
        return out.copy_(F.gelu(x[..., :dd].float(), approximate=approximate) * x[..., dd:].float())

    return kernel


_KERNELS: Dict[str, Tuple[Callable, Callable[[frozenset], object]]] = {
    "rms_norm": (rms_norm_kernel, lambda dts: NormCapability(dtypes=dts)),
    "layer_norm": (layer_norm_kernel, lambda dts: NormCapability(dtypes=dts)),
    "rotary_embedding": (rotary_kernel, lambda dts: RotaryCapability(dtypes=dts)),
    "silu_and_mul": (silu_and_mul_kernel, lambda dts: GatedActivationCapability(dtypes=dts)),
    "gelu_and_mul": (gelu_and_mul_kernel, lambda dts: GatedActivationCapability(dtypes=dts)),
}

#: (op, bug) -> what the kernel gets wrong
BUGS = {
    ("rms_norm", "eps_outside_sqrt"): "x / (sqrt(mean(x^2)) + eps) instead of x / sqrt(mean(x^2) + eps)",
    ("rms_norm", "residual_not_returned"): "the fused add normalises x + residual but leaves the old residual in "
                                           "residual_out (the in-place update is forgotten)",
    ("rms_norm", "rms_of_weighted_x"): "the weight is applied before normalising: the mean of squares is taken "
                                       "over x * w",
    ("layer_norm", "unbiased_variance"): "the variance divides by H - 1 (torch.var's default) instead of H",
    ("layer_norm", "bias_dropped"): "the bias is never added",
    ("rotary_embedding", "wrong_base"): "the kernel ignores the cos/sin cache it is given and builds its own with "
                                        "the default base 10000 (no scaling)",
    ("rotary_embedding", "style_swapped"): "neox and gptj pairings swapped (halves vs interleaved pairs)",
    ("rotary_embedding", "position_off_by_one"): "each token is rotated by position + 1",
    ("gelu_and_mul", "tanh_for_erf"): "the tanh approximation is used when the spec asks for the exact erf GELU",
    ("silu_and_mul", "gate_up_swapped"): "gate and up halves swapped: silu(up) * gate",
}


def _backend(name: str, bugs: Dict[str, Optional[str]], dtypes: Tuple[torch.dtype, ...]):
    dts = frozenset(dtypes)
    return backend(name, [(op, (lambda spec, _k=k, _b=bugs.get(op): _k(spec, _b)), cap(dts))
                          for op, (k, cap) in _KERNELS.items()])


for (_op, _bug), _what in BUGS.items():
    register(Mutant(name=f"fused.{_op}_{_bug}", family="fused", op=_op, description=_what,
                    make_backend=lambda dts, _o=_op, _b=_bug: _backend(f"fused.{_o}_{_b}", {_o: _b}, dts)))
TWINS["fused"] = lambda dts: _backend("fused.clean", {}, dts)
