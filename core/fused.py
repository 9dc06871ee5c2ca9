"""Fused small ops: RMSNorm (with a fused residual add), LayerNorm, rotary embedding, gated activations.

Shape legend: N rows (tokens, flattened over leading dims), H hidden size, T tokens (packed), Hq query heads,
Hkv kv heads, D head size, R rotary dim (``R <= D``, even), P max_position (rows of the cos/sin cache),
d the output width of a gated activation (its input is ``2d`` wide).

Kernel contracts (what a backend's ``build(spec)`` returns; the core has validated every argument and
preallocated every output, which the conformance suite fills with NaN first)::

    rms_norm          kernel(x_NH, weight_H, residual_NH | None, out_NH, residual_out_NH | None) -> out_NH
    layer_norm        kernel(x_NH, weight_H, bias_H | None, out_NH) -> out_NH
    rotary_embedding  kernel(positions_T, q_THqD, k_THkvD, cos_sin_cache_PR, q_out_THqD, k_out_THkvD) -> None
    silu_and_mul      kernel(x_N2d, out_Nd) -> out_Nd
    gelu_and_mul      kernel(x_N2d, out_Nd) -> out_Nd

Layouts the kernels may rely on: norm and activation inputs are 2-d with a unit stride on the last dim (rows may
be strided) and their outputs are contiguous. Rotary inputs and outputs are 3-d with a unit stride on the last
dim (``q`` may be a view of a fused qkv projection). Aliasing a kernel must honour: ``out`` may be ``x`` and
``residual_out`` may be ``residual`` (rms_norm, in place), ``q_out`` may be ``q`` and ``k_out`` may be ``k``
(rotary, in place); no other overlap is passed.

Half-precision norms accumulate in float32; the float64 references below are the conformance oracle.
"""
from __future__ import annotations

import math
from dataclasses import KW_ONLY, dataclass
from typing import Any, Callable, FrozenSet, List, Mapping, Optional, Tuple, Union

import torch
import torch.nn.functional as F

from .dispatch import Op, OpCapability
from .errors import InvalidArgumentError
from .validation import FLOAT_DTYPES, INDEX_DTYPES, check_tensor, dtype_name, fmt_shape

__all__ = [
    # norms
    "RMSNormSpec", "LayerNormSpec", "NormCapability", "RMSNorm", "LayerNorm",
    "rms_norm_reference", "layer_norm_reference",
    # rotary
    "ROTARY_STYLES", "RotarySpec", "RotaryCapability", "Rotary", "RopeScaling", "ROPE_SCALING_TYPES",
    "rope_inv_freq", "rope_cos_sin_cache", "rotary_reference", "MAX_ROPE_CACHE_ELEMENTS",
    # gated activations
    "GELU_APPROXIMATIONS", "GatedActivationSpec", "GatedActivationCapability", "SiluAndMul", "GeluAndMul",
    "silu_and_mul_reference", "gelu_and_mul_reference",
]

ROTARY_STYLES = ("neox", "gptj")
#: The largest cos/sin cache (``max_position * rotary_dim`` elements, 8 GiB in float32): more is no real context
#: but a typo (``max_position=10**12``) that would otherwise reach the allocator.
MAX_ROPE_CACHE_ELEMENTS = 1 << 31
ROPE_SCALING_TYPES = ("linear", "dynamic", "llama3", "yarn")
GELU_APPROXIMATIONS = ("none", "tanh")


# ----------------------------------------------------------------------------------------------------------------
# shared checks (build time; the per-call checks are inlined in each op's __call__)
# ----------------------------------------------------------------------------------------------------------------

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
# ----------------------------------------------------------------------------------------------------------------

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


