"""cpu scaled GEMM: int8 x int8 -> int32 with torch's ``_int_mm`` (oneDNN, VNNI/AMX where the CPU has them).

What the cpu backend declares, and why:

- **int8** (per-tensor or per-channel weights; per-tensor or per-token activations, with or without a zero
  point): ``torch._int_mm`` accumulates exactly in int32, the scales (and the zero-point correction
  ``zero[m] * sum_k w_q[n, k]``, summed once at build) are applied in float32.
- **fp8: not declared.** torch's CPU ``_scaled_mm`` takes e4m3fn (not e4m3fnuz), but it emulates: measured on this
  session's Xeon (AVX-512, AMX-BF16) at N = K = 4096, M = 1, it took about 100x the time of a bf16 linear
  (``python -m anyaccel bench scaled-gemm`` prints the figure on the machine at hand). fp8 checkpoints still run
  on cpu through the core's recorded fallback (dequantize, float32 GEMM).

Weights are prepared once (:meth:`ScaledGemm.prepare`): the transposed int8 weight ``[K, N]`` that
``_int_mm`` takes, and its column sums for the zero point.
"""
from __future__ import annotations

import torch

from ...core.dispatch import KernelImpl
from ...core.scaled_gemm import QuantizeActivation, QuantizeCapability, ScaledGemmCapability, ScaledGemmSpec

__all__ = ["KERNELS", "CPU_REFUSALS"]

_FLOATS = frozenset({torch.float32, torch.float16, torch.bfloat16})

#: why the cpu backend refuses what it does not declare (shown by ``anyaccel explain``)
CPU_REFUSALS = tuple((s, f"{s} on cpu: torch's CPU fp8 GEMM is emulated, about 100x slower than a bf16 linear "
                         "(measured at M=1, N=K=4096); the core's fallback dequantizes instead")
                     for s in ("fp8_e4m3fn", "fp8_e4m3fnuz")) + (
    ("block", "block-wise scales are an fp8 feature; cpu declares int8 only"),
    ("group", "group (1 x B) activation scales go with fp8 block weights; cpu declares int8 only"))


def _build(spec: ScaledGemmSpec):
    asym = not spec.act_symmetric

    def prepare(wq_NK, w_scale):
        return (wq_NK.t().contiguous(),                              # [K, N] contiguous, what _int_mm takes
                wq_NK.sum(dim=1, dtype=torch.int32) if asym else None)  # zero-point correction, per column

    def scaled_gemm_int8(xq_MK, x_scale, x_zero, wq_NK, w_scale, prepared, bias_N, out_MN):
        w_KN, wsum_N = prepared
        acc = torch._int_mm(xq_MK, w_KN)                            # [M, N] int32, exact
        if x_zero is not None:
            acc -= x_zero.reshape(-1, 1) * wsum_N
        y = acc.float()
        y *= x_scale.reshape(-1, 1) if x_scale.numel() > 1 else x_scale
        y *= w_scale.reshape(1, -1) if w_scale.numel() > 1 else w_scale
        if bias_N is not None:
            y += bias_N.float()
        return out_MN.copy_(y)

    scaled_gemm_int8.prepare = prepare
    return scaled_gemm_int8


KERNELS = [
    KernelImpl(op="scaled_gemm", backend="cpu", name="cpu.scaled_gemm.int_mm", build=_build, priority=10,
               capability=ScaledGemmCapability(dtypes=_FLOATS, schemes=frozenset({"int8"}),
                                               weight_granularities=frozenset({"tensor", "channel"}),
                                               act_granularities=frozenset({"tensor", "token"}), asymmetric=True,
                                               refusals=CPU_REFUSALS),
               description="int8 x int8 -> int32 with torch._int_mm (oneDNN), scales and zero point in float32"),
    # the quantize op is a few elementwise passes: on cpu the core's torch implementation is the kernel (declared,
    # so strict mode accepts it); fp8 quantization is cheap here, only the fp8 GEMM is not
    KernelImpl(op="quantize_activation", backend="cpu", name="cpu.quantize_activation.torch",
               build=QuantizeActivation.native, priority=10, capability=QuantizeCapability(dtypes=_FLOATS),
               description="dynamic activation quantize in torch (amax, scale, round, cast)"),
]
