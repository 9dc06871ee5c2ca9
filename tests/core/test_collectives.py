"""Tests of core/collectives.py: argument validation, capability probing and fallbacks, the references, and the
semantics on a one-process group (in this process) and on a two-process group (one spawn)."""
from __future__ import annotations

import pathlib
import re

import pytest
import torch

from anyaccel.core.backend import Backend, BackendDef
from anyaccel.core.collectives import (PROBE_KINDS, Communicator, all_gather_reference, all_reduce_reference,
                                       all_to_all_reference, broadcast_reference, reduce_scatter_reference,
                                       send_recv_reference, tensor_split_sizes)
from anyaccel.core.errors import InvalidArgumentError, UnsupportedError

# A test-local backend: the core tests do not depend on plugin discovery. The transport name is data here.
BACKEND = Backend.local(BackendDef(name="coll-test", vendor="test", device_type="cpu", distributed_backend="gloo"),
                        [])


@pytest.fixture(scope="module")
def comm(tmp_path_factory):
    """A one-process group in this process, destroyed when the module's tests are done."""
    path = tmp_path_factory.mktemp("pg") / "rendezvous"
    c = Communicator.init(BACKEND, 0, 1, f"file://{path}", timeout=30)
    yield c
    c.destroy()


def _arg(excinfo) -> str:
    return excinfo.value.argument


# ---------------------------------------------------------------------------------------------- init


def test_init_rejects_backend_without_transport():
    nocomm = Backend.local(BackendDef(name="nocomm", vendor="test", device_type="cpu"), [])
    with pytest.raises(UnsupportedError, match="'nocomm' declares no distributed_backend"):
        Communicator.init(nocomm, 0, 1, "file:///nowhere")


def test_init_rejects_unavailable_backend():
    gone = Backend.local(BackendDef(name="gone", vendor="test", device_type="cpu", distributed_backend="x",
                                    detect=lambda: "no such device"), [])
    with pytest.raises(UnsupportedError, match="not available here: no such device"):
        Communicator.init(gone, 0, 1, "file:///nowhere")


@pytest.mark.parametrize("kwargs, argument", [
    (dict(backend="cpu"), "backend"),
    (dict(rank=2, world_size=2), "rank"),
    (dict(rank=-1), "rank"),
    (dict(rank=True), "rank"),
    (dict(world_size=0), "world_size"),
    (dict(init_method="localhost:1234"), "init_method"),
    (dict(timeout=-1), "timeout"),
])
def test_init_validates_arguments(kwargs, argument):
    args = dict(backend=BACKEND, rank=0, world_size=1, init_method="file:///nowhere")
    args.update(kwargs)
    timeout = args.pop("timeout", None)
    with pytest.raises(InvalidArgumentError) as e:
        Communicator.init(args["backend"], args["rank"], args["world_size"], args["init_method"], timeout=timeout)
    assert _arg(e) == argument


def test_init_twice_says_to_wrap_the_existing_group(comm, tmp_path):
    with pytest.raises(InvalidArgumentError, match="Wrap the existing group") as e:
        Communicator.init(BACKEND, 0, 1, f"file://{tmp_path / 'again'}")
    assert _arg(e) == "init_method"


def test_wrap_validates_group_and_device(comm):
    with pytest.raises(InvalidArgumentError) as e:
        Communicator(None, None)
    assert _arg(e) == "device"
    with pytest.raises(InvalidArgumentError) as e:
        Communicator("world", "cpu")
    assert _arg(e) == "group"
    with pytest.raises(InvalidArgumentError) as e:
        Communicator(comm.group, "cpu", probe_dtypes=(torch.complex64,))
    assert _arg(e) == "probe_dtypes"


def test_wrap_existing_group(comm):
    other = Communicator(comm.group, "cpu")
    assert (other.rank, other.world_size, other.transport) == (0, 1, "gloo")
    assert other.capability.unsupported == ()
    assert other.fallbacks() == []
    other.destroy()  # not its group: a no-op
    assert comm.all_reduce(torch.ones(2)).tolist() == [1.0, 1.0]


# ---------------------------------------------------------------------------------------------- validation

META = torch.empty(3, device="meta")


