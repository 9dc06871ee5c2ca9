"""Norms: RMSNorm (with a fused residual add) and LayerNorm.

Shape legend: N rows (tokens, flattened over leading dims), H hidden size.

Kernel contracts (what a backend's ``build(spec)`` returns; the core has validated every argument and
preallocated every output, which the conformance suite fills with NaN first)::

    rms_norm          kernel(x_NH, weight_H, residual_NH | None, out_NH, residual_out_NH | None) -> out_NH
    layer_norm        kernel(x_NH, weight_H, bias_H | None, out_NH) -> out_NH

Layouts the kernels may rely on: inputs are 2-d with a unit stride on the last dim (rows may be strided) and
outputs are contiguous. Aliasing a kernel must honour: ``out`` may be ``x`` and ``residual_out`` may be
``residual`` (rms_norm, in place); no other overlap is passed.

Half-precision norms accumulate in float32; the float64 references below are the conformance oracle.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, List, Optional, Tuple, Union

import torch
import torch.nn.functional as F

from ._small_ops import (_check_eps, _check_float_dtype, _check_positive_int, _fail_out, _fail_strided_weight,
                         _out_ok, _rows)
from .dispatch import Op, OpCapability
from .errors import InvalidArgumentError
from .validation import check_tensor, dtype_name, fmt_shape

__all__ = ["RMSNormSpec", "LayerNormSpec", "NormCapability", "RMSNorm", "LayerNorm", "rms_norm_reference",
           "layer_norm_reference"]


@dataclass(frozen=True)
class RMSNormSpec:
    """An RMSNorm layer: ``out = x / sqrt(mean(x**2) + eps) * weight`` over the last dim.

    :param hidden_size: H, checked on every call.
    :param dtype: dtype of ``x``, ``weight``, ``residual`` and the outputs.
    :param eps: added to the mean of squares; > 0.
    :param fused_residual: calls pass ``residual`` and get ``(out, residual_out)`` with
        ``residual_out = x + residual`` and ``out = rms_norm(residual_out) * weight``.
    """

    hidden_size: int
    dtype: torch.dtype
    eps: float = 1e-6
    fused_residual: bool = False

    def __str__(self) -> str:
        return (f"rms_norm(H={self.hidden_size}, dtype={dtype_name(self.dtype)}, eps={self.eps}, "
                f"fused_residual={self.fused_residual})")


@dataclass(frozen=True)
class LayerNormSpec:
    """A LayerNorm layer: ``out = (x - mean) / sqrt(var + eps) * weight (+ bias)`` over the last dim (biased var).

    :param hidden_size: H, checked on every call.
    :param dtype: dtype of ``x``, ``weight``, ``bias`` and ``out``.
    :param eps: added to the variance; > 0.
    :param has_bias: whether calls pass a bias.
    """

    hidden_size: int
    dtype: torch.dtype
    eps: float = 1e-5
    has_bias: bool = True

    def __str__(self) -> str:
        return (f"layer_norm(H={self.hidden_size}, dtype={dtype_name(self.dtype)}, eps={self.eps}, "
                f"bias={self.has_bias})")


@dataclass(frozen=True)
class NormCapability(OpCapability):
    """What a norm kernel supports.

    :param max_hidden_size: the largest H (e.g. a one-block-per-row kernel's limit); ``None`` means any.
    :param fused_residual: whether it implements RMSNorm's fused residual add.
    :param bias: whether it implements LayerNorm's bias.
    """

    max_hidden_size: Optional[int] = None
    fused_residual: bool = True
    bias: bool = True

    def not_supported_reasons(self, spec: Any) -> List[str]:
        reasons = super().not_supported_reasons(spec)
        h = getattr(spec, "hidden_size", None)
        if self.max_hidden_size is not None and h is not None and h > self.max_hidden_size:
            reasons.append(f"hidden_size {h} exceeds max_hidden_size {self.max_hidden_size}")
        if getattr(spec, "fused_residual", False) and not self.fused_residual:
            reasons.append("fused residual add not supported")
        if getattr(spec, "has_bias", False) and not self.bias:
            reasons.append("bias not supported")
        return reasons


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6,
                       residual: Optional[torch.Tensor] = None
                       ) -> Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]:
    """The float64 oracle. Returns ``out`` or, with ``residual``, ``(out, residual_out)``; all float64."""
    h = x.double()
    if residual is not None:
        h = h + residual.double()
    out = h * torch.rsqrt(h.square().mean(-1, keepdim=True) + eps) * weight.double()
    return out if residual is None else (out, h)


def layer_norm_reference(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None,
                         eps: float = 1e-5) -> torch.Tensor:
    """The float64 oracle: biased variance over the last dim, like ``torch.nn.LayerNorm``."""
    h = x.double()
    centered = h - h.mean(-1, keepdim=True)
    out = centered * torch.rsqrt(centered.square().mean(-1, keepdim=True) + eps) * weight.double()
    if bias is not None:
        out = out + bias.double()
    return out


def _rms_norm_native(spec: RMSNormSpec) -> Callable:
    eps = spec.eps

    def rms_norm_native(x_NH, w_H, residual_NH, out_NH, residual_out_NH):
        # float32 math whatever the dtype; new tensors only, so out/x and residual_out/residual may alias.
        h_NH = x_NH.float()
        if residual_NH is not None:
            h_NH = h_NH + residual_NH
            residual_out_NH.copy_(h_NH)
        y_NH = h_NH * torch.rsqrt(h_NH.square().mean(-1, keepdim=True) + eps)
        return out_NH.copy_(y_NH.mul_(w_H))

    return rms_norm_native


def _layer_norm_native(spec: LayerNormSpec) -> Callable:
    eps, h = spec.eps, (spec.hidden_size,)

    def layer_norm_native(x_NH, w_H, b_H, out_NH):
        y_NH = F.layer_norm(x_NH.float(), h, w_H.float(), None if b_H is None else b_H.float(), eps)
        return out_NH.copy_(y_NH)

    return layer_norm_native


class _Norm(Op):
    """Shared per-call checks of the two norms."""

    __slots__ = ("_h", "_dt", "_hs")

    def __init__(self, spec: Any, kernel: Callable, selection=None) -> None:
        super().__init__(spec, kernel, selection)
        # Read the spec once: the per-call checks compare against these plain attributes.
        self._h = spec.hidden_size
        self._hs = torch.Size((spec.hidden_size,))
        self._dt = spec.dtype

    @classmethod
    def check_spec(cls, spec: Any) -> None:
        _check_float_dtype(cls.name, spec.dtype)
        _check_positive_int(cls.name, "spec.hidden_size", spec.hidden_size)
        _check_eps(cls.name, spec.eps)
        for flag in ("fused_residual", "has_bias"):
            v = getattr(spec, flag, False)
            if not isinstance(v, bool):
                raise InvalidArgumentError(cls.name, f"spec.{flag}", "a bool", repr(v))

    def _fail(self, x: object, weight: object) -> None:
        op, h, dt = self.name, self._h, self._dt
        check_tensor(op, "x", x, dtypes=(dt,))
        if x.dim() < 1 or x.shape[-1] != h:
            raise InvalidArgumentError(op, "x", f"a tensor [..., H] with H = {h} (spec.hidden_size)",
                                       f"shape {fmt_shape(tuple(x.shape))}")
        check_tensor(op, "weight", weight, shape=(h,), dims="H", dtypes=(dt,), device=x.device)
        if not weight.is_contiguous():
            _fail_strided_weight(op, "weight", weight)
        raise InvalidArgumentError(op, "x", "valid arguments", "a combination the checks could not place")

    def _fail_like_x(self, name: str, t: object, x: torch.Tensor, why: str = "") -> None:
        check_tensor(self.name, name, t, shape=tuple(x.shape), dims="..., H (the shape of x)", dtypes=(self._dt,),
                     device=x.device)
        raise InvalidArgumentError(self.name, name, why or "a tensor like x", "a tensor that is not")


class RMSNorm(_Norm):
    """``out[..., H] = x / rms(x) * weight``; with ``spec.fused_residual``, first ``residual_out = x + residual``
    and the norm of that, returning ``(out, residual_out)``.

    ``out`` may be ``x`` and ``residual_out`` may be ``residual`` (in place); ``out`` and ``residual_out`` must
    differ. Outputs must be contiguous. ``x`` and ``residual`` may be strided (kernels get rows with a unit last
    stride); ``weight`` must be contiguous and a strided one is **rejected** naming it (kernels read it as a
    dense [H] array; a weight is made contiguous once at load, not copied on every call).
    """

    name = "rms_norm"
    spec_type = RMSNormSpec
    __slots__ = ("_fused",)

    def __init__(self, spec: RMSNormSpec, kernel: Callable, selection=None) -> None:
        super().__init__(spec, kernel, selection)
        self._fused = spec.fused_residual

    @classmethod
    def native(cls, spec: RMSNormSpec) -> Callable:
        return _rms_norm_native(spec)

    reference = staticmethod(rms_norm_reference)

    def __call__(self, x: torch.Tensor, weight: torch.Tensor, residual: Optional[torch.Tensor] = None,
                 out: Optional[torch.Tensor] = None, residual_out: Optional[torch.Tensor] = None
                 ) -> Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]:
        dt, h = self._dt, self._h
        try:
            xs = x.shape
            dev = x.device
            ok = (xs[-1] == h and x.dtype == dt and weight.dtype == dt and weight.shape == self._hs
                  and weight.device == dev and weight.is_contiguous())
        except (AttributeError, IndexError):
            ok = False
        if not ok:
            self._fail(x, weight)
        if self._fused:
            if residual is None:
                raise InvalidArgumentError("rms_norm", "residual", "a tensor [..., H] (spec.fused_residual is True)",
                                           "None")
            try:
                ok = residual.shape == xs and residual.dtype == dt and residual.device == dev
            except AttributeError:
                ok = False
            if not ok:
                self._fail_like_x("residual", residual, x)
            if residual_out is None:
                residual_out = torch.empty(xs, dtype=dt, device=x.device)
            elif not _out_ok(residual_out, xs, dt, dev):
                _fail_out("rms_norm", "residual_out", residual_out, xs, dt, x.device, "..., H")
        elif residual is not None or residual_out is not None:
            name = "residual" if residual is not None else "residual_out"
            raise InvalidArgumentError("rms_norm", name, "None (spec.fused_residual is False)", "a tensor",
                                       "Build the op with RMSNormSpec(fused_residual=True) to fuse the add")
        if out is None:
            out = torch.empty(xs, dtype=dt, device=x.device)
        elif not _out_ok(out, xs, dt, dev):
            _fail_out("rms_norm", "out", out, xs, dt, x.device, "..., H")
        flat = len(xs) != 2
        if residual_out is None:
            self.kernel(_rows(x, h), weight, None, out.view(-1, h) if flat else out, None)
            return out
        if out is residual_out:
            raise InvalidArgumentError("rms_norm", "residual_out", "a tensor distinct from 'out'", "the same tensor")
        if flat:
            self.kernel(_rows(x, h), weight, _rows(residual, h), out.view(-1, h), residual_out.view(-1, h))
        else:
            self.kernel(_rows(x, h), weight, _rows(residual, h), out, residual_out)
        return out, residual_out


class LayerNorm(_Norm):
    """``out[..., H] = (x - mean) / sqrt(var + eps) * weight (+ bias)``. ``out`` may be ``x``; it must be
    contiguous. ``weight`` and ``bias`` must be contiguous: strided ones are **rejected** naming the argument
    (as for :class:`RMSNorm`)."""

    name = "layer_norm"
    spec_type = LayerNormSpec
    __slots__ = ("_bias",)

    def __init__(self, spec: LayerNormSpec, kernel: Callable, selection=None) -> None:
        super().__init__(spec, kernel, selection)
        self._bias = spec.has_bias

    @classmethod
    def native(cls, spec: LayerNormSpec) -> Callable:
        return _layer_norm_native(spec)

    reference = staticmethod(layer_norm_reference)

    def __call__(self, x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None,
                 out: Optional[torch.Tensor] = None) -> torch.Tensor:
        dt, h = self._dt, self._h
        try:
            xs = x.shape
            dev = x.device
            ok = (xs[-1] == h and x.dtype == dt and weight.dtype == dt and weight.shape == self._hs
                  and weight.device == dev and weight.is_contiguous())
        except (AttributeError, IndexError):
            ok = False
        if not ok:
            self._fail(x, weight)
        if bias is not None:
            try:
                ok = (self._bias and bias.dtype == dt and bias.shape == self._hs and bias.device == dev
                      and bias.is_contiguous())
            except AttributeError:
                ok = False
            if not ok:
                if not self._bias:
                    raise InvalidArgumentError("layer_norm", "bias", "None (spec.has_bias is False)", "a tensor")
                check_tensor("layer_norm", "bias", bias, shape=(h,), dims="H", dtypes=(dt,), device=x.device)
                _fail_strided_weight("layer_norm", "bias", bias)
        elif self._bias:
            raise InvalidArgumentError("layer_norm", "bias", "a tensor [H] (spec.has_bias is True)", "None")
        if out is None:
            out = torch.empty(xs, dtype=dt, device=x.device)
        elif not _out_ok(out, xs, dt, dev):
            _fail_out("layer_norm", "out", out, xs, dt, x.device, "..., H")
        self.kernel(_rows(x, h), weight, bias, out.view(-1, h) if len(xs) != 2 else out)
        return out
