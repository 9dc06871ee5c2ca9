"""The conformance suite's one table of tolerances, and the rule every comparison follows.

**The rule.** A backend's output ``out`` (cast to float64) matches the float64 reference ``ref`` when, for every
element, ``|out - ref| <= atol + rtol * |ref|``. A NaN or an infinity the reference does not have fails the case
(outputs are poisoned with NaN before the call, so an element the kernel never wrote fails too). The report gives
the largest absolute error and the bound ``atol + rtol * |ref|`` at that same element, so the two numbers can be
read side by side; when a case fails, its reason names the worst offending element (largest ``err / bound``).

**Where the numbers come from.** Each entry is ``(atol, rtol, ref_len)`` per op class and dtype. Let ``u`` be
the unit roundoff of the dtype (fp32 ``2**-24`` ~ 6e-8, fp16 ``2**-11`` ~ 4.9e-4, bf16 ``2**-8`` ~ 3.9e-3).
The inputs are already in the dtype and the reference upcasts those same values, so a correct kernel's error
has two sources only:

* the final rounding of the output to the dtype: at most ``u * |ref|``, hence ``rtol`` of about ``2u`` for the
  half types (torch.testing uses 1e-3 for fp16 and 1.6e-2 for bf16, about ``2u`` and ``4u``);
* intermediate rounding in the reductions (accumulators, a softmax's probabilities cast for the second
  matmul, a norm's mean of squares). This part does not shrink with ``|ref|`` (cancellation), hence ``atol``;
  the cases draw inputs scaled so outputs are of order one (GEMM weights ~ N(0, 1/K), attention values
  ~ N(0, 1)), which is what makes an absolute bound meaningful.

Starting points were torch.testing's defaults (fp32 1.3e-6/1e-5, fp16 1e-3/1e-5, bf16 1.6e-2/1e-5 as
rtol/atol), xformers' attention-forward bounds (fp32 2e-5/3e-4, fp16 4e-4/4e-3, bf16 5e-3/2e-2) and vLLM's
paged-attention test (atol 1e-3, rtol 1e-5); they were then tightened or loosened against the measured errors of
the built-in kernels, keeping at least a few-fold margin, and checked against the planted bugs of
``tests/conformance/test_planted_bugs.py`` (a missing bias, a mask off by one, a wrong softmax scale, a shifted
block table, a dropped residual, a kernel that computes fp16 through bf16) which must all fail.

**How bounds scale with the reduction.** Rounding errors of a sum of ``n`` terms behave like a random walk:
their typical size grows like ``sqrt(n) * u`` times the terms' scale, not like the worst case ``n * u``
(Higham & Mary, "A new approach to probabilistic rounding error analysis", 2019). Each entry holds at its
``ref_len`` (the reduction length the numbers were set for); a case whose longest reduction (``OpCase.reduction``:
K for a GEMM, the context length for attention, the hidden size for a norm) is longer gets both bounds
multiplied by ``sqrt(reduction / ref_len)``; a shorter one keeps the entry's numbers (they are not tightened
below the table). Element-wise classes (``activation``, ``rotary``) and exact classes (``copy``,
``collective_copy``, where any difference is a bug) ignore the reduction.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, Optional, Sequence, Tuple

import torch

from ..core.validation import dtype_name

__all__ = ["Tolerance", "TABLE", "CLASSES", "tolerance", "Comparison", "compare"]


@dataclass(frozen=True)
class Tolerance:
    """One entry of the table.

    :param atol: absolute bound at ``ref_len``.
    :param rtol: relative bound at ``ref_len``.
    :param ref_len: the reduction length the bounds were set for; ``0`` means "does not scale".
    """

    atol: float
    rtol: float
    ref_len: int = 0

    def at(self, reduction: int) -> Tuple[float, float]:
        """``(atol, rtol)`` for a case whose longest reduction is ``reduction`` elements."""
        if self.ref_len <= 0 or reduction <= self.ref_len:
            return self.atol, self.rtol
        f = math.sqrt(reduction / self.ref_len)
        return self.atol * f, self.rtol * f


_F32, _F16, _BF16 = torch.float32, torch.float16, torch.bfloat16
_EXACT = Tolerance(0.0, 0.0, 0)

#: ``TABLE[op_class][dtype]`` -- the single source of every bound the suite applies.
TABLE: Dict[str, Dict[torch.dtype, Tolerance]] = {
    # y = x @ w.T + b, K-long dot products, fp32 accumulation expected for the half types.
    "gemm": {
        _F32: Tolerance(1e-5, 1.3e-6, 64),
        _F16: Tolerance(1e-3, 1e-3, 64),
        _BF16: Tolerance(8e-3, 8e-3, 64),
    },
    # softmax(q k^T) v over the context; flash-style kernels round the probabilities to the dtype before the
    # second matmul, so the half types get more room than a GEMM.
    "attention": {
        _F32: Tolerance(2e-5, 2e-5, 256),
        _F16: Tolerance(2e-3, 2e-3, 256),
        _BF16: Tolerance(1.6e-2, 1.6e-2, 256),
    },
    # rms_norm / layer_norm: a mean of squares over H, then an element-wise scale (and a residual add rounded
    # to the dtype first when fused).
    "norm": {
        _F32: Tolerance(1e-5, 2e-6, 1024),
        _F16: Tolerance(2e-3, 2e-3, 1024),
        _BF16: Tolerance(1.6e-2, 1.6e-2, 1024),
    },
    # x * cos - y * sin with a float32 cos/sin cache: a few roundings per element.
    "rotary": {
        _F32: Tolerance(1e-5, 2e-6, 0),
        _F16: Tolerance(1e-3, 2e-3, 0),
        _BF16: Tolerance(8e-3, 1.6e-2, 0),
    },
    # act(x) * y: transcendental + one product per element.
    "activation": {
        _F32: Tolerance(1e-5, 2e-6, 0),
        _F16: Tolerance(1e-3, 2e-3, 0),
        _BF16: Tolerance(8e-3, 1.6e-2, 0),
    },
    # reshape_and_cache and other data movement: bit-exact.
    "copy": {_F32: _EXACT, _F16: _EXACT, _BF16: _EXACT},
    # all_reduce / reduce_scatter: world_size terms summed in the dtype (no fp32 accumulator guaranteed).
    "collective_sum": {
        _F32: Tolerance(1e-6, 1e-6, 2),
        _F16: Tolerance(1e-3, 2e-3, 2),
        _BF16: Tolerance(8e-3, 1.6e-2, 2),
    },
    # all_gather, broadcast, send/recv, all_to_all: bit-exact.
    "collective_copy": {_F32: _EXACT, _F16: _EXACT, _BF16: _EXACT},
    # whole-model logits after many layers (provisional; the model suite sets its own reduction = layers).
    "model": {
        _F32: Tolerance(1e-4, 1e-4, 1),
        _F16: Tolerance(5e-2, 5e-2, 1),
        _BF16: Tolerance(2e-1, 1e-1, 1),
    },
}

CLASSES = tuple(TABLE)


def tolerance(op_class: str, dtype: torch.dtype, reduction: int = 0) -> Tuple[float, float]:
    """``(atol, rtol)`` for ``op_class`` at ``dtype`` and a reduction of ``reduction`` elements.

    An integer dtype is compared exactly. Raises ``KeyError`` naming the known classes for an unknown class.
    """
    if not (dtype.is_floating_point or dtype.is_complex):
        return 0.0, 0.0
    try:
        row = TABLE[op_class]
    except KeyError:
        raise KeyError(f"unknown tolerance class {op_class!r}; known: {', '.join(CLASSES)}") from None
    entry = row.get(dtype)
    if entry is None:  # e.g. a float64 output: hold it to the fp32 bound
        entry = row[_F32]
    return entry.at(max(int(reduction), 0))


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
    """Compare each ``outs[i]`` (any dtype, any device) with ``refs[i]`` (float64) under the rule above."""
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
            extra = f" ({nan_count} NaN, e.g. elements never written)" if nan_count > 0 else ""
            problems.append(
                f"{name}: {nbad}/{n} elements outside |out - ref| <= {atol:.3g} + {rtol:.3g}*|ref|{extra}; worst at "
                f"{list(where)}: out={float(out64.reshape(-1)[j]):.6g} ref={float(ref64.reshape(-1)[j]):.6g} "
                f"|diff|={float(flat_err[j]):.3g} > bound {float(bound.reshape(-1)[j]):.3g}")
    if problems:
        return Comparison(False, worst_err, worst_tol, "; ".join(problems), bad_total, total)
    return Comparison(True, worst_err, worst_tol, "", 0, total)


def describe_table() -> Dict[str, Dict[str, Dict[str, float]]]:
    """The table as JSON-friendly data (for reports)."""
    return {cls: {dtype_name(dt): {"atol": t.atol, "rtol": t.rtol, "ref_len": t.ref_len} for dt, t in row.items()}
            for cls, row in TABLE.items()}


__all__.append("describe_table")
