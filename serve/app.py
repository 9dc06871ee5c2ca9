"""The OpenAI-compatible HTTP server (FastAPI on uvicorn) over :class:`~anyaccel.serve.engine.AsyncEngine`.

Routes: ``POST /v1/completions``, ``POST /v1/chat/completions`` (``"stream": true`` sends server-sent events,
ending with ``data: [DONE]``), ``POST /v1/embeddings`` (when an encoder model is served), ``GET /v1/models``,
``GET /health``, ``GET /metrics`` (Prometheus text).

Errors are OpenAI-shaped: ``{"error": {"message", "type", "param", "code"}}``: 400 for a bad parameter (``param``
names the field), 400 with code ``context_length_exceeded`` for a prompt (plus ``max_tokens``) over the model's
context or the KV cache, 401 for a missing or wrong API key, 404 for an unknown model, 429 when the waiting queue
is full, 503 while shutting down. A client that disconnects cancels its request; its KV blocks are freed at once.

OpenAI's ``n`` (up to :data:`MAX_N` choices; with a ``seed``, choice ``i`` samples with ``seed + i``), ``stop``, and
``logprobs`` (completions: the number of alternatives; chat: ``logprobs: true`` and ``top_logprobs``; log-
probabilities of the raw model distribution, before temperature and top-k/top-p) are supported; ``echo``,
``best_of`` > 1, ``suffix`` and tools are refused with a 400 naming the field. Without a tokenizer a token's
string is ``"token_id:N"``.

Extensions beyond OpenAI's fields: ``top_k``, ``ignore_eos``, and the prompt of a completion may be token ids;
each choice carries ``token_ids`` (the generated ids) beside its text.
"""
from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import json
import math
import threading
import time
import uuid
from typing import Any, Dict, List, Optional, Tuple

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from ..core.errors import AnyaccelError, InvalidArgumentError
from ..models.sampling import MAX_LOGPROBS, SamplingParams
from .engine import AsyncEngine, EngineStoppedError, QueueFullError, RequestStream
from .llm import LLM, check_messages
from .metrics import ServerMetrics

__all__ = ["build_app", "ServerThread", "serve_forever", "ApiError"]

#: ``max_tokens`` of a chat request that gives none: this, or what the context leaves if less.
DEFAULT_CHAT_MAX_TOKENS = 256


class ApiError(Exception):
    """An error answered as OpenAI-style JSON."""

    def __init__(self, status: int, message: str, param: Optional[str] = None, code: Optional[str] = None,
                 type_: Optional[str] = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.type = type_ or {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
                              429: "rate_limit_error", 503: "service_unavailable"}.get(status, "server_error")

    def body(self) -> Dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


# -- request validation (every error names its field) ------------------------------------------------------------
def _bad(param: str, expected: str, got: Any) -> ApiError:
    shown = json.dumps(got)[:100] if _jsonable(got) else repr(got)[:100]
    return ApiError(400, f"'{param}': expected {expected}, received {shown}", param)


def _jsonable(x: Any) -> bool:
    try:
        json.dumps(x)
        return True
    except (TypeError, ValueError):
        return False


def _int(body: Dict[str, Any], key: str, lo: int, default: Optional[int]) -> Optional[int]:
    v = body.get(key)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, int) or v < lo:
        raise _bad(key, f"an integer >= {lo}", v)
    return v


def _num(body: Dict[str, Any], key: str, lo: float, hi: float, default: float, lo_open: bool = False) -> float:
    v = body.get(key)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v > hi or v < lo or \
            (lo_open and v == lo):
        raise _bad(key, f"a number in {'(' if lo_open else '['}{lo}, {hi}]", v)
    return float(v)


#: Choices one request may ask for (``n``).
MAX_N = 16


