"""Prefix caching in the serving layer: on by default, ``--no-prefix-cache`` / ``LLM(prefix_caching=False)`` off."""
from __future__ import annotations

import torch

from anyaccel.cli import build_parser


def test_flag_parses_on_every_generation_command():
    p = build_parser()
    for cmd in ("serve", "chat"):
        assert p.parse_args([cmd, "llama"]).prefix_cache is True
        assert p.parse_args([cmd, "llama", "--no-prefix-cache"]).prefix_cache is False


def test_llm_prefix_caching_switch(cpu_backend, reference_models, char_tokenizer):
    from anyaccel.models import build_model
    from anyaccel.serve import LLM, SamplingParams

    model = build_model(reference_models("llama"), cpu_backend, torch.float32, block_size=16)
    on = LLM(model, tokenizer=char_tokenizer, num_blocks=32)
    off = LLM(model, tokenizer=char_tokenizer, num_blocks=32, prefix_caching=False)
    assert on.engine.prefix_cache is not None and off.engine.prefix_cache is None
    p = SamplingParams(max_new_tokens=4, ignore_eos=True)
    prompt = "a system prompt long enough to fill two blocks. " + "q1"
    assert on.generate([prompt], p)[0].token_ids == off.generate([prompt], p)[0].token_ids
    again = on.generate([prompt[:-1] + "2"], p)[0].token_ids
    assert on.engine.stats.prefix_hit_tokens == 48
    assert again == off.generate([prompt[:-1] + "2"], p)[0].token_ids
