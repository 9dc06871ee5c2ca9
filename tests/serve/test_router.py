"""serve.router: the cache-aware policy in a simulation of servers with prefix caches (deterministic: prefill
tokens and a queue-length TTFT proxy, no clock), and the HTTP proxy over two loopback servers."""
from __future__ import annotations

import random
from typing import List

import pytest

from anyaccel.models.prefix_cache import PrefixCachingAllocator, hash_block_tokens
from anyaccel.serve.router import Router, chunk_keys

P = 16


def test_chunk_keys_chain():
    a = chunk_keys(list(range(40)), 16)
    assert len(a) == 2 and chunk_keys(list(range(33)), 16) == a
    assert chunk_keys([99] + list(range(1, 40)), 16)[1] != a[1]
    assert chunk_keys("x" * 20, 8) == chunk_keys("x" * 16, 8)


def test_policy_basics():
    r = Router(["a", "b", "c"], chunk=4)
    first = [r.route([i] * 8) for i in range(3)]  # nothing cached anywhere: round robin
    assert [d.server for d in first] == [0, 1, 2] and all(d.fallback for d in first)
    for d in first:
        r.done(d.server)
    again = r.route([1] * 8 + [5, 6])  # its prefix went to server 1
    assert again.server == 1 and again.matched == 8 and not again.fallback
    # load: each request in flight costs load_weight tokens of match
    r2 = Router(["a", "b"], chunk=4, load_weight=8)
    assert [r2.route([7] * 12).server for _ in range(3)] == [0, 0, 1]  # 12 - 8 > 0, then 12 - 16 < 0
    rr = Router(["a", "b"], chunk=4, cache_aware=False)
    assert [rr.route([1] * 8).server for _ in range(4)] == [0, 1, 0, 1]
    with pytest.raises(ValueError):
        Router([])


def _workload(num_systems=6, sessions_per=4, turns=3, system_len=256, user_len=24, answer_len=8, seed=0):
    rng = random.Random(seed)
    systems = [[rng.randrange(16, 1000) for _ in range(system_len)] for _ in range(num_systems)]
    hist = [list(systems[i % num_systems]) for i in range(num_systems * sessions_per)]
    rounds = []
    for _ in range(turns):
        rnd = []
        for h in hist:
            h += [rng.randrange(16, 1000) for _ in range(user_len)]
            rnd.append(list(h))
            h += [rng.randrange(16, 1000) for _ in range(answer_len)]
        rng.shuffle(rnd)  # sessions arrive in no fixed order
        rounds.append(rnd)
    return rounds


def simulate(router: Router, rounds, num_blocks=160):
    """Each round's requests are routed together (in flight at once), then each server prefills its requests in
    order through a real PrefixCachingAllocator; a request's TTFT proxy is the prompt tokens its server computed
    before and for it in that round."""
    caches = [PrefixCachingAllocator(num_blocks, P) for _ in router.servers]
    computed, ttft = 0, []
    for rnd in rounds:
        decisions = [router.route(p) for p in rnd]
        queue = [0] * len(caches)
        for d, prompt in zip(decisions, rnd):
            pc = caches[d.server]
            keys = hash_block_tokens(prompt, P)
            hit = pc.match(keys, len(prompt))
            new = pc.allocate(-(-len(prompt) // P) - len(hit))
            blocks = hit + new
            for b, k in zip(blocks[len(hit):], keys[len(hit):]):
                pc.register(b, k)
            pc.free(blocks)
            c = len(prompt) - len(hit) * P
            computed += c
            queue[d.server] += c
            ttft.append(queue[d.server])
        for d in decisions:
            router.done(d.server)
    ttft.sort()
    return computed, ttft[len(ttft) // 2], ttft[int(0.9 * (len(ttft) - 1))]


def test_cache_aware_routing_beats_round_robin_in_simulation():
    rounds = _workload()
    servers = ["s0", "s1", "s2"]
    aware = simulate(Router(servers, chunk=P), rounds)
    rr = simulate(Router(servers, chunk=P, cache_aware=False), rounds)
    # each system prompt stays on one server instead of being computed on all three, and histories follow
    assert aware[0] < rr[0] / 1.5, (aware, rr)
    assert aware[2] < rr[2] / 1.5, (aware, rr)  # p90 of the TTFT proxy


def test_proxy_over_two_loopback_servers(cpu_backend, reference_models, char_tokenizer):
    httpx = pytest.importorskip("httpx")
    import torch

    from anyaccel.models import build_model
    from anyaccel.serve import LLM
    from anyaccel.serve.app import ServerThread, build_app
    from anyaccel.serve.router import build_router_app

    model = build_model(reference_models("llama"), cpu_backend, torch.float32, block_size=16)
    llms = [LLM(model, tokenizer=char_tokenizer, num_blocks=32, name="tiny") for _ in range(2)]
    ups = [ServerThread(build_app(llm)).start() for llm in llms]
    try:
        with ServerThread(build_router_app([u.url for u in ups], chunk=16)) as rt:
            body = {"model": "tiny", "prompt": "a shared system prompt of some length, then: q1", "max_tokens": 4,
                    "temperature": 0}
            a = httpx.post(rt.url + "/v1/completions", json=body, timeout=120)
            b = httpx.post(rt.url + "/v1/completions", json=dict(body, prompt=body["prompt"][:-1] + "2"),
                           timeout=120)
            assert a.status_code == b.status_code == 200, (a.text, b.text)
            assert a.headers["x-anyaccel-server"] == b.headers["x-anyaccel-server"]
            assert int(b.headers["x-anyaccel-matched"]) == 32
            direct = httpx.post(ups[0].url + "/v1/completions", json=body, timeout=120).json()
            assert a.json()["choices"][0]["text"] == direct["choices"][0]["text"]
            stats = httpx.get(rt.url + "/router/stats", timeout=30).json()
            assert sum(s["routed"] for s in stats["servers"]) == 2
            with httpx.stream("POST", rt.url + "/v1/completions", json=dict(body, stream=True), timeout=120) as s:
                lines = [ln for ln in s.iter_lines() if ln.startswith("data:")]
            assert lines[-1].strip() == "data: [DONE]"
    finally:
        for u in ups:
            u.stop()


def test_route_command_arguments(capsys):
    from anyaccel.cli import build_parser, main

    a = build_parser().parse_args(["route", "--server", "http://a:1", "--server", "http://b:2", "--chunk", "32"])
    assert a.servers == ["http://a:1", "http://b:2"] and a.chunk == 32 and not a.round_robin
    assert main(["route", "--server", "http://a:1", "--chunk", "0"]) == 2
    assert "--chunk" in capsys.readouterr().err
