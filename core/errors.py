"""The project's error types.

Every error a user can meet names what went wrong in their terms: the op, the argument, what was expected and
what was received, and where it helps, what to do.
"""
from __future__ import annotations

from typing import Iterable, Sequence

__all__ = [
    "AnyaccelError",
    "InvalidArgumentError",
    "UnsupportedError",
    "StrictModeError",
    "SelectionConflictError",
    "PluginError",
]


class AnyaccelError(Exception):
    """Base class of every error anyaccel raises on purpose."""


class InvalidArgumentError(AnyaccelError, ValueError):
    """A call's argument is wrong: raised by the core before any kernel runs.

    The message has the form ``<op>: argument '<name>': expected <expected>, received <received>``.
    """

    def __init__(self, op: str, argument: str, expected: str, received: object, hint: str = "") -> None:
        self.op = op
        self.argument = argument
        self.expected = expected
        self.received = received
        self.hint = hint
        msg = f"{op}: argument '{argument}': expected {expected}, received {received}"
        if hint:
            msg += f". {hint}"
        super().__init__(msg)


class UnsupportedError(AnyaccelError, NotImplementedError):
    """No implementation can serve a request; ``reasons`` says why, per candidate."""

    def __init__(self, message: str, reasons: Sequence[str] = ()) -> None:
        self.reasons = list(reasons)
        if self.reasons:
            message = message + "\n" + "\n".join(f"  - {r}" for r in self.reasons)
        super().__init__(message)


class StrictModeError(UnsupportedError):
    """Strict mode forbids falling back to the core's native implementation."""


class SelectionConflictError(AnyaccelError):
    """Two candidate kernels declare the same priority for the same backend and op."""

    def __init__(self, op: str, backend: str, names: Iterable[str], priority: int) -> None:
        names = sorted(names)
        super().__init__(
            f"{op} on backend '{backend}': kernels {', '.join(names)} both declare priority {priority} and both "
            f"support this call; give one of them a distinct priority"
        )
        self.names = names


class PluginError(AnyaccelError):
    """A plugin broke its contract (bad return value, incompatible API version, ...)."""
