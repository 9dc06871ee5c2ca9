"""Tensor-parallel conformance: a model sharded over N processes (:mod:`anyaccel.models.parallel`) against the
same model on one process, same backend, same dtype.

Per (backend, model, dtype), records of kind ``"tp"``:

- ``<model> tp<N> logits``: teacher-forced logits of a prompt on every rank against the unsharded model's; bound:
  the model's relative bound (:func:`anyaccel.conformance.models.model_tolerance`) times the largest
  |logit| (at least 1). The error model is the one of that table: sharding changes only the summation order of
  the row-parallel GEMMs (a partial sum per rank, then an all_reduce) and, in half precision, adds one rounding
  of each partial sum to the dtype: the same kind and count of roundings the bound was measured for (the tiny
  models' row-parallel reductions are 64-128 long; splitting them in 2 shortens each piece).
- ``<model> tp<N> greedy`` (float32 only): the greedy tokens of a paged decode loop, identical to the unsharded
  model's and identical on every rank (each rank samples from the gathered logits on its own; a disagreement
  would desynchronise the group).

Models whose head counts do not allow N are ``unsupported`` with the reason; so are families without a plan.
One spawn of N worker processes runs every (model, dtype); the checkpoints are written once as safetensors
directories by the parent, and each worker reads only its slices of them. The workers use the backend found
under the same name in the plugin registry (a fresh process), over its declared ``distributed_backend``.
"""
from __future__ import annotations

import dataclasses
import io
import multiprocessing.connection as mp_connection
import os
import shutil
import tempfile
import time
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch

from ..core.backend import Backend
from ..core.errors import InvalidArgumentError
from ..core.validation import dtype_name
from .cases import CaseResult

__all__ = ["KIND", "TP_PROMPT_LEN", "TP_GREEDY_TOKENS", "run_tp", "tp_eligible", "tp_configs", "PLANTED_BUGS"]

KIND = "tp"
TP_PROMPT_LEN = 16
TP_GREEDY_TOKENS = 12

#: Bugs a TP plan can carry, planted in the workers by name (tests show each is caught): what goes wrong.
PLANTED_BUGS = {
    "kv_head_zero": "every rank keeps KV head 0 (the wrong K/V for ranks whose query heads read another)",
    "bias_twice": "the row-parallel bias is added before the all_reduce (so once per rank)",
    "no_embed_mask": "the vocab-parallel embedding does not zero the tokens outside this rank's rows",
    "head_unreduced": "the LM head returns this rank's logits padded with zeros instead of gathering them",
}


#: The models TP conformance runs: every built-in tiny model, plus a Llama with q/k/v/o and MLP biases (the
#: row-parallel bias must be added once, after the reduction; no other tiny model has a row-parallel bias).
def tp_configs() -> Dict[str, Dict[str, Any]]:
    from . import models as cm

    out = dict(cm.TINY_CONFIGS)
    out["llama_bias"] = dict(cm.TINY_CONFIGS["llama"], attention_bias=True, mlp_bias=True)
    return out


def tp_eligible(config: Dict[str, Any], world: int) -> str:
    """``""`` when a tiny ``config`` can be sharded over ``world`` ranks, else why not."""
    from ..models.config import ConfigError
    from ..models.parallel import head_layout

    arch = config["architectures"][0]
    if arch in ("BertModel", "BertForMaskedLM"):
        return f"{arch} has no tensor-parallel plan"
    hq = int(config.get("num_attention_heads", config.get("n_head", 0)))
    hkv = int(config.get("num_key_value_heads") or hq)
    try:
        head_layout(hq, hkv, world, 0, arch)
    except ConfigError as e:
        return str(e)
    return ""


def _plant(bug: str) -> Callable[[], None]:
    """Plant ``bug`` (a key of :data:`PLANTED_BUGS`) into this worker's sharding plan, before a model is built:
    each replaces one piece of :mod:`anyaccel.models.parallel` in this process only. Returns the undo."""
    from ..models import parallel

    saved = {k: getattr(parallel, k) for k in ("head_layout", "_vocab_parallel_embed")}
    calls = {c: c.__dict__["__call__"] for c in (parallel.RowParallelLinear, parallel.VocabParallelHead)}

    def undo() -> None:
        for k, v in saved.items():
            setattr(parallel, k, v)
        for c, f in calls.items():
            c.__call__ = f

    if bug == "kv_head_zero":
        right = parallel.head_layout

        def head_layout(*args, **kwargs):
            return dataclasses.replace(right(*args, **kwargs), kv_start=0)

        parallel.head_layout = head_layout
    elif bug == "bias_twice":
        def row_call(self, x):
            y = self.op(x, self.weight, None)
            if self.comm is None:
                return y
            return self.comm.all_reduce(y + self.bias if self.bias is not None else y)

        parallel.RowParallelLinear.__call__ = row_call
    elif bug == "no_embed_mask":
        def embed(model, v0, v1, comm):
            def embed_tokens(ids):
                h = comm.all_reduce(model.embed.index_select(0, torch.remainder(ids - v0, v1 - v0)))
                return h * model.embed_multiplier if model.embed_multiplier is not None else h
            return embed_tokens

        parallel._vocab_parallel_embed = embed
    elif bug == "head_unreduced":
        def head_call(self, x):
            local = self.op(x, self.weight, None)  # [T, V_r]; the other ranks' columns stay zero
            pieces = [torch.zeros_like(local) for _ in range(self.comm.world_size)]
            pieces[self.comm.rank] = local
            return torch.cat(pieces, dim=1)

        parallel.VocabParallelHead.__call__ = head_call
    else:
        raise InvalidArgumentError("run_tp", "bug", f"one of {', '.join(PLANTED_BUGS)}", repr(bug))
    return undo


