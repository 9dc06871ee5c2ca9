"""Conformance cases of the fused small ops: rms_norm (plain and with the fused residual add), layer_norm,
rotary_embedding (neox and gptj, partial rotary, scaled caches) and the gated activations.

Inputs keep outputs of order one: ``x, residual ~ N(0, 1)``, norm weights ``1 + 0.1 N(0, 1)`` and biases
``0.1 N(0, 1)``, rotary q/k ``~ N(0, 1)`` with positions drawn over the whole cos/sin cache, activation inputs
``~ N(0, 1)``. Each reference is the core's float64 oracle on the same (already rounded) values and carries the
per-element allowance of the error model (:mod:`anyaccel.conformance.tolerances`): norms ``|x_hat * w| + |b|``
(two roundings mid-way, fp32 accumulation over H; layer_norm's fp32 term on ``(|x| + |mean|) * rstd * |w|``,
what a fused ``x * a + c`` form cancels), rotary ``|x1 cos| + |x2 sin|``, activations ``|ref|`` (gelu's fp32
term on ``|a * b|``: ``1 + erf`` cancels in the negative tail).
Tolerance classes: ``"norm"`` (reduction H), ``"rotary"`` and ``"activation"`` (element-wise, reduction 1).

Sentinels beside the model shapes: norms over a small H (8, 16: the biased/unbiased variance differ by
``H/(H-1)``), rows of tiny magnitude (``x ~ 1e-3``: ``eps`` inside or outside the square root differ by 40%),
activations with inputs in the tails (``|x|`` up to ~10: the tanh and erf GELU differ by 10% near -3), rotary
with a non-default base and scaled caches. Drawn cases stay within the kernels' declared capabilities (norm
``max_hidden_size``, fused residual, bias; rotary styles, head sizes, partial; gelu approximations) three draws in
four.
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Tuple

import torch

from ...core.fused import (GatedActivationSpec, GeluAndMul, LayerNorm, LayerNormSpec, RMSNorm, RMSNormSpec,
                           RopeScaling, Rotary, RotarySpec, SiluAndMul, gelu_and_mul_reference,
                           layer_norm_reference, rms_norm_reference, rope_cos_sin_cache, rotary_reference,
                           silu_and_mul_reference)
from ..cases import OpCase, poison
from ..tolerances import allowance, with_allowance

__all__ = ["FAMILY", "fixed_cases", "case_strategy", "rms_norm_case", "layer_norm_case", "rotary_case",
           "activation_case", "norm_with_allowance", "rotary_magnitude", "rotary_with_allowance"]

FAMILY = "fused"


def _shape(lead: Tuple[int, ...], last: int) -> str:
    return "[" + ", ".join(str(s) for s in (*lead, last)) + "]"


def _tags(label: str) -> Tuple[str, ...]:
    return ("fixed",) if label else ("drawn",)


def norm_with_allowance(ref: torch.Tensor, dtype: torch.dtype, h: int, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``ref`` with the norm's allowance: mid_mag = |x_hat * w| + |b|, acc_mag = sqrt(H) * mid_mag."""
    mag = ref.abs() if bias is None else (ref - bias.double()).abs() + bias.double().abs()
    return with_allowance(ref, allowance("norm", dtype, mid_mag=mag, acc_mag=h ** 0.5 * mag))


def rms_norm_case(dtype: torch.dtype, lead: Tuple[int, ...], h: int, fused: bool, eps: float = 1e-6,
                  label: str = "", x_scale: float = 1.0) -> OpCase:
    """``x[*lead, H]`` (times ``x_scale``), ``weight[H]`` and, when fused, ``residual[*lead, H]`` (same scale)."""
    spec = RMSNormSpec(hidden_size=h, dtype=dtype, eps=eps, fused_residual=fused)

    def make(device: torch.device, seed: int) -> Dict[str, Any]:
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(*lead, h, generator=g) * x_scale
        w = 1 + 0.1 * torch.randn(h, generator=g)
        r = torch.randn(*lead, h, generator=g) * x_scale if fused else None
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
        if not fused:
            return (norm_with_allowance(ref, dtype, h),)
        return norm_with_allowance(ref[0], dtype, h), ref[1]

    name = (f"{label + ' ' if label else ''}rms_norm x={_shape(lead, h)}{' fused residual' if fused else ''}"
            f"{f' x~{x_scale:g}' if x_scale != 1.0 else ''}")
    return OpCase(op=RMSNorm, spec=spec, name=name, tolerance_class="norm", reduction=h, make=make, call=call,
                  reference=reference, tags=_tags(label))