# ----------------------------------------------------------------------------------------------------------------
# rotary embedding
# ----------------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class RotarySpec:
    """A rotary position embedding applied to q and k.

    :param head_size: D.
    :param rotary_dim: R, the leading dims of each head that rotate (even, ``<= D``); dims ``R:`` pass through.
    :param num_heads: Hq.
    :param num_kv_heads: Hkv (GQA/MQA: any count; rotary treats each head alike).
    :param dtype: dtype of q, k and the outputs.
    :param style: ``"neox"`` rotates halves (pairs ``(i, i + R/2)``), ``"gptj"`` rotates interleaved pairs
        ``(2i, 2i + 1)``; pair ``i`` turns by ``position * inv_freq[i]`` in both.
    :param max_position: P, the rows of the cos/sin cache (keyword-only). Every position must lie in
        ``[0, P)``: a kernel reads row ``position`` of the cache, so one outside it reads other memory. The op
        checks the range once per positions tensor (one host read, memoized across layers; see :class:`Rotary`).
        ``P * rotary_dim`` is at most ``2**31`` (:data:`MAX_ROPE_CACHE_ELEMENTS`).
    """

    head_size: int
    rotary_dim: int
    num_heads: int
    num_kv_heads: int
    dtype: torch.dtype
    style: str = "neox"
    _: KW_ONLY
    max_position: int

    def __str__(self) -> str:
        return (f"rotary_embedding(D={self.head_size}, R={self.rotary_dim}, Hq={self.num_heads}, "
                f"Hkv={self.num_kv_heads}, dtype={dtype_name(self.dtype)}, style={self.style}, "
                f"P={self.max_position})")


@dataclass(frozen=True)
class RotaryCapability(OpCapability):
    """What a rotary kernel supports.

    :param styles: the styles it implements.
    :param head_sizes: the head sizes D it accepts; ``None`` means any.
    :param partial: whether ``rotary_dim < head_size`` (pass-through tail) is supported.
    """

    styles: FrozenSet[str] = frozenset(ROTARY_STYLES)
    head_sizes: Optional[FrozenSet[int]] = None
    partial: bool = True

    def not_supported_reasons(self, spec: RotarySpec) -> List[str]:
        reasons = super().not_supported_reasons(spec)
        if spec.style not in self.styles:
            reasons.append(f"style {spec.style!r} not in supported styles {sorted(self.styles)}")
        if self.head_sizes is not None and spec.head_size not in self.head_sizes:
            reasons.append(f"head_size {spec.head_size} not in supported head sizes {sorted(self.head_sizes)}")
        if not self.partial and spec.rotary_dim != spec.head_size:
            reasons.append(f"partial rotary (rotary_dim {spec.rotary_dim} < head_size {spec.head_size}) "
                           f"not supported")
        return reasons


_SCALING_KEYS = {
    "linear": ("factor",),
    "dynamic": ("factor", "original_max_position_embeddings"),
    "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
    "yarn": ("factor", "original_max_position_embeddings"),
}


