"""serve.llm: the LLM API (generate, stream, chat, embed), its text handling and the backend rule."""
from __future__ import annotations

import types

import pytest
import torch

from anyaccel.core.errors import InvalidArgumentError
from anyaccel.models.runner import Engine
from anyaccel.serve import LLM, SamplingParams
from anyaccel.serve.llm import ServeError, TextState, choose_backend

PROMPTS = [[5, 9, 33] * 5, list(range(3, 30)), [7] * 20, [11]]
GREEDY = SamplingParams(max_new_tokens=12, ignore_eos=True)


def _alone(llm, prompt, params=GREEDY):
    return Engine(llm.model, num_blocks=32).generate([prompt], params)[0]


def test_generate_returns_the_engines_tokens_in_prompt_order(tiny_llm):
    outs = tiny_llm.generate(PROMPTS, GREEDY)
    assert [o.token_ids for o in outs] == [_alone(tiny_llm, p) for p in PROMPTS]
    assert [o.prompt_token_ids for o in outs] == PROMPTS
    assert all(o.finish_reason == "length" and len(o.token_ids) == 12 for o in outs)
    assert len({o.request_id for o in outs}) == len(PROMPTS)
    m = outs[0].metrics
    assert 0 < m.ttft_s <= m.total_s and m.tokens_per_s == pytest.approx(12 / m.total_s)
    assert tiny_llm.engine.num_used_blocks == 0 and not tiny_llm.engine.has_unfinished_requests()


def test_text_prompt_is_tokenized_and_output_decoded(tiny_llm, char_tokenizer):
    out = tiny_llm.generate("Hello there", GREEDY)[0]
    ids = char_tokenizer.encode("Hello there")
    assert out.prompt == "Hello there" and out.prompt_token_ids == ids
    assert out.token_ids == _alone(tiny_llm, ids)
    assert out.text == char_tokenizer.decode(out.token_ids)


def test_stop_token_finishes_with_reason_stop(tiny_llm):
    full = tiny_llm.generate([PROMPTS[1]], GREEDY)[0].token_ids
    stop = full[4]
    first = full.index(stop)
    out = tiny_llm.generate([PROMPTS[1]], SamplingParams(max_new_tokens=12, stop_token_ids=(stop,)))[0]
    assert out.finish_reason == "stop" and out.token_ids == full[:first + 1]


def test_stop_string_cuts_the_text_and_ends_the_request(tiny_llm):
    ref = tiny_llm.generate([PROMPTS[1]], GREEDY)[0]
    assert len(ref.text) >= 3, "the planted stop string needs a few characters of text"
    stop = ref.text[1:3]
    out = tiny_llm.generate([PROMPTS[1]], SamplingParams(max_new_tokens=12, ignore_eos=True, stop=(stop,)))[0]
    assert out.finish_reason == "stop"
    assert out.text == ref.text[:ref.text.index(stop)]
    assert len(out.token_ids) < 12
    assert tiny_llm.engine.num_used_blocks == 0


def test_stream_yields_the_same_tokens_and_text_as_generate(tiny_llm):
    ref = tiny_llm.generate([PROMPTS[2]], GREEDY)[0]
    deltas = list(tiny_llm.stream(PROMPTS[2], GREEDY))
    assert [t for d in deltas for t in d.token_ids] == ref.token_ids
    assert "".join(d.text for d in deltas) == ref.text
    assert [d.finished for d in deltas] == [False] * (len(deltas) - 1) + [True]
    assert deltas[-1].finish_reason == "length"


def test_leaving_a_stream_early_frees_its_blocks(tiny_llm):
    it = tiny_llm.stream(PROMPTS[1], SamplingParams(max_new_tokens=40, ignore_eos=True))
    next(it)
    assert tiny_llm.engine.num_used_blocks > 0
    it.close()
    assert tiny_llm.engine.num_used_blocks == 0 and not tiny_llm.engine.has_unfinished_requests()


def test_chat_goes_through_the_chat_template(tiny_llm, char_tokenizer):
    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    out = tiny_llm.chat(msgs, GREEDY)[0]
    ids = char_tokenizer.apply_chat_template(msgs)
    assert out.prompt_token_ids == ids and out.token_ids == _alone(tiny_llm, ids)
    both = tiny_llm.chat([msgs, [{"role": "user", "content": "yo"}]], GREEDY)
    assert both[0].token_ids == out.token_ids and len(both) == 2
    streamed = [t for d in tiny_llm.chat_stream(msgs, GREEDY) for t in d.token_ids]
    assert streamed == out.token_ids


@pytest.mark.parametrize("msgs, field", [([], "messages"), ([{"role": "bot", "content": "x"}], "messages[0].role"),
                                          ([{"role": "user", "content": 3}], "messages[0].content")])
def test_bad_chat_messages_name_the_field(tiny_llm, msgs, field):
    with pytest.raises(InvalidArgumentError, match=field.replace("[", r"\[").replace("]", r"\]")):
        tiny_llm.apply_chat_template(msgs)


@pytest.mark.parametrize("prompt", ["", [], [1.5, 2], None])
def test_bad_prompt_names_the_argument(tiny_llm, prompt):
    with pytest.raises(InvalidArgumentError, match="prompt"):
        tiny_llm.generate([prompt], GREEDY)


