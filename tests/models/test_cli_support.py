"""models.cli_support: what ``anyaccel generate`` and ``anyaccel models`` print."""
from __future__ import annotations

import argparse
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
                        "tokens_per_s", "quantization"}
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
    timing = ("seconds", "tokens_per_s")
    again = json.loads(capsys.readouterr().out)
    assert {k: v for k, v in again.items() if k not in timing} == {k: v for k, v in first.items() if k not in timing}
    assert first["dtype"] == "bfloat16"


def test_generate_says_when_it_stopped_at_the_budget(parser, cpu_backend, builtins, capsys):
    argv = ["--model", "llama", "--prompt-ids", "5 9 33", "--max-new-tokens", "3"]
    generate_main(parser.parse_args(argv), cpu_backend, builtins)
    cap = capsys.readouterr()
    ids = cap.out.split()
    assert len(ids) <= 3 and ("budget of 3 tokens" in cap.err) == (len(ids) == 3)


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
