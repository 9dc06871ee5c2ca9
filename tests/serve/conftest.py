"""Fixtures of the serving tests: tiny models (built-in configs) with a character-level tokenizer, and a server
on loopback."""
from __future__ import annotations

import pytest
import torch


class CharTokenizer:
    """Printable ASCII <-> ids 3..97 (id = code - 29); ids outside decode to nothing (special tokens). A chat
    template that marks turns, so chat prompts differ from plain text."""

    chat_template = "char-template"

    def encode(self, text):
        return [ord(c) - 29 for c in text if 32 <= ord(c) <= 126]

    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(i + 29) for i in ids if 3 <= i <= 97)

    def apply_chat_template(self, messages, add_generation_prompt=True, tokenize=True):
        text = "".join(f"[{m['role']}]{m['content']}\n" for m in messages) + ("[assistant]" if add_generation_prompt
                                                                               else "")
        return self.encode(text) if tokenize else text

    def __call__(self, text, truncation=True, max_length=512):
        ids = self.encode(text)[:max_length]
        return {"input_ids": ids, "token_type_ids": [0] * len(ids)}


@pytest.fixture(scope="session")
def char_tokenizer():
    return CharTokenizer()


@pytest.fixture(scope="session")
def tiny_llm(cpu_backend, reference_models, char_tokenizer):
    """The tiny llama on cpu in float32, 16-token blocks, a pool of 96 blocks."""
    from anyaccel.models import build_model
    from anyaccel.serve import LLM

    model = build_model(reference_models("llama"), cpu_backend, torch.float32, block_size=16)
    return LLM(model, tokenizer=char_tokenizer, num_blocks=96, max_num_seqs=8, name="tiny-llama")


@pytest.fixture(scope="session")
def tiny_bert(cpu_backend, reference_models, char_tokenizer):
    from anyaccel.models import build_model
    from anyaccel.serve import LLM

    model = build_model(reference_models("bert"), cpu_backend, torch.float32, block_size=16)
    return LLM(model, tokenizer=char_tokenizer, name="tiny-bert")
