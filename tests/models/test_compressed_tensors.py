"""models/compressed_tensors.py: checkpoints written by the ``compressed-tensors`` library (W8A8 int8 per-channel /
per-token, fp8 dynamic per-channel / per-token; ``scripts/write_compressed_tensors_checkpoint.py`` wrote the two
under ``data/compressed_tensors``, and rewrites them here when the library is installed) run from their 8-bit
weights on cpu and the interpreter tier with the same greedy tokens as their dequantized float reference; a
configuration the loader cannot run is refused with the reason before any weight is read."""
from __future__ import annotations

import json
import pathlib
import shutil
import subprocess
import sys

import pytest
import torch

from anyaccel.core import UnsupportedError
from anyaccel.models.compressed_tensors import (_linears, load_compressed_tensors, scaled_checkpoint_scheme,
                                                scaled_layers)
from anyaccel.models.runner import Engine
from anyaccel.models.sampling import SamplingParams

DATA = pathlib.Path(__file__).parent / "data" / "compressed_tensors"
PROMPT = [3, 17, 42, 9, 11]


def _backend(name):
    from anyaccel.plugins import discover

    return discover().backends[name]


def _greedy(model):
    return Engine(model, num_blocks=32).generate([PROMPT], SamplingParams(max_new_tokens=8, ignore_eos=True))[0]


@pytest.mark.parametrize("ckpt,scheme", [("w8a8_int8", "int8"), ("fp8_dynamic", "fp8_e4m3fn")])
@pytest.mark.parametrize("backend", ["cpu", pytest.param("triton-interpreter", marks=pytest.mark.slow)])
def test_checkpoint_runs_from_its_8bit_weights(ckpt, scheme, backend):
    be = _backend(backend)
    model = load_compressed_tensors(DATA / ckpt, be, torch.float32)
    assert len(scaled_layers(model)) >= 4 and {lay.scheme for lay in scaled_layers(model)} == {scheme}
    assert not any(lin.key != "lm_head" for _, _, lin in _linears(model)), "every quantized linear was swapped"
    assert model.quantization.startswith(f"compressed-tensors {scheme}")
    assert not any(k.endswith("proj.weight") or ".qkv" in k for k in model.weights if "lm_head" not in k), \
        sorted(model.weights)[:8]
    ref = load_compressed_tensors(DATA / ckpt, _backend("cpu"), torch.float32, packed=False)
    assert _greedy(model) == _greedy(ref)


def test_build_model_reads_a_compressed_tensors_directory():
    from anyaccel.models import build_model

    model = build_model(str(DATA / "w8a8_int8"), _backend("cpu"), torch.float32)
    assert model.quantization.startswith("compressed-tensors int8") and scaled_layers(model)


def test_fp8_checkpoint_on_a_fnuz_backend_is_converted_exactly():
    from anyaccel.core import Backend, BackendDef, KernelImpl
    from anyaccel.core.scaled_gemm import ScaledGemm, ScaledGemmCapability

    cpu = _backend("cpu")
    native = lambda spec: ScaledGemm.native(spec)  # noqa: E731
    fnuz = Backend.local(BackendDef(name="fnuz", vendor="tests", device_type="cpu"), [KernelImpl(
        op="scaled_gemm", backend="fnuz", name="fnuz.sg", build=native,
        capability=ScaledGemmCapability(schemes=frozenset({"fp8_e4m3fnuz"})))])
    model = load_compressed_tensors(DATA / "fp8_dynamic", fnuz, torch.float32)
    assert model.quantization.startswith("compressed-tensors fp8_e4m3fn")
    found = scaled_layers(model)
    assert found and all(lay.weight.dtype == torch.float8_e4m3fnuz and lay.scheme == "fp8_e4m3fnuz" for lay in found)
    assert _greedy(model) == _greedy(load_compressed_tensors(DATA / "fp8_dynamic", cpu, torch.float32))


@pytest.mark.parametrize("change,why", [
    (lambda g: g["input_activations"].update(dynamic=False), "static activation scales"),
    (lambda g: g["weights"].update(strategy="group", group_size=128), "weight strategy 'group'"),
    (lambda g: g["weights"].update(num_bits=4), "4-bit int"),
])
def test_unsupported_configs_are_refused_before_weights_are_read(tmp_path, change, why):
    cfg = json.loads((DATA / "w8a8_int8" / "config.json").read_text())
    change(cfg["quantization_config"]["config_groups"]["group_0"])
    (tmp_path / "config.json").write_text(json.dumps(cfg))   # no safetensors at all: nothing may be read
    with pytest.raises(UnsupportedError, match=why):
        load_compressed_tensors(tmp_path, _backend("cpu"))
    assert scaled_checkpoint_scheme({}) is None


def test_the_library_writes_what_the_loader_reads(tmp_path):
    """Rewrite the checkpoints with compressed-tensors itself (when installed) and load them."""
    pytest.importorskip("compressed_tensors")
    from anyaccel.conformance.models import TINY_CONFIGS

    script = pathlib.Path(__file__).resolve().parents[2] / "scripts" / "write_compressed_tensors_checkpoint.py"
    for preset, scheme in (("W8A8", "int8"), ("FP8_DYNAMIC", "fp8_e4m3fn")):
        out = tmp_path / preset
        subprocess.run([sys.executable, str(script), str(out), preset, json.dumps(TINY_CONFIGS["llama"])],
                       check=True, capture_output=True, timeout=300)
        model = load_compressed_tensors(out, _backend("cpu"), torch.float32)
        assert model.quantization.startswith(f"compressed-tensors {scheme}")
