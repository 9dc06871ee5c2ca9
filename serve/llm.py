"""The Python API for applications: :class:`LLM` — text (or token ids) in, text, tokens, finish reason and timings out.

    from anyaccel import LLM, SamplingParams
    llm = LLM("smollm2")                                   # backend chosen by choose_backend()
    out = llm.generate("The capital of France is", SamplingParams(max_new_tokens=20))[0]
    print(out.text, out.finish_reason, out.metrics.tokens_per_s)

One :class:`LLM` owns one model and one paged engine (:class:`anyaccel.models.runner.Engine`); every call runs
its prompts through the engine's request API (add, step, abort), so a batch of prompts shares the steps by
continuous batching exactly as the server's requests do. An :class:`LLM` is not meant for concurrent use from
several threads: a lock serialises its calls (the server drives it through :mod:`anyaccel.serve.engine`).

Backend rule (:func:`choose_backend`): a named backend must be available; with none named, the first available
backend (in the registry's discovery order) whose device is not the host CPU, else the first available one.
"""
from __future__ import annotations

import dataclasses
import os
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

from ..core.errors import AnyaccelError, InvalidArgumentError
from ..models.detokenize import TextState
from ..models.sampling import SamplingParams

__all__ = ["LLM", "SamplingParams", "RequestOutput", "CompletionOutput", "RequestMetrics", "StreamDelta",
           "choose_backend", "ServeError", "TextState", "DEFAULT_KV_CACHE_BYTES",
           "DEFAULT_PREFILL_WHILE_DECODING"]

_OP = "LLM"

#: KV-cache memory when the caller gives neither ``kv_cache_bytes`` nor ``num_blocks`` (about 5,700 tokens of
#: SmolLM2-135M in float32).
DEFAULT_KV_CACHE_BYTES = 256 * 1024 * 1024

#: Prompt tokens one engine step takes while other requests decode (chunked prefill). A step costs about a fixed
#: weight-reading part plus a part per token; on 2 CPU cores with SmolLM2-135M, 16 prompt tokens keep a step that
#: admits a prompt under twice a pure decode step (the p99/p50 inter-token latency target of ``anyaccel bench
#: serve``) in float32 and in bfloat16; 32 met it in float32 only (bf16 decode steps are shorter, so the same
#: prompt chunk stretches them more). A larger value shortens time to first token instead.
DEFAULT_PREFILL_WHILE_DECODING = 16

Prompt = Union[str, Sequence[int]]


class ServeError(AnyaccelError):
    """A usage error of the serving layer (no tokenizer for a text prompt, an encoder asked to generate, ...)."""


@dataclass(frozen=True)
class RequestMetrics:
    """Timings of one request, in seconds (``time.perf_counter`` clock).

    ``ttft_s`` is from arrival to the first generated token, ``total_s`` from arrival to the last;
    ``tokens_per_s`` is generated tokens over ``total_s``.
    """

    arrival: float
    first_token: Optional[float]
    finished: Optional[float]
    num_prompt_tokens: int
    num_generated_tokens: int

    @property
    def ttft_s(self) -> Optional[float]:
        return None if self.first_token is None else self.first_token - self.arrival

    @property
    def total_s(self) -> Optional[float]:
        return None if self.finished is None else self.finished - self.arrival

    @property
    def tokens_per_s(self) -> Optional[float]:
        t = self.total_s
        return None if not t else self.num_generated_tokens / t


@dataclass(frozen=True)
class RequestOutput:
    """A finished request.

    :param text: the decoded new tokens (``None`` when the model has no tokenizer); cut before a stop string.
    :param token_ids: the generated tokens (a stop or end-of-sequence token that ended it is included).
    :param finish_reason: ``"stop"`` (end-of-sequence, a stop token or a stop string) or ``"length"`` (the
        ``max_new_tokens`` budget); ``"abort"`` when it was cancelled.
    :param logprobs: with ``SamplingParams(logprobs=k)``: per generated token ``(logprob, ((id, logprob), ...))``,
        its log-probability and the ``k`` most likely tokens'; else ``None``.
    :param outputs: every choice (``SamplingParams(n=...)``) as :class:`CompletionOutput`; the fields above are
        those of choice 0.
    """

    request_id: str
    prompt: Optional[str]
    prompt_token_ids: List[int]
    text: Optional[str]
    token_ids: List[int]
    finish_reason: str
    metrics: RequestMetrics
    logprobs: Optional[List[tuple]] = None
    outputs: Tuple["CompletionOutput", ...] = ()