@dataclass(frozen=True)
class RopeScaling:
    """A RoPE scaling variant, as Hugging Face configs declare it (``rope_scaling`` / ``rope_parameters``).

    Scaling changes only the cos/sin cache (:func:`rope_cos_sin_cache`); the rotary op is the same.

    :param rope_type: ``"linear"`` (positions divided by ``factor``), ``"dynamic"`` (NTK-aware: the base grows
        with the sequence length; a static cache uses the frequencies HF uses once a sequence reaches the cache
        length ``max_position``), ``"llama3"`` (Llama 3.1's per-wavelength blend) or ``"yarn"`` (NTK-by-parts
        with an attention factor on cos and sin).
    :param factor: the context extension factor.
    :param original_max_position_embeddings: the pretraining context (dynamic, llama3, yarn).
    :param low_freq_factor: llama3 (1 in Llama 3.1).
    :param high_freq_factor: llama3 (4 in Llama 3.1); must exceed ``low_freq_factor``.
    :param beta_fast: yarn's extrapolation boundary (32 by default).
    :param beta_slow: yarn's interpolation boundary (1 by default).
    :param mscale: yarn: with ``mscale_all_dim``, the attention factor is
        ``get_mscale(factor, mscale) / get_mscale(factor, mscale_all_dim)``.
    :param mscale_all_dim: yarn, see ``mscale``.
    :param attention_factor: yarn: an explicit attention factor (overrides the mscale rule).
    :param truncate: yarn: round the correction range to whole dims (HF's default True).
    """

    rope_type: str
    factor: float
    original_max_position_embeddings: Optional[int] = None
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: Optional[float] = None
    mscale_all_dim: Optional[float] = None
    attention_factor: Optional[float] = None
    truncate: bool = True

    def __post_init__(self) -> None:
        op = "rope_scaling"
        if self.rope_type not in ROPE_SCALING_TYPES:
            raise InvalidArgumentError(op, "rope_type", f"one of {', '.join(ROPE_SCALING_TYPES)}",
                                       repr(self.rope_type))
        _check_finite_positive(op, "factor", self.factor)
        if self.rope_type != "linear":
            _check_positive_int(op, "original_max_position_embeddings", self.original_max_position_embeddings)
        if self.rope_type == "llama3":
            # wavelength bounds are original_max_position / factor: a zero factor divides by zero
            _check_finite_positive(op, "low_freq_factor", self.low_freq_factor)
            _check_finite_positive(op, "high_freq_factor", self.high_freq_factor)
            if not self.high_freq_factor > self.low_freq_factor:
                raise InvalidArgumentError(op, "high_freq_factor", f"> low_freq_factor ({self.low_freq_factor})",
                                           repr(self.high_freq_factor))
        if self.rope_type == "yarn":
            # the correction range is log(orig / (2 pi beta)): beta must be a finite number > 0
            _check_finite_positive(op, "beta_fast", self.beta_fast)
            _check_finite_positive(op, "beta_slow", self.beta_slow)
            for name in ("mscale", "mscale_all_dim"):
                v = getattr(self, name)
                if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v)):
                    raise InvalidArgumentError(op, name, "a finite number or None", repr(v))
            if not isinstance(self.truncate, bool):
                raise InvalidArgumentError(op, "truncate", "a bool", repr(self.truncate))
        if self.attention_factor is not None:
            _check_finite_positive(op, "attention_factor", self.attention_factor)
        try:
            a = self.attention_scaling
        except ZeroDivisionError:
            a = float("nan")
        if not (math.isfinite(a) and a > 0):
            raise InvalidArgumentError(op, "mscale_all_dim", "mscale values giving a finite attention factor > 0",
                                       f"mscale={self.mscale!r}, mscale_all_dim={self.mscale_all_dim!r} "
                                       f"(attention factor {a})")

    @property
    def attention_scaling(self) -> float:
        """The factor cos and sin are multiplied by (1 except for yarn)."""
        if self.rope_type != "yarn":
            return 1.0
        if self.attention_factor is not None:
            return float(self.attention_factor)

        def get_mscale(scale: float, m: float = 1.0) -> float:
            return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

        if self.mscale and self.mscale_all_dim:
            return get_mscale(self.factor, self.mscale) / get_mscale(self.factor, self.mscale_all_dim)
        return get_mscale(self.factor)

    @classmethod
    def from_hf(cls, params: Optional[Mapping[str, Any]],
                max_position_embeddings: Optional[int] = None) -> Optional["RopeScaling"]:
        """Map an HF ``rope_scaling`` / ``rope_parameters`` dict; ``None`` for no scaling (absent or "default").

        The type comes from ``"rope_type"`` (or the older ``"type"``). ``max_position_embeddings`` (the config's)
        stands in for a missing ``original_max_position_embeddings``, as HF does, is always the original context
        of the dynamic variant (HF scales it against the config's value), and gives yarn its factor when the dict
        has none. Unknown types and missing keys raise :class:`InvalidArgumentError` naming the key.
        """
        if not params:
            return None
        if "rope_type" not in params and "type" not in params and any(isinstance(v, Mapping) for v in params.values()):
            raise InvalidArgumentError("rope_scaling", "rope_parameters", "one flat dict with a 'rope_type' key",
                                       f"a dict nested by layer type (keys {sorted(params)})",
                                       "Map the entry of each layer type separately")
        key = "rope_type" if "rope_type" in params else "type"
        kind = params.get(key, "default")
        if kind in (None, "default"):
            return None
        if kind not in _SCALING_KEYS:
            raise InvalidArgumentError("rope_scaling", key, f"one of default, {', '.join(ROPE_SCALING_TYPES)}",
                                       repr(kind), "This RoPE variant is not implemented")
        values = {k: v for k, v in params.items() if v is not None}
        if max_position_embeddings is not None and (kind == "dynamic"
                                                    or "original_max_position_embeddings" not in values):
            # HF's dynamic NTK scales against the config's max_position_embeddings, whatever the dict says
            values["original_max_position_embeddings"] = max_position_embeddings
        if (kind == "yarn" and "factor" not in values and max_position_embeddings is not None
                and values.get("original_max_position_embeddings")):
            values["factor"] = max_position_embeddings / values["original_max_position_embeddings"]
        for k in _SCALING_KEYS[kind]:
            if k not in values:
                raise InvalidArgumentError("rope_scaling", k, f"a value for rope_type {kind!r}", "no such key")
        names = ("factor", "original_max_position_embeddings", "low_freq_factor", "high_freq_factor", "beta_fast",
                 "beta_slow", "mscale", "mscale_all_dim", "attention_factor", "truncate")
        kwargs = {k: values[k] for k in names if k in values}
        if "original_max_position_embeddings" in kwargs:
            kwargs["original_max_position_embeddings"] = int(kwargs["original_max_position_embeddings"])
        return cls(rope_type=kind, **kwargs)