@pytest.mark.parametrize("call, argument", [
    (lambda c: c.all_reduce([1.0, 2.0]), "x"),
    (lambda c: c.all_reduce(META), "x"),
    (lambda c: c.all_reduce(torch.ones(3, dtype=torch.complex64)), "x"),
    (lambda c: c.all_reduce(torch.ones(3), op="prod"), "op"),
    (lambda c: c.all_reduce(torch.ones(3, dtype=torch.int32), op="avg"), "op"),
    (lambda c: c.all_gather(torch.tensor(1.0)), "x"),
    (lambda c: c.all_gather(torch.ones(2, 3), dim=2), "dim"),
    (lambda c: c.all_gather(torch.ones(2, 3), dim=-3), "dim"),
    (lambda c: c.all_gather(torch.ones(2, 3), dim=True), "dim"),
    (lambda c: c.all_gather(META), "x"),
    (lambda c: c.all_gather(torch.ones([1] * 9)), "x"),
    (lambda c: c.reduce_scatter(torch.ones(4), dim=1), "dim"),
    (lambda c: c.reduce_scatter(torch.ones(4), op="mean"), "op"),
    (lambda c: c.reduce_scatter("x"), "x"),
    (lambda c: c.broadcast(torch.ones(3), 1), "src"),
    (lambda c: c.broadcast(torch.ones(3), -1), "src"),
    (lambda c: c.broadcast(torch.ones(3), "0"), "src"),
    (lambda c: c.broadcast(META, 0), "x"),
    (lambda c: c.send(torch.ones(3), 0), "dst"),       # own rank
    (lambda c: c.send(torch.ones(3), 1), "dst"),       # out of range
    (lambda c: c.send(None, 1), "x"),
    (lambda c: c.recv(torch.ones(3), 0), "src"),       # own rank
    (lambda c: c.recv(torch.ones(3), 5), "src"),
    (lambda c: c.recv(META, 0), "x"),
    (lambda c: c.all_to_all(torch.ones(3)), "xs"),
    (lambda c: c.all_to_all([torch.ones(3), torch.ones(3)]), "xs"),  # world_size is 1
    (lambda c: c.all_to_all([]), "xs"),
    (lambda c: c.all_to_all([3.0]), "xs[0]"),
    (lambda c: c.all_to_all([torch.tensor(3.0)]), "xs[0]"),
    (lambda c: c.all_to_all([META]), "xs[0]"),
])
def test_every_method_validates_before_touching_the_group(comm, call, argument):
    with pytest.raises(InvalidArgumentError) as e:
        call(comm)
    assert _arg(e) == argument
    assert "expected" in str(e.value) and "received" in str(e.value)


def test_device_error_names_both_devices(comm):
    with pytest.raises(InvalidArgumentError, match=r"a tensor on cpu .*received .* on meta"):
        comm.all_gather(META)


# ---------------------------------------------------------------------------------------------- one process


def test_one_rank_semantics_and_no_aliasing(comm):
    x = torch.arange(12.0).reshape(3, 4)
    keep = x.clone()
    for y in (comm.all_reduce(x), comm.all_reduce(x, op="avg"), comm.all_reduce(x, op="max"),
              comm.all_gather(x, dim=-1), comm.reduce_scatter(x, dim=1), comm.broadcast(x, 0),
              comm.all_to_all([x])[0]):
        assert torch.equal(y, keep)
        assert y.data_ptr() != x.data_ptr()
    assert torch.equal(x, keep)
    xt = x.t()  # non-contiguous inputs are fine
    assert torch.equal(comm.all_reduce(xt), keep.t())
    assert torch.equal(comm.all_gather(xt, dim=0), keep.t())
    comm.barrier()


def test_empty_inputs(comm):
    assert comm.all_gather(torch.ones(0, 3)).shape == (0, 3)
    assert comm.reduce_scatter(torch.ones(0, 3)).shape == (0, 3)
    assert comm.all_reduce(torch.ones(0)).shape == (0,)
    assert [t.shape for t in comm.all_to_all([torch.ones(0, 2)])] == [(0, 2)]


# ---------------------------------------------------------------------------------------------- capability


