"""The async engine loop: continuous batching of concurrent requests over one :class:`~anyaccel.serve.llm.LLM`.

One asyncio task owns the engine. Between two steps it applies the pending adds and aborts (so the engine's
queues are only ever touched by that task), then runs ONE engine step in a worker thread (the event loop keeps
serving HTTP meanwhile) and hands each request its new tokens. Requests therefore join and leave the running
batch at every step; the engine's scheduler puts prompt chunks and decode tokens in the same step and preempts
by recompute when KV blocks run short (see :mod:`anyaccel.models.runner`).

Back-pressure: at most ``max_queue`` requests wait (not yet admitted); beyond that :meth:`AsyncEngine.add_request`
raises :class:`QueueFullError` (HTTP 429). A stream that is closed early (client gone) aborts its request, which
frees its KV blocks before the next step. :meth:`AsyncEngine.shutdown` refuses new requests, lets the in-flight
ones finish for up to a grace period, then aborts the rest (they end with ``finish_reason="abort"``).
"""
from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any, AsyncIterator, Dict, List, Optional, Sequence

from ..core.errors import AnyaccelError
from ..models.sampling import SamplingParams
from .llm import LLM, StreamDelta, TextState

__all__ = ["AsyncEngine", "QueueFullError", "EngineStoppedError", "RequestStream"]


class QueueFullError(AnyaccelError):
    """The bounded waiting queue is full; the client should retry later (HTTP 429)."""


class EngineStoppedError(AnyaccelError):
    """The engine is shutting down and takes no new requests (HTTP 503)."""


class RequestStream:
    """The deltas of one request, as an async iterator. Closing it (or leaving ``async for`` early) aborts the
    request and frees its blocks.

    After it finished: :attr:`token_ids`, :attr:`text`, :attr:`finish_reason`, :attr:`ttft_s`, :attr:`itl_s`.
    """

    def __init__(self, engine: "AsyncEngine", request_id: str, prompt_ids: List[int], params: SamplingParams):
        self.engine = engine
        self.request_id = request_id
        self.prompt_ids = prompt_ids
        self.params = params
        self.text_state = TextState(engine.llm.tokenizer, params.stop)
        self.queue: "asyncio.Queue[Any]" = asyncio.Queue()
        self.arrival = time.perf_counter()
        self.first_token: Optional[float] = None
        self.last_token: Optional[float] = None
        self.itl_s: List[float] = []
        self.logprobs: List[tuple] = []  # per generated token, when the params ask for them
        self.text = ""
        self.finish_reason: Optional[str] = None
        self.finished = False

    @property
    def token_ids(self) -> List[int]:
        return self.text_state.token_ids

    @property
    def ttft_s(self) -> Optional[float]:
        return None if self.first_token is None else self.first_token - self.arrival

    def __aiter__(self) -> AsyncIterator[StreamDelta]:
        return self._iter()

    async def _iter(self) -> AsyncIterator[StreamDelta]:
        try:
            while True:
                item = await self.queue.get()
                if isinstance(item, BaseException):
                    raise item
                yield item
                if item.finished:
                    return
        finally:
            if not self.finished:
                self.engine.abort(self.request_id)

    async def collect(self) -> "RequestStream":
        """Consume every delta (for non-streaming responses); returns ``self``."""
        async for _ in self:
            pass
        return self

    # called by the engine loop
    def _deliver(self, token_ids: Sequence[int], finished: bool, reason: Optional[str], logprobs: tuple = ()) -> bool:
        """Hand out new tokens; True when a stop string ended the request here (the loop then aborts it)."""
        now = time.perf_counter()
        if token_ids:
            if self.first_token is None:
                self.first_token = now
            elif self.last_token is not None:
                self.itl_s.append(now - self.last_token)
            self.last_token = now
        text = self.text_state.push(token_ids, final=finished)
        self.logprobs.extend(logprobs)
        stop_hit = self.text_state.stopped and not finished
        if stop_hit:
            finished, reason = True, "stop"
        self.text += text
        if finished:
            self.finished = True
            self.finish_reason = reason
        self.queue.put_nowait(StreamDelta(self.request_id, tuple(token_ids), text, finished, reason, tuple(logprobs)))
        return stop_hit


