"""serve.app: the OpenAI-compatible server on loopback, driven by the official ``openai`` client.

Every answer is checked against LLM.generate (same greedy tokens); errors against their status, field and code;
a bounded load test runs concurrent streams and checks that none is lost and the KV pool returns to empty.
"""
from __future__ import annotations

import asyncio
import json
import time

import pytest

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

from anyaccel.serve import SamplingParams  # noqa: E402
from anyaccel.serve.app import ServerThread, build_app  # noqa: E402

KEYLESS = "unused"


@pytest.fixture(scope="module")
def server(tiny_llm, tiny_bert):
    with ServerThread(build_app(tiny_llm, embed_llm=tiny_bert, max_queue=32)) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEYLESS, max_retries=0, timeout=120)


def _idle(llm, timeout=30.0):
    """Wait until the engine holds no request and no block (the loop frees them between steps)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not llm.engine.has_unfinished_requests() and llm.engine.num_used_blocks == 0:
            return True
        time.sleep(0.05)
    return False


def _ref(llm, prompt, n):
    return llm.generate(prompt, SamplingParams(max_new_tokens=n, ignore_eos=True))[0]


def test_completion_text_prompt_matches_llm_generate(client, tiny_llm):
    ref = _ref(tiny_llm, "Hello there", 12)
    r = client.completions.create(model="tiny-llama", prompt="Hello there", max_tokens=12, temperature=0,
                                  extra_body={"ignore_eos": True})
    c = r.choices[0]
    assert c.text == ref.text and c.model_extra["token_ids"] == ref.token_ids
    assert c.finish_reason == "length"
    assert r.usage.prompt_tokens == len(ref.prompt_token_ids) and r.usage.completion_tokens == 12


def test_completion_token_id_prompt_and_stream(client, tiny_llm):
    prompt = list(range(3, 30))
    ref = _ref(tiny_llm, prompt, 10)
    chunks = list(client.completions.create(model="tiny-llama", prompt=prompt, max_tokens=10, temperature=0,
                                            stream=True, stream_options={"include_usage": True},
                                            extra_body={"ignore_eos": True}))
    texts = [ch.choices[0].text for ch in chunks if ch.choices]
    ids = [t for ch in chunks if ch.choices for t in ch.choices[0].model_extra["token_ids"]]
    assert "".join(texts) == ref.text and ids == ref.token_ids
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == 10


def test_chat_completion_and_chat_stream(client, tiny_llm):
    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    ref = tiny_llm.chat(msgs, SamplingParams(max_new_tokens=9, ignore_eos=True))[0]
    r = client.chat.completions.create(model="tiny-llama", messages=msgs, max_tokens=9, temperature=0,
                                       extra_body={"ignore_eos": True})
    assert r.choices[0].message.role == "assistant" and r.choices[0].message.content == ref.text
    assert r.choices[0].model_extra["token_ids"] == ref.token_ids and r.usage.completion_tokens == 9
    s = list(client.chat.completions.create(model="tiny-llama", messages=msgs, max_tokens=9, temperature=0,
                                            stream=True, extra_body={"ignore_eos": True}))
    assert s[0].choices[0].delta.role == "assistant"
    assert "".join(ch.choices[0].delta.content or "" for ch in s) == ref.text
    assert s[-1].choices[0].finish_reason == "length"


def test_stop_string_over_http(client, tiny_llm):
    ref = _ref(tiny_llm, "Hello there", 12)
    stop = ref.text[1:3]
    r = client.completions.create(model="tiny-llama", prompt="Hello there", max_tokens=12, temperature=0,
                                  stop=[stop], extra_body={"ignore_eos": True})
    assert r.choices[0].text == ref.text[:ref.text.index(stop)] and r.choices[0].finish_reason == "stop"


def _expected_logprobs(llm, prompt_ids, out_ids):
    """log_softmax of the model's teacher-forced logits at each generated position (one fresh paged prefill)."""
    import torch

    from anyaccel.models.runner import teacher_forced_logits

    logits = teacher_forced_logits(llm.model, list(prompt_ids) + list(out_ids)[:-1])
    return torch.log_softmax(logits.float(), dim=-1)[len(prompt_ids) - 1:]


