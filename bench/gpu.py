"""GPU benchmark cases of the shared Triton kernels (issue 4), measured in one run on one card.

``bench/ops.py`` calls :func:`run` for a backend whose device is a GPU; each record has the same keys as the
generic op records (kind, case, dtype, measured, baseline, unit, ratio, target, passed, note, error):

- ``gpu_paged_decode``: batch 64, 32 query / 8 kv heads, head size 128, context 4096, bf16. Bytes of K and V
  read / time, over a device-to-device copy's (bytes read + written) / time. Target >= 0.80.
- ``gpu_prefill``: one causal sequence of 16k tokens, 32 query / 8 kv heads, head size 128, bf16, through the paged
  kernel; time / torch SDPA (``is_causal``, k/v expanded to 32 heads so the flash kernel runs). Target <= 1.05.
- ``gpu_gemm``: bf16 GEMM N = K = 4096, M in {1, 16, 128, 1024, 4096}: the per-M ratios and their geometric mean
  of op time / ``torch.matmul`` time. Target <= 1.10 (the geometric mean).
"""
from __future__ import annotations

import math
from typing import Any, Callable, Dict, List, Optional

import torch
import torch.nn.functional as F

from ..core.backend import Backend
from ..core.validation import dtype_name

__all__ = ["GPU_TARGETS", "run"]

GPU_TARGETS = {
    "gpu_paged_decode": (">=", 0.80),
    "gpu_prefill": ("<=", 1.05),
    "gpu_gemm": ("<=", 1.10),
}


def _record(kind: str, case: str, dtype: torch.dtype, measured: Optional[float], baseline: Optional[float],
            unit: str, ratio: Optional[float], note: str = "", error: str = "", gated: bool = True) -> Dict[str, Any]:
    cmp, target = GPU_TARGETS[kind]
    ok = None
    if gated and ratio is not None and not error:
        ok = ratio <= target if cmp == "<=" else ratio >= target
    return {"kind": kind, "case": case, "dtype": dtype_name(dtype), "measured": measured, "baseline": baseline,
            "unit": unit, "ratio": ratio, "target": f"{cmp} {target:g}" if gated else "-", "passed": ok,
            "note": note, "error": error}


def _timers():
    from .ops import time_one, time_pair

    return time_pair, time_one


