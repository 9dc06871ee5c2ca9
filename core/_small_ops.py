"""Build-time checks and layout helpers shared by the small-op families (norm, rotary, activation).

Not an op family (no ``__all__``): ``core.norm``, ``core.rotary`` and ``core.activation`` import from here.
"""
from __future__ import annotations

import math

import torch

from .errors import InvalidArgumentError
from .validation import FLOAT_DTYPES, check_tensor, dtype_name


def _check_float_dtype(op: str, dtype: object) -> None:
    if dtype not in FLOAT_DTYPES:
        raise InvalidArgumentError(op, "spec.dtype", "one of float32, float16, bfloat16", dtype_name(dtype))


def _check_positive_int(op: str, name: str, v: object) -> None:
    if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
        raise InvalidArgumentError(op, name, "a positive int", repr(v))


def _check_eps(op: str, eps: object) -> None:
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not (eps > 0) or math.isinf(eps):
        raise InvalidArgumentError(op, "spec.eps", "a finite float > 0", repr(eps))


def _check_finite_positive(op: str, name: str, v: object) -> None:
    try:
        ok = not isinstance(v, bool) and isinstance(v, (int, float)) and v > 0 and math.isfinite(v)
    except OverflowError:  # an int too large for a float
        ok = False
    if not ok:
        raise InvalidArgumentError(op, name, "a finite number > 0", repr(v)[:80])


def _rows(t: torch.Tensor, width: int) -> torch.Tensor:
    """``t[..., width]`` as a 2-d ``[N, width]`` tensor with a unit last stride (a view whenever possible)."""
    if t.dim() != 2:
        t = t.reshape(-1, width)
    if t.stride(-1) != 1:
        t = t.contiguous()
    return t


def _out_ok(out: torch.Tensor, shape: torch.Size, dtype: torch.dtype, dev: torch.device) -> bool:
    return out.shape == shape and out.dtype == dtype and out.device == dev and out.is_contiguous()


def _fail_strided_weight(op: str, name: str, t: torch.Tensor) -> None:
    raise InvalidArgumentError(op, name, "a contiguous tensor (unit stride)",
                               f"a strided view (stride {tuple(t.stride())})",
                               f"Make '{name}' contiguous once when the layer is loaded ({name}.contiguous())")


def _fail_out(op: str, name: str, out: object, shape: torch.Size, dtype: torch.dtype, device: torch.device,
              dims: str) -> None:
    check_tensor(op, name, out, shape=tuple(shape), dims=dims, dtypes=(dtype,), device=device)
    raise InvalidArgumentError(op, name, "a contiguous tensor", "a strided view",
                               "Pass a contiguous buffer, or None to have one allocated")


# ----------------------------------------------------------------------------------------------------------------
# norms
