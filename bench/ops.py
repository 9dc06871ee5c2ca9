"""``anyaccel bench ops``: each op kernel against its obvious baseline, measured in the same run.

For every dtype (float32 and bfloat16 by default), on the chosen backend:

(a) **attention prefill** -- one sequence of 2048 tokens, 8 heads, head size 64 and 128, causal, through the
    core's paged ``Attention`` op -- time / torch SDPA (``is_causal=True``) on the same q/k/v.
    Target <= 1.10.
(b) **paged decode** -- 8 sequences of 2048 context, Hq 32 / Hkv 8, D 128, a random block table, the backend's
    preferred block size -- effective bandwidth (K + V bytes read / time) over raw copy bandwidth
    ((bytes read + written) / time of ``dst.copy_(src)`` on a ~256 MB tensor). Target >= 0.5.
(c) **dense GEMM** -- M in {1, 16, 512, 2048}, N = K = 4096 -- ``Gemm`` op time / ``torch.matmul`` time.
    Target <= 1.05.
(d) **dispatch overhead** -- a tiny GEMM with ``out=`` preallocated: (time of calling the built op - time of
    calling its kernel directly) per call, in microseconds. Target <= 1.5 us.

The timer warms up, sizes each measurement to a fixed wall time, repeats several rounds alternating which of
candidate and baseline goes first (so slow drift on a busy machine hits both alike), and keeps the minimum per
call of each: noise only ever adds time. ``--quick`` shrinks every shape (a smoke run: the ratios are printed but
mean little).
"""
from __future__ import annotations

import math
import platform
import time
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from ..core.backend import Backend
from ..core.validation import dtype_name

__all__ = ["TARGETS", "time_pair", "time_one", "run", "render", "environment"]

#: case kind -> (comparison, target)
TARGETS = {
    "attention_prefill": ("<=", 1.10),
    "paged_decode": (">=", 0.5),
    "gemm": ("<=", 1.05),
    "dispatch_overhead": ("<=", 1.5),
}

Progress = Optional[Callable[[str], None]]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()
    elif device.type not in ("cpu", "meta"):
        mod = getattr(torch, device.type, None)
        if mod is not None and hasattr(mod, "synchronize"):
            mod.synchronize()


def _per_call(fn: Callable[[], Any], n: int, device: torch.device) -> float:
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    _sync(device)
    return (time.perf_counter() - t0) / n


def _calibrate(fn: Callable[[], Any], target_s: float, device: torch.device, max_n: int = 1_000_000) -> int:
    n = 1
    while True:
        t = _per_call(fn, n, device) * n
        if t >= target_s or n >= max_n:
            return n
        n = min(max_n, max(n * 2, int(n * target_s / max(t, 1e-9) * 1.2)))


def time_pair(candidate: Callable[[], Any], baseline: Callable[[], Any], device: torch.device, *,
              rounds: int = 7, target_s: float = 0.05, warmup: int = 2) -> Tuple[float, float]:
    """Minimum seconds per call of ``candidate`` and of ``baseline``, interleaved over ``rounds`` rounds."""
    for _ in range(warmup):
        candidate()
        baseline()
    n = max(_calibrate(candidate, target_s, device), 1)
    m = max(_calibrate(baseline, target_s, device), 1)
    ta, tb = [], []
    for r in range(rounds):
        if r % 2 == 0:
            ta.append(_per_call(candidate, n, device))
            tb.append(_per_call(baseline, m, device))
        else:
            tb.append(_per_call(baseline, m, device))
            ta.append(_per_call(candidate, n, device))
    return min(ta), min(tb)


def time_one(fn: Callable[[], Any], device: torch.device, *, rounds: int = 5, target_s: float = 0.05) -> float:
    fn()
    n = _calibrate(fn, target_s, device)
    return min(_per_call(fn, n, device) for _ in range(rounds))


def _record(kind: str, case: str, dtype: torch.dtype, measured: Optional[float], baseline: Optional[float],
            unit: str, ratio: Optional[float], note: str = "", error: str = "") -> Dict[str, Any]:
    cmp, target = TARGETS[kind]
    ok = None
    if ratio is not None and not error:
        ok = ratio <= target if cmp == "<=" else ratio >= target
    return {"kind": kind, "case": case, "dtype": dtype_name(dtype), "measured": measured, "baseline": baseline,
            "unit": unit, "ratio": ratio, "target": f"{cmp} {target:g}", "passed": ok, "note": note,
            "error": error}