def _sampling(body: Dict[str, Any], max_tokens: int, chat: bool = False) -> SamplingParams:
    n = _int(body, "n", 1, 1)
    if n > MAX_N:
        raise _bad("n", f"an integer in [1, {MAX_N}]", n)
    for unsupported in ("echo", "best_of", "suffix", "tools", "functions"):
        v = body.get(unsupported)
        if v not in (None, False, 1 if unsupported == "best_of" else None):
            raise ApiError(400, f"'{unsupported}' is not supported by this server; leave it out", unsupported)
    logprobs = None
    if chat:  # chat: logprobs is a boolean, top_logprobs the number of alternatives
        lp = body.get("logprobs")
        if lp is not None and not isinstance(lp, bool):
            raise _bad("logprobs", "a boolean", lp)
        top = _int(body, "top_logprobs", 0, None)
        if top is not None and top > MAX_LOGPROBS:
            raise _bad("top_logprobs", f"an integer in [0, {MAX_LOGPROBS}]", top)
        if top is not None and not lp:
            raise ApiError(400, "'top_logprobs' needs 'logprobs': true", "top_logprobs")
        if lp:
            logprobs = top or 0
    else:  # completions: logprobs is the number of alternatives per token
        logprobs = _int(body, "logprobs", 0, None)
        if logprobs is not None and logprobs > MAX_LOGPROBS:
            raise _bad("logprobs", f"an integer in [0, {MAX_LOGPROBS}]", logprobs)
    stop = body.get("stop")
    if stop is None:
        stop = ()
    elif isinstance(stop, str):
        stop = (stop,) if stop else ()
    elif not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop) or len(stop) > 8:
        raise _bad("stop", "a string or a list of at most 8 non-empty strings", stop)
    ignore_eos = body.get("ignore_eos", False)
    if not isinstance(ignore_eos, bool):
        raise _bad("ignore_eos", "a boolean", ignore_eos)
    seed = body.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2 ** 63):
        raise _bad("seed", "an integer in [0, 2**63)", seed)
    return SamplingParams(max_new_tokens=max_tokens, temperature=_num(body, "temperature", 0.0, 2.0, 1.0),
                          top_p=_num(body, "top_p", 0.0, 1.0, 1.0, lo_open=True),
                          top_k=_int(body, "top_k", 0, None) or None, seed=seed, stop=tuple(stop),
                          ignore_eos=ignore_eos, logprobs=logprobs, n=n)


def _stream_flags(body: Dict[str, Any]) -> Tuple[bool, bool]:
    s = body.get("stream", False)
    if not isinstance(s, bool):
        raise _bad("stream", "a boolean", s)
    opts = body.get("stream_options") or {}
    if not isinstance(opts, dict):
        raise _bad("stream_options", "an object", opts)
    return s, bool(opts.get("include_usage", False))


class _State:
    def __init__(self, llm: LLM, embed_llm: Optional[LLM], api_key: Optional[str], max_queue: int,
                 shutdown_grace_s: float) -> None:
        self.llm = llm
        self.embed_llm = embed_llm
        self.api_key = api_key
        self.metrics = ServerMetrics(llm.name)
        self.engine = AsyncEngine(llm, max_queue=max_queue, metrics=self.metrics) if llm.engine is not None else None
        self.shutdown_grace_s = shutdown_grace_s
        self.created = int(time.time())
        self.names = [llm.name] + ([embed_llm.name] if embed_llm is not None and embed_llm is not llm else [])


