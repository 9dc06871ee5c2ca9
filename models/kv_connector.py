"""Moving an engine's prefix-cached blocks to and from a KV tier (:mod:`anyaccel.core.kv_transfer`).

:func:`export_blocks` saves the blocks an engine's prefix cache holds (all, or those of given keys) to a tier;
:func:`import_blocks` loads blocks of given keys from a tier into free blocks of another engine and registers
them in its prefix cache, so its next request with that prefix starts from them (they are evictable like any
cached block). Together they make the disaggregated flow: a prefill engine computes and exports, a decode engine
imports and continues. Keys name the model and dtype (:func:`~anyaccel.models.prefix_cache.engine_extra_keys`),
so a tier shared by several models never serves one model's blocks to another.
"""
from __future__ import annotations

from typing import List, Optional, Sequence

from ..core.errors import InvalidArgumentError
from ..core.kv_transfer import KVTier, KVTransfer

__all__ = ["transfer_for", "export_blocks", "import_blocks", "prompt_keys"]


def _cache(engine):
    if engine.prefix_cache is None:
        raise InvalidArgumentError("kv_connector", "engine", "an Engine with prefix caching on",
                                   "prefix_caching=False")
    return engine.prefix_cache


def transfer_for(engine, tier: KVTier) -> KVTransfer:
    return KVTransfer(tier, engine.kv_caches, engine.specs)


def prompt_keys(engine, token_ids: Sequence[int]) -> List[bytes]:
    """The block keys of ``token_ids``' full blocks in ``engine`` (its model, dtype and block size)."""
    return _cache(engine).hash_blocks(list(token_ids), engine.prefix_extra_keys)


def export_blocks(engine, tier: KVTier, keys: Optional[Sequence[bytes]] = None) -> int:
    """Save the engine's cached blocks (``keys``: only these, in order, stopping at the first not cached) to
    ``tier``; returns how many were newly stored."""
    pc = _cache(engine)
    if keys is None:
        keys = pc.cached_keys()
    pairs = []
    for k in keys:
        b = pc.lookup(k)
        if b is None:
            break
        pairs.append((k, b))
    if not pairs:
        return 0
    return transfer_for(engine, tier).save([k for k, _ in pairs], [b for _, b in pairs])


def import_blocks(engine, tier: KVTier, keys: Sequence[bytes]) -> int:
    """Load the leading ``keys`` the tier holds (and the engine does not) into free blocks and register them in
    the engine's prefix cache; returns how many blocks were loaded. Must not run while a step is in flight."""
    pc = _cache(engine)
    n = tier.num_matched(keys)
    todo = [k for k in keys[:n] if pc.lookup(k) is None]
    if not todo:
        return 0
    todo = todo[:pc.num_free]
    blocks = pc.allocate(len(todo))
    try:
        transfer_for(engine, tier).load(todo, blocks)
        for k, b in zip(todo, blocks):
            pc.register(b, k)
    finally:
        pc.free(blocks)  # cached and unreferenced: evictable until a request takes them
    return len(todo)
