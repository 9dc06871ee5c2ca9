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

__all__ = ["GemmSpec", "GemmCapability", "Gemm", "gemm_reference", "GroupedGemmSpec", "GroupedGemmCapability",
           "GroupedGemm", "grouped_gemm_reference", "GROUPED_GEMM_MODES"]


def _check_flag(op: str, name: str, v: object) -> None:
    if not isinstance(v, bool):
        raise InvalidArgumentError(op, name, "a bool", repr(v))


def _check_features(op: str, spec: object) -> None:
    for name in ("in_features", "out_features"):
        v = getattr(spec, name)
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v <= 0):
            raise InvalidArgumentError(op, f"spec.{name}", "a positive int or None", repr(v))


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
    """``y[..., N] = x[..., K] @ weight[N, K].T (+ bias[N])``.

    Layouts: ``x`` and ``weight`` may be any strided views (kernels take row strides and copy a non-unit last
    stride themselves); ``bias`` must be contiguous and a strided one is **rejected** naming ``bias`` (kernels
    read it as a dense [N] array; it is a weight, made contiguous once at load rather than copied on every call);
    ``out`` must be contiguous.
    """

    name = "gemm"
    spec_type = GemmSpec
    __slots__ = ("_dt", "_out_dt", "_k", "_n", "_bias")

    @classmethod
    def check_spec(cls, spec: GemmSpec) -> None:
        """Every field is checked here, at build, so a spec no call could honour never reaches selection: a
        string or integer ``out_dtype`` would otherwise fail (or silently produce integers) on the first call."""
        if spec.dtype not in FLOAT_DTYPES:
            raise InvalidArgumentError("gemm", "spec.dtype", "one of float32, float16, bfloat16",
                                       dtype_name(spec.dtype), "Quantized GEMMs are a separate op")
        if spec.out_dtype is not None and spec.out_dtype not in FLOAT_DTYPES:
            raise InvalidArgumentError("gemm", "spec.out_dtype", "None or one of float32, float16, bfloat16 (a "
                                       "torch.dtype)", repr(spec.out_dtype),
                                       "Pass a torch.dtype such as torch.float16; quantized outputs are a separate op")
        _check_flag("gemm", "spec.has_bias", spec.has_bias)
        _check_features("gemm", spec)

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
            ok = (x.dtype == dt and weight.dtype == dt and len(ws) == 2 and xs[-1] == ws[1] and dev == weight.device
                  and (self._k is None or ws[1] == self._k) and (self._n is None or ws[0] == self._n))
        except (AttributeError, IndexError):
            ok = False
        if not ok:
            self._fail(x, weight)
        n = ws[0]
        if bias is not None:
            try:
                ok = (self._bias and bias.dtype == dt and bias.shape == (n,) and bias.device == dev
                      and bias.is_contiguous())
            except AttributeError:
                ok = False
            if not ok:
                self._fail_bias(x, weight, bias)
        elif self._bias:
            raise InvalidArgumentError("gemm", "bias", "a tensor [N] (spec.has_bias is True)", "None")
        if out is None:
            if len(xs) == 2:
                out = torch.empty((xs[0], n), dtype=self._out_dt, device=dev)
                self.kernel(x, weight, bias, out)
                return out
            out = torch.empty((*xs[:-1], n), dtype=self._out_dt, device=dev)
        elif len(xs) == 2:  # the common case, checked without building tuples
            try:
                os_ = out.shape
                ok = (len(os_) == 2 and os_[0] == xs[0] and os_[1] == n and out.dtype == self._out_dt
                      and out.device == dev and out.is_contiguous())
            except AttributeError:
                ok = False
            if not ok:
                self._fail_out(xs, out, n, dev)
            self.kernel(x, weight, bias, out)
            return out
        else:
            try:
                os_ = out.shape
                ok = (out.dtype == self._out_dt and os_[-1] == n and os_[:-1] == xs[:-1]
                      and out.device == dev and out.is_contiguous())
            except (AttributeError, IndexError):
                ok = False
            if not ok:
                self._fail_out(xs, out, n, dev)
        if len(xs) == 2:
            self.kernel(x, weight, bias, out)
        else:
            self.kernel(x.reshape(-1, xs[-1]), weight, bias, out.view(-1, n))
        return out

    def _fail_out(self, xs: torch.Size, out: object, n: int, dev: torch.device) -> None:
        check_tensor("gemm", "out", out, shape=(*xs[:-1], n), dtypes=(self._out_dt,), device=dev)
        raise InvalidArgumentError("gemm", "out", "a contiguous tensor", "a strided view")

    def _fail_bias(self, x: torch.Tensor, weight: torch.Tensor, bias: object) -> None:
        if not self.spec.has_bias:
            raise InvalidArgumentError("gemm", "bias", "None (spec.has_bias is False)", "a tensor")
        check_tensor("gemm", "bias", bias, shape=(weight.shape[0],), dims="N", dtypes=(self.spec.dtype,),
                     device=x.device)
        raise InvalidArgumentError("gemm", "bias", "a contiguous tensor [N] (unit stride)",
                                   f"a strided view (stride {tuple(bias.stride())})",
                                   "Make the bias contiguous once when the layer is loaded (bias.contiguous())")

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


