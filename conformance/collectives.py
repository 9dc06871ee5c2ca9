"""Conformance of a backend's collectives: every Communicator method, on several processes, against the float64
reference computed in this (the parent) process from every rank's inputs.

One spawn of ``world_size`` workers runs every case for every dtype and sends each rank's output back through a
pipe; the parent compares. Shapes are chosen so that sizes do not divide evenly by the world size, and include
empty pieces. A hung or crashed worker never hangs the suite: the process group has an operation timeout, the
whole run has a deadline, and every case without an answer from every rank is reported as ``error`` with why.

Tolerances come from the suite's one table (:mod:`anyaccel.conformance.tolerances`): data movement
(all_gather, broadcast, send/recv, all_to_all) and ``max``/``min`` reductions are held to ``collective_copy``
(bit-exact); ``sum`` and ``avg`` to ``collective_sum`` with the world size as the reduction length. Every output
must also keep its input's dtype and the exact expected shape.
"""
from __future__ import annotations

import importlib
import importlib.util
import io
import os
import multiprocessing.connection as mp_connection
import shutil
import sys
import tempfile
import time
import zlib
import dataclasses
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch

from ..core.backend import Backend, BackendDef
from ..core.collectives import (COLLECTIVE_DTYPES, Communicator, all_gather_reference, all_reduce_reference,
                                all_to_all_reference, broadcast_reference, reduce_scatter_reference,
                                send_recv_reference)
from ..core.errors import InvalidArgumentError, UnsupportedError
from ..core.validation import dtype_name
from .cases import CaseResult
from .tolerances import compare, tolerance

__all__ = ["CollectiveCase", "collective_cases", "run_collectives", "backend_communicator", "COMMUNICATOR_PROPERTY",
           "FAULTS", "FAULT_SLACK_SECONDS"]

#: The key of ``Backend.properties`` under which a backend names its own Communicator subclass (see
#: :func:`backend_communicator`).
COMMUNICATOR_PROPERTY = "communicator"

KIND = "collective"


@dataclass(frozen=True)
class CollectiveCase:
    """One collective call, the same on every rank.

    :param name: readable and unique, with the shapes (``|`` separates per-rank sizes).
    :param op: the Communicator method exercised.
    :param route: the capability kind it uses (``"all_reduce.sum"``, ``"all_gather"``...), for the report.
    :param make: ``make(world_size, dtype) -> [inputs of rank 0, ...]``, deterministic.
    :param run: ``run(comm, my_inputs) -> output`` (a tensor, a list of tensors, or None).
    :param reference: ``reference(all_inputs) -> [expected output of rank 0, ...]`` in float64.
    :param tolerance_class: the row of the tolerance table: ``"collective_copy"`` or ``"collective_sum"``.
    :param dtype_free: runs once, not per dtype (barrier).
    :param fault: ``"stall"`` or ``"dead"``: a fault case (see :data:`FAULTS`); ``make``, ``run`` and ``reference``
        are unused, the worker runs it after every other case.
    """

    name: str
    op: str
    route: str
    make: Callable[[int, torch.dtype], List[Any]]
    run: Callable[[Communicator, Any], Any]
    reference: Callable[[List[Any]], List[Any]]
    tolerance_class: str = "collective_copy"
    dtype_free: bool = False
    fault: str = ""


#: The fault cases: the last rank stops answering (``stall``: it sleeps past the timeout; ``dead``: its process
#: exits) while the others call ``all_reduce`` on a fresh group of every rank made with a short timeout
#: (``fault_timeout`` of :func:`run_collectives`). Each surviving rank must raise
#: :class:`~anyaccel.core.errors.CollectiveError` (not hang, not return a value) within the timeout plus
#: :data:`FAULT_SLACK_SECONDS`. They run last: a broken group is not reused.
FAULTS = {"stall": "stalled peer", "dead": "dead peer"}
#: What a surviving rank may take beyond the group's timeout before its error counts as late (process scheduling
#: on a loaded machine, the transport's own polling).
FAULT_SLACK_SECONDS = 10.0


