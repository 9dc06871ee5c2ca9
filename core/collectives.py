"""Collectives family: a :class:`Communicator` over a ``torch.distributed`` process group.

A backend declares the ``torch.distributed`` backend name its collectives use
(``BackendDef.distributed_backend``); :meth:`Communicator.init` creates the process group from it. The core
never names a transport: what the transport can and cannot do is *measured* when a communicator is built (a
collective probe of every collective for every floating dtype, with the result checked and agreed by all
ranks) and recorded in a :class:`CollectiveCapability`. Where a transport lacks a (collective, dtype):

- a **reduction** (``all_reduce``, ``reduce_scatter``) runs in a wider dtype the transport does support
  (float32, else float64) and is rounded back once: never less accurate than the native path;
- **data movement** (``all_gather``, ``broadcast``, ``all_to_all``, ``send``/``recv``) moves the tensor's bytes
  (a ``uint8`` view): bit-exact for every dtype.

Each fallback is recorded (:meth:`Communicator.route`, :meth:`Communicator.fallbacks`); none is silent. If no
route exists the call raises :class:`UnsupportedError` with the probe's reasons, identically on every rank.

Semantics, the same on every backend:

- ``all_reduce(x, op)`` with ``op`` in ``sum``, ``max``, ``min``, ``avg`` (``avg`` = ``sum / world_size``,
  floating dtypes only) returns a new tensor.
- ``all_gather(x, dim)``: ranks may hold different sizes along ``dim`` (the rest must match); returns the
  concatenation in rank order along ``dim``.
- ``reduce_scatter(x, dim, op)``: every rank holds the full ``x``; rank ``r`` receives the reduction of chunk
  ``r`` of ``torch.tensor_split(x, world_size, dim)`` (uneven splits: the first ``n % world_size`` chunks are one
  longer; chunks may be empty).
- ``broadcast(x, src)``: returns a new tensor holding ``src``'s ``x``; on other ranks ``x`` gives only the shape
  and dtype (it is neither read for data nor written).
- ``send(x, dst)`` / ``recv(x, src)``: ``recv`` writes into ``x`` (the one method that mutates its argument) and
  returns it.
- ``all_to_all(xs)``: ``xs[p]`` goes to rank ``p``; sizes along dim 0 may differ per peer, other dims must
  match; returns ``out`` with ``out[s]`` received from rank ``s`` (views into one new buffer).
- ``barrier()``.

Inputs are never modified (except ``recv``'s). Every method validates its arguments before touching the group
and raises :class:`InvalidArgumentError` naming the argument. ``all_gather`` and ``all_to_all`` exchange a small
header first (dtype and shapes), so a rank whose tensors disagree with its peers' is reported on *every* rank
as an :class:`InvalidArgumentError` instead of a hang; ``all_reduce``, ``reduce_scatter`` and ``broadcast``
trust the caller to pass matching shapes and dtypes on every rank (checking would cost one more round trip).

Constructing a :class:`Communicator` is itself collective: every rank of the group must construct it together
(the probe runs collectives).

The float64 references (``*_reference``) take every rank's inputs, in rank order, and return every rank's
expected output: the oracle of the conformance suite.
"""
from __future__ import annotations

import datetime
import math
from dataclasses import dataclass
from typing import Dict, FrozenSet, List, Optional, Sequence, Tuple, TYPE_CHECKING, Union

import torch

import functools

from .errors import AnyaccelError, CollectiveError, InvalidArgumentError, UnsupportedError
from .validation import FLOAT_DTYPES, dtype_name, fmt_shape

if TYPE_CHECKING:  # pragma: no cover
    from .backend import Backend

__all__ = [
    "DEFAULT_TIMEOUT_SECONDS",
    "CollectiveError",
    "REDUCE_OPS",
    "COLLECTIVE_DTYPES",
    "PROBE_KINDS",
    "CollectiveCapability",
    "Communicator",
    "tensor_split_sizes",
    "all_reduce_reference",
    "all_gather_reference",
    "reduce_scatter_reference",
    "broadcast_reference",
    "send_recv_reference",
    "all_to_all_reference",
]

#: How long a collective of a group made by :meth:`Communicator.init` waits for its peers before raising
#: :class:`CollectiveError`: 300 s. torch.distributed's own default for host-memory transports is 30 minutes, so
#: one stalled or dead rank would hang every other rank for half an hour; five minutes still covers a slow first
#: step (weights loading on one rank while the others wait at a barrier). ``Communicator.init(timeout=...)``
#: changes it.
DEFAULT_TIMEOUT_SECONDS = 300.0

#: Reduction names accepted by ``all_reduce`` and ``reduce_scatter``.
REDUCE_OPS = ("sum", "max", "min", "avg")

#: Dtypes a communicator accepts. The floating ones are probed at construction; the rest are assumed native.
COLLECTIVE_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64,
                     torch.int8, torch.uint8, torch.int32, torch.int64)

#: What the probe measures, per dtype. ``all_reduce.sum`` etc. name one reduction of one collective.
PROBE_KINDS = ("all_reduce.sum", "all_reduce.max", "all_reduce.min",
               "reduce_scatter.sum", "reduce_scatter.max", "reduce_scatter.min",
               "all_gather", "broadcast", "all_to_all", "send_recv")

