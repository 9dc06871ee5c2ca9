"""What a conformance case is.

An op family contributes cases through a module in ``conformance/ops/`` exporting::

    FAMILY: str                                           # "gemm", "attention", ...
    def fixed_cases(backend, dtype) -> list[OpCase]       # named shapes always run (incl. benchmark shapes)
    def case_strategy(backend, dtype) -> SearchStrategy   # hypothesis strategy drawing OpCase objects

The runner draws a seeded, derandomized sample from each strategy, so a run is reproducible.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Sequence, Tuple

import torch

__all__ = ["OpCase", "CaseResult", "STATUSES", "poison"]


def poison(t: torch.Tensor) -> torch.Tensor:
    """Fill a floating output with NaN (an integer one with its minimum) so unwritten elements fail."""
    if t.is_floating_point():
        return t.fill_(float("nan"))
    return t.fill_(torch.iinfo(t.dtype).min)


@dataclass(frozen=True)
class OpCase:
    """One (op, spec, shapes) instance.

    :param op: the core ``Op`` subclass.
    :param spec: the spec to build it with.
    :param name: a readable, unique id with the shape parameters, e.g. ``"decode S=8 Hq=32 Hkv=8 D=128 ctx=2048"``.
    :param tolerance_class: key into :mod:`anyaccel.conformance.tolerances` (``"gemm"``, ``"attention"``,
        ``"norm"``, ``"rotary"``, ``"activation"``, ``"copy"``).
    :param reduction: length of the longest reduction feeding one output element (K for a GEMM, the context
        length for attention, H for a norm); tolerances scale with it.
    :param make: ``make(device, seed) -> dict`` of inputs on ``device``, deterministic in ``seed``.
    :param call: ``call(op, inputs) -> tuple of tensors``: runs the built op with NaN-poisoned, preallocated
        outputs and returns what must be compared (only the elements with a defined value).
    :param reference: ``reference(inputs) -> tuple of float64 tensors``, same order as ``call``.
    """

    op: type
    spec: Any
    name: str
    tolerance_class: str
    reduction: int
    make: Callable[[torch.device, int], Dict[str, Any]]
    call: Callable[[Any, Dict[str, Any]], Tuple[torch.Tensor, ...]]
    reference: Callable[[Dict[str, Any]], Tuple[torch.Tensor, ...]]
    tags: Tuple[str, ...] = field(default=())

    @property
    def dtype(self) -> torch.dtype:
        return self.spec.dtype

    @property
    def op_name(self) -> str:
        return self.op.name


#: Every outcome of a record. ``"not run"``: the case could not run here (a reference dependency or a checkpoint
#: package is missing); it is not a verdict on the backend, but a run with one exits non-zero unless the user
#: allows it (``--allow-unsupported``).
STATUSES = ("pass", "fail", "unsupported", "error", "not run")


@dataclass
class CaseResult:
    """One record of a conformance report (one JSON object per case).

    :param kind: ``"op"``, ``"collective"`` or ``"model"``.
    :param status: one of :data:`STATUSES`.
    :param max_abs_err: the largest absolute deviation from the reference (None when nothing was compared).
    :param tolerance: the bound it was held to, as a number (the absolute bound at the worst element) or None.
    :param reason: why it failed, errored, fell back or is unsupported ("" when it simply passed).
    :param fallback: the op ran on the core's native implementation, not a backend kernel.
    :param kernel: the implementation that ran (selection's choice).
    :param features: the op features the case exercised (:mod:`anyaccel.conformance.coverage`), for the coverage
        table; empty for records that are not op cases.
    """

    backend: str
    kind: str
    name: str
    dtype: str
    status: str
    max_abs_err: float | None = None
    tolerance: float | None = None
    reason: str = ""
    op: str = ""
    fallback: bool = False
    kernel: str = ""
    seconds: float = 0.0
    features: Tuple[str, ...] = ()

    def to_json(self) -> dict:
        return {
            "backend": self.backend, "kind": self.kind, "name": self.name, "dtype": self.dtype,
            "status": self.status, "max_abs_err": self.max_abs_err, "tolerance": self.tolerance,
            "reason": self.reason, "op": self.op, "fallback": self.fallback, "kernel": self.kernel,
            "seconds": round(self.seconds, 4), "features": list(self.features),
        }