def build_app(llm: LLM, *, embed_llm: Optional[LLM] = None, api_key: Optional[str] = None, max_queue: int = 64,
              shutdown_grace_s: float = 30.0):
    """The FastAPI app serving ``llm`` (a decoder, or an encoder for embeddings only); ``embed_llm`` adds an
    encoder for ``/v1/embeddings`` beside a decoder. ``api_key`` requires ``Authorization: Bearer KEY`` on /v1."""
    if embed_llm is None and not llm.is_causal:
        embed_llm = llm
    st = _State(llm, embed_llm, api_key, max_queue, shutdown_grace_s)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        if st.engine is not None:
            await st.engine.start()
        yield
        if st.engine is not None:
            await st.engine.shutdown(st.shutdown_grace_s)

    app = FastAPI(title="anyaccel", lifespan=lifespan)
    app.state.anyaccel = st

    @app.exception_handler(ApiError)
    async def _api_error(request, exc: ApiError):
        return JSONResponse(exc.body(), status_code=exc.status)

    if st.api_key:
        app.add_middleware(_ApiKeyMiddleware, api_key=st.api_key)

    async def _body(request: Request) -> Dict[str, Any]:
        try:
            body = json.loads(await request.body() or b"null")
        except (ValueError, UnicodeDecodeError) as e:
            raise ApiError(400, f"the request body is not valid JSON: {e}") from None
        if not isinstance(body, dict):
            raise ApiError(400, f"the request body must be a JSON object, received {type(body).__name__}")
        model = body.get("model")
        if model is not None and model not in st.names:
            raise ApiError(404, f"model {model!r} is not served here; served: {', '.join(st.names)}", "model",
                           "model_not_found")
        return body

    def _gen_engine() -> AsyncEngine:
        if st.engine is None:
            raise ApiError(400, f"model '{st.llm.name}' is an encoder: it serves /v1/embeddings only", "model")
        return st.engine

    def _check_len(n_prompt: int, max_tokens: Optional[int], field: str, default: int) -> int:
        ctx = st.llm.max_model_len
        if ctx is not None and n_prompt >= ctx:
            raise ApiError(400, f"'{field}' is {n_prompt} tokens; the model's context is {ctx} tokens (the prompt must "
                                f"leave room for at least one new token)", field, "context_length_exceeded")
        room = (ctx - n_prompt) if ctx is not None else None
        if max_tokens is None:
            return min(default, room) if room is not None else default
        if room is not None and max_tokens > room:
            raise ApiError(400, f"'max_tokens' is {max_tokens} but the prompt ({n_prompt} tokens) leaves only {room} "
                                f"of the model's {ctx}-token context", "max_tokens", "context_length_exceeded")
        return max_tokens

    async def _start(prompt_ids: List[int], params: SamplingParams, field: str) -> List[RequestStream]:
        """One engine request per choice (``n``); choice ``i`` of a seeded request uses ``seed + i``."""
        streams: List[RequestStream] = []
        try:
            for i in range(params.n):
                seed = None if params.seed is None else (params.seed + i) % 2 ** 63
                p = dataclasses.replace(params, n=1, seed=seed) if params.n > 1 else params
                streams.append(await _gen_engine().add_request(prompt_ids, p))
        except QueueFullError as e:
            raise ApiError(429, str(e), None, "queue_full") from None
        except EngineStoppedError as e:
            raise ApiError(503, str(e)) from None
        except AnyaccelError as e:  # token ids outside the vocabulary, a prompt too long for the KV cache
            code = "context_length_exceeded" if "KV" in str(e) else None
            raise ApiError(400, " ".join(str(e).split()), field, code) from None
        finally:
            if len(streams) < params.n:  # a later choice was refused: drop the earlier ones
                for s_ in streams:
                    st.engine.abort(s_.request_id)
        return streams

    def _abort_unfinished(streams: List[RequestStream]) -> None:
        for s_ in streams:
            if not s_.finished:
                st.engine.abort(s_.request_id)

    async def _collect(request: Request, streams: List[RequestStream]) -> List[RequestStream]:
        task = asyncio.ensure_future(asyncio.gather(*(s_.collect() for s_ in streams)))
        try:
            while True:
                done, _ = await asyncio.wait({task}, timeout=0.2)
                if done:
                    return task.result()
                if await request.is_disconnected():
                    raise ApiError(499, "client disconnected")
        finally:
            if not task.done():
                task.cancel()
                with contextlib.suppress(BaseException):
                    await task
            _abort_unfinished(streams)

    def _usage(streams: List[RequestStream]) -> Dict[str, int]:
        p, c = len(streams[0].prompt_ids), sum(len(s_.token_ids) for s_ in streams)
        return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}

    def _sse(obj: Any) -> str:
        return f"data: {json.dumps(obj)}\n\n"

    async def _merged(streams: List[RequestStream]):
        """``(choice index, delta)`` of every stream, in the order they come."""
        if len(streams) == 1:
            async for d in streams[0]:
                yield 0, d
            return
        q: "asyncio.Queue[Any]" = asyncio.Queue()

        async def pump(i: int, s_: RequestStream) -> None:
            try:
                async for d in s_:
                    q.put_nowait((i, d))
            except Exception as e:  # handed to the consumer
                q.put_nowait((i, e))
            finally:
                q.put_nowait((i, None))

        tasks = [asyncio.ensure_future(pump(i, s_)) for i, s_ in enumerate(streams)]
        try:
            left = len(streams)
            while left:
                i, d = await q.get()
                if d is None:
                    left -= 1
                elif isinstance(d, BaseException):
                    raise d
                else:
                    yield i, d
        finally:
            for t in tasks:
                t.cancel()

    async def _events(streams: List[RequestStream], chunk, usage: bool, first=None):
        try:
            for f in first or ():
                yield _sse(f)
            async for i, d in _merged(streams):
                if d.text or d.finished or d.token_ids:
                    yield _sse(chunk(d, i))
            if usage:
                last = chunk(None, 0)
                last["choices"] = []
                last["usage"] = _usage(streams)
                yield _sse(last)
            yield "data: [DONE]\n\n"
        finally:
            _abort_unfinished(streams)

    def _tok_str(t: int) -> str:
        tok = st.llm.tokenizer
        return f"token_id:{t}" if tok is None else tok.decode([t], skip_special_tokens=False)

    def _completion_logprobs(ids, lps, offset: int = 0) -> Optional[Dict[str, Any]]:
        """OpenAI's legacy completions ``logprobs`` object for these tokens."""
        if not lps:
            return None
        tokens = [_tok_str(t) for t in ids]
        offs = []
        for t in tokens:
            offs.append(offset)
            offset += len(t)
        return {"tokens": tokens, "token_logprobs": [lp for lp, _ in lps],
                "top_logprobs": [{_tok_str(a): v for a, v in top} for _, top in lps], "text_offset": offs}

    def _chat_logprobs(ids, lps) -> Optional[Dict[str, Any]]:
        """OpenAI's chat ``logprobs`` object: ``{"content": [{token, logprob, bytes, top_logprobs}, ...]}``."""
        if not lps:
            return None

        def entry(t, v):
            s_ = _tok_str(t)
            return {"token": s_, "logprob": v, "bytes": list(s_.encode("utf-8"))}

        return {"content": [dict(entry(t, lp), top_logprobs=[entry(a, v) for a, v in top])
                            for t, (lp, top) in zip(ids, lps)]}

    # -- routes -----------------------------------------------------------------------------------------------
    @app.get("/health")
    async def health():
        if st.engine is not None and st.engine._stopping:
            return JSONResponse({"status": "shutting down"}, status_code=503)
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics():
        if st.engine is not None:
            st.metrics.on_state(st.engine)
        data, ctype = st.metrics.render()
        return Response(data, media_type=ctype)

    @app.get("/v1/models")
    async def models():
        data = []
        for name, m in ((st.llm.name, st.llm), *(((st.embed_llm.name, st.embed_llm),) if len(st.names) > 1 else ())):
            data.append({"id": name, "object": "model", "created": st.created, "owned_by": "anyaccel",
                         "max_model_len": m.max_model_len, "backend": m.backend.name})
        return {"object": "list", "data": data}

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = await _body(request)
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
            prompt = prompt[0]
        if isinstance(prompt, str) and prompt:
            if st.llm.tokenizer is None:
                raise ApiError(400, f"model '{st.llm.name}' has no tokenizer: send 'prompt' as token ids", "prompt")
            ids = st.llm.encode(prompt)
        elif isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool)
                                                         for t in prompt):
            ids = list(prompt)
        else:
            raise _bad("prompt", "a non-empty string or a non-empty list of token ids (one prompt per request)",
                       prompt)
        max_tokens = _check_len(len(ids), _int(body, "max_tokens", 1, None), "prompt", 16)
        params = _sampling(body, max_tokens)
        do_stream, usage = _stream_flags(body)
        streams = await _start(ids, params, "prompt")
        cid, created, model = f"cmpl-{uuid.uuid4().hex[:24]}", int(time.time()), st.llm.name
        want_lp = params.logprobs is not None
        offsets: Dict[int, int] = {}

        def chunk(d, i):
            lp = None
            if d is not None and want_lp:
                lp = _completion_logprobs(d.token_ids, d.logprobs, offsets.get(i, 0))
                if lp:
                    offsets[i] = lp["text_offset"][-1] + len(lp["tokens"][-1])
            c = {"index": i, "text": d.text if d else "", "logprobs": lp,
                 "finish_reason": d.finish_reason if d else None, "token_ids": list(d.token_ids) if d else []}
            return {"id": cid, "object": "text_completion", "created": created, "model": model, "choices": [c]}

        if do_stream:
            return StreamingResponse(_events(streams, chunk, usage), media_type="text/event-stream")
        await _collect(request, streams)
        return {"id": cid, "object": "text_completion", "created": created, "model": model,
                "choices": [{"index": i, "text": s_.text,
                             "logprobs": _completion_logprobs(s_.token_ids, s_.logprobs) if want_lp else None,
                             "finish_reason": s_.finish_reason, "token_ids": list(s_.token_ids)}
                            for i, s_ in enumerate(streams)],
                "usage": _usage(streams)}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        body = await _body(request)
        _gen_engine()
        messages = body.get("messages")
        try:
            check_messages(messages)
        except InvalidArgumentError as e:
            raise ApiError(400, " ".join(str(e).split()), e.argument if hasattr(e, "argument") else "messages") \
                from None
        if st.llm.tokenizer is None or not getattr(st.llm.tokenizer, "chat_template", None):
            raise ApiError(400, f"model '{st.llm.name}' has no chat template; use /v1/completions", "messages")
        ids = st.llm.apply_chat_template(messages)
        mt = _int(body, "max_completion_tokens", 1, None)
        mt = _int(body, "max_tokens", 1, mt)
        max_tokens = _check_len(len(ids), mt, "messages", DEFAULT_CHAT_MAX_TOKENS)
        params = _sampling(body, max_tokens, chat=True)
        do_stream, usage = _stream_flags(body)
        streams = await _start(ids, params, "messages")
        cid, created, model = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time()), st.llm.name
        want_lp = params.logprobs is not None

        def chunk(d, i, delta=None):
            c = {"index": i, "delta": delta if delta is not None else ({"content": d.text} if d and d.text else {}),
                 "logprobs": _chat_logprobs(d.token_ids, d.logprobs) if d is not None and want_lp else None,
                 "finish_reason": d.finish_reason if d else None, "token_ids": list(d.token_ids) if d else []}
            return {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model, "choices": [c]}

        if do_stream:
            first = [chunk(None, i, {"role": "assistant", "content": ""}) for i in range(len(streams))]
            return StreamingResponse(_events(streams, chunk, usage, first), media_type="text/event-stream")
        await _collect(request, streams)
        return {"id": cid, "object": "chat.completion", "created": created, "model": model,
                "choices": [{"index": i, "message": {"role": "assistant", "content": s_.text},
                             "logprobs": _chat_logprobs(s_.token_ids, s_.logprobs) if want_lp else None,
                             "finish_reason": s_.finish_reason, "token_ids": list(s_.token_ids)}
                            for i, s_ in enumerate(streams)],
                "usage": _usage(streams)}

    @app.post("/v1/embeddings")
    async def embeddings(request: Request):
        body = await _body(request)
        if st.embed_llm is None:
            raise ApiError(400, f"no embedding model is served here (serve an encoder such as 'minilm', or pass "
                                f"--embed-model)", "model")
        inp = body.get("input")
        texts = [inp] if isinstance(inp, str) else inp
        if not isinstance(texts, list) or not texts or len(texts) > 256 or \
                not all(isinstance(t, str) and t for t in texts):
            raise _bad("input", "a non-empty string or a list of 1..256 non-empty strings", inp)
        fmt = body.get("encoding_format") or "float"
        if fmt not in ("float", "base64"):
            raise _bad("encoding_format", "'float' or 'base64'", fmt)
        embs = await asyncio.to_thread(st.embed_llm.embed, texts)
        n = sum(st.embed_llm.count_tokens(texts))

        def enc(e):  # base64: the little-endian float32 bytes, as the openai client decodes them
            return e.tolist() if fmt == "float" else base64.b64encode(e.numpy().astype("<f4").tobytes()).decode()

        return {"object": "list", "model": st.embed_llm.name,
                "data": [{"object": "embedding", "index": i, "embedding": enc(e)} for i, e in enumerate(embs)],
                "usage": {"prompt_tokens": n, "total_tokens": n}}

    return app