# ------------------------------------------------------------------------------------------------ shapes


def _shapes(quick: bool) -> Dict[str, Any]:
    if quick:
        return {"prefill_tokens": 128, "prefill_heads": 8, "prefill_head_sizes": (64, 128),
                "decode": (2, 128, 32, 8, 128), "gemm_m": (1, 16), "gemm_nk": 256, "copy_bytes": 8 << 20,
                "rounds": 2, "target_s": 0.003, "dispatch_calls": 300}
    return {"prefill_tokens": 2048, "prefill_heads": 8, "prefill_head_sizes": (64, 128),
            "decode": (8, 2048, 32, 8, 128), "gemm_m": (1, 16, 512, 2048), "gemm_nk": 4096,
            "copy_bytes": 256 << 20, "rounds": 7, "target_s": 0.05, "dispatch_calls": 20000}


# ------------------------------------------------------------------------------------------------ attention


def _cache(num_blocks: int, block: int, hkv: int, d: int, layout: str, dtype: torch.dtype, device: torch.device,
           g: torch.Generator) -> torch.Tensor:
    shape = (num_blocks, block, hkv, d) if layout == "NHD" else (num_blocks, hkv, block, d)
    return torch.randn(*shape, generator=g).to(device=device, dtype=dtype)


def _write_contiguous(cache: torch.Tensor, x_THD: torch.Tensor, block_ids: torch.Tensor, block: int,
                      layout: str) -> None:
    """Write ``x_THD`` (tokens of one sequence) into ``cache`` through the sequence's blocks (benchmark setup)."""
    t = x_THD.shape[0]
    nb = math.ceil(t / block)
    pad = nb * block - t
    x = torch.cat([x_THD, x_THD.new_zeros(pad, *x_THD.shape[1:])]) if pad else x_THD
    x_BPHD = x.view(nb, block, *x_THD.shape[1:])
    if layout == "NHD":
        cache[block_ids[:nb]] = x_BPHD
    else:
        cache[block_ids[:nb]] = x_BPHD.transpose(1, 2)


def _bench_prefill(backend: Backend, dtype: torch.dtype, shapes: Dict[str, Any]) -> List[Dict[str, Any]]:
    from ..core.attention import Attention, AttentionMetadata, AttentionSpec

    dev = backend.device
    t, h = shapes["prefill_tokens"], shapes["prefill_heads"]
    block = backend.block_sizes[0]
    layout = backend.kv_cache_layout
    out_records = []
    for d in shapes["prefill_head_sizes"]:
        case = f"prefill T={t} H={h} D={d} causal"
        g = torch.Generator().manual_seed(d)
        q = torch.randn(t, h, d, generator=g).to(dev, dtype)
        k = torch.randn(t, h, d, generator=g).to(dev, dtype)
        v = torch.randn(t, h, d, generator=g).to(dev, dtype)
        nb = math.ceil(t / block)
        k_cache = _cache(nb, block, h, d, layout, dtype, dev, g)
        v_cache = torch.empty_like(k_cache)
        ids = torch.arange(nb, device=dev)
        _write_contiguous(k_cache, k, ids, block, layout)
        _write_contiguous(v_cache, v, ids, block, layout)
        spec = AttentionSpec(num_heads=h, num_kv_heads=h, head_size=d, dtype=dtype, block_size=block,
                             kv_layout=layout, causal=True)
        op = Attention.build(spec, backend, strict=False)
        meta = AttentionMetadata.build(torch.tensor([0, t], dtype=torch.int32, device=dev),
                                       torch.tensor([t], dtype=torch.int32, device=dev),
                                       ids.to(torch.int32).view(1, nb), block)
        out = torch.empty_like(q)
        q4, k4, v4 = (x.transpose(0, 1).unsqueeze(0).contiguous() for x in (q, k, v))  # [1, H, T, D]

        def cand():
            op(q, k_cache, v_cache, meta, out=out)

        def base():
            F.scaled_dot_product_attention(q4, k4, v4, is_causal=True)

        ta, tb = time_pair(cand, base, dev, rounds=shapes["rounds"], target_s=shapes["target_s"])
        note = op.selection.chosen if op.selection is not None else ""
        out_records.append(_record("attention_prefill", case, dtype, ta * 1e3, tb * 1e3, "ms", ta / tb,
                                   note=f"kernel {note}; baseline torch SDPA is_causal"))
    return out_records


