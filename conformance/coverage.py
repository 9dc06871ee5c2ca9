"""Coverage driven by declared capability: which declared features did a case actually take to the backend's own
kernel?

A backend declares, per op, what its kernels serve (their capabilities). A run is only as good as the cases that
reached those kernels: a feature a kernel declares but no case exercised is a claim nobody checked (the run
would pass a backend whose soft-cap is wrong if every soft-cap case fell back to the core). So for every
(backend, op, declared feature, dtype) this module counts the cases that reached one of the backend's kernels
(status ``pass`` or ``fail``, not through the fallback), and a declared feature with a count of zero becomes an
``error`` record of kind ``"coverage"`` that says how to get coverage.

What a "feature" is, per op (the declared side reads the kernel's capability for a dtype it declares; the
exercised side reads the case's spec, and its inputs where the spec cannot tell):

==================  ======================================================  ====================================
op                  declared by the capability                              exercised by a case
==================  ======================================================  ====================================
attention           ``AttentionCapability.features``                        ``AttentionSpec.features``
reshape_and_cache   ``plain slots`` and ``padding slots`` (the contract)    a slot of ``-1`` in the slot mapping
gemm                ``bias``, ``no bias``; ``out_dtype=X`` per declared     ``spec.has_bias``, ``spec.out_dtype``
                    ``out_dtypes`` other than the input dtype
grouped_gemm        ``mode=X`` per declared mode                            ``spec.mode``
weight_only_gemm    ``format=X`` per declared format (all when ``None``)     ``spec.format``
rms_norm            ``plain``; ``fused residual`` when declared             ``spec.fused_residual``
layer_norm          ``no bias``; ``bias`` when declared                     ``spec.has_bias``
rotary_embedding    ``style=X`` per declared style; ``full rotary``;        ``spec.style``, ``rotary_dim``; the
                    ``partial rotary`` when declared; ``unscaled`` and      scaling from a ``feature:`` tag or
                    ``scaling=X`` for every RoPE scaling type (scaling       the case name (``yarn-scaled``)
                    lives in the cos/sin cache every kernel reads)
silu_and_mul        ``silu``                                                always
gelu_and_mul        ``approximate=X`` per declared approximation            ``spec.approximate``
any other op        ``all``                                                 always
==================  ======================================================  ====================================

A case may name extra features it exercises with tags ``"feature:NAME"`` (:attr:`OpCase.tags`); that is the
stable way for a case author to claim a feature this module cannot read from the spec.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Callable, Dict, FrozenSet, Iterable, List, Mapping, Optional, Sequence, Tuple

import torch

from ..core.validation import dtype_name
from .cases import CaseResult, OpCase

__all__ = ["FeatureRule", "RULES", "SCALING_TYPES", "CoverageRow", "case_features", "declared_features",
           "coverage_table", "coverage_errors", "unreached", "COVERAGE_KIND"]

#: The ``kind`` of a coverage record.
COVERAGE_KIND = "coverage"

#: RoPE scaling variants every rotary kernel serves through its cos/sin cache (``core.fused.RopeScaling``).
SCALING_TYPES = ("linear", "dynamic", "llama3", "yarn")

_SCALED = re.compile(r"\b(" + "|".join(SCALING_TYPES) + r")-scaled\b")


@dataclass(frozen=True)
class FeatureRule:
    """How one op's features are named.

    :param declared: ``declared(capability, dtype) -> features`` a kernel with ``capability`` serves in ``dtype``.
    :param exercised: ``exercised(case, inputs) -> features`` a case needs (``inputs`` is what ``case.make`` made).
    :param hint: what kind of case covers a feature of this op (quoted in the coverage error).
    """

    declared: Callable[[Any, torch.dtype], FrozenSet[str]]
    exercised: Callable[[OpCase, Mapping[str, Any]], FrozenSet[str]]
    hint: str = ""


def _attention_declared(cap: Any, dtype: torch.dtype) -> FrozenSet[str]:
    return frozenset(getattr(cap, "features", ()) or ())


def _attention_exercised(case: OpCase, inputs: Mapping[str, Any]) -> FrozenSet[str]:
    return frozenset(getattr(case.spec, "features", ()) or ())


def _slots_exercised(case: OpCase, inputs: Mapping[str, Any]) -> FrozenSet[str]:
    for v in inputs.values():
        slots = getattr(v, "slot_mapping", None)
        if isinstance(slots, torch.Tensor) and slots.numel() and bool((slots < 0).any()):
            return frozenset({"padding slots"})
    return frozenset({"plain slots"})


def _gemm_declared(cap: Any, dtype: torch.dtype) -> FrozenSet[str]:
    outs = getattr(cap, "out_dtypes", None) or ()
    return frozenset({"bias", "no bias", *(f"out_dtype={dtype_name(o)}" for o in outs if o != dtype)})


def _gemm_exercised(case: OpCase, inputs: Mapping[str, Any]) -> FrozenSet[str]:
    spec = case.spec
    f = {"bias" if spec.has_bias else "no bias"}
    out = getattr(spec, "out_dtype", None)
    if out is not None and out != spec.dtype:
        f.add(f"out_dtype={dtype_name(out)}")
    return frozenset(f)


def _rotary_declared(cap: Any, dtype: torch.dtype) -> FrozenSet[str]:
    f = {f"style={s}" for s in getattr(cap, "styles", ())} | {"full rotary", "unscaled"}
    if getattr(cap, "partial", False):
        f.add("partial rotary")
    return frozenset(f | {f"scaling={t}" for t in SCALING_TYPES})


def _rotary_exercised(case: OpCase, inputs: Mapping[str, Any]) -> FrozenSet[str]:
    spec = case.spec
    f = {f"style={spec.style}", "partial rotary" if spec.rotary_dim < spec.head_size else "full rotary"}
    tagged = {t[len("feature:"):] for t in case.tags if t.startswith("feature:scaling=")}
    m = _SCALED.search(case.name)
    scaled = tagged or ({f"scaling={m.group(1)}"} if m else set())
    return frozenset(f | (scaled or {"unscaled"}))


def _all_weight_formats():
    from ..core.weight_only import WEIGHT_FORMATS

    return tuple(WEIGHT_FORMATS)


RULES: Dict[str, FeatureRule] = {
    "attention": FeatureRule(_attention_declared, _attention_exercised,
                             "an attention case whose spec needs the feature (AttentionSpec.features)"),
    "reshape_and_cache": FeatureRule(lambda cap, dt: frozenset({"plain slots", "padding slots"}), _slots_exercised,
                                     "a KV-write case with (or without) padding slots (-1 in slot_mapping)"),
    "gemm": FeatureRule(_gemm_declared, _gemm_exercised,
                        "a gemm case with (or without) a bias, or with that out_dtype"),
    "grouped_gemm": FeatureRule(lambda cap, dt: frozenset(f"mode={m}" for m in getattr(cap, "modes", ())),
                                lambda case, inp: frozenset({f"mode={case.spec.mode}"}),
                                "a grouped_gemm case in that group encoding"),
    "weight_only_gemm": FeatureRule(
        lambda cap, dt: frozenset(f"format={f}" for f in (getattr(cap, "formats", None) or _all_weight_formats())),
        lambda case, inp: frozenset({f"format={case.spec.format}"}),
        "a weight_only_gemm case in that weight format"),
    "rms_norm": FeatureRule(
        lambda cap, dt: frozenset({"plain"} | ({"fused residual"} if getattr(cap, "fused_residual", False)
                                               else set())),
        lambda case, inp: frozenset({"fused residual" if case.spec.fused_residual else "plain"}),
        "an rms_norm case with (or without) the fused residual add"),
    "layer_norm": FeatureRule(
        lambda cap, dt: frozenset({"no bias"} | ({"bias"} if getattr(cap, "bias", False) else set())),
        lambda case, inp: frozenset({"bias" if case.spec.has_bias else "no bias"}),
        "a layer_norm case with (or without) a bias"),
    "rotary_embedding": FeatureRule(_rotary_declared, _rotary_exercised,
                                    "a rotary case in that style / rotary_dim / RoPE scaling (tag it "
                                    "'feature:scaling=TYPE' or name it 'TYPE-scaled')"),
    "silu_and_mul": FeatureRule(lambda cap, dt: frozenset({"silu"}), lambda case, inp: frozenset({"silu"}),
                                "a silu_and_mul case"),
    "gelu_and_mul": FeatureRule(
        lambda cap, dt: frozenset(f"approximate={a}" for a in getattr(cap, "approximations", ())),
        lambda case, inp: frozenset({f"approximate={case.spec.approximate}"}),
        "a gelu_and_mul case with that approximation"),
}

_GENERIC = FeatureRule(lambda cap, dt: frozenset({"all"}), lambda case, inp: frozenset({"all"}), "a case of the op")


def _rule(op: str) -> FeatureRule:
    return RULES.get(op, _GENERIC)


def case_features(case: OpCase, inputs: Optional[Mapping[str, Any]] = None) -> Tuple[str, ...]:
    """The features ``case`` exercises (sorted), plus any ``feature:NAME`` tag it carries."""
    f = set(_rule(case.op_name).exercised(case, inputs or {}))
    f |= {t[len("feature:"):] for t in case.tags if t.startswith("feature:")}
    return tuple(sorted(f))


def declared_features(backend: Any, op: str, dtype: torch.dtype) -> Dict[str, List[str]]:
    """``{feature: [kernel names declaring it]}`` over the backend's kernels for ``op`` that declare ``dtype``."""
    out: Dict[str, List[str]] = {}
    rule = _rule(op)
    for k in backend.kernels_for(op):
        cap = k.capability
        if dtype not in getattr(cap, "dtypes", ()):
            continue
        try:
            feats = rule.declared(cap, dtype)
        except Exception as e:  # a capability of an unexpected shape: say so instead of guessing
            feats = frozenset({f"declared features unreadable ({type(e).__name__}: {e})"})
        for f in sorted(feats):
            out.setdefault(f, []).append(k.name)
    return out