class _MissingBf16(Communicator):
    """A transport without bfloat16 reductions and gathers, and with a float16 all_reduce that is silently wrong."""

    def _t_all_reduce(self, t, op):
        if t.dtype == torch.bfloat16:
            raise RuntimeError("transport: unsupported dtype BFloat16")
        super()._t_all_reduce(t, op)
        if t.dtype == torch.float16:
            t.mul_(2)

    def _t_reduce_scatter(self, out, inp, op):
        if inp.dtype == torch.bfloat16:
            raise TypeError("no bf16 reduce_scatter")
        super()._t_reduce_scatter(out, inp, op)

    def _t_all_gather(self, out, inp):
        if inp.dtype == torch.bfloat16:
            raise RuntimeError("no bf16 all_gather")
        super()._t_all_gather(out, inp)


class _NoFloats(Communicator):
    def _t_all_reduce(self, t, op):
        if t.is_floating_point():
            raise RuntimeError("integers only")
        super()._t_all_reduce(t, op)


def test_probe_records_what_the_transport_lacks(comm):
    c = _MissingBf16(comm.group, "cpu")
    lacking = {(k, d) for k, d, _ in c.capability.unsupported}
    assert lacking == {("all_reduce.sum", torch.bfloat16), ("all_reduce.max", torch.bfloat16),
                       ("all_reduce.min", torch.bfloat16), ("reduce_scatter.sum", torch.bfloat16),
                       ("reduce_scatter.max", torch.bfloat16), ("reduce_scatter.min", torch.bfloat16),
                       ("all_gather", torch.bfloat16), ("all_reduce.sum", torch.float16)}
    reasons = dict(((k, d), r) for k, d, r in c.capability.unsupported)
    assert "RuntimeError: transport: unsupported dtype BFloat16" in reasons[("all_reduce.sum", torch.bfloat16)]
    assert reasons[("all_reduce.sum", torch.float16)] == "returned wrong values"
    assert c.route("reduce_scatter.sum", torch.bfloat16).startswith("fallback via float32 upcast")
    assert c.route("all_reduce.avg", torch.float16).startswith("fallback via float32 upcast")
    assert c.route("all_gather", torch.bfloat16).startswith("fallback via bytes")
    assert c.route("broadcast", torch.bfloat16) == "native"
    assert len(c.fallbacks()) == len(lacking)
    desc = c.capability.describe()
    assert desc["transport"] == "gloo" and len(desc["unsupported"]) == len(lacking)


def test_fallbacks_give_the_right_answer(comm):
    c = _MissingBf16(comm.group, "cpu")
    x = torch.randn(5, 3).to(torch.bfloat16)
    for y in (c.all_reduce(x), c.all_reduce(x, op="max"), c.reduce_scatter(x), c.all_gather(x, dim=1)):
        assert y.dtype == torch.bfloat16 and torch.equal(y, x)
    h = torch.randn(4).half()
    assert torch.equal(c.all_reduce(h), h)  # the native float16 sum would have doubled it


def test_no_route_raises_unsupported_with_reasons(comm):
    c = _NoFloats(comm.group, "cpu")
    with pytest.raises(UnsupportedError) as e:
        c.all_reduce(torch.ones(2))
    assert any("integers only" in r for r in e.value.reasons)
    assert c.all_reduce(torch.ones(2, dtype=torch.int32)).tolist() == [1, 1]


def test_probe_can_be_skipped(comm):
    c = Communicator(comm.group, "cpu", probe=False)
    assert c.capability.probed_dtypes == frozenset() and c.route("all_gather", torch.bfloat16) == "native"


# ---------------------------------------------------------------------------------------------- references


def test_tensor_split_sizes_match_torch():
    for n in range(0, 12):
        for parts in range(1, 5):
            want = [c.shape[0] for c in torch.tensor_split(torch.empty(n), parts)]
            assert tensor_split_sizes(n, parts) == want