def test_completion_logprobs_are_the_models(client, tiny_llm, char_tokenizer):
    prompt = list(range(10, 30))
    r = client.completions.create(model="tiny-llama", prompt=prompt, max_tokens=6, temperature=0, logprobs=3,
                                  extra_body={"ignore_eos": True})
    c = r.choices[0]
    ids = c.model_extra["token_ids"]
    lp = c.logprobs
    assert len(lp.token_logprobs) == len(lp.tokens) == len(lp.top_logprobs) == len(ids) == 6
    ref = _expected_logprobs(tiny_llm, prompt, ids)
    for i, t in enumerate(ids):
        assert lp.token_logprobs[i] == pytest.approx(float(ref[i, t]), abs=1e-4)
        assert lp.tokens[i] == char_tokenizer.decode([t])
        top = lp.top_logprobs[i]
        assert len(top) == 3 and max(top.values()) == pytest.approx(lp.token_logprobs[i], abs=1e-6)  # greedy
        best = sorted(range(ref.shape[1]), key=lambda j: -float(ref[i, j]))[:3]
        assert sorted(top.values(), reverse=True) == pytest.approx([float(ref[i, j]) for j in best], abs=1e-4)
    assert lp.text_offset == [sum(len(x) for x in lp.tokens[:i]) for i in range(6)]
    # streamed: the same logprobs, chunk by chunk
    chunks = list(client.completions.create(model="tiny-llama", prompt=prompt, max_tokens=6, temperature=0,
                                            logprobs=3, stream=True, extra_body={"ignore_eos": True}))
    got = [x for ch in chunks if ch.choices and ch.choices[0].logprobs for x in ch.choices[0].logprobs.token_logprobs]
    offs = [x for ch in chunks if ch.choices and ch.choices[0].logprobs for x in ch.choices[0].logprobs.text_offset]
    assert got == pytest.approx(lp.token_logprobs, abs=1e-6) and offs == lp.text_offset
    plain = client.completions.create(model="tiny-llama", prompt=prompt, max_tokens=2, temperature=0)
    assert plain.choices[0].logprobs is None


def test_chat_logprobs_and_top_logprobs(client, tiny_llm):
    msgs = [{"role": "user", "content": "Hi!"}]
    r = client.chat.completions.create(model="tiny-llama", messages=msgs, max_tokens=5, temperature=0,
                                       logprobs=True, top_logprobs=2, extra_body={"ignore_eos": True})
    c = r.choices[0]
    ids = c.model_extra["token_ids"]
    content = c.logprobs.content
    assert len(content) == len(ids) == r.usage.completion_tokens
    ref = _expected_logprobs(tiny_llm, tiny_llm.apply_chat_template(msgs), ids)
    for i, (e, t) in enumerate(zip(content, ids)):
        assert e.logprob == pytest.approx(float(ref[i, t]), abs=1e-4)
        assert bytes(e.bytes).decode() == e.token
        assert len(e.top_logprobs) == 2 and e.top_logprobs[0].token == e.token  # greedy: the best is the chosen
        assert e.top_logprobs[0].logprob >= e.top_logprobs[1].logprob
    only = client.chat.completions.create(model="tiny-llama", messages=msgs, max_tokens=3, temperature=0,
                                          logprobs=True)
    assert all(e.top_logprobs == [] for e in only.choices[0].logprobs.content)
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="tiny-llama", messages=msgs, max_tokens=3, top_logprobs=2)
    assert e.value.body["param"] == "top_logprobs"


def test_n_choices_are_seeded_per_choice_and_match_llm_generate(client, tiny_llm):
    prompt = list(range(5, 25))
    r = client.completions.create(model="tiny-llama", prompt=prompt, max_tokens=8, temperature=1.0, seed=7, n=3,
                                  extra_body={"ignore_eos": True})
    assert [c.index for c in r.choices] == [0, 1, 2]
    got = [c.model_extra["token_ids"] for c in r.choices]
    want = [_sampled(tiny_llm, prompt, 8, 7 + i) for i in range(3)]
    assert got == want and len({tuple(g) for g in got}) > 1  # distinct seeds give distinct samples
    assert r.usage.completion_tokens == 24 and r.usage.prompt_tokens == len(prompt)
    api = tiny_llm.generate(prompt, SamplingParams(max_new_tokens=8, temperature=1.0, seed=7, n=3,
                                                   ignore_eos=True))[0]
    assert [o.token_ids for o in api.outputs] == want and api.token_ids == want[0]
    assert [o.index for o in api.outputs] == [0, 1, 2]


def test_n_choices_stream_interleaved_by_index(client, tiny_llm):
    msgs = [{"role": "user", "content": "Tell me"}]
    kw = dict(model="tiny-llama", messages=msgs, max_tokens=6, temperature=1.0, seed=3, n=2,
              extra_body={"ignore_eos": True})
    whole = client.chat.completions.create(**kw)
    texts, reasons = {0: "", 1: ""}, {}
    for ch in client.chat.completions.create(stream=True, **kw):
        for c in ch.choices:
            texts[c.index] += c.delta.content or ""
            if c.finish_reason:
                reasons[c.index] = c.finish_reason
    assert texts == {c.index: c.message.content for c in whole.choices}
    assert reasons == {0: "length", 1: "length"}
    assert _idle(tiny_llm)


def _sampled(llm, prompt, n, seed):
    return llm.generate(prompt, SamplingParams(max_new_tokens=n, temperature=1.0, seed=seed,
                                               ignore_eos=True))[0].token_ids