@dataclass(frozen=True)
class CompletionOutput:
    """One choice of a request (``SamplingParams(n=...)`` asks for several)."""

    index: int
    text: Optional[str]
    token_ids: List[int]
    finish_reason: str
    logprobs: Optional[List[tuple]] = None


@dataclass(frozen=True)
class StreamDelta:
    """One increment of a streamed request: the new tokens and the text they complete (may be empty while a
    multi-byte character is still incomplete). The last delta has ``finished=True`` and a ``finish_reason``."""

    request_id: str
    token_ids: Tuple[int, ...]
    text: str
    finished: bool
    finish_reason: Optional[str]
    logprobs: tuple = ()  #: per new token ``(logprob, ((id, logprob), ...))`` when asked for


def choose_backend(name: Any = None):
    """The backend to run on: ``name`` (a backend object is returned as is), else the documented default rule."""
    from ..plugins import get_registry

    if name is not None and not isinstance(name, str):
        return name
    reg = get_registry()
    if name is not None:
        b = reg.get(name)
        if not b.available:
            raise ServeError(f"backend '{name}' is not available here: {b.reason}; see `anyaccel backends`")
        return b
    avail = list(reg.available())
    if not avail:
        raise ServeError("no backend is available here; see `anyaccel backends`")
    accel = [b for b in avail if b.definition.device_type != "cpu"]
    return (accel or avail)[0]


def _is_model(obj: Any) -> bool:
    """An anyaccel model already built on a backend (not a transformers object, a config or a path)."""
    from ..models.base import Model

    return isinstance(obj, Model)