def _gen(name: str, rank: int) -> torch.Generator:
    return torch.Generator().manual_seed(zlib.crc32(f"{name}/{rank}".encode()))


def _randn(name: str, rank: int, shape: Sequence[int], dtype: torch.dtype) -> torch.Tensor:
    if not dtype.is_floating_point:  # small integers: a sum over 8 ranks stays inside int8
        low = 0 if dtype == torch.uint8 else -8
        return torch.randint(low, low + 16, tuple(shape), generator=_gen(name, rank)).to(dtype)
    return torch.randn(tuple(shape), generator=_gen(name, rank)).to(dtype)


def _sizes_label(sizes: Sequence[int]) -> str:
    return "|".join(str(s) for s in sizes)


def collective_cases(world_size: int) -> List[CollectiveCase]:
    """The cases run for ``world_size`` processes (the same list in the parent and in every worker)."""
    ws = world_size
    cases: List[CollectiveCase] = []

    # all_reduce over [7, 3]: every op.
    for op in ("sum", "max", "min", "avg"):
        name = f"all_reduce {op} [7, 3]"
        cases.append(CollectiveCase(
            name, "all_reduce", f"all_reduce.{op}",
            make=lambda n, dt, name=name: [_randn(name, r, (7, 3), dt) for r in range(n)],
            run=lambda c, x, op=op: c.all_reduce(x, op=op),
            reference=lambda xs, op=op: all_reduce_reference(xs, op),
            tolerance_class="collective_sum" if op in ("sum", "avg") else "collective_copy"))

    # all_gather: uneven rows, an empty rank, along dim 1, and an even split.
    uneven = [(5, 3, 0, 2, 4, 1, 6, 7)[r % 8] for r in range(ws)]
    empty_first = [0] + [3] * (ws - 1)
    along1 = [(2, 5, 1, 4)[r % 4] for r in range(ws)]
    for dim, sizes, label in ((0, uneven, "[{}, 4]"), (0, empty_first, "[{}, 4]"), (1, along1, "[3, {}]"),
                              (0, [4] * ws, "[{}, 6]")):
        name = f"all_gather dim={dim} {label.format(_sizes_label(sizes))}"
        tail = 4 if label.endswith(", 4]") else 6

        def make(n, dt, name=name, sizes=sizes, dim=dim, tail=tail):
            return [_randn(name, r, (sizes[r], tail) if dim == 0 else (3, sizes[r]), dt) for r in range(n)]

        cases.append(CollectiveCase(name, "all_gather", "all_gather", make=make,
                                    run=lambda c, x, dim=dim: c.all_gather(x, dim=dim),
                                    reference=lambda xs, dim=dim: all_gather_reference(xs, dim)))

    # reduce_scatter: rows not divisible by ws, along dim 1, and fewer rows than ranks (empty chunks).
    odd = 2 * ws + 1
    for dim, shape, op in ((0, (odd, 3), "sum"), (0, (odd, 3), "max"), (0, (odd, 3), "avg"),
                           (1, (3, odd), "sum"), (0, (max(ws - 1, 1), 5), "sum")):
        name = f"reduce_scatter {op} dim={dim} {list(shape)}"
        cases.append(CollectiveCase(
            name, "reduce_scatter", f"reduce_scatter.{op}",
            make=lambda n, dt, name=name, shape=shape: [_randn(name, r, shape, dt) for r in range(n)],
            run=lambda c, x, dim=dim, op=op: c.reduce_scatter(x, dim=dim, op=op),
            reference=lambda xs, dim=dim, op=op: reduce_scatter_reference(xs, dim, op),
            tolerance_class="collective_sum" if op in ("sum", "avg") else "collective_copy"))

    # broadcast from the first and from the last rank.
    for src, shape in ((0, (5, 3)), (ws - 1, (7,))):
        name = f"broadcast src={src} {list(shape)}"
        cases.append(CollectiveCase(
            name, "broadcast", "broadcast",
            make=lambda n, dt, name=name, shape=shape: [_randn(name, r, shape, dt) for r in range(n)],
            run=lambda c, x, src=src: c.broadcast(x, src),
            reference=lambda xs, src=src: broadcast_reference(xs, src)))

    # send / recv around a ring.
    if ws > 1:
        name = "send_recv ring [6, 5]"
        cases.append(CollectiveCase(
            name, "send_recv", "send_recv",
            make=lambda n, dt, name=name: [_randn(name, r, (6, 5), dt) for r in range(n)],
            run=_ring,
            reference=lambda xs: send_recv_reference(xs, [(r - 1) % len(xs) for r in range(len(xs))])))

    # all_to_all: rank r sends (r + 2p + 1) % 4 rows to peer p (some zero).
    name = "all_to_all rows (r+2p+1)%4 [*, 3]"
    cases.append(CollectiveCase(
        name, "all_to_all", "all_to_all",
        make=lambda n, dt, name=name: [[_randn(f"{name}/{p}", r, ((r + 2 * p + 1) % 4, 3), dt) for p in range(n)]
                                       for r in range(n)],
        run=lambda c, xs: c.all_to_all(xs),
        reference=all_to_all_reference))

    cases.append(CollectiveCase("barrier", "barrier", "", make=lambda n, dt: [None] * n,
                                run=lambda c, _: c.barrier(), reference=lambda xs: [None] * len(xs),
                                dtype_free=True))
    if ws > 1:
        for fault, label in FAULTS.items():
            cases.append(CollectiveCase(f"{label}: all_reduce raises CollectiveError in time", "all_reduce",
                                        "", make=lambda n, dt: [None] * n, run=lambda c, _: None,
                                        reference=lambda xs: [None] * len(xs), dtype_free=True, fault=fault))
    return cases


