"""models.sampling: parameter validation, top-k / top-p on crafted logits, seeded reproducibility."""
from __future__ import annotations

import math

import pytest
import torch

from anyaccel.core.errors import InvalidArgumentError
from anyaccel.models.sampling import Sampler, SamplingParams, apply_top_k_top_p, make_generator


@pytest.mark.parametrize("kwargs,argument", [
    (dict(max_new_tokens=0), "max_new_tokens"),
    (dict(max_new_tokens=2.0), "max_new_tokens"),
    (dict(temperature=-0.1), "temperature"),
    (dict(temperature=float("nan")), "temperature"),
    (dict(top_k=-1), "top_k"),
    (dict(top_k=1.5), "top_k"),
    (dict(top_p=0.0), "top_p"),
    (dict(top_p=1.01), "top_p"),
    (dict(seed=-3), "seed"),
    (dict(stop_token_ids=5), "stop_token_ids"),
    (dict(stop_token_ids=(1, -2)), "stop_token_ids"),
])
def test_invalid_params_name_the_argument(kwargs, argument):
    with pytest.raises(InvalidArgumentError) as e:
        SamplingParams(**kwargs)
    assert e.value.argument == argument
    assert argument in str(e.value)


def test_stop_tokens_checked_against_vocab():
    p = SamplingParams(stop_token_ids=[3, 99])
    assert p.stop_token_ids == (3, 99)
    with pytest.raises(InvalidArgumentError, match="vocab_size 50"):
        p.check_vocab(50)


def _finite(x):
    return torch.isfinite(x).nonzero().flatten().tolist()


def test_top_k_keeps_exactly_the_k_largest():
    logits = torch.tensor([0.5, 3.0, -1.0, 2.0, 1.0])
    assert sorted(_finite(apply_top_k_top_p(logits, 2, 1.0))) == [1, 3]
    assert sorted(_finite(apply_top_k_top_p(logits, 1, 1.0))) == [1]
    assert len(_finite(apply_top_k_top_p(logits, 0, 1.0))) == 5  # 0: no limit
    assert len(_finite(apply_top_k_top_p(logits, 10, 1.0))) == 5
    kept = apply_top_k_top_p(logits, 2, 1.0)
    assert torch.equal(kept[[1, 3]], logits[[1, 3]])  # survivors are unchanged


def test_top_p_keeps_the_smallest_nucleus_reaching_p():
    probs = torch.tensor([0.05, 0.5, 0.15, 0.3])
    logits = probs.log()
    assert sorted(_finite(apply_top_k_top_p(logits, None, 0.7))) == [1, 3]  # 0.5 + 0.3 crosses 0.7
    assert sorted(_finite(apply_top_k_top_p(logits, None, 0.79))) == [1, 3]
    assert sorted(_finite(apply_top_k_top_p(logits, None, 0.81))) == [1, 2, 3]
    assert _finite(apply_top_k_top_p(logits, None, 0.2)) == [1]  # the top token always survives
    assert sorted(_finite(apply_top_k_top_p(logits, 3, 0.99))) == [1, 2, 3]  # top-k first, then top-p


def test_greedy_is_argmax():
    logits = torch.randn(4, 50, generator=torch.Generator().manual_seed(0))
    out = Sampler()(logits, [SamplingParams()] * 4, [None] * 4)
    assert out == logits.argmax(-1).tolist()


def test_seeded_sampling_is_reproducible_and_seed_dependent():
    logits = torch.randn(1, 100, generator=torch.Generator().manual_seed(1))
    p = SamplingParams(temperature=1.0, seed=123)

    def draw(params):
        g = make_generator(params, torch.device("cpu"))
        return [Sampler()(logits, [params], [g])[0] for _ in range(30)]

    assert draw(p) == draw(p)
    assert draw(p) != draw(SamplingParams(temperature=1.0, seed=124))


def test_sampling_frequencies_follow_the_filtered_distribution():
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    logits = probs.log().unsqueeze(0)
    p = SamplingParams(temperature=1.0, top_p=0.8, seed=0)
    g = make_generator(p, torch.device("cpu"))
    n = 3000
    draws = [Sampler()(logits, [p], [g])[0] for _ in range(n)]
    assert set(draws) <= {0, 1}  # tokens outside the nucleus are never drawn
    frac0 = draws.count(0) / n
    expected = 0.5 / 0.8
    assert abs(frac0 - expected) < 4 * math.sqrt(expected * (1 - expected) / n)


def test_temperature_sharpens():
    logits = torch.tensor([[1.0, 0.0]])
    cold = SamplingParams(temperature=0.05, seed=3)
    g = make_generator(cold, torch.device("cpu"))
    assert all(Sampler()(logits, [cold], [g])[0] == 0 for _ in range(200))


def test_mixed_greedy_and_sampled_rows():
    logits = torch.tensor([[0.0, 5.0, 1.0], [0.0, 0.0, 0.0]])
    params = [SamplingParams(), SamplingParams(temperature=1.0, top_k=1, seed=0)]
    gens = [make_generator(p, torch.device("cpu")) for p in params]
    assert gens[0] is None
    out = Sampler()(logits, params, gens)
    assert out[0] == 1
    assert out[1] in (0, 1, 2)
