"""Coverage of declared features: what each op's features are, what a case exercises, and the error a declared
feature no case reached becomes."""
from __future__ import annotations

from dataclasses import dataclass
from typing import List

import pytest
import torch

from anyaccel.backends.cpu.gemm import KERNELS as CPU_GEMM
from anyaccel.conformance import coverage as cov
from anyaccel.conformance import runner
from anyaccel.conformance.ops import attention as attention_cases
from anyaccel.conformance.ops import fused as fused_cases
from anyaccel.conformance.ops import gemm as gemm_cases
from anyaccel.core import (AttentionCapability, Backend, BackendDef, GemmCapability, KernelImpl, NormCapability,
                           RotaryCapability)
from anyaccel.core.attention import AttentionSpec
from anyaccel.core.fused import GatedActivationCapability, RopeScaling

F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16


def _backend(name: str, *kernels: KernelImpl) -> Backend:
    return Backend.local(BackendDef(name=name, vendor="tests", device_type="cpu"), list(kernels))


def _gemm_kernel(backend: str, capability) -> KernelImpl:
    return KernelImpl(op="gemm", backend=backend, name=f"{backend}.gemm", build=CPU_GEMM[0].build,
                      capability=capability, priority=5, provider="tests")


def test_declared_features_read_each_capability():
    g = cov.RULES["gemm"].declared
    assert g(GemmCapability(), F32) == {"bias", "no bias"}
    assert g(GemmCapability(out_dtypes=frozenset({F32, BF16})), BF16) == {"bias", "no bias", "out_dtype=float32"}
    rms, ln = cov.RULES["rms_norm"].declared, cov.RULES["layer_norm"].declared
    assert rms(NormCapability(fused_residual=False), F32) == {"plain"}
    assert rms(NormCapability(), F32) == {"plain", "fused residual"}
    assert ln(NormCapability(bias=False), F32) == {"no bias"}
    rot = cov.RULES["rotary_embedding"].declared(RotaryCapability(styles=frozenset({"gptj"}), partial=False), F32)
    assert {"style=gptj", "full rotary", "unscaled", "scaling=yarn"} <= rot
    assert "style=neox" not in rot and "partial rotary" not in rot
    att = cov.RULES["attention"].declared(AttentionCapability(features=frozenset({"causal", "gqa"})), F32)
    assert att == {"causal", "gqa"}
    gelu = cov.RULES["gelu_and_mul"].declared(GatedActivationCapability(approximations=frozenset({"tanh"})), F32)
    assert gelu == {"approximate=tanh"}


def test_declared_features_only_for_dtypes_a_kernel_declares():
    b = _backend("half", _gemm_kernel("half", GemmCapability(dtypes=frozenset({F16}))))
    assert cov.declared_features(b, "gemm", F32) == {}
    assert cov.declared_features(b, "gemm", F16) == {"bias": ["half.gemm"], "no bias": ["half.gemm"]}


def test_case_features_from_spec_inputs_name_and_tags():
    assert cov.case_features(gemm_cases.make_case(F32, (2,), 8, 4, True)) == ("bias",)
    assert cov.case_features(gemm_cases.make_case(F16, (2,), 8, 4, False, out_dtype=F32)) == \
        ("no bias", "out_dtype=float32")
    yarn = fused_cases.rotary_case(F32, 3, 2, 2, 16, 8, "gptj", 64,
                                   scaling=RopeScaling("yarn", 4.0, original_max_position_embeddings=32))
    assert cov.case_features(yarn) == ("partial rotary", "scaling=yarn", "style=gptj")
    plain = fused_cases.rotary_case(F32, 3, 2, 2, 16, 16, "neox", 64)
    assert cov.case_features(plain) == ("full rotary", "style=neox", "unscaled")
    spec = AttentionSpec(num_heads=4, num_kv_heads=2, head_size=16, soft_cap=5.0)
    assert cov.case_features(attention_cases.make_case(spec, [(3, 3)])) == ("causal", "gqa", "soft_cap")
    import dataclasses
    tagged = dataclasses.replace(plain, tags=("feature:scaling=dynamic", "drawn"))
    assert "scaling=dynamic" in cov.case_features(tagged) and "unscaled" not in cov.case_features(tagged)