# ------------------------------------------------------------------------------------------------------------------
# Grouped GEMM (mixture-of-experts): every row of x is multiplied by the weight of its own expert.
#
# Shape legend: M rows, K input features, N output features, E experts (groups).
#
# Kernel contract::
#
#     kernel(x_MK, w_ENK, groups, out_MN) -> out_MN
#
# ``groups`` is ``expert_ids_M`` (mode "ids": row m uses ``w_ENK[expert_ids_M[m]]``) or ``group_sizes_E``
# (mode "segments": rows are sorted by expert, the first ``group_sizes_E[0]`` rows use expert 0, the next
# ``group_sizes_E[1]`` expert 1, ...; they sum to M). ``out_MN`` is preallocated and must be fully written.
# ------------------------------------------------------------------------------------------------------------------

GROUPED_GEMM_MODES = ("ids", "segments")


@dataclass(frozen=True)
class GroupedGemmSpec:
    """A grouped GEMM as an MoE layer is built.

    :param dtype: dtype of ``x``, ``weight`` and ``out``.
    :param num_experts: E, the number of weight matrices.
    :param mode: ``"ids"`` (an expert id per row) or ``"segments"`` (rows sorted by expert, sizes per expert).
    :param in_features: K, when known at build time (checked on every call).
    :param out_features: N, when known at build time (checked on every call).
    """

    dtype: torch.dtype = torch.float32
    num_experts: int = 1
    mode: str = "segments"
    in_features: Optional[int] = None
    out_features: Optional[int] = None

    def __str__(self) -> str:
        return (f"grouped_gemm(dtype={dtype_name(self.dtype)}, E={self.num_experts}, mode={self.mode}, "
                f"K={self.in_features}, N={self.out_features})")


@dataclass(frozen=True)
class GroupedGemmCapability(OpCapability):
    """:param modes: the group encodings the kernel accepts; :param max_experts: None means unbounded."""

    modes: FrozenSet[str] = frozenset(GROUPED_GEMM_MODES)
    max_experts: Optional[int] = None

    def not_supported_reasons(self, spec: GroupedGemmSpec) -> List[str]:
        reasons = super().not_supported_reasons(spec)
        if spec.mode not in self.modes:
            reasons.append(f"mode {spec.mode!r} not in supported modes {sorted(self.modes)}")
        if self.max_experts is not None and spec.num_experts > self.max_experts:
            reasons.append(f"num_experts {spec.num_experts} exceeds the maximum {self.max_experts}")
        return reasons


def _group_ids(groups: torch.Tensor, mode: str, rows: int) -> torch.Tensor:
    """The expert id of every row (int64), whatever the encoding."""
    if mode == "ids":
        return groups.long()
    return torch.repeat_interleave(torch.arange(groups.numel(), device=groups.device), groups.long(),
                                   output_size=rows)


def grouped_gemm_reference(x: torch.Tensor, weight: torch.Tensor, groups: torch.Tensor,
                           mode: str = "segments") -> torch.Tensor:
    """The float64 oracle: ``out[m] = x[m] @ weight[expert(m)].T``, in float64."""
    ids_M = _group_ids(groups, mode, x.shape[0])
    w_MNK = weight.double()[ids_M]
    return torch.einsum("mk,mnk->mn", x.double(), w_MNK)


