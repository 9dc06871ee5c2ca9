"""Planted bugs the batch-invariance check (:mod:`anyaccel.conformance.determinism`) must catch.

Each mutant is a GEMM that *declares* ``batch_invariant`` but is not, swapped into a backend that otherwise has
batch-invariant kernels (:func:`mutant_backend` takes that backend, so nothing here names one). The check, run
in deterministic mode on the mutant, must report a bitwise difference. They are not in the op/model kill matrix
(that matrix compares with references, which these bugs do not break: both are correct GEMMs); the
determinism tests (``tests/conformance/test_determinism.py``) run them.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Dict, Tuple

import torch

from ...core.backend import Backend
from ...core.dispatch import KernelImpl
from ...core.gemm import GemmCapability

__all__ = ["MUTANTS", "mutant_backend"]


def _finish(y_MN, bias_N, out_MN):
    if bias_N is not None:
        y_MN = y_MN + bias_N
    return out_MN.copy_(y_MN)


def _one_call(spec):
    """One library call for all M rows: the library picks another code path (blocking, kernel) per M."""
    def gemm(x_MK, w_NK, bias_N, out_MN):
        return _finish(torch.mm(x_MK.float(), w_NK.float().t()), bias_N, out_MN)
    return gemm


def _split_k_small_m(spec):
    """Split-K for decode-sized M (< 8 rows): two half-K products added, whole K otherwise."""
    def gemm(x_MK, w_NK, bias_N, out_MN):
        x, w = x_MK.float(), w_NK.float()
        if x.shape[0] < 8 and x.shape[1] >= 2:
            h = x.shape[1] // 2
            y = torch.mm(x[:, :h], w[:, :h].t()) + torch.mm(x[:, h:], w[:, h:].t())
        else:
            y = torch.mm(x, w.t())
        return _finish(y, bias_N, out_MN)
    return gemm


#: name -> (description, build)
MUTANTS: Dict[str, Tuple[str, Callable]] = {
    "determinism.gemm_one_call": ("a GEMM declaring batch_invariant that runs one library call for all M rows",
                                  _one_call),
    "determinism.gemm_split_k_small_m": ("a GEMM declaring batch_invariant that splits K in two below 8 rows",
                                         _split_k_small_m),
}


def mutant_backend(name: str, base: Backend) -> Backend:
    """``base`` with a GEMM carrying the mutant's bug, declared batch invariant, ranked above every other GEMM."""
    description, build = MUTANTS[name]
    top = max((k.priority for k in base.kernels), default=0) + 1
    bad = KernelImpl(op="gemm", backend=base.name, name=f"mutant.{name}", build=build, priority=top,
                     capability=GemmCapability(out_dtypes=None, batch_invariant=True), description=description)
    return dataclasses.replace(base, kernels=tuple(base.kernels) + (bad,))
