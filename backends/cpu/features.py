"""What the host CPU can do, detected once; the cpu kernels choose their arithmetic from it.

Half-precision matrix products are fast only where the CPU has the instructions for them (bf16: AVX512-BF16 or
AMX-BF16; fp16: AMX-FP16 or AVX512-FP16). Elsewhere (an AMD EPYC before Zen 4, any AVX2-only CPU) oneDNN runs
them through slow conversion loops: a bf16 paged decode there reached 0.032 of copy bandwidth where float32
reached 0.32. Kernels that multiply half-precision tiles ask :func:`half_matmul_native` and, where it says no,
convert the (small) tiles to float32 first.

``ANYACCEL_CPU_ISA=generic`` makes the detection report a CPU without those instructions (to test and measure
the float32 path on any machine); ``native`` reports them present.
"""
from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from typing import FrozenSet

import torch

__all__ = ["CpuFeatures", "detect", "half_matmul_native"]


@dataclass(frozen=True)
class CpuFeatures:
    """:param flags: the instruction-set flags found (``avx2``, ``avx512f``, ``avx512_bf16``, ``amx_bf16`` ...).
    :param vector: torch's own dispatch level (``torch.backends.cpu.get_cpu_capability()``).
    :param source: where the flags came from (``torch``, ``/proc/cpuinfo``, or the ``ANYACCEL_CPU_ISA`` override)."""

    flags: FrozenSet[str]
    vector: str
    source: str

    @property
    def bf16_native(self) -> bool:
        return bool({"avx512_bf16", "amx_bf16"} & self.flags)

    @property
    def fp16_native(self) -> bool:
        return bool({"avx512_fp16", "amx_fp16"} & self.flags)

    def summary(self) -> str:
        half = [n for n, ok in (("bf16", self.bf16_native), ("fp16", self.fp16_native)) if ok]
        return f"{self.vector}; native half matmul: {', '.join(half) or 'none'} ({self.source})"


def _cpuinfo_flags() -> FrozenSet[str]:
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


@functools.lru_cache(maxsize=None)
def detect() -> CpuFeatures:
    """The host's features (cached); see the module docstring for the ``ANYACCEL_CPU_ISA`` override."""
    vector = str(torch.backends.cpu.get_cpu_capability())
    forced = os.environ.get("ANYACCEL_CPU_ISA", "").strip().lower()
    if forced == "generic":
        return CpuFeatures(frozenset({"avx2"}), vector, "ANYACCEL_CPU_ISA=generic")
    if forced == "native":
        return CpuFeatures(frozenset({"avx512f", "avx512_bf16", "amx_bf16", "amx_fp16"}), vector,
                           "ANYACCEL_CPU_ISA=native")
    flags = set(_cpuinfo_flags())
    source = "/proc/cpuinfo" if flags else "torch"
    probes = (("avx2", "_is_avx2_supported"), ("avx512f", "_is_avx512_supported"),
              ("avx512_bf16", "_is_avx512_bf16_supported"), ("amx_bf16", "_is_amx_tile_supported"),
              ("amx_fp16", "_is_amx_fp16_supported"))
    for flag, probe in probes:  # torch's own probes (private, so optional): they also work off Linux
        fn = getattr(torch.cpu, probe, None)
        try:
            if fn is not None and fn():
                flags.add(flag)
        except Exception:  # noqa: BLE001 - a probe that fails says nothing; /proc/cpuinfo still counts
            pass
    return CpuFeatures(frozenset(flags), vector, source)


def half_matmul_native(dtype: torch.dtype) -> bool:
    """True where ``dtype`` matrix products run on native instructions (always True for float32)."""
    f = detect()
    if dtype == torch.bfloat16:
        return f.bf16_native
    if dtype == torch.float16:
        return f.fp16_native
    return True
