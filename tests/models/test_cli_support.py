"""models.cli_support: what ``anyaccel generate`` and ``anyaccel models`` print."""
from __future__ import annotations

import argparse
import contextlib
import json

import pytest
import torch

from anyaccel.models.cli_support import (GenerateError, add_generate_arguments, generate_main, models_main,
                                         parse_prompt_ids)


@pytest.fixture
def parser():
    p = argparse.ArgumentParser()
    add_generate_arguments(p)
    return p


@pytest.fixture
def builtins(reference_models):
    return {"llama": lambda: reference_models("llama")}


def test_generate_json_matches_transformers(parser, cpu_backend, builtins, reference_models, capsys):
    args = parser.parse_args(["--model", "llama", "--prompt-ids", "5 9, 33 12", "--max-new-tokens", "6",
                              "--json"])
    assert generate_main(args, cpu_backend, builtins) == 0
    out = json.loads(capsys.readouterr().out)
    assert set(out) == {"model", "backend", "dtype", "prompt_ids", "output_ids", "text", "finish_reason", "seconds",
                        "tokens_per_s", "prompt_tokens", "ttft_s", "quantization"}
    assert out["prompt_tokens"] == 4 and 0 < out["ttft_s"] <= out["seconds"]
    assert out["quantization"] == "float weights (no quantization)"
    assert out["text"] is None  # the tiny model has no tokenizer
    n = len(out["output_ids"])
    assert out["finish_reason"] == ("length" if n == 6 else "stop")
    assert out["seconds"] > 0 and out["tokens_per_s"] == pytest.approx(n / out["seconds"])
    assert out["prompt_ids"] == [5, 9, 33, 12]
    assert out["backend"] == cpu_backend.name and out["dtype"] == "float32"
    with torch.no_grad():
        ref = reference_models("llama").generate(torch.tensor([[5, 9, 33, 12]]), max_new_tokens=6,
                                                 do_sample=False)
    ref_new = ref[0, 4:].tolist()
    assert out["output_ids"] == ref_new[:len(out["output_ids"])]
    assert 1 <= len(out["output_ids"]) <= 6


def test_generate_seeded_sampling_is_reproducible(parser, cpu_backend, builtins, capsys):
    argv = ["--model", "llama", "--prompt-ids", "5 9 33", "--max-new-tokens", "8", "--temperature", "1.0",
            "--seed", "3", "--dtype", "bf16", "--json"]
    generate_main(parser.parse_args(argv), cpu_backend, builtins)
    first = json.loads(capsys.readouterr().out)
    generate_main(parser.parse_args(argv), cpu_backend, builtins)
    timing = ("seconds", "tokens_per_s", "ttft_s")
    again = json.loads(capsys.readouterr().out)
    assert {k: v for k, v in again.items() if k not in timing} == {k: v for k, v in first.items() if k not in timing}
    assert first["dtype"] == "bfloat16"


def test_generate_says_when_it_stopped_at_the_budget(parser, cpu_backend, builtins, capsys):
    argv = ["--model", "llama", "--prompt-ids", "5 9 33", "--max-new-tokens", "3"]
    generate_main(parser.parse_args(argv), cpu_backend, builtins)
    cap = capsys.readouterr()
    ids = cap.out.split()
    assert len(ids) <= 3 and ("budget of 3 tokens" in cap.err) == (len(ids) == 3)


class _CharTokenizer:
    """Printable ASCII <-> ids 3..97; other ids decode to nothing (special tokens). No chat template."""

    def encode(self, text):
        return [ord(c) - 29 for c in text if 32 <= ord(c) <= 126]

    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(i + 29) for i in ids if 3 <= i <= 97)


class _Writes:
    """A stdout that records each write (streaming shows as many writes)."""

    def __init__(self):
        self.parts = []

    def write(self, s):
        self.parts.append(s)

    def flush(self):
        pass


@pytest.fixture
def with_tokenizer(monkeypatch, cpu_backend, reference_models):
    """``--model llama`` loads the tiny llama with a character tokenizer."""
    from anyaccel.models import cli_support
    from anyaccel.models.base import build_model

    def load(name, backend, dtype, strict=False, builtins=None, **kwargs):
        return build_model(reference_models("llama"), backend, dtype, strict=strict), _CharTokenizer

    monkeypatch.setattr(cli_support, "load_generation_model", load)