_MOVEMENT_KINDS = ("all_gather", "broadcast", "all_to_all", "send_recv")
_BYTES = torch.uint8
# Headers exchanged by all_gather / all_to_all: [dtype code, ndim, *shape padded to _MAX_DIMS].
_MAX_DIMS = 8
_HDR = 2 + _MAX_DIMS
_DTYPE_CODE = {d: i for i, d in enumerate(COLLECTIVE_DTYPES)}

_dist = None


def _torch_dist():
    """``torch.distributed``, imported on first use (so ``import anyaccel.core`` stays light)."""
    global _dist
    if _dist is None:
        import torch.distributed as dist

        if not dist.is_available():
            raise UnsupportedError("collectives: this torch build has no torch.distributed support")
        _dist = dist
    return _dist


def _transport_errors(operation: str, peer_arg: Optional[str] = None):
    """Decorate a Communicator method: a failure of the transport (a timeout, a dead or disconnected peer: torch
    raises them as ``RuntimeError`` subclasses) becomes a :class:`CollectiveError` naming the operation and, when
    the method has one, the peer rank. The core's own errors (bad arguments, unsupported routes) pass unchanged."""

    def wrap(fn):
        @functools.wraps(fn)
        def method(self, *args, **kwargs):
            try:
                return fn(self, *args, **kwargs)
            except AnyaccelError:
                raise
            except RuntimeError as e:
                peer = None
                if peer_arg is not None:
                    peer = kwargs.get(peer_arg, args[1] if len(args) > 1 else None)
                    peer = peer if isinstance(peer, int) and not isinstance(peer, bool) else None
                    peer = None if peer == self.rank else peer  # broadcast from here: any receiver
                raise self._collective_error(operation, peer, e) from e

        return method

    return wrap


def _reduce_op(name: str):
    dist = _torch_dist()
    return {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}[name]


def _describe(t: object) -> str:
    if isinstance(t, torch.Tensor):
        return f"tensor of shape {fmt_shape(tuple(t.shape))}, dtype {dtype_name(t.dtype)} on {t.device}"
    return f"{type(t).__name__} {t!r}"[:200]


def _wider(dtype: torch.dtype) -> Tuple[torch.dtype, ...]:
    """The dtypes a reduction in ``dtype`` may fall back to, narrowest first (never a narrower one)."""
    cands = (torch.float32, torch.float64) if dtype.is_floating_point else (torch.int64,)
    return tuple(w for w in cands if w.itemsize > dtype.itemsize)


def tensor_split_sizes(n: int, parts: int) -> List[int]:
    """The chunk sizes of ``torch.tensor_split`` of ``n`` elements into ``parts``: the first ``n % parts`` chunks
    are one longer."""
    q, r = divmod(n, parts)
    return [q + 1 if i < r else q for i in range(parts)]


# --------------------------------------------------------------------------------------------- capability


@dataclass(frozen=True)
class CollectiveCapability:
    """What a communicator's transport did natively when probed, as data.

    :param transport: the process group's backend name, as ``torch.distributed`` reports it.
    :param world_size: the group's size.
    :param probed_dtypes: the dtypes that were probed; others are assumed native.
    :param unsupported: ``(kind, dtype, reason)`` for every probe that failed (raised or returned wrong values),
        ``kind`` from :data:`PROBE_KINDS`.
    :param probed: every ``(kind, dtype)`` measured, including the wider dtypes probed for a failed reduction's
        fallback and the byte dtype probed for data movement's.
    """

    transport: str
    world_size: int
    probed_dtypes: FrozenSet[torch.dtype]
    unsupported: Tuple[Tuple[str, torch.dtype, str], ...] = ()
    probed: FrozenSet[Tuple[str, torch.dtype]] = frozenset()

    def is_native(self, kind: str, dtype: torch.dtype) -> bool:
        return not self.not_supported_reasons(kind, dtype)

    def not_supported_reasons(self, kind: str, dtype: torch.dtype) -> List[str]:
        return [f"{kind} {dtype_name(dtype)}: {why}" for k, d, why in self.unsupported if k == kind and d == dtype]

    def describe(self) -> dict:
        return {
            "transport": self.transport,
            "world_size": self.world_size,
            "probed_dtypes": sorted(dtype_name(d) for d in self.probed_dtypes),
            "unsupported": [{"kind": k, "dtype": dtype_name(d), "reason": r} for k, d, r in self.unsupported],
            "probed": sorted(f"{k} {dtype_name(d)}" for k, d in self.probed),
        }


@dataclass(frozen=True)
class _Route:
    """How one (kind, dtype) is carried: in ``dtype`` itself, in a wider dtype, or as bytes."""

    dtype: Optional[torch.dtype]  # the dtype handed to the transport; None = no route
    how: str                      # "native", "upcast", "bytes" or "none"
    reasons: Tuple[str, ...] = ()

    def describe(self, dtype: torch.dtype) -> str:
        if self.how == "native":
            return "native"
        if self.how == "none":
            return "unsupported: " + "; ".join(self.reasons)
        via = "bytes (uint8 view)" if self.how == "bytes" else f"{dtype_name(self.dtype)} upcast"
        return f"fallback via {via}: " + "; ".join(self.reasons)


# --------------------------------------------------------------------------------------------- communicator


