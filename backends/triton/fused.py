"""Small fused ops in Triton: rms_norm (optionally with the residual add fused), layer_norm, rotary embedding
(neox and gptj styles) and gated activations; shared by cuda, rocm and the interpreter tier.

Shape legend: R rows (tokens, flattened over leading dims), H hidden size, T tokens, Hn heads, D head size,
d half of the gated input. Every loaded tile is upcast to float32; results are cast once on store.
"""
from __future__ import annotations

from typing import Callable

import torch
import triton.language as tl

from .runtime import cdiv, compile_kernel, next_power_of_2
from .tuning import TritonTuning

__all__ = [
    "rms_norm_kernel", "layer_norm_kernel", "rotary_kernel", "gated_activation_kernel",
    "build_rms_norm", "build_layer_norm", "build_rotary", "build_gated_activation", "ACTIVATIONS",
]


def rms_norm_kernel(
    x_ptr, w_ptr, res_ptr, out_ptr, res_out_ptr,     # x/res/out/res_out [R, H], w [H]
    n_rows, H, stride_x, stride_r, stride_o, stride_ro, eps,
    HAS_RESIDUAL: tl.constexpr, BLOCK_H: tl.constexpr, ROWS: tl.constexpr,
):
    r = tl.program_id(0) * ROWS + tl.arange(0, ROWS)                 # [R]
    c = tl.arange(0, BLOCK_H)                                        # [H_PAD]
    r64 = r.to(tl.int64)
    mask = (r < n_rows)[:, None] & (c < H)[None, :]
    x_RH = tl.load(x_ptr + r64[:, None] * stride_x + c[None, :], mask=mask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        s_RH = x_RH + tl.load(res_ptr + r64[:, None] * stride_r + c[None, :], mask=mask, other=0.0).to(tl.float32)
        s_RH = s_RH.to(res_out_ptr.dtype.element_ty)
        tl.store(res_out_ptr + r64[:, None] * stride_ro + c[None, :], s_RH, mask=mask)
        x_RH = s_RH.to(tl.float32)                  # normalise what the next layer will see as the residual
    w_H = tl.load(w_ptr + c, mask=c < H, other=0.0).to(tl.float32)
    rstd_R = 1.0 / tl.sqrt(tl.sum(x_RH * x_RH, axis=1) / H + eps)
    y_RH = x_RH * rstd_R[:, None] * w_H[None, :]
    tl.store(out_ptr + r64[:, None] * stride_o + c[None, :], y_RH.to(out_ptr.dtype.element_ty), mask=mask)


def layer_norm_kernel(
    x_ptr, w_ptr, b_ptr, out_ptr,                    # x/out [R, H], w/b [H]
    n_rows, H, stride_x, stride_o, eps,
    HAS_BIAS: tl.constexpr, BLOCK_H: tl.constexpr, ROWS: tl.constexpr,
):
    r = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    c = tl.arange(0, BLOCK_H)
    r64 = r.to(tl.int64)
    c_ok = c < H
    mask = (r < n_rows)[:, None] & c_ok[None, :]
    x_RH = tl.load(x_ptr + r64[:, None] * stride_x + c[None, :], mask=mask, other=0.0).to(tl.float32)
    mean_R = tl.sum(x_RH, axis=1) / H
    xc_RH = tl.where(c_ok[None, :], x_RH - mean_R[:, None], 0.0)
    rstd_R = 1.0 / tl.sqrt(tl.sum(xc_RH * xc_RH, axis=1) / H + eps)
    y_RH = xc_RH * rstd_R[:, None] * tl.load(w_ptr + c, mask=c_ok, other=0.0).to(tl.float32)[None, :]
    if HAS_BIAS:
        y_RH = y_RH + tl.load(b_ptr + c, mask=c_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(out_ptr + r64[:, None] * stride_o + c[None, :], y_RH.to(out_ptr.dtype.element_ty), mask=mask)


def rotary_kernel(
    pos_ptr, x_ptr, cache_ptr, out_ptr,              # positions [T], x/out [T, Hn, D], cache [max_pos, rot]
    n_rows, num_heads, stride_xt, stride_xh, stride_ot, stride_oh, stride_c,
    HALF: tl.constexpr, HALF_PAD: tl.constexpr, HEAD: tl.constexpr, ROT: tl.constexpr, PASS_PAD: tl.constexpr,
    IS_NEOX: tl.constexpr, ROWS: tl.constexpr,
):
    r = tl.program_id(0) * ROWS + tl.arange(0, ROWS)                 # [R] row = token * Hn + head
    r_ok = r < n_rows
    t = (r // num_heads).to(tl.int64)
    h = r % num_heads
    pos = tl.load(pos_ptr + t, mask=r_ok, other=0).to(tl.int64)
    i = tl.arange(0, HALF_PAD)                                       # [I] rotated pair index
    mask = r_ok[:, None] & (i < HALF)[None, :]
    cos_RI = tl.load(cache_ptr + pos[:, None] * stride_c + i[None, :], mask=mask, other=0.0)
    sin_RI = tl.load(cache_ptr + pos[:, None] * stride_c + HALF + i[None, :], mask=mask, other=0.0)
    if IS_NEOX:
        c1 = i
        c2 = i + HALF
    else:
        c1 = 2 * i
        c2 = 2 * i + 1
    xb = x_ptr + t * stride_xt + h * stride_xh                       # [R] row bases
    ob = out_ptr + t * stride_ot + h * stride_oh
    x1 = tl.load(xb[:, None] + c1[None, :], mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(xb[:, None] + c2[None, :], mask=mask, other=0.0).to(tl.float32)
    if ROT < HEAD:
        p = ROT + tl.arange(0, PASS_PAD)                             # dims past rotary_dim pass through
        p_mask = r_ok[:, None] & (p < HEAD)[None, :]
        passed = tl.load(xb[:, None] + p[None, :], mask=p_mask, other=0.0)
        tl.store(ob[:, None] + p[None, :], passed.to(out_ptr.dtype.element_ty), mask=p_mask)
    tl.store(ob[:, None] + c1[None, :], (x1 * cos_RI - x2 * sin_RI).to(out_ptr.dtype.element_ty), mask=mask)
    tl.store(ob[:, None] + c2[None, :], (x2 * cos_RI + x1 * sin_RI).to(out_ptr.dtype.element_ty), mask=mask)


#: activation codes of :func:`gated_activation_kernel`
ACTIVATIONS = {"silu": 0, "gelu": 1, "gelu_tanh": 2}


def gated_activation_kernel(
    x_ptr, out_ptr,                                  # x [R, 2d], out [R, d]
    n_rows, d, stride_x, stride_o,
    ACT: tl.constexpr, ROWS: tl.constexpr, BLOCK_D: tl.constexpr,
):
    r = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    c = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    r64 = r.to(tl.int64)
    mask = (r < n_rows)[:, None] & (c < d)[None, :]
    a = tl.load(x_ptr + r64[:, None] * stride_x + c[None, :], mask=mask, other=0.0).to(tl.float32)
    b = tl.load(x_ptr + r64[:, None] * stride_x + d + c[None, :], mask=mask, other=0.0).to(tl.float32)
    if ACT == 0:
        g = a / (1.0 + tl.exp(-a))                                   # silu
    elif ACT == 1:
        g = 0.5 * a * (1.0 + tl.math.erf(a * 0.7071067811865476))    # exact gelu
    else:
        z = 0.7978845608028654 * (a + 0.044715 * a * a * a)          # 0.5 a (1 + tanh z) = a * sigmoid(2z)
        g = a / (1.0 + tl.exp(-2.0 * z))
    tl.store(out_ptr + r64[:, None] * stride_o + c[None, :], (g * b).to(out_ptr.dtype.element_ty), mask=mask)


# ---------------------------------------------------------------------------------------------------------------
# Launchers: kernel(...) callables following the core's kernel contracts.
# ---------------------------------------------------------------------------------------------------------------

def _rows(t: torch.Tensor, width: int):
    """A 2-d [R, width] view with unit last stride, and whether it aliases ``t`` (else it is a copy)."""
    if t.stride(-1) == 1:
        try:
            return t.view(-1, width), True
        except RuntimeError:
            pass
    return t.reshape(-1, width).contiguous(), False


def _rows_per_program(tuning: TritonTuning, n_rows: int, width_pad: int) -> int:
    # cap a tile's elements (register pressure on a GPU); the interpreter tier asks for many rows
    cap = max(1, tuning.max_tile_elements // width_pad)
    return max(1, min(tuning.rows_per_program, _batch_rows(tuning, n_rows), next_power_of_2(cap)))


def _batch_rows(tuning: TritonTuning, n_rows: int) -> int:
    """The row count's say in the rows per program: none in a batch-invariant tuning (a fixed tile shape)."""
    return 1 << 30 if tuning.batch_invariant else next_power_of_2(n_rows)


def _norm_warps(tuning: TritonTuning, block_h: int) -> int:
    # one row per program on a GPU: more warps for wide rows (8k wide: 8 warps), at least the tuning's
    return max(tuning.norm_num_warps, min(16, block_h // 1024))


def build_rms_norm(spec, tuning: TritonTuning, interpret: bool) -> Callable:
    """``kernel(x, weight, residual, out, residual_out)``: returns ``out``, or ``(out, residual_out)`` if fused."""
    kern = compile_kernel(rms_norm_kernel, interpret)
    eps = float(spec.eps)
    H = spec.hidden_size
    block_h = next_power_of_2(H)
    opts = dict(tuning.launch_options)

    def rms_norm(x, weight, residual, out, residual_out):
        x2, _ = _rows(x, H)
        n = x2.shape[0]
        o2, o_alias = _rows(out, H)
        has_res = residual is not None
        if has_res:
            r2, _ = _rows(residual, H)
            ro2, ro_alias = _rows(residual_out, H)
        else:
            r2, ro2, ro_alias = x2, o2, True
        if n:
            rows = _rows_per_program(tuning, n, block_h)
            kern[(cdiv(n, rows),)](
                x2, weight, r2, o2, ro2, n, H, x2.stride(0), r2.stride(0), o2.stride(0), ro2.stride(0), eps,
                HAS_RESIDUAL=has_res, BLOCK_H=block_h, ROWS=rows, num_warps=_norm_warps(tuning, block_h), **opts)
        if not o_alias:
            out.copy_(o2.view(out.shape))
        if has_res:
            if not ro_alias:
                residual_out.copy_(ro2.view(residual_out.shape))
            return out, residual_out
        return out

    return rms_norm


def build_layer_norm(spec, tuning: TritonTuning, interpret: bool) -> Callable:
    """``kernel(x, weight, bias, out) -> out``."""
    kern = compile_kernel(layer_norm_kernel, interpret)
    eps = float(spec.eps)
    H = spec.hidden_size
    block_h = next_power_of_2(H)
    opts = dict(tuning.launch_options)

    def layer_norm(x, weight, bias, out):
        x2, _ = _rows(x, H)
        o2, o_alias = _rows(out, H)
        n = x2.shape[0]
        if n:
            rows = _rows_per_program(tuning, n, block_h)
            kern[(cdiv(n, rows),)](
                x2, weight, bias if bias is not None else weight, o2, n, H, x2.stride(0), o2.stride(0), eps,
                HAS_BIAS=bias is not None, BLOCK_H=block_h, ROWS=rows, num_warps=_norm_warps(tuning, block_h),
                **opts)
        if not o_alias:
            out.copy_(o2.view(out.shape))
        return out

    return layer_norm


def build_rotary(spec, tuning: TritonTuning, interpret: bool) -> Callable:
    """``kernel(positions, q, k, cos_sin_cache, q_out, k_out) -> (q_out, k_out)``."""
    kern = compile_kernel(rotary_kernel, interpret)
    D = spec.head_size
    rot = spec.rotary_dim if spec.rotary_dim is not None else D
    half = rot // 2
    is_neox = getattr(spec, "style", "neox") == "neox"
    opts = dict(tuning.launch_options)

    def apply(positions, x, cache, out):
        T, heads = x.shape[0], x.shape[1]
        n = T * heads
        if n == 0:
            return out
        src = x if x.stride(-1) == 1 else x.contiguous()
        dst = out if out.stride(-1) == 1 else torch.empty_like(out, memory_format=torch.contiguous_format)
        rows = max(1, min(tuning.rotary_rows_per_program, _batch_rows(tuning, n)))
        kern[(cdiv(n, rows),)](
            positions, src, cache, dst, n, heads, src.stride(0), src.stride(1), dst.stride(0), dst.stride(1),
            cache.stride(0), HALF=half, HALF_PAD=next_power_of_2(half), HEAD=D, ROT=rot,
            PASS_PAD=next_power_of_2(max(D - rot, 1)), IS_NEOX=is_neox, ROWS=rows,
            num_warps=tuning.elementwise_num_warps, **opts)
        if dst is not out:
            out.copy_(dst)
        return out

    def rotary(positions, q, k, cos_sin_cache, q_out, k_out):
        apply(positions, q, cos_sin_cache, q_out)
        if k is not None:
            apply(positions, k, cos_sin_cache, k_out)
        return q_out, k_out

    return rotary


def build_gated_activation(spec, tuning: TritonTuning, interpret: bool, kind: str) -> Callable:
    """``kernel(x, out) -> out`` for ``kind`` in ``"silu"``, ``"gelu"`` (approximate from the spec)."""
    if kind == "gelu" and getattr(spec, "approximate", "none") == "tanh":
        kind = "gelu_tanh"
    act = ACTIVATIONS[kind]
    kern = compile_kernel(gated_activation_kernel, interpret)
    opts = dict(tuning.launch_options)

    def gated(x, out):
        d = x.shape[-1] // 2
        x2, _ = _rows(x, 2 * d)
        o2, o_alias = _rows(out, d)
        n = x2.shape[0]
        if n and d:
            block_d = min(next_power_of_2(d), tuning.elementwise_block)
            rows = max(1, min(tuning.rows_per_program, _batch_rows(tuning, n),
                              max(1, tuning.elementwise_block // block_d)))
            kern[(cdiv(n, rows), cdiv(d, block_d))](
                x2, o2, n, d, x2.stride(0), o2.stride(0), ACT=act, ROWS=rows, BLOCK_D=block_d,
                num_warps=tuning.elementwise_num_warps, **opts)
        if not o_alias:
            out.copy_(o2.view(out.shape))
        return out

    return gated
