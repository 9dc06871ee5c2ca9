"""Tests of models/parallel.py that need no second process: the head split, the plan's slices, sharded loading
reading only this rank's slices from safetensors, and the launch errors. The sharded models themselves run
against the unsharded ones in tests/conformance/test_tp.py (spawned gloo processes) and under torchrun."""
from __future__ import annotations

import os

import pytest
import torch

from anyaccel.core.collectives import Communicator
from anyaccel.core.errors import InvalidArgumentError, UnsupportedError
from anyaccel.models import parallel
from anyaccel.models.base import build_from_config_dict
from anyaccel.models.config import ConfigError
from anyaccel.plugins import get_registry


class RankOnly(Communicator):
    """A communicator that only knows its rank and world size (sharding and loading run no collective)."""

    def __init__(self, rank: int, world_size: int) -> None:  # noqa: D107 - no process group behind it
        self.rank, self.world_size, self.device = rank, world_size, torch.device("cpu")

    def all_reduce(self, x, op="sum"):  # pragma: no cover - a test that gets here is wrong
        raise AssertionError("no collective may run while sharding or loading")

    all_gather = all_reduce


@pytest.fixture(scope="module")
def cpu():
    return get_registry().get("cpu")


@pytest.mark.parametrize("hq, hkv, world, rank, expected", [
    (4, 2, 2, 1, parallel.HeadLayout(2, 2, 1, 1, False)),   # KV heads split
    (4, 1, 2, 1, parallel.HeadLayout(2, 2, 0, 1, True)),    # one KV head: replicated
    (8, 2, 4, 3, parallel.HeadLayout(6, 2, 1, 1, True)),    # 2 KV heads, 4 ranks: ranks 2, 3 read head 1
    (8, 2, 4, 1, parallel.HeadLayout(2, 2, 0, 1, True)),
    (8, 8, 4, 2, parallel.HeadLayout(4, 2, 4, 2, False)),
])
def test_head_layout(hq, hkv, world, rank, expected):
    assert parallel.head_layout(hq, hkv, world, rank) == expected


@pytest.mark.parametrize("hq, hkv, world, what", [(6, 2, 4, "attention heads"), (8, 3, 2, "KV heads"),
                                                 (12, 6, 4, "KV heads")])
def test_head_layout_refuses_counts_that_do_not_split(hq, hkv, world, what):
    with pytest.raises(ConfigError, match=what):
        parallel.head_layout(hq, hkv, world, 0)


def test_shard_range_is_tensor_split():
    for n, world in ((160, 2), (161, 2), (7, 3), (2, 4)):
        got = [parallel.shard_range(n, world, r) for r in range(world)]
        want = [(int(c[0]), int(c[-1]) + 1) if len(c) else None for c in torch.tensor_split(torch.arange(n), world)]
        assert [g if g[1] > g[0] else None for g in got] == want


def _tiny(name):
    from anyaccel.conformance.models import TINY_CONFIGS

    return dict(TINY_CONFIGS[name])


def test_plan_rows_of_a_gqa_model(cpu):
    m = build_from_config_dict(_tiny("llama"), cpu, torch.float32, False, None, "llama")
    plan = parallel.shard_plan(m, 2, 1)  # hq 4, hkv 2, d 16, H 64, I 128, V 160
    assert plan["layers.0.attn.qkv.weight"] == (0, [(32, 64), (80, 96), (112, 128)])
    assert plan["layers.1.attn.o.weight"] == (1, [(32, 64)])
    assert plan["layers.0.mlp.gate_up.weight"] == (0, [(64, 128), (192, 256)])
    assert plan["layers.0.mlp.down.weight"] == (1, [(64, 128)])
    assert plan["embed"] == plan["lm_head.weight"] == (0, [(80, 160)])
    assert "layers.0.attn_norm.weight" not in plan  # norms are replicated


def _save(hf, path):
    from anyaccel.conformance.tp import _save as save

    save(hf, path)


@pytest.mark.parametrize("name", ["llama", "qwen2_moe", "phi3", "gpt2"])
def test_sharded_load_reads_only_this_ranks_slices(cpu, tmp_path, name):
    """Each rank's tensors are exactly the plan's slices of the full ones, and it reads little more than half
    of the checkpoint (the replicated norms and routers are small)."""
    pytest.importorskip("transformers")
    from anyaccel.conformance.models import make_reference
    from anyaccel.models import build_model

    hf = make_reference(_tiny(name), seed=0)
    _save(hf, str(tmp_path))
    full = build_model(str(tmp_path), cpu, torch.float32)
    total = sum(os.path.getsize(tmp_path / f) for f in os.listdir(tmp_path) if f.endswith(".safetensors"))
    for rank in (0, 1):
        m = build_from_config_dict(_tiny(name), cpu, torch.float32, False, None, name)
        parallel.apply_tensor_parallel(m, RankOnly(rank, 2))
        reader = parallel.SafetensorsSlices(str(tmp_path), m.normalize_name)
        parallel.load_sharded(m, reader)
        plan = parallel.shard_plan(m, 2, rank)
        assert set(m.weights) == set(full.weights)
        for key, t in full.weights.items():
            if key in plan:
                dim, ranges = plan[key]
                want = torch.cat([t.narrow(dim, a, b - a) for a, b in ranges], dim)
            else:
                want = t
            assert torch.equal(m.weights[key], want), key
        assert reader.bytes_read < 0.6 * total, (reader.bytes_read, total)
        # the KV cache holds this rank's heads only
        spec = m.kv_cache_specs()[0]
        assert spec.num_heads == full.kv_cache_specs()[0].num_heads // 2