class Communicator:
    """Collectives over one ``torch.distributed`` process group, with the core's validation and semantics.

    ``Communicator(group, device)`` wraps an existing group (``None`` = the default group); constructing it is
    collective (see the module docstring). ``Communicator.init(backend, rank, world_size, init_method)``
    creates the default group with the backend's declared ``distributed_backend`` first.

    :param probe: run the capability probe (default); with ``False`` every (collective, dtype) is assumed native.
    :param probe_dtypes: the dtypes to probe (default: the floating ones).

    Subclasses may override the ``_t_*`` transport methods (the only code that talks to the group), e.g. to
    wrap another transport, or in tests.
    """

    def __init__(self, group=None, device: Union[torch.device, str, None] = None, *, probe: bool = True,
                 probe_dtypes: Sequence[torch.dtype] = FLOAT_DTYPES, owns_group: bool = False,
                 timeout_s: Optional[float] = None) -> None:
        dist = _torch_dist()
        where = "Communicator"
        if not dist.is_initialized():
            raise InvalidArgumentError(where, "group", "a process group (torch.distributed is initialized)",
                                       "no default process group",
                                       "Create one with Communicator.init(backend, rank, world_size, init_method)")
        if group is None:
            group = dist.group.WORLD
        if not isinstance(group, dist.ProcessGroup):
            raise InvalidArgumentError(where, "group", "a torch.distributed ProcessGroup or None", _describe(group))
        if device is None:
            raise InvalidArgumentError(where, "device", "a torch.device (where this rank's tensors live)", "None")
        try:
            device = torch.device(device)
        except (RuntimeError, TypeError):
            raise InvalidArgumentError(where, "device", "a torch.device or device string", repr(device)) from None
        for d in probe_dtypes:
            if d not in COLLECTIVE_DTYPES:
                raise InvalidArgumentError(where, "probe_dtypes", "dtypes among "
                                           f"({', '.join(dtype_name(x) for x in COLLECTIVE_DTYPES)})", d)
        self.group = group
        self.device = device
        self.rank: int = dist.get_rank(group)
        self.world_size: int = dist.get_world_size(group)
        self.transport: str = str(dist.get_backend(group))
        self._owns_group = owns_group
        self.timeout_s = timeout_s
        self._routes: Dict[Tuple[str, torch.dtype], _Route] = {}
        probed: FrozenSet[Tuple[str, torch.dtype]] = frozenset()
        unsupported: Tuple[Tuple[str, torch.dtype, str], ...] = ()
        if probe:
            try:
                unsupported, probed = self._probe(tuple(probe_dtypes))
            except AnyaccelError:
                raise
            except RuntimeError as e:
                raise self._collective_error("Communicator (the construction probe)", None, e) from e
        self.capability = CollectiveCapability(self.transport, self.world_size,
                                               frozenset(probe_dtypes) if probe else frozenset(), unsupported,
                                               probed)

    # ---------------------------------------------------------------------------------------- creation

    @classmethod
    def init(cls, backend: "Backend", rank: int, world_size: int, init_method: str, *,
             timeout: Union[float, datetime.timedelta, None] = None,
             device: Union[torch.device, str, None] = None, **kwargs) -> "Communicator":
        """Create the default process group with ``backend``'s declared ``distributed_backend`` and wrap it.

        :param backend: a :class:`~anyaccel.core.backend.Backend`; it must be available and declare a
            ``distributed_backend``.
        :param rank: this process's rank, ``0 <= rank < world_size``.
        :param world_size: the number of processes.
        :param init_method: a rendezvous URL (``tcp://host:port``, ``file:///path``, ``env://``).
        :param timeout: seconds (or a timedelta) after which a collective that gets no answer raises
            :class:`CollectiveError`; default :data:`DEFAULT_TIMEOUT_SECONDS` (300 s), not torch's 30 minutes.
        :param device: where this rank's tensors live; default: the backend's device type, indexed by
            ``rank % device_count`` when its torch module reports more than one device.
        """
        from .backend import Backend

        dist = _torch_dist()
        where = "Communicator.init"
        if not isinstance(backend, Backend):
            raise InvalidArgumentError(where, "backend", "an anyaccel Backend", _describe(backend))
        transport = backend.definition.distributed_backend
        if not transport:
            raise UnsupportedError(
                f"{where}: backend '{backend.name}' declares no distributed_backend, so it has no collectives; "
                f"its plugin must set BackendDef.distributed_backend to a torch.distributed backend name")
        if not backend.available:
            raise UnsupportedError(f"{where}: backend '{backend.name}' is not available here: {backend.reason}")
        if not isinstance(world_size, int) or isinstance(world_size, bool) or world_size < 1:
            raise InvalidArgumentError(where, "world_size", "an int >= 1", repr(world_size))
        if not isinstance(rank, int) or isinstance(rank, bool) or not 0 <= rank < world_size:
            raise InvalidArgumentError(where, "rank", f"an int in [0, {world_size})", repr(rank))
        if not isinstance(init_method, str) or "://" not in init_method:
            raise InvalidArgumentError(where, "init_method", "a URL such as tcp://host:port or file:///path",
                                       repr(init_method))
        if timeout is None:
            timeout = DEFAULT_TIMEOUT_SECONDS
        if isinstance(timeout, datetime.timedelta):
            timeout = timeout.total_seconds()
        if not isinstance(timeout, (int, float)) or isinstance(timeout, bool) or not 0 < timeout < float("inf"):
            raise InvalidArgumentError(where, "timeout", "positive, finite seconds or a timedelta", repr(timeout))
        timeout = datetime.timedelta(seconds=float(timeout))
        if dist.is_initialized():
            raise InvalidArgumentError(where, "init_method", "a process whose default group is not yet created",
                                       "torch.distributed is already initialized",
                                       "Wrap the existing group with Communicator(group, device)")
        if device is None:
            device = cls._default_device(backend.device, rank)
        dist.init_process_group(backend=transport, init_method=init_method, rank=rank, world_size=world_size,
                                timeout=timeout)
        try:
            return cls(None, device, owns_group=True, timeout_s=timeout.total_seconds(), **kwargs)
        except BaseException:
            dist.destroy_process_group()
            raise

    @staticmethod
    def _default_device(device: torch.device, rank: int) -> torch.device:
        mod = getattr(torch, device.type, None)
        count = getattr(mod, "device_count", None)
        n = count() if callable(count) else 0
        if n > 1:
            device = torch.device(device.type, rank % n)
            set_device = getattr(mod, "set_device", None)
            if callable(set_device):
                set_device(device)
        return device

    def destroy(self) -> None:
        """Destroy the process group if this communicator created it (``Communicator.init``)."""
        dist = _torch_dist()
        if self._owns_group and dist.is_initialized():
            dist.destroy_process_group(self.group)
        self._owns_group = False

    def _collective_error(self, operation: str, peer: Optional[int], e: BaseException) -> CollectiveError:
        text = str(e).strip()
        cause = f"{type(e).__name__}: {text.splitlines()[0][:300] if text else 'no message'}"
        return CollectiveError(operation, self.rank, self.world_size, peer, cause, self.timeout_s)

    def __enter__(self) -> "Communicator":
        return self

    def __exit__(self, *exc) -> None:
        self.destroy()

    def __repr__(self) -> str:
        return (f"Communicator(transport={self.transport!r}, rank={self.rank}, world_size={self.world_size}, "
                f"device={self.device})")

    # ---------------------------------------------------------------------------------------- routes

    def route(self, kind: str, dtype: torch.dtype) -> str:
        """How ``kind`` (from :data:`PROBE_KINDS`; ``avg`` counts as ``sum``) is carried for ``dtype``."""
        kind = kind.replace(".avg", ".sum")
        return self._route(kind, dtype).describe(dtype)

    def fallbacks(self) -> List[str]:
        """One line per probed (kind, dtype) that does not run natively, saying how it runs instead."""
        lines = []
        for dtype in sorted(self.capability.probed_dtypes, key=dtype_name):
            for kind in PROBE_KINDS:
                r = self._route(kind, dtype)
                if r.how != "native":
                    lines.append(f"{kind} {dtype_name(dtype)}: {r.describe(dtype)}")
        return lines

    def _route(self, kind: str, dtype: torch.dtype) -> _Route:
        key = (kind, dtype)
        r = self._routes.get(key)
        if r is None:
            r = self._routes[key] = self._plan(kind, dtype)
        return r

    def _plan(self, kind: str, dtype: torch.dtype) -> _Route:
        cap = self.capability
        reasons = tuple(cap.not_supported_reasons(kind, dtype))
        if not reasons:
            return _Route(dtype, "native")
        if kind in _MOVEMENT_KINDS:
            if cap.is_native(kind, _BYTES):
                return _Route(_BYTES, "bytes", reasons)
            return _Route(None, "none", reasons + tuple(cap.not_supported_reasons(kind, _BYTES)))
        wider = [w for w in _wider(dtype) if (kind, w) in cap.probed]
        for w in wider:
            if cap.is_native(kind, w):
                return _Route(w, "upcast", reasons)
        more = tuple(x for w in wider for x in cap.not_supported_reasons(kind, w))
        return _Route(None, "none", reasons + more)

    def _carrier(self, method: str, kind: str, dtype: torch.dtype) -> _Route:
        r = self._route(kind, dtype)
        if r.dtype is None:
            raise UnsupportedError(f"{method}: the {self.transport!r} transport cannot carry {kind} for dtype "
                                   f"{dtype_name(dtype)}, and no fallback route works", r.reasons)
        return r

    # ---------------------------------------------------------------------------------------- transport
    # The only methods that talk to the group. Tensors are contiguous and on self.device.

    def _t_all_reduce(self, t: torch.Tensor, op: str) -> None:
        _torch_dist().all_reduce(t, op=_reduce_op(op), group=self.group)

    def _t_all_gather(self, out: torch.Tensor, inp: torch.Tensor) -> None:
        dist = _torch_dist()
        fn = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
        fn(out, inp, group=self.group)

    def _t_reduce_scatter(self, out: torch.Tensor, inp: torch.Tensor, op: str) -> None:
        dist = _torch_dist()
        fn = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
        fn(out, inp, op=_reduce_op(op), group=self.group)

    def _t_broadcast(self, t: torch.Tensor, src: int) -> None:
        dist = _torch_dist()
        dist.broadcast(t, src=dist.get_global_rank(self.group, src), group=self.group)

    def _t_all_to_all(self, out: torch.Tensor, inp: torch.Tensor, out_sizes: List[int],
                      in_sizes: List[int]) -> None:
        _torch_dist().all_to_all_single(out, inp, out_sizes, in_sizes, group=self.group)

    def _t_send(self, t: torch.Tensor, dst: int) -> None:
        dist = _torch_dist()
        dist.send(t, dist.get_global_rank(self.group, dst), group=self.group)

    def _t_recv(self, t: torch.Tensor, src: int) -> None:
        dist = _torch_dist()
        dist.recv(t, dist.get_global_rank(self.group, src), group=self.group)

    def _t_barrier(self) -> None:
        _torch_dist().barrier(group=self.group)

    # ---------------------------------------------------------------------------------------- probe

    def _probe(self, dtypes: Tuple[torch.dtype, ...]):
        """-> (failures as ``(kind, dtype, reason)``, every ``(kind, dtype)`` probed)."""
        # Run each kind once per dtype on tiny tensors, check the values, and agree on the outcome.
        # A reduction that fails is followed by probes of the wider dtypes its fallback would use, so a fallback
        # only ever runs on something measured. Every rank runs the same sequence (failures are agreed on).
        plan = [(k, d) for d in dtypes for k in PROBE_KINDS]
        if _BYTES not in dtypes:
            plan += [(k, _BYTES) for k in _MOVEMENT_KINDS]
        failed: List[Tuple[str, torch.dtype, str]] = []
        done = set()
        flag = torch.zeros(1, dtype=torch.int64, device=self.device)
        while plan:
            kind, dtype = plan.pop(0)
            if (kind, dtype) in done:
                continue
            done.add((kind, dtype))
            if kind == "send_recv" and self.world_size == 1:
                continue
            try:
                why = "" if self._probe_one(kind, dtype) else "returned wrong values"
            except Exception as e:  # the transport's own "unsupported" error, whatever its type
                first = str(e).strip().splitlines()[0][:200] if str(e).strip() else ""
                why = f"{type(e).__name__}: {first}"
            flag.fill_(1 if why else 0)
            self._t_all_reduce(flag, "max")
            if why or int(flag.item()):
                failed.append((kind, dtype, why or "failed on another rank"))
                if kind not in _MOVEMENT_KINDS:
                    plan[:0] = [(kind, w) for w in _wider(dtype)]
        return tuple(failed), frozenset(done)

    def _probe_one(self, kind: str, dtype: torch.dtype) -> bool:
        ws, r, dev = self.world_size, self.rank, self.device
        if kind.startswith("all_reduce.") or kind.startswith("reduce_scatter."):
            op = kind.split(".")[1]
            # sum: rank 0 holds 1, others 0 -> 1; max: r -> ws-1; min: r -> 0 (all exact in every dtype).
            v = float(r == 0) if op == "sum" else float(min(r, 100))
            want = {"sum": 1.0, "max": float(min(ws - 1, 100)), "min": 0.0}[op]
            if kind.startswith("all_reduce."):
                t = torch.full((2,), v, dtype=dtype, device=dev)
                self._t_all_reduce(t, op)
            else:
                inp = torch.full((2 * ws,), v, dtype=dtype, device=dev)
                t = torch.empty(2, dtype=dtype, device=dev)
                self._t_reduce_scatter(t, inp, op)
            return bool((t.double() == want).all())
        if kind == "all_gather":
            inp = torch.full((2,), float(r % 100), dtype=dtype, device=dev)
            out = torch.empty(2 * ws, dtype=dtype, device=dev)
            self._t_all_gather(out, inp)
            want = (torch.arange(ws, device=dev) % 100).repeat_interleave(2).double()
            return bool((out.double() == want).all())
        if kind == "broadcast":
            t = torch.full((3,), 7.0 if r == 0 else 0.0, dtype=dtype, device=dev)
            self._t_broadcast(t, 0)
            return bool((t.double() == 7.0).all())
        if kind == "all_to_all":
            # uneven splits: rank r sends 1 + (r + p) % 2 elements of value (r + p) % 100 to peer p.
            in_sizes = [1 + (r + p) % 2 for p in range(ws)]
            out_sizes = [1 + (s + r) % 2 for s in range(ws)]
            inp = torch.cat([torch.full((n,), float((r + p) % 100), dtype=dtype, device=dev)
                             for p, n in enumerate(in_sizes)])
            out = torch.empty(sum(out_sizes), dtype=dtype, device=dev)
            self._t_all_to_all(out, inp, out_sizes, in_sizes)
            want = torch.cat([torch.full((n,), float((s + r) % 100), dtype=torch.float64, device=dev)
                              for s, n in enumerate(out_sizes)])
            return bool((out.double() == want).all())
        if kind == "send_recv":
            # a ring: even ranks send first, odd ranks receive first.
            nxt, prv = (r + 1) % ws, (r - 1) % ws
            t = torch.full((3,), float(r % 100), dtype=dtype, device=dev)
            got = torch.empty(3, dtype=dtype, device=dev)
            if r % 2 == 0:
                self._t_send(t, nxt)
                self._t_recv(got, prv)
            else:
                self._t_recv(got, prv)
                self._t_send(t, nxt)
            return bool((got.double() == float(prv % 100)).all())
        raise AssertionError(kind)  # pragma: no cover

    # ---------------------------------------------------------------------------------------- validation

    def _check_x(self, method: str, name: str, x: object, *, min_dim: int = 0) -> None:
        if not isinstance(x, torch.Tensor):
            raise InvalidArgumentError(method, name, "a torch.Tensor", _describe(x))
        dev = self.device
        if x.device.type != dev.type or (dev.index is not None and x.device.index != dev.index):
            raise InvalidArgumentError(method, name, f"a tensor on {dev} (the communicator's device)",
                                       _describe(x), "Move the tensor to the communicator's device first")
        if x.dtype not in _DTYPE_CODE:
            raise InvalidArgumentError(method, name, "dtype in (" + ", ".join(dtype_name(d) for d in
                                                                            COLLECTIVE_DTYPES) + ")", _describe(x))
        if x.dim() < min_dim:
            raise InvalidArgumentError(method, name, f"a tensor with at least {min_dim} dim", _describe(x))

    def _check_op(self, method: str, op: object, dtype: torch.dtype) -> str:
        if op not in REDUCE_OPS:
            raise InvalidArgumentError(method, "op", f"one of {', '.join(map(repr, REDUCE_OPS))}", repr(op))
        if op == "avg" and not dtype.is_floating_point:
            raise InvalidArgumentError(method, "op", "'avg' only with a floating dtype (use 'sum')",
                                       f"'avg' with dtype {dtype_name(dtype)}")
        return op  # type: ignore[return-value]

    @staticmethod
    def _check_dim(method: str, dim: object, x: torch.Tensor) -> int:
        nd = x.dim()
        if not isinstance(dim, int) or isinstance(dim, bool) or not -nd <= dim < nd:
            raise InvalidArgumentError(method, "dim", f"an int in [{-nd}, {nd}) for a {nd}-d tensor", repr(dim))
        return dim % nd

    def _check_rank(self, method: str, name: str, value: object, *, not_self: bool = False) -> int:
        ws = self.world_size
        if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < ws:
            raise InvalidArgumentError(method, name, f"a rank in [0, {ws})", repr(value))
        if not_self and value == self.rank:
            raise InvalidArgumentError(method, name, f"a rank other than this one ({self.rank})", repr(value),
                                       "A process cannot send to or receive from itself")
        return value

    def _check_max_dims(self, method: str, name: str, x: torch.Tensor) -> None:
        if x.dim() > _MAX_DIMS:
            raise InvalidArgumentError(method, name, f"at most {_MAX_DIMS} dims", _describe(x))

    # ---------------------------------------------------------------------------------------- headers

    def _header(self, x: torch.Tensor) -> List[int]:
        shape = list(x.shape) + [0] * (_MAX_DIMS - x.dim())
        return [_DTYPE_CODE[x.dtype], x.dim(), *shape]

    def _gather_headers(self, rows: List[List[int]]) -> List[List[List[int]]]:
        """All-gather ``rows`` (the same count on every rank): ``result[rank][i]`` is that rank's row ``i``."""
        n = len(rows)
        mine = torch.tensor(rows, dtype=torch.int64, device=self.device).reshape(-1)  # [n * _HDR]
        out = torch.empty(self.world_size * n * _HDR, dtype=torch.int64, device=self.device)
        self._t_all_gather(out, mine)
        return out.view(self.world_size, n, _HDR).tolist()

    @staticmethod
    def _fmt_header(h: List[int]) -> str:
        return f"{dtype_name(COLLECTIVE_DTYPES[h[0]])} {fmt_shape(h[2:2 + h[1]])}"

    # ---------------------------------------------------------------------------------------- collectives

    @_transport_errors("all_reduce")
    def all_reduce(self, x: torch.Tensor, op: str = "sum") -> torch.Tensor:
        """Reduce ``x`` over every rank with ``op``; return the result as a new tensor (``x`` is not modified)."""
        self._check_x("all_reduce", "x", x)
        op = self._check_op("all_reduce", op, x.dtype)
        top = "sum" if op == "avg" else op
        r = self._carrier("all_reduce", f"all_reduce.{top}", x.dtype)
        if r.dtype == x.dtype:
            y = x.clone(memory_format=torch.contiguous_format)
        else:
            y = x.to(r.dtype, memory_format=torch.contiguous_format)
        if y.numel():
            self._t_all_reduce(y, top)
        if op == "avg":
            y.div_(self.world_size)
        return y if y.dtype == x.dtype else y.to(x.dtype)

    @_transport_errors("all_gather")
    def all_gather(self, x: torch.Tensor, dim: int = 0) -> torch.Tensor:
        """Concatenate every rank's ``x`` along ``dim`` in rank order; sizes along ``dim`` may differ per rank."""
        self._check_x("all_gather", "x", x, min_dim=1)
        d = self._check_dim("all_gather", dim, x)
        self._check_max_dims("all_gather", "x", x)
        headers = [rows[0] for rows in self._gather_headers([self._header(x)])]
        mine = headers[self.rank]
        for h in headers:
            if h[0] != mine[0] or h[1] != mine[1] or h[2:2 + d] != mine[2:2 + d] or h[3 + d:] != mine[3 + d:]:
                all_h = ", ".join(f"rank {i}: {self._fmt_header(g)}" for i, g in enumerate(headers))
                raise InvalidArgumentError("all_gather", "x", f"the same dtype and the same sizes outside dim {d} "
                                           "on every rank", all_h)
        sizes = [h[2 + d] for h in headers]                 # per-rank size along dim
        xm = x.movedim(d, 0)                                # [n_r, *rest]
        rest = tuple(xm.shape[1:])
        m = max(sizes)
        ws = self.world_size
        if m == 0 or math.prod(rest) == 0:
            return torch.empty((sum(sizes), *rest), dtype=x.dtype, device=x.device).movedim(0, d).contiguous()
        r = self._carrier("all_gather", "all_gather", x.dtype)
        if xm.shape[0] == m:
            inp = xm.contiguous()                           # [m, *rest]
        else:
            inp = x.new_zeros((m, *rest))
            inp[: xm.shape[0]] = xm
        out = torch.empty((ws * m, *rest), dtype=x.dtype, device=x.device)  # [ws * m, *rest]
        if r.how == "bytes":
            self._t_all_gather(out.view(-1).view(_BYTES), inp.view(-1).view(_BYTES))
        else:
            self._t_all_gather(out, inp)
        if any(s != m for s in sizes):
            out_v = out.view(ws, m, *rest)
            out = torch.cat([out_v[i, :s] for i, s in enumerate(sizes)])
        return out.movedim(0, d).contiguous() if d else out

    @_transport_errors("reduce_scatter")
    def reduce_scatter(self, x: torch.Tensor, dim: int = 0, op: str = "sum") -> torch.Tensor:
        """Reduce ``x`` over every rank and return this rank's chunk of ``torch.tensor_split(x, world_size, dim)``."""
        self._check_x("reduce_scatter", "x", x, min_dim=1)
        d = self._check_dim("reduce_scatter", dim, x)
        op = self._check_op("reduce_scatter", op, x.dtype)
        top = "sum" if op == "avg" else op
        r = self._carrier("reduce_scatter", f"reduce_scatter.{top}", x.dtype)
        ws = self.world_size
        xm = x.movedim(d, 0)                                # [n, *rest]
        n, rest = xm.shape[0], tuple(xm.shape[1:])
        sizes = tensor_split_sizes(n, ws)
        m = sizes[0]                                        # the largest chunk
        if m == 0 or xm.numel() == 0:
            return torch.zeros((sizes[self.rank], *rest), dtype=x.dtype, device=x.device).movedim(0, d).contiguous()
        if n == m * ws:
            inp = xm.to(r.dtype, memory_format=torch.contiguous_format)  # [ws * m, *rest]
            if inp.data_ptr() == x.data_ptr():
                inp = inp.clone()  # the transport may use its input as scratch; never touch the caller's x
        else:
            inp = torch.zeros((ws, m, *rest), dtype=r.dtype, device=x.device)  # [ws, m, *rest]
            start = 0
            for i, s in enumerate(sizes):
                inp[i, :s] = xm[start:start + s]
                start += s
            inp = inp.view(ws * m, *rest)
        out = torch.empty((m, *rest), dtype=r.dtype, device=x.device)  # [m, *rest]
        self._t_reduce_scatter(out, inp, top)
        if op == "avg":
            out.div_(ws)
        out = out[: sizes[self.rank]]
        if out.dtype != x.dtype:
            out = out.to(x.dtype)
        return out.movedim(0, d).contiguous() if d else out.contiguous()

    @_transport_errors("broadcast", "src")
    def broadcast(self, x: torch.Tensor, src: int) -> torch.Tensor:
        """Return a new tensor holding rank ``src``'s ``x``; elsewhere ``x`` gives only the shape and dtype."""
        self._check_x("broadcast", "x", x)
        src = self._check_rank("broadcast", "src", src)
        r = self._carrier("broadcast", "broadcast", x.dtype)
        if self.rank == src:
            t = x.clone(memory_format=torch.contiguous_format)
        else:
            t = torch.empty(x.shape, dtype=x.dtype, device=x.device)
        if t.numel():
            self._t_broadcast(t.reshape(-1).view(_BYTES) if r.how == "bytes" else t, src)
        return t

    @_transport_errors("send", "dst")
    def send(self, x: torch.Tensor, dst: int) -> None:
        """Send ``x`` to rank ``dst`` (which calls ``recv`` with a tensor of the same shape and dtype)."""
        self._check_x("send", "x", x)
        dst = self._check_rank("send", "dst", dst, not_self=True)
        r = self._carrier("send", "send_recv", x.dtype)
        t = x.contiguous()
        if t.numel():
            self._t_send(t.reshape(-1).view(_BYTES) if r.how == "bytes" else t, dst)

    @_transport_errors("recv", "src")
    def recv(self, x: torch.Tensor, src: int) -> torch.Tensor:
        """Receive from rank ``src`` **into** ``x`` (this method mutates ``x``) and return ``x``."""
        self._check_x("recv", "x", x)
        src = self._check_rank("recv", "src", src, not_self=True)
        r = self._carrier("recv", "send_recv", x.dtype)
        if not x.numel():
            return x
        t = x if x.is_contiguous() else torch.empty(x.shape, dtype=x.dtype, device=x.device)
        self._t_recv(t.reshape(-1).view(_BYTES) if r.how == "bytes" else t, src)
        if t is not x:
            x.copy_(t)
        return x

    @_transport_errors("all_to_all")
    def all_to_all(self, xs: Sequence[torch.Tensor]) -> List[torch.Tensor]:
        """Send ``xs[p]`` to rank ``p``; return ``out`` with ``out[s]`` from rank ``s``.

        Sizes along dim 0 may differ per peer; the other dims and the dtype must be the same everywhere. The
        results are views into one new buffer; ``xs`` is not modified.
        """
        ws = self.world_size
        if not isinstance(xs, (list, tuple)):
            raise InvalidArgumentError("all_to_all", "xs", f"a list of {ws} tensors (one per rank)", _describe(xs))
        if len(xs) != ws:
            raise InvalidArgumentError("all_to_all", "xs", f"a list of world_size = {ws} tensors",
                                       f"a list of {len(xs)}")
        for p, t in enumerate(xs):
            self._check_x("all_to_all", f"xs[{p}]", t, min_dim=1)
            self._check_max_dims("all_to_all", f"xs[{p}]", t)
        first = xs[0]
        for p, t in enumerate(xs):
            if t.dtype != first.dtype or t.shape[1:] != first.shape[1:]:
                raise InvalidArgumentError("all_to_all", f"xs[{p}]", f"dtype {dtype_name(first.dtype)} and shape "
                                           f"{fmt_shape(('*', *first.shape[1:]))} (as xs[0])", _describe(t))
        table = self._gather_headers([self._header(t) for t in xs])  # table[src][dst] = header
        mine = table[self.rank][0]
        for s, rows in enumerate(table):
            for h in rows:
                if h[0] != mine[0] or h[1] != mine[1] or h[3:] != mine[3:]:
                    raise InvalidArgumentError(
                        "all_to_all", "xs", "the same dtype and sizes outside dim 0 on every rank",
                        f"rank {self.rank}: {self._fmt_header(mine)}, rank {s}: {self._fmt_header(h)}")
        rest = tuple(first.shape[1:])
        in_sizes = [t.shape[0] for t in xs]
        out_sizes = [table[s][self.rank][2] for s in range(ws)]
        out = torch.empty((sum(out_sizes), *rest), dtype=first.dtype, device=first.device)
        moved = sum(h[2] for rows in table for h in rows)
        if moved and math.prod(rest):
            r = self._carrier("all_to_all", "all_to_all", first.dtype)
            inp = torch.cat([t.reshape(t.shape[0], *rest) for t in xs])  # [sum(in_sizes), *rest]
            if r.how == "bytes":
                self._t_all_to_all(out.view(out.shape[0], -1).view(_BYTES), inp.view(inp.shape[0], -1).view(_BYTES),
                                   out_sizes, in_sizes)
            else:
                self._t_all_to_all(out, inp, out_sizes, in_sizes)
        return list(out.split(out_sizes))

    @_transport_errors("barrier")
    def barrier(self) -> None:
        """Return once every rank has called ``barrier``."""
        self._t_barrier()


