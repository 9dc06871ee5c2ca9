"""W8A8 linear layers on the core's scaled GEMM, and the schemes that put them into a model.

A :class:`ScaledLinear` is a drop-in for :class:`~anyaccel.models.layers.Linear` (same ``key``, sizes and call):
its two ops are built once -- ``quantize_activation`` (dynamic, per token) and ``scaled_gemm`` -- and its weight
is prepared once by the chosen kernel (:meth:`~anyaccel.core.scaled_gemm.ScaledGemm.prepare`).

Schemes (:func:`scaled_schemes`, for the ``--quantization`` registry of :mod:`anyaccel.models.quant`):

- ``w8a8-int8``: int8 weights, symmetric per-channel; int8 activations, symmetric per-token, dynamic; round to
  nearest (the compressed-tensors W8A8 int8 recipe);
- ``fp8``: fp8 e4m3 weights per-channel and activations per-token, dynamic, round to nearest. The *format* is
  the one the backend's scaled GEMM declares (OCP ``e4m3fn``, or ``e4m3fnuz`` on a backend that declares only
  that one); a backend declaring neither gets ``e4m3fn`` on the core's dequantizing fallback, recorded as such.

The LM head stays float (it dominates accuracy loss and is often tied to the embedding).
"""
from __future__ import annotations

from typing import Any, Callable, Dict, List, Optional, Tuple

import torch

from ..core.backend import Backend
from ..core.scaled_gemm import (QuantizeActivation, QuantizeSpec, ScaledGemm, ScaledGemmSpec, quantize_weight)

__all__ = ["ScaledLinear", "fp8_format", "make_scaled_layer", "scaled_schemes", "SCALED_SCHEMES"]


class ScaledLinear:
    """``y[..., N] = dequant(quantize(x))[..., K] @ dequant(W_q)[N, K].T (+ b)`` through the core scaled GEMM."""

    def __init__(self, key: str, in_features: int, out_features: int, bias: bool, backend: Backend,
                 dtype: torch.dtype, scheme: str, weight_granularity: str = "channel",
                 act_granularity: str = "token", act_symmetric: bool = True, group_size: int = 128,
                 strict: bool = False) -> None:
        self.key = key
        self.in_features, self.out_features, self.has_bias = in_features, out_features, bias
        self.scheme = scheme
        self.format = scheme
        self.quant = QuantizeActivation.build(QuantizeSpec(dtype, scheme, act_granularity, act_symmetric,
                                                           group_size), backend, strict=strict)
        self.op = ScaledGemm.build(ScaledGemmSpec(dtype, scheme, weight_granularity, act_granularity, act_symmetric,
                                                  group_size, bias, in_features, out_features),
                                   backend, strict=strict)
        self.weight: Optional[torch.Tensor] = None        # [N, K] quantized
        self.weight_scale: Optional[torch.Tensor] = None  # float32, the granularity's shape
        self.prepared: Any = None
        self.bias: Optional[torch.Tensor] = None          # [N]

    def load(self, weight: torch.Tensor, weight_scale: torch.Tensor, bias: Optional[torch.Tensor] = None) -> None:
        """Validate and prepare the quantized weight for the chosen kernel (once)."""
        self.prepared = self.op.prepare(weight, weight_scale)
        self.weight, self.weight_scale, self.bias = weight, weight_scale, bias

    def bind(self, w) -> None:  # the float weights dict no longer holds this layer's weight
        pass

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.weight, self.weight_scale) if t is not None)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        xq, xs, xz = self.quant(x)
        return self.op(xq, xs, self.weight, self.weight_scale, self.bias, xz, self.prepared)


def fp8_format(backend: Backend, dtype: torch.dtype) -> str:
    """The fp8 scheme this backend's scaled GEMM declares for per-channel x per-token (``fp8_e4m3fn`` first)."""
    for scheme in ("fp8_e4m3fn", "fp8_e4m3fnuz"):
        spec = ScaledGemmSpec(dtype, scheme)
        for k in backend.kernels_for(ScaledGemm.name):
            try:
                if not k.capability.not_supported_reasons(spec):
                    return scheme
            except Exception:
                continue
    return "fp8_e4m3fn"


def make_scaled_layer(scheme: str) -> Callable[[Any, Backend, torch.dtype, bool], Optional[ScaledLinear]]:
    """``make_layer(linear, backend, dtype, strict)`` for the ``--quantization`` registry: the float ``linear``
    (loaded) quantized round-to-nearest into a :class:`ScaledLinear`, or ``None`` for the LM head."""

    def make(linear: Any, backend: Backend, dtype: torch.dtype, strict: bool) -> Optional[ScaledLinear]:
        if linear.key == "lm_head" or linear.weight is None:
            return None
        s = fp8_format(backend, dtype) if scheme == "fp8" else scheme
        layer = ScaledLinear(linear.key, linear.in_features, linear.out_features, linear.has_bias, backend, dtype,
                             s, strict=strict)
        wq, ws = quantize_weight(linear.weight.float(), s, "channel")
        layer.load(wq.to(linear.weight.device), ws.to(linear.weight.device), linear.bias)
        return layer

    return make


#: ``--quantization`` name -> (scheme, description)
SCALED_SCHEMES: Dict[str, Tuple[str, str]] = {
    "w8a8-int8": ("int8", "int8 weights per-channel and int8 activations per-token (dynamic), symmetric, round "
                          "to nearest; scaled GEMM"),
    "fp8": ("fp8", "fp8 e4m3 weights per-channel and activations per-token (dynamic), round to nearest; the fp8 "
                   "format the backend declares (e4m3fn, or e4m3fnuz); scaled GEMM"),
}


def scaled_schemes(scheme_type: Callable[..., Any]) -> List[Any]:
    """The w8a8 schemes as ``scheme_type(name, make_layer, description)`` objects (``models.quant.QuantScheme``),
    ready for ``register_scheme``."""
    return [scheme_type(name, make_scaled_layer(s), desc) for name, (s, desc) in SCALED_SCHEMES.items()]