def test_padding_slots_are_read_from_the_inputs():
    spec = AttentionSpec(num_heads=2, num_kv_heads=2, head_size=16)
    padded = attention_cases.make_write_case(spec, 10, 4, pad_every=3)
    plain = attention_cases.make_write_case(spec, 10, 4)
    dev = torch.device("cpu")
    assert cov.case_features(padded, padded.make(dev, 0)) == ("padding slots",)
    assert cov.case_features(plain, plain.make(dev, 0)) == ("plain slots",)


@dataclass(frozen=True)
class _NoBiasCases(GemmCapability):
    """Declares the bias feature (a gemm kernel always does) but rejects every case with a bias."""

    def not_supported_reasons(self, spec) -> List[str]:
        return super().not_supported_reasons(spec) + (["bias cases refused"] if spec.has_bias else [])


def test_a_declared_feature_no_case_reached_is_a_coverage_error():
    b = _backend("biasless", _gemm_kernel("biasless", _NoBiasCases()))
    rep = runner.run([b], families=["gemm"], dtypes=(F32,), examples=0, check_coverage=True)
    errs = [c for c in rep.cases if c.kind == "coverage"]
    assert [(c.name, c.dtype, c.status) for c in errs] == [("gemm bias", "float32", "error")]
    assert "fallback" in errs[0].reason and "bias cases refused" in errs[0].reason
    assert "to cover it" in errs[0].reason and "biasless.gemm" in errs[0].reason
    assert rep.exit_code == 1 and rep.summary["coverage_unreached"] == 1
    row = next(r for r in rep.coverage if r.feature == "bias")
    assert row.reached == 0 and row.fallback > 0
    assert next(r for r in rep.coverage if r.feature == "no bias").reached > 0


def test_full_coverage_gives_no_error_and_the_table_is_reported_without_the_check():
    b = _backend("full", _gemm_kernel("full", GemmCapability()))
    rep = runner.run([b], families=["gemm"], dtypes=(F32, BF16), examples=0, check_coverage=True)
    assert not [c for c in rep.cases if c.kind == "coverage"] and rep.exit_code == 0
    assert {(r.feature, r.dtype) for r in rep.coverage} == {(f, d) for f in ("bias", "no bias")
                                                            for d in ("float32", "bfloat16")}
    assert all(r.reached > 0 for r in rep.coverage)
    off = runner.run([_backend("biasless2", _gemm_kernel("biasless2", _NoBiasCases()))], families=["gemm"],
                     dtypes=(F32,), examples=0)
    assert not [c for c in off.cases if c.kind == "coverage"]  # the API leaves the check to the caller
    assert [r.feature for r in off.coverage if r.reached == 0] == ["bias"]  # but the table still shows the gap


def test_an_undeclared_out_dtype_is_not_required_and_a_declared_one_is():
    cap = GemmCapability(dtypes=frozenset({F16}), out_dtypes=frozenset({F16, BF16}))
    b = _backend("outs", _gemm_kernel("outs", cap))
    rows = runner.run([b], families=["gemm"], dtypes=(F16,), examples=0).coverage
    assert {r.feature for r in rows} == {"bias", "no bias", "out_dtype=bfloat16"}
    assert {r.feature for r in cov.unreached(rows)} <= {"out_dtype=bfloat16"}


def test_coverage_unit_of_a_partial_run_says_why_it_has_no_verdict():
    b = _backend("part", _gemm_kernel("part", GemmCapability()))
    work = runner.plan([b], (F32,), ["gemm"], examples=0, check_coverage=True)
    assert work[-1].family == runner.COVERAGE and work[-1].id == "part-coverage-all-declared features reached"
    work[0].run()
    assert work[-1].run() == [] and "only 1 ran" in work[-1].note


@pytest.mark.parametrize("op", sorted(cov.RULES))
def test_every_rule_names_a_hint(op):
    assert cov.RULES[op].hint