def layer_norm_case(dtype: torch.dtype, lead: Tuple[int, ...], h: int, bias: bool, eps: float = 1e-5,
                    label: str = "", x_scale: float = 1.0) -> OpCase:
    """``x[*lead, H]``, ``weight[H]``, optional ``bias[H]``; x has a non-zero mean (the norm must remove it)."""
    spec = LayerNormSpec(hidden_size=h, dtype=dtype, eps=eps, has_bias=bias)

    def make(device: torch.device, seed: int) -> Dict[str, Any]:
        g = torch.Generator().manual_seed(seed)
        x = (torch.randn(*lead, h, generator=g) + 0.5) * x_scale
        w = 1 + 0.1 * torch.randn(h, generator=g)
        b = 0.1 * torch.randn(h, generator=g) if bias else None
        return {"x": x.to(device, dtype), "weight": w.to(device, dtype),
                "bias": None if b is None else b.to(device, dtype)}

    def call(op: LayerNorm, inp: Dict[str, Any]) -> Tuple[torch.Tensor, ...]:
        x = inp["x"]
        return (op(x, inp["weight"], inp["bias"], out=poison(torch.empty_like(x))),)

    def reference(inp: Dict[str, Any]) -> Tuple[torch.Tensor, ...]:
        ref = layer_norm_reference(inp["x"], inp["weight"], inp["bias"], eps)
        # mid: |x_hat * w| + |b|; acc: the terms a fused ``x * a + c`` form cancels, (|x| + |mean|) * rstd * |w|
        x = inp["x"].double()
        mean = x.mean(-1, keepdim=True)
        rstd = torch.rsqrt((x - mean).square().mean(-1, keepdim=True) + eps)
        w = inp["weight"].double().abs()
        b = inp["bias"].double().abs() if inp["bias"] is not None else torch.zeros_like(w)
        mid = ((x - mean) * rstd).abs() * w + b
        acc = h ** 0.5 * ((x.abs() + mean.abs()) * rstd * w + b)
        return (with_allowance(ref, allowance("norm", dtype, mid_mag=mid, acc_mag=acc)),)

    name = (f"{label + ' ' if label else ''}layer_norm x={_shape(lead, h)}{' bias' if bias else ' no bias'}"
            f"{f' x~{x_scale:g}' if x_scale != 1.0 else ''}")
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
        return rotary_with_allowance(inp["positions"], inp["q"], inp["k"], inp["cos_sin_cache"], style)


    extra = f" {scaling.rope_type}-scaled" if scaling is not None else ""
    name = (f"{label + ' ' if label else ''}rotary {style}{extra} T={t} Hq={hq} Hkv={hkv} D={d} R={r} "
            f"P={max_position}")
    return OpCase(op=Rotary, spec=spec, name=name, tolerance_class="rotary", reduction=1, make=make, call=call,
                  reference=reference, tags=_tags(label))


def rotary_magnitude(positions: torch.Tensor, x: torch.Tensor, cos_sin_cache: torch.Tensor,
                     style: str) -> torch.Tensor:
    """|x1 cos| + |x2 sin| (and |x2 cos| + |x1 sin|) on the rotated dims of ``x``, 0 on the pass-through tail."""
    x = x.detach().cpu().double()
    cs = cos_sin_cache.detach().cpu().double()[positions.cpu().long()].abs()
    half = cs.shape[1] // 2
    cos, sin = cs[:, None, :half], cs[:, None, half:]
    a, b = (slice(0, half), slice(half, 2 * half)) if style == "neox" else (slice(0, 2 * half, 2),
                                                                          slice(1, 2 * half, 2))
    m = torch.zeros_like(x)
    m[..., a] = x[..., a].abs() * cos + x[..., b].abs() * sin
    m[..., b] = x[..., b].abs() * cos + x[..., a].abs() * sin
    return m