@dataclass(frozen=True)
class CoverageRow:
    """One cell of the coverage table.

    :param reached: cases with the feature that ran on one of the backend's own kernels (pass or fail).
    :param fallback: cases with the feature that ran on the core's fallback instead.
    :param other: cases with the feature that did not run to a verdict (error, unsupported, not run).
    :param declared_by: the kernels whose capability declares the feature for this dtype.
    :param fallback_reason: one fallback reason, when ``fallback`` > 0 (why the kernels rejected such a case).
    """

    backend: str
    op: str
    feature: str
    dtype: str
    reached: int
    fallback: int
    other: int
    declared_by: Tuple[str, ...]
    fallback_reason: str = ""

    def to_json(self) -> Dict[str, Any]:
        return {"backend": self.backend, "op": self.op, "feature": self.feature, "dtype": self.dtype,
                "reached": self.reached, "fallback": self.fallback, "other": self.other,
                "declared_by": list(self.declared_by), "fallback_reason": self.fallback_reason}


def coverage_table(backend: Any, records: Iterable[CaseResult], dtypes: Sequence[torch.dtype],
                   ops: Optional[Iterable[str]] = None) -> List[CoverageRow]:
    """The coverage rows of ``backend`` for the ops of ``ops`` (default: every op with a record) and ``dtypes``.

    Only op records of ``backend`` count; a feature is listed for a dtype when a kernel declares both.
    """
    recs = [r for r in records if r.backend == backend.name and r.kind == "op" and r.op]
    wanted = list(dict.fromkeys(ops if ops is not None else (r.op for r in recs)))
    rows: List[CoverageRow] = []
    for op in wanted:
        for dt in dtypes:
            dn = dtype_name(dt)
            mine = [r for r in recs if r.op == op and r.dtype == dn]
            for feat, kernels in declared_features(backend, op, dt).items():
                with_f = [r for r in mine if feat in r.features]
                reached = [r for r in with_f if r.status in ("pass", "fail") and not r.fallback]
                fb = [r for r in with_f if r.fallback]
                rows.append(CoverageRow(backend.name, op, feat, dn, len(reached), len(fb),
                                        len(with_f) - len(reached) - len(fb), tuple(kernels),
                                        fb[0].reason if fb else ""))
    return rows