class LLM:
    """A model ready to generate, chat and embed.

    :param model: a real checkpoint name (``"smollm2"``, ``"minilm"``), an HF-format directory, a ``.gguf``
        file, a transformers model object, or an already built anyaccel model.
    :param backend: a backend name or object; ``None`` picks one by :func:`choose_backend`'s rule.
    :param dtype: ``float32`` (default), ``float16`` or ``bfloat16`` (or an alias such as ``"bf16"``).
    :param tokenizer: a transformers-style tokenizer (``encode``/``decode``/``apply_chat_template``) overriding the
        model's own; a model without one takes token ids only and returns ``text=None``.
    :param kv_cache_bytes: memory for the paged KV cache (default :data:`DEFAULT_KV_CACHE_BYTES`); or give
        ``num_blocks``.
    :param max_num_seqs: sequences decoded together at most; :param max_num_batched_tokens: tokens per step at
        most (longer prompts are prefilled in chunks that share steps with decode).
    :param max_prefill_tokens_while_decoding: while sequences decode, at most this many prompt tokens join one
        engine step (default :data:`DEFAULT_PREFILL_WHILE_DECODING`), which bounds how much a newly admitted prompt
        stretches the running requests' inter-token latency; ``None``: only ``max_num_batched_tokens`` bounds it.
    :param name: the name the server reports in ``/v1/models`` (default: ``model`` when it is a string).
    :param deterministic: build with batch-invariant kernels only, so a request's logits do not depend on the
        requests batched with it (``None``: ``ANYACCEL_DETERMINISTIC``; ignored for an already built model).
    :param tensor_parallel_size: shard the model over this many processes started by ``torchrun`` (each process
        constructs the ``LLM`` with the same arguments and makes the same calls; see
        :mod:`anyaccel.models.parallel`). Default 1.
    :param quantization: ``None`` (a GGUF file's quantized blocks run packed, other checkpoints float),
        ``"none"`` (float weights), ``"int4"`` or ``"int8"`` (round-to-nearest weights run packed; see
        ``anyaccel.models.quant``).
    :param prefix_caching: reuse the KV blocks of prompt prefixes already computed (default on; see
        :mod:`anyaccel.models.prefix_cache`).
    """

    def __init__(self, model: Any, backend: Any = None, dtype: Any = None, *, tokenizer: Any = None,
                 kv_cache_bytes: Optional[int] = None, num_blocks: Optional[int] = None, max_num_seqs: int = 16,
                 max_num_batched_tokens: int = 512, strict: bool = False, block_size: Optional[int] = None,
                 name: Optional[str] = None, builtins: Optional[Mapping[str, Callable[[], Any]]] = None,
                 deterministic: Optional[bool] = None, tensor_parallel_size: int = 1,
                 quantization: Optional[str] = None, prefix_caching: bool = True,
                 max_prefill_tokens_while_decoding: Optional[int] = -1) -> None:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        from ..core.dispatch import deterministic_mode
        from ..models.base import build_model, parse_dtype
        from ..models.cli_support import load_generation_model
        from ..models.runner import Engine

        try:
            dt = parse_dtype("float32" if dtype is None else dtype)
        except ValueError as e:
            raise InvalidArgumentError(_OP, "dtype", "float32, float16 or bfloat16", repr(dtype)) from e
        tok_factory = None
        self.comm = None
        if tensor_parallel_size != 1:
            if _is_model(model):
                raise InvalidArgumentError(_OP, "model", "a checkpoint name, a directory or a transformers model "
                                           "(each rank loads only its slices)", "an already built anyaccel model")
            from ..models.parallel import init_from_env

            self.comm = init_from_env(choose_backend(backend), tensor_parallel_size)
        if _is_model(model):
            self.model = model
            self.backend = model.backend
            named = getattr(backend, "name", backend)
            if named is not None and named != self.backend.name:
                raise InvalidArgumentError(_OP, "backend", f"None or '{self.backend.name}' (the model is built on it)",
                                           repr(named), "Build the model on the backend you want, or pass a name")
        else:
            self.backend = choose_backend(backend)
            if isinstance(model, (str, os.PathLike)):
                with deterministic_mode(deterministic):
                    self.model, tok_factory = load_generation_model(os.fspath(model), self.backend, dt,
                                                                    strict=strict, builtins=builtins, comm=self.comm,
                                                                    quantization=quantization)
            elif self.comm is not None:
                from ..models.parallel import build_tensor_parallel_model

                with deterministic_mode(deterministic):
                    self.model = build_tensor_parallel_model(model, self.backend, dt, self.comm, strict=strict,
                                                             block_size=block_size)
            else:
                try:
                    self.model = build_model(model, self.backend, dt, strict=strict, block_size=block_size,
                                             deterministic=deterministic)
                except TypeError as e:
                    raise InvalidArgumentError(_OP, "model", "a checkpoint name, a directory, a .gguf file, a "
                                               "transformers model or an anyaccel model", type(model).__name__) from e
                if quantization not in (None, "none"):
                    from ..models.quant import quantize_model

                    quantize_model(self.model, quantization)
        self.name = name or (os.fspath(model) if isinstance(model, (str, os.PathLike)) else
                             getattr(self.model.config, "architecture", type(self.model).__name__))
        self.tokenizer = tokenizer if tokenizer is not None else (tok_factory() if tok_factory else None)
        self.is_causal = bool(getattr(self.model, "is_causal", True))
        self.max_model_len = int(getattr(self.model.config, "max_position", 0) or 0) or None
        self._lock = threading.Lock()
        self.engine = None
        if self.is_causal:
            if num_blocks is None and kv_cache_bytes is None:
                kv_cache_bytes = DEFAULT_KV_CACHE_BYTES
            if max_prefill_tokens_while_decoding == -1:
                max_prefill_tokens_while_decoding = DEFAULT_PREFILL_WHILE_DECODING
            self.engine = Engine(self.model, kv_budget_bytes=kv_cache_bytes, num_blocks=num_blocks,
                                 max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens,
                                 prefix_caching=prefix_caching,
                                 prefix_cache_key=os.fspath(model) if isinstance(model, (str, os.PathLike)) else None,
                                 max_prefill_tokens_while_decoding=max_prefill_tokens_while_decoding)

    # -- inputs -----------------------------------------------------------------------------------------------
    def _need_tokenizer(self, what: str):
        if self.tokenizer is None:
            raise ServeError(f"model '{self.name}' has no tokenizer, so {what} is impossible; pass token ids "
                             f"(a list of ints) or LLM(..., tokenizer=...)")
        return self.tokenizer

    def _need_engine(self, what: str):
        if self.engine is None:
            raise ServeError(f"model '{self.name}' is an encoder ({self.model.config.architecture}); it cannot "
                             f"{what}. Use llm.embed(texts)")
        return self.engine

    def encode(self, prompt: Prompt) -> List[int]:
        """Token ids of a prompt: a list of ints is taken as is; text goes through the tokenizer (no chat template)."""
        if isinstance(prompt, str):
            if not prompt:
                raise InvalidArgumentError(_OP, "prompt", "a non-empty string or token-id list", "''")
            return [int(x) for x in self._need_tokenizer("a text prompt").encode(prompt)]
        if isinstance(prompt, Sequence) and prompt and all(isinstance(t, int) and not isinstance(t, bool)
                                                           for t in prompt):
            return list(prompt)
        raise InvalidArgumentError(_OP, "prompt", "a non-empty string or a non-empty list of token ids",
                                   repr(prompt)[:80])

    def apply_chat_template(self, messages: Sequence[Mapping[str, Any]]) -> List[int]:
        """Token ids of a conversation through the model's chat template, ending with the assistant's turn."""
        tok = self._need_tokenizer("chat")
        check_messages(messages)
        if not getattr(tok, "chat_template", None):
            raise ServeError(f"model '{self.name}' has no chat template; use generate() with a plain prompt")
        out = tok.apply_chat_template([dict(m) for m in messages], add_generation_prompt=True, tokenize=True)
        if isinstance(out, Mapping) or hasattr(out, "keys"):
            out = out["input_ids"]
        return [int(x) for x in out]

    def decode(self, ids: Sequence[int]) -> Optional[str]:
        return None if self.tokenizer is None else self.tokenizer.decode(list(ids), skip_special_tokens=True)

    # -- generation ---------------------------------------------------------------------------------------------
    def _run(self, prompts: List[List[int]], params: List[SamplingParams]) -> Iterator[Tuple[int, StreamDelta,
                                                                                                    RequestMetrics]]:
        """Drive the engine over these prompts; yields ``(index, delta, metrics)`` as tokens come."""
        engine = self._need_engine("generate")
        with self._lock:
            rids = [f"llm-{uuid.uuid4().hex[:12]}" for _ in prompts]
            states = [TextState(self.tokenizer, p.stop) for p in params]
            t0 = time.perf_counter()
            first: List[Optional[float]] = [None] * len(prompts)
            by_id = {r: i for i, r in enumerate(rids)}
            added: List[str] = []
            try:
                for r, ids, p in zip(rids, prompts, params):
                    engine.add_request(r, ids, p)
                    added.append(r)
                live = set(rids)
                while live:
                    for o in engine.step():
                        i = by_id[o.request_id]
                        now = time.perf_counter()
                        if first[i] is None and o.new_token_ids:
                            first[i] = now
                        st = states[i]
                        text = st.push(o.new_token_ids, final=o.finished)
                        finished, reason = o.finished, o.finish_reason
                        if st.stopped and not finished:
                            engine.abort(o.request_id)
                            finished, reason = True, "stop"
                        m = RequestMetrics(t0, first[i], now if finished else None, len(prompts[i]),
                                           len(st.token_ids))
                        if finished:
                            live.discard(o.request_id)
                        yield i, StreamDelta(o.request_id, tuple(o.new_token_ids), text, finished, reason,
                                             tuple(o.logprobs)), m
            finally:
                for r in added:
                    engine.abort(r)  # a no-op for finished requests; frees the blocks of an abandoned stream

    def _one_choice(self, params: Any) -> List[SamplingParams]:
        p = self._params(params, 1)
        if p[0].n != 1:
            raise InvalidArgumentError(_OP, "params.n", "1 for a stream (one choice)", p[0].n,
                                       "Use generate() for several choices")
        return p

    def _params(self, params: Any, n: int) -> List[SamplingParams]:
        if params is None:
            params = SamplingParams()
        if isinstance(params, SamplingParams):
            return self._tp_seeds([params] * n)
        plist = list(params) if isinstance(params, Sequence) else []
        if len(plist) != n or not all(isinstance(p, SamplingParams) for p in plist):
            raise InvalidArgumentError(_OP, "params", f"one SamplingParams or a list of {n}", repr(params)[:80])
        return self._tp_seeds(plist)

    def _tp_seeds(self, plist: List[SamplingParams]) -> List[SamplingParams]:
        """Under tensor parallelism every rank must sample the same token: unseeded sampling gets rank 0's seed."""
        if self.comm is None:
            return plist
        import dataclasses

        from ..models.parallel import shared_seed

        return [p if p.seed is not None or not p.temperature else dataclasses.replace(p, seed=shared_seed(self.comm,
                                                                                                          None))
                for p in plist]

    def generate(self, prompts: Union[Prompt, Sequence[Prompt]], params: Any = None) -> List[RequestOutput]:
        """Continue each prompt (text, or a list of token ids); one :class:`RequestOutput` per prompt, in order.

        ``params``: one :class:`SamplingParams` for all (default: greedy, 16 new tokens) or one per prompt.
        A single prompt (a string or one list of ints) is a batch of one.
        """
        if isinstance(prompts, str) or (isinstance(prompts, Sequence) and prompts and
                                        all(isinstance(t, int) for t in prompts)):
            prompts = [prompts]
        if not isinstance(prompts, Sequence) or not prompts:
            raise InvalidArgumentError(_OP, "prompts", "a prompt or a non-empty list of prompts", repr(prompts)[:80])
        ids = [self.encode(p) for p in prompts]
        return self._collect(prompts, ids, self._params(params, len(ids)))

    def _collect(self, prompts, ids, plist) -> List[RequestOutput]:
        # n choices of a prompt are n engine requests (seeds seed, seed + 1, ...), regrouped below.
        owner: List[Tuple[int, int]] = []  # engine request -> (prompt, choice)
        run_ids: List[List[int]] = []
        run_params: List[SamplingParams] = []
        for i, p in enumerate(plist):
            for c in range(p.n):
                owner.append((i, c))
                run_ids.append(ids[i])
                seed = None if p.seed is None else (p.seed + c) % 2 ** 63
                run_params.append(dataclasses.replace(p, n=1, seed=seed) if p.n > 1 else p)
        toks: List[List[int]] = [[] for _ in run_ids]
        texts = [""] * len(run_ids)
        lps: List[List[tuple]] = [[] for _ in run_ids]
        done: Dict[int, Tuple[str, str, RequestMetrics]] = {}
        for j, d, m in self._run(run_ids, run_params):
            toks[j].extend(d.token_ids)
            texts[j] += d.text
            lps[j].extend(d.logprobs)
            if d.finished:
                done[j] = (d.request_id, d.finish_reason, m)
        has_text = self.tokenizer is not None
        choices: List[List[CompletionOutput]] = [[] for _ in ids]
        first: Dict[int, int] = {}
        for j, (i, c) in enumerate(owner):
            first.setdefault(i, j)
            choices[i].append(CompletionOutput(c, texts[j] if has_text else None, toks[j], done[j][1],
                                               lps[j] if run_params[j].logprobs is not None else None))
        outs = []
        for i, p in enumerate(prompts):
            j = first[i]
            c0 = choices[i][0]
            outs.append(RequestOutput(done[j][0], p if isinstance(p, str) else None, ids[i], c0.text, c0.token_ids,
                                      c0.finish_reason, done[j][2], c0.logprobs, tuple(choices[i])))
        return outs

    def stream(self, prompt: Prompt, params: Optional[SamplingParams] = None) -> Iterator[StreamDelta]:
        """Yield :class:`StreamDelta` s of one prompt as its tokens are generated; breaking out frees its blocks."""
        ids = self.encode(prompt)
        p = self._one_choice(params)
        for _, d, _m in self._run([ids], p):
            yield d

    def chat(self, messages: Sequence[Any], params: Any = None) -> List[RequestOutput]:
        """Answer conversations through the chat template: ``messages`` is one conversation (a list of
        ``{"role", "content"}`` dicts) or a list of them; one :class:`RequestOutput` per conversation."""
        convs = [messages] if messages and isinstance(messages[0], Mapping) else list(messages)
        if not convs:
            raise InvalidArgumentError(_OP, "messages", "a non-empty list of {role, content} messages", "[]")
        ids = [self.apply_chat_template(c) for c in convs]
        return self._collect([None] * len(ids), ids, self._params(params, len(ids)))

    def chat_stream(self, messages: Sequence[Mapping[str, Any]],
                    params: Optional[SamplingParams] = None) -> Iterator[StreamDelta]:
        """:meth:`stream` for one conversation (the interactive ``anyaccel chat`` uses it)."""
        ids = self.apply_chat_template(messages)
        for _, d, _m in self._run([ids], self._one_choice(params)):
            yield d

    # -- embeddings ---------------------------------------------------------------------------------------------
    def embed(self, texts: Union[str, Sequence[str]]):
        """Sentence embeddings ``[B, H]`` float32 of an encoder model: mean over each text's tokens, then
        L2-normalised (as sentence-transformers' all-MiniLM-L6-v2 pipeline does). Texts longer than the model's
        positions are truncated to them."""
        if self.is_causal:
            raise ServeError(f"model '{self.name}' is a decoder; embed() needs an encoder model such as 'minilm'")
        from ..models.real import sentence_embeddings

        if isinstance(texts, str):
            texts = [texts]
        if not isinstance(texts, Sequence) or not texts or not all(isinstance(t, str) for t in texts):
            raise InvalidArgumentError(_OP, "texts", "a string or a non-empty list of strings", repr(texts)[:80])
        tok = self._need_tokenizer("embedding text")
        enc = [tok(t, truncation=True, max_length=self.max_model_len or 512) for t in texts]
        ids = [list(e["input_ids"]) for e in enc]
        types = [list(e["token_type_ids"]) if "token_type_ids" in e else [0] * len(i) for e, i in zip(enc, ids)]
        with self._lock:
            return sentence_embeddings(self.model, ids, types)

    def count_tokens(self, texts: Sequence[str]) -> List[int]:
        tok = self._need_tokenizer("counting tokens")
        return [len(tok(t, truncation=True, max_length=self.max_model_len or 512)["input_ids"]) for t in texts]


_ROLES = ("system", "user", "assistant")


def check_messages(messages: Any, field_name: str = "messages") -> None:
    """Raise :class:`InvalidArgumentError` naming the bad message unless ``messages`` is a non-empty list of
    ``{"role": system|user|assistant, "content": str}``."""
    if not isinstance(messages, Sequence) or isinstance(messages, str) or not messages:
        raise InvalidArgumentError(_OP, field_name, "a non-empty list of {role, content} messages",
                                   repr(messages)[:80])
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping):
            raise InvalidArgumentError(_OP, f"{field_name}[{i}]", "an object with role and content", repr(m)[:80])
        if m.get("role") not in _ROLES:
            raise InvalidArgumentError(_OP, f"{field_name}[{i}].role", f"one of {', '.join(_ROLES)}",
                                       repr(m.get("role")))
        if not isinstance(m.get("content"), str):
            raise InvalidArgumentError(_OP, f"{field_name}[{i}].content", "a string", repr(m.get("content"))[:80])


__all__ += ["check_messages"]