def _copy_bandwidth(dev: torch.device, nbytes: int) -> float:
    _, time_one = _timers()
    src = torch.empty(nbytes // 2, dtype=torch.bfloat16, device=dev).uniform_()
    dst = torch.empty_like(src)
    t = time_one(lambda: dst.copy_(src), dev, rounds=5, target_s=0.05)
    return 2 * nbytes / t


def bench_decode(backend: Backend, dtype: torch.dtype = torch.bfloat16, s: int = 64, ctx: int = 4096, hq: int = 32,
                 hkv: int = 8, d: int = 128) -> Dict[str, Any]:
    from ..core.attention import Attention, AttentionMetadata, AttentionSpec

    _, time_one = _timers()
    dev = backend.device
    block = backend.block_sizes[0]
    layout = backend.kv_cache_layout
    per_seq = math.ceil(ctx / block)
    nb = s * per_seq + 1
    g = torch.Generator().manual_seed(11)
    shape = (nb, block, hkv, d) if layout == "NHD" else (nb, hkv, block, d)
    k_cache = torch.randn(*shape, device=dev, dtype=dtype)
    v_cache = torch.randn(*shape, device=dev, dtype=dtype)
    block_table = torch.randperm(nb, generator=g)[: s * per_seq].view(s, per_seq).to(dev, torch.int32)
    q = torch.randn(s, hq, d, device=dev, dtype=dtype)
    spec = AttentionSpec(num_heads=hq, num_kv_heads=hkv, head_size=d, dtype=dtype, block_size=block,
                         kv_layout=layout, causal=True)
    op = Attention.build(spec, backend, strict=False)
    meta = AttentionMetadata.build(torch.arange(s + 1, dtype=torch.int32, device=dev),
                                   torch.full((s,), ctx, dtype=torch.int32, device=dev), block_table, block)
    out = torch.empty_like(q)
    t = time_one(lambda: op(q, k_cache, v_cache, meta, out=out), dev, rounds=7, target_s=0.1)
    kv_bytes = 2 * s * ctx * hkv * d * q.element_size()
    copy_bw = _copy_bandwidth(dev, kv_bytes)
    bw = kv_bytes / t
    return _record("gpu_paged_decode", f"decode S={s} ctx={ctx} Hq={hq} Hkv={hkv} D={d} P={block}", dtype,
                   bw / 1e9, copy_bw / 1e9, "GB/s", bw / copy_bw,
                   note=f"kernel {op.selection.chosen}; {t * 1e3:.3f} ms per step; baseline d2d copy of the KV bytes")


def bench_prefill(backend: Backend, dtype: torch.dtype = torch.bfloat16, t: int = 16384, hq: int = 32,
                  hkv: int = 8, d: int = 128) -> Dict[str, Any]:
    from ..core.attention import Attention, AttentionMetadata, AttentionSpec

    time_pair, _ = _timers()
    dev = backend.device
    block = backend.block_sizes[0]
    layout = backend.kv_cache_layout
    nb = math.ceil(t / block)
    q = torch.randn(t, hq, d, device=dev, dtype=dtype)
    k = torch.randn(t, hkv, d, device=dev, dtype=dtype)
    v = torch.randn(t, hkv, d, device=dev, dtype=dtype)
    pad = nb * block - t

    def paged(x):   # [T, Hkv, D] -> the cache layout, blocks in order
        x = F.pad(x, (0, 0, 0, 0, 0, pad)).view(nb, block, hkv, d)
        return x.contiguous() if layout == "NHD" else x.transpose(1, 2).contiguous()

    k_cache, v_cache = paged(k), paged(v)
    spec = AttentionSpec(num_heads=hq, num_kv_heads=hkv, head_size=d, dtype=dtype, block_size=block,
                         kv_layout=layout, causal=True)
    op = Attention.build(spec, backend, strict=False)
    meta = AttentionMetadata.build(torch.tensor([0, t], dtype=torch.int32, device=dev),
                                   torch.tensor([t], dtype=torch.int32, device=dev),
                                   torch.arange(nb, dtype=torch.int32, device=dev).view(1, nb), block)
    out = torch.empty_like(q)
    q4 = q.transpose(0, 1).unsqueeze(0).contiguous()                                       # [1, Hq, T, D]
    k4 = k.repeat_interleave(hq // hkv, dim=1).transpose(0, 1).unsqueeze(0).contiguous()
    v4 = v.repeat_interleave(hq // hkv, dim=1).transpose(0, 1).unsqueeze(0).contiguous()
    ta, tb = time_pair(lambda: op(q, k_cache, v_cache, meta, out=out),
                       lambda: F.scaled_dot_product_attention(q4, k4, v4, is_causal=True), dev, rounds=5,
                       target_s=0.2)
    flops = 4 * t * t * d * hq / 2
    return _record("gpu_prefill", f"prefill T={t} Hq={hq} Hkv={hkv} D={d} causal", dtype, ta * 1e3, tb * 1e3, "ms",
                   ta / tb, note=f"kernel {op.selection.chosen}; {flops / ta / 1e12:.0f} TFLOP/s vs SDPA "
                                 f"{flops / tb / 1e12:.0f}")


def bench_gemm(backend: Backend, dtype: torch.dtype = torch.bfloat16, nk: int = 4096,
               ms=(1, 16, 128, 1024, 4096)) -> List[Dict[str, Any]]:
    from ..core.gemm import Gemm, GemmSpec

    time_pair, _ = _timers()
    dev = backend.device
    w = (torch.randn(nk, nk, device=dev) / nk ** 0.5).to(dtype)
    op = Gemm.build(GemmSpec(dtype=dtype, in_features=nk, out_features=nk), backend, strict=False)
    recs, logs = [], []
    for m in ms:
        x = torch.randn(m, nk, device=dev, dtype=dtype)
        out = torch.empty(m, nk, device=dev, dtype=dtype)
        out_base = torch.empty_like(out)
        ta, tb = time_pair(lambda: op(x, w, None, out=out), lambda: torch.matmul(x, w.t(), out=out_base), dev,
                           rounds=5, target_s=0.05)
        logs.append(math.log(ta / tb))
        recs.append(_record("gpu_gemm", f"gemm M={m} N=K={nk}", dtype, ta * 1e3, tb * 1e3, "ms", ta / tb,
                            note=f"kernel {op.selection.chosen}; baseline torch.matmul", gated=False))
    geo = math.exp(sum(logs) / len(logs))
    recs.append(_record("gpu_gemm", f"gemm geomean M in {list(ms)} N=K={nk}", dtype, None, None, "", geo,
                        note=f"kernel {op.selection.chosen}; geometric mean of the ratios above"))
    return recs


def run(backend: Backend, progress: Optional[Callable[[str], None]] = None) -> List[Dict[str, Any]]:
    """The issue-4 GPU cases on ``backend`` (records; a case that raises becomes a record with ``error``)."""
    say = progress or (lambda msg: None)
    records: List[Dict[str, Any]] = []
    cases = [("gpu_paged_decode", "paged decode (batch 64, ctx 4096)", lambda: [bench_decode(backend)]),
             ("gpu_prefill", "causal prefill (16k tokens)", lambda: [bench_prefill(backend)]),
             ("gpu_gemm", "bf16 GEMM N=K=4096", lambda: bench_gemm(backend))]
    for kind, label, fn in cases:
        say(f"gpu: {label}")
        try:
            records += fn()
        except Exception as e:
            records.append(_record(kind, label, torch.bfloat16, None, None, "", None,
                                   error=f"{type(e).__name__}: {e}".splitlines()[0][:300]))
        if backend.device.type == "cuda":
            torch.cuda.empty_cache()
    return records
