"""cpu weight-only GEMM: torch's packed CPU kernels where the format maps onto them exactly, else int8 + scales.

- ``cpu.weight_only_gemm.int4pack``: int4 (any group 32/64/128, zero points), Q4_0, Q4_1 and Q4_K are all
  ``w = (q - 8) * s + z`` per 32..128-element group, which is what ``_weight_int4pack_mm_for_cpu`` computes; the
  weight is converted once to its tiled layout and the scale/offset pairs to the activation dtype (the one
  rounding mid-way the contract allows).
- ``cpu.weight_only_gemm.int8pack``: per-channel symmetric int8 through ``_weight_int8pack_mm``.
- ``cpu.weight_only_gemm.int8_groups``: every format (the only one for grouped int8, Q8_0, Q6_K, and for shapes
  the packed kernels refuse) prepared once as int8 codes plus float32 scales and offsets per group; each call
  dequantizes to the activation dtype and runs one matmul.
The two torch kernels are detected by calling them once on a tiny input (a build that fails is recorded by
selection and the next candidate serves).
"""
from __future__ import annotations

import functools

import torch

from ...core.dispatch import KernelImpl
from ...core.weight_only import WEIGHT_FORMATS, WeightOnlyGemmCapability, WeightOnlyGemmSpec, dequantize_gguf_blocks
from ...core.weight_only import _f16  # the core's float16 reader: one home for the byte layout

_FLOATS = frozenset({torch.float32, torch.float16, torch.bfloat16})
_INT4_FORMATS = frozenset({"int4", "q4_0", "q4_1", "q4_k"})


@functools.lru_cache(maxsize=None)
def _probe(which: str) -> str:
    """'' when torch's ``which`` kernel runs here, else why not (checked once per process)."""
    try:
        if which == "int4":
            p = torch.ops.aten._convert_weight_to_int4pack_for_cpu(torch.zeros(16, 32, dtype=torch.int32), 2)
            torch.ops.aten._weight_int4pack_mm_for_cpu(torch.zeros(1, 32), p, 32, torch.zeros(1, 16, 2))
        else:
            torch.ops.aten._weight_int8pack_mm(torch.zeros(1, 32), torch.zeros(16, 32, dtype=torch.int8),
                                               torch.ones(16))
        return ""
    except (AttributeError, RuntimeError) as e:
        return f"torch {torch.__version__} cannot run its {which} packed CPU kernel: {e}"


def _int4_codes_scales_offsets(qw):
    """(codes [N, K] in 0..15, scale [N, K/G], offset [N, K/G] float64, G) with ``w = (q - 8) * scale + offset``."""
    n, k = qw.shape
    if qw.format == "int4":
        d = qw.data
        q = torch.stack([d & 0x0F, d >> 4], dim=-1).reshape(n, k)
        s = qw.scales.double()
        z = torch.zeros_like(s) if qw.zeros is None else (8.0 - qw.zeros.double()) * s
        return q, s, z, (k if qw.group_size is None else qw.group_size)
    b = qw.data.reshape(n, -1, WEIGHT_FORMATS[qw.format].block_bytes)
    if qw.format == "q4_0":
        s = _f16(b[..., 0:2])
        q = torch.cat([b[..., 2:18] & 0x0F, b[..., 2:18] >> 4], -1)
        return q.reshape(n, k), s, torch.zeros_like(s), 32
    if qw.format == "q4_1":
        s, m = _f16(b[..., 0:2]), _f16(b[..., 2:4])
        q = torch.cat([b[..., 4:20] & 0x0F, b[..., 4:20] >> 4], -1)
        return q.reshape(n, k), s, m + 8.0 * s, 32
    # q4_k: each 32-element sub-block's scale and offset from the exact dequantization of all-0 and all-1 codes
    qs = b[..., 16:144].reshape(n, -1, 4, 32)
    q = torch.stack([qs & 0x0F, qs >> 4], dim=3).reshape(n, k)
    hdr = b.clone()
    hdr[..., 16:144] = 0x00
    lo = dequantize_gguf_blocks("q4_k", hdr.reshape(n, -1)).reshape(n, -1, 32)[..., 0]  # -dmin * m
    hdr[..., 16:144] = 0x11
    hi = dequantize_gguf_blocks("q4_k", hdr.reshape(n, -1)).reshape(n, -1, 32)[..., 0]  # d * sc - dmin * m
    s = hi - lo
    return q, s, lo + 8.0 * s, 32


def _build_int4(spec: WeightOnlyGemmSpec):
    why = _probe("int4")
    if why:
        raise RuntimeError(why)
    dt = spec.dtype

    def prepare(qw):
        q, s, z, g = _int4_codes_scales_offsets(qw)
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.to(torch.int32).contiguous(), 2)
        sz = torch.stack([s.t(), z.t()], dim=-1).to(dt).contiguous()  # [K/G, N, 2]
        return packed, g, sz

    def weight_only_gemm_int4pack(x_MK, packed, bias_N, out_MN):
        w, g, sz = packed
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(x_MK, w, g, sz)
        if bias_N is not None:
            y += bias_N
        return out_MN.copy_(y)

    weight_only_gemm_int4pack.prepare = prepare
    weight_only_gemm_int4pack.layout = "cpu.int4pack"
    return weight_only_gemm_int4pack