def _run_faults(comm: Communicator, communicator: type, faults: List[CollectiveCase], fault_timeout: float,
                conn) -> None:
    """Run the fault cases (every rank, together); the last rank is the faulty one and, after ``dead``, exits."""
    import datetime

    import torch.distributed as dist

    ws, rank = comm.world_size, comm.rank
    faulty = rank == ws - 1
    # every group is made up front, by every rank, while all of them still answer
    groups = [dist.new_group(list(range(ws)), timeout=datetime.timedelta(seconds=fault_timeout)) for _ in faults]
    for case, group in zip(faults, groups):
        key = (case.name, "-")
        if faulty:
            conn.send(("result", rank, key, _dump({"role": f"faulty ({case.fault})"}), 0.0, "native"))
            if case.fault == "stall":
                time.sleep(fault_timeout + 1.0)  # past the survivors' timeout, then back for the next case
                comm.barrier()
                continue
            conn.send(("done", rank, ""))
            conn.close()
            os._exit(0)  # dead: no goodbye to the group
        sub = communicator(group, comm.device, probe=False, timeout_s=fault_timeout)
        t0 = time.perf_counter()
        try:
            sub.all_reduce(torch.ones(4, device=comm.device))
            outcome = {"role": "survivor", "raised": "", "message": "all_reduce returned a value"}
        except Exception as e:  # what matters is which exception, and when
            outcome = {"role": "survivor", "raised": type(e).__name__, "message": str(e)[:500]}
        seconds = time.perf_counter() - t0
        outcome["seconds"] = seconds
        conn.send(("result", rank, key, _dump(outcome), seconds, "native"))
        if case.fault == "stall":
            comm.barrier()  # on the default group, which the stall did not break: the faulty rank is back