# --------------------------------------------------------------------------------------------- references


def _check_list(fn: str, name: str, xs: object) -> None:
    if not isinstance(xs, (list, tuple)) or not xs:
        raise InvalidArgumentError(fn, name, "a non-empty list with one entry per rank", _describe(xs))


def _reduce64(fn: str, xs: Sequence[torch.Tensor], op: str) -> torch.Tensor:
    if op not in REDUCE_OPS:
        raise InvalidArgumentError(fn, "op", f"one of {', '.join(map(repr, REDUCE_OPS))}", repr(op))
    st = torch.stack([x.double() for x in xs])
    if op == "sum":
        return st.sum(0)
    if op == "avg":
        return st.sum(0) / len(xs)
    return st.amax(0) if op == "max" else st.amin(0)


def all_reduce_reference(xs: Sequence[torch.Tensor], op: str = "sum") -> List[torch.Tensor]:
    """Every rank's expected ``all_reduce`` output (float64), given every rank's input."""
    _check_list("all_reduce_reference", "xs", xs)
    y = _reduce64("all_reduce_reference", xs, op)
    return [y.clone() for _ in xs]


def all_gather_reference(xs: Sequence[torch.Tensor], dim: int = 0) -> List[torch.Tensor]:
    """Every rank's expected ``all_gather`` output (float64): the inputs concatenated along ``dim``."""
    _check_list("all_gather_reference", "xs", xs)
    y = torch.cat([x.double() for x in xs], dim=dim)
    return [y.clone() for _ in xs]


