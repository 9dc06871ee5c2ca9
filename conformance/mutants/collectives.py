"""Collective mutants: a backend whose Communicator carries one planted bug.

A backend supplies its own collectives as a :class:`~anyaccel.core.collectives.Communicator` subclass (its
``_t_*`` transport methods, or whole methods) named in ``Backend.properties["communicator"]``; the conformance
run builds that class in every worker (:func:`anyaccel.conformance.collectives.backend_communicator`). Each
mutant here is such a subclass of the core's correct Communicator with one deviation, over the process-group
transport torch uses for host tensors. The classes live at module level so the spawned workers can import them.
"""
from __future__ import annotations

import dataclasses
from typing import Optional, Tuple

import torch

from ...core.backend import Backend, BackendDef
from ...core.collectives import Communicator
from . import ALL_DTYPES, Mutant, register

__all__ = ["AllGatherReversed", "AllGatherShortTail", "ReduceScatterNeighbour", "BroadcastFromFirst",
           "COLLECTIVE_MUTANTS", "communicator_backend", "clean_backend"]

FAMILY = "collectives"
VENDOR = "anyaccel-mutants"


class AllGatherReversed(Communicator):
    """all_gather concatenates the pieces in reverse rank order (the peers' ring order read backwards)."""

    def all_gather(self, x: torch.Tensor, dim: int = 0) -> torch.Tensor:
        out = super().all_gather(x, dim)
        sizes = [int(s) for s in super().all_gather(torch.tensor([x.shape[dim]], device=x.device), 0).tolist()]
        return torch.cat(list(reversed(torch.split(out, sizes, dim))), dim)


class AllGatherShortTail(Communicator):
    """all_gather of uneven pieces: a piece shorter than the longest loses its last row along ``dim`` (zeros
    arrive instead), as when a copy length is computed from the padded size minus the padding once too often."""

    def all_gather(self, x: torch.Tensor, dim: int = 0) -> torch.Tensor:
        out = super().all_gather(x, dim)
        sizes = [int(s) for s in super().all_gather(torch.tensor([x.shape[dim]], device=x.device), 0).tolist()]
        longest, start = max(sizes), 0
        for s in sizes:
            if 0 < s < longest:
                out.narrow(dim, start + s - 1, 1).zero_()
            start += s
        return out


class ReduceScatterNeighbour(Communicator):
    """reduce_scatter gives rank ``r`` the reduced chunk of rank ``r + 1`` (mod world size)."""

    def reduce_scatter(self, x: torch.Tensor, dim: int = 0, op: str = "sum") -> torch.Tensor:
        full = self.all_reduce(x, op=op)
        return torch.tensor_split(full, self.world_size, dim)[(self.rank + 1) % self.world_size].contiguous()


class BroadcastFromFirst(Communicator):
    """broadcast always sends rank 0's tensor, whatever ``src`` is."""

    def broadcast(self, x: torch.Tensor, src: int) -> torch.Tensor:
        return super().broadcast(x, 0)


def _host_transport() -> str:
    """The torch.distributed backend torch itself uses for host tensors (read from torch, not named here)."""
    import torch.distributed as dist

    return dist.Backend.default_device_backend_map["cpu"]


def communicator_backend(name: str, communicator: type) -> Backend:
    """A host backend whose collectives are ``communicator`` (a Communicator subclass); no kernels of its own."""
    b = Backend.local(BackendDef(name=name, vendor=VENDOR, device_type="cpu", distributed_backend=_host_transport(),
                                 description=f"collectives through {communicator.__name__}"), [], package=VENDOR)
    return dataclasses.replace(b, properties={"communicator": communicator})


def _mutant(bug: str, op: str, cls: type) -> Mutant:
    name = f"{FAMILY}.{bug}"
    bname = "mutant-" + name.replace(".", "-").replace("_", "-")
    description = " ".join(cls.__doc__.split())
    return register(Mutant(name=name, family=FAMILY, op=op, description=description,
                           make_backend=lambda dtypes, bname=bname, cls=cls: communicator_backend(bname, cls),
                           dtypes=ALL_DTYPES))


COLLECTIVE_MUTANTS: Tuple[Mutant, ...] = (
    _mutant("all_gather_reversed", "all_gather", AllGatherReversed),
    _mutant("all_gather_short_tail", "all_gather", AllGatherShortTail),
    _mutant("reduce_scatter_neighbour", "reduce_scatter", ReduceScatterNeighbour),
    _mutant("broadcast_from_first", "broadcast", BroadcastFromFirst),
)


def clean_backend(name: Optional[str] = None) -> Backend:
    """The clean twin of collective mutant ``name`` (every one has the same): the same kind of backend with the
    core's Communicator."""
    return communicator_backend("clean-collectives", Communicator)
