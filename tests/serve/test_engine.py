"""serve.engine: the async loop over the runner's request API (models.runner.Engine.add_request/step/abort).

Continuous batching must not change a single token: every request, whenever it joins, gets what it gets alone.
"""
from __future__ import annotations

import asyncio

import pytest

from anyaccel.core.errors import InvalidArgumentError
from anyaccel.models.runner import Engine
from anyaccel.serve import SamplingParams
from anyaccel.serve.engine import AsyncEngine, EngineStoppedError, QueueFullError

PROMPTS = [[5, 9, 33] * 5, list(range(3, 30)), [7] * 20, [8, 9] * 8, [11]]


def _p(n):
    return SamplingParams(max_new_tokens=n, ignore_eos=True)


@pytest.fixture(scope="module")
def alone(tiny_llm):
    e = Engine(tiny_llm.model, num_blocks=32)
    return {i: e.generate([p], _p(24))[0] for i, p in enumerate(PROMPTS)}


def test_requests_joining_at_different_steps_get_their_tokens_alone(tiny_llm, alone):
    e = Engine(tiny_llm.model, num_blocks=64, max_num_batched_tokens=16)  # 16: prompts are prefilled in chunks
    got = {i: [] for i in range(len(PROMPTS))}
    reasons = {}
    e.add_request("r0", PROMPTS[0], _p(24))
    pending = list(range(1, len(PROMPTS)))
    steps = 0
    while e.has_unfinished_requests() or pending:
        if pending and steps % 3 == 2:  # a newcomer every third step, while others decode
            i = pending.pop(0)
            e.add_request(f"r{i}", PROMPTS[i], _p(24))
        for o in e.step():
            i = int(o.request_id[1:])
            got[i].extend(o.new_token_ids)
            assert len(o.new_token_ids) <= 1
            if o.finished:
                reasons[i] = o.finish_reason
        steps += 1
    assert got == alone
    assert reasons == {i: "length" for i in range(len(PROMPTS))}
    assert e.num_used_blocks == 0


def test_preemption_under_kv_pressure_keeps_the_tokens(tiny_llm, alone):
    e = Engine(tiny_llm.model, num_blocks=6)  # 96 token slots for five requests of up to 51 tokens each
    for i, p in enumerate(PROMPTS):
        e.add_request(i, p, _p(24))
    got = {i: [] for i in range(len(PROMPTS))}
    while e.has_unfinished_requests():
        for o in e.step():
            got[o.request_id].extend(o.new_token_ids)
    assert e.stats.preemptions > 0
    assert got == alone and e.num_used_blocks == 0


def test_abort_frees_blocks_at_once_and_others_continue(tiny_llm, alone):
    e = Engine(tiny_llm.model, num_blocks=32)
    e.add_request("a", PROMPTS[1], _p(24))
    e.add_request("b", PROMPTS[2], _p(24))
    got = []
    for _ in range(3):
        got += [t for o in e.step() if o.request_id == "b" for t in o.new_token_ids]
    used = e.num_used_blocks
    assert e.abort("a") is True and e.num_used_blocks < used
    assert e.abort("a") is False and e.num_running == 1
    while e.has_unfinished_requests():
        got += [t for o in e.step() for t in o.new_token_ids]
    assert got == alone[2] and e.num_used_blocks == 0


def test_abort_of_a_waiting_request(tiny_llm):
    e = Engine(tiny_llm.model, num_blocks=32)
    e.add_request("w", PROMPTS[0], _p(4))
    assert e.num_waiting == 1 and e.abort("w") and e.num_waiting == 0 and e.step() == []


def test_duplicate_request_id_and_bad_prompt_are_refused(tiny_llm):
    e = Engine(tiny_llm.model, num_blocks=32)
    e.add_request("x", PROMPTS[0], _p(4))
    with pytest.raises(InvalidArgumentError, match="request_id"):
        e.add_request("x", PROMPTS[1], _p(4))
    with pytest.raises(InvalidArgumentError, match="prompts"):
        e.add_request("y", [10 ** 6], _p(4))
    assert e.num_waiting == 1