def test_embeddings_and_models(client, tiny_bert):
    r = client.embeddings.create(model="tiny-bert", input=["hello world", "a"])
    ref = tiny_bert.embed(["hello world", "a"])
    assert [d.index for d in r.data] == [0, 1]
    assert max(abs(a - b) for d, row in zip(r.data, ref.tolist()) for a, b in zip(d.embedding, row)) < 1e-6
    f = client.embeddings.create(model="tiny-bert", input="hello world", encoding_format="float")
    assert max(abs(a - b) for a, b in zip(f.data[0].embedding, ref[0].tolist())) < 1e-6
    ids = [m.id for m in client.models.list().data]
    assert ids == ["tiny-llama", "tiny-bert"]


@pytest.mark.parametrize("kwargs, param", [
    (dict(max_tokens=0), "max_tokens"),
    (dict(temperature=5), "temperature"),
    (dict(top_p=0), "top_p"),
    (dict(n=17), "n"),
    (dict(echo=True), "echo"),
    (dict(stop=[""]), "stop"),
    (dict(extra_body={"seed": -1}), "seed"),
    (dict(logprobs=21), "logprobs"),
])
def test_bad_parameters_are_400_naming_the_field(client, kwargs, param):
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="tiny-llama", prompt="hi", **kwargs)
    assert e.value.body["param"] == param and param in e.value.body["message"]
    assert e.value.body["type"] == "invalid_request_error"


def test_bad_prompt_messages_and_input_name_the_field(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="tiny-llama", prompt=[])
    assert e.value.body["param"] == "prompt"
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="tiny-llama", prompt=[1, 10 ** 6])
    assert e.value.body["param"] == "prompt"
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="tiny-llama", messages=[{"role": "robot", "content": "x"}])
    assert e.value.body["param"] == "messages[0].role"
    with pytest.raises(openai.BadRequestError) as e:
        client.embeddings.create(model="tiny-bert", input=[""])
    assert e.value.body["param"] == "input"


def test_prompt_over_the_context_is_400_context_length_exceeded(client, tiny_llm):
    ctx = tiny_llm.max_model_len
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="tiny-llama", prompt=[5] * ctx, max_tokens=1)
    assert e.value.body["code"] == "context_length_exceeded" and e.value.body["param"] == "prompt"
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="tiny-llama", prompt=[5] * 10, max_tokens=ctx)
    assert e.value.body["code"] == "context_length_exceeded" and e.value.body["param"] == "max_tokens"


def test_unknown_model_is_404(client):
    with pytest.raises(openai.NotFoundError) as e:
        client.completions.create(model="gpt-9", prompt="hi")
    assert e.value.body["param"] == "model"


def test_bad_json_is_400(server):
    r = httpx.post(server.url + "/v1/completions", content=b"{not json", timeout=30)
    assert r.status_code == 400 and "JSON" in r.json()["error"]["message"]


def test_health_and_metrics(server, client):
    assert httpx.get(server.url + "/health", timeout=30).json() == {"status": "ok"}
    client.completions.create(model="tiny-llama", prompt=[5, 6, 7], max_tokens=3, temperature=0)
    text = httpx.get(server.url + "/metrics", timeout=30).text
    for name in ("anyaccel_requests_waiting", "anyaccel_sequences_running", "anyaccel_kv_blocks_used",
                 "anyaccel_generation_tokens_per_second", "anyaccel_time_to_first_token_seconds_bucket",
                 "anyaccel_inter_token_latency_seconds_bucket"):
        assert name in text, name
    count = [ln for ln in text.splitlines() if ln.startswith("anyaccel_time_to_first_token_seconds_count")]
    assert count and float(count[0].split()[-1]) >= 1


def test_client_disconnect_mid_stream_frees_the_blocks(server, tiny_llm):
    body = {"model": "tiny-llama", "prompt": list(range(3, 40)), "max_tokens": 200, "temperature": 0,
            "stream": True, "ignore_eos": True}
    with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=60) as r:
        lines = r.iter_lines()
        first = next(ln for ln in lines if ln.startswith("data:"))
        assert json.loads(first[5:])["choices"][0]["finish_reason"] is None
        assert tiny_llm.engine.num_used_blocks > 0
    assert _idle(tiny_llm), "the aborted stream kept its blocks"


