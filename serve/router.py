"""Cache-aware routing over N servers: send each request where the longest prefix of it is already cached.

The router keeps its own index of what it sent where (it needs nothing from the servers): a request's prompt is
cut into chunks (``chunk`` token ids, or ``chunk`` characters of a text prompt), each chunk keyed by a hash
chained over the chunks before it (as the servers' prefix cache keys their blocks, so a chunk key names the whole
prefix), and every server keeps an LRU set of the chunk keys routed to it, capped at ``capacity`` keys (what its
KV cache may hold). A request goes to the server with the best score::

    score = matched_chunks * chunk  -  load_weight * in_flight_requests

where ``matched_chunks`` is the longest run of the request's leading chunk keys the server holds. When no server
holds even one chunk (or every server scores the same), the request goes round robin over the least-loaded
servers. The index is approximate by design: a server may have evicted what the router believes it holds (then
that request computes its prefix again, nothing breaks), and a chunk's size need not match the server's block
size.

:class:`Router` is the policy (pure, simulation-tested); :func:`build_router_app` puts it in front of real servers
as an OpenAI-compatible proxy (``anyaccel route``).
"""
from __future__ import annotations

import hashlib
import itertools
import struct
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Union

__all__ = ["Router", "RoutingDecision", "chunk_keys", "build_router_app"]

Prompt = Union[str, Sequence[int]]


def chunk_keys(prompt: Prompt, chunk: int) -> List[bytes]:
    """Chained sha256 keys of the prompt's full chunks (token ids, or characters of a text)."""
    keys: List[bytes] = []
    parent = b"anyaccel-router-v1"
    n = len(prompt) // chunk
    for i in range(n):
        part = prompt[i * chunk:(i + 1) * chunk]
        data = part.encode("utf-8") if isinstance(part, str) else struct.pack(f"<{len(part)}q", *part)
        parent = hashlib.sha256(parent + data).digest()
        keys.append(parent)
    return keys


@dataclass
class _ServerState:
    url: str
    index: "OrderedDict[bytes, None]" = field(default_factory=OrderedDict)
    in_flight: int = 0
    routed: int = 0


@dataclass(frozen=True)
class RoutingDecision:
    """Where one request goes: the server's position and url, the prompt length the router believes is cached
    there, and whether it fell back to round robin."""

    server: int
    url: str
    matched: int
    fallback: bool


class Router:
    """The routing policy (see the module doc).

    :param servers: the upstream servers' base urls (or any names, in simulation).
    :param chunk: tokens (or characters) per index key (default 64).
    :param capacity: index keys kept per server, least recently routed dropped first.
    :param load_weight: how many matched tokens one in-flight request is worth (default: one chunk).
    :param cache_aware: False makes it plain round robin (the baseline).
    """

    def __init__(self, servers: Sequence[str], chunk: int = 64, capacity: int = 1 << 16,
                 load_weight: Optional[float] = None, cache_aware: bool = True) -> None:
        if not servers:
            raise ValueError("Router: at least one server is needed")
        if chunk < 1 or capacity < 1:
            raise ValueError(f"Router: chunk and capacity must be >= 1, received {chunk}, {capacity}")
        self.servers = [_ServerState(u) for u in servers]
        self.chunk = chunk
        self.capacity = capacity
        self.load_weight = float(chunk if load_weight is None else load_weight)
        self.cache_aware = cache_aware
        self._rr = itertools.count()

    def _matched(self, s: _ServerState, keys: Sequence[bytes]) -> int:
        n = 0
        for k in keys:
            if k not in s.index:
                break
            n += 1
        return n

    def route(self, prompt: Prompt) -> RoutingDecision:
        """Choose a server for ``prompt``, record its chunks there and count it in flight (call :meth:`done`
        when it finishes)."""
        keys = chunk_keys(prompt, self.chunk)
        matched = [self._matched(s, keys) if self.cache_aware else 0 for s in self.servers]
        if self.cache_aware and any(matched):
            scores = [m * self.chunk - self.load_weight * s.in_flight for m, s in zip(matched, self.servers)]
            best = max(scores)
            tied = [i for i, sc in enumerate(scores) if sc == best]
            fallback = len(tied) == len(self.servers)
        else:
            least = min(s.in_flight for s in self.servers) if self.cache_aware else None
            tied = [i for i, s in enumerate(self.servers) if least is None or s.in_flight == least]
            fallback = True
        start = next(self._rr) % len(self.servers)
        i = min(tied, key=lambda j: (j - start) % len(self.servers))  # the next tied server after the pointer
        s = self.servers[i]
        for k in keys:
            s.index[k] = None
            s.index.move_to_end(k)
        while len(s.index) > self.capacity:
            s.index.popitem(last=False)
        s.in_flight += 1
        s.routed += 1
        return RoutingDecision(i, s.url, matched[i] * self.chunk, fallback)

    def done(self, server: int) -> None:
        s = self.servers[server]
        s.in_flight = max(0, s.in_flight - 1)

    def stats(self) -> List[Dict[str, Any]]:
        return [{"url": s.url, "routed": s.routed, "in_flight": s.in_flight, "index_keys": len(s.index)}
                for s in self.servers]