class AsyncEngine:
    """Serves many concurrent requests on one :class:`LLM` by continuous batching.

    :param max_queue: requests allowed to wait for admission (beyond: :class:`QueueFullError`).
    :param metrics: an object with ``on_step(engine, dt, num_tokens)``, ``on_first_token(s)``, ``on_token(itl_s)``
        and ``on_finish(stream)`` (see :mod:`anyaccel.serve.metrics`), or ``None``.
    """

    def __init__(self, llm: LLM, *, max_queue: int = 64, metrics: Any = None) -> None:
        if llm.engine is None:
            raise EngineStoppedError(f"model '{llm.name}' is an encoder: it has no generation engine")
        if isinstance(max_queue, bool) or not isinstance(max_queue, int) or max_queue < 1:
            raise ValueError(f"AsyncEngine: max_queue must be an int >= 1, received {max_queue!r}")
        self.llm = llm
        self.engine = llm.engine
        self.max_queue = max_queue
        self.metrics = metrics
        self.streams: Dict[str, RequestStream] = {}
        self._pending_add: List[RequestStream] = []
        self._pending_abort: List[str] = []
        self._wake: Optional[asyncio.Event] = None
        self._task: Optional[asyncio.Task] = None
        self._stopping = False
        self.steps = 0

    # -- lifecycle ----------------------------------------------------------------------------------------------
    async def start(self) -> None:
        if self._task is None:
            self._wake = asyncio.Event()
            self._task = asyncio.get_running_loop().create_task(self._loop(), name="anyaccel-engine-loop")

    async def shutdown(self, grace_s: float = 30.0) -> None:
        """Refuse new requests, let in-flight ones finish for up to ``grace_s`` seconds, abort the rest."""
        self._stopping = True
        deadline = time.monotonic() + grace_s
        while self.streams and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        for rid in list(self.streams):
            self.abort(rid)
        if self._task is not None:
            self._wake.set()
            await asyncio.sleep(0)
            while self._pending_abort and not self._task.done():
                await asyncio.sleep(0.01)
            self._task.cancel()
            try:
                await self._task
            except (asyncio.CancelledError, Exception):
                pass
            self._task = None

    @property
    def num_waiting(self) -> int:
        return self.engine.num_waiting + len(self._pending_add)

    @property
    def num_running(self) -> int:
        return self.engine.num_running

    # -- requests -----------------------------------------------------------------------------------------------
    async def add_request(self, prompt_ids: List[int], params: SamplingParams,
                          request_id: Optional[str] = None) -> RequestStream:
        """Queue a request; returns its :class:`RequestStream` once the engine accepted it (validation errors of
        the engine — a token outside the vocabulary, a prompt longer than the context or the KV cache — are
        raised here, before any token)."""
        if self._stopping:
            raise EngineStoppedError("the server is shutting down and takes no new requests")
        if self._task is None:
            await self.start()
        if self.num_waiting >= self.max_queue:
            raise QueueFullError(f"the request queue is full ({self.max_queue} waiting); retry later")
        rid = request_id or f"req-{uuid.uuid4().hex[:16]}"
        stream = RequestStream(self, rid, list(prompt_ids), params)
        self.streams[rid] = stream
        self._pending_add.append(stream)
        self._wake.set()
        first = await stream.queue.get()  # the loop answers with an "accepted" marker or the validation error
        if isinstance(first, BaseException):
            self.streams.pop(rid, None)
            raise first
        return stream

    def abort(self, request_id: str) -> None:
        """Cancel a request (a no-op once finished); its blocks are freed before the next step."""
        s = self.streams.get(request_id)
        if s is None:
            return
        self._pending_abort.append(request_id)
        if self._wake is not None:
            self._wake.set()

    # -- the loop -----------------------------------------------------------------------------------------------
    def _apply_pending(self) -> None:
        """Admit the pending adds and apply the pending aborts (under the LLM's lock, so a direct ``LLM`` call
        from another thread never interleaves with the loop); answers go to the streams on the loop's thread."""
        adds, self._pending_add = self._pending_add, []
        aborts, self._pending_abort = self._pending_abort, []
        if not adds and not aborts:
            return
        errors = {}
        with self.llm._lock:
            for s in adds:
                try:
                    self.engine.add_request(s.request_id, s.prompt_ids, s.params)
                except Exception as e:  # validation: handed to the caller of add_request
                    errors[s.request_id] = e
            for rid in aborts:
                self.engine.abort(rid)
        for s in adds:
            if s.request_id in errors:
                s.finished = True
                s.queue.put_nowait(errors[s.request_id])
            else:
                s.queue.put_nowait(_ACCEPTED)
        for rid in aborts:
            s = self.streams.pop(rid, None)
            if s is not None and not s.finished:
                s.finished = True
                s.finish_reason = "abort"
                s.queue.put_nowait(StreamDelta(rid, (), "", True, "abort"))
                if self.metrics is not None:
                    self.metrics.on_finish(s)

    def _locked_step(self):
        with self.llm._lock:
            return self.engine.step()

    async def _loop(self) -> None:
        while True:
            self._apply_pending()
            if self.metrics is not None:
                self.metrics.on_state(self)
            if not self.engine.has_unfinished_requests():
                self._wake.clear()
                if self._pending_add or self._pending_abort:
                    continue
                await self._wake.wait()
                continue
            t0 = time.perf_counter()
            try:
                outs = await asyncio.to_thread(self._locked_step)
            except Exception as e:  # the engine dropped every request; tell each of them
                for rid, s in list(self.streams.items()):
                    if not s.finished:
                        s.finished = True
                        s.queue.put_nowait(e)
                self.streams.clear()
                continue
            dt = time.perf_counter() - t0
            self.steps += 1
            ntok = 0
            for o in outs:
                s = self.streams.get(o.request_id)
                if s is None:
                    continue
                ntok += len(o.new_token_ids)
                had_first = s.first_token is not None
                if s._deliver(o.new_token_ids, o.finished, o.finish_reason, o.logprobs):
                    self._pending_abort.append(o.request_id)  # a stop string ended it: free its blocks
                if self.metrics is not None and o.new_token_ids:
                    if had_first:
                        self.metrics.on_token(s.itl_s[-1] if s.itl_s else 0.0)
                    else:
                        self.metrics.on_first_token(s.ttft_s)
                if s.finished:
                    self.streams.pop(o.request_id, None)
                    if self.metrics is not None:
                        self.metrics.on_finish(s)
            if self.metrics is not None:
                self.metrics.on_step(self, dt, ntok)


_ACCEPTED = object()
