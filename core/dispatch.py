"""Capabilities, kernels and selection: how a backend's kernel is chosen for an op, once, at build time.

A backend declares per kernel *what it supports* as data (an :class:`OpCapability`) and answers
``not_supported_reasons(spec) -> list[str]``. :func:`select` walks the candidates by declared priority, takes the
first with no reasons, and falls back to the core's native implementation when none qualifies (or raises in
strict mode). Every decision is recorded with every rejected candidate's reasons (``anyaccel explain``).

The result of building an op is an :class:`Op`: a plain callable whose ``__call__`` validates the arguments and
then calls the chosen kernel. Nothing is looked up per call.
"""
from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, FrozenSet, List, Optional, Sequence, Tuple, TYPE_CHECKING

import torch

from .errors import SelectionConflictError, StrictModeError, UnsupportedError
from .validation import dtype_name

if TYPE_CHECKING:  # pragma: no cover
    from .backend import Backend

__all__ = [
    "OpCapability",
    "KernelImpl",
    "Candidate",
    "Selection",
    "Op",
    "select",
    "selections",
    "clear_selections",
    "NATIVE_PROVIDER",
    "strict_default",
    "deterministic_default",
    "deterministic_mode",
]

NATIVE_PROVIDER = "anyaccel.core"


def strict_default() -> bool:
    """Strict mode is off unless ``ANYACCEL_STRICT=1`` (the CLI's ``--strict`` sets it)."""
    return os.environ.get("ANYACCEL_STRICT", "").strip().lower() in ("1", "true", "yes", "on")


_DETERMINISTIC: "contextvars.ContextVar[Optional[bool]]" = contextvars.ContextVar("anyaccel_deterministic",
                                                                                  default=None)


def deterministic_default() -> bool:
    """Deterministic (batch-invariant) mode: the innermost :func:`deterministic_mode` if one is active, else
    ``ANYACCEL_DETERMINISTIC=1`` (the CLI's ``--deterministic`` sets it); off by default."""
    v = _DETERMINISTIC.get()
    if v is not None:
        return v
    return os.environ.get("ANYACCEL_DETERMINISTIC", "").strip().lower() in ("1", "true", "yes", "on")


@contextlib.contextmanager
def deterministic_mode(on: Optional[bool] = True):
    """``with deterministic_mode():`` every op built inside selects only kernels that declare
    ``batch_invariant`` (``None`` leaves the surrounding mode as it is)."""
    if on is None:
        yield
        return
    token = _DETERMINISTIC.set(bool(on))
    try:
        yield
    finally:
        _DETERMINISTIC.reset(token)


def _names(dtypes: FrozenSet[torch.dtype]) -> str:
    return "{" + ", ".join(sorted(dtype_name(d) for d in dtypes)) + "}"


@dataclass(frozen=True)
class OpCapability:
    """What a kernel supports, as data. Subclasses in each op family add that family's fields.

    ``not_supported_reasons`` returns one human-readable sentence per unmet requirement; empty means supported.

    :param batch_invariant: the kernel computes each row (token) of its result the same way, bit for bit,
        whatever the batch around it: the number of rows, the row's position, the other sequences, the query
        chunking. ``False`` (the default) promises nothing; deterministic mode (``--deterministic``) selects
        only kernels that declare ``True``.
    """

    dtypes: FrozenSet[torch.dtype] = frozenset({torch.float32, torch.float16, torch.bfloat16})
    batch_invariant: bool = False

    def not_supported_reasons(self, spec: Any) -> List[str]:
        reasons: List[str] = []
        dtype = getattr(spec, "dtype", None)
        if dtype is not None and dtype not in self.dtypes:
            reasons.append(f"dtype {dtype_name(dtype)} not in supported dtypes {_names(self.dtypes)}")
        return reasons

    def describe(self) -> dict:
        """A JSON-friendly description (for ``anyaccel backends`` and reports)."""
        out = {}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if isinstance(v, (frozenset, set, tuple, list)):
                v = sorted((dtype_name(x) if isinstance(x, torch.dtype) else x for x in v), key=str)
            elif isinstance(v, torch.dtype):
                v = dtype_name(v)
            out[f.name] = v
        return out


