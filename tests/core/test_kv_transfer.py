"""core.kv_transfer: KV blocks round-trip bit-exactly through the host, disk and peer tiers and across cache
layouts; bad keys, missing blocks and mismatched formats are refused before anything is written."""
from __future__ import annotations

import hashlib
import os
import pathlib

import pytest
import torch

from anyaccel.core.attention import AttentionSpec, kv_cache_shape
from anyaccel.core.backend import Backend, BackendDef
from anyaccel.core.errors import InvalidArgumentError
from anyaccel.core.kv_transfer import DiskTier, HostTier, KVTransfer, PeerTier, canonical_block

P, HKV, D, LAYERS, BLOCKS = 4, 2, 8, 3, 6
DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _specs(dtype, layout):
    return [AttentionSpec(num_heads=4, num_kv_heads=HKV, head_size=D, dtype=dtype, block_size=P, kv_layout=layout)
            for _ in range(LAYERS)]


def _caches(specs, seed=None):
    g = torch.Generator().manual_seed(seed or 0)
    out = []
    for s in specs:
        shape = kv_cache_shape(s, BLOCKS)
        if seed is None:
            out.append((torch.zeros(shape, dtype=s.dtype), torch.zeros(shape, dtype=s.dtype)))
        else:
            out.append(tuple(torch.randn(shape, generator=g).to(s.dtype) for _ in range(2)))
    return out


def _keys(n, salt=b""):
    return [hashlib.sha256(salt + bytes([i])).digest() for i in range(n)]


def _tier(kind, tmp_path):
    return HostTier() if kind == "host" else DiskTier(str(tmp_path / "kv"))


@pytest.mark.parametrize("kind", ["host", "disk"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("src_layout,dst_layout", [("NHD", "HND"), ("HND", "NHD"), ("NHD", "NHD")])
def test_blocks_round_trip_bit_exactly_across_layouts(kind, dtype, src_layout, dst_layout, tmp_path):
    src_specs, dst_specs = _specs(dtype, src_layout), _specs(dtype, dst_layout)
    src = _caches(src_specs, seed=1)
    dst = _caches(dst_specs)
    tier = _tier(kind, tmp_path)
    keys = _keys(3)
    assert KVTransfer(tier, src, src_specs).save(keys, [4, 1, 2]) == 3
    assert KVTransfer(tier, src, src_specs).save(keys, [4, 1, 2]) == 0  # already held: skipped
    assert tier.num_matched(keys + _keys(1, b"other")) == 3
    h = KVTransfer(tier, dst, dst_specs).start_load(keys, [0, 5, 3])
    for i in range(LAYERS):
        h.wait_for_layer(i)
        for j in range(2):
            got = canonical_block(dst[i][j], [0, 5, 3], dst_layout)
            want = canonical_block(src[i][j], [4, 1, 2], src_layout)
            assert got.view(-1).view(torch.int16 if dtype != torch.float32 else torch.int32).equal(
                want.view(-1).view(torch.int16 if dtype != torch.float32 else torch.int32))
    # other blocks untouched
    assert not dst[0][0][1].any() and not dst[0][1][2].any()


def test_disk_tier_writes_safetensors_files_atomically(tmp_path):
    specs = _specs(torch.float32, "NHD")
    tier = DiskTier(str(tmp_path / "kv"))
    keys = _keys(2)
    KVTransfer(tier, _caches(specs, seed=2), specs).save(keys, [0, 1])
    files = sorted(os.listdir(tmp_path / "kv"))
    assert files == sorted(k.hex() + ".safetensors" for k in keys)  # no temporary file left
    from safetensors import safe_open

    with safe_open(str(tmp_path / "kv" / files[0]), framework="pt") as f:
        assert f.metadata()["format"] == "anyaccel-kv-block-v1"
        assert sorted(f.keys()) == sorted(f"{kv}.{i}" for i in range(LAYERS) for kv in "kv")
    # a second process (or a later run) sees the same blocks
    assert DiskTier(str(tmp_path / "kv")).num_matched(keys) == 2


@pytest.mark.parametrize("kind", ["host", "disk"])
def test_refuses_bad_keys_missing_blocks_and_other_formats(kind, tmp_path):
    specs = _specs(torch.float32, "NHD")
    tier = _tier(kind, tmp_path)
    t = KVTransfer(tier, _caches(specs, seed=3), specs)
    with pytest.raises(InvalidArgumentError, match="key"):
        t.save([b"short"], [0])
    with pytest.raises(InvalidArgumentError, match="blocks"):
        t.save(_keys(1), [BLOCKS])
    with pytest.raises(InvalidArgumentError, match="missing"):
        t.load(_keys(1), [0])
    t.save(_keys(1), [0])
    other = [AttentionSpec(num_heads=4, num_kv_heads=HKV, head_size=D, dtype=torch.float16, block_size=P)
             for _ in range(LAYERS)]
    dst = _caches(other)
    with pytest.raises(InvalidArgumentError, match="shape"):
        KVTransfer(tier, dst, other).load(_keys(1), [0])
    assert not dst[0][0].any()  # nothing written
    h = KVTransfer(tier, dst, other).start_load(_keys(1), [0])  # the worker's error reaches the waiter
    with pytest.raises(InvalidArgumentError):
        h.wait_for_layer(LAYERS - 1)


BACKEND = Backend.local(BackendDef(name="kv-peer-test", vendor="test", device_type="cpu",
                                   distributed_backend="gloo"), kernels=[])


def _bits(x):
    return x.reshape(-1).view(torch.int16).tolist()


def _peer_worker(rank, init_method, q):
    from anyaccel.core.collectives import Communicator

    specs = _specs(torch.bfloat16, "NHD" if rank == 0 else "HND")
    with Communicator.init(BACKEND, rank, 2, init_method, timeout=30, probe=False) as c:
        peer = PeerTier(c, 1 - rank)
        if rank == 0:
            caches = _caches(specs, seed=4)
            KVTransfer(peer, caches, specs).send(_keys(3), [5, 0, 2], peer)
            q.put((rank, [_bits(canonical_block(caches[i][j], [5, 0, 2], "NHD")) for i in range(LAYERS)
                          for j in range(2)]))
        else:
            caches = _caches(specs)
            t = KVTransfer(peer, caches, specs)
            got = t.receive(peer)
            t.load(got, [1, 2, 3])
            q.put((rank, (got == _keys(3), [_bits(canonical_block(caches[i][j], [1, 2, 3], "HND"))
                                            for i in range(LAYERS) for j in range(2)])))


def test_peer_tier_sends_blocks_between_two_processes(tmp_path, monkeypatch):
    import importlib

    import torch.multiprocessing as mp

    monkeypatch.syspath_prepend(str(pathlib.Path(__file__).parent))
    mod = importlib.import_module(pathlib.Path(__file__).stem)
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    procs = [ctx.Process(target=mod._peer_worker, args=(r, f"file://{tmp_path / 'rdv'}", q), daemon=True)
             for r in range(2)]
    for p in procs:
        p.start()
    try:
        got = dict(q.get(timeout=120) for _ in range(2))
    finally:
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
    keys_ok, received = got[1]
    assert keys_ok
    assert len(received) == 2 * LAYERS and got[0] == received