def _copy_bandwidth(dev: torch.device, nbytes: int, shapes: Dict[str, Any]) -> float:
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=dev).uniform_()
    dst = torch.empty_like(src)
    t = time_one(lambda: dst.copy_(src), dev, rounds=shapes["rounds"], target_s=shapes["target_s"])
    return 2 * src.numel() * src.element_size() / t


def _bench_decode(backend: Backend, dtype: torch.dtype, shapes: Dict[str, Any], copy_bw: float) -> Dict[str, Any]:
    from ..core.attention import Attention, AttentionMetadata, AttentionSpec

    dev = backend.device
    s, ctx, hq, hkv, d = shapes["decode"]
    block = backend.block_sizes[0]
    layout = backend.kv_cache_layout
    per_seq = math.ceil(ctx / block)
    num_blocks = s * per_seq + 1
    g = torch.Generator().manual_seed(7)
    k_cache = _cache(num_blocks, block, hkv, d, layout, dtype, dev, g)
    v_cache = _cache(num_blocks, block, hkv, d, layout, dtype, dev, g)
    perm = torch.randperm(num_blocks, generator=g)[: s * per_seq]
    block_table = perm.view(s, per_seq).to(device=dev, dtype=torch.int32)
    q = torch.randn(s, hq, d, generator=g).to(dev, dtype)
    spec = AttentionSpec(num_heads=hq, num_kv_heads=hkv, head_size=d, dtype=dtype, block_size=block,
                         kv_layout=layout, causal=True)
    op = Attention.build(spec, backend, strict=False)
    meta = AttentionMetadata.build(torch.arange(s + 1, dtype=torch.int32, device=dev),
                                   torch.full((s,), ctx, dtype=torch.int32, device=dev), block_table, block)
    out = torch.empty_like(q)
    t = time_one(lambda: op(q, k_cache, v_cache, meta, out=out), dev, rounds=shapes["rounds"],
                 target_s=shapes["target_s"])
    kv_bytes = 2 * s * ctx * hkv * d * torch.empty((), dtype=dtype).element_size()
    bw = kv_bytes / t
    case = f"decode S={s} ctx={ctx} Hq={hq} Hkv={hkv} D={d} P={block}"
    chosen = op.selection.chosen if op.selection is not None else ""
    return _record("paged_decode", case, dtype, bw / 1e9, copy_bw / 1e9, "GB/s", bw / copy_bw,
                   note=f"kernel {chosen}; {t * 1e3:.3f} ms per step; baseline raw copy of "
                        f"{shapes['copy_bytes'] >> 20} MB")


def _bench_gemm(backend: Backend, dtype: torch.dtype, shapes: Dict[str, Any]) -> List[Dict[str, Any]]:
    from ..core.gemm import Gemm, GemmSpec

    dev = backend.device
    nk = shapes["gemm_nk"]
    g = torch.Generator().manual_seed(3)
    w = (torch.randn(nk, nk, generator=g) / nk ** 0.5).to(dev, dtype)
    op = Gemm.build(GemmSpec(dtype=dtype, in_features=nk, out_features=nk), backend, strict=False)
    recs = []
    for m in shapes["gemm_m"]:
        x = torch.randn(m, nk, generator=g).to(dev, dtype)
        ta, tb = time_pair(lambda: op(x, w), lambda: torch.matmul(x, w.t()), dev, rounds=shapes["rounds"],
                           target_s=shapes["target_s"])
        recs.append(_record("gemm", f"gemm M={m} N=K={nk}", dtype, ta * 1e3, tb * 1e3, "ms", ta / tb,
                            note=f"kernel {op.selection.chosen if op.selection else ''}; baseline torch.matmul"))
    return recs


def _bench_dispatch(backend: Backend, dtype: torch.dtype, shapes: Dict[str, Any]) -> Dict[str, Any]:
    from ..core.gemm import Gemm, GemmSpec

    dev = backend.device
    x = torch.randn(1, 16).to(dev, dtype)
    w = torch.randn(16, 16).to(dev, dtype)
    out = torch.empty(1, 16, dtype=dtype, device=dev)
    op = Gemm.build(GemmSpec(dtype=dtype, in_features=16, out_features=16), backend, strict=False)
    kernel = op.kernel
    n = shapes["dispatch_calls"]

    def via_op():
        for _ in range(n):
            op(x, w, None, out=out)

    def direct():
        for _ in range(n):
            kernel(x, w, None, out)

    ta, tb = time_pair(via_op, direct, dev, rounds=shapes["rounds"] + 4, target_s=shapes["target_s"])
    ta_us, tb_us = ta / n * 1e6, tb / n * 1e6
    return _record("dispatch_overhead", "dispatch gemm M=1 N=K=16 out=", dtype, ta_us, tb_us, "us/call",
                   ta_us - tb_us, note="ratio column = overhead in us per call (op - direct kernel)")


