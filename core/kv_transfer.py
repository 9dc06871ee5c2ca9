"""KV transfer: save and load paged-KV blocks by block key to a tier, layer by layer.

Shape legend: N blocks moved, P block size, Hkv kv heads, D head size, L layers.

A *tier* is somewhere KV blocks live outside this engine's paged cache, addressed by the block's key (the
prefix-cache hash of :mod:`anyaccel.models.prefix_cache`: 32 bytes naming the whole prefix up to the block's end,
the model and the dtype). Three tiers ship here:

- :class:`HostTier`: host memory (a dict of tensors; ``pin=True`` pins them for faster device copies);
- :class:`DiskTier`: local disk, one safetensors file per block (never pickle), written atomically;
- :class:`PeerTier`: another process over ``torch.distributed`` send/recv through the core's
  :class:`~anyaccel.core.collectives.Communicator` (so over the backend's own distributed backend): ``put``
  sends, the peer's :meth:`PeerTier.receive` takes the blocks in and serves them from host memory.

:class:`KVTransfer` binds a tier to one engine's caches (``[(k_cache, v_cache)] * L`` and their
:class:`~anyaccel.core.attention.AttentionSpec` s). Blocks travel in one canonical form whatever the backend's
declared layout: per layer, K and V as ``[P, Hkv, D]`` in the cache dtype (the ``NHD`` block); an ``HND`` cache is
transposed on the way in and out, so a cache written by one backend is read bit-exactly by another. A load is
layer by layer: :meth:`KVTransfer.start_load` returns a :class:`LoadHandle` whose worker thread fills layer 0,
then 1, ... while the caller waits only for the layer it is about to compute (:meth:`LoadHandle.wait_for_layer`),
so loading overlaps compute. Backends may speed up the copies (pinned staging, async device copies) by
subclassing a tier; the contract is the canonical block.

A key not held by the tier, or a block whose shapes or dtype differ from the target cache, raises
:class:`~anyaccel.core.errors.InvalidArgumentError` naming it, before anything is written.
"""
from __future__ import annotations

import os
import tempfile
import threading
from abc import ABC, abstractmethod
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from .attention import AttentionSpec
from .errors import InvalidArgumentError

__all__ = ["KVTier", "HostTier", "DiskTier", "PeerTier", "KVTransfer", "LoadHandle", "canonical_block",
           "KEY_BYTES"]

_OP = "kv_transfer"
KEY_BYTES = 32
_FORMAT = "anyaccel-kv-block-v1"


def _check_key(key: object) -> bytes:
    if not isinstance(key, (bytes, bytearray)) or len(key) != KEY_BYTES:
        raise InvalidArgumentError(_OP, "key", f"{KEY_BYTES} bytes (a prefix-cache block key)",
                                   f"{type(key).__name__} of length {len(key) if hasattr(key, '__len__') else '?'}")
    return bytes(key)


def canonical_block(cache: torch.Tensor, blocks: Sequence[int], layout: str) -> torch.Tensor:
    """The blocks ``blocks`` of one layer's K or V cache as ``[N, P, Hkv, D]`` (a copy)."""
    idx = torch.as_tensor(list(blocks), dtype=torch.int64, device=cache.device)
    sel = cache.index_select(0, idx)
    return sel.contiguous() if layout == "NHD" else sel.transpose(1, 2).contiguous()


def _write_blocks(cache: torch.Tensor, blocks: Sequence[int], x_NPHD: torch.Tensor, layout: str) -> None:
    idx = torch.as_tensor(list(blocks), dtype=torch.int64, device=cache.device)
    src = x_NPHD.to(cache.device, non_blocking=True)
    cache.index_copy_(0, idx, src if layout == "NHD" else src.transpose(1, 2))


class KVTier(ABC):
    """Where KV blocks live, by key. ``put`` takes one layer of one block at a time; a block is complete (and
    visible to ``contains``/``get``) once :meth:`commit` saw all its layers."""

    name = "tier"

    @abstractmethod
    def put(self, key: bytes, layer: int, k_PHD: torch.Tensor, v_PHD: torch.Tensor) -> None:
        """Store layer ``layer`` of block ``key`` (canonical ``[P, Hkv, D]`` tensors)."""

    @abstractmethod
    def commit(self, key: bytes, num_layers: int) -> None:
        """Every layer of ``key`` was put: make the block visible."""

    @abstractmethod
    def get(self, key: bytes, layer: int) -> Tuple[torch.Tensor, torch.Tensor]:
        """Layer ``layer`` of block ``key`` as canonical ``(K, V)``; raises KeyError when absent."""

    @abstractmethod
    def contains(self, key: bytes) -> bool:
        ...

    def num_matched(self, keys: Sequence[bytes]) -> int:
        """How many leading ``keys`` the tier holds (the longest prefix it can serve)."""
        n = 0
        for k in keys:
            if not self.contains(k):
                break
            n += 1
        return n