def test_step_reports_stop_on_a_stop_token(tiny_llm, alone):
    e = Engine(tiny_llm.model, num_blocks=32)
    stop = alone[1][3]
    e.add_request("s", PROMPTS[1], SamplingParams(max_new_tokens=24, stop_token_ids=(stop,)))
    outs = []
    while e.has_unfinished_requests():
        outs += e.step()
    assert outs[-1].finished and outs[-1].finish_reason == "stop"
    assert [t for o in outs for t in o.new_token_ids] == alone[1][:alone[1].index(stop) + 1]


# -- the async loop -------------------------------------------------------------------------------------------------
def _run(coro):
    return asyncio.run(asyncio.wait_for(coro, 300))


def test_async_engine_serves_concurrent_requests_with_their_tokens(tiny_llm, alone):
    async def main():
        eng = AsyncEngine(tiny_llm, max_queue=16)
        await eng.start()

        async def one(i, delay):
            await asyncio.sleep(delay)
            s = await eng.add_request(PROMPTS[i], _p(24))
            toks = []
            async for d in s:
                toks.extend(d.token_ids)
            return i, toks, s.finish_reason, s.ttft_s

        # arrivals 1 ms apart: each request needs 24 steps, so they overlap on any machine (50 ms apart let a fast
        # machine finish each request before the next arrived, and nothing was batched)
        res = await asyncio.gather(*(one(i, 0.001 * i) for i in range(len(PROMPTS))))
        await eng.shutdown(1)
        return res, eng.steps

    res, steps = _run(main())
    for i, toks, reason, ttft in res:
        assert toks == alone[i] and reason == "length" and ttft > 0
    assert steps < 24 * len(PROMPTS)  # batched: far fewer steps than one request after another
    assert tiny_llm.engine.num_used_blocks == 0


def test_async_engine_queue_full_abort_and_shutdown(tiny_llm):
    async def main():
        eng = AsyncEngine(tiny_llm, max_queue=1)
        await eng.start()
        long = _p(60)
        a = await eng.add_request(PROMPTS[0], long)
        for _ in range(500):  # until a is admitted (running): the queue is empty again
            if eng.num_running == 1:
                break
            await asyncio.sleep(0.01)
        b_task = asyncio.ensure_future(eng.add_request(PROMPTS[1], long))
        await asyncio.sleep(0)  # b registers its add; the loop has not applied it yet
        with pytest.raises(QueueFullError, match="full"):
            await eng.add_request(PROMPTS[2], long)  # b is still pending: one waiting already
        b = await b_task
        it = a.__aiter__()
        await it.__anext__()
        await it.aclose()  # the client went away: a is aborted
        for _ in range(200):
            if a.request_id not in eng.streams:
                break
            await asyncio.sleep(0.01)
        assert a.request_id not in eng.streams
        await eng.shutdown(grace_s=0)  # b is cancelled, not left running
        deltas = [d async for d in b]
        with pytest.raises(EngineStoppedError):
            await eng.add_request(PROMPTS[3], long)
        return deltas

    deltas = _run(main())
    assert deltas[-1].finished and deltas[-1].finish_reason == "abort"
    assert tiny_llm.engine.num_used_blocks == 0 and not tiny_llm.engine.has_unfinished_requests()


def test_async_engine_passes_validation_errors_to_the_caller(tiny_llm):
    async def main():
        eng = AsyncEngine(tiny_llm)
        with pytest.raises(InvalidArgumentError, match="prompts"):
            await eng.add_request([10 ** 6], _p(4))
        s = await eng.add_request(PROMPTS[4], _p(3))
        await s.collect()
        await eng.shutdown(1)
        return s

    s = _run(main())
    assert len(s.token_ids) == 3 and s.finish_reason == "length"


def test_async_engine_needs_a_decoder(tiny_bert):
    with pytest.raises(EngineStoppedError, match="encoder"):
        AsyncEngine(tiny_bert)
