"""Scaled GEMM (w8a8) on cpu against a bf16 linear, measured in one run (a section for ``anyaccel bench quant``).

For each shape (N = K = 4096 and SmolLM2-135M's projections, 576 -> 1536 and 1536 -> 576) and each M in
{1, 16, 128}:

- **int8 GEMM**: the built ``scaled_gemm`` op (int8 per-token x per-channel, bf16 out) on activations already
  quantized -- time of ``torch.nn.functional.linear`` in bf16 / time of the op (> 1: int8 is faster);
- **int8 dynamic**: the ``quantize_activation`` op plus the GEMM, what a W8A8 layer costs per call -- same ratio;
- **fp8 (the cpu decision)**: torch's CPU ``_scaled_mm`` on e4m3fn at M = 1 -- same ratio; it is why the cpu
  backend declares no fp8 kernel (the fp8 cases fall back to the core's dequantizing path).

Timings use :func:`anyaccel.bench.ops.time_pair` (interleaved rounds, minimum per call), so a ratio compares two
things measured in the same minutes of the same machine. Run ``python -m anyaccel.bench.scaled_gemm [--quick]``.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from ..core.scaled_gemm import QuantizeActivation, QuantizeSpec, ScaledGemm, ScaledGemmSpec, quantize_weight
from .ops import time_pair

__all__ = ["SHAPES", "run", "render", "main"]

#: (label, N, K)
SHAPES: Tuple[Tuple[str, int, int], ...] = (("4096x4096", 4096, 4096), ("smollm2 up 576->1536", 1536, 576),
                                            ("smollm2 down 1536->576", 576, 1536))


def _cpu_backend():
    from ..plugins import discover

    return discover().backends["cpu"]


def run(quick: bool = False, fp8: bool = True, backend: Any = None) -> List[Dict[str, Any]]:
    backend = backend or _cpu_backend()
    dev = backend.device
    ms = (1, 16) if quick else (1, 16, 128)
    shapes = ((SHAPES[1][0], 256, 128),) if quick else SHAPES
    rounds, target = (2, 0.003) if quick else (7, 0.05)
    out: List[Dict[str, Any]] = []
    g = torch.Generator().manual_seed(0)
    for label, n, k in shapes:
        w = torch.randn(n, k, generator=g) / k ** 0.5
        wb = w.bfloat16().to(dev)
        wq, ws = (t.to(dev) for t in quantize_weight(w, "int8", "channel"))
        spec = ScaledGemmSpec(torch.bfloat16, "int8", "channel", "token", in_features=k, out_features=n)
        op = ScaledGemm.build(spec, backend)
        quant = QuantizeActivation.build(QuantizeSpec(torch.bfloat16, "int8", "token"), backend)
        prep = op.prepare(wq, ws)
        for m in ms:
            xb = torch.randn(m, k, generator=g).bfloat16().to(dev)
            xq, xs, _ = quant(xb)
            yo = torch.empty(m, n, dtype=torch.bfloat16, device=dev)
            t_op, t_lin = time_pair(lambda: op(xq, xs, wq, ws, None, None, prep, out=yo),
                                    lambda: F.linear(xb, wb), dev, rounds=rounds, target_s=target)
            out.append(_rec("int8 GEMM", label, m, n, k, t_op, t_lin, op.selection.chosen))

            def dyn():
                a, s, _ = quant(xb)
                return op(a, s, wq, ws, None, None, prep, out=yo)

            t_dyn, t_lin = time_pair(dyn, lambda: F.linear(xb, wb), dev, rounds=rounds, target_s=target)
            out.append(_rec("int8 dynamic (quantize + GEMM)", label, m, n, k, t_dyn, t_lin, op.selection.chosen))
    if fp8 and dev.type == "cpu":
        label, n, k = ("256x256", 256, 256) if quick else SHAPES[0]
        w = torch.randn(n, k, generator=g)
        w8, one = w.to(torch.float8_e4m3fn), torch.tensor(1.0)
        x = torch.randn(1, k, generator=g)
        x8, xb, wb = x.to(torch.float8_e4m3fn), x.bfloat16(), w.bfloat16()
        try:
            t8, tl = time_pair(lambda: torch._scaled_mm(x8, w8.t(), one, one, out_dtype=torch.bfloat16),
                               lambda: F.linear(xb, wb), dev, rounds=min(rounds, 3), target_s=target)
            out.append(_rec("fp8 e4m3fn torch._scaled_mm (cpu)", label, 1, n, k, t8, tl, "torch._scaled_mm"))
        except Exception as e:  # a torch without a CPU fp8 GEMM: say so
            out.append({"case": "fp8 e4m3fn torch._scaled_mm (cpu)", "shape": label, "M": 1, "error": str(e)})
    return out


def _rec(case: str, label: str, m: int, n: int, k: int, t: float, t_base: float, kernel: str) -> Dict[str, Any]:
    return {"case": case, "shape": label, "M": m, "N": n, "K": k, "seconds": t, "bf16_linear_seconds": t_base,
            "speedup_vs_bf16": t_base / t if t > 0 else None, "kernel": kernel, "error": ""}


def environment() -> Dict[str, Any]:
    flags = ""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((ln for ln in f if ln.startswith("flags")), "")
    except OSError:
        pass
    isa = sorted({f for f in flags.split() if f.startswith(("avx512_vnni", "avx512_bf16", "amx", "avx_vnni"))})
    return {"cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
            "cpu_count": os.cpu_count(), "isa": isa, "torch": torch.__version__}


def render(records: Sequence[Dict[str, Any]]) -> str:
    lines = [f"{'case':<34} {'shape':<24} {'M':>4} {'ms':>9} {'bf16 ms':>9} {'x bf16':>7}  kernel"]
    for r in records:
        if r.get("error"):
            lines.append(f"{r['case']:<34} {r['shape']:<24} {r['M']:>4}  error: {r['error'][:80]}")
            continue
        lines.append(f"{r['case']:<34} {r['shape']:<24} {r['M']:>4} {r['seconds'] * 1e3:>9.3f} "
                     f"{r['bf16_linear_seconds'] * 1e3:>9.3f} {r['speedup_vs_bf16']:>7.2f}  {r['kernel']}")
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m anyaccel.bench.scaled_gemm", description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny shapes (a smoke run; the ratios mean little)")
    p.add_argument("--no-fp8", action="store_true", help="skip the fp8 _scaled_mm measurement (it is slow)")
    p.add_argument("--json", help="also write the records and the environment to this file")
    a = p.parse_args(argv)
    recs = run(quick=a.quick, fp8=not a.no_fp8)
    print(render(recs))
    env = environment()
    print(f"environment: {env} (ratios: bf16 linear time / candidate time, same run, interleaved)")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"environment": env, "records": recs}, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
