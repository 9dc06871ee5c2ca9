"""Argument checks shared by every op.

They are written for the hot path: the common case is a handful of attribute reads and comparisons, and the
error message is only formatted when a check fails.
"""
from __future__ import annotations

from typing import Iterable, Optional, Sequence

import torch

from .errors import InvalidArgumentError

__all__ = ["dtype_name", "fmt_shape", "check_tensor", "check_same_device", "FLOAT_DTYPES", "INDEX_DTYPES"]

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
INDEX_DTYPES = (torch.int32, torch.int64)


def dtype_name(dtype: object) -> str:
    """``torch.float32`` -> ``float32``; anything else as ``str``."""
    if isinstance(dtype, torch.dtype):
        return str(dtype).removeprefix("torch.")
    return str(dtype)


def fmt_shape(shape: Sequence[object]) -> str:
    return "[" + ", ".join("*" if s is None else str(s) for s in shape) + "]"


def _describe(t: object) -> str:
    if isinstance(t, torch.Tensor):
        return f"tensor of shape {fmt_shape(tuple(t.shape))}, dtype {dtype_name(t.dtype)} on {t.device}"
    return f"{type(t).__name__} {t!r}"[:200]


def check_tensor(
    op: str,
    name: str,
    t: object,
    *,
    ndim: Optional[int] = None,
    shape: Optional[Sequence[Optional[int]]] = None,
    dims: str = "",
    dtypes: Optional[Iterable[torch.dtype]] = None,
    device: Optional[torch.device] = None,
) -> None:
    """Raise :class:`InvalidArgumentError` unless ``t`` is a tensor of the given rank, shape, dtype and device.

    ``shape`` entries of ``None`` match any size; ``dims`` names the dimensions for the message (``"T, H, D"``).
    """
    if not isinstance(t, torch.Tensor):
        raise InvalidArgumentError(op, name, "a torch.Tensor", _describe(t))
    if shape is not None:
        ndim = len(shape)
    if ndim is not None and t.dim() != ndim:
        want = f"a {ndim}-d tensor" + (f" [{dims}]" if dims else "")
        raise InvalidArgumentError(op, name, want, _describe(t))
    if shape is not None:
        for got, want in zip(t.shape, shape):
            if want is not None and got != want:
                label = f" [{dims}]" if dims else ""
                raise InvalidArgumentError(op, name, f"shape {fmt_shape(shape)}{label}", _describe(t))
    if dtypes is not None and t.dtype not in dtypes:
        names = ", ".join(dtype_name(d) for d in dtypes)
        raise InvalidArgumentError(op, name, f"dtype in ({names})", _describe(t))
    if device is not None and t.device != device:
        raise InvalidArgumentError(op, name, f"a tensor on {device}", _describe(t),
                                   "Move every argument of one call to the same device")


def check_same_device(op: str, ref_name: str, ref: torch.Tensor, **others: Optional[torch.Tensor]) -> None:
    dev = ref.device
    for name, t in others.items():
        if t is not None and t.device != dev:
            raise InvalidArgumentError(op, name, f"a tensor on {dev} (the device of '{ref_name}')", _describe(t))
