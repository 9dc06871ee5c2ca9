"""Prometheus metrics of the server (``GET /metrics``), in a registry of their own (one per app, so tests and
several apps in one process never collide).

Gauges: requests waiting, sequences running, KV blocks used and total, generated tokens/s over the last
``window_s`` seconds. Counters: prompt and generated tokens, finished requests by finish reason. Histograms:
time to first token, inter-token latency, end-to-end request latency (seconds).
"""
from __future__ import annotations

import collections
import time
from typing import Any, Deque, Tuple

__all__ = ["ServerMetrics"]

_TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
_ITL_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
_E2E_BUCKETS = (0.1, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)


class ServerMetrics:
    """The metrics the engine loop and the HTTP layer update; :meth:`render` is the ``/metrics`` body."""

    def __init__(self, model_name: str, window_s: float = 10.0) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = CollectorRegistry()
        r, lab = self.registry, ["model"]
        self.model = model_name
        self.waiting = Gauge("anyaccel_requests_waiting", "Requests queued, not yet running", lab, registry=r)
        self.running = Gauge("anyaccel_sequences_running", "Sequences in the running batch", lab, registry=r)
        self.kv_used = Gauge("anyaccel_kv_blocks_used", "KV-cache blocks in use", lab, registry=r)
        self.kv_total = Gauge("anyaccel_kv_blocks_total", "KV-cache blocks in the pool", lab, registry=r)
        self.tps = Gauge("anyaccel_generation_tokens_per_second", "Generated tokens/s over the recent window", lab,
                         registry=r)
        self.prompt_tokens = Counter("anyaccel_prompt_tokens", "Prompt tokens of finished requests", lab,
                                     registry=r)
        self.gen_tokens = Counter("anyaccel_generation_tokens", "Generated tokens", lab, registry=r)
        self.finished = Counter("anyaccel_requests_finished", "Finished requests by finish reason",
                                lab + ["finish_reason"], registry=r)
        self.ttft = Histogram("anyaccel_time_to_first_token_seconds", "Time to first token", lab,
                              buckets=_TTFT_BUCKETS, registry=r)
        self.itl = Histogram("anyaccel_inter_token_latency_seconds", "Time between two tokens of a request", lab,
                             buckets=_ITL_BUCKETS, registry=r)
        self.e2e = Histogram("anyaccel_request_latency_seconds", "Arrival to last token", lab,
                             buckets=_E2E_BUCKETS, registry=r)
        self.window_s = window_s
        self._recent: Deque[Tuple[float, int]] = collections.deque()

    def on_state(self, engine: Any) -> None:
        m = self.model
        self.waiting.labels(m).set(engine.num_waiting)
        self.running.labels(m).set(engine.num_running)
        self.kv_used.labels(m).set(engine.engine.num_used_blocks)
        self.kv_total.labels(m).set(engine.engine.num_blocks)

    def on_step(self, engine: Any, dt: float, num_tokens: int) -> None:
        now = time.monotonic()
        self.gen_tokens.labels(self.model).inc(num_tokens)
        self._recent.append((now, num_tokens))
        while self._recent and now - self._recent[0][0] > self.window_s:
            self._recent.popleft()
        span = max(now - self._recent[0][0], dt) if self._recent else 0.0
        self.tps.labels(self.model).set(sum(n for _, n in self._recent) / span if span > 0 else 0.0)
        self.on_state(engine)

    def on_first_token(self, ttft_s: float) -> None:
        self.ttft.labels(self.model).observe(ttft_s)

    def on_token(self, itl_s: float) -> None:
        self.itl.labels(self.model).observe(itl_s)

    def on_finish(self, stream: Any) -> None:
        self.finished.labels(self.model, stream.finish_reason or "abort").inc()
        self.prompt_tokens.labels(self.model).inc(len(stream.prompt_ids))
        self.e2e.labels(self.model).observe(time.perf_counter() - stream.arrival)

    def render(self) -> Tuple[bytes, str]:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return generate_latest(self.registry), CONTENT_TYPE_LATEST