def _check_cache_size(op: str, name: str, max_position: int, rotary_dim: int) -> None:
    if max_position * rotary_dim > MAX_ROPE_CACHE_ELEMENTS:
        raise InvalidArgumentError(op, name, f"max_position * rotary_dim <= 2**31 (at most "
                                   f"{MAX_ROPE_CACHE_ELEMENTS // rotary_dim} positions for rotary_dim {rotary_dim})",
                                   repr(max_position), "Use the model's real context length")


def rope_inv_freq(rotary_dim: int, base: float, scaling: Optional[RopeScaling] = None,
                  max_position: Optional[int] = None) -> Tuple[torch.Tensor, float]:
    """The per-pair inverse frequencies ``inv_freq[R/2]`` (float64, on the host) and the attention factor.

    ``max_position`` is the sequence length the dynamic (NTK) variant scales for; the others ignore it.
    """
    op = "rope_cos_sin_cache"
    _check_positive_int(op, "rotary_dim", rotary_dim)
    if rotary_dim % 2:
        raise InvalidArgumentError(op, "rotary_dim", "an even int", repr(rotary_dim))
    _check_finite_positive(op, "base", base)
    if scaling is not None and not isinstance(scaling, RopeScaling):
        raise InvalidArgumentError(op, "scaling", "a RopeScaling or None", type(scaling).__name__,
                                   "Use RopeScaling.from_hf(config.rope_scaling) to map an HF dict")
    if scaling is not None and scaling.rope_type == "yarn" and not base > 1:
        raise InvalidArgumentError(op, "base", "a number > 1 for yarn scaling (its correction range divides by "
                                   "log(base))", repr(base))
    try:
        inv, attn = _inv_freq(rotary_dim, float(base), scaling, max_position)
    except InvalidArgumentError:
        raise
    except (OverflowError, ZeroDivisionError, ValueError) as e:
        raise InvalidArgumentError(op, "scaling", "parameters giving finite frequencies",
                                   f"{scaling!r} with base {base!r} ({type(e).__name__}: {e})") from None
    if not (bool(torch.isfinite(inv).all()) and math.isfinite(attn) and attn > 0):
        raise InvalidArgumentError(op, "scaling", "parameters giving finite frequencies and attention factor",
                                   f"{scaling!r} with base {base!r}")
    return inv, attn


