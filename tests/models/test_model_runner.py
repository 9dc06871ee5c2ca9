"""models.runner: continuous batching over a paged KV cache, preemption, stopping, seeded sampling.

(Named test_model_runner.py so its basename differs from tests/conformance/test_runner.py.)
"""
from __future__ import annotations

import pytest
import torch

from anyaccel.core.errors import InvalidArgumentError
from anyaccel.models import build_model
from anyaccel.models.runner import Engine, OutOfKVBlocksError, teacher_forced_logits
from anyaccel.models.sampling import SamplingParams

PROMPTS = [[5, 9, 33] * 5, list(range(3, 30)), [7] * 20, [8, 9] * 8, [11]]
GREEDY = SamplingParams(max_new_tokens=20, ignore_eos=True)
SEEDED = SamplingParams(max_new_tokens=20, temperature=1.0, top_k=40, top_p=0.95, seed=5, ignore_eos=True)


# Small blocks (16 tokens) so the tiny prompts below span several blocks and the block counts in the tests mean
# something, whatever block size the backend prefers.
BLOCK = 16


@pytest.fixture(scope="module")
def llama(cpu_backend, reference_models):
    return build_model(reference_models("llama"), cpu_backend, torch.float32, block_size=BLOCK)


@pytest.fixture(scope="module")
def mistral(cpu_backend, reference_models):
    return build_model(reference_models("mistral"), cpu_backend, torch.float32, block_size=BLOCK)


@pytest.fixture(scope="module")
def alone(llama):
    """Each prompt generated on its own, with plenty of blocks."""
    e = Engine(llama, num_blocks=64)
    return {p: [e.generate([x], p)[0] for x in PROMPTS] for p in (GREEDY, SEEDED)}


def test_greedy_matches_transformers(llama, reference_models):
    hf = reference_models("llama")
    prompt = PROMPTS[1]
    with torch.no_grad():
        ref = hf.generate(torch.tensor([prompt]), max_new_tokens=20, min_new_tokens=20, do_sample=False)
    ours = Engine(llama, num_blocks=16).generate([prompt], GREEDY)[0]
    assert ours == ref[0, len(prompt):].tolist()


@pytest.mark.parametrize("name", ["llama", "mistral"])
def test_mixed_batch_equals_each_sequence_alone(name, request):
    model = request.getfixturevalue(name)
    e = Engine(model, num_blocks=64)
    together = e.generate(PROMPTS, GREEDY)
    for prompt, got in zip(PROMPTS, together):
        assert got == e.generate([prompt], GREEDY)[0]
    assert e.stats.steps == 20  # alone: one prefill step + 19 decode steps, nothing else
    assert all(len(x) == 20 for x in together)


def test_prefill_and_decode_share_steps_and_chunked_prefill(llama, alone):
    # 8 tokens per step: prompts are prefilled in chunks, interleaved with other sequences' decode tokens
    e = Engine(llama, num_blocks=64, max_num_batched_tokens=8)
    assert e.generate(PROMPTS, GREEDY) == alone[GREEDY]
    assert e.stats.prefill_tokens == sum(len(p) for p in PROMPTS)
    # a later arrival joins a running batch: max_num_seqs=2 keeps the rest waiting until a slot frees up
    e2 = Engine(llama, num_blocks=64, max_num_seqs=2)
    assert e2.generate(PROMPTS, GREEDY) == alone[GREEDY]


def test_preemption_recomputes_without_corrupting_anything(llama, alone):
    e = Engine(llama, num_blocks=4)  # 4 blocks of 16: two or three sequences at a time at most
    out = e.generate(PROMPTS, GREEDY)
    assert e.stats.preemptions > 0
    assert out == alone[GREEDY]
    assert e.allocator.num_free == 4
    e = Engine(llama, num_blocks=4)
    assert e.generate(PROMPTS, SEEDED) == alone[SEEDED]  # the generator survives preemption
    assert e.stats.preemptions > 0


def test_out_of_blocks_without_preemption_raises_and_frees(llama, alone):
    e = Engine(llama, num_blocks=4, preemption=False)
    with pytest.raises(OutOfKVBlocksError, match="out of KV blocks"):
        e.generate(PROMPTS, GREEDY)
    assert e.allocator.num_free == 4  # every block went back to the pool
    assert e.generate(PROMPTS[:1], GREEDY) == alone[GREEDY][:1]  # and the engine still works


