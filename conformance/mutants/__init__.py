"""The mutation catalog: realistic kernel bugs, each runnable as a backend, that the conformance suite must catch.

A *mutant* is a backend whose kernels are a correct implementation with one planted bug (a softmax scale of
``1/D``, an accumulator in the half type, a causal mask off by one...). The suite's worth is measured by how
many mutants its **default** settings kill (default seed, default number of drawn examples): the kill-matrix
test (``tests/conformance/test_kill_matrix.py``) runs every mutant in every dtype it declares, one dtype at a
time, and asserts each one is caught. A mutant declares its kernels' dtypes as capability data, so a run in
one dtype exercises a backend that claims *only* that dtype (e.g. a half-only accelerator).

Each family module (``attention``, ``gemm``, ``grouped_gemm``, ``fused``, ``models``, ``collectives``) appends
its :class:`Mutant` records to :data:`CATALOG` through :func:`register`. Use :func:`mutant_backend` to get one as
a :class:`~anyaccel.core.backend.Backend` and hand it to the runner like any other.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

from ...core.backend import Backend

__all__ = ["Mutant", "CATALOG", "register", "catalog", "get", "mutant_backend", "MUTANT_MODULES", "ALL_DTYPES"]

ALL_DTYPES: Tuple[torch.dtype, ...] = (torch.float32, torch.float16, torch.bfloat16)

#: The modules that register mutants, imported by :func:`catalog`.
MUTANT_MODULES = ("attention", "gemm", "grouped_gemm", "fused", "models", "collectives", "scaled_gemm",
                  "weight_only")


@dataclass(frozen=True)
class Mutant:
    """One planted bug.

    :param name: unique id, ``"<family>.<bug>"``, e.g. ``"attention.scale_1_over_d"``.
    :param family: the conformance family whose default cases must kill it (``"attention"``, ``"gemm"``,
        ``"fused"``, ``"collectives"``, ``"models"``).
    :param op: the op (or collective method) the bug lives in.
    :param description: the bug in one sentence, as a kernel author would make it.
    :param make_backend: ``make_backend(dtypes) -> Backend``: a backend named after the mutant whose mutated
        kernel(s) declare exactly ``dtypes`` (other ops may be absent: they fall back to the core).
    :param dtypes: the dtypes the mutant is run in by the kill matrix (each one separately).
    :param models: for the ``models`` family, the tiny models whose default checks must catch it (``None``: all).
    """

    name: str
    family: str
    op: str
    description: str
    make_backend: Callable[[Tuple[torch.dtype, ...]], Backend]
    dtypes: Tuple[torch.dtype, ...] = ALL_DTYPES
    models: Optional[Tuple[str, ...]] = None


CATALOG: Dict[str, Mutant] = {}


def register(m: Mutant) -> Mutant:
    """Add ``m`` to the catalog; a second mutant with the same name is a programming error."""
    if m.name in CATALOG:
        raise ValueError(f"mutant {m.name!r} is registered twice")
    CATALOG[m.name] = m
    return m


def catalog() -> List[Mutant]:
    """Every registered mutant, after importing every module of :data:`MUTANT_MODULES` that exists."""
    for mod in MUTANT_MODULES:
        try:
            importlib.import_module(f"{__name__}.{mod}")
        except ModuleNotFoundError as e:
            if e.name != f"{__name__}.{mod}":
                raise
    return list(CATALOG.values())


def get(name: str) -> Mutant:
    catalog()
    try:
        return CATALOG[name]
    except KeyError:
        raise KeyError(f"unknown mutant {name!r}; known: {', '.join(sorted(CATALOG))}") from None


def mutant_backend(name: str, dtypes: Optional[Sequence[torch.dtype]] = None) -> Backend:
    """The mutant ``name`` as a backend declaring ``dtypes`` (default: all the mutant's dtypes)."""
    m = get(name)
    return m.make_backend(tuple(dtypes) if dtypes is not None else m.dtypes)