def build_router_app(servers: Sequence[str], *, chunk: int = 64, capacity: int = 1 << 16,
                     cache_aware: bool = True, timeout_s: float = 600.0):
    """An OpenAI-compatible proxy: ``/v1/completions`` and ``/v1/chat/completions`` go to the server the
    :class:`Router` picks (streaming passed through), ``/v1/models`` to the first, ``/router/stats`` shows the
    index. The routing key is the completion prompt, or the chat messages' contents joined in order."""
    import httpx
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse, Response, StreamingResponse

    import contextlib

    router = Router(servers, chunk=chunk, capacity=capacity, cache_aware=cache_aware)
    client = httpx.AsyncClient(timeout=timeout_s)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        await client.aclose()

    app = FastAPI(title="anyaccel router", lifespan=lifespan)
    app.state.router = router

    def _key(path: str, body: Dict[str, Any]) -> Prompt:
        if path.endswith("chat/completions"):
            return "\x1e".join(f"{m.get('role', '')}\x1f{m.get('content', '')}" for m in body.get("messages", [])
                               if isinstance(m, dict))
        p = body.get("prompt", "")
        if isinstance(p, list) and p and isinstance(p[0], (list, str)):
            p = p[0]
        return p if isinstance(p, (str, list)) else str(p)

    async def _forward(path: str, request: Request):
        raw = await request.body()
        try:
            import json

            body = json.loads(raw)
        except ValueError:
            body = {}
        d = router.route(_key(path, body if isinstance(body, dict) else {}))
        headers = {k: v for k, v in request.headers.items() if k.lower() in ("authorization", "content-type")}
        req = client.build_request("POST", d.url + path, content=raw, headers=headers)
        try:
            up = await client.send(req, stream=True)
        except httpx.HTTPError as e:
            router.done(d.server)
            return JSONResponse({"error": {"message": f"upstream {d.url} failed: {e}", "type": "router_error"}},
                                status_code=502)
        routed = {"x-anyaccel-server": str(d.server), "x-anyaccel-matched": str(d.matched)}
        if "text/event-stream" in up.headers.get("content-type", ""):
            async def relay():
                try:
                    async for chunk in up.aiter_raw():
                        yield chunk
                finally:
                    await up.aclose()
                    router.done(d.server)

            return StreamingResponse(relay(), status_code=up.status_code, media_type="text/event-stream",
                                     headers=routed)
        try:
            content = await up.aread()
        finally:
            await up.aclose()
            router.done(d.server)
        return Response(content, status_code=up.status_code, media_type=up.headers.get("content-type"),
                        headers=routed)

    async def completions(request):
        return await _forward("/v1/completions", request)

    async def chat(request):
        return await _forward("/v1/chat/completions", request)

    # FastAPI reads the parameter's type from the signature; this module's annotations are strings (PEP 563)
    # that name a class imported here, so they are set as objects before the routes are registered
    for fn in (completions, chat):
        fn.__annotations__ = {"request": Request}
    app.post("/v1/completions")(completions)
    app.post("/v1/chat/completions")(chat)

    @app.get("/v1/models")
    async def models():
        r = await client.get(servers[0] + "/v1/models")
        return Response(r.content, status_code=r.status_code, media_type=r.headers.get("content-type"))

    @app.get("/router/stats")
    async def stats():
        return {"cache_aware": router.cache_aware, "chunk": router.chunk, "servers": router.stats()}

    return app


def add_route_arguments(p) -> None:
    p.add_argument("--server", dest="servers", action="append", required=True, metavar="URL",
                   help="an upstream anyaccel (or any OpenAI-compatible) server; repeat for each")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8080)
    p.add_argument("--chunk", type=int, default=64,
                   help="prompt tokens (or characters of a text prompt) per index key (default 64)")
    p.add_argument("--capacity", type=int, default=1 << 16, help="index keys kept per server (default 65536)")
    p.add_argument("--round-robin", dest="round_robin", action="store_true",
                   help="plain round robin (the baseline), no cache awareness")


def route_main(args) -> int:
    from .app import serve_forever

    if args.chunk < 1 or args.capacity < 1:
        raise ValueError(f"--chunk and --capacity must be >= 1, received {args.chunk}, {args.capacity}")
    app = build_router_app([s.rstrip("/") for s in args.servers], chunk=args.chunk, capacity=args.capacity,
                           cache_aware=not args.round_robin)
    serve_forever(app, args.host, args.port)
    return 0


__all__ += ["add_route_arguments", "route_main"]