def _logits_and_greedy(model: Any, prompt: Sequence[int], greedy: int) -> Tuple[torch.Tensor, List[int]]:
    from .models import PagedSession

    logits = PagedSession(model, num_blocks=64, seed=3).step({0: list(prompt)})[0]
    toks: List[int] = []
    if greedy:
        s = PagedSession(model, num_blocks=64, seed=5)
        last = s.step({0: list(prompt)})[0][-1]
        for i in range(greedy):
            t = int(torch.argmax(last))
            toks.append(t)
            if i + 1 < greedy:
                last = s.step({0: [t]})[0][-1]
    return logits, toks


def _save(hf: Any, path: str) -> None:
    """``hf`` as an HF-format directory: config.json and one safetensors file (a tied head is not written)."""
    import json

    from safetensors.torch import save_file

    from ..models.loading import hf_model_config

    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(hf_model_config(hf), f)
    sd = hf.state_dict()
    tied = bool(getattr(hf.config, "tie_word_embeddings", False))
    save_file({k: v.detach().contiguous().clone() for k, v in sd.items() if not (tied and k == "lm_head.weight")},
              os.path.join(path, "model.safetensors"), metadata={"format": "pt"})


def _prompt(vocab: int) -> List[int]:
    g = torch.Generator().manual_seed(4242)
    return torch.randint(3, vocab, (TP_PROMPT_LEN,), generator=g).tolist()


def _worker(rank: int, world: int, init_method: str, backend_name: str, jobs, timeout: float, conn) -> None:
    torch.set_num_threads(1)
    from ..core.collectives import Communicator
    from ..models import parallel
    from ..plugins import get_registry

    try:
        backend = get_registry().get(backend_name)
        comm = Communicator.init(backend, rank, world, init_method, timeout=timeout)
    except BaseException as e:
        conn.send(("abort", rank, f"start failed: {type(e).__name__}: {e}"))
        return
    try:
        for name, path, dt, prompt, greedy, bug in jobs:
            undo = _plant(bug) if bug else None
            try:
                model = parallel.build_tensor_parallel_model(path, backend, dt, comm)
                logits, toks = _logits_and_greedy(model, prompt, greedy)
                buf = io.BytesIO()
                torch.save(logits.detach().cpu().clone(), buf)  # bytes: no shared memory outliving the worker
                conn.send(("result", rank, (name, dtype_name(dt)), buf.getvalue(), toks))
            except Exception as e:
                conn.send(("error", rank, (name, dtype_name(dt)), f"{type(e).__name__}: {e}"))
            finally:
                if undo is not None:
                    undo()
    finally:
        try:
            comm.destroy()
        except Exception:  # pragma: no cover - a peer may be gone
            pass
    conn.send(("done", rank))
    conn.close()