def unreached(rows: Iterable[CoverageRow]) -> List[CoverageRow]:
    """The rows of declared features no case took to the backend's own kernel."""
    return [r for r in rows if r.reached == 0]


def coverage_errors(rows: Iterable[CoverageRow]) -> List[CaseResult]:
    """One ``error`` record (kind ``"coverage"``) per declared feature no case reached, saying how to reach it."""
    out: List[CaseResult] = []
    for r in unreached(rows):
        if r.fallback:
            why = (f"{r.fallback} case(s) with it ran on the core's fallback instead, e.g. {r.fallback_reason!r}: "
                   f"the capability rejects them for another reason")
        elif r.other:
            why = f"{r.other} case(s) with it did not run to a verdict (see their records)"
        else:
            why = "no case of the run exercises it"
        how = (f"to cover it, add {_rule(r.op).hint} in {r.dtype} to the op's family in anyaccel/conformance/ops/ "
               f"(fixed_cases or case_strategy) or raise --examples; if the kernel does not serve it, drop it from "
               f"the capability")
        out.append(CaseResult(backend=r.backend, kind=COVERAGE_KIND, name=f"{r.op} {r.feature}", dtype=r.dtype,
                              status="error", op=r.op, features=(r.feature,),
                              reason=f"declared by {', '.join(r.declared_by)} but no case reached the backend's "
                                     f"own kernel: {why}; {how}"))
    return out
