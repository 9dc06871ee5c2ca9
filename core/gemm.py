"""GEMM family: dense ``y = x @ w.T + b``.

Shape legend: M rows (tokens, flattened over leading dims), K input features, N output features.

Kernel contract (what a backend's ``build(spec)`` returns)::

    kernel(x_MK, w_NK, bias_N | None, out_MN) -> out_MN

``x_MK`` is 2-d (the core flattens leading dims), ``out_MN`` is preallocated with ``spec.out_dtype`` (the
conformance suite fills it with NaN first) and must be fully written.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, FrozenSet, List, Optional

import torch

from .dispatch import Op, OpCapability
from .errors import InvalidArgumentError
from .validation import FLOAT_DTYPES, check_tensor, dtype_name

__all__ = ["GemmSpec", "GemmCapability", "Gemm", "gemm_reference"]


@dataclass(frozen=True)
class GemmSpec:
    """A dense GEMM as a layer is built.

    :param dtype: dtype of ``x``, ``weight`` and ``bias``.
    :param out_dtype: dtype of the result; ``None`` means ``dtype``.
    :param has_bias: whether calls pass a bias.
    :param in_features: K, when known at build time (checked on every call).
    :param out_features: N, when known at build time (checked on every call).
    """

    dtype: torch.dtype = torch.float32
    out_dtype: Optional[torch.dtype] = None
    has_bias: bool = False
    in_features: Optional[int] = None
    out_features: Optional[int] = None

    @property
    def result_dtype(self) -> torch.dtype:
        return self.out_dtype if self.out_dtype is not None else self.dtype

    def __str__(self) -> str:
        return (f"gemm(dtype={dtype_name(self.dtype)}, out_dtype={dtype_name(self.result_dtype)}, "
                f"bias={self.has_bias}, K={self.in_features}, N={self.out_features})")


@dataclass(frozen=True)
class GemmCapability(OpCapability):
    """:param out_dtypes: result dtypes supported; ``None`` means "the input dtype only"."""

    out_dtypes: Optional[FrozenSet[torch.dtype]] = None

    def not_supported_reasons(self, spec: GemmSpec) -> List[str]:
        reasons = super().not_supported_reasons(spec)
        if self.out_dtypes is None:
            if spec.result_dtype != spec.dtype:
                reasons.append(f"out_dtype {dtype_name(spec.result_dtype)} differs from dtype "
                               f"{dtype_name(spec.dtype)}; only same-dtype output is supported")
        elif spec.result_dtype not in self.out_dtypes:
            reasons.append(f"out_dtype {dtype_name(spec.result_dtype)} not supported")
        return reasons


def gemm_reference(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The float64 oracle: ``x @ weight.T + bias`` computed in float64, returned in float64."""
    y = x.double() @ weight.double().T
    if bias is not None:
        y = y + bias.double()
    return y


def _native(spec: GemmSpec) -> Callable:
    out_dtype = spec.result_dtype

    def gemm_native(x, w, bias, out):
        if out_dtype == x.dtype:
            if bias is None:
                return torch.mm(x, w.t(), out=out)
            return torch.addmm(bias, x, w.t(), out=out)
        y = torch.mm(x.float(), w.float().t())
        if bias is not None:
            y += bias.float()
        return out.copy_(y)

    return gemm_native


