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
from ...core.weight_only import WeightOnlyGemmCapability, WeightOnlyGemmSpec, decompose

_FLOATS = frozenset({torch.float32, torch.float16, torch.bfloat16})
_HALF = frozenset({torch.float16, torch.bfloat16})
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


def _build_int4(spec: WeightOnlyGemmSpec):
    why = _probe("int4")
    if why:
        raise RuntimeError(why)
    dt = spec.dtype

    def prepare(qw):
        dc = decompose(qw)  # w = q * s + o = (q - 8) * s + (o + 8 s): torch's (scale, zero) pair
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(dc.codes.to(torch.int32).contiguous(), 2)
        sz = torch.stack([dc.scale.t(), (dc.offset + 8.0 * dc.scale).t()], dim=-1).to(dt).contiguous()  # [K/G, N, 2]
        return packed, dc.chunk, sz

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


def _build_int8_groups(spec: WeightOnlyGemmSpec):
    dt = spec.dtype

    def prepare(qw):
        dc = decompose(qw)
        n, k = qw.shape
        q = dc.codes.to(torch.int8).reshape(n, k // dc.chunk, dc.chunk).contiguous()
        o = dc.offset.float()[..., None] if bool((dc.offset != 0).any()) else None
        return q, dc.scale.float()[..., None], o

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
                   dtypes=_HALF, formats=_INT4_FORMATS, group_sizes=frozenset({32, 64, 128}), min_n_multiple=16,
                   min_k_multiple=32),
               description="torch _weight_int4pack_mm_for_cpu on a weight tiled once at load (fp16/bf16 "
                           "activations: in float32 it measured 40-80x slower than the float GEMM, so float32 goes "
                           "to int8_groups)"),
    KernelImpl(op="weight_only_gemm", backend="cpu", name="cpu.weight_only_gemm.int8pack", build=_build_int8,
               priority=20, capability=WeightOnlyGemmCapability(
                   dtypes=_FLOATS, formats=frozenset({"int8"}), group_sizes=frozenset({None}), zeros=False),
               description="torch _weight_int8pack_mm (per-channel symmetric int8)"),
    KernelImpl(op="weight_only_gemm", backend="cpu", name="cpu.weight_only_gemm.int8_groups",
               build=_build_int8_groups, priority=10, capability=WeightOnlyGemmCapability(
                   dtypes=_FLOATS, formats=None),
               description="int8 codes + float32 group scales prepared at load; dequantize per call, one matmul"),
]