def reduce_scatter_reference(xs: Sequence[torch.Tensor], dim: int = 0, op: str = "sum") -> List[torch.Tensor]:
    """Every rank's expected ``reduce_scatter`` output (float64): chunk ``r`` of ``tensor_split`` of the reduction."""
    _check_list("reduce_scatter_reference", "xs", xs)
    y = _reduce64("reduce_scatter_reference", xs, op)
    return [c.clone() for c in torch.tensor_split(y, len(xs), dim=dim)]


def broadcast_reference(xs: Sequence[torch.Tensor], src: int) -> List[torch.Tensor]:
    """Every rank's expected ``broadcast`` output (float64): rank ``src``'s input."""
    _check_list("broadcast_reference", "xs", xs)
    return [xs[src].double().clone() for _ in xs]


def send_recv_reference(xs: Sequence[torch.Tensor], sources: Sequence[Optional[int]]) -> List[Optional[torch.Tensor]]:
    """What each rank's ``recv`` holds (float64) when rank ``r`` receives from ``sources[r]`` (None: nothing)."""
    _check_list("send_recv_reference", "xs", xs)
    return [None if s is None else xs[s].double().clone() for s in sources]


def all_to_all_reference(xs: Sequence[Sequence[torch.Tensor]]) -> List[List[torch.Tensor]]:
    """Every rank's expected ``all_to_all`` output (float64): ``out[r][s] = xs[s][r]``."""
    _check_list("all_to_all_reference", "xs", xs)
    n = len(xs)
    return [[xs[s][r].double().clone() for s in range(n)] for r in range(n)]