@dataclass(frozen=True)
class KernelImpl:
    """One kernel for one op on one backend.

    :param op: the op name (``Op.name``), e.g. ``"attention"``.
    :param backend: the backend name it serves, e.g. ``"cpu"``; a kernel provider may name another plugin's backend.
    :param name: a unique, dotted name, e.g. ``"cpu.attention.sdpa"``.
    :param build: ``build(spec) -> kernel``; called once per selection. The kernel takes the op's call
        arguments with every output preallocated (see each op's docstring) and returns the output.
    :param capability: what it supports; it is asked before ``build`` is called.
    :param priority: higher wins; two supported candidates with the same priority are a conflict.
    :param provider: the distribution that supplied it; filled in by the plugin manager.
    """

    op: str
    backend: str
    name: str
    build: Callable[[Any], Callable[..., Any]]
    capability: OpCapability = field(default_factory=OpCapability)
    priority: int = 0
    provider: str = ""
    description: str = ""


@dataclass(frozen=True)
class Candidate:
    name: str
    provider: str
    priority: int
    reasons: Tuple[str, ...]
    chosen: bool = False


@dataclass(frozen=True)
class Selection:
    """The record of one decision: what was chosen for (op, backend, spec) and why the others were not."""

    op: str
    backend: str
    spec: Any
    chosen: str
    provider: str
    fallback: bool
    candidates: Tuple[Candidate, ...]
    deterministic: bool = False

    def explain(self) -> str:
        lines = [f"op {self.op} on backend '{self.backend}'", f"  call: {self.spec}"]
        if self.deterministic:
            lines.append("  mode: deterministic (only kernels that declare batch_invariant)")
        tag = " (fallback to the core's native implementation)" if self.fallback else ""
        lines.append(f"  chosen: {self.chosen} [from {self.provider}]{tag}")
        rejected = [c for c in self.candidates if not c.chosen]
        if rejected:
            lines.append("  rejected:")
            for c in rejected:
                why = "; ".join(c.reasons) if c.reasons else "lower priority"
                lines.append(f"    {c.name} [from {c.provider}, priority {c.priority}]: {why}")
        return "\n".join(lines)

    def to_json(self) -> dict:
        return {
            "op": self.op,
            "backend": self.backend,
            "spec": repr(self.spec),
            "chosen": self.chosen,
            "provider": self.provider,
            "fallback": self.fallback,
            "candidates": [dataclasses.asdict(c) for c in self.candidates],
            "deterministic": self.deterministic,
        }


_LOG: List[Selection] = []


def selections() -> List[Selection]:
    """Every selection made in this process, oldest first."""
    return list(_LOG)


def clear_selections() -> None:
    _LOG.clear()


NOT_BATCH_INVARIANT = "not batch invariant (deterministic mode selects only kernels that declare batch_invariant)"


