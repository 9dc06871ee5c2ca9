"""models.kv_connector: an engine's cached blocks exported to a tier and imported by another engine, on the
same backend and across backends (KV written by cpu, read by triton-interpreter)."""
from __future__ import annotations

import pytest
import torch

from anyaccel.core.kv_transfer import DiskTier, HostTier, canonical_block
from anyaccel.models import build_model
from anyaccel.models.kv_connector import export_blocks, import_blocks, prompt_keys
from anyaccel.models.runner import Engine
from anyaccel.models.sampling import SamplingParams

PARAMS = SamplingParams(max_new_tokens=6, ignore_eos=True)


def _prompt():
    return torch.randint(3, 160, (53,), generator=torch.Generator().manual_seed(9)).tolist()


@pytest.fixture(scope="module")
def llama(cpu_backend, reference_models):
    return build_model(reference_models("llama"), cpu_backend, torch.float32, block_size=16)


def _blocks(engine, keys):
    ids = [engine.prefix_cache.lookup(k) for k in keys]
    return [canonical_block(c, ids, s.kv_layout) for s, layer in zip(engine.specs, engine.kv_caches) for c in layer]


@pytest.mark.parametrize("tier_kind", ["host", "disk"])
def test_prefill_engine_exports_decode_engine_imports(llama, tier_kind, tmp_path):
    prompt = _prompt()
    prefill = Engine(llama, num_blocks=16)
    prefill.generate([prompt], SamplingParams(max_new_tokens=1))
    keys = prompt_keys(prefill, prompt)
    assert len(keys) == 3
    tier = HostTier() if tier_kind == "host" else DiskTier(str(tmp_path))
    assert export_blocks(prefill, tier, keys) == 3
    decode = Engine(llama, num_blocks=16)
    assert import_blocks(decode, tier, keys) == 3
    assert import_blocks(decode, tier, keys) == 0  # already held
    assert all(torch.equal(a, b) for a, b in zip(_blocks(decode, keys), _blocks(prefill, keys)))
    got = decode.generate([prompt], PARAMS)[0]
    assert decode.stats.prefix_hit_tokens == 48 and decode.stats.prefill_tokens == 5
    assert got == Engine(llama, num_blocks=16, prefix_caching=False).generate([prompt], PARAMS)[0]


def test_keys_of_another_model_do_not_match(llama, cpu_backend, reference_models):
    other = build_model(reference_models("llama"), cpu_backend, torch.bfloat16, block_size=16)
    prompt = _prompt()
    assert prompt_keys(Engine(llama, num_blocks=4), prompt) != prompt_keys(Engine(other, num_blocks=4), prompt)


@pytest.mark.slow
def test_kv_written_on_cpu_is_read_by_triton_interpreter(llama, reference_models, tmp_path):
    pytest.importorskip("triton", reason="the triton-interpreter tier needs triton installed")
    from anyaccel.plugins import discover

    interp = discover().get("triton-interpreter")
    assert interp.available, interp.reason
    prompt = _prompt()
    cpu = Engine(llama, num_blocks=16)
    cpu.generate([prompt], SamplingParams(max_new_tokens=1))
    keys = prompt_keys(cpu, prompt)
    tier = DiskTier(str(tmp_path))
    export_blocks(cpu, tier, keys)
    tmodel = build_model(reference_models("llama"), interp, torch.float32, block_size=16)
    tri = Engine(tmodel, num_blocks=16)
    assert prompt_keys(tri, prompt) == keys  # keys name the model and dtype, not the backend or its layout
    assert import_blocks(tri, tier, keys) == 3
    # bit-exact blocks, whatever each backend's cache layout
    assert all(torch.equal(a, b) for a, b in zip(_blocks(tri, keys), _blocks(cpu, keys)))
    got = tri.generate([prompt], PARAMS)[0]
    assert tri.stats.prefix_hit_tokens == 48
    assert got == Engine(tmodel, num_blocks=16, prefix_caching=False).generate([prompt], PARAMS)[0]
