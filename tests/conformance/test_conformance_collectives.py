"""Tests of conformance/collectives.py: the cpu backend passes; planted bugs fail; a transport lacking a dtype
passes through recorded fallbacks; a crashed or hung worker becomes an ``error`` record, never a hang."""
from __future__ import annotations

import os
import time

import pytest
import torch

from anyaccel.conformance.collectives import collective_cases, run_collectives
from anyaccel.core.backend import Backend, BackendDef
from anyaccel.core.collectives import Communicator
from anyaccel.core.errors import InvalidArgumentError
from anyaccel.plugins import get_registry

ALL_OPS = {"all_reduce", "all_gather", "reduce_scatter", "broadcast", "send_recv", "all_to_all", "barrier"}


@pytest.fixture(scope="module")
def cpu():
    return get_registry().get("cpu")


def _by_name(results, dtype="float32"):
    return {r.name: r for r in results if r.dtype in (dtype, "-")}


# ------------------------------------------------------------------------------ communicators the workers build
# (module level: the spawned workers load this file to find them)


class PlantedBugs(Communicator):
    """all_gather zeroes the last rank's last row; reduce_scatter hands every rank its neighbour's chunk; all_reduce
    swallows a transport failure."""

    def all_gather(self, x, dim=0):
        out = super().all_gather(x, dim)
        if dim == 0 and out.shape[0]:
            out[-1] = 0
        return out

    def all_reduce(self, x, op="sum"):
        """Swallows a transport failure and returns the input: a stalled or dead peer goes unnoticed."""
        try:
            return super().all_reduce(x, op)
        except Exception:
            return x.clone()

    def reduce_scatter(self, x, dim=0, op="sum"):
        full = self.all_reduce(x, op=op)
        return torch.tensor_split(full, self.world_size, dim)[(self.rank + 1) % self.world_size].contiguous()


class NoHalfTransport(Communicator):
    """A transport that cannot reduce-scatter, gather or exchange bfloat16 (it raises, as real ones do)."""

    def _t_reduce_scatter(self, out, inp, op):
        if inp.dtype == torch.bfloat16:
            raise RuntimeError("reduce_scatter: unsupported dtype BFloat16")
        super()._t_reduce_scatter(out, inp, op)

    def _t_all_gather(self, out, inp):
        if inp.dtype == torch.bfloat16:
            raise RuntimeError("allgather: unsupported dtype BFloat16")
        super()._t_all_gather(out, inp)

    def _t_all_to_all(self, out, inp, out_sizes, in_sizes):
        if inp.dtype == torch.bfloat16:
            raise TypeError("alltoall: bf16")
        super()._t_all_to_all(out, inp, out_sizes, in_sizes)


class CrashesInAllToAll(Communicator):
    def all_to_all(self, xs):
        if self.rank == 1:
            os._exit(3)
        return super().all_to_all(xs)


class HangsInBarrier(Communicator):
    def barrier(self):
        if self.rank == 1:
            time.sleep(120)
        super().barrier()


# ------------------------------------------------------------------------------ tests


def test_cpu_backend_passes_every_case(cpu):
    t0 = time.perf_counter()
    results = run_collectives(cpu, dtypes=(torch.float32, torch.bfloat16, torch.int8), world_size=2, timeout=120)
    elapsed = time.perf_counter() - t0
    # integers: every case but avg (floating only: unsupported, with the contract's reason)
    int_avg = [r for r in results if r.dtype == "int8" and " avg " in r.name]
    assert len(int_avg) == 2 and all(r.status == "unsupported" and "floating" in r.reason for r in int_avg)
    results = [r for r in results if r not in int_avg]
    bad = [(r.name, r.dtype, r.status, r.reason) for r in results if r.status != "pass"]
    assert not bad
    assert {r.kind for r in results} == {"collective"} and {r.backend for r in results} == {"cpu"}
    assert {r.op for r in results} == ALL_OPS
    n_cases = len(collective_cases(2))
    assert len(results) + 2 == 3 * n_cases - 6  # the barrier and the two fault cases run once
    assert any(r.dtype == "int8" and r.op == "all_to_all" for r in results)
    faults = [r for r in results if "peer" in r.name]
    assert len(faults) == 2 and all("raised CollectiveError" in r.reason for r in faults)
    assert len({(r.name, r.dtype) for r in results}) == len(results)
    assert any("|" in r.name and r.op == "all_gather" for r in results)  # uneven per-rank sizes
    bf16 = _by_name(results, "bfloat16")
    assert bf16["all_gather dim=0 [5|3, 4]"].tolerance == 0.0
    assert bf16["all_reduce sum [7, 3]"].tolerance > 0.0
    assert bf16["all_reduce max [7, 3]"].tolerance == 0.0
    assert not any(r.fallback for r in results)
    assert elapsed < 90


