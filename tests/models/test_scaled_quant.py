"""models/scaled_quant.py: W8A8 layers on the scaled GEMM put into a tiny Llama. The quantized model on cpu (its
int8 kernel) gives the same greedy tokens as the same quantized model on the core's native fallback (its
dequantized reference), and its logits stay near the float model's."""
from __future__ import annotations

import pytest
import torch

from anyaccel.conformance.models import TINY_CONFIGS, make_reference
from anyaccel.core import Backend, BackendDef
from anyaccel.core.scaled_gemm import ScaledGemmCapability
from anyaccel.models import build_model
from anyaccel.models.layers import Linear
from anyaccel.models.runner import Engine, teacher_forced_logits
from anyaccel.models.sampling import SamplingParams
from anyaccel.models.scaled_quant import SCALED_SCHEMES, ScaledLinear, fp8_format, make_scaled_layer, scaled_schemes

PROMPT = [3, 17, 42, 9, 11, 5, 60, 2]


def _cpu():
    from anyaccel.plugins import discover

    return discover().backends["cpu"]


def _quantize(model, scheme):
    """What models.quant.quantize_model does with a registered scheme: every Linear but the LM head replaced."""
    make = make_scaled_layer(scheme)
    done = []

    def walk(obj, seen):
        if id(obj) in seen:
            return
        seen.add(id(obj))
        for name, v in list(vars(obj).items()):
            if isinstance(v, Linear):
                new = make(v, model.backend, model.dtype, model.strict)
                if new is not None:
                    setattr(obj, name, new)
                    done.append(new)
            elif isinstance(v, (list, tuple)):
                for item in v:
                    if hasattr(item, "__dict__") and type(item).__module__.startswith("anyaccel"):
                        walk(item, seen)
            elif hasattr(v, "__dict__") and type(v).__module__.startswith("anyaccel") and not isinstance(v, type):
                walk(v, seen)

    walk(model, set())
    return done


@pytest.fixture(scope="module")
def hf():
    return make_reference(TINY_CONFIGS["llama"], seed=0)


@pytest.mark.parametrize("scheme", ["int8", pytest.param("fp8", marks=pytest.mark.slow)])
def test_quantized_tiny_llama_matches_its_dequantized_reference(hf, scheme):
    cpu = _cpu()
    bare = Backend.local(BackendDef(name="bare", vendor="tests", device_type="cpu"), kernels=[])
    ours = build_model(hf, cpu, torch.float32)
    ref = build_model(hf, bare, torch.float32)
    floats = build_model(hf, cpu, torch.float32)
    layers = _quantize(ours, scheme)
    assert layers and all(isinstance(l, ScaledLinear) for l in layers)
    _quantize(ref, scheme)
    if scheme == "int8":
        assert {l.op.selection.chosen for l in layers} == {"cpu.scaled_gemm.int_mm"}
    else:  # cpu declares no fp8 GEMM: the recorded fallback serves it
        assert all(l.op.selection.fallback for l in layers) and {l.scheme for l in layers} == {"fp8_e4m3fn"}
    greedy = SamplingParams(max_new_tokens=12, ignore_eos=True)
    a = Engine(ours, num_blocks=32).generate([PROMPT], greedy)[0]
    b = Engine(ref, num_blocks=32).generate([PROMPT], greedy)[0]
    assert a == b
    lq = teacher_forced_logits(ours, PROMPT)
    lf = teacher_forced_logits(floats, PROMPT)
    rel = ((lq - lf).norm() / lf.norm()).item()
    assert 0 < rel < (0.05 if scheme == "int8" else 0.15), rel


def test_fp8_format_follows_the_backend_declaration():
    def be(schemes):
        from anyaccel.core import KernelImpl

        return Backend.local(BackendDef(name="b", vendor="tests", device_type="cpu"), [KernelImpl(
            op="scaled_gemm", backend="b", name="b.sg", build=lambda s: None,
            capability=ScaledGemmCapability(schemes=frozenset(schemes)))])

    assert fp8_format(be({"int8", "fp8_e4m3fnuz"}), torch.bfloat16) == "fp8_e4m3fnuz"
    assert fp8_format(be({"fp8_e4m3fn", "fp8_e4m3fnuz"}), torch.bfloat16) == "fp8_e4m3fn"
    assert fp8_format(be({"int8"}), torch.bfloat16) == "fp8_e4m3fn"


def test_schemes_for_the_quantization_registry():
    made = scaled_schemes(lambda name, make, desc: (name, make, desc))
    assert [m[0] for m in made] == list(SCALED_SCHEMES) == ["w8a8-int8", "fp8"]
    assert all(callable(m[1]) and m[2] for m in made)