def rotary_with_allowance(positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, cos_sin_cache: torch.Tensor,
                          style: str) -> Tuple[torch.Tensor, torch.Tensor]:
    """The float64 oracle ``(q_out, k_out)``, each carrying the error model's per-element allowance."""
    refs = rotary_reference(positions, q, k, cos_sin_cache, style)
    return tuple(with_allowance(ref, allowance("rotary", x.dtype, mid_mag=m, acc_mag=m))
                 for ref, x in zip(refs, (q, k)) for m in (rotary_magnitude(positions, x, cos_sin_cache, style),))


def activation_case(dtype: torch.dtype, act: str, lead: Tuple[int, ...], d: int, approximate: str = "none",
                    label: str = "", x_scale: float = 1.0) -> OpCase:
    """``x[*lead, 2d]`` (``~ N(0, x_scale**2)``) for ``act`` in ``"silu"``/``"gelu"``."""
    spec = GatedActivationSpec(dtype=dtype, approximate=approximate)
    op_type = SiluAndMul if act == "silu" else GeluAndMul

    def make(device: torch.device, seed: int) -> Dict[str, Any]:
        g = torch.Generator().manual_seed(seed)
        return {"x": (torch.randn(*lead, 2 * d, generator=g) * x_scale).to(device, dtype)}

    def call(op: Any, inp: Dict[str, Any]) -> Tuple[torch.Tensor, ...]:
        x = inp["x"]
        out = poison(torch.empty(*x.shape[:-1], d, dtype=x.dtype, device=x.device))
        return (op(x, out=out),)

    def reference(inp: Dict[str, Any]) -> Tuple[torch.Tensor, ...]:
        if act == "silu":
            ref = silu_and_mul_reference(inp["x"])
            acc = ref
        else:  # gelu's 1 + erf(a / sqrt 2) cancels in the negative tail: an fp32 error of u32 * |a * b|
            ref = gelu_and_mul_reference(inp["x"], approximate)
            x = inp["x"].double()
            acc = (x[..., :d] * x[..., d:]).abs() + ref.abs()
        return (with_allowance(ref, allowance("activation", dtype, mid_mag=ref, acc_mag=acc)),)

    approx = f" approximate={approximate}" if act == "gelu" else ""
    name = (f"{label + ' ' if label else ''}{act}_and_mul x={_shape(lead, 2 * d)}{approx}"
            f"{f' x~{x_scale:g}' if x_scale != 1.0 else ''}")
    return OpCase(op=op_type, spec=spec, name=name, tolerance_class="activation", reduction=1, make=make,
                  call=call, reference=reference, tags=_tags(label))


def fixed_cases(backend: Any, dtype: torch.dtype) -> List[OpCase]:
    llama3 = RopeScaling("llama3", 8.0, original_max_position_embeddings=256, low_freq_factor=1.0,
                         high_freq_factor=4.0)
    yarn = RopeScaling("yarn", 4.0, original_max_position_embeddings=512)
    dynamic = RopeScaling("dynamic", 2.0, original_max_position_embeddings=256)
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
        rotary_case(dtype, 6, 4, 2, 64, 64, "neox", 1024, scaling=dynamic, label="dynamic NTK"),
        activation_case(dtype, "silu", (7,), 11008, label="llama"),
        activation_case(dtype, "silu", (3,), 13, label="odd d"),
        activation_case(dtype, "silu", (2, 3), 64, label="3-d x"),
        activation_case(dtype, "gelu", (7,), 1536, label="gemma"),
        activation_case(dtype, "gelu", (5,), 96, approximate="tanh", label="gemma"),
        activation_case(dtype, "gelu", (1,), 1, approximate="tanh", label="d=1"),
        # sentinels: small H (biased vs unbiased variance), tiny rows (eps placement), activation tails
        rms_norm_case(dtype, (4,), 8, False, label="small H"),
        rms_norm_case(dtype, (3,), 16, True, label="small H"),
        rms_norm_case(dtype, (4,), 64, False, label="tiny x", x_scale=1e-3),
        rms_norm_case(dtype, (2,), 64, True, label="tiny x", x_scale=1e-3),
        layer_norm_case(dtype, (4,), 8, True, label="small H"),
        layer_norm_case(dtype, (3,), 16, False, label="small H"),
        layer_norm_case(dtype, (2,), 64, True, label="tiny x", x_scale=1e-3),
        activation_case(dtype, "gelu", (4,), 256, label="tails", x_scale=3.0),
        activation_case(dtype, "silu", (4,), 256, label="tails", x_scale=3.0),
    ]


