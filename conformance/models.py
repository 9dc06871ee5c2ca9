"""Model-level conformance: every built-in family (tiny configs, seeded realistic init) against Hugging Face
transformers run in float32 on the CPU, on one backend and dtype at a time.

Per (backend, model, dtype) four records of kind ``"model"``:

- ``<model> logits``: teacher-forced logits of a prompt (one prefill) against transformers';
- ``<model> greedy``: 32 greedy tokens through a paged decode loop; identical in float32; in float16/bfloat16
  identical until a first divergence that is a near-tie (each side's token in the other's top-5);
- ``<model> paged``: logits of every decode step against a full recompute of the same sequence in one prefill;
- ``<model> batch``: a sequence alone against the same sequence inside a mixed batch (prefills and decodes).

Encoders (BERT) get ``hidden`` (last hidden states against transformers') and ``batch`` only.

Tolerances (logits, relative to the reference's largest |logit| of the case, "scale"; measured on these tiny
models with the cpu backend; float32 errors come from summation order, low-precision errors from rounding the
weights and every activation):

- float32: 2e-5 x scale. Measured worst across families 5e-7 x scale (mistral; llama 3.7e-7, qwen2 2.4e-7),
  so the bound sits ~40x above noise; the planted bugs it must catch (queries rotated one position off, norm
  epsilon 1e-6 -> 1e-3, window off by one, two experts swapped) move logits by >= 1e-3 x scale.
- bfloat16: 0.08 x scale. 8 mantissa bits: one rounding is 2^-9 ~ 2e-3 relative and a 2-layer model
  accumulates tens of them in the residual stream. Measured: dense families <= 0.009 x scale; mixtral 0.049 x
  scale, because a bfloat16 router score that flips a near-tied top-2 choice sends one token to another expert
  (an O(1) change for that token, inherent to MoE in low precision, not a kernel error).
- float16: 0.01 x scale (11 mantissa bits; measured worst 0.0016 x scale, qwen2_moe).

``paged`` and ``batch`` compare our model with itself (only kernel shapes and summation order differ) and use
the same bound, which in float32 is far tighter than any real paging bug (a wrong slot moves logits by O(scale)).
"""
from __future__ import annotations

import contextlib
import math
import os
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import torch

from ..core.validation import dtype_name
from .cases import CaseResult

__all__ = ["TINY_CONFIGS", "LOGIT_TOLERANCE", "GREEDY_TOKENS", "PagedSession", "make_reference",
           "init_realistic", "run_model_checks", "run_models", "model_names"]

#: relative logit bound per dtype (times the case's largest |reference logit|); reasoning in the module doc.
LOGIT_TOLERANCE = {torch.float32: 2e-5, torch.bfloat16: 0.08, torch.float16: 0.01}
GREEDY_TOKENS = 32
NEAR_TIE_TOP_K = 5
PROMPT_LEN = 24

_BASE = dict(vocab_size=160, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-6, tie_word_embeddings=False,
             bos_token_id=1, eos_token_id=2, pad_token_id=0)