def test_a_sequence_too_long_for_the_cache_is_refused_up_front(llama):
    e = Engine(llama, num_blocks=2)
    with pytest.raises(OutOfKVBlocksError, match=r"sequence 1 needs 3 KV blocks .* only 2 blocks"):
        e.generate([[3], [4] * 30], SamplingParams(max_new_tokens=10))
    assert e.allocator.num_free == 2


def test_kv_budget_in_bytes(llama):
    specs = llama.kv_cache_specs()
    per_block = sum(2 * s.block_size * s.num_kv_heads * s.head_size * 4 for s in specs)  # float32 K and V
    e = Engine(llama, kv_budget_bytes=10 * per_block + per_block // 2)
    assert e.num_blocks == 10
    assert e.bytes_per_block == per_block
    assert e.kv_caches[0][0].shape[0] == 10
    with pytest.raises(InvalidArgumentError, match="kv_budget_bytes"):
        Engine(llama, kv_budget_bytes=per_block - 1)
    with pytest.raises(InvalidArgumentError, match="exactly one"):
        Engine(llama, kv_budget_bytes=per_block, num_blocks=3)


def test_eos_and_stop_tokens_and_budget(cpu_backend, reference_models, llama, alone):
    ref = alone[GREEDY][1]
    stop = ref[5]
    first = ref.index(stop)
    e = Engine(llama, num_blocks=16)
    assert e.generate([PROMPTS[1]], SamplingParams(max_new_tokens=20, stop_token_ids=[stop]))[0] == ref[:first + 1]
    assert e.generate([PROMPTS[1]], SamplingParams(max_new_tokens=3, ignore_eos=True))[0] == ref[:3]
    hf = reference_models("llama")
    saved = hf.config.eos_token_id
    hf.config.eos_token_id = stop
    try:
        eos_model = build_model(hf, cpu_backend, torch.float32)
    finally:
        hf.config.eos_token_id = saved
    e = Engine(eos_model, num_blocks=16)
    assert e.generate([PROMPTS[1]], SamplingParams(max_new_tokens=20))[0] == ref[:first + 1]
    assert e.generate([PROMPTS[1]], GREEDY)[0] == ref  # ignore_eos


def test_seeded_sampling_reproducible_and_batch_independent(llama, alone):
    e = Engine(llama, num_blocks=64)
    a = e.generate(PROMPTS, SEEDED)
    assert a == e.generate(PROMPTS, SEEDED)
    assert a == alone[SEEDED]  # a sequence's tokens do not depend on its batch
    assert list(reversed(e.generate(list(reversed(PROMPTS)), SEEDED))) == a
    other = SamplingParams(max_new_tokens=20, temperature=1.0, top_k=40, top_p=0.95, seed=6, ignore_eos=True)
    assert e.generate(PROMPTS, other) != a
    assert a != alone[GREEDY]
    per_prompt = e.generate(PROMPTS[:2], [GREEDY, SEEDED])  # params per prompt
    assert per_prompt == [alone[GREEDY][0], alone[SEEDED][1]]


def test_teacher_forced_logits_match_transformers(llama, reference_models):
    ids = PROMPTS[1]
    with torch.no_grad():
        ref = reference_models("llama")(torch.tensor([ids])).logits[0]
    torch.testing.assert_close(teacher_forced_logits(llama, ids), ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("prompts,params,argument", [
    ([], None, "prompts"),
    ([[]], None, "prompts[0]"),
    ([[1, 2], [3, 10_000]], None, "prompts[1]"),
    ([[1, -1]], None, "prompts[0]"),
    ([[1]], [GREEDY, GREEDY], "params"),
    ([[1] * 250], SamplingParams(max_new_tokens=10), "prompts[0]"),  # beyond max_position_embeddings 256
])
def test_invalid_requests_name_the_argument(llama, prompts, params, argument):
    e = Engine(llama, num_blocks=64)
    with pytest.raises(InvalidArgumentError) as err:
        e.generate(prompts, params)
    assert err.value.argument == argument


def test_encoders_are_refused(cpu_backend, reference_models):
    bert = build_model(reference_models("bert"), cpu_backend, torch.float32)
    with pytest.raises(InvalidArgumentError, match="encoder"):
        Engine(bert, num_blocks=4)
