"""The attention family's cases: drawn within the backend's declared capability, sentinels present, and the
oracle memo never serves a stale reference."""
from __future__ import annotations

import torch

from anyaccel.conformance import runner
from anyaccel.conformance.ops import attention as fam
from anyaccel.core import Backend, BackendDef, KernelImpl
from anyaccel.core.attention import AttentionCapability, AttentionSpec


def _narrow_backend() -> Backend:
    """Claims plain causal attention only, head sizes 64 and 128, bf16 only (no window, cap, GQA...)."""
    cap = AttentionCapability(dtypes=frozenset({torch.bfloat16}), head_sizes=frozenset({64, 128}),
                              features=frozenset({"causal"}))
    k = KernelImpl(op="attention", backend="narrow", name="narrow.attention", build=lambda spec: None, capability=cap)
    return Backend.local(BackendDef(name="narrow", vendor="tests", device_type="cpu"), kernels=[k])


def test_drawn_cases_stay_mostly_within_the_declared_capability():
    b = _narrow_backend()
    cap = b.kernels_for("attention")[0].capability
    drawn = [c for c in runner.draw_cases(fam.case_strategy(b, torch.bfloat16), 40, 0) if c.op_name == "attention"]
    claimed = [c for c in drawn if not cap.not_supported_reasons(c.spec)]
    # most drawn cases reach the narrow kernel, and some still probe outside the claim (checked the other way)
    assert len(claimed) >= len(drawn) // 2 and len(claimed) < len(drawn), (len(claimed), len(drawn))
    assert {c.spec.head_size for c in claimed} <= {64, 128}


def test_head_size_sentinels_are_plain_causal():
    b = _narrow_backend()
    sentinels = [c for c in fam.fixed_cases(b, torch.bfloat16) if c.name.startswith("head size ")
                 and "custom" not in c.name]
    assert sorted(c.spec.head_size for c in sentinels) == sorted(fam.SENTINEL_HEAD_SIZES)
    assert all(c.spec.features == frozenset({"causal"}) for c in sentinels)


def test_oracle_memo_recomputes_when_inputs_change():
    spec = AttentionSpec(2, 2, 16, torch.float32, block_size=16)
    inp = fam.make_batch(spec, [(3, 20)], torch.device("cpu"), seed=1)
    first = fam.reference_with_allowance(inp, spec)
    assert fam.reference_with_allowance(inp, spec) is first          # same inputs: served from the memo
    inp["q"][0, 0, 0] += 1.0                                           # a kernel scribbled on its input
    second = fam.reference_with_allowance(inp, spec)
    assert second is not first and not torch.equal(second, first)