def test_params_list_must_match_the_prompts(tiny_llm):
    with pytest.raises(InvalidArgumentError, match="params"):
        tiny_llm.generate(PROMPTS[:2], [GREEDY])


def test_a_model_without_tokenizer_takes_ids_and_returns_no_text(tiny_llm):
    bare = LLM(tiny_llm.model, num_blocks=16)
    out = bare.generate([PROMPTS[0]], GREEDY)[0]
    assert out.text is None and out.token_ids == _alone(tiny_llm, PROMPTS[0])
    with pytest.raises(ServeError, match="no tokenizer"):
        bare.generate("text", GREEDY)


def test_encoder_embeds_and_refuses_to_generate(tiny_bert, tiny_llm, char_tokenizer):
    from anyaccel.models.real import encode_batch

    e = tiny_bert.embed(["hello world", "a"])
    assert e.shape == (2, tiny_bert.model.config.hidden_size) and e.dtype == torch.float32
    assert torch.allclose(e.norm(dim=-1), torch.ones(2), atol=1e-5)
    h = encode_batch(tiny_bert.model, [char_tokenizer.encode("hello world")])[0].float().mean(0)
    assert torch.allclose(e[0], h / h.norm(), atol=1e-5)
    with pytest.raises(ServeError, match="encoder"):
        tiny_bert.generate([[1, 2, 3]], GREEDY)
    with pytest.raises(ServeError, match="decoder"):
        tiny_llm.embed(["x"])


class _Tok:
    def decode(self, ids, skip_special_tokens=True):
        return "".join({1: "a", 2: "b", 3: "\ufffd", 4: "é", 5: "S", 6: "T"}[i] for i in ids)


def test_text_state_holds_back_an_incomplete_character():
    st = TextState(_Tok())
    assert st.push([1]) == "a"
    assert st.push([3]) == ""  # U+FFFD: half a character, not handed out
    assert st.push([2], final=True) == "\ufffdb"


def test_text_state_catches_a_stop_string_split_across_tokens():
    st = TextState(_Tok(), stop=("ST",))
    assert st.push([1]) == "a"
    assert st.push([5]) == ""  # could be the start of "ST": held back
    assert not st.stopped
    assert st.push([6]) == "" and st.stopped
    assert st.sent == "a"


def test_text_state_releases_held_text_when_no_stop_follows():
    st = TextState(_Tok(), stop=("ST",))
    assert st.push([5]) == ""
    assert st.push([1]) == "Sa"
    assert st.push([5]) == ""
    assert st.push([5]) == "S"  # "SS": the first S can no longer start "ST"
    assert st.push([2], final=True) == "Sb"


def _registry(backs):
    return types.SimpleNamespace(available=lambda: [b for b in backs if b.available],
                                 get=lambda n: next(b for b in backs if b.name == n))


def _b(name, device, available=True):
    return types.SimpleNamespace(name=name, available=available, reason="no device",
                                 definition=types.SimpleNamespace(device_type=device))


def test_backend_rule_prefers_an_accelerator_then_discovery_order(monkeypatch):
    import anyaccel.plugins as plugins

    backs = [_b("host", "cpu"), _b("other", "cpu"), _b("gpu-off", "xpu", False), _b("acc", "xpu")]
    monkeypatch.setattr(plugins, "get_registry", lambda: _registry(backs))
    assert choose_backend().name == "acc"
    monkeypatch.setattr(plugins, "get_registry", lambda: _registry(backs[:3]))
    assert choose_backend().name == "host"
    with pytest.raises(ServeError, match="gpu-off.*not available.*no device"):
        choose_backend("gpu-off")
    monkeypatch.setattr(plugins, "get_registry", lambda: _registry([backs[2]]))
    with pytest.raises(ServeError, match="no backend is available"):
        choose_backend()


def test_top_level_names_are_lazy():
    import subprocess
    import sys

    code = ("import sys, anyaccel; assert 'anyaccel.serve' not in sys.modules; "
            "assert anyaccel.LLM.__name__ == 'LLM'; assert anyaccel.SamplingParams.__name__ == 'SamplingParams'; "
            "assert 'anyaccel.serve' in sys.modules")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr


@pytest.mark.slow
def test_minilm_embeddings_match_transformers_mean_pooling(cpu_backend):
    from anyaccel.models import real

    ck = real.minilm()
    if isinstance(ck, real.Missing):
        pytest.skip(ck.reason)
    from transformers import AutoModel, AutoTokenizer

    llm = LLM("minilm", backend="cpu")
    texts = ["A man is eating food.", "The weather is lovely today, isn't it?"]
    ours = llm.embed(texts)
    tok = AutoTokenizer.from_pretrained(ck.path)
    hf = AutoModel.from_pretrained(ck.path).eval()
    enc = tok(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        h = hf(**enc).last_hidden_state
    ref = real.mean_pool_normalize(h, enc["attention_mask"])
    torch.testing.assert_close(ours, ref, atol=1e-4, rtol=1e-4)
    assert (ours[0] @ ours[1]).item() < 0.9  # different sentences are not the same vector