class HostTier(KVTier):
    """Blocks in host memory. ``pin=True`` pins each stored tensor (faster host-to-device copies where the
    device supports it)."""

    name = "host"

    def __init__(self, pin: bool = False) -> None:
        self.pin = pin
        self._pending: Dict[bytes, Dict[int, Tuple[torch.Tensor, torch.Tensor]]] = {}
        self._blocks: Dict[bytes, Dict[int, Tuple[torch.Tensor, torch.Tensor]]] = {}
        self._lock = threading.Lock()

    def _host(self, x: torch.Tensor) -> torch.Tensor:
        y = x.detach().to("cpu", copy=True)
        return y.pin_memory() if self.pin else y

    def put(self, key, layer, k_PHD, v_PHD) -> None:
        key = _check_key(key)
        with self._lock:
            self._pending.setdefault(key, {})[layer] = (self._host(k_PHD), self._host(v_PHD))

    def commit(self, key, num_layers) -> None:
        key = _check_key(key)
        with self._lock:
            layers = self._pending.pop(key, {})
            if sorted(layers) != list(range(num_layers)):
                raise InvalidArgumentError(_OP, "key", f"a block with all {num_layers} layers put",
                                           f"layers {sorted(layers)}")
            self._blocks[key] = layers

    def get(self, key, layer):
        return self._blocks[_check_key(key)][layer]

    def contains(self, key) -> bool:
        return _check_key(key) in self._blocks

    def __len__(self) -> int:
        return len(self._blocks)


class DiskTier(KVTier):
    """Blocks on local disk under ``root``: ``<key hex>.safetensors`` holding ``k.<layer>``/``v.<layer>`` and the
    format in its metadata. Files are written to a temporary name and renamed, so a reader never sees half a
    block; layers are read one at a time."""

    name = "disk"

    def __init__(self, root: str) -> None:
        os.makedirs(root, exist_ok=True)
        self.root = root
        self._pending: Dict[bytes, Dict[str, torch.Tensor]] = {}
        self._lock = threading.Lock()

    def path(self, key: bytes) -> str:
        return os.path.join(self.root, _check_key(key).hex() + ".safetensors")

    def put(self, key, layer, k_PHD, v_PHD) -> None:
        key = _check_key(key)
        with self._lock:
            d = self._pending.setdefault(key, {})
            d[f"k.{layer}"] = k_PHD.detach().to("cpu").contiguous()
            d[f"v.{layer}"] = v_PHD.detach().to("cpu").contiguous()

    def commit(self, key, num_layers) -> None:
        from safetensors.torch import save_file

        key = _check_key(key)
        with self._lock:
            tensors = self._pending.pop(key, {})
        want = {f"{kv}.{i}" for i in range(num_layers) for kv in "kv"}
        if set(tensors) != want:
            raise InvalidArgumentError(_OP, "key", f"a block with all {num_layers} layers put",
                                       f"tensors {sorted(tensors)}")
        fd, tmp = tempfile.mkstemp(dir=self.root, suffix=".tmp")
        os.close(fd)
        try:
            save_file(tensors, tmp, metadata={"format": _FORMAT, "key": key.hex(), "layers": str(num_layers)})
            os.replace(tmp, self.path(key))
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)

    def get(self, key, layer):
        from safetensors import safe_open

        p = self.path(key)
        if not os.path.exists(p):
            raise KeyError(key.hex())
        with safe_open(p, framework="pt") as f:
            meta = f.metadata() or {}
            if meta.get("format") != _FORMAT:
                raise InvalidArgumentError(_OP, "file", f"a {_FORMAT} safetensors file", f"{p}: {meta}")
            return f.get_tensor(f"k.{layer}"), f.get_tensor(f"v.{layer}")

    def contains(self, key) -> bool:
        return os.path.exists(self.path(key))