def _judge_fault(case: CollectiveCase, outs: List[Any], fault_timeout: float) -> Tuple[str, Optional[float], str]:
    """(status, slowest survivor's seconds, reason) of a fault case from every rank's outcome."""
    bound = fault_timeout + FAULT_SLACK_SECONDS
    problems, slowest = [], 0.0
    for rank, o in enumerate(outs):
        if not isinstance(o, dict) or o.get("role") != "survivor":
            continue
        slowest = max(slowest, float(o.get("seconds", 0.0)))
        if o.get("raised") != "CollectiveError":
            what = f"raised {o['raised']}" if o.get("raised") else "did not raise"
            problems.append(f"rank {rank} {what} ({o.get('message', '')[:200]}); expected CollectiveError")
        elif float(o["seconds"]) > bound:
            problems.append(f"rank {rank} raised after {o['seconds']:.1f}s, beyond the {fault_timeout:g}s timeout "
                            f"+ {FAULT_SLACK_SECONDS:g}s")
    return ("fail" if problems else "pass"), slowest, "; ".join(problems)


def _ring(comm: Communicator, x: torch.Tensor) -> torch.Tensor:
    r, n = comm.rank, comm.world_size
    got = torch.empty_like(x)
    if r % 2 == 0:
        comm.send(x, (r + 1) % n)
        comm.recv(got, (r - 1) % n)
    else:
        comm.recv(got, (r - 1) % n)
        comm.send(x, (r + 1) % n)
    return got


# ------------------------------------------------------------------------------------------------ worker


def _to(obj: Any, device: torch.device) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, list):
        return [_to(o, device) for o in obj]
    return obj


def _host(obj: Any) -> Any:
    """``obj`` with every tensor copied to host memory (to send it to the parent)."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, list):
        return [_host(o) for o in obj]
    return obj


def _dump(obj: Any) -> bytes:
    buf = io.BytesIO()
    torch.save(_host(obj), buf)
    return buf.getvalue()


def _class_ref(cls: type) -> Tuple[str, str, str]:
    """(module, file, qualname): enough for a fresh process to find ``cls`` even when its module is not on the
    import path (a test module imported by file, say)."""
    mod = sys.modules.get(cls.__module__)
    return cls.__module__, getattr(mod, "__file__", "") or "", cls.__qualname__


def _resolve(ref: Tuple[str, str, str]) -> type:
    name, path, qualname = ref
    try:
        mod = importlib.import_module(name)
    except ImportError:
        if not path:
            raise
        spec = importlib.util.spec_from_file_location(name, path)
        mod = importlib.util.module_from_spec(spec)
        sys.modules[name] = mod
        spec.loader.exec_module(mod)
    obj: Any = mod
    for part in qualname.split("."):
        obj = getattr(obj, part)
    return obj


def _worker(rank: int, world_size: int, init_method: str, backend: Backend, communicator_ref: Tuple[str, str, str],
            dtypes: Tuple[torch.dtype, ...], op_timeout: float, conn, fault_timeout: float = 1.0,
            faults: bool = True) -> None:
    torch.set_num_threads(1)
    try:
        communicator = _resolve(communicator_ref)
        comm = communicator.init(backend, rank, world_size, init_method, timeout=op_timeout)
    except BaseException as e:  # report and leave: the parent marks every case as an error
        conn.send(("abort", rank, f"Communicator.init failed: {type(e).__name__}: {e}"))
        return
    try:
        for dt in dtypes:
            for case in collective_cases(world_size):
                if (case.dtype_free and dt != dtypes[0]) or case.fault:
                    continue
                key = (case.name, "-" if case.dtype_free else dtype_name(dt))
                if case.route.endswith(".avg") and not dt.is_floating_point:
                    conn.send(("unsupported", rank, key, "avg is defined for floating dtypes only (the "
                               "Communicator contract)", "native"))
                    continue
                route = comm.route(case.route, dt) if case.route else "native"
                mine = _to(case.make(world_size, dt)[rank], comm.device)
                t0 = time.perf_counter()
                try:
                    out = case.run(comm, mine)
                except UnsupportedError as e:  # raised before the group is touched, on every rank alike
                    conn.send(("unsupported", rank, key, str(e), route))
                    continue
                except Exception as e:
                    conn.send(("error", rank, key, f"{type(e).__name__}: {e}", route))
                    conn.send(("abort", rank, f"stopped after an error in '{key[0]}' ({key[1]})"))
                    return
                conn.send(("result", rank, key, _dump(out), time.perf_counter() - t0, route))
        fault_cases = [c for c in collective_cases(world_size) if c.fault] if faults else []
        if fault_cases:
            _run_faults(comm, communicator, fault_cases, fault_timeout, conn)
    finally:
        try:
            comm.destroy()
        except Exception:  # pragma: no cover - the peer may already be gone
            pass
    conn.send(("done", rank, ""))
    conn.close()


# ------------------------------------------------------------------------------------------------ parent


def _judge(case: CollectiveCase, dtype: Optional[torch.dtype], world_size: int,
           outs: List[Any]) -> Tuple[str, Optional[float], Optional[float], str]:
    """(status, max_abs_err, tolerance, reason) of every rank's output against the reference."""
    refs = case.reference(case.make(world_size, dtype or torch.float32))
    got: List[torch.Tensor] = []
    want: List[torch.Tensor] = []
    names: List[str] = []
    problems: List[str] = []
    for rank, (out, ref) in enumerate(zip(outs, refs)):
        if ref is None:
            if out is not None:
                problems.append(f"rank {rank}: expected no output, received {type(out).__name__}")
            continue
        if isinstance(ref, list):
            if not isinstance(out, (list, tuple)) or len(out) != len(ref):
                problems.append(f"rank {rank}: expected a list of {len(ref)} tensors, received "
                                f"{type(out).__name__}" + (f" of {len(out)}" if isinstance(out, (list, tuple)) else ""))
                continue
            pairs = [(f"rank {rank} from rank {s}", o, r) for s, (o, r) in enumerate(zip(out, ref))]
        else:
            pairs = [(f"rank {rank}", out, ref)]
        for name, o, r in pairs:
            if not isinstance(o, torch.Tensor):
                problems.append(f"{name}: expected a tensor, received {type(o).__name__}")
            elif dtype is not None and o.dtype != dtype:
                problems.append(f"{name}: dtype {dtype_name(o.dtype)}, expected {dtype_name(dtype)}")
            elif tuple(o.shape) != tuple(r.shape):
                problems.append(f"{name}: shape {list(o.shape)}, expected {list(r.shape)}")
            else:
                got.append(o)
                want.append(r)
                names.append(name)
    if problems:
        return "fail", None, None, "; ".join(problems)
    if not got:
        return "pass", 0.0, 0.0, ""
    atol, rtol = tolerance(case.tolerance_class, dtype, world_size)
    cmp = compare(got, want, atol, rtol, names)
    return ("pass" if cmp.passed else "fail"), cmp.max_abs_err, cmp.tolerance, cmp.reason