def test_client_disconnect_of_a_plain_request_frees_the_blocks(server, tiny_llm, monkeypatch):
    import threading

    gate = threading.Event()  # holds every step (in the loop's worker thread) until the client has given up
    step = tiny_llm.engine.step

    def held_step():
        out = step()
        gate.wait(30)
        return out

    monkeypatch.setattr(tiny_llm.engine, "step", held_step)
    body = {"model": "tiny-llama", "prompt": list(range(3, 40)), "max_tokens": 50, "temperature": 0,
            "ignore_eos": True}
    try:
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(server.url + "/v1/completions", json=body, timeout=1.0)
        assert tiny_llm.engine.has_unfinished_requests()
    finally:
        gate.set()
    assert _idle(tiny_llm), "the abandoned request kept running"
    text = httpx.get(server.url + "/metrics", timeout=30).text
    assert 'anyaccel_requests_finished_total{finish_reason="abort",model="tiny-llama"}' in text


def test_api_key_is_required_when_set(tiny_llm):
    with ServerThread(build_app(tiny_llm, api_key="sekret")) as srv:
        bad = openai.OpenAI(base_url=srv.url + "/v1", api_key="wrong", max_retries=0)
        with pytest.raises(openai.AuthenticationError):
            bad.models.list()
        good = openai.OpenAI(base_url=srv.url + "/v1", api_key="sekret", max_retries=0)
        assert good.models.list().data[0].id == "tiny-llama"
        assert httpx.get(srv.url + "/health", timeout=30).status_code == 200  # health needs no key


def test_full_queue_is_429(tiny_llm):
    with ServerThread(build_app(tiny_llm, max_queue=1)) as srv:
        async def main():
            c = openai.AsyncOpenAI(base_url=srv.url + "/v1", api_key=KEYLESS, max_retries=0, timeout=120)

            async def one(i):
                try:
                    r = await c.completions.create(model="tiny-llama", prompt=[5 + i] * 8, max_tokens=30,
                                                   temperature=0, extra_body={"ignore_eos": True})
                    return r.choices[0].model_extra["token_ids"]
                except openai.RateLimitError as e:
                    assert e.body["code"] == "queue_full"
                    return None

            return await asyncio.gather(*(one(i) for i in range(6)))

        res = asyncio.run(main())
    assert any(r is None for r in res), "six simultaneous requests on a queue of one: some must be refused"
    served = [(i, r) for i, r in enumerate(res) if r is not None]
    assert served
    for i, r in served:
        assert r == _ref(tiny_llm, [5 + i] * 8, 30).token_ids
    assert _idle(tiny_llm)


@pytest.mark.slow
def test_load_concurrent_streams_all_complete_with_the_right_tokens(server, tiny_llm):
    """Bounded load: 24 streaming requests, 8 at a time, varied prompts and lengths; none lost, none wrong."""
    jobs = [(list(range(3 + i, 3 + i + 4 + 3 * (i % 7))), 8 + 5 * (i % 5)) for i in range(24)]
    refs = [_ref(tiny_llm, p, n).token_ids for p, n in jobs]

    async def main():
        c = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key=KEYLESS, max_retries=0, timeout=300)
        sem = asyncio.Semaphore(8)

        async def one(p, n):
            async with sem:
                s = await c.completions.create(model="tiny-llama", prompt=p, max_tokens=n, temperature=0,
                                               stream=True, extra_body={"ignore_eos": True})
                ids, reason = [], None
                async for ch in s:
                    ids += ch.choices[0].model_extra["token_ids"]
                    reason = ch.choices[0].finish_reason or reason
                return ids, reason

        return await asyncio.gather(*(one(p, n) for p, n in jobs))

    res = asyncio.run(asyncio.wait_for(main(), 600))
    assert [r[0] for r in res] == refs
    assert all(r[1] == "length" for r in res)
    assert _idle(tiny_llm)


@pytest.mark.slow
def test_smollm2_served_tokens_equal_llm_generate():
    """The real checkpoint end to end: chat (plain and streamed) over HTTP gives LLM.chat's greedy tokens."""
    from anyaccel.models import real
    from anyaccel.serve import LLM

    ck = real.smollm2()
    if isinstance(ck, real.Missing):
        pytest.skip(ck.reason)
    llm = LLM("smollm2", backend="cpu", kv_cache_bytes=64 * 1024 * 1024, max_num_seqs=4)
    msgs = [{"role": "user", "content": "What is the capital of France?"}]
    ref = llm.chat(msgs, SamplingParams(max_new_tokens=12))[0]
    assert "Paris" in ref.text
    with ServerThread(build_app(llm)) as srv:
        c = openai.OpenAI(base_url=srv.url + "/v1", api_key=KEYLESS, max_retries=0, timeout=300)
        r = c.chat.completions.create(model="smollm2", messages=msgs, max_tokens=12, temperature=0)
        assert r.choices[0].model_extra["token_ids"] == ref.token_ids
        assert r.choices[0].message.content == ref.text and r.choices[0].finish_reason == ref.finish_reason
        s = c.chat.completions.create(model="smollm2", messages=msgs, max_tokens=12, temperature=0, stream=True)
        assert "".join(ch.choices[0].delta.content or "" for ch in s) == ref.text