# ------------------------------------------------------------------------------------------------ driver


def environment(backend: Backend) -> Dict[str, Any]:
    from .. import __version__

    return {"anyaccel": __version__, "torch": torch.__version__, "python": platform.python_version(),
            "platform": platform.platform(), "backend": backend.name, "backend_package": backend.package,
            "backend_version": backend.version, "properties": {k: str(v) for k, v in backend.properties.items()},
            "torch_threads": torch.get_num_threads()}


def _guard(kind: str, case: str, dtype: torch.dtype, fn: Callable[[], Any]) -> List[Dict[str, Any]]:
    try:
        got = fn()
    except Exception as e:
        msg = f"{type(e).__name__}: {e}".splitlines()[0][:300]
        return [_record(kind, case, dtype, None, None, "", None, error=msg)]
    return got if isinstance(got, list) else [got]


def run(backend: Backend, *, quick: bool = False, dtypes: Optional[Sequence[torch.dtype]] = None,
        progress: Progress = None) -> List[Dict[str, Any]]:
    """Every benchmark record for ``backend`` (a list of dicts; see :func:`_record` for the keys)."""
    shapes = _shapes(quick)
    dtypes = list(dtypes) if dtypes else [torch.float32, torch.bfloat16]
    say = progress or (lambda msg: None)
    say(f"raw copy bandwidth ({shapes['copy_bytes'] >> 20} MB)")
    copy_bw = _copy_bandwidth(backend.device, shapes["copy_bytes"], shapes)
    records: List[Dict[str, Any]] = []
    for dt in dtypes:
        say(f"{dtype_name(dt)}: attention prefill")
        records += _guard("attention_prefill", "prefill", dt, lambda: _bench_prefill(backend, dt, shapes))
        say(f"{dtype_name(dt)}: paged decode")
        records += _guard("paged_decode", "decode", dt, lambda: _bench_decode(backend, dt, shapes, copy_bw))
        say(f"{dtype_name(dt)}: gemm")
        records += _guard("gemm", "gemm", dt, lambda: _bench_gemm(backend, dt, shapes))
        say(f"{dtype_name(dt)}: dispatch overhead")
        records += _guard("dispatch_overhead", "dispatch", dt, lambda: _bench_dispatch(backend, dt, shapes))
    if backend.device.type != "cpu" and not quick:
        # Accelerator backends also get the large-shape cases of bench/gpu.py (decode at batch 64, 16k prefill,
        # a GEMM sweep), each against its own same-device baseline measured in this run.
        from . import gpu

        records += gpu.run(backend, say)
    return records


def _num(x: Optional[float]) -> str:
    if x is None:
        return "-"
    return f"{x:.3g}" if abs(x) < 1000 else f"{x:.0f}"


def render(records: Sequence[Dict[str, Any]], backend: Optional[Backend] = None, console: Any = None) -> None:
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    console = console or Console()
    title = "anyaccel bench ops" + (f" on {backend.name}" if backend is not None else "")
    t = Table(title=title)
    for col in ("case", "dtype", "measured", "baseline", "ratio", "target", "result"):
        t.add_column(col, justify="right" if col in ("measured", "baseline", "ratio") else "left")
    for r in records:
        if r["error"]:
            result = "[red]ERROR[/red] (below)"
        elif r["passed"]:
            result = "[green]PASS[/green]"
        else:
            result = "[yellow]MISS[/yellow]"
        unit = f" {r['unit']}" if r["unit"] else ""
        target = r["target"] + (" us" if r["kind"] == "dispatch_overhead" else "")
        t.add_row(escape(r["case"]), r["dtype"], _num(r["measured"]) + unit, _num(r["baseline"]) + unit,
                  _num(r["ratio"]), target, result)
    console.print(t)
    for r in records:
        if r["error"]:
            console.print(f"[red]ERROR[/red] {escape(r['case'])} {r['dtype']}: {escape(r['error'])}", highlight=False)
    notes = sorted({r["note"] for r in records if r["note"] and not r["error"]})
    for n in notes:
        console.print(f"  note: {escape(n)}", highlight=False, style="dim")