class PeerTier(HostTier):
    """Blocks sent to / received from another rank over a :class:`~anyaccel.core.collectives.Communicator`.

    The sender's :meth:`send` pushes whole blocks to ``peer``, layer by layer (a header, the keys, then K and V
    of layer 0, 1, ...); the receiver's :meth:`receive` takes them into host memory, from which ``get`` serves
    them like a :class:`HostTier`. Both sides must agree on the block format (the caches' specs).
    """

    name = "peer"

    def __init__(self, comm, peer: int) -> None:
        super().__init__()
        self.comm = comm
        self.peer = peer

    def send(self, keys: Sequence[bytes], layers) -> None:
        """Send N blocks: ``layers`` (sized) yields ``(K_NPHD, V_NPHD)`` of layer 0, 1, ..., each sent before the
        next is produced. The header carries N and the number of layers."""
        keys = [_check_key(k) for k in keys]
        layers = layers if hasattr(layers, "__len__") else list(layers)
        dev = self.comm.device
        header = torch.tensor([len(keys), len(layers)], dtype=torch.int64, device=dev)
        self.comm.send(header, self.peer)
        if not keys:
            return
        kt = torch.tensor([list(k) for k in keys], dtype=torch.uint8, device=dev)
        self.comm.send(kt, self.peer)
        for k_NPHD, v_NPHD in layers:
            self.comm.send(k_NPHD.to(dev), self.peer)
            self.comm.send(v_NPHD.to(dev), self.peer)

    def receive(self, shapes: Sequence[Tuple[Tuple[int, int, int], torch.dtype]]) -> List[bytes]:
        """Receive one :meth:`send` from the peer; ``shapes[i] = ((P, Hkv, D), dtype)`` of layer i. Returns the
        keys received (now held)."""
        dev = self.comm.device
        header = self.comm.recv(torch.zeros(2, dtype=torch.int64, device=dev), self.peer)
        n, num_layers = (int(x) for x in header.tolist())
        if num_layers != len(shapes) and n:
            raise InvalidArgumentError(_OP, "shapes", f"{num_layers} layers (what the peer sends)", len(shapes))
        if not n:
            return []
        kt = self.comm.recv(torch.zeros(n, KEY_BYTES, dtype=torch.uint8, device=dev), self.peer)
        keys = [bytes(row) for row in kt.cpu().tolist()]
        for i, (shape, dtype) in enumerate(shapes):
            k = self.comm.recv(torch.empty((n, *shape), dtype=dtype, device=dev), self.peer)
            v = self.comm.recv(torch.empty((n, *shape), dtype=dtype, device=dev), self.peer)
            for j, key in enumerate(keys):
                self.put(key, i, k[j], v[j])
        for key in keys:
            self.commit(key, len(shapes))
        return keys


class LoadHandle:
    """A load in flight: a worker thread fills the caches layer by layer; :meth:`wait_for_layer` blocks until
    layer ``i`` is in the cache (and re-raises the worker's error)."""

    def __init__(self, num_layers: int) -> None:
        self._done = [threading.Event() for _ in range(num_layers)]
        self._error: Optional[BaseException] = None
        self.thread: Optional[threading.Thread] = None

    def wait_for_layer(self, layer: int) -> None:
        self._done[layer].wait()
        if self._error is not None:
            raise self._error

    def wait(self) -> None:
        for i in range(len(self._done)):
            self.wait_for_layer(i)