def _portable(backend: Backend) -> Backend:
    """The backend with only plain data (what a worker needs), so it pickles whatever its plugin holds."""
    d = backend.definition
    return Backend(BackendDef(name=d.name, vendor=d.vendor, device_type=d.device_type,
                              kv_cache_layout=d.kv_cache_layout, distributed_backend=d.distributed_backend,
                              block_sizes=d.block_sizes),
                   package=backend.package, version=backend.version, api_version=backend.api_version)


def backend_communicator(backend: Backend) -> type:
    """The Communicator class ``backend``'s collectives run through: the subclass it names in
    ``backend.properties["communicator"]`` (a backend whose transport needs its own code, or a mutant), else the
    core's :class:`~anyaccel.core.collectives.Communicator` over its declared ``distributed_backend``."""
    cls = dict(backend.properties).get(COMMUNICATOR_PROPERTY)
    if cls is None:
        return Communicator
    if not isinstance(cls, type) or not issubclass(cls, Communicator):
        raise InvalidArgumentError("run_collectives", f"backend.properties[{COMMUNICATOR_PROPERTY!r}]",
                                   "a subclass of anyaccel.core.collectives.Communicator", repr(cls),
                                   f"fix backend '{backend.name}''s plugin, or leave the property out to use the "
                                   "core's Communicator")
    return cls


