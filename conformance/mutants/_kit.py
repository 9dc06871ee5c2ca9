"""What the op-level mutant modules share: a backend made of harness kernels, and the clean twins.

Each op family's mutant module writes one small *harness* per op -- a correct kernel written to the contract
(docs/op-contracts.md) in plain torch, computing in float32 and rounding once, with a ``bug`` switch -- and
registers one :class:`~anyaccel.conformance.mutants.Mutant` per planted bug. With ``bug=None`` the harness is the
mutant's *clean twin*: it must pass every case of its family (tests/conformance/test_kill_matrix.py), which is what
makes a kill mean something.
"""
from __future__ import annotations

from typing import Callable, Dict, List, Sequence, Tuple

import torch

from ...core.backend import Backend, BackendDef
from ...core.dispatch import KernelImpl

__all__ = ["VENDOR", "BLOCK_SIZES", "backend", "TWINS", "twin"]

#: the vendor every mutant backend declares
VENDOR = "mutant"
#: block sizes of every mutant backend (the attention cases use the first two)
BLOCK_SIZES = (16, 32)

#: family -> ``make(dtypes) -> Backend`` of that family's harness kernels with no bug
TWINS: Dict[str, Callable[[Tuple[torch.dtype, ...]], Backend]] = {}


def backend(name: str, kernels: Sequence[Tuple[str, Callable, object]]) -> Backend:
    """A local backend ``name`` of ``(op, build, capability)`` kernels (priority 1, provider ``"mutant"``)."""
    impls: List[KernelImpl] = [
        KernelImpl(op=op, backend=name, name=f"{name}.{op}", build=build, capability=cap, priority=1,
                   provider=VENDOR, description=f"planted-bug harness for {op}")
        for op, build, cap in kernels]
    return Backend.local(BackendDef(name=name, vendor=VENDOR, device_type="cpu", kv_cache_layout="NHD",
                                    block_sizes=BLOCK_SIZES, description="a conformance mutant"), kernels=impls)


def twin(family: str, dtypes: Sequence[torch.dtype]) -> Backend:
    """The clean twin of ``family``'s mutants (their harness kernels, no bug), declaring ``dtypes``."""
    from . import catalog

    catalog()
    try:
        return TWINS[family](tuple(dtypes))
    except KeyError:
        raise KeyError(f"no clean twin for family {family!r}; known: {', '.join(sorted(TWINS))}") from None