def test_families_without_a_plan_are_refused(cpu):
    m = build_from_config_dict(_tiny("bert"), cpu, torch.float32, False, None, "bert")
    with pytest.raises(UnsupportedError, match="BertModel has no sharding plan"):
        parallel.apply_tensor_parallel(m, RankOnly(0, 2))


def test_a_loaded_model_is_not_resharded(cpu):
    m = build_from_config_dict(_tiny("llama"), cpu, torch.float32, False, None, "llama")
    m.loaded = True
    with pytest.raises(InvalidArgumentError, match="not loaded yet"):
        parallel.apply_tensor_parallel(m, RankOnly(0, 2))


def test_init_from_env_says_how_to_launch(cpu, monkeypatch):
    for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(k, raising=False)
    with pytest.raises(InvalidArgumentError, match="torchrun --nproc-per-node 2"):
        parallel.init_from_env(cpu, 2)
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", "29500")
    with pytest.raises(InvalidArgumentError, match=r"torchrun world size \(4\)"):
        parallel.init_from_env(cpu, 2)


def test_generate_tp_without_torchrun_is_a_usage_error(capsys, monkeypatch):
    from anyaccel.cli import main

    for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(k, raising=False)
    assert main(["generate", "--model", "llama", "--prompt-ids", "5 6", "--tp", "2", "--backend", "cpu"]) == 2
    assert "torchrun --nproc-per-node 2" in capsys.readouterr().err


class ThreadComm(Communicator):
    """Two threads of one process as two ranks: just enough of a communicator for broadcast."""

    def __init__(self, rank: int, shared: dict) -> None:  # noqa: D107
        self.rank, self.world_size, self.device, self.shared = rank, 2, torch.device("cpu"), shared

    def broadcast(self, x, src):
        b = self.shared["barrier"]
        if self.rank == src:
            self.shared["value"] = x.clone()
        b.wait()
        out = self.shared["value"].clone()
        b.wait()
        return out


def test_mirrored_engine_applies_rank0s_calls_in_order(cpu):
    """The follower's engine ends in the same state as the leader's: same requests, same tokens, same aborts,
    and unseeded sampling got a seed on rank 0 (else the two would sample differently)."""
    import threading

    from anyaccel.models.runner import Engine
    from anyaccel.models.sampling import SamplingParams

    m = build_from_config_dict(_tiny("llama"), cpu, torch.float32, False, None, "llama")
    g = torch.Generator().manual_seed(0)
    m.load_weights([(n, torch.randn(w.shape, generator=g) * 0.1) for n, w in _full_shapes(m)])
    shared = {"barrier": threading.Barrier(2)}
    engines = [Engine(m, num_blocks=32), Engine(m, num_blocks=32)]
    leader = parallel.MirroredEngine(engines[0], ThreadComm(0, shared))
    follower = parallel.MirroredEngine(engines[1], ThreadComm(1, shared))
    followed = []
    step1 = engines[1].step
    engines[1].step = lambda: [followed.append((o.request_id, tuple(o.new_token_ids))) for o in step1()]
    applied = []
    t = threading.Thread(target=lambda: applied.append(follower.follow()))
    t.start()
    led, steps = [], 0

    def step():
        nonlocal steps
        steps += 1
        led.extend((o.request_id, tuple(o.new_token_ids)) for o in leader.step())

    leader.add_request("a", [5, 6, 7], SamplingParams(max_new_tokens=6, temperature=0.9))  # unseeded
    leader.add_request("b", [9, 8], SamplingParams(max_new_tokens=6))
    step()
    leader.abort("b")
    with pytest.raises(InvalidArgumentError):
        leader.add_request("a", [1], None)  # a duplicate: raised on rank 0, ignored on the follower
    while leader.has_unfinished_requests():
        step()
    leader.stop()
    t.join(timeout=60)
    assert applied == [4 + steps]
    assert led and followed == led and {r for r, _ in led} == {"a", "b"}
    assert not engines[1].has_unfinished_requests() and engines[1].num_used_blocks == 0
    with pytest.raises(InvalidArgumentError, match="rank 0"):
        follower.step()


def _full_shapes(m):
    """(checkpoint name, tensor) of the right shape for every tensor ``m`` loads (values do not matter here)."""
    out = []
    for rule in m.weight_rules():
        src = rule.options[0]
        out += [(n, torch.empty(s)) for n, s in zip(src.names, src.shapes)]
    return out