#: Built-in tiny configs (config.json-style dicts). Each exercises its family's particular features.
TINY_CONFIGS: Dict[str, Dict[str, Any]] = {
    "llama": dict(_BASE, architectures=["LlamaForCausalLM"], model_type="llama",
                  rope_scaling={"rope_type": "llama3", "factor": 4.0, "low_freq_factor": 1.0,
                                "high_freq_factor": 4.0, "original_max_position_embeddings": 64}),
    "mistral": dict(_BASE, architectures=["MistralForCausalLM"], model_type="mistral", sliding_window=8),
    "qwen2": dict(_BASE, architectures=["Qwen2ForCausalLM"], model_type="qwen2", num_key_value_heads=1,
                  tie_word_embeddings=True),
    "qwen3": dict(_BASE, architectures=["Qwen3ForCausalLM"], model_type="qwen3", head_dim=24),
    "gemma": dict(_BASE, architectures=["GemmaForCausalLM"], model_type="gemma", head_dim=16,
                  num_key_value_heads=1, hidden_activation="gelu_pytorch_tanh", tie_word_embeddings=True),
    "gemma2": dict(_BASE, architectures=["Gemma2ForCausalLM"], model_type="gemma2", head_dim=16,
                   hidden_activation="gelu_pytorch_tanh", tie_word_embeddings=True, sliding_window=6,
                   attn_logit_softcapping=20.0, final_logit_softcapping=15.0, query_pre_attn_scalar=24,
                   layer_types=["sliding_attention", "full_attention"]),
    "phi3": dict(_BASE, architectures=["Phi3ForCausalLM"], model_type="phi3", num_key_value_heads=4,
                 rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5}),
    "gpt2": dict(architectures=["GPT2LMHeadModel"], model_type="gpt2", vocab_size=160, n_embd=64, n_layer=2,
                 n_head=4, n_positions=256, bos_token_id=1, eos_token_id=2),
    "mixtral": dict(_BASE, architectures=["MixtralForCausalLM"], model_type="mixtral", num_local_experts=4,
                    num_experts_per_tok=2, intermediate_size=96),
    "qwen2_moe": dict(_BASE, architectures=["Qwen2MoeForCausalLM"], model_type="qwen2_moe", num_experts=6,
                      num_experts_per_tok=2, moe_intermediate_size=48, shared_expert_intermediate_size=80,
                      norm_topk_prob=False),
    "bert": dict(architectures=["BertModel"], model_type="bert", vocab_size=160, hidden_size=64,
                 num_hidden_layers=2, num_attention_heads=4, intermediate_size=128, max_position_embeddings=128,
                 type_vocab_size=2, pad_token_id=0),
}


def model_names() -> List[str]:
    return list(TINY_CONFIGS)


# ----------------------------------------------------------------------------------------------------------------
# the reference: transformers, float32, CPU, offline
# ----------------------------------------------------------------------------------------------------------------

def init_realistic(model: torch.nn.Module, seed: int) -> None:
    """Seeded init with scales that give peaked, non-flat logits: matrices ~ N(0, 1/fan_in), embeddings N(0, 1),
    norm weights 1 + N(0, 0.1) (Gemma-style ``1 + w`` norms: N(0, 0.1)), biases N(0, 0.1), routers x3 so experts
    are chosen decisively."""
    g = torch.Generator().manual_seed(seed)
    gemma = getattr(model.config, "model_type", "").startswith("gemma")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:
                base = 0.0 if (name.endswith("bias") or gemma) else 1.0
                p.copy_(base + 0.1 * torch.randn(p.shape, generator=g))
            elif "embed" in name or name.endswith(("wte.weight", "wpe.weight")) or "embeddings" in name:
                p.copy_(torch.randn(p.shape, generator=g) * (0.5 if "position" in name or "wpe" in name else 1.0))
            else:
                fan_in = p.shape[-1]
                scale = 3.0 if (name.endswith("gate.weight") and "proj" not in name) else 1.0
                if "lm_head" in name:
                    scale = 2.0
                p.copy_(torch.randn(p.shape, generator=g) * scale / math.sqrt(fan_in))


def make_reference(config: Dict[str, Any], seed: int = 0):
    """A transformers model (float32, eager attention, eval mode) from a config dict, with :func:`init_realistic`."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import transformers

    kw = {k: v for k, v in config.items() if k not in ("architectures", "model_type")}
    cfg = transformers.AutoConfig.for_model(config["model_type"], **kw)
    cfg.architectures = list(config["architectures"])
    cls = getattr(transformers, config["architectures"][0])
    model = cls._from_config(cfg, attn_implementation="eager", dtype=torch.float32)
    init_realistic(model, seed)
    return model.eval()


def reference_logits(hf: Any, ids: Sequence[int]) -> torch.Tensor:
    """Teacher-forced float32 logits [L, V] (decoders) or last hidden states [L, H] (encoders)."""
    with torch.no_grad():
        x = torch.tensor([list(ids)], dtype=torch.long)
        out = hf(input_ids=x)
        t = out.logits if hasattr(out, "logits") and out.logits is not None else out.last_hidden_state
        return t[0].float()


def reference_greedy(hf: Any, prompt: Sequence[int], n: int) -> List[int]:
    """transformers' greedy tokens (its own KV cache; no EOS stop, so always ``n`` tokens)."""
    import inspect

    # transformers >= 5.2x names the cache argument and output ``cache``; older ones ``past_key_values``
    name = "cache" if "cache" in inspect.signature(hf.forward).parameters else "past_key_values"
    out_ids: List[int] = []
    with torch.no_grad():
        out = hf(input_ids=torch.tensor([list(prompt)], dtype=torch.long), use_cache=True)
        for i in range(n):
            t = int(torch.argmax(out.logits[0, -1]))
            out_ids.append(t)
            if i + 1 < n:
                out = hf(input_ids=torch.tensor([[t]]), use_cache=True, **{name: out[name]})
    return out_ids