def run_tp(backend: Backend, names: Sequence[str], dtypes: Sequence[torch.dtype] = (torch.float32,),
           world_size: int = 2, *, timeout: float = 600.0, op_timeout: float = 60.0,
           bugs: Optional[Dict[str, str]] = None, configs: Optional[Dict[str, Dict[str, Any]]] = None,
           progress: Optional[Callable[[str], None]] = None) -> List[CaseResult]:
    """TP=``world_size`` against TP=1 for every model in ``names`` and dtype; one spawn for all of them.

    :param bugs: model name -> a bug of :data:`PLANTED_BUGS` planted in that model's sharded runs (to show the
        checks catch it); the others run clean in the same spawn.
    """
    from . import models as cm
    from ..models import build_model

    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 2:
        raise InvalidArgumentError("run_tp", "world_size", "an int >= 2", repr(world_size))
    bugs = dict(bugs or {})
    if any(b not in PLANTED_BUGS for b in bugs.values()):
        raise InvalidArgumentError("run_tp", "bugs", f"values among {', '.join(PLANTED_BUGS)}", repr(bugs))
    configs = configs or tp_configs()
    results: List[CaseResult] = []

    def rec(name: str, dt: torch.dtype, check: str, status: str = "error", reason: str = "") -> CaseResult:
        r = CaseResult(backend=backend.name, kind=KIND, name=f"{name} tp{world_size} {check}", dtype=dtype_name(dt),
                       status=status, reason=reason)
        results.append(r)
        return r

    why_not = ""
    if not backend.definition.distributed_backend:
        why_not = f"backend '{backend.name}' declares no distributed_backend"
    elif not backend.available:
        why_not = f"backend '{backend.name}' is not available here: {backend.reason}"
    tmp = tempfile.mkdtemp(prefix="anyaccel-tp-")
    try:
        jobs, expected = [], {}
        for name in names:
            why = why_not or tp_eligible(configs[name], world_size)
            if why:
                for dt in dtypes:
                    rec(name, dt, "logits", "unsupported", why)
                continue
            hf = cm.make_reference(configs[name], seed=0)
            path = os.path.join(tmp, name)
            _save(hf, path)
            prompt = _prompt(int(configs[name]["vocab_size"]))
            for dt in dtypes:
                greedy = TP_GREEDY_TOKENS if dt == torch.float32 else 0
                one = build_model(path, backend, dt)
                expected[(name, dtype_name(dt))] = _logits_and_greedy(one, prompt, greedy)
                jobs.append((name, path, dt, prompt, greedy, bugs.get(name)))
        if progress:
            progress(f"tp: {len(jobs)} (model, dtype) on {world_size} processes")
        got = _spawn(world_size, backend.name, jobs, timeout, op_timeout, tmp) if jobs else ({}, {})
        per_key, aborted = got
        for name, _, dt, _, greedy, _ in jobs:
            key = (name, dtype_name(dt))
            ref_logits, ref_toks = expected[key]
            msgs = [per_key.get(key, {}).get(r) for r in range(world_size)]
            checks = ["logits"] + (["greedy"] if greedy else [])
            if any(m is None or m[0] == "error" for m in msgs):
                why = "; ".join(f"rank {r}: " + (m[3] if m is not None else f"no result ({aborted.get(r, 'not run')})")
                                for r, m in enumerate(msgs) if m is None or m[0] == "error")
                for ch in checks:
                    rec(name, dt, ch, "error", why)
                continue
            r = rec(name, dt, "logits")
            rel = cm.model_tolerance(name, dt)
            scale = max(float(ref_logits.abs().max()), 1.0)
            outs = [torch.load(io.BytesIO(m[3]), weights_only=True) for m in msgs]
            errs = [float((o.double() - ref_logits.double()).abs().max()) for o in outs]
            err = max(errs) if all(e == e for e in errs) else float("nan")
            r.max_abs_err, r.tolerance = err, rel * scale
            ok = err == err and err <= rel * scale
            r.status = "pass" if ok else "fail"
            r.reason = "" if ok else (f"max |err| {err:.3g} > bound {rel * scale:.3g} ({rel:g} x scale {scale:.3g}); "
                                      f"per rank: {', '.join(f'{e:.3g}' for e in errs)}")
            if greedy:
                g = rec(name, dt, "greedy")
                bad = [(rk, m[4]) for rk, m in enumerate(msgs) if m[4] != ref_toks]
                g.status = "fail" if bad else "pass"
                if bad:
                    rk, toks = bad[0]
                    first = next((i for i, (a, b) in enumerate(zip(toks, ref_toks)) if a != b), len(toks))
                    g.reason = (f"rank {rk}: token {first} is {toks[first] if first < len(toks) else None}, "
                                f"TP=1 gave {ref_toks[first] if first < len(ref_toks) else None}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return results


def _spawn(world: int, backend_name: str, jobs, timeout: float, op_timeout: float, tmp: str):
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    pipes = [ctx.Pipe(duplex=False) for _ in range(world)]
    init_method = "file://" + os.path.join(tmp, "rendezvous")
    procs = [ctx.Process(target=_worker, name=f"anyaccel-tp-{r}", daemon=True,
                         args=(r, world, init_method, backend_name, jobs, op_timeout, pipes[r][1]))
             for r in range(world)]
    per_key: Dict[Tuple[str, str], Dict[int, tuple]] = {}
    aborted: Dict[int, str] = {}
    finished: set = set()
    deadline = time.monotonic() + timeout
    try:
        for p in procs:
            p.start()
        for _, w in pipes:
            w.close()
        live = {pipes[r][0]: r for r in range(world)}
        while live:
            left = deadline - time.monotonic()
            if left <= 0:
                for r in live.values():
                    aborted.setdefault(r, f"no answer within {timeout:g}s")
                break
            for conn in mp_connection.wait(list(live), timeout=min(left, 0.5)):
                rank = live[conn]
                try:
                    msg = conn.recv()
                except (EOFError, OSError):
                    del live[conn]
                    procs[rank].join(timeout=1)
                    if rank not in finished:
                        aborted.setdefault(rank, f"worker exited with code {procs[rank].exitcode}")
                    continue
                if msg[0] == "done":
                    finished.add(rank)
                elif msg[0] == "abort":
                    aborted[rank] = msg[2]
                elif msg[0] in ("result", "error"):
                    per_key.setdefault(msg[2], {})[rank] = msg
    finally:
        for p in procs:
            p.join(timeout=max(0.0, min(5.0, deadline - time.monotonic())))
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join(timeout=5)
        for r, _ in pipes:
            r.close()
    return per_key, aborted