def test_references():
    xs = [torch.tensor([[1.0, -2.0, 3.0]]).float(), torch.tensor([[4.0, 5.0, -6.0]]).bfloat16()]
    assert all(y.dtype == torch.float64 for y in all_reduce_reference(xs))
    assert all_reduce_reference(xs)[1].tolist() == [[5.0, 3.0, -3.0]]
    assert all_reduce_reference(xs, "avg")[0].tolist() == [[2.5, 1.5, -1.5]]
    assert all_reduce_reference(xs, "max")[0].tolist() == [[4.0, 5.0, 3.0]]
    assert all_reduce_reference(xs, "min")[0].tolist() == [[1.0, -2.0, -6.0]]
    assert all_gather_reference(xs, dim=1)[0].tolist() == [[1.0, -2.0, 3.0, 4.0, 5.0, -6.0]]
    rs = reduce_scatter_reference(xs, dim=1)
    assert [t.tolist() for t in rs] == [[[5.0, 3.0]], [[-3.0]]]  # tensor_split: 3 = 2 + 1
    assert broadcast_reference(xs, 1)[0].tolist() == [[4.0, 5.0, -6.0]]
    assert send_recv_reference(xs, [1, None])[0].tolist() == [[4.0, 5.0, -6.0]]
    assert send_recv_reference(xs, [1, None])[1] is None
    a = [[torch.ones(1), torch.ones(2)], [torch.zeros(3), torch.zeros(0)]]
    assert [[t.shape[0] for t in row] for row in all_to_all_reference(a)] == [[1, 3], [2, 0]]
    with pytest.raises(InvalidArgumentError):
        all_reduce_reference(xs, "prod")
    with pytest.raises(InvalidArgumentError):
        all_gather_reference([])


def test_core_file_names_no_backend():
    src = pathlib.Path(__file__).parents[2].joinpath("core", "collectives.py").read_text().lower()
    for word in ("gloo", "nccl", "rccl", "cuda", "rocm", "nvidia", "\"cpu\"", "'cpu'", "cpu"):
        assert not re.search(rf"\b{re.escape(word)}\b", src), word


def test_probe_kinds_cover_every_collective():
    assert {k.split(".")[0] for k in PROBE_KINDS} == {"all_reduce", "reduce_scatter", "all_gather", "broadcast",
                                                     "all_to_all", "send_recv"}


# ---------------------------------------------------------------------------------------------- two processes


def _two_rank_worker(rank, init_method, q):
    out = {}
    with Communicator.init(BACKEND, rank, 2, init_method, timeout=20) as c:
        # shapes that disagree across ranks are reported on every rank, and the group stays usable
        for name, fn in (
            ("all_gather", lambda: c.all_gather(torch.ones(2, 3 + rank))),
            ("all_gather dtype", lambda: c.all_gather(torch.ones(2, 3, dtype=(torch.float32, torch.float16)[rank]))),
            ("all_to_all", lambda: c.all_to_all([torch.ones(1, 2 + rank), torch.ones(2, 2 + rank)])),
        ):
            try:
                fn()
                out[name] = "no error"
            except InvalidArgumentError as e:
                out[name] = e.argument
        out["after"] = c.all_gather(torch.full((rank + 1, 2), float(rank))).tolist()
        # recv into a non-contiguous tensor writes through
        if rank == 0:
            c.send(torch.arange(6.0).reshape(2, 3), 1)
        else:
            buf = torch.zeros(3, 2)
            c.recv(buf.t(), 0)
            out["recv"] = buf.t().tolist()
        out["split_all_to_all"] = [t.tolist() for t in c.all_to_all([torch.full((rank + p,), 10.0 * rank + p)
                                                                     for p in range(2)])]
    q.put((rank, out))


def test_two_ranks_mismatch_is_reported_everywhere(tmp_path, monkeypatch):
    import importlib
    import sys

    import torch.multiprocessing as mp

    # the worker must be importable by the spawned processes: import this file as a top-level module
    monkeypatch.syspath_prepend(str(pathlib.Path(__file__).parent))
    mod = importlib.import_module(pathlib.Path(__file__).stem)
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    procs = [ctx.Process(target=mod._two_rank_worker, args=(r, f"file://{tmp_path / 'rdv'}", q), daemon=True)
             for r in range(2)]
    for p in procs:
        p.start()
    try:
        got = dict(q.get(timeout=60) for _ in range(2))
    finally:
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
        sys.modules.pop(pathlib.Path(__file__).stem, None)
    for rank in (0, 1):
        assert got[rank]["all_gather"] == "x"
        assert got[rank]["all_gather dtype"] == "x"
        assert got[rank]["all_to_all"] == "xs"
        assert got[rank]["after"] == [[0.0, 0.0], [1.0, 1.0], [1.0, 1.0]]
    assert got[1]["recv"] == [[0.0, 1.0, 2.0], [3.0, 4.0, 5.0]]
    assert got[0]["split_all_to_all"] == [[], [10.0]]
    assert got[1]["split_all_to_all"] == [[1.0], [11.0, 11.0]]