def _build_int8(spec: WeightOnlyGemmSpec):
    why = _probe("int8")
    if why:
        raise RuntimeError(why)
    dt = spec.dtype

    def prepare(qw):
        return qw.data, qw.scales.reshape(-1).to(dt).contiguous()

    def weight_only_gemm_int8pack(x_MK, packed, bias_N, out_MN):
        q, s = packed
        y = torch.ops.aten._weight_int8pack_mm(x_MK, q, s)
        if bias_N is not None:
            y += bias_N
        return out_MN.copy_(y)

    weight_only_gemm_int8pack.prepare = prepare
    weight_only_gemm_int8pack.layout = "cpu.int8pack"
    return weight_only_gemm_int8pack


def _int8_codes(qw):
    """(codes [N, K/G, G] int8, scale [N, K/G, 1], offset [N, K/G, 1] float32 or None): ``w = q * s + o``."""
    n, k = qw.shape
    if qw.format == "int8":
        g = k if qw.group_size is None else qw.group_size
        s = qw.scales.double()
        o = None if qw.zeros is None else -qw.zeros.double() * s
        q = qw.data.reshape(n, k // g, g)
    elif qw.format == "q8_0":
        b = qw.data.reshape(n, -1, 34)
        s = _f16(b[..., 0:2])
        q, o = b[..., 2:34].contiguous().view(torch.int8), None
    elif qw.format in _INT4_FORMATS:
        q4, s, z, g = _int4_codes_scales_offsets(qw)
        q = (q4.to(torch.int16) - 8).to(torch.int8).reshape(n, k // g, g)
        o = z
    else:  # q6_k: codes 0..63 - 32 and d * scale per 16-element sub-block
        b = qw.data.reshape(n, -1, 210)
        hdr = b.clone()
        hdr[..., 0:192] = 0
        # with every 6-bit code zero, each value is -32 * d * sc: the sub-block scale, exactly
        s = dequantize_gguf_blocks("q6_k", hdr.reshape(n, -1)).reshape(n, -1, 16)[..., 0] / -32.0
        w = dequantize_gguf_blocks("q6_k", qw.data).reshape(n, -1, 16)
        safe = torch.where(s == 0, torch.ones_like(s), s)
        q = torch.where(s[..., None] == 0, torch.zeros_like(w), w / safe[..., None]).round().to(torch.int8)
        o = None
    return q.contiguous(), s.float()[..., None], (None if o is None else o.float()[..., None])


def _build_int8_groups(spec: WeightOnlyGemmSpec):
    dt = spec.dtype

    def prepare(qw):
        return _int8_codes(qw)

    def weight_only_gemm_int8_groups(x_MK, packed, bias_N, out_MN):
        q, s, o = packed
        w = q.to(torch.float32).mul_(s)
        if o is not None:
            w += o
        w_NK = w.reshape(q.shape[0], -1).to(dt)
        if bias_N is None:
            return torch.mm(x_MK, w_NK.t(), out=out_MN)
        return torch.addmm(bias_N, x_MK, w_NK.t(), out=out_MN)

    weight_only_gemm_int8_groups.prepare = prepare
    weight_only_gemm_int8_groups.layout = "cpu.int8_groups"
    return weight_only_gemm_int8_groups


KERNELS = [
    KernelImpl(op="weight_only_gemm", backend="cpu", name="cpu.weight_only_gemm.int4pack", build=_build_int4,
               priority=20, capability=WeightOnlyGemmCapability(
                   dtypes=_FLOATS, formats=_INT4_FORMATS, group_sizes=frozenset({32, 64, 128}), min_n_multiple=16,
                   min_k_multiple=32),
               description="torch _weight_int4pack_mm_for_cpu on a weight tiled once at load"),
    KernelImpl(op="weight_only_gemm", backend="cpu", name="cpu.weight_only_gemm.int8pack", build=_build_int8,
               priority=20, capability=WeightOnlyGemmCapability(
                   dtypes=_FLOATS, formats=frozenset({"int8"}), group_sizes=frozenset({None}), zeros=False),
               description="torch _weight_int8pack_mm (per-channel symmetric int8)"),
    KernelImpl(op="weight_only_gemm", backend="cpu", name="cpu.weight_only_gemm.int8_groups",
               build=_build_int8_groups, priority=10, capability=WeightOnlyGemmCapability(
                   dtypes=_FLOATS, formats=None),
               description="int8 codes + float32 group scales prepared at load; dequantize per call, one matmul"),
]