# ----------------------------------------------------------------------------------------------------------------
# a tiny paged decoding loop (the runner proper lives in models/runner.py)
# ----------------------------------------------------------------------------------------------------------------

class PagedSession:
    """Sequences over a paged KV cache with blocks handed out in a shuffled order (so pages are not contiguous).

    ``step({seq_id: new_token_ids, ...})`` runs one batch (prefills and decodes mixed, in the dict's order) and
    returns each sequence's logits [q_len, V] float32 (hidden states for encoders).
    """

    def __init__(self, model: Any, num_blocks: int = 64, seed: int = 0) -> None:
        from ..core.attention import AttentionMetadata

        self._meta_cls = AttentionMetadata
        self.model = model
        self.block_size = model.block_size
        self.caches = model.allocate_kv_caches(num_blocks)
        g = torch.Generator().manual_seed(seed)
        self.free = torch.randperm(num_blocks, generator=g).tolist()
        self.blocks: Dict[Any, List[int]] = {}
        self.lengths: Dict[Any, int] = {}

    def step(self, batch: Dict[Any, Sequence[int]]) -> Dict[Any, torch.Tensor]:
        dev, p = self.model.device, self.block_size
        ids, pos, slots, starts, lens, tables = [], [], [], [0], [], []
        for sid, new in batch.items():
            blocks = self.blocks.setdefault(sid, [])
            start = self.lengths.get(sid, 0)
            end = start + len(new)
            while len(blocks) * p < end:
                if not self.free:
                    raise RuntimeError("PagedSession: out of KV blocks")
                blocks.append(self.free.pop())
            self.lengths[sid] = end
            ids += list(new)
            pos += list(range(start, end))
            slots += [blocks[q // p] * p + q % p for q in range(start, end)]
            starts.append(starts[-1] + len(new))
            lens.append(end)
            tables.append(list(blocks))
        width = max(len(t) for t in tables)
        table = torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32, device=dev)
        meta = self._meta_cls.build(torch.tensor(starts, dtype=torch.int32, device=dev),
                                    torch.tensor(lens, dtype=torch.int32, device=dev), table, p,
                                    torch.tensor(slots, dtype=torch.int64, device=dev))
        ids_t = torch.tensor(ids, dtype=torch.long, device=dev)
        pos_t = torch.tensor(pos, dtype=torch.long, device=dev)
        if self.model.is_causal:
            out = self.model.compute_logits(self.model.forward(ids_t, pos_t, self.caches, meta))
        else:
            out = self.model.encode(ids_t, None, pos_t, meta, self.caches).float()
        out = out.cpu()
        return {sid: out[starts[i]:starts[i + 1]] for i, sid in enumerate(batch)}


# ----------------------------------------------------------------------------------------------------------------
# the checks
# ----------------------------------------------------------------------------------------------------------------

class _Skip(Exception):
    """A check not selected."""


def _prompt(vocab: int, n: int, seed: int) -> List[int]:
    g = torch.Generator().manual_seed(1000 + seed)
    return torch.randint(3, vocab, (n,), generator=g).tolist()


def _bound(dtype: torch.dtype, scale: float) -> float:
    return LOGIT_TOLERANCE[dtype] * max(scale, 1.0)


def _compare(rec: CaseResult, ours: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype, scale: float,
             what: str) -> CaseResult:
    err = float((ours.double() - ref.double()).abs().max())
    tol = _bound(dtype, scale)
    rec.max_abs_err, rec.tolerance = err, tol
    ok = math.isfinite(err) and err <= tol
    rec.status = "pass" if ok else "fail"
    if not ok:
        rec.reason = f"{what}: max |err| {err:.3g} > bound {tol:.3g} ({LOGIT_TOLERANCE[dtype]:g} x scale {scale:.3g})"
    return rec


def _greedy_ours(model: Any, prompt: Sequence[int], n: int) -> Tuple[List[int], torch.Tensor]:
    """Our greedy tokens through prefill + one-token decode steps, and the logits [n, V] that chose each."""
    s = PagedSession(model, num_blocks=max(8, 2 * (len(prompt) + n) // model.block_size + 4), seed=7)
    logits = s.step({0: prompt})[0][-1:]
    toks, rows = [], []
    for i in range(n):
        rows.append(logits[-1])
        t = int(torch.argmax(logits[-1]))
        toks.append(t)
        if i + 1 < n:
            logits = s.step({0: [t]})[0]
    return toks, torch.stack(rows)


def _near_tie(a: int, b: int, logits_a: torch.Tensor, logits_b: torch.Tensor) -> bool:
    """Token ``a`` (chosen from ``logits_a``) and ``b`` (from ``logits_b``): each within the other's top-k."""
    top_a = set(torch.topk(logits_a, NEAR_TIE_TOP_K).indices.tolist())
    top_b = set(torch.topk(logits_b, NEAR_TIE_TOP_K).indices.tolist())
    return a in top_b and b in top_a


def run_model_checks(backend: Any, name: str, dtype: torch.dtype, config: Optional[Dict[str, Any]] = None,
                     seed: int = 0, hf: Any = None, model: Any = None,
                     tamper: Optional[Callable[[Any], None]] = None,
                     checks: Sequence[str] = ("logits", "greedy", "paged", "batch")) -> List[CaseResult]:
    """The records of one (backend, model, dtype). ``tamper(model)`` plants a bug after loading (tests);
    ``checks`` selects among logits (hidden for encoders), greedy, paged and batch ("paged" needs "greedy")."""
    from ..models import build_model

    config = config or TINY_CONFIGS[name]
    dn = dtype_name(dtype)
    recs: List[CaseResult] = []

    def rec(check: str) -> CaseResult:
        r = CaseResult(backend=backend.name, kind="model", name=f"{name} {check}", dtype=dn, status="error")
        recs.append(r)
        return r

    t0 = time.perf_counter()
    try:
        hf = hf if hf is not None else make_reference(config, seed)
        if model is None:
            model = build_model(hf, backend, dtype)
        if tamper is not None:
            tamper(model)
    except Exception as e:  # noqa: BLE001 - a build failure is this case's record
        r = rec("build")
        r.reason = f"{type(e).__name__}: {e}"
        from ..core.errors import UnsupportedError
        if isinstance(e, UnsupportedError):
            r.status = "unsupported"
        return recs
    kernels = sorted(set(_kernels(model)), key=lambda k: (not k.startswith("native."), k))
    fallback = any(k.startswith("native.") for k in kernels)
    vocab = model.config.vocab_size
    prompt = _prompt(vocab, PROMPT_LEN, seed)
    causal = model.is_causal

    # 1. teacher-forced logits (hidden states for encoders) against transformers
    r = rec("logits" if causal else "hidden") if "logits" in checks else None
    try:
        if r is None:
            raise _Skip
        ref = reference_logits(hf, prompt)
        ours = PagedSession(model, seed=seed).step({0: prompt})[0]
        _compare(r, ours, ref, dtype, float(ref.abs().max()), "teacher-forced vs transformers")
    except _Skip:
        pass
    except Exception as e:  # noqa: BLE001
        r.reason = f"{type(e).__name__}: {e}"

    if causal and "greedy" in checks:
        # 2. greedy decoding through the paged loop against transformers' greedy tokens
        r = rec("greedy")
        ours_logits = None
        try:
            ref_toks = reference_greedy(hf, prompt, GREEDY_TOKENS)
            toks, ours_logits = _greedy_ours(model, prompt, GREEDY_TOKENS)
            first = next((i for i, (a, b) in enumerate(zip(toks, ref_toks)) if a != b), None)
            r.max_abs_err, r.tolerance = float(0 if first is None else GREEDY_TOKENS - first), 0.0
            if first is None:
                r.status, r.reason = "pass", ""
            elif dtype == torch.float32:
                r.status = "fail"
                r.reason = f"float32 greedy tokens differ from step {first}: ours {toks[first]}, ref {ref_toks[first]}"
            else:
                ref_all = reference_logits(hf, prompt + ref_toks)
                ref_row = ref_all[len(prompt) + first - 1]
                tie = _near_tie(toks[first], ref_toks[first], ours_logits[first], ref_row)
                r.status = "pass" if tie else "fail"
                r.reason = (f"diverged at step {first} at a near-tie (both tokens in each other's top-"
                            f"{NEAR_TIE_TOP_K})" if tie else
                            f"diverged at step {first}: ours {toks[first]}, ref {ref_toks[first]}, not a near-tie")
        except Exception as e:  # noqa: BLE001
            r.reason = f"{type(e).__name__}: {e}"

        # 3. paged decode against a full recompute of the same sequence
        r = rec("paged")
        try:
            if "paged" not in checks:
                recs.pop()
                raise _Skip
            if ours_logits is None:
                raise RuntimeError("greedy decode did not run")
            seq = prompt + toks
            full = PagedSession(model, num_blocks=64, seed=3).step({0: seq[:-1]})[0]
            recompute = full[len(prompt) - 1:]
            _compare(r, ours_logits, recompute, dtype, float(recompute.abs().max()), "paged decode vs recompute")
        except _Skip:
            pass
        except Exception as e:  # noqa: BLE001
            r.reason = f"{type(e).__name__}: {e}"

    # 4. a sequence alone against the same sequence in a mixed batch
    r = rec("batch") if "batch" in checks else None
    try:
        if r is None:
            raise _Skip
        a = prompt[:20]
        other_b = _prompt(vocab, 13, seed + 1)
        other_c = _prompt(vocab, 9, seed + 2)
        alone = PagedSession(model, seed=11)
        s_alone = [alone.step({"a": a})["a"]]
        mixed = PagedSession(model, seed=12)
        if causal:
            s_alone.append(alone.step({"a": [5]})["a"])
            mixed.step({"b": other_b[:12]})
            s_mixed = [mixed.step({"b": other_b[12:], "a": a, "c": other_c})["a"]]
            s_mixed.append(mixed.step({"c": [7], "a": [5], "b": [9]})["a"])
        else:
            s_mixed = [mixed.step({"b": other_b, "a": a, "c": other_c})["a"]]
        ours_a, ours_m = torch.cat(s_alone), torch.cat(s_mixed)
        _compare(r, ours_m, ours_a, dtype, float(ours_a.abs().max()), "in a mixed batch vs alone")
    except _Skip:
        pass
    except Exception as e:  # noqa: BLE001
        r.reason = f"{type(e).__name__}: {e}"

    secs = time.perf_counter() - t0
    for r in recs:
        r.op, r.fallback, r.kernel, r.seconds = "model", fallback, ",".join(kernels), secs / max(len(recs), 1)
    return recs


def _kernels(model: Any) -> Iterable[str]:
    """The kernel names selected for the model's ops (for the report)."""
    seen = set()
    stack = [model]
    while stack:
        obj = stack.pop()
        if id(obj) in seen:
            continue
        seen.add(id(obj))
        sel = getattr(obj, "selection", None)
        if sel is not None and hasattr(sel, "chosen"):
            yield sel.chosen
            continue
        d = getattr(obj, "__dict__", None)
        if d:
            for v in d.values():
                if isinstance(v, list):
                    stack.extend(v)
                elif hasattr(v, "__dict__") or hasattr(v, "selection"):
                    stack.append(v)


def run_models(backend: Any, dtypes: Sequence[Any] = (torch.float32, torch.bfloat16),
               models: Optional[Sequence[str]] = None) -> List[CaseResult]:
    """All model records for ``backend`` over ``dtypes`` and the named built-in models (default: all)."""
    from ..models import parse_dtype

    names = list(models) if models else model_names()
    unknown = [n for n in names if n not in TINY_CONFIGS]
    if unknown:
        raise ValueError(f"unknown model(s) {unknown}; built-in models: {', '.join(TINY_CONFIGS)}")
    out: List[CaseResult] = []
    for n in names:
        try:
            hf = make_reference(TINY_CONFIGS[n], seed=0)
        except Exception as e:  # noqa: BLE001
            for dt in dtypes:
                out.append(CaseResult(backend=backend.name, kind="model", name=f"{n} reference",
                                      dtype=dtype_name(parse_dtype(dt)), status="unsupported",
                                      reason=f"transformers cannot build the reference: {type(e).__name__}: {e}"))
            continue
        for dt in dtypes:
            out += run_model_checks(backend, n, parse_dtype(dt), hf=hf)
    return out