def _json_run(parser, cpu_backend, capsys, argv):
    assert generate_main(parser.parse_args(argv + ["--json"]), cpu_backend) == 0
    return json.loads(capsys.readouterr().out)


def test_generate_streams_text_token_by_token(parser, cpu_backend, with_tokenizer, capsys):
    argv = ["--model", "llama", "--prompt-ids", "40 41 42 43", "--max-new-tokens", "12"]
    ref = _json_run(parser, cpu_backend, capsys, argv)
    assert ref["text"] == _CharTokenizer().decode(ref["output_ids"])  # --prompt-ids still answers in text
    out = _Writes()
    with contextlib.redirect_stdout(out):
        assert generate_main(parser.parse_args(argv), cpu_backend) == 0
    assert "".join(out.parts) == ref["text"] + "\n"
    printable = sum(3 <= t <= 97 for t in ref["output_ids"])
    assert len([p for p in out.parts if p]) >= min(printable, 2) + 1  # one write per decoded piece, then "\n"
    out = _Writes()
    with contextlib.redirect_stdout(out):
        assert generate_main(parser.parse_args(argv + ["--no-stream"]), cpu_backend) == 0
    assert "".join(out.parts) == ref["text"] + "\n" and len([p for p in out.parts if p]) <= 2


def test_generate_stop_string_cuts_the_text(parser, cpu_backend, with_tokenizer, capsys):
    argv = ["--model", "llama", "--prompt-ids", "40 41 42 43", "--max-new-tokens", "16"]
    full = _json_run(parser, cpu_backend, capsys, argv)
    text = full["text"]
    assert len(text) >= 4, f"the tiny model's greedy text is too short to pick a stop string from: {text!r}"
    stop = text[2:4]
    cut = _json_run(parser, cpu_backend, capsys, argv + ["--stop", stop])
    assert cut["text"] == text[:text.index(stop)]
    assert cut["finish_reason"] == "stop" and len(cut["output_ids"]) < len(full["output_ids"])
    assert cut["output_ids"] == full["output_ids"][:len(cut["output_ids"])]


def test_generate_max_tokens_is_an_undocumented_alias(parser, cpu_backend, builtins, capsys):
    help_text = parser.format_help()
    assert "--max-new-tokens" in help_text and "(default 32" in help_text and "--max-tokens" not in help_text
    a = parser.parse_args(["--model", "llama", "--prompt-ids", "5", "--max-tokens", "7"])
    b = parser.parse_args(["--model", "llama", "--prompt-ids", "5", "--max-new-tokens", "7"])
    assert a.max_new_tokens == b.max_new_tokens == 7
    assert parser.parse_args(["--model", "llama", "--prompt-ids", "5"]).max_new_tokens == 32


def test_generate_user_errors(parser, cpu_backend, builtins):
    with pytest.raises(GenerateError, match="neither a directory"):
        generate_main(parser.parse_args(["--model", "nope", "--prompt-ids", "1"]), cpu_backend, builtins)
    with pytest.raises(GenerateError, match="no tokenizer"):
        generate_main(parser.parse_args(["--model", "llama", "--prompt", "hi"]), cpu_backend, builtins)
    with pytest.raises(GenerateError, match="integers"):
        parse_prompt_ids("1 two 3")
    with pytest.raises(SystemExit):  # --prompt and --prompt-ids are exclusive, one is required
        parser.parse_args(["--model", "llama"])


def test_models_lists_families_and_real_checkpoints(capsys):
    assert models_main(argparse.Namespace(json=True), builtins={"llama": None}) == 0
    data = json.loads(capsys.readouterr().out)
    assert "LlamaForCausalLM" in data["families"]["LlamaForCausalLM"]
    assert set(data["real_checkpoints"]) == {"smollm2", "minilm"}
    assert data["builtin_models"] == ["llama"]
    for r in data["real_checkpoints"].values():
        assert r["status"] in ("installed", "missing")