# ---------------------------------------------------------------------------------------------- stalled peers


def test_default_timeout_is_bounded_and_documented():
    from anyaccel.core.collectives import DEFAULT_TIMEOUT_SECONDS

    assert 0 < DEFAULT_TIMEOUT_SECONDS <= 600  # torch's CPU default (1800 s) would hang a survivor for 30 min
    assert "300" in Communicator.init.__doc__ and "timeout" in Communicator.init.__doc__


def test_init_uses_the_bounded_default_timeout(comm, monkeypatch):
    # the group the fixture made passed timeout=30; a group made without one gets the documented default
    import torch.distributed as dist

    from anyaccel.core.collectives import DEFAULT_TIMEOUT_SECONDS

    seen = {}
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist, "init_process_group", lambda **kw: seen.update(kw) or (_ for _ in ()).throw(
        RuntimeError("stop here")))
    with pytest.raises(RuntimeError, match="stop here"):
        Communicator.init(BACKEND, 0, 1, "file:///nonexistent")
    assert seen["timeout"].total_seconds() == DEFAULT_TIMEOUT_SECONDS
    assert comm.timeout_s == 30


def test_transport_failure_becomes_collective_error_naming_operation_and_peer(comm, monkeypatch):
    from anyaccel.core.errors import CollectiveError

    def dead(*a, **k):
        raise RuntimeError("Connection closed by peer [127.0.0.1]:4242")

    monkeypatch.setattr(comm, "_t_all_reduce", dead)
    monkeypatch.setattr(comm, "_t_broadcast", dead)
    with pytest.raises(CollectiveError, match=r"all_reduce on rank 0 of 1: a peer .*Connection closed") as e:
        comm.all_reduce(torch.ones(2))
    assert e.value.operation == "all_reduce" and e.value.peer is None and isinstance(e.value.__cause__, RuntimeError)
    # arguments are still checked first: a bad argument is an InvalidArgumentError, not a transport failure
    with pytest.raises(InvalidArgumentError):
        comm.all_reduce("x")


def _stall_worker(rank, init_method, q):
    import time

    from anyaccel.core.errors import CollectiveError

    c = Communicator.init(BACKEND, rank, 2, init_method, timeout=2, probe=False)
    if rank == 1:  # never makes the calls rank 0 waits for
        time.sleep(20)
        return
    out = {}
    for name, call in (("recv", lambda: c.recv(torch.zeros(3), 1)), ("all_reduce", lambda: c.all_reduce(torch.ones(2)))):
        t0 = time.monotonic()
        try:
            call()
            out[name] = ("no error", time.monotonic() - t0, None, "")
        except CollectiveError as e:
            out[name] = ("CollectiveError", time.monotonic() - t0, e.peer, str(e))
        except Exception as e:  # noqa: BLE001 - the assertion below names it
            out[name] = (type(e).__name__, time.monotonic() - t0, None, str(e))
    q.put(out)


@pytest.mark.slow  # two spawned interpreters (~15 s of imports on a shared runner) + two 2 s timeouts
def test_survivor_of_a_stalled_peer_gets_a_collective_error_in_time(tmp_path, monkeypatch):
    import importlib
    import sys

    import torch.multiprocessing as mp

    monkeypatch.syspath_prepend(str(pathlib.Path(__file__).parent))
    mod = importlib.import_module(pathlib.Path(__file__).stem)
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    procs = [ctx.Process(target=mod._stall_worker, args=(r, f"file://{tmp_path / 'rdv'}", q), daemon=True)
             for r in range(2)]
    for p in procs:
        p.start()
    try:
        got = q.get(timeout=60)
    finally:
        for p in procs:
            p.kill()
            p.join(timeout=10)
        sys.modules.pop(pathlib.Path(__file__).stem, None)
    print({k: round(v[1], 2) for k, v in got.items()})  # seconds the survivor waited, per call (-s shows them)
    kind, seconds, peer, msg = got["recv"]
    assert kind == "CollectiveError", (kind, msg)
    assert peer == 1 and "recv on rank 0 of 2: peer rank 1" in msg and "timeout 2 s" in msg
    assert seconds < 15  # the 2 s timeout, not torch's 30 minutes
    kind, seconds, peer, msg = got["all_reduce"]
    assert kind == "CollectiveError" and "all_reduce" in msg and seconds < 15, (kind, msg)