def run_collectives(backend: Backend, dtypes: Sequence[torch.dtype] = (torch.float32, torch.bfloat16),
                    world_size: int = 2, timeout: float = 120.0, *, op_timeout: float = 20.0,
                    communicator: Optional[type] = None, fault_timeout: float = 1.0, faults: bool = True,
                    dist_backend: Optional[str] = None) -> List[CaseResult]:
    """Run every collective case on ``backend`` with ``world_size`` processes; one record per (case, dtype).

    :param timeout: deadline in seconds for the whole run; workers still running then are killed and their
        missing cases reported as ``error``.
    :param op_timeout: seconds a single collective may wait for its peers before the transport gives up.
    :param fault_timeout: the timeout of the groups the fault cases (:data:`FAULTS`) break.
    :param faults: run the fault cases (default); ``False`` leaves them out of the run and of the records.
    :param dist_backend: run over this torch.distributed backend instead of the one ``backend`` declares (a
        vendor's registered backend under test).
    :param communicator: the Communicator class the workers build (``communicator.init(...)``); a fresh
        process finds it by module name, or else by its module's file. ``None`` (default): the backend's own,
        see :func:`backend_communicator`.
    """
    dtypes = tuple(dtypes)
    if communicator is None:
        communicator = backend_communicator(backend)
    if not isinstance(communicator, type) or not issubclass(communicator, Communicator):
        raise InvalidArgumentError("run_collectives", "communicator", "a subclass of Communicator",
                                   repr(communicator))
    if not isinstance(world_size, int) or isinstance(world_size, bool) or world_size < 1:
        raise InvalidArgumentError("run_collectives", "world_size", "an int >= 1", repr(world_size))
    if not dtypes or any(d not in COLLECTIVE_DTYPES for d in dtypes):
        raise InvalidArgumentError("run_collectives", "dtypes", "a non-empty sequence of collective dtypes",
                                   repr(dtypes))
    if dist_backend is not None:
        if not isinstance(dist_backend, str) or not dist_backend:
            raise InvalidArgumentError("run_collectives", "dist_backend", "a torch.distributed backend name",
                                       repr(dist_backend))
        backend = dataclasses.replace(backend, definition=dataclasses.replace(backend.definition,
                                                                              distributed_backend=dist_backend))
    for name, v in (("timeout", timeout), ("op_timeout", op_timeout), ("fault_timeout", fault_timeout)):
        if not isinstance(v, (int, float)) or isinstance(v, bool) or v <= 0:
            raise InvalidArgumentError("run_collectives", name, "positive seconds", repr(v))
    cases = [c for c in collective_cases(world_size) if faults or not c.fault]
    keys = [(c, None if c.dtype_free else dt) for dt in dtypes for c in cases if not (c.dtype_free and dt != dtypes[0])]

    def record(case, dt, status, reason="", **kw) -> CaseResult:
        return CaseResult(backend=backend.name, kind=KIND, name=case.name, dtype="-" if dt is None else dtype_name(dt),
                          status=status, reason=reason, op=case.op, **kw)

    why_not = ""
    if not backend.definition.distributed_backend:
        why_not = f"backend '{backend.name}' declares no distributed_backend"
    elif not backend.available:
        why_not = f"backend '{backend.name}' is not available here: {backend.reason}"
    else:
        import torch.distributed as dist

        if not dist.is_available():
            why_not = "this torch build has no torch.distributed"
    if why_not:
        return [record(c, dt, "unsupported", why_not) for c, dt in keys]

    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    # one pipe per worker: a send is written before it returns, so a worker that dies right after still
    # delivered everything it sent (a queue's feeder thread would lose it), and a dead worker reads as EOF
    pipes = [ctx.Pipe(duplex=False) for _ in range(world_size)]  # (reader, writer)
    tmp = tempfile.mkdtemp(prefix="anyaccel-coll-")
    init_method = "file://" + os.path.join(tmp, "rendezvous")
    portable = _portable(backend)
    ref = _class_ref(communicator)
    procs = [ctx.Process(target=_worker, name=f"anyaccel-collectives-{r}", daemon=True,
                         args=(r, world_size, init_method, portable, ref, dtypes, op_timeout, pipes[r][1],
                               fault_timeout, faults))
             for r in range(world_size)]
    got: Dict[Tuple[str, str], Dict[int, tuple]] = {}
    aborted: Dict[int, str] = {}
    finished: set = set()
    deadline = time.monotonic() + timeout
    try:
        for p in procs:
            p.start()
        for _, writer in pipes:
            writer.close()
        live = {pipes[r][0]: r for r in range(world_size)}
        while live:
            left = deadline - time.monotonic()
            if left <= 0:
                for r in live.values():
                    if r not in finished:
                        aborted.setdefault(r, f"no answer by the deadline ({timeout:g}s run, "
                                              f"{op_timeout:g}s per operation)")
                break
            for conn in mp_connection.wait(list(live), timeout=min(left, 0.5)):
                rank = live[conn]
                try:
                    msg = conn.recv()
                except (EOFError, OSError):
                    del live[conn]
                    if rank not in finished:
                        procs[rank].join(timeout=1)
                        aborted.setdefault(rank, f"worker exited with code {procs[rank].exitcode}")
                        # the others can only be waiting on this rank now: give them one operation timeout
                        deadline = min(deadline, time.monotonic() + op_timeout + 2.0)
                    continue
                tag = msg[0]
                if tag in ("done", "abort"):
                    finished.add(rank)
                    if tag == "abort":
                        aborted[rank] = msg[2]
                        deadline = min(deadline, time.monotonic() + op_timeout + 2.0)
                else:
                    got.setdefault(msg[2], {})[rank] = msg
    finally:
        for p in procs:
            p.join(timeout=max(0.0, min(5.0, deadline - time.monotonic())))
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join(timeout=5)
        for reader, _ in pipes:
            reader.close()
        shutil.rmtree(tmp, ignore_errors=True)

    results: List[CaseResult] = []
    for case, dt in keys:
        key = (case.name, "-" if dt is None else dtype_name(dt))
        per_rank = got.get(key, {})
        msgs = [per_rank.get(r) for r in range(world_size)]
        routes = {m[-1] for m in msgs if m is not None}
        route = "; ".join(sorted(routes)) if routes else ""
        fallback = any(not r.startswith("native") for r in routes)
        extra = dict(kernel=route, fallback=fallback)
        if any(m is None for m in msgs) or any(m[0] == "error" for m in msgs):
            why = []
            for r, m in enumerate(msgs):
                if m is None:
                    why.append(f"rank {r}: no result ({aborted.get(r, 'not run')})")
                elif m[0] == "error":
                    why.append(f"rank {r}: {m[3]}")
            results.append(record(case, dt, "error", "; ".join(why), **extra))
            continue
        if any(m[0] == "unsupported" for m in msgs):
            why = next(m[3] for m in msgs if m[0] == "unsupported")
            results.append(record(case, dt, "unsupported", why, **extra))
            continue
        outs = [torch.load(io.BytesIO(m[3]), weights_only=True) for m in msgs]
        if case.fault:
            status, slowest, why = _judge_fault(case, outs, fault_timeout)
            if status == "pass":
                why = (f"every surviving rank raised CollectiveError; the slowest after {slowest:.2f}s (timeout "
                       f"{fault_timeout:g}s + {FAULT_SLACK_SECONDS:g}s allowed)")
            results.append(record(case, dt, status, why, seconds=slowest, **extra))
            continue
        try:
            status, err, tol, why = _judge(case, dt, world_size, outs)
        except Exception as e:  # a malformed output the comparison could not even read
            status, err, tol, why = "fail", None, None, f"could not compare: {type(e).__name__}: {e}"
        if status == "pass" and fallback:
            why = route
        results.append(record(case, dt, status, why, max_abs_err=err, tolerance=tol,
                              seconds=max(m[4] for m in msgs), **extra))
    return results
