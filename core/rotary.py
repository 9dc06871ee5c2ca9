"""Rotary position embedding (neox and gptj styles) and its scaling variants (the cos/sin cache).

Shape legend: T tokens (packed), Hq query heads, Hkv kv heads, D head size, R rotary dim (``R <= D``, even),
P max_position (rows of the cos/sin cache).

Kernel contract (what a backend's ``build(spec)`` returns; the core has validated every argument and
preallocated every output, which the conformance suite fills with NaN first)::

    rotary_embedding  kernel(positions_T, q_THqD, k_THkvD, cos_sin_cache_PR, q_out_THqD, k_out_THkvD) -> None

Inputs and outputs are 3-d with a unit stride on the last dim (``q`` may be a view of a fused qkv projection).
``q_out`` may be ``q`` and ``k_out`` may be ``k`` (in place); no other overlap is passed. The float64 reference
below is the conformance oracle.
"""
from __future__ import annotations

import math
from dataclasses import KW_ONLY, dataclass
from typing import Any, Callable, FrozenSet, List, Mapping, Optional, Tuple, Union

import torch

from ._small_ops import _check_finite_positive, _check_float_dtype, _check_positive_int, _fail_strided_weight
from .dispatch import Op, OpCapability
from .errors import InvalidArgumentError
from .validation import INDEX_DTYPES, check_tensor, dtype_name

__all__ = ["ROTARY_STYLES", "RotarySpec", "RotaryCapability", "Rotary", "RopeScaling", "ROPE_SCALING_TYPES",
           "rope_inv_freq", "rope_cos_sin_cache", "rotary_reference", "MAX_ROPE_CACHE_ELEMENTS"]

ROTARY_STYLES = ("neox", "gptj")
#: The largest cos/sin cache (``max_position * rotary_dim`` elements, 8 GiB in float32): more is no real context
#: but a typo (``max_position=10**12``) that would otherwise reach the allocator.
MAX_ROPE_CACHE_ELEMENTS = 1 << 31
ROPE_SCALING_TYPES = ("linear", "dynamic", "llama3", "yarn")


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