class Gemm(Op):
    """``y[..., N] = x[..., K] @ weight[N, K].T (+ bias[N])``."""

    name = "gemm"
    spec_type = GemmSpec
    __slots__ = ("_dt", "_out_dt", "_k", "_n", "_bias")

    @classmethod
    def check_spec(cls, spec: GemmSpec) -> None:
        if spec.dtype not in FLOAT_DTYPES:
            raise InvalidArgumentError("gemm", "spec.dtype", "one of float32, float16, bfloat16",
                                       dtype_name(spec.dtype), "Quantized GEMMs are a separate op")
        for name in ("in_features", "out_features"):
            v = getattr(spec, name)
            if v is not None and (not isinstance(v, int) or v <= 0):
                raise InvalidArgumentError("gemm", f"spec.{name}", "a positive int or None", v)

    @classmethod
    def native(cls, spec: GemmSpec) -> Callable:
        return _native(spec)

    reference = staticmethod(gemm_reference)

    def __init__(self, spec: GemmSpec, kernel: Callable, selection=None) -> None:
        super().__init__(spec, kernel, selection)
        # Read the spec once: the per-call checks compare against these plain attributes.
        self._dt = spec.dtype
        self._out_dt = spec.result_dtype
        self._k = spec.in_features
        self._n = spec.out_features
        self._bias = spec.has_bias

    def __call__(self, x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None,
                 out: Optional[torch.Tensor] = None) -> torch.Tensor:
        dt = self._dt
        # The checks a good call passes are a few cheap comparisons on shapes read once; the messages are built
        # only on failure (by check_tensor, which re-checks from the start). A non-tensor raises AttributeError.
        try:
            xs = x.shape
            ws = weight.shape
            dev = x.device
            ok = (x.dtype == dt and weight.dtype == dt and len(ws) == 2 and xs[-1] == ws[1]
                  and dev == weight.device and (self._k is None or ws[1] == self._k)
                  and (self._n is None or ws[0] == self._n))
        except (AttributeError, IndexError):
            ok = False
        if not ok:
            self._fail(x, weight)
        n = ws[0]
        if bias is not None:
            try:
                ok = self._bias and bias.dtype == dt and bias.shape == (n,) and bias.device == dev
            except AttributeError:
                ok = False
            if not ok:
                self._fail_bias(x, weight, bias)
        elif self._bias:
            raise InvalidArgumentError("gemm", "bias", "a tensor [N] (spec.has_bias is True)", "None")
        if out is None:
            if len(xs) == 2:
                out = torch.empty((xs[0], n), dtype=self._out_dt, device=x.device)
                self.kernel(x, weight, bias, out)
                return out
            out = torch.empty((*xs[:-1], n), dtype=self._out_dt, device=x.device)
        else:
            try:
                os_ = out.shape
                ok = (out.dtype == self._out_dt and os_[-1] == n and os_[:-1] == xs[:-1]
                      and out.device == dev and out.is_contiguous())
            except (AttributeError, IndexError):
                ok = False
            if not ok:
                check_tensor("gemm", "out", out, shape=(*xs[:-1], n), dtypes=(self._out_dt,), device=x.device)
                raise InvalidArgumentError("gemm", "out", "a contiguous tensor", "a strided view")
        if len(xs) == 2:
            self.kernel(x, weight, bias, out)
        else:
            self.kernel(x.reshape(-1, xs[-1]), weight, bias, out.view(-1, n))
        return out

    def _fail_bias(self, x: torch.Tensor, weight: torch.Tensor, bias: object) -> None:
        if not self.spec.has_bias:
            raise InvalidArgumentError("gemm", "bias", "None (spec.has_bias is False)", "a tensor")
        check_tensor("gemm", "bias", bias, shape=(weight.shape[0],), dims="N", dtypes=(self.spec.dtype,),
                     device=x.device)

    def _fail(self, x: object, weight: object) -> None:
        spec = self.spec
        check_tensor("gemm", "weight", weight, ndim=2, dims="N, K", dtypes=(spec.dtype,))
        check_tensor("gemm", "x", x, dtypes=(spec.dtype,), device=weight.device)
        if x.dim() < 1:
            raise InvalidArgumentError("gemm", "x", "a tensor of at least 1 dim [..., K]", "a 0-d tensor")
        if spec.in_features is not None and weight.shape[1] != spec.in_features:
            raise InvalidArgumentError("gemm", "weight", f"K = {spec.in_features} columns (spec.in_features)",
                                       f"shape {list(weight.shape)}")
        if spec.out_features is not None and weight.shape[0] != spec.out_features:
            raise InvalidArgumentError("gemm", "weight", f"N = {spec.out_features} rows (spec.out_features)",
                                       f"shape {list(weight.shape)}")
        raise InvalidArgumentError("gemm", "x", f"last dim K = {weight.shape[1]} (weight is [N, K] = "
                                   f"{list(weight.shape)})", f"shape {list(x.shape)}")