def _inv_freq(rotary_dim: int, base: float, scaling: Optional[RopeScaling],
              max_position: Optional[int]) -> Tuple[torch.Tensor, float]:
    op = "rope_cos_sin_cache"
    r = rotary_dim
    exponents = torch.arange(0, r, 2, dtype=torch.float64) / r              # [R/2]
    kind = scaling.rope_type if scaling is not None else None
    if kind == "dynamic":
        if r <= 2:
            raise InvalidArgumentError(op, "rotary_dim", "> 2 for dynamic NTK scaling", repr(r))
        orig = scaling.original_max_position_embeddings
        seq = orig if max_position is None else max(int(max_position), orig)
        f = scaling.factor
        base = base * ((f * seq / orig) - (f - 1)) ** (r / (r - 2))
    inv = 1.0 / (float(base) ** exponents)
    if kind is None or kind == "dynamic":
        return inv, 1.0
    if kind == "linear":
        return inv / scaling.factor, 1.0
    if kind == "llama3":
        f, lo, hi = scaling.factor, scaling.low_freq_factor, scaling.high_freq_factor
        orig = scaling.original_max_position_embeddings
        wavelen = 2 * math.pi / inv
        # long wavelengths (low frequencies) are divided by the factor, short ones kept, the middle blended
        scaled = torch.where(wavelen > orig / lo, inv / f, inv)
        smooth = (orig / wavelen - lo) / (hi - lo)
        blended = (1 - smooth) * scaled / f + smooth * scaled
        middle = (wavelen >= orig / hi) & (wavelen <= orig / lo)
        return torch.where(middle, blended, scaled), 1.0
    # yarn: interpolate the low dims (long wavelengths), extrapolate the high ones, ramp in between
    f, orig = scaling.factor, scaling.original_max_position_embeddings

    def correction_dim(rotations: float) -> float:
        return (r * math.log(orig / (rotations * 2 * math.pi))) / (2 * math.log(base))

    low, high = correction_dim(scaling.beta_fast), correction_dim(scaling.beta_slow)
    if scaling.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, r - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(r // 2, dtype=torch.float64) - low) / (high - low)).clamp(0, 1)
    extrapolate = 1 - ramp
    inv = (inv / f) * (1 - extrapolate) + inv * extrapolate
    return inv, scaling.attention_scaling


def rope_cos_sin_cache(rotary_dim: int, max_position: int, base: float, scaling: Optional[RopeScaling] = None,
                       dtype: torch.dtype = torch.float32, device: Union[torch.device, str, None] = None
                       ) -> torch.Tensor:
    """The cos/sin cache ``[max_position, rotary_dim]``: row ``p`` holds ``cos(p * inv_freq)`` in its first
    ``R/2`` entries and ``sin(p * inv_freq)`` in the rest, times yarn's attention factor. Computed in float64
    on the host, then cast and moved once."""
    _check_positive_int("rope_cos_sin_cache", "max_position", max_position)
    _check_positive_int("rope_cos_sin_cache", "rotary_dim", rotary_dim)
    _check_cache_size("rope_cos_sin_cache", "max_position", max_position, rotary_dim)
    inv_R2, attn = rope_inv_freq(rotary_dim, base, scaling, max_position)
    angles_PR2 = torch.outer(torch.arange(max_position, dtype=torch.float64), inv_R2)
    cache_PR = torch.cat((angles_PR2.cos(), angles_PR2.sin()), dim=-1)
    if attn != 1.0:
        cache_PR *= attn
    return cache_PR.to(dtype=dtype, device=device)


def rotary_reference(positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, cos_sin_cache: torch.Tensor,
                     style: str = "neox") -> Tuple[torch.Tensor, torch.Tensor]:
    """The float64 oracle: ``(q_out, k_out)``; rotary dim R is the cache's width."""
    half = cos_sin_cache.shape[1] // 2
    cs_TR = cos_sin_cache.double()[positions.long()]
    cos_T1R2, sin_T1R2 = cs_TR[:, None, :half], cs_TR[:, None, half:]

    def rotate(x: torch.Tensor) -> torch.Tensor:
        y = x.double().clone()
        if style == "neox":
            a, b = slice(0, half), slice(half, 2 * half)
        else:
            a, b = slice(0, 2 * half, 2), slice(1, 2 * half, 2)
        x1, x2 = x.double()[..., a], x.double()[..., b]
        y[..., a] = x1 * cos_T1R2 - x2 * sin_T1R2
        y[..., b] = x2 * cos_T1R2 + x1 * sin_T1R2
        return y

    return rotate(q), rotate(k)


def _rotary_native(spec: RotarySpec) -> Callable:
    r, d, half = spec.rotary_dim, spec.head_size, spec.rotary_dim // 2
    if spec.style == "neox":
        a, b = slice(0, half), slice(half, r)
    else:
        a, b = slice(0, r, 2), slice(1, r, 2)
    partial = r < d

    def rotary_native(positions_T, q_TQD, k_TKD, cache_PR, q_out_TQD, k_out_TKD):
        cs_TR = cache_PR.index_select(0, positions_T)
        cos_T1R2, sin_T1R2 = cs_TR[:, None, :half], cs_TR[:, None, half:]
        for x, out in ((q_TQD, q_out_TQD), (k_TKD, k_out_TKD)):
            x1, x2 = x[..., a].float(), x[..., b].float()
            y1 = x1 * cos_T1R2 - x2 * sin_T1R2          # both computed before any write: out may be x
            y2 = x2 * cos_T1R2 + x1 * sin_T1R2
            out[..., a] = y1
            out[..., b] = y2
            if partial and out is not x:
                out[..., r:] = x[..., r:]

    return rotary_native


# The last positions tensor whose range was read: [tensor, version counter, min, max]. Every layer of a forward
# pass gets the same positions tensor, so one host read serves them all; an in-place write bumps the version.
_POSITIONS_SEEN: List[Any] = [None, None, 0, 0]


def _position_range(positions: torch.Tensor) -> Tuple[int, int]:
    """``(min, max)`` of a non-empty positions tensor, memoized on the tensor while it is not written."""
    seen = _POSITIONS_SEEN
    try:
        version = positions._version
    except RuntimeError:  # an inference-mode tensor keeps no version counter: read it every time
        version = None
    if positions is seen[0] and version is not None and version == seen[1]:
        return seen[2], seen[3]
    lo_t, hi_t = torch.aminmax(positions)
    lo, hi = int(lo_t), int(hi_t)
    seen[:] = [positions, version, lo, hi]
    return lo, hi


class Rotary(Op):
    """Apply rotary embeddings: ``(q_out[T, Hq, D], k_out[T, Hkv, D])`` from ``positions[T]`` (int32/int64)
    and ``cos_sin_cache[max_position, rotary_dim]`` (float32, see :func:`rope_cos_sin_cache`).

    ``q_out`` may be ``q`` and ``k_out`` may be ``k`` (in place). ``q``, ``k`` and the outputs need a unit
    stride on their last dim (q and k may be views of a fused qkv projection).

    Memory safety, decided per argument (a kernel reads cache row ``positions[t]`` through raw offsets):

    - ``positions`` values must lie in ``[0, max_position)``; the range is checked before any kernel runs, with one
      host read per positions tensor: the result is memoized on the tensor (and its in-place version counter),
      so the layers of one forward pass that share the batch's positions pay one check, not one each. A strided
      ``positions`` view is **copied** to a contiguous tensor (small, per call).
    - ``cos_sin_cache`` must be contiguous: a strided one is **rejected** naming it (it is built once, by
      :func:`rope_cos_sin_cache`, which returns a contiguous tensor).
    """

    name = "rotary_embedding"
    spec_type = RotarySpec
    __slots__ = ("_dt", "_qhd", "_khd", "_cs", "_maxp")

    def __init__(self, spec: RotarySpec, kernel: Callable, selection=None) -> None:
        super().__init__(spec, kernel, selection)
        self._maxp = spec.max_position
        self._dt = spec.dtype
        self._qhd = (spec.num_heads, spec.head_size)
        self._khd = (spec.num_kv_heads, spec.head_size)
        self._cs = torch.Size((spec.max_position, spec.rotary_dim))

    @classmethod
    def check_spec(cls, spec: RotarySpec) -> None:
        op = cls.name
        _check_float_dtype(op, spec.dtype)
        for f in ("head_size", "rotary_dim", "num_heads", "num_kv_heads", "max_position"):
            _check_positive_int(op, f"spec.{f}", getattr(spec, f))
        if spec.rotary_dim % 2 or spec.rotary_dim > spec.head_size:
            raise InvalidArgumentError(op, "spec.rotary_dim", f"an even int <= head_size ({spec.head_size})",
                                       repr(spec.rotary_dim))
        if spec.style not in ROTARY_STYLES:
            raise InvalidArgumentError(op, "spec.style", f"one of {', '.join(ROTARY_STYLES)}", repr(spec.style))
        _check_cache_size(op, "spec.max_position", spec.max_position, spec.rotary_dim)

    @classmethod
    def native(cls, spec: RotarySpec) -> Callable:
        return _rotary_native(spec)

    reference = staticmethod(rotary_reference)

    def __call__(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, cos_sin_cache: torch.Tensor,
                 q_out: Optional[torch.Tensor] = None, k_out: Optional[torch.Tensor] = None
                 ) -> Tuple[torch.Tensor, torch.Tensor]:
        dt = self._dt
        try:
            qs = q.shape
            ks = k.shape
            t = qs[0]
            dev = q.device
            pd = positions.dtype
            ok = (q.dtype == dt and k.dtype == dt and qs[1:] == self._qhd and ks[1:] == self._khd and ks[0] == t
                  and len(qs) == 3 and len(ks) == 3 and positions.shape == (t,)
                  and (pd == torch.int64 or pd == torch.int32) and cos_sin_cache.dtype == torch.float32
                  and cos_sin_cache.shape == self._cs and k.device == dev and positions.device == dev
                  and cos_sin_cache.device == dev and q.stride(-1) == 1 and k.stride(-1) == 1
                  and cos_sin_cache.is_contiguous())
        except (AttributeError, IndexError, TypeError, ValueError):
            ok = False
        if not ok:
            self._fail(positions, q, k, cos_sin_cache)
        if t:
            lo, hi = _position_range(positions)
            if lo < 0 or hi >= self._maxp:
                raise InvalidArgumentError(self.name, "positions", f"values in [0, {self._maxp}) (spec.max_position, "
                                           f"the rows of cos_sin_cache)", f"values in [{lo}, {hi}]",
                                           "Build the cache and spec for the model's context length")
            if not positions.is_contiguous():
                positions = positions.contiguous()
        if q_out is None:
            q_out = torch.empty(qs, dtype=dt, device=q.device)
        elif q_out is not q:
            self._check_out("q_out", q_out, q)
        if k_out is None:
            k_out = torch.empty(ks, dtype=dt, device=k.device)
        elif k_out is not k:
            self._check_out("k_out", k_out, k)
        self.kernel(positions, q, k, cos_sin_cache, q_out, k_out)
        return q_out, k_out

    def _check_out(self, name: str, out: object, x: torch.Tensor) -> None:
        try:
            ok = (out.shape == x.shape and out.dtype == x.dtype and out.device == x.device
                  and out.stride(-1) == 1)
        except (AttributeError, IndexError):
            ok = False
        if not ok:
            heads = "Hq" if name == "q_out" else "Hkv"
            check_tensor(self.name, name, out, shape=tuple(x.shape), dims=f"T, {heads}, D", dtypes=(self._dt,),
                         device=x.device)
            raise InvalidArgumentError(self.name, name, "a unit stride on the last dim", f"stride {out.stride()}")

    def _fail(self, positions: object, q: object, k: object, cache: object) -> None:
        op, s, dt = self.name, self.spec, self._dt
        check_tensor(op, "q", q, ndim=3, dims="T, Hq, D", dtypes=(dt,))
        t = q.shape[0]
        check_tensor(op, "q", q, shape=(t, s.num_heads, s.head_size), dims="T, Hq, D")
        check_tensor(op, "k", k, shape=(t, s.num_kv_heads, s.head_size), dims="T, Hkv, D", dtypes=(dt,),
                     device=q.device)
        check_tensor(op, "positions", positions, shape=(t,), dims="T", dtypes=INDEX_DTYPES, device=q.device)
        check_tensor(op, "cos_sin_cache", cache, shape=(s.max_position, s.rotary_dim),
                     dims="max_position, rotary_dim", dtypes=(torch.float32,), device=q.device)
        for name, x in (("q", q), ("k", k)):
            if x.stride(-1) != 1:
                raise InvalidArgumentError(op, name, "a unit stride on the last dim", f"stride {x.stride()}")
        if not cache.is_contiguous():
            _fail_strided_weight(op, "cos_sin_cache", cache)
        raise InvalidArgumentError(op, "q", "valid arguments", "a combination the checks could not place")


# ----------------------------------------------------------------------------------------------------------------
# gated activations
# ----------------------------------------------------------------------------------------------------------------

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
