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

__all__ = ["OpCase", "poison"]


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