def select(op: type["Op"], spec: Any, backend: "Backend", *, strict: Optional[bool] = None,
           deterministic: Optional[bool] = None) -> Tuple[Callable, Selection]:
    """Choose the kernel for ``op`` with ``spec`` on ``backend``; record and return (kernel, selection).

    In deterministic mode a kernel whose capability does not declare ``batch_invariant`` is rejected with that
    reason, and the core's native fallback is used only where the op declares it batch invariant
    (``Op.native_batch_invariant``); otherwise the build raises :class:`UnsupportedError` listing every reason.
    """
    if strict is None:
        strict = strict_default()
    if deterministic is None:
        deterministic = deterministic_default()
    kernels = sorted(backend.kernels_for(op.name), key=lambda k: -k.priority)
    records: List[Candidate] = []
    supported: List[KernelImpl] = []
    for k in kernels:
        try:
            reasons = tuple(str(r) for r in k.capability.not_supported_reasons(spec))
        except Exception as e:  # a plugin's capability check must not break selection for the others
            reasons = (f"its capability check raised {type(e).__name__}: {e}",)
        if deterministic and not getattr(k.capability, "batch_invariant", False):
            reasons = reasons + (NOT_BATCH_INVARIANT,)
        records.append(Candidate(k.name, k.provider, k.priority, reasons))
        if not reasons:
            supported.append(k)
    kernel = None
    while supported:
        top = supported[0]
        tied = [k.name for k in supported if k.priority == top.priority]
        if len(tied) > 1:
            raise SelectionConflictError(op.name, backend.name, tied, top.priority)
        try:
            kernel = top.build(spec)
            why = "" if callable(kernel) else f"build() returned {type(kernel).__name__}, not a callable kernel"
        except Exception as e:  # a failing kernel is dropped with its reason; the next candidate serves
            why = f"build() raised {type(e).__name__}: {e}"
        if not why:
            break
        kernel = None
        supported.pop(0)
        records = [dataclasses.replace(c, reasons=(why,)) if c.name == top.name else c for c in records]
    if kernel is not None:
        chosen_name, provider, fallback = top.name, top.provider, False
    else:
        reasons = [f"{c.name}: {'; '.join(c.reasons)}" for c in records]
        if not records:
            reasons = [f"backend '{backend.name}' registers no kernel for {op.name}"]
        if deterministic and not op.native_batch_invariant:
            raise UnsupportedError(
                f"{op.name} on backend '{backend.name}': deterministic mode needs a batch-invariant kernel for "
                f"{spec}; the backend declares none that serves it, and the core's native {op.name} is not batch "
                f"invariant", reasons)
        if strict:
            raise StrictModeError(
                f"{op.name} on backend '{backend.name}': strict mode forbids falling back to the core's native "
                f"implementation for {spec}", reasons)
        kernel = op.native(spec)
        chosen_name, provider, fallback = f"native.{op.name}", NATIVE_PROVIDER, True
    records = [dataclasses.replace(c, chosen=(c.name == chosen_name)) for c in records]
    if fallback:
        records.append(Candidate(chosen_name, provider, -(2**31), (), chosen=True))
    sel = Selection(op.name, backend.name, spec, chosen_name, provider, fallback, tuple(records),
                    bool(deterministic))
    _LOG.append(sel)
    return kernel, sel


class Op:
    """Base class of a built op: validates each call, then runs the kernel chosen at build time.

    Subclasses (one per op, in the op family's core file) define ``name``, ``spec_type``, ``check_spec``
    (build-time validation), ``native`` (the core's fallback kernel), ``reference`` (the float64 oracle) and a
    ``__call__`` with the op's signature.
    """

    name: ClassVar[str]
    spec_type: ClassVar[type]
    #: the native fallback computes each row the same way whatever the batch (deterministic mode may use it)
    native_batch_invariant: ClassVar[bool] = False

    __slots__ = ("spec", "kernel", "selection")

    def __init__(self, spec: Any, kernel: Callable[..., Any], selection: Optional[Selection] = None) -> None:
        self.spec = spec
        self.kernel = kernel
        self.selection = selection

    @classmethod
    def build(cls, spec: Any, backend: "Backend", *, strict: Optional[bool] = None,
              deterministic: Optional[bool] = None) -> "Op":
        """Validate ``spec``, select the kernel on ``backend`` and return the callable op (``deterministic``:
        see :func:`select`; ``None`` follows :func:`deterministic_default`)."""
        if not isinstance(spec, cls.spec_type):
            from .errors import InvalidArgumentError

            raise InvalidArgumentError(cls.name, "spec", cls.spec_type.__name__, type(spec).__name__)
        cls.check_spec(spec)
        kernel, sel = select(cls, spec, backend, strict=strict, deterministic=deterministic)
        return cls(spec, kernel, sel)

    @classmethod
    def check_spec(cls, spec: Any) -> None:  # pragma: no cover - overridden
        """Raise InvalidArgumentError for a spec no implementation could honour."""

    @classmethod
    def native(cls, spec: Any) -> Callable[..., Any]:  # pragma: no cover - overridden
        raise NotImplementedError

    def __repr__(self) -> str:
        chosen = self.selection.chosen if self.selection else "direct"
        return f"{type(self).__name__}({self.spec}, kernel={chosen})"
