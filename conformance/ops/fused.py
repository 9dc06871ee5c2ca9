"""Conformance cases of the fused small ops: rms_norm (plain and with the fused residual add), layer_norm,
rotary_embedding (neox and gptj, partial rotary, scaled caches) and the gated activations.

Inputs keep outputs of order one: ``x, residual ~ N(0, 1)``, norm weights ``1 + 0.1 N(0, 1)`` and biases
``0.1 N(0, 1)``, rotary q/k ``~ N(0, 1)`` with positions drawn over the whole cos/sin cache, activation inputs
``~ N(0, 1)``. Each reference is the core's float64 oracle on the same (already rounded) values. Tolerance
classes: ``"norm"`` (reduction H), ``"rotary"`` and ``"activation"`` (element-wise, reduction 1).
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Tuple

import torch

from ...core.fused import (GatedActivationSpec, GeluAndMul, LayerNorm, LayerNormSpec, RMSNorm, RMSNormSpec,
                           RopeScaling, Rotary, RotarySpec, SiluAndMul, gelu_and_mul_reference,
                           layer_norm_reference, rms_norm_reference, rope_cos_sin_cache, rotary_reference,
                           silu_and_mul_reference)
from ..cases import OpCase, poison

__all__ = ["FAMILY", "fixed_cases", "case_strategy", "rms_norm_case", "layer_norm_case", "rotary_case",
           "activation_case"]

FAMILY = "fused"


def _shape(lead: Tuple[int, ...], last: int) -> str:
    return "[" + ", ".join(str(s) for s in (*lead, last)) + "]"


def _tags(label: str) -> Tuple[str, ...]:
    return ("fixed",) if label else ("drawn",)


def rms_norm_case(dtype: torch.dtype, lead: Tuple[int, ...], h: int, fused: bool, eps: float = 1e-6,
                  label: str = "") -> OpCase:
    """``x[*lead, H]``, ``weight[H]`` and, when fused, ``residual[*lead, H]``."""
    spec = RMSNormSpec(hidden_size=h, dtype=dtype, eps=eps, fused_residual=fused)

    def make(device: torch.device, seed: int) -> Dict[str, Any]:
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(*lead, h, generator=g)
        w = 1 + 0.1 * torch.randn(h, generator=g)
        r = torch.randn(*lead, h, generator=g) if fused else None
        return {"x": x.to(device, dtype), "weight": w.to(device, dtype),
                "residual": None if r is None else r.to(device, dtype)}

    def call(op: RMSNorm, inp: Dict[str, Any]) -> Tuple[torch.Tensor, ...]:
        x = inp["x"]
        out = poison(torch.empty_like(x))
        if not fused:
            return (op(x, inp["weight"], out=out),)
        res_out = poison(torch.empty_like(x))
        return tuple(op(x, inp["weight"], inp["residual"], out=out, residual_out=res_out))

    def reference(inp: Dict[str, Any]) -> Tuple[torch.Tensor, ...]:
        ref = rms_norm_reference(inp["x"], inp["weight"], eps, inp["residual"])
        return tuple(ref) if fused else (ref,)

    name = f"{label + ' ' if label else ''}rms_norm x={_shape(lead, h)}{' fused residual' if fused else ''}"
    return OpCase(op=RMSNorm, spec=spec, name=name, tolerance_class="norm", reduction=h, make=make, call=call,
                  reference=reference, tags=_tags(label))


def layer_norm_case(dtype: torch.dtype, lead: Tuple[int, ...], h: int, bias: bool, eps: float = 1e-5,
                    label: str = "") -> OpCase:
    """``x[*lead, H]``, ``weight[H]``, optional ``bias[H]``; x has a non-zero mean (the norm must remove it)."""
    spec = LayerNormSpec(hidden_size=h, dtype=dtype, eps=eps, has_bias=bias)

    def make(device: torch.device, seed: int) -> Dict[str, Any]:
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(*lead, h, generator=g) + 0.5
        w = 1 + 0.1 * torch.randn(h, generator=g)
        b = 0.1 * torch.randn(h, generator=g) if bias else None
        return {"x": x.to(device, dtype), "weight": w.to(device, dtype),
                "bias": None if b is None else b.to(device, dtype)}

    def call(op: LayerNorm, inp: Dict[str, Any]) -> Tuple[torch.Tensor, ...]:
        x = inp["x"]
        return (op(x, inp["weight"], inp["bias"], out=poison(torch.empty_like(x))),)

    def reference(inp: Dict[str, Any]) -> Tuple[torch.Tensor, ...]:
        return (layer_norm_reference(inp["x"], inp["weight"], inp["bias"], eps),)

    name = f"{label + ' ' if label else ''}layer_norm x={_shape(lead, h)}{' bias' if bias else ' no bias'}"
    return OpCase(op=LayerNorm, spec=spec, name=name, tolerance_class="norm", reduction=h, make=make, call=call,
                  reference=reference, tags=_tags(label))


def rotary_case(dtype: torch.dtype, t: int, hq: int, hkv: int, d: int, r: int, style: str, max_position: int,
                base: float = 10000.0, scaling: Optional[RopeScaling] = None, label: str = "") -> OpCase:
    """``positions[T]`` (int64, or int32 when T is odd), ``q[T, Hq, D]``, ``k[T, Hkv, D]``, a float32 cache
    ``[max_position, R]`` from :func:`rope_cos_sin_cache` (with ``scaling``)."""
    spec = RotarySpec(head_size=d, rotary_dim=r, num_heads=hq, num_kv_heads=hkv, dtype=dtype, style=style,
                      max_position=max_position)
    pos_dtype = torch.int32 if t % 2 else torch.int64

    def make(device: torch.device, seed: int) -> Dict[str, Any]:
        g = torch.Generator().manual_seed(seed)
        positions = torch.randint(0, max_position, (t,), generator=g)
        if t > 1:
            positions[-1] = max_position - 1  # the cache's last row is always exercised
        q = torch.randn(t, hq, d, generator=g)
        k = torch.randn(t, hkv, d, generator=g)
        cache = rope_cos_sin_cache(r, max_position, base, scaling)
        return {"positions": positions.to(device, pos_dtype), "q": q.to(device, dtype), "k": k.to(device, dtype),
                "cos_sin_cache": cache.to(device)}

    def call(op: Rotary, inp: Dict[str, Any]) -> Tuple[torch.Tensor, ...]:
        q, k = inp["q"], inp["k"]
        q_out, k_out = poison(torch.empty_like(q)), poison(torch.empty_like(k))
        return tuple(op(inp["positions"], q, k, inp["cos_sin_cache"], q_out=q_out, k_out=k_out))

    def reference(inp: Dict[str, Any]) -> Tuple[torch.Tensor, ...]:
        return rotary_reference(inp["positions"], inp["q"], inp["k"], inp["cos_sin_cache"], style)

    extra = f" {scaling.rope_type}-scaled" if scaling is not None else ""
    name = (f"{label + ' ' if label else ''}rotary {style}{extra} T={t} Hq={hq} Hkv={hkv} D={d} R={r} "
            f"P={max_position}")
    return OpCase(op=Rotary, spec=spec, name=name, tolerance_class="rotary", reduction=1, make=make, call=call,
                  reference=reference, tags=_tags(label))


def activation_case(dtype: torch.dtype, act: str, lead: Tuple[int, ...], d: int, approximate: str = "none",
                    label: str = "") -> OpCase:
    """``x[*lead, 2d]`` for ``act`` in ``"silu"``/``"gelu"``."""
    spec = GatedActivationSpec(dtype=dtype, approximate=approximate)
    op_type = SiluAndMul if act == "silu" else GeluAndMul

    def make(device: torch.device, seed: int) -> Dict[str, Any]:
        g = torch.Generator().manual_seed(seed)
        return {"x": torch.randn(*lead, 2 * d, generator=g).to(device, dtype)}

    def call(op: Any, inp: Dict[str, Any]) -> Tuple[torch.Tensor, ...]:
        x = inp["x"]
        out = poison(torch.empty(*x.shape[:-1], d, dtype=x.dtype, device=x.device))
        return (op(x, out=out),)

    def reference(inp: Dict[str, Any]) -> Tuple[torch.Tensor, ...]:
        if act == "silu":
            return (silu_and_mul_reference(inp["x"]),)
        return (gelu_and_mul_reference(inp["x"], approximate),)

    approx = f" approximate={approximate}" if act == "gelu" else ""
    name = f"{label + ' ' if label else ''}{act}_and_mul x={_shape(lead, 2 * d)}{approx}"
    return OpCase(op=op_type, spec=spec, name=name, tolerance_class="activation", reduction=1, make=make,
                  call=call, reference=reference, tags=_tags(label))


def fixed_cases(backend: Any, dtype: torch.dtype) -> List[OpCase]:
    llama3 = RopeScaling("llama3", 8.0, original_max_position_embeddings=256, low_freq_factor=1.0,
                         high_freq_factor=4.0)
    yarn = RopeScaling("yarn", 4.0, original_max_position_embeddings=512)
    return [
        rms_norm_case(dtype, (7,), 4096, False, label="llama"),
        rms_norm_case(dtype, (7,), 4096, True, label="llama"),
        rms_norm_case(dtype, (1,), 4096, True, label="decode"),
        rms_norm_case(dtype, (5,), 80, False, label="small H"),
        rms_norm_case(dtype, (3,), 77, True, label="odd H"),
        rms_norm_case(dtype, (2, 3), 96, True, eps=1e-5, label="3-d x"),
        layer_norm_case(dtype, (7,), 384, True, eps=1e-12, label="bert"),
        layer_norm_case(dtype, (7,), 384, False, label="no bias"),
        layer_norm_case(dtype, (2, 3), 1000, True, label="3-d x"),
        rotary_case(dtype, 9, 32, 8, 128, 128, "neox", 4096, label="llama GQA"),
        rotary_case(dtype, 1, 32, 8, 128, 128, "neox", 4096, base=500000.0, label="decode"),
        rotary_case(dtype, 6, 4, 4, 64, 64, "gptj", 2048, label="gptj"),
        rotary_case(dtype, 5, 8, 1, 64, 16, "neox", 512, label="partial MQA"),
        rotary_case(dtype, 5, 4, 2, 256, 64, "gptj", 1024, label="partial gptj"),
        rotary_case(dtype, 7, 4, 4, 80, 32, "neox", 300, label="phi-like"),
        rotary_case(dtype, 8, 8, 2, 64, 64, "neox", 2048, base=500000.0, scaling=llama3, label="llama3.1"),
        rotary_case(dtype, 8, 8, 2, 64, 64, "neox", 2048, scaling=yarn, label="yarn"),
        activation_case(dtype, "silu", (7,), 11008, label="llama"),
        activation_case(dtype, "silu", (3,), 13, label="odd d"),
        activation_case(dtype, "silu", (2, 3), 64, label="3-d x"),
        activation_case(dtype, "gelu", (7,), 1536, label="gemma"),
        activation_case(dtype, "gelu", (5,), 96, approximate="tanh", label="gemma"),
        activation_case(dtype, "gelu", (1,), 1, approximate="tanh", label="d=1"),
    ]


def case_strategy(backend: Any, dtype: torch.dtype):
    from hypothesis import strategies as st

    lead = st.one_of(st.tuples(st.integers(1, 12)), st.tuples(st.integers(1, 3), st.integers(1, 4)))

    @st.composite
    def norm(draw) -> OpCase:
        shape, h = draw(lead), draw(st.integers(1, 320))
        if draw(st.booleans()):
            return rms_norm_case(dtype, shape, h, draw(st.booleans()), eps=draw(st.sampled_from([1e-6, 1e-5])))
        return layer_norm_case(dtype, shape, h, draw(st.booleans()), eps=draw(st.sampled_from([1e-5, 1e-12])))

    @st.composite
    def rotary(draw) -> OpCase:
        d = 2 * draw(st.integers(1, 64))
        r = 2 * draw(st.integers(1, d // 2))
        hkv = draw(st.integers(1, 4))
        hq = hkv * draw(st.integers(1, 4))
        scaling = draw(st.sampled_from([None, RopeScaling("linear", 2.0),
                                        RopeScaling("yarn", 4.0, original_max_position_embeddings=64)]))
        return rotary_case(dtype, draw(st.integers(1, 16)), hq, hkv, d, r, draw(st.sampled_from(["neox", "gptj"])),
                           draw(st.integers(1, 128)), base=draw(st.sampled_from([10000.0, 1e6])), scaling=scaling)

    @st.composite
    def activation(draw) -> OpCase:
        act = draw(st.sampled_from(["silu", "gelu"]))
        approx = draw(st.sampled_from(["none", "tanh"])) if act == "gelu" else "none"
        return activation_case(dtype, act, draw(lead), draw(st.integers(1, 200)), approximate=approx)

    return st.one_of(norm(), rotary(), activation())
