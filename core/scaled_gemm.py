"""Scaled-GEMM family (w8a8): ``y = dequant(x_q) @ dequant(w_q).T + b`` and the dynamic activation quantize.

Shape legend: M rows (tokens, flattened over leading dims), K input features, N output features, G = ceil(K / B)
K-groups and ceil(N / B) N-blocks for a block size B (``spec.group_size``, 128 by default).

**Schemes** (:data:`SCHEMES`): ``int8`` (torch.int8 values; weights symmetric, activations symmetric or with an
int32 zero point), ``fp8_e4m3fn`` (OCP e4m3, finite max 448) and ``fp8_e4m3fnuz`` (e4m3 with exponent bias 8 and
no negative zero, finite max 240): the same bits mean different numbers in the two fp8 formats.

**Granularities and scale shapes** (every scale is float32, every zero point int32)::

    weight  "tensor"  w_scale [1]           "channel"  w_scale [N, 1]     "block"  w_scale [ceil(N/B), ceil(K/B)]
    act     "tensor"  x_scale [1]           "token"    x_scale [M, 1]     "group"  x_scale [M, ceil(K/B)]
            (x_zero has x_scale's shape; "tensor" and "token" only)

Dequantization is ``x[m, k] = (x_q[m, k] - x_zero) * x_scale[m, k // B]`` (the applicable index for each
granularity) and ``w[n, k] = w_q[n, k] * w_scale[n // B, k // B]``. Block-wise scales are the fp8 scheme of
DeepSeek-V3-style checkpoints: B x B weight blocks with 1 x B activation groups (``"block"`` weights go with
``"group"`` activations and only with them); a K or N that is not a multiple of B ends with a partial block.

Kernel contract of ``scaled_gemm`` (what a backend's ``build(spec)`` returns)::

    kernel(xq_MK, x_scale, x_zero | None, wq_NK, w_scale, prepared | None, bias_N | None, out_MN) -> out_MN

``xq_MK`` is 2-d (the core flattens leading dims and the matching scale dims); ``out_MN`` is preallocated with
``spec.dtype`` and must be fully written. ``prepared`` is what the kernel's optional ``prepare(wq_NK, w_scale)``
returned when the layer was built (:meth:`ScaledGemm.prepare`): a backend repacks a weight once, into its
own layout, never per call. A kernel without a ``prepare`` attribute gets ``None``.

Kernel contract of ``quantize_activation``::

    kernel(x_MK, q_out_MK, scale_out, zero_out | None) -> None

``scale_out`` (float32) and ``zero_out`` (int32, asymmetric int8 only) have the shapes above; the kernel writes
all three outputs. The rule (what the reference computes, in float64): symmetric ``scale = amax / QMAX`` (an all-zero
row gets scale 1), ``q = clamp(round_half_even(x / scale))`` for int8 and the fp8 cast (round to nearest even) of
``x / scale`` for fp8; asymmetric int8 ``scale = (max(x, 0) - min(x, 0)) / 255``, ``zero = -128 - round(min(x, 0) /
scale)``, ``q = clamp(round(x / scale) + zero, -128, 127)``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, FrozenSet, List, Optional, Tuple

import torch

from .dispatch import Op, OpCapability
from .errors import InvalidArgumentError
from .validation import FLOAT_DTYPES, check_tensor, dtype_name, fmt_shape

__all__ = ["SCHEMES", "QUANT_DTYPES", "QMAX", "WEIGHT_GRANULARITIES", "ACT_GRANULARITIES", "ScaledGemmSpec",
           "ScaledGemmCapability", "ScaledGemm", "scaled_gemm_reference", "dequantize", "QuantizeSpec",
           "QuantizeCapability", "QuantizeActivation", "quantize_reference", "scale_shape", "quantize_weight"]

#: scheme -> the torch dtype of its quantized values
QUANT_DTYPES: Dict[str, torch.dtype] = {"int8": torch.int8, "fp8_e4m3fn": torch.float8_e4m3fn,
                                        "fp8_e4m3fnuz": torch.float8_e4m3fnuz}
SCHEMES: Tuple[str, ...] = tuple(QUANT_DTYPES)
#: scheme -> the largest finite magnitude a quantized value may take (what a symmetric scale maps amax to)
QMAX: Dict[str, float] = {"int8": 127.0, "fp8_e4m3fn": 448.0, "fp8_e4m3fnuz": 240.0}
WEIGHT_GRANULARITIES: Tuple[str, ...] = ("tensor", "channel", "block")
ACT_GRANULARITIES: Tuple[str, ...] = ("tensor", "token", "group")


def _choice(op: str, name: str, v: object, allowed: Tuple[str, ...]) -> None:
    if not isinstance(v, str) or v not in allowed:
        raise InvalidArgumentError(op, name, f"one of {', '.join(repr(a) for a in allowed)}", repr(v))


def _flag(op: str, name: str, v: object) -> None:
    if not isinstance(v, bool):
        raise InvalidArgumentError(op, name, "a bool", repr(v))


def _positive(op: str, name: str, v: object, optional: bool = True) -> None:
    if v is None and optional:
        return
    if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
        raise InvalidArgumentError(op, name, "a positive int" + (" or None" if optional else ""), repr(v))


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def scale_shape(granularity: str, rows: int, k: int, block_size: int, n_blocks_rows: bool = False) -> Tuple[int, ...]:
    """The scale shape of a granularity: weight (``rows`` = N) or activation (``rows`` = M) scales."""
    if granularity == "tensor":
        return (1,)
    if granularity in ("channel", "token"):
        return (rows, 1)
    if granularity == "block":
        return (_cdiv(rows, block_size), _cdiv(k, block_size))
    return (rows, _cdiv(k, block_size))  # group


# ------------------------------------------------------------------------------------------------ scaled GEMM


@dataclass(frozen=True)
class ScaledGemmSpec:
    """A w8a8 scaled GEMM as a layer is built.

    :param dtype: dtype of the output and of the bias (float32, float16 or bfloat16).
    :param scheme: the quantized format of both operands, one of :data:`SCHEMES`.
    :param weight_granularity: ``"tensor"`` (one scale), ``"channel"`` (a scale per output feature) or
        ``"block"`` (a scale per ``group_size`` x ``group_size`` block; fp8 schemes only).
    :param act_granularity: ``"tensor"`` (one scale), ``"token"`` (a scale per row) or ``"group"`` (a scale per
        1 x ``group_size`` group of a row; goes with ``"block"`` weights).
    :param act_symmetric: ``False``: activations carry an int32 zero point (int8 with ``"tensor"`` or
        ``"token"`` activations only).
    :param group_size: B, the side of a weight block and the length of an activation group (used by ``"block"``
        and ``"group"`` only).
    :param has_bias: whether calls pass a bias (in ``dtype``).
    :param in_features: K, when known at build time (checked on every call).
    :param out_features: N, when known at build time (checked on every call).
    """

    dtype: torch.dtype = torch.bfloat16
    scheme: str = "int8"
    weight_granularity: str = "channel"
    act_granularity: str = "token"
    act_symmetric: bool = True
    group_size: int = 128
    has_bias: bool = False
    in_features: Optional[int] = None
    out_features: Optional[int] = None

    @property
    def quant_dtype(self) -> torch.dtype:
        return QUANT_DTYPES[self.scheme]

    def __str__(self) -> str:
        b = f", B={self.group_size}" if "block" == self.weight_granularity or "group" == self.act_granularity else ""
        zp = "" if self.act_symmetric else ", act zero point"
        return (f"scaled_gemm({self.scheme}, w={self.weight_granularity}, x={self.act_granularity}{zp}{b}, "
                f"out={dtype_name(self.dtype)}, bias={self.has_bias}, K={self.in_features}, N={self.out_features})")


@dataclass(frozen=True)
class ScaledGemmCapability(OpCapability):
    """What a scaled-GEMM kernel serves; ``dtypes`` are the output dtypes.

    :param schemes: the quantized formats it multiplies.
    :param weight_granularities: weight scale granularities it applies.
    :param act_granularities: activation scale granularities it applies.
    :param asymmetric: whether it applies an activation zero point.
    :param block_sizes: block (group) sizes B it serves; ``None`` means any.
    :param max_features: largest K and N accepted; ``None`` means unbounded.
    :param refusals: ``(feature, reason)`` pairs: why a scheme (or ``"block"``, block-wise scales) this kernel
        lacks is refused here, e.g. ``("fp8_e4m3fn", "fp8 needs compute capability >= 8.9; this device is
        8.0")``. A backend derives them from its hardware generation; a feature without one gets a generic
        reason.
    """

    schemes: FrozenSet[str] = frozenset(SCHEMES)
    weight_granularities: FrozenSet[str] = frozenset(WEIGHT_GRANULARITIES)
    act_granularities: FrozenSet[str] = frozenset(ACT_GRANULARITIES)
    asymmetric: bool = True
    block_sizes: Optional[FrozenSet[int]] = None
    max_features: Optional[int] = None
    refusals: Tuple[Tuple[str, str], ...] = ()

    def not_supported_reasons(self, spec: "ScaledGemmSpec") -> List[str]:
        reasons = super().not_supported_reasons(spec)
        why = dict(self.refusals)
        if spec.scheme not in self.schemes:
            reasons.append(why.get(spec.scheme) or f"scheme {spec.scheme} not in supported schemes "
                                                    f"{sorted(self.schemes)}")
        if spec.weight_granularity not in self.weight_granularities:
            reasons.append(why.get(spec.weight_granularity) or f"weight granularity {spec.weight_granularity!r} "
                           f"not in {sorted(self.weight_granularities)}")
        if spec.act_granularity not in self.act_granularities:
            reasons.append(why.get(spec.act_granularity) or f"activation granularity {spec.act_granularity!r} "
                           f"not in {sorted(self.act_granularities)}")
        if not spec.act_symmetric and not self.asymmetric:
            reasons.append(why.get("asymmetric") or "activation zero points (asymmetric int8) not supported")
        blocked = spec.weight_granularity == "block" or spec.act_granularity == "group"
        if blocked and self.block_sizes is not None and spec.group_size not in self.block_sizes:
            reasons.append(f"group_size {spec.group_size} not in {sorted(self.block_sizes)}")
        if self.max_features is not None:
            for label, v in (("in_features (K)", spec.in_features), ("out_features (N)", spec.out_features)):
                if v is not None and v > self.max_features:
                    reasons.append(f"{label} {v} > {self.max_features}, above this kernel's declared range")
        return reasons


def dequantize(q: torch.Tensor, scale: torch.Tensor, granularity: str, block_size: int,
               zero: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``(q - zero) * scale`` in float64, the scale broadcast per ``granularity`` over a 2-d ``q`` [R, K].

    Exact: an 8-bit value times a float32 scale fits float64's 53-bit mantissa.
    """
    v = q.double()
    if zero is not None:
        v = v - zero.double().reshape(-1, 1) if zero.numel() > 1 else v - zero.double().reshape(())
    s = scale.double()
    if granularity == "tensor":
        return v * s.reshape(())
    if granularity in ("channel", "token"):
        return v * s.reshape(-1, 1)
    b = block_size
    if granularity == "block":
        s = s.repeat_interleave(b, 0)[: q.shape[0]]
    return v * s.repeat_interleave(b, 1)[:, : q.shape[1]]


def scaled_gemm_reference(spec: ScaledGemmSpec, x_q: torch.Tensor, x_scale: torch.Tensor, weight: torch.Tensor,
                          weight_scale: torch.Tensor, bias: Optional[torch.Tensor] = None,
                          x_zero: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The float64 oracle on exactly dequantized operands, returned in float64 with ``x_q``'s leading dims."""
    lead, k = x_q.shape[:-1], x_q.shape[-1]
    xs = x_scale.reshape(-1, x_scale.shape[-1]) if x_scale.dim() > 1 else x_scale
    xz = None if x_zero is None else (x_zero.reshape(-1) if x_zero.dim() > 1 else x_zero)
    x = dequantize(x_q.reshape(-1, k), xs, spec.act_granularity, spec.group_size, xz)
    w = dequantize(weight, weight_scale, spec.weight_granularity, spec.group_size)
    y = x @ w.T
    if bias is not None:
        y = y + bias.double()
    return y.reshape(*lead, weight.shape[0])


def quantize_weight(w_NK: torch.Tensor, scheme: str, granularity: str = "channel", block_size: int = 128
                    ) -> Tuple[torch.Tensor, torch.Tensor]:
    """Round-to-nearest symmetric quantization of a float weight ``[N, K]``: ``(w_q, w_scale)`` with the scale
    shape of ``granularity`` (``scale = amax / QMAX`` over the tensor, each row, or each B x B block), computed in
    float64 from the weight's values. What on-the-fly quantization and the conformance cases use."""
    _choice("quantize_weight", "scheme", scheme, SCHEMES)
    _choice("quantize_weight", "granularity", granularity, WEIGHT_GRANULARITIES)
    n, k = w_NK.shape
    w = w_NK.double()
    b = block_size
    if granularity == "tensor":
        amax = w.abs().amax().reshape(1)
    elif granularity == "channel":
        amax = w.abs().amax(dim=1, keepdim=True)
    else:
        nb, kb = _cdiv(n, b), _cdiv(k, b)
        pad = torch.zeros(nb * b, kb * b, dtype=torch.float64, device=w.device)
        pad[:n, :k] = w.abs()
        amax = pad.reshape(nb, b, kb, b).amax(dim=(1, 3))
    scale = torch.where(amax > 0, amax / QMAX[scheme], torch.ones_like(amax)).float()
    wd = w / dequantize(torch.ones(n, k, dtype=torch.float64, device=w.device), scale, granularity, b)
    if scheme == "int8":
        q = torch.round(wd).clamp(-127, 127).to(torch.int8)
    else:
        q = wd.clamp(-QMAX[scheme], QMAX[scheme]).to(QUANT_DTYPES[scheme])
    return q.contiguous(), scale.contiguous()


def _native(spec: ScaledGemmSpec) -> Callable:
    """Dequantize to float32 and multiply (the fallback on hardware without the scheme: correct, not fast)."""
    wg, ag, b = spec.weight_granularity, spec.act_granularity, spec.group_size

    def _expand(s: torch.Tensor, gran: str, rows: int, k: int) -> torch.Tensor:
        if gran == "tensor":
            return s.reshape(())
        if gran in ("channel", "token"):
            return s.reshape(-1, 1)
        if gran == "block":
            s = s.repeat_interleave(b, 0)[:rows]
        return s.repeat_interleave(b, 1)[:, :k]

    def scaled_gemm_native(xq_MK, x_scale, x_zero, wq_NK, w_scale, prepared, bias_N, out_MN):
        m, k = xq_MK.shape
        n = wq_NK.shape[0]
        x = xq_MK.float()
        if x_zero is not None:
            x = x - x_zero.float().reshape(-1, 1)
        x = x * _expand(x_scale, ag, m, k)
        w = wq_NK.float() * _expand(w_scale, wg, n, k)
        y = x @ w.T
        if bias_N is not None:
            y += bias_N.float()
        return out_MN.copy_(y)

    return scaled_gemm_native


class ScaledGemm(Op):
    """``y[..., N] = dequant(x_q[..., K]) @ dequant(weight[N, K]).T (+ bias[N])`` (see the module docstring).

    Build a layer's weight once with :meth:`prepare` and pass its result as ``prepared`` on every call.
    ``x_q``, ``weight`` and the scales must be contiguous (they are written by the quantize op or at load).
    """

    name = "scaled_gemm"
    spec_type = ScaledGemmSpec
    __slots__ = ()

    @classmethod
    def check_spec(cls, spec: ScaledGemmSpec) -> None:
        op = "scaled_gemm"
        if spec.dtype not in FLOAT_DTYPES:
            raise InvalidArgumentError(op, "spec.dtype", "one of float32, float16, bfloat16 (the output dtype)",
                                       dtype_name(spec.dtype))
        _choice(op, "spec.scheme", spec.scheme, SCHEMES)
        _choice(op, "spec.weight_granularity", spec.weight_granularity, WEIGHT_GRANULARITIES)
        _choice(op, "spec.act_granularity", spec.act_granularity, ACT_GRANULARITIES)
        _flag(op, "spec.act_symmetric", spec.act_symmetric)
        _flag(op, "spec.has_bias", spec.has_bias)
        _positive(op, "spec.group_size", spec.group_size, optional=False)
        _positive(op, "spec.in_features", spec.in_features)
        _positive(op, "spec.out_features", spec.out_features)
        if (spec.weight_granularity == "block") != (spec.act_granularity == "group"):
            raise InvalidArgumentError(op, "spec.act_granularity", "'group' exactly when weight_granularity is "
                                       "'block' (B x B weight blocks go with 1 x B activation groups)",
                                       f"{spec.act_granularity!r} with weight_granularity "
                                       f"{spec.weight_granularity!r}")
        if spec.weight_granularity == "block" and spec.scheme == "int8":
            raise InvalidArgumentError(op, "spec.weight_granularity", "'tensor' or 'channel' for int8 (block-wise "
                                       "scales are defined for the fp8 schemes)", "'block'")
        if not spec.act_symmetric and (spec.scheme != "int8" or spec.act_granularity == "group"):
            raise InvalidArgumentError(op, "spec.act_symmetric", "True for fp8 schemes and group activations "
                                       "(zero points exist for int8 per-tensor or per-token activations)", "False")

    @classmethod
    def native(cls, spec: ScaledGemmSpec) -> Callable:
        return _native(spec)

    reference = staticmethod(scaled_gemm_reference)

    def _check_weight(self, weight: object, weight_scale: object) -> None:
        s, op = self.spec, self.name
        check_tensor(op, "weight", weight, ndim=2, dims="N, K", dtypes=(s.quant_dtype,))
        n, k = weight.shape
        if s.in_features is not None and k != s.in_features:
            raise InvalidArgumentError(op, "weight", f"K = {s.in_features} columns (spec.in_features)",
                                       f"shape {list(weight.shape)}")
        if s.out_features is not None and n != s.out_features:
            raise InvalidArgumentError(op, "weight", f"N = {s.out_features} rows (spec.out_features)",
                                       f"shape {list(weight.shape)}")
        want = scale_shape(s.weight_granularity, n, k, s.group_size)
        dims = {"tensor": "1", "channel": "N, 1", "block": "ceil(N/B), ceil(K/B)"}[s.weight_granularity]
        check_tensor(op, "weight_scale", weight_scale, shape=want, dims=dims, dtypes=(torch.float32,),
                     device=weight.device)

    def prepare(self, weight: torch.Tensor, weight_scale: torch.Tensor):
        """Validate a layer's quantized weight and its scales once, at build time, and return the kernel's
        prepared form (``None`` when the chosen kernel prepares nothing): pass it as ``prepared`` on every call."""
        self._check_weight(weight, weight_scale)
        prep = getattr(self.kernel, "prepare", None)
        return None if prep is None else prep(weight, weight_scale)

    def __call__(self, x_q: torch.Tensor, x_scale: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
                 bias: Optional[torch.Tensor] = None, x_zero: Optional[torch.Tensor] = None, prepared=None,
                 out: Optional[torch.Tensor] = None) -> torch.Tensor:
        s, op = self.spec, self.name
        self._check_weight(weight, weight_scale)
        n, k = weight.shape
        dev = weight.device
        check_tensor(op, "x_q", x_q, dtypes=(s.quant_dtype,), device=dev)
        if x_q.dim() < 1 or x_q.shape[-1] != k:
            raise InvalidArgumentError(op, "x_q", f"a tensor [..., K] with K = {k} (weight is {list(weight.shape)})",
                                       f"shape {list(x_q.shape)}")
        lead = tuple(x_q.shape[:-1])
        m = 1
        for d in lead:
            m *= d
        if s.act_granularity == "tensor":
            want, dims = (1,), "1"
        elif s.act_granularity == "token":
            want, dims = (*lead, 1), "..., 1"
        else:
            want, dims = (*lead, _cdiv(k, s.group_size)), "..., ceil(K/B)"
        check_tensor(op, "x_scale", x_scale, shape=want, dims=dims, dtypes=(torch.float32,), device=dev)
        if s.act_symmetric:
            if x_zero is not None:
                raise InvalidArgumentError(op, "x_zero", "None (spec.act_symmetric is True)", "a tensor")
        else:
            if x_zero is None:
                raise InvalidArgumentError(op, "x_zero", f"an int32 tensor {fmt_shape(want)} (spec.act_symmetric "
                                           "is False)", "None")
            check_tensor(op, "x_zero", x_zero, shape=want, dims=dims, dtypes=(torch.int32,), device=dev)
        if bias is not None:
            if not s.has_bias:
                raise InvalidArgumentError(op, "bias", "None (spec.has_bias is False)", "a tensor")
            check_tensor(op, "bias", bias, shape=(n,), dims="N", dtypes=(s.dtype,), device=dev)
        elif s.has_bias:
            raise InvalidArgumentError(op, "bias", "a tensor [N] (spec.has_bias is True)", "None")
        for name, t in (("x_q", x_q), ("weight", weight), ("x_scale", x_scale), ("weight_scale", weight_scale),
                        ("x_zero", x_zero), ("bias", bias)):
            if t is not None and not t.is_contiguous():
                raise InvalidArgumentError(op, name, "a contiguous tensor", f"a strided view (stride {t.stride()})",
                                           "Quantized operands and scales are written contiguous by the quantize "
                                           "op or at load")
        if prepared is None and getattr(self.kernel, "prepare", None) is not None:
            raise InvalidArgumentError(op, "prepared", "the result of op.prepare(weight, weight_scale)",
                                       "None", "This kernel repacks each weight once at build time, never per call")
        if out is None:
            out = torch.empty((*lead, n), dtype=s.dtype, device=dev)
        else:
            check_tensor(op, "out", out, shape=(*lead, n), dtypes=(s.dtype,), device=dev)
            if not out.is_contiguous():
                raise InvalidArgumentError(op, "out", "a contiguous tensor", "a strided view")
        if m == 0:
            return out
        xs2 = x_scale if s.act_granularity == "tensor" else x_scale.reshape(m, x_scale.shape[-1])
        xz2 = None if x_zero is None else (x_zero if s.act_granularity == "tensor" else x_zero.reshape(m, 1))
        self.kernel(x_q.reshape(m, k), xs2, xz2, weight, weight_scale, prepared, bias, out.view(m, n))
        return out


# ------------------------------------------------------------------------------------------------ quantize


@dataclass(frozen=True)
class QuantizeSpec:
    """Dynamic quantization of activations, as a layer is built.

    :param dtype: dtype of the input ``x`` (float32, float16 or bfloat16).
    :param scheme: the format of the result, one of :data:`SCHEMES`.
    :param granularity: ``"token"`` (a scale per row), ``"tensor"`` (one scale) or ``"group"`` (a scale per
        1 x ``group_size`` group of a row).
    :param symmetric: ``False``: int8 with an int32 zero point (``"token"`` or ``"tensor"`` only).
    :param group_size: the group length B of ``"group"`` (unused otherwise).
    """

    dtype: torch.dtype = torch.bfloat16
    scheme: str = "int8"
    granularity: str = "token"
    symmetric: bool = True
    group_size: int = 128

    def __str__(self) -> str:
        g = f", B={self.group_size}" if self.granularity == "group" else ""
        return (f"quantize_activation({dtype_name(self.dtype)} -> {self.scheme}, {self.granularity}"
                f"{'' if self.symmetric else ', zero point'}{g})")


@dataclass(frozen=True)
class QuantizeCapability(OpCapability):
    """What an activation-quantize kernel serves; ``dtypes`` are the input dtypes.

    :param schemes: the formats it writes.
    :param granularities: the scale granularities it computes.
    :param asymmetric: whether it computes zero points (int8).
    :param refusals: ``(feature, reason)`` pairs, as in :class:`ScaledGemmCapability`.
    """

    schemes: FrozenSet[str] = frozenset(SCHEMES)
    granularities: FrozenSet[str] = frozenset(ACT_GRANULARITIES)
    asymmetric: bool = True
    refusals: Tuple[Tuple[str, str], ...] = ()

    def not_supported_reasons(self, spec: "QuantizeSpec") -> List[str]:
        reasons = super().not_supported_reasons(spec)
        why = dict(self.refusals)
        if spec.scheme not in self.schemes:
            reasons.append(why.get(spec.scheme) or f"scheme {spec.scheme} not in supported schemes "
                                                    f"{sorted(self.schemes)}")
        if spec.granularity not in self.granularities:
            reasons.append(f"granularity {spec.granularity!r} not in {sorted(self.granularities)}")
        if not spec.symmetric and not self.asymmetric:
            reasons.append(why.get("asymmetric") or "zero points (asymmetric int8) not supported")
        return reasons


def _rows_view(x: torch.Tensor, granularity: str, b: int) -> torch.Tensor:
    """x [M, K] as [R, L]: the rows over which one scale is computed (padded groups with zeros)."""
    if granularity == "tensor":
        return x.reshape(1, -1)
    if granularity == "token":
        return x
    m, k = x.shape
    g = _cdiv(k, b)
    pad = torch.zeros(m, g * b, dtype=x.dtype, device=x.device)
    pad[:, :k] = x
    return pad.reshape(m * g, b)


def _quantize(x: torch.Tensor, spec: QuantizeSpec, work: torch.dtype):
    """The rule of the module docstring computed in ``work`` (float64 for the reference, float32 natively)."""
    m, k = x.shape
    xr = _rows_view(x.to(work), spec.granularity, spec.group_size)
    if spec.symmetric:
        amax = xr.abs().amax(dim=1)
        scale = torch.where(amax > 0, amax / QMAX[spec.scheme], torch.ones_like(amax))
        zero = None
    else:
        lo = xr.amin(dim=1).clamp(max=0)
        hi = xr.amax(dim=1).clamp(min=0)
        scale = torch.where(hi > lo, (hi - lo) / 255.0, torch.ones_like(hi))
        zero = (-128 - torch.round(lo / scale)).clamp(-128, 127)
    scale = scale.float().to(work)  # scales are float32: quantize with the value that is stored
    v = xr / scale[:, None]
    if spec.scheme == "int8":
        v = torch.round(v)
        if zero is not None:
            v = v + zero[:, None]
        q = v.clamp(-128 if zero is not None else -127, 127).to(torch.int8)
    else:
        qmax = QMAX[spec.scheme]
        q = v.clamp(-qmax, qmax).to(QUANT_DTYPES[spec.scheme])
    if spec.granularity == "group":
        g = _cdiv(k, spec.group_size)
        q = q.reshape(m, g * spec.group_size)[:, :k]
        scale = scale.reshape(m, g)
    elif spec.granularity == "token":
        scale = scale.reshape(m, 1)
        zero = None if zero is None else zero.reshape(m, 1)
    else:
        q = q.reshape(m, k)
    return q.contiguous(), scale.float(), None if zero is None else zero.to(torch.int32)


def quantize_reference(spec: QuantizeSpec, x: torch.Tensor):
    """``(q, scale, zero | None)`` by the rule of the module docstring, computed in float64 from ``x`` [..., K]."""
    k = x.shape[-1]
    q, s, z = _quantize(x.reshape(-1, k), spec, torch.float64)
    lead = x.shape[:-1]
    if spec.granularity != "tensor":
        s = s.reshape(*lead, s.shape[-1])
        z = None if z is None else z.reshape(*lead, 1)
    return q.reshape(x.shape), s, z


def _quantize_native(spec: QuantizeSpec) -> Callable:
    def quantize_native(x_MK, q_out_MK, scale_out, zero_out):
        q, s, z = _quantize(x_MK, spec, torch.float32)
        q_out_MK.copy_(q)
        scale_out.copy_(s)
        if zero_out is not None:
            zero_out.copy_(z)

    return quantize_native


class QuantizeActivation(Op):
    """``(x_q, scale, zero) = quantize(x[..., K])``: dynamic (per call) quantization of activations for a
    :class:`ScaledGemm` of the same scheme and granularity (``zero`` is ``None`` when symmetric)."""

    name = "quantize_activation"
    spec_type = QuantizeSpec
    __slots__ = ()

    @classmethod
    def check_spec(cls, spec: QuantizeSpec) -> None:
        op = "quantize_activation"
        if spec.dtype not in FLOAT_DTYPES:
            raise InvalidArgumentError(op, "spec.dtype", "one of float32, float16, bfloat16", dtype_name(spec.dtype))
        _choice(op, "spec.scheme", spec.scheme, SCHEMES)
        _choice(op, "spec.granularity", spec.granularity, ACT_GRANULARITIES)
        _flag(op, "spec.symmetric", spec.symmetric)
        _positive(op, "spec.group_size", spec.group_size, optional=False)
        if not spec.symmetric and (spec.scheme != "int8" or spec.granularity == "group"):
            raise InvalidArgumentError(op, "spec.symmetric", "True for fp8 schemes and group scales (zero points "
                                       "exist for int8 per-tensor or per-token)", "False")

    @classmethod
    def native(cls, spec: QuantizeSpec) -> Callable:
        return _quantize_native(spec)

    reference = staticmethod(quantize_reference)

    def __call__(self, x: torch.Tensor, out: Optional[torch.Tensor] = None):
        s, op = self.spec, self.name
        check_tensor(op, "x", x, dtypes=(s.dtype,))
        if x.dim() < 1:
            raise InvalidArgumentError(op, "x", "a tensor of at least 1 dim [..., K]", "a 0-d tensor")
        if not x.is_contiguous():
            x = x.contiguous()
        dev = x.device
        lead, k = tuple(x.shape[:-1]), x.shape[-1]
        m = 1
        for d in lead:
            m *= d
        qdt = QUANT_DTYPES[s.scheme]
        if out is None:
            out = torch.empty(x.shape, dtype=qdt, device=dev)
        else:
            check_tensor(op, "out", out, shape=tuple(x.shape), dtypes=(qdt,), device=dev)
            if not out.is_contiguous():
                raise InvalidArgumentError(op, "out", "a contiguous tensor", "a strided view")
        if s.granularity == "tensor":
            sshape = (1,)
        elif s.granularity == "token":
            sshape = (*lead, 1)
        else:
            sshape = (*lead, _cdiv(k, s.group_size))
        scale = torch.empty(sshape, dtype=torch.float32, device=dev)
        zero = None if s.symmetric else torch.empty(sshape, dtype=torch.int32, device=dev)
        if m == 0 or k == 0:
            scale.fill_(1.0)
            if zero is not None:
                zero.zero_()
            return out, scale, zero
        ss = scale if s.granularity == "tensor" else scale.view(m, sshape[-1])
        zz = None if zero is None else (zero if s.granularity == "tensor" else zero.view(m, 1))
        self.kernel(x.reshape(m, k), out.view(m, k), ss, zz)
        return out, scale, zero