class _ApiKeyMiddleware:
    """Require ``Authorization: Bearer KEY`` on /v1 routes. A plain ASGI middleware: it passes ``receive`` through
    untouched, so a handler still sees the client's disconnect (a wrapping HTTP middleware would hide it)."""

    def __init__(self, app, api_key: str) -> None:
        self.app = app
        self.expected = f"Bearer {api_key}".encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["path"].startswith("/v1/"):
            auth = dict(scope.get("headers") or ()).get(b"authorization", b"")
            if auth != self.expected:
                e = ApiError(401, "missing or wrong API key: send 'Authorization: Bearer <key>'", None,
                             "invalid_api_key")
                await JSONResponse(e.body(), status_code=401)(scope, receive, send)
                return
        await self.app(scope, receive, send)


class ServerThread:
    """Run an app with uvicorn in a background thread on ``host:port`` (``port=0``: a free one); for tests and
    ``anyaccel bench serve``. :meth:`stop` shuts it down gracefully and joins the thread."""

    def __init__(self, app, host: str = "127.0.0.1", port: int = 0) -> None:
        import socket

        import uvicorn

        if port == 0:
            with socket.socket() as s:
                s.bind((host, 0))
                port = s.getsockname()[1]
        self.host, self.port = host, port
        self.server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning",
                                                    timeout_graceful_shutdown=10))
        self.thread = threading.Thread(target=self.server.run, name="anyaccel-server", daemon=True)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self, timeout_s: float = 60.0) -> "ServerThread":
        self.thread.start()
        deadline = time.monotonic() + timeout_s
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"the server did not start on {self.url} within {timeout_s} s")
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=60)

    def __enter__(self) -> "ServerThread":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def serve_forever(app, host: str, port: int, shutdown_timeout_s: float = 30.0) -> None:
    """Run the app in the foreground until SIGINT/SIGTERM; in-flight requests get ``shutdown_timeout_s`` to end."""
    import uvicorn

    uvicorn.run(app, host=host, port=port, log_level="info", timeout_graceful_shutdown=int(shutdown_timeout_s))
