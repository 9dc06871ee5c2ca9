"""``anyaccel bench kv-transfer``: save/load throughput of the KV tiers against a raw copy of the same bytes.

A paged cache shaped like SmolLM2-135M's (30 layers, 3 KV heads of 64, block size 128 by default) is filled with
random values; ``--blocks`` blocks are saved to and loaded back from each tier (host memory, local disk under
``--dir``), and the same bytes are moved by a raw copy (one ``index_select`` gather per layer and K/V into a
preallocated host buffer, then one ``index_copy_`` back: the least any tier must do). Rounds alternate between
the raw copy and the tiers, and each figure is the median over ``--repeats`` rounds, so machine load drifts into
all of them; the ratios (tier GB/s / raw-copy GB/s) are the figures to read. The disk tier's reads are usually
served from the page cache (the files were just written): the figure is the format's cost (safetensors
serialization, one file per block, atomic rename), not the disk's.
"""
from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from typing import Dict, List

import torch

__all__ = ["add_bench_kv_transfer_arguments", "bench_kv_transfer_main"]


def add_bench_kv_transfer_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--blocks", type=int, default=16, help="blocks moved per round (default 16)")
    p.add_argument("--layers", type=int, default=30)
    p.add_argument("--kv-heads", dest="kv_heads", type=int, default=3)
    p.add_argument("--head-size", dest="head_size", type=int, default=64)
    p.add_argument("--block-size", dest="block_size", type=int, default=128)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--dir", help="directory for the disk tier (default: a temporary directory)")
    p.add_argument("--json", metavar="PATH")


def bench_kv_transfer_main(args: argparse.Namespace, out=None) -> int:
    from ..core.attention import AttentionSpec, kv_cache_shape
    from ..core.kv_transfer import DiskTier, HostTier, KVTransfer
    from ..models.base import parse_dtype

    out = out or sys.stdout
    for k in ("blocks", "layers", "kv_heads", "head_size", "block_size", "repeats"):
        if getattr(args, k) < 1:
            raise ValueError(f"--{k.replace('_', '-')}: expected an integer >= 1, received {getattr(args, k)}")
    dtype = parse_dtype(args.dtype)
    spec = AttentionSpec(num_heads=args.kv_heads, num_kv_heads=args.kv_heads, head_size=args.head_size,
                         dtype=dtype, block_size=args.block_size)
    specs = [spec] * args.layers
    nb = args.blocks
    g = torch.Generator().manual_seed(0)
    caches = [tuple(torch.randn(kv_cache_shape(spec, 2 * nb), generator=g).to(dtype) for _ in range(2))
              for _ in specs]
    src = list(range(0, 2 * nb, 2))
    dst = list(range(1, 2 * nb, 2))
    nbytes = sum(c.element_size() * c[0].numel() for layer in caches for c in layer) * nb  # nb blocks, K and V
    import hashlib

    keys = [hashlib.sha256(bytes(str(i), "ascii")).digest() for i in range(nb)]
    root = args.dir or tempfile.mkdtemp(prefix="anyaccel-kv-bench-")
    idx_s = torch.tensor(src)
    idx_d = torch.tensor(dst)
    staging = [tuple(torch.empty((nb, *c.shape[1:]), dtype=dtype) for c in layer) for layer in caches]

    def raw():
        t0 = time.perf_counter()
        for layer, st in zip(caches, staging):
            for c, s in zip(layer, st):
                torch.index_select(c, 0, idx_s, out=s)
        t1 = time.perf_counter()
        for layer, st in zip(caches, staging):
            for c, s in zip(layer, st):
                c.index_copy_(0, idx_d, s)
        return t1 - t0, time.perf_counter() - t1

    def tier_round(make):
        tier = make()
        t = KVTransfer(tier, caches, specs)
        t0 = time.perf_counter()
        t.save(keys, src)
        t1 = time.perf_counter()
        t.load(keys, dst)
        return t1 - t0, time.perf_counter() - t1

    times: Dict[str, List[tuple]] = {"raw copy": [], "host": [], "disk": []}
    try:
        for r in range(args.repeats + 1):  # round 0 warms up and is dropped
            for name in (("raw copy", "host", "disk") if r % 2 == 0 else ("disk", "host", "raw copy")):
                if name == "raw copy":
                    res = raw()
                elif name == "host":
                    res = tier_round(HostTier)
                else:
                    shutil.rmtree(root, ignore_errors=True)
                    res = tier_round(lambda: DiskTier(root))
                if r:
                    times[name].append(res)
        ok = all(torch.equal(caches[i][j][d], caches[i][j][s]) for i in range(len(caches)) for j in range(2)
                 for s, d in zip(src, dst))
    finally:
        if not args.dir:
            shutil.rmtree(root, ignore_errors=True)
    gb = nbytes / 1e9
    res = {"bytes": nbytes, "blocks": nb, "dtype": args.dtype, "bit_exact": ok, "tiers": {}}
    base = {k: statistics.median(t[i] for t in times["raw copy"]) for i, k in enumerate(("save", "load"))}
    print(f"KV transfer of {nb} blocks ({nbytes / 2**20:.1f} MiB: {args.layers} layers x K,V x {args.block_size} "
          f"tokens x {args.kv_heads} heads x {args.head_size}, {args.dtype}); medians of {args.repeats} alternated "
          f"rounds; blocks bit-exact after every round trip: {ok}", file=out)
    for name, ts in times.items():
        row = {}
        for i, k in enumerate(("save", "load")):
            s = statistics.median(t[i] for t in ts)
            row[k] = {"seconds": s, "GBps": gb / s, "vs_raw_copy": base[k] / s}
        res["tiers"][name] = row
        print(f"  {name:9s} save {row['save']['GBps']:7.2f} GB/s ({row['save']['vs_raw_copy']:.2f}x raw copy)   "
              f"load {row['load']['GBps']:7.2f} GB/s ({row['load']['vs_raw_copy']:.2f}x raw copy)", file=out)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(res, f, indent=2)
            f.write("\n")
    return 0 if ok else 1