def test_planted_bugs_are_caught(cpu):
    results = _by_name(run_collectives(cpu, dtypes=(torch.float32,), communicator=PlantedBugs, timeout=120))
    failed = {name for name, r in results.items() if r.status == "fail"}
    assert {"all_gather dim=0 [5|3, 4]", "all_gather dim=0 [0|3, 4]", "all_gather dim=0 [4|4, 6]"} <= failed
    assert {n for n in results if n.startswith("reduce_scatter")} <= failed
    # the rest of the suite is unaffected: the failures point at the planted collectives only
    assert results["all_gather dim=1 [3, 2|5]"].status == "pass"
    assert all(r.status == "pass" for n, r in results.items()
               if r.op not in ("all_gather", "reduce_scatter") and "peer" not in n)
    # the swallowed transport failure: the stalled and the dead peer both go unreported
    for n in ("stalled peer", "dead peer"):
        rec = next(r for name, r in results.items() if name.startswith(n))
        assert rec.status == "fail" and "did not raise" in rec.reason and "expected CollectiveError" in rec.reason
    ag = results["all_gather dim=0 [5|3, 4]"]
    assert ag.max_abs_err > 0 and "rank 1" in ag.reason
    assert "shape" in results["reduce_scatter sum dim=0 [5, 3]"].reason


def test_missing_dtype_passes_through_recorded_fallbacks(cpu):
    results = _by_name(run_collectives(cpu, dtypes=(torch.bfloat16,), communicator=NoHalfTransport, timeout=120,
                                       faults=False),
                       "bfloat16")
    assert all(r.status == "pass" for r in results.values()), [(n, r.reason) for n, r in results.items()]
    rs = results["reduce_scatter sum dim=0 [5, 3]"]
    assert rs.fallback and "float32 upcast" in rs.kernel and "unsupported dtype BFloat16" in rs.reason
    assert results["all_gather dim=0 [5|3, 4]"].fallback and "bytes" in results["all_gather dim=0 [5|3, 4]"].kernel
    assert results["all_to_all rows (r+2p+1)%4 [*, 3]"].fallback
    assert not results["all_reduce sum [7, 3]"].fallback and results["all_reduce sum [7, 3]"].kernel == "native"


def test_crashed_worker_is_an_error_not_a_hang(cpu):
    t0 = time.perf_counter()
    results = _by_name(run_collectives(cpu, dtypes=(torch.float32,), communicator=CrashesInAllToAll, timeout=120,
                                       op_timeout=5, faults=False))
    assert time.perf_counter() - t0 < 60
    a2a = results["all_to_all rows (r+2p+1)%4 [*, 3]"]
    assert a2a.status == "error" and "exited with code 3" in a2a.reason
    assert results["barrier"].status == "error"
    assert results["broadcast src=0 [5, 3]"].status == "pass"
    # the case just before the crash: its results were sent before the worker died, and arrive
    assert results["send_recv ring [6, 5]"].status == "pass"


@pytest.mark.slow
def test_hung_worker_is_reported_within_the_timeouts(cpu):
    t0 = time.perf_counter()
    results = _by_name(run_collectives(cpu, dtypes=(torch.float32,), communicator=HangsInBarrier, timeout=60,
                                       op_timeout=2, faults=False))
    assert time.perf_counter() - t0 < 45  # far less than the 120 s the worker sleeps
    assert results["barrier"].status == "error" and "rank 1" in results["barrier"].reason
    assert results["all_reduce sum [7, 3]"].status == "pass"


def test_backend_without_transport_is_unsupported_without_spawning():
    nocomm = Backend.local(BackendDef(name="nocomm", vendor="test", device_type="cpu"), [])
    t0 = time.perf_counter()
    results = run_collectives(nocomm, dtypes=(torch.float32,))
    assert time.perf_counter() - t0 < 1
    assert results and all(r.status == "unsupported" and "declares no distributed_backend" in r.reason
                           for r in results)


@pytest.mark.parametrize("kwargs, argument", [
    (dict(communicator=object), "communicator"),
    (dict(world_size=0), "world_size"),
    (dict(dtypes=(torch.complex64,)), "dtypes"),
    (dict(dtypes=()), "dtypes"),
    (dict(timeout=0), "timeout"),
])
def test_runner_validates_arguments(cpu, kwargs, argument):
    with pytest.raises(InvalidArgumentError) as e:
        run_collectives(cpu, **kwargs)
    assert e.value.argument == argument


def test_backend_names_its_own_communicator():
    """A backend's own Communicator subclass (``properties["communicator"]``) is what the workers build; a
    property that is not a Communicator subclass is refused, naming the property."""
    import dataclasses

    from anyaccel.conformance.collectives import backend_communicator

    base = Backend.local(BackendDef(name="own", vendor="test", device_type="cpu"), [])
    assert backend_communicator(base) is Communicator
    assert backend_communicator(dataclasses.replace(base, properties={"communicator": PlantedBugs})) is PlantedBugs
    bad = dataclasses.replace(base, properties={"communicator": "PlantedBugs"})
    with pytest.raises(InvalidArgumentError, match=r"communicator.*subclass of anyaccel.core.collectives.Communicator"):
        backend_communicator(bad)
    with pytest.raises(InvalidArgumentError, match="communicator"):
        run_collectives(dataclasses.replace(bad, definition=dataclasses.replace(bad.definition,
                                                                                 distributed_backend="x")))
