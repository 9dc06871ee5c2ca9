"""Gated activations: ``silu_and_mul`` and ``gelu_and_mul`` (``out = act(x[..., :d]) * x[..., d:]``).

Shape legend: N rows (tokens, flattened over leading dims), d the output width (the input is ``2d`` wide).

Kernel contracts (what a backend's ``build(spec)`` returns; the core has validated every argument and
preallocated every output, which the conformance suite fills with NaN first)::

    silu_and_mul      kernel(x_N2d, out_Nd) -> out_Nd
    gelu_and_mul      kernel(x_N2d, out_Nd) -> out_Nd

The input is 2-d with a unit stride on the last dim (rows may be strided); the output is contiguous. The
float64 references below are the conformance oracle.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, FrozenSet, List, Optional

import torch
import torch.nn.functional as F

from ._small_ops import _check_float_dtype, _fail_out, _out_ok, _rows
from .dispatch import Op, OpCapability
from .errors import InvalidArgumentError
from .validation import check_tensor, dtype_name, fmt_shape

__all__ = ["GELU_APPROXIMATIONS", "GatedActivationSpec", "GatedActivationCapability", "SiluAndMul", "GeluAndMul",
           "silu_and_mul_reference", "gelu_and_mul_reference"]

GELU_APPROXIMATIONS = ("none", "tanh")


@dataclass(frozen=True)
class GatedActivationSpec:
    """A gated activation ``out[..., d] = act(x[..., :d]) * x[..., d:]``.

    :param dtype: dtype of ``x`` and ``out``.
    :param approximate: gelu only: ``"none"`` (erf) or ``"tanh"``; silu takes ``"none"``.
    """

    dtype: torch.dtype
    approximate: str = "none"

    def __str__(self) -> str:
        return f"gated_activation(dtype={dtype_name(self.dtype)}, approximate={self.approximate})"


@dataclass(frozen=True)
class GatedActivationCapability(OpCapability):
    """:param approximations: the gelu approximations a kernel implements."""

    approximations: FrozenSet[str] = frozenset(GELU_APPROXIMATIONS)

    def not_supported_reasons(self, spec: GatedActivationSpec) -> List[str]:
        reasons = super().not_supported_reasons(spec)
        if spec.approximate not in self.approximations:
            reasons.append(f"approximate={spec.approximate!r} not in {sorted(self.approximations)}")
        return reasons


def silu_and_mul_reference(x: torch.Tensor) -> torch.Tensor:
    """The float64 oracle: ``silu(a) * b`` with ``a, b = x.chunk(2, -1)``; silu(a) = a / (1 + exp(-a))."""
    h = x.double()
    d = h.shape[-1] // 2
    a, b = h[..., :d], h[..., d:]
    return a * torch.sigmoid(a) * b


def gelu_and_mul_reference(x: torch.Tensor, approximate: str = "none") -> torch.Tensor:
    """The float64 oracle: ``gelu(a) * b``; erf gelu, or the tanh approximation with ``approximate="tanh"``."""
    h = x.double()
    d = h.shape[-1] // 2
    a, b = h[..., :d], h[..., d:]
    if approximate == "tanh":
        g = 0.5 * a * (1 + torch.tanh(math.sqrt(2 / math.pi) * (a + 0.044715 * a.pow(3))))
    else:
        g = 0.5 * a * (1 + torch.erf(a / math.sqrt(2)))
    return g * b


def _silu_and_mul_native(spec: GatedActivationSpec) -> Callable:
    def silu_and_mul_native(x_N2d, out_Nd):
        d = out_Nd.shape[-1]
        a = x_N2d[:, :d].float()
        return out_Nd.copy_(F.silu(a) * x_N2d[:, d:])

    return silu_and_mul_native


def _gelu_and_mul_native(spec: GatedActivationSpec) -> Callable:
    approximate = spec.approximate

    def gelu_and_mul_native(x_N2d, out_Nd):
        d = out_Nd.shape[-1]
        a = x_N2d[:, :d].float()
        return out_Nd.copy_(F.gelu(a, approximate=approximate) * x_N2d[:, d:])

    return gelu_and_mul_native


class _GatedActivation(Op):
    """``out[..., d] = act(x[..., :d]) * x[..., d:]``; ``out`` must be contiguous."""

    spec_type = GatedActivationSpec
    __slots__ = ("_dt",)

    def __init__(self, spec: GatedActivationSpec, kernel: Callable, selection=None) -> None:
        super().__init__(spec, kernel, selection)
        self._dt = spec.dtype

    @classmethod
    def check_spec(cls, spec: GatedActivationSpec) -> None:
        _check_float_dtype(cls.name, spec.dtype)
        if spec.approximate not in GELU_APPROXIMATIONS:
            raise InvalidArgumentError(cls.name, "spec.approximate", f"one of {', '.join(GELU_APPROXIMATIONS)}",
                                       repr(spec.approximate))

    def __call__(self, x: torch.Tensor, out: Optional[torch.Tensor] = None) -> torch.Tensor:
        dt = self._dt
        try:
            xs = x.shape
            w = xs[-1]
            ok = x.dtype == dt and w > 0 and not w & 1
        except (AttributeError, IndexError):
            ok = False
        if not ok:
            self._fail(x)
        d = w >> 1
        os_ = torch.Size((*xs[:-1], d))
        if out is None:
            out = torch.empty(os_, dtype=dt, device=x.device)
        elif not _out_ok(out, os_, dt, x.device):
            _fail_out(self.name, "out", out, os_, dt, x.device, "..., d")
        self.kernel(_rows(x, w), out.view(-1, d) if len(xs) != 2 else out)
        return out

    def _fail(self, x: object) -> None:
        check_tensor(self.name, "x", x, dtypes=(self._dt,))
        received = f"shape {fmt_shape(tuple(x.shape))}"
        raise InvalidArgumentError(self.name, "x", "a tensor [..., 2d] with an even, non-zero last dim", received)


class SiluAndMul(_GatedActivation):
    """``out[..., d] = silu(x[..., :d]) * x[..., d:]`` (SwiGLU's gate)."""

    name = "silu_and_mul"
    __slots__ = ()

    @classmethod
    def check_spec(cls, spec: GatedActivationSpec) -> None:
        super().check_spec(spec)
        if spec.approximate != "none":
            raise InvalidArgumentError(cls.name, "spec.approximate", "'none' (silu has no approximation)",
                                       repr(spec.approximate))

    @classmethod
    def native(cls, spec: GatedActivationSpec) -> Callable:
        return _silu_and_mul_native(spec)

    @staticmethod
    def reference(x: torch.Tensor, approximate: str = "none") -> torch.Tensor:
        return silu_and_mul_reference(x)


class GeluAndMul(_GatedActivation):
    """``out[..., d] = gelu(x[..., :d]) * x[..., d:]`` (GeGLU), erf or tanh gelu per ``spec.approximate``."""

    name = "gelu_and_mul"
    __slots__ = ()

    @classmethod
    def native(cls, spec: GatedActivationSpec) -> Callable:
        return _gelu_and_mul_native(spec)

    reference = staticmethod(gelu_and_mul_reference)