class KVTransfer:
    """Moves blocks between one engine's paged caches and a tier, by key.

    :param tier: a :class:`KVTier`.
    :param kv_caches: ``[(k_cache, v_cache)]`` per layer, in the layouts of ``specs``.
    :param specs: one :class:`AttentionSpec` per layer (block size, kv heads, head size, layout, cache dtype).
    """

    def __init__(self, tier: KVTier, kv_caches: Sequence[Tuple[torch.Tensor, torch.Tensor]],
                 specs: Sequence[AttentionSpec]) -> None:
        if len(kv_caches) != len(specs) or not specs:
            raise InvalidArgumentError(_OP, "specs", f"one AttentionSpec per cache layer ({len(kv_caches)})",
                                       len(specs))
        self.tier = tier
        self.kv_caches = list(kv_caches)
        self.specs = list(specs)

    @property
    def num_layers(self) -> int:
        return len(self.specs)

    def block_shape(self, layer: int) -> Tuple[int, int, int]:
        s = self.specs[layer]
        return (s.block_size, s.num_kv_heads, s.head_size)

    def _check(self, keys: Sequence[bytes], blocks: Sequence[int]) -> List[bytes]:
        keys = [_check_key(k) for k in keys]
        if len(keys) != len(blocks):
            raise InvalidArgumentError(_OP, "blocks", f"one block id per key ({len(keys)})", len(blocks))
        n = self.kv_caches[0][0].shape[0]
        bad = [b for b in blocks if isinstance(b, bool) or not isinstance(b, int) or not 0 <= b < n]
        if bad:
            raise InvalidArgumentError(_OP, "blocks", f"block ids in [0, {n})", bad[0])
        return keys

    def save(self, keys: Sequence[bytes], blocks: Sequence[int]) -> int:
        """Store the cache blocks ``blocks`` under ``keys``, layer by layer; keys the tier already holds are
        skipped. Returns how many blocks were stored."""
        keys = self._check(keys, blocks)
        todo = [(k, b) for k, b in zip(keys, blocks) if not self.tier.contains(k)]
        if not todo:
            return 0
        ids = [b for _, b in todo]
        for i, (s, (kc, vc)) in enumerate(zip(self.specs, self.kv_caches)):
            k_NPHD = canonical_block(kc, ids, s.kv_layout)
            v_NPHD = canonical_block(vc, ids, s.kv_layout)
            for j, (key, _) in enumerate(todo):
                self.tier.put(key, i, k_NPHD[j], v_NPHD[j])
        for key, _ in todo:
            self.tier.commit(key, self.num_layers)
        return len(todo)

    def send(self, keys: Sequence[bytes], blocks: Sequence[int], peer: PeerTier) -> None:
        """Send the cache blocks ``blocks`` under ``keys`` to ``peer`` (whose rank calls :meth:`receive`)."""
        keys = self._check(keys, blocks)

        class _Layers:
            def __len__(_):
                return self.num_layers

            def __iter__(_):
                for s, (kc, vc) in zip(self.specs, self.kv_caches):
                    yield canonical_block(kc, blocks, s.kv_layout), canonical_block(vc, blocks, s.kv_layout)

        peer.send(keys, _Layers())

    def receive(self, peer: PeerTier) -> List[bytes]:
        """Receive one :meth:`send` of the peer into ``peer``'s host memory; returns the keys (load them with
        ``KVTransfer(peer, ...)``)."""
        return peer.receive([(self.block_shape(i), self.kv_caches[i][0].dtype) for i in range(self.num_layers)])

    def _load_layer(self, keys: Sequence[bytes], blocks: Sequence[int], layer: int) -> None:
        s = self.specs[layer]
        kc, vc = self.kv_caches[layer]
        got = [self.tier.get(k, layer) for k in keys]
        want = (self.block_shape(layer), kc.dtype)
        for key, (k, v) in zip(keys, got):
            for name, t in (("K", k), ("V", v)):
                if (tuple(t.shape), t.dtype) != want:
                    raise InvalidArgumentError(_OP, "block", f"layer {layer} {name} of shape {want[0]} in {want[1]}",
                                               f"{tuple(t.shape)} in {t.dtype} (key {key.hex()[:12]})")
        _write_blocks(kc, blocks, torch.stack([k for k, _ in got]), s.kv_layout)
        _write_blocks(vc, blocks, torch.stack([v for _, v in got]), s.kv_layout)

    def start_load(self, keys: Sequence[bytes], blocks: Sequence[int], background: bool = True) -> LoadHandle:
        """Load blocks ``keys`` into cache blocks ``blocks``, layer 0 first. Every key must be held (checked
        first). With ``background`` a worker thread does it and the handle waits per layer."""
        keys = self._check(keys, blocks)
        missing = [k for k in keys if not self.tier.contains(k)]
        if missing:
            raise InvalidArgumentError(_OP, "keys", f"keys held by the {self.tier.name} tier",
                                       f"{len(missing)} missing (first {missing[0].hex()[:12]})")
        h = LoadHandle(self.num_layers)

        def work():
            try:
                for i in range(self.num_layers):
                    self._load_layer(keys, blocks, i)
                    h._done[i].set()
            except BaseException as e:  # handed to whoever waits
                h._error = e
                for ev in h._done:
                    ev.set()

        if background:
            h.thread = threading.Thread(target=work, name="anyaccel-kv-load", daemon=True)
            h.thread.start()
        else:
            work()
        return h

    def load(self, keys: Sequence[bytes], blocks: Sequence[int]) -> None:
        """Load and wait for every layer."""
        self.start_load(keys, blocks, background=False).wait()