def _grouped_native(spec: GroupedGemmSpec) -> Callable:
    mode = spec.mode

    def grouped_gemm_native(x_MK, w_ENK, groups, out_MN):
        if mode == "ids":
            ids_M = groups.long()
            order = torch.argsort(ids_M, stable=True)
            sizes = torch.bincount(ids_M, minlength=w_ENK.shape[0]).tolist()
            x_sorted = x_MK[order]
        else:
            order = None
            sizes = groups.tolist()
            x_sorted = x_MK
        y_sorted = torch.empty_like(out_MN) if order is not None else out_MN
        start = 0
        for e, n in enumerate(sizes):
            if n:
                torch.mm(x_sorted[start:start + n], w_ENK[e].t(), out=y_sorted[start:start + n])
                start += n
        if order is not None:
            out_MN[order] = y_sorted
        return out_MN

    return grouped_gemm_native


class GroupedGemm(Op):
    """``out[m, :] = x[m, :] @ weight[e(m)].T`` for an [M, K] x and an [E, N, K] weight stack.

    ``groups`` is an expert id per row (``mode="ids"``, [M]) or the row count of each expert with rows sorted by
    expert (``mode="segments"``, [E], summing to M). Group values are checked (ids in range, sizes summing to M):
    a wrong id would read another expert's weights, so this check costs one host read per call. A strided
    ``groups`` view is **copied** to a contiguous tensor before the kernel runs (kernels index it as a dense
    array; it is small and changes every call).
    """

    name = "grouped_gemm"
    spec_type = GroupedGemmSpec
    __slots__ = ("_dt", "_e", "_k", "_n", "_mode")

    @classmethod
    def check_spec(cls, spec: GroupedGemmSpec) -> None:
        if spec.dtype not in FLOAT_DTYPES:
            raise InvalidArgumentError("grouped_gemm", "spec.dtype", "one of float32, float16, bfloat16",
                                       dtype_name(spec.dtype))
        e = spec.num_experts
        if isinstance(e, bool) or not isinstance(e, int) or e <= 0:
            raise InvalidArgumentError("grouped_gemm", "spec.num_experts", "a positive int", repr(e))
        if not isinstance(spec.mode, str) or spec.mode not in GROUPED_GEMM_MODES:
            raise InvalidArgumentError("grouped_gemm", "spec.mode", f"one of {GROUPED_GEMM_MODES}", repr(spec.mode))
        _check_features("grouped_gemm", spec)

    @classmethod
    def native(cls, spec: GroupedGemmSpec) -> Callable:
        return _grouped_native(spec)

    reference = staticmethod(grouped_gemm_reference)

    def __init__(self, spec: GroupedGemmSpec, kernel: Callable, selection=None) -> None:
        super().__init__(spec, kernel, selection)
        self._dt = spec.dtype
        self._e = spec.num_experts
        self._k = spec.in_features
        self._n = spec.out_features
        self._mode = spec.mode

    def __call__(self, x: torch.Tensor, weight: torch.Tensor, groups: torch.Tensor,
                 out: Optional[torch.Tensor] = None) -> torch.Tensor:
        op, dt, e = "grouped_gemm", self._dt, self._e
        check_tensor(op, "weight", weight, shape=(e, self._n, self._k), dims="E, N, K", dtypes=(dt,))
        dev = weight.device
        k = weight.shape[2]
        n = weight.shape[1]
        check_tensor(op, "x", x, shape=(None, k), dims="M, K", dtypes=(dt,), device=dev)
        m = x.shape[0]
        if self._mode == "ids":
            check_tensor(op, "groups", groups, shape=(m,), dims="M (an expert id per row)",
                         dtypes=(torch.int32, torch.int64), device=dev)
            if m:
                lo, hi = (int(v) for v in torch.aminmax(groups))
                if lo < 0 or hi >= e:
                    raise InvalidArgumentError(op, "groups", f"expert ids in [0, {e})", f"ids in [{lo}, {hi}]")
        else:
            check_tensor(op, "groups", groups, shape=(e,), dims="E (rows per expert)",
                         dtypes=(torch.int32, torch.int64), device=dev)
            sizes = groups.tolist()
            if min(sizes) < 0 or sum(sizes) != m:
                raise InvalidArgumentError(op, "groups", f"non-negative sizes summing to M = {m}",
                                           f"sizes {sizes[:16]} (sum {sum(sizes)})")
        if not groups.is_contiguous():  # kernels read groups as a dense array: a small per-call copy
            groups = groups.contiguous()
        if out is None:
            out = torch.empty((m, n), dtype=dt, device=dev)
        else:
            check_tensor(op, "out", out, shape=(m, n), dims="M, N", dtypes=(dt,), device=dev)
            if not out.is_contiguous():
                raise InvalidArgumentError(op, "out", "a contiguous tensor", "a strided view")
        if m:
            self.kernel(x, weight, groups, out)
        return out