def _caps(backend: Any, op: str, dtype: torch.dtype) -> List[Any]:
    """The capabilities of the backend's kernels for ``op`` that accept ``dtype``."""
    return [k.capability for k in backend.kernels_for(op) if dtype in getattr(k.capability, "dtypes", ())]


def case_strategy(backend: Any, dtype: torch.dtype):
    """Norms, rotary and activations within the backend's declared capabilities (three draws in four) and
    unconstrained (one in four)."""
    from hypothesis import strategies as st

    lead = st.one_of(st.tuples(st.integers(1, 12)), st.tuples(st.integers(1, 3), st.integers(1, 4)))
    rms, ln = _caps(backend, RMSNorm.name, dtype), _caps(backend, LayerNorm.name, dtype)
    rot = _caps(backend, Rotary.name, dtype)
    gelu = _caps(backend, GeluAndMul.name, dtype)

    def max_h(caps: List[Any]) -> int:
        tops = [c.max_hidden_size for c in caps if getattr(c, "max_hidden_size", None) is not None]
        return min(320, max(tops)) if tops and len(tops) == len(caps) else 320

    @st.composite
    def norm(draw, within: bool) -> OpCase:
        shape = draw(lead)
        if draw(st.booleans()):
            fused_ok = not within or not rms or any(getattr(c, "fused_residual", True) for c in rms)
            h = draw(st.integers(1, max_h(rms) if within else 320))
            return rms_norm_case(dtype, shape, h, draw(st.booleans()) if fused_ok else False,
                                 eps=draw(st.sampled_from([1e-6, 1e-5])))
        bias_ok = not within or not ln or any(getattr(c, "bias", True) for c in ln)
        h = draw(st.integers(1, max_h(ln) if within else 320))
        return layer_norm_case(dtype, shape, h, draw(st.booleans()) if bias_ok else False,
                               eps=draw(st.sampled_from([1e-5, 1e-12])))

    @st.composite
    def rotary(draw, within: bool) -> OpCase:
        cap = draw(st.sampled_from(rot)) if within and rot else None
        sizes = sorted(cap.head_sizes) if cap is not None and cap.head_sizes is not None else None
        d = draw(st.sampled_from(sizes)) if sizes else 2 * draw(st.integers(1, 64))
        r = d if cap is not None and not cap.partial else 2 * draw(st.integers(1, d // 2))
        styles = sorted(cap.styles) if cap is not None else ["neox", "gptj"]
        hkv = draw(st.integers(1, 4))
        hq = hkv * draw(st.integers(1, 4))
        scaling = draw(st.sampled_from([None, RopeScaling("linear", 2.0),
                                        RopeScaling("yarn", 4.0, original_max_position_embeddings=64)]))
        return rotary_case(dtype, draw(st.integers(1, 16)), hq, hkv, d, r, draw(st.sampled_from(styles)),
                           draw(st.integers(1, 128)), base=draw(st.sampled_from([10000.0, 1e6])), scaling=scaling)

    @st.composite
    def activation(draw, within: bool) -> OpCase:
        act = draw(st.sampled_from(["silu", "gelu"]))
        approx = "none"
        if act == "gelu":
            allowed = sorted(set().union(*[c.approximations for c in gelu])) if within and gelu else ["none", "tanh"]
            approx = draw(st.sampled_from(allowed or ["none"]))
        return activation_case(dtype, act, draw(lead), draw(st.integers(1, 200)), approximate=approx,
                               x_scale=draw(st.sampled_from([1.0, 1.0, 3.0])))

    def any_of(within: bool):
        return st.one_of(norm(within), rotary(within), activation(within))

    return st.one_of(any_of(True), any_of(True), any_of(True), any_of(False))
