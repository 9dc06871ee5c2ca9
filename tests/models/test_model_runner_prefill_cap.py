"""models.runner: the scheduler's cap on prompt tokens per step while other sequences decode
(``max_prefill_tokens_while_decoding``), and log-probabilities returned with the tokens.

(Beside test_model_runner.py; the cap bounds how much an admitted prompt stretches the running decodes' steps.)
"""
from __future__ import annotations

import pytest
import torch

from anyaccel.core.errors import InvalidArgumentError
from anyaccel.models import build_model
from anyaccel.models.runner import Engine, teacher_forced_logits
from anyaccel.models.sampling import SamplingParams

BLOCK = 16
LONG = list(range(3, 43))  # 40 prompt tokens
SHORT = [5, 9, 33, 12]


@pytest.fixture(scope="module")
def llama(cpu_backend, reference_models):
    return build_model(reference_models("llama"), cpu_backend, torch.float32, block_size=BLOCK)


def _drive(engine):
    """Admit SHORT, let it decode, then admit LONG; per step: (prompt tokens, decode tokens, new tokens by id)."""
    p = SamplingParams(max_new_tokens=12, ignore_eos=True)
    engine.add_request("a", SHORT, p)
    log, out = [], {"a": [], "b": []}
    for i in range(40):
        if i == 2:
            engine.add_request("b", LONG, p)
        if not engine.has_unfinished_requests():
            break
        before = (engine.stats.prefill_tokens, engine.stats.decode_tokens)
        step = engine.step()
        for o in step:
            out[o.request_id].extend(o.new_token_ids)
        log.append((engine.stats.prefill_tokens - before[0], engine.stats.decode_tokens - before[1],
                    {o.request_id: len(o.new_token_ids) for o in step}))
    return log, out


def test_prefill_is_capped_while_decoding_and_tokens_do_not_change(llama):
    capped_log, capped = _drive(Engine(llama, num_blocks=32, max_prefill_tokens_while_decoding=8))
    free_log, free = _drive(Engine(llama, num_blocks=32))
    assert capped == free and len(capped["a"]) == len(capped["b"]) == 12  # the cap moves work, not results
    # with the cap, LONG's 40 prompt tokens arrive 8 per step and "a" decodes a token in every one of those steps
    while_b_prefills = [entry for entry in capped_log[2:] if entry[0] > 0]
    assert [e[0] for e in while_b_prefills] == [8] * 5
    assert all(e[2].get("a") == 1 for e in while_b_prefills)
    # without it, LONG is prefilled in one step (beside a's decode)
    assert [e[0] for e in free_log[2:] if e[0] > 0] == [40]


def test_a_step_without_decodes_uses_the_whole_budget(llama):
    e = Engine(llama, num_blocks=32, max_prefill_tokens_while_decoding=8)
    e.add_request("b", LONG, SamplingParams(max_new_tokens=2, ignore_eos=True))
    e.step()
    assert e.stats.prefill_tokens == 40  # nobody decodes: nothing to protect, no cap


@pytest.mark.parametrize("cap", [0, -1, 2.5, True])
def test_bad_cap_names_the_argument(llama, cap):
    with pytest.raises(InvalidArgumentError, match="max_prefill_tokens_while_decoding"):
        Engine(llama, num_blocks=8, max_prefill_tokens_while_decoding=cap)


def test_logprobs_come_with_each_token(llama):
    e = Engine(llama, num_blocks=32)
    e.add_request("x", SHORT, SamplingParams(max_new_tokens=5, ignore_eos=True, logprobs=3))
    e.add_request("y", LONG, SamplingParams(max_new_tokens=5, ignore_eos=True))
    toks, lps = {"x": [], "y": []}, {"x": [], "y": []}
    while e.has_unfinished_requests():
        for o in e.step():
            toks[o.request_id].extend(o.new_token_ids)
            lps[o.request_id].extend(o.logprobs)
    assert lps["y"] == [] and len(lps["x"]) == 5
    ref = torch.log_softmax(teacher_forced_logits(llama, SHORT + toks["x"][:-1]).float(), -1)[len(SHORT) - 1:]
    for i, (lp, top) in enumerate(lps["x"]):
        assert lp == pytest.approx(float(ref[i, toks["x"][i]]), abs=1e-4)
        assert [t for t, _ in top] == torch.topk(ref[i], 3).indices.tolist()
        assert top[0][0] == toks["x"][i]  # greedy picks the most likely
