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
    "CollectiveError",
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


class CollectiveError(AnyaccelError, RuntimeError):
    """A collective failed in the transport: a peer timed out, died or closed the connection.

    ``operation`` is the communicator method (``all_reduce``, ``recv``...), ``peer`` the rank it was waiting on
    when that is known (point-to-point and broadcast), else ``None``; ``rank`` is this process's rank.
    """

    def __init__(self, operation: str, rank: int, world_size: int, peer: "int | None", cause: str,
                 timeout_s: "float | None" = None) -> None:
        self.operation = operation
        self.rank = rank
        self.world_size = world_size
        self.peer = peer
        self.cause = cause
        self.timeout_s = timeout_s
        who = (f"peer rank {peer}" if peer is not None else
               f"a peer (one of the other {world_size - 1} rank(s); the transport does not say which)")
        limit = f" (timeout {timeout_s:g} s)" if timeout_s is not None else ""
        super().__init__(f"{operation} on rank {rank} of {world_size}: {who} did not complete it{limit}: {cause}. "
                         f"Check that every rank makes the same collective calls in the same order and that no "
                         f"rank has died; raise the timeout for legitimately long steps")
