"""The conformance suite's one table of tolerances, the error model behind it, and the rule every comparison follows.

**The rule.** A backend's output ``out`` (cast to float64) matches the float64 reference ``ref`` when, for every
element ``i``,

    |out_i - ref_i| <= atol + rtol * |ref_i| + allowance_i

A NaN or an infinity the reference does not have fails the case (outputs are poisoned with NaN before the call,
so an element the kernel never wrote fails too). ``allowance_i`` is a per-element bound the case's reference
computes from the *magnitudes* that fed element ``i`` (see below) and attaches to the reference tensor with
:func:`with_allowance`; a reference without one gets none. The report gives the largest absolute error and the
bound at that same element; a failing case's reason names the worst offending element (largest ``err / bound``).

**The error model (what the contract promises).** The inputs are already in the dtype and the reference upcasts
those very values, so a correct kernel's error has three sources only. Let ``u`` be the unit roundoff of a dtype
(half the spacing of floats at 1): fp32 ``2**-24`` ~ 5.96e-8, fp16 ``2**-11`` ~ 4.88e-4, bf16 ``2**-8`` ~ 3.91e-3.

1. *The final rounding of the output to its dtype*: at most ``u_out * |ref|`` -> ``rtol = u_out``. Below the
   smallest normal number the spacing stops shrinking -> ``atol = u_out * smallest_normal`` (fp16: 3e-9).
2. *fp32 accumulation* (the contract: every reduction accumulates in fp32, whatever the dtype). Summing ``n``
   terms in fp32 errs by at most ``n * u32 * sum |term|`` and, in practice, like a random walk:
   ``sqrt(n) * u32 * sum |term|`` (Higham & Mary, "A new approach to probabilistic rounding error analysis",
   2019). Because of cancellation this scales with the *magnitude summed* (``|x| @ |w|^T`` for a GEMM), not
   with ``|ref|`` -- which is why it is a per-element allowance: ``acc * acc_mag_i`` with ``acc = c * u32``
   and ``acc_mag_i = sum over the reductions of sqrt(length) * magnitude summed``.
3. *Roundings to the dtype the contract allows mid-way*: ``mid * mid_mag_i`` with ``mid = k * u_dtype``.
   Attention: flash-style kernels round the probabilities to the dtype before the second matmul, an error of at
   most ``u * sum_j p_j |v_j|``; a kernel whose Q.K GEMM returns the scores in the dtype (Hugging Face's eager
   attention, torch's math SDPA) rounds each score ``s_j`` once more, moving the output by at most
   ``2u * max_j |s_j| * sum_j p_j |v_j|``. Norms: one intermediate rounding (the fused residual sum rounded before it is
   normalised, and ``x * rstd`` rounded before the weight), at most ``2u * (|x_hat * w| + |b|)``. Rotary: the
   cos/sin and the two products in the dtype (as Hugging Face's models do), at most ``2u * (|x1 cos| + |x2 sin|)``.
   Activations: ``act(a)`` rounded before the product, at most ``u * |ref|``. Below the smallest normal number
   each rounding errs by up to ``u * smallest_normal``, so ``atol = (1 + roundings mid-way) * u * smallest_normal``.

Nothing else is allowed: in particular no accumulation in the half type (a bf16 accumulator errs by about
``sqrt(K / chunk) * u_bf16 * |partial sums|``, many times ``u_bf16 * |ref|``), no growth of the *relative* bound
with K. The old table (kept in :data:`OLD_TABLE` for the record) let both bounds grow with ``sqrt(K / 64)`` in the
half types, so a kernel accumulating in bf16 passed every case.

``c`` (the ``acc`` coefficient in units of ``u32``) is 4: the probabilistic bound holds with overwhelming
probability for ``c`` of 2-3 and the fp32 accumulation term is tiny beside the half types' final rounding anyway.
For fp32 itself the whole bound is that term plus ``u32 * |ref|``; the built-in fp32 kernels' measured error uses
less than half of it (docs/conformance.md, "Tolerances").

**Exact classes.** ``copy`` and ``collective_copy`` (data movement) must be bit-exact. ``exact`` is for cases
whose inputs are small integers and powers of two (:mod:`anyaccel.conformance.ops.gemm`'s exact cases): every
partial sum of a correct fp32-accumulating kernel is an exact integer below ``2**24``, so only the final rounding
remains and any semantic deviation (a dropped term, a half-type accumulator, a wrong expert) shows even in bf16.

``collective_sum`` (all_reduce, reduce_scatter: ``world_size`` terms summed in the dtype, no fp32 accumulator
promised) keeps absolute bounds, scaled by ``sqrt(world_size / 2)``; its cases carry no allowance. The bounds of
whole models live with the model suite (``conformance/models.py``), not here.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, Optional, Sequence, Tuple

import torch

from ..core.validation import dtype_name

__all__ = ["Tolerance", "TABLE", "OLD_TABLE", "CLASSES", "UNIT_ROUNDOFF", "tolerance", "allowance",
           "with_allowance", "allowance_of", "Comparison", "compare", "describe_table"]

_F32, _F16, _BF16 = torch.float32, torch.float16, torch.bfloat16

#: ``u`` per dtype: half the spacing of the floating-point numbers at 1.
UNIT_ROUNDOFF: Dict[torch.dtype, float] = {_F32: 2.0 ** -24, _F16: 2.0 ** -11, _BF16: 2.0 ** -8}

#: The ``acc`` coefficient, ``c * u32`` (see the module docstring).
_ACC = 4 * UNIT_ROUNDOFF[_F32]


@dataclass(frozen=True)
class Tolerance:
    """One entry of the table: ``bound_i = atol + rtol * |ref_i| + acc * acc_mag_i + mid * mid_mag_i``.

    :param atol: absolute floor (the dtype's rounding below its smallest normal number; 0 for exact classes).
    :param rtol: times ``|ref|``: the final rounding of the output (``u`` of the output dtype).
    :param acc: times the case's ``acc_mag`` (``sqrt(length) * magnitude summed``): fp32 accumulation, ``c * u32``.
    :param mid: times the case's ``mid_mag``: the roundings to the dtype the contract allows mid-way.
    :param ref_len: ``> 0`` only for ``collective_sum``: ``atol``/``rtol`` grow with ``sqrt(n / ref_len)``.
    """

    atol: float
    rtol: float
    acc: float = 0.0
    mid: float = 0.0
    ref_len: int = 0

    def at(self, reduction: int) -> Tuple[float, float]:
        """``(atol, rtol)`` for a case whose longest reduction is ``reduction`` elements."""
        if self.ref_len <= 0 or reduction <= self.ref_len:
            return self.atol, self.rtol
        f = math.sqrt(reduction / self.ref_len)
        return self.atol * f, self.rtol * f


def _model(dtype: torch.dtype, mid_units: float = 0.0, acc: float = _ACC) -> Tolerance:
    """The error model's entry for ``dtype``: final rounding, fp32 accumulation, ``mid_units`` roundings mid-way."""
    u = UNIT_ROUNDOFF[dtype]
    # below the smallest normal number each rounding errs by up to u * smallest_normal, the final one and each
    # one mid-way
    return Tolerance(atol=(1 + mid_units) * u * torch.finfo(dtype).smallest_normal, rtol=u, acc=acc,
                     mid=mid_units * u)


def _row(mid_units: float = 0.0, acc: float = _ACC) -> Dict[torch.dtype, Tolerance]:
    return {dt: _model(dt, mid_units, acc) for dt in (_F32, _F16, _BF16)}


_EXACT = Tolerance(0.0, 0.0)
#: no absolute or relative part: the quantize cases carry their whole bound as an allowance
_EXACT_Q = Tolerance(0.0, 0.0)

#: ``TABLE[op_class][dtype]`` -- the single source of every bound the op suite applies (see the module docstring
#: for the model; ``mid_mag``/``acc_mag`` are computed per element by each case's reference).
TABLE: Dict[str, Dict[torch.dtype, Tolerance]] = {
    # y = x @ w.T + b. acc_mag = sqrt(K) * (|x| @ |w|^T + |b|); nothing rounded mid-way.
    "gemm": _row(),
    # y = x @ dequantize(w).T + b (weight-only quantized). Dequantization is exact; the contract allows the
    # dequantized weight, its scale and its offset to be rounded to the activation dtype once before the product
    # (tensor cores and torch's packed CPU kernels need it): mid_mag = |x| @ (|w| + |offset|)^T, 2 roundings.
    # acc_mag = sqrt(K) * (|x| @ |w|^T + |b|) as for gemm.
    "weight_only": _row(mid_units=2.0),
    # out = softmax(s) v. mid_mag = (1 + 2 max|s_j|) sum_j p_j |v_j| (probabilities and scores rounded once);
    # acc_mag = (sqrt(L) + 2 sqrt(D) * max_j |scale| |q| . |k_j|) * sum_j p_j |v_j| (P.V and Q.K in fp32).
    "attention": _row(mid_units=1.0),
    # rms_norm / layer_norm. mid_mag = |x_hat * w| + |b| (two roundings mid-way: the fused residual sum, and
    # x * rstd before the weight); acc_mag = sqrt(H) * the magnitudes summed (layer_norm: (|x| + |mean|) rstd |w|).
    "norm": _row(mid_units=2.0),
    # x1 cos - x2 sin. mid_mag = |x1 cos| + |x2 sin| (cos/sin and the products in the dtype); acc_mag = mid_mag.
    "rotary": _row(mid_units=2.0),
    # act(a) * b. mid_mag = |ref| (act(a) rounded before the product); acc_mag = |ref| (the transcendental),
    # plus |a * b| for gelu (1 + erf(a / sqrt 2) cancels in the negative tail).
    "activation": _row(mid_units=1.0),
    # scaled_gemm (w8a8): dequantization is exact (8-bit values times float32 scales, in float64), so the model is
    # the dense GEMM's on the dequantized operands: output rounding, plus acc_mag = sqrt(K) * (|x_hat| @ |w_hat|^T
    # + |b|) for the fp32 accumulation (int8 accumulates exactly in int32 and spends the term on the float32
    # conversion and the two scale products instead). Nothing rounded mid-way.
    "scaled_gemm": _row(),
    # quantize_activation: the result is compared dequantized, against the input; every bound is the case's
    # per-element allowance (half a quantization step of the reference scale, plus 4 u32 of the float32 scale).
    "quantize": {_F32: _EXACT_Q, _F16: _EXACT_Q, _BF16: _EXACT_Q},
    # small integers and powers of two: a correct kernel is exact up to the final rounding (no allowance).
    "exact": {dt: Tolerance(UNIT_ROUNDOFF[dt] * torch.finfo(dt).smallest_normal, UNIT_ROUNDOFF[dt])
              for dt in (_F32, _F16, _BF16)},
    # reshape_and_cache and other data movement: bit-exact.
    "copy": {_F32: _EXACT, _F16: _EXACT, _BF16: _EXACT},
    # all_reduce / reduce_scatter: world_size terms summed in the dtype (no fp32 accumulator guaranteed).
    "collective_sum": {
        _F32: Tolerance(1e-6, 1e-6, ref_len=2),
        _F16: Tolerance(1e-3, 2e-3, ref_len=2),
        _BF16: Tolerance(8e-3, 1.6e-2, ref_len=2),
    },
    # all_gather, broadcast, send/recv, all_to_all: bit-exact.
    "collective_copy": {_F32: _EXACT, _F16: _EXACT, _BF16: _EXACT},
}

CLASSES = tuple(TABLE)

#: The table this model replaced, as ``(atol, rtol, ref_len)`` with both bounds times ``sqrt(n / ref_len)`` for
#: reductions longer than ``ref_len``: kept so the report and docs can show old and new side by side.
OLD_TABLE: Dict[str, Dict[torch.dtype, Tuple[float, float, int]]] = {
    "gemm": {_F32: (1e-5, 1.3e-6, 64), _F16: (1e-3, 1e-3, 64), _BF16: (8e-3, 8e-3, 64)},
    "attention": {_F32: (2e-5, 2e-5, 256), _F16: (2e-3, 2e-3, 256), _BF16: (1.6e-2, 1.6e-2, 256)},
    "norm": {_F32: (1e-5, 2e-6, 1024), _F16: (2e-3, 2e-3, 1024), _BF16: (1.6e-2, 1.6e-2, 1024)},
    "rotary": {_F32: (1e-5, 2e-6, 0), _F16: (1e-3, 2e-3, 0), _BF16: (8e-3, 1.6e-2, 0)},
    "activation": {_F32: (1e-5, 2e-6, 0), _F16: (1e-3, 2e-3, 0), _BF16: (8e-3, 1.6e-2, 0)},
}


def _entry(op_class: str, dtype: torch.dtype) -> Optional[Tolerance]:
    if not (dtype.is_floating_point or dtype.is_complex):
        return None
    try:
        row = TABLE[op_class]
    except KeyError:
        raise KeyError(f"unknown tolerance class {op_class!r}; known: {', '.join(CLASSES)}") from None
    return row.get(dtype, row[_F32])  # e.g. a float64 output: held to the fp32 bound


def tolerance(op_class: str, dtype: torch.dtype, reduction: int = 0) -> Tuple[float, float]:
    """``(atol, rtol)`` for ``op_class`` at ``dtype`` (``reduction`` matters to ``collective_sum`` only).

    The per-element part of a bound is :func:`allowance`. An integer dtype is compared exactly. Raises
    ``KeyError`` naming the known classes for an unknown class.
    """
    e = _entry(op_class, dtype)
    return (0.0, 0.0) if e is None else e.at(max(int(reduction), 0))


def allowance(op_class: str, dtype: torch.dtype, mid_mag: Optional[torch.Tensor] = None,
              acc_mag: Optional[torch.Tensor] = None) -> Optional[torch.Tensor]:
    """The per-element part of the bound: ``mid * mid_mag + acc * acc_mag`` from ``TABLE[op_class][dtype]``.

    ``dtype`` is the dtype of the output being compared. Returns ``None`` when there is nothing to add.
    """
    e = _entry(op_class, dtype)
    if e is None:
        return None
    out = None
    for coef, mag in ((e.mid, mid_mag), (e.acc, acc_mag)):
        if mag is not None and coef:
            term = coef * mag.detach().to(torch.float64).abs()
            out = term if out is None else out + term
    return out


_ALLOWANCE_ATTR = "_anyaccel_allowance"


def with_allowance(ref: torch.Tensor, extra: Optional[torch.Tensor]) -> torch.Tensor:
    """Attach the per-element allowance ``extra`` (same shape as ``ref``) to the reference tensor ``ref``.

    :func:`compare` adds it to the bound. This rides on the reference itself so every caller of a case's
    ``reference`` (the runner, a backend's own tests) gets it without a new argument.
    """
    if extra is not None:
        if tuple(extra.shape) != tuple(ref.shape):
            raise ValueError(f"allowance shape {list(extra.shape)} differs from the reference's {list(ref.shape)}")
        setattr(ref, _ALLOWANCE_ATTR, extra)
    return ref


def allowance_of(ref: torch.Tensor) -> Optional[torch.Tensor]:
    """The allowance attached to ``ref`` by :func:`with_allowance`, or ``None``."""
    return getattr(ref, _ALLOWANCE_ATTR, None)


@dataclass(frozen=True)
class Comparison:
    """The outcome of comparing a case's outputs with the reference.

    :param passed: every element within ``atol + rtol * |ref|`` and no unexpected non-finite value.
    :param max_abs_err: the largest ``|out - ref|`` (``inf`` when a non-finite value appeared).
    :param tolerance: ``atol + rtol * |ref|`` at the element of ``max_abs_err``.
    :param reason: "" on a pass, otherwise what failed and where.
    """

    passed: bool
    max_abs_err: float
    tolerance: float
    reason: str = ""
    bad: int = 0
    total: int = 0


def _index(flat_index: int, shape: Sequence[int]) -> Tuple[int, ...]:
    idx = []
    for s in reversed(list(shape)):
        idx.append(flat_index % s if s else 0)
        flat_index = flat_index // s if s else 0
    return tuple(reversed(idx))


def compare(outs: Sequence[torch.Tensor], refs: Sequence[torch.Tensor], atol: float, rtol: float,
            names: Optional[Sequence[str]] = None) -> Comparison:
    """Compare each ``outs[i]`` (any dtype, any device) with ``refs[i]`` (float64) under the rule above.

    The per-element allowance attached to ``refs[i]`` by :func:`with_allowance`, if any, is added to the bound.
    """
    if len(outs) != len(refs):
        return Comparison(False, math.inf, atol, f"the case returned {len(outs)} outputs but the reference "
                                                f"{len(refs)}")
    names = list(names) if names is not None else [f"output {i}" for i in range(len(outs))]
    worst_err, worst_tol = 0.0, atol
    problems = []
    bad_total = total = 0
    for name, out, ref in zip(names, outs, refs):
        out64 = out.detach().cpu().to(torch.float64)
        ref64 = ref.detach().cpu().to(torch.float64)
        if out64.shape != ref64.shape:
            return Comparison(False, math.inf, atol, f"{name}: shape {list(out64.shape)} differs from the "
                                                     f"reference's {list(ref64.shape)}")
        n = out64.numel()
        total += n
        if n == 0:
            continue
        bound = atol + rtol * ref64.abs()
        extra = allowance_of(ref)
        if extra is not None:
            bound = bound + extra.detach().cpu().to(torch.float64).reshape(bound.shape)
        err = (out64 - ref64).abs()
        # a non-finite output where the reference is finite (NaN poison left in place, overflow) is an
        # infinite error; identical infinities (a reference that is itself inf) count as equal
        same_inf = torch.isinf(out64) & (out64 == ref64)
        err = torch.where(same_inf, torch.zeros_like(err), err)
        err = torch.nan_to_num(err, nan=math.inf, posinf=math.inf)
        bad = err > bound
        nbad = int(bad.sum())
        bad_total += nbad
        flat_err = err.reshape(-1)
        i = int(torch.argmax(flat_err))
        e = float(flat_err[i])
        if e > worst_err or (e == worst_err and worst_err == 0.0 and not problems):
            worst_err, worst_tol = e, float(bound.reshape(-1)[i])
        if nbad:
            ratio = (err / bound.clamp_min(1e-300)).reshape(-1)
            j = int(torch.argmax(ratio))
            where = _index(j, out64.shape)
            nan_count = int(torch.isnan(out64).sum()) - int(torch.isnan(ref64).sum())
            note = f" ({nan_count} NaN, e.g. elements never written)" if nan_count > 0 else ""
            plus = " + allowance" if extra is not None else ""
            problems.append(
                f"{name}: {nbad}/{n} elements outside |out - ref| <= {atol:.3g} + {rtol:.3g}*|ref|{plus}{note}; worst at "
                f"{list(where)}: out={float(out64.reshape(-1)[j]):.6g} ref={float(ref64.reshape(-1)[j]):.6g} "
                f"|diff|={float(flat_err[j]):.3g} > bound {float(bound.reshape(-1)[j]):.3g}")
    if problems:
        return Comparison(False, worst_err, worst_tol, "; ".join(problems), bad_total, total)
    return Comparison(True, worst_err, worst_tol, "", 0, total)


def describe_table() -> Dict[str, Dict[str, Dict[str, float]]]:
    """The table as JSON-friendly data (for reports)."""
    return {cls: {dtype_name(dt): {"atol": t.atol, "rtol": t.rtol, "acc": t.acc, "mid": t.mid, "ref_len": t.ref_len}
                  for dt, t in row.items()} for cls, row in TABLE.items()}
