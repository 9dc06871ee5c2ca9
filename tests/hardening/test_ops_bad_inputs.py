"""Property-based bad-input suite: every public op on every available backend, attacked with strided and
non-contiguous index tensors, out-of-range values, NaN/Inf and wrong dtypes, shapes and devices.

The rule (``bad_inputs.call``): a project error naming an allowed argument, or a result equal to the float64
reference; never a crash, a raw library exception or a silently wrong value. The cpu backend runs in this
process, one test per (op, mutation); the triton-interpreter backend runs every (op, mutation) in ONE subprocess
(``bad_inputs.py`` as a script), so a kernel that segfaults fails a test instead of killing the test run.
"""
from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from anyaccel.core.errors import InvalidArgumentError
from anyaccel.core.fused import RopeScaling, rope_cos_sin_cache
from anyaccel.core.gemm import Gemm, GemmSpec

_HERE = Path(__file__).resolve().parent
_spec = importlib.util.spec_from_file_location("anyaccel_bad_inputs", _HERE / "bad_inputs.py")
bad_inputs = sys.modules.setdefault("anyaccel_bad_inputs", importlib.util.module_from_spec(_spec))
if not hasattr(bad_inputs, "ATTACKS"):
    _spec.loader.exec_module(bad_inputs)

CPU_EXAMPLES = 12          # per (op, mutation) on cpu
TRITON_EXAMPLES = 3        # per (op, mutation) in the triton-interpreter subprocess (interpreted kernels are slow)
_SETTINGS = dict(deadline=None, derandomize=True, database=None, suppress_health_check=list(HealthCheck))


@pytest.mark.parametrize("attack,mutation", bad_inputs.mutations(), ids=lambda v: getattr(v, "name", v))
def test_cpu_backend_bad_inputs(cpu_backend, attack, mutation):
    tally = {}
    bad_inputs.run_attack(cpu_backend, attack, mutation, CPU_EXAMPLES, tally)
    assert sum(tally.values()) >= 1, "no case ran"


@pytest.mark.slow
def test_triton_interpreter_bad_inputs_in_a_subprocess():
    pytest.importorskip("triton", reason="the triton-interpreter tier needs triton installed")
    env = dict(os.environ, PYTHONFAULTHANDLER="1")
    r = subprocess.run([sys.executable, str(_HERE / "bad_inputs.py"), "triton-interpreter", str(TRITON_EXAMPLES)],
                       capture_output=True, text=True, env=env, timeout=600)
    last_cases = [ln for ln in r.stderr.splitlines() if ln.startswith("case: ")][-1:]
    assert r.returncode >= 0, (f"the worker died of signal {-r.returncode} (a memory-unsafe kernel call) during "
                               f"{last_cases}; stderr tail:\n{r.stderr[-3000:]}")
    lines = r.stdout.strip().splitlines()
    assert lines, f"no report from the worker (rc {r.returncode}); stderr tail:\n{r.stderr[-3000:]}"
    report = json.loads(lines[-1])
    assert "unavailable" not in report, report
    assert not report["failures"], "\n".join(report["failures"])
    assert r.returncode == 0, r.stderr[-3000:]
    ran = {k.split(" | ")[1] for k in report["tally"]}
    assert ran == {m.name for _, m in bad_inputs.mutations()}, "some mutations ran no case"


# -- spec construction (backend-independent) -----------------------------------------------------------------------

_OUT_DTYPES = [None, torch.float32, torch.float16, torch.bfloat16, "float16", torch.int8, torch.float64, 1]
_FEATURES = [None, 1, 16, 0, -3, True, False, 2.5, "8"]
_FLAGS = [True, False, 1, 0, "yes", None]


def _valid_features(v):
    return v is None or (type(v) is int and v > 0)


@settings(max_examples=150, **_SETTINGS)
@given(out_dtype=st.sampled_from(_OUT_DTYPES), has_bias=st.sampled_from(_FLAGS),
       k=st.sampled_from(_FEATURES), n=st.sampled_from(_FEATURES))
def test_gemm_spec_is_checked_at_build(cpu_backend, out_dtype, has_bias, k, n):
    spec = GemmSpec(dtype=torch.float32, out_dtype=out_dtype, has_bias=has_bias, in_features=k, out_features=n)
    bad = {}
    if not (out_dtype is None or out_dtype in (torch.float32, torch.float16, torch.bfloat16)):
        bad["spec.out_dtype"] = out_dtype
    if not isinstance(has_bias, bool):
        bad["spec.has_bias"] = has_bias
    if not _valid_features(k):
        bad["spec.in_features"] = k
    if not _valid_features(n):
        bad["spec.out_features"] = n
    if bad:
        with pytest.raises(InvalidArgumentError) as ei:
            Gemm.build(spec, cpu_backend)
        assert ei.value.argument in bad
        return
    op = Gemm.build(spec, cpu_backend)
    kk, nn = k or 8, n or 4
    x, w = torch.randn(3, kk), torch.randn(nn, kk)
    b = torch.randn(nn) if has_bias else None
    y = op(x, w, b)
    assert y.dtype == (out_dtype or torch.float32)
    torch.testing.assert_close(y.double(), bad_inputs.gemm_reference(x, w, b), rtol=2e-2, atol=2e-2)


_NUMBERS = st.one_of(st.sampled_from([0.0, -1.0, 1.0, 0.5, 4.0, 32.0, float("nan"), float("inf"), -float("inf"),
                                      1e300, 1e-300, 0, 10 ** 400]),
                     st.floats(-100, 100, allow_nan=False))


@settings(max_examples=300, **_SETTINGS)
@given(kind=st.sampled_from(["linear", "dynamic", "llama3", "yarn"]), factor=_NUMBERS, lo=_NUMBERS, hi=_NUMBERS,
       beta_fast=_NUMBERS, beta_slow=_NUMBERS, mscale=st.one_of(st.none(), _NUMBERS),
       mscale_all_dim=st.one_of(st.none(), _NUMBERS), attention_factor=st.one_of(st.none(), _NUMBERS),
       orig=st.sampled_from([None, 0, 1, 64, 4096, True]), base=_NUMBERS, rotary_dim=st.sampled_from([2, 4, 8]),
       max_position=st.sampled_from([1, 8, 64]))
def test_rope_scaling_is_a_clear_error_or_a_finite_cache(kind, factor, lo, hi, beta_fast, beta_slow, mscale,
                                                         mscale_all_dim, attention_factor, orig, base, rotary_dim,
                                                         max_position):
    """Any RoPE parameters: an InvalidArgumentError at construction (of the scaling or of the cache), never a
    ZeroDivisionError/ValueError/OverflowError, and a cache that is built is finite."""
    try:
        sc = RopeScaling(rope_type=kind, factor=factor, original_max_position_embeddings=orig, low_freq_factor=lo,
                         high_freq_factor=hi, beta_fast=beta_fast, beta_slow=beta_slow, mscale=mscale,
                         mscale_all_dim=mscale_all_dim, attention_factor=attention_factor)
        cache = rope_cos_sin_cache(rotary_dim, max_position, base, sc)
    except InvalidArgumentError as e:
        assert e.argument and e.argument in str(e)
        return
    assert cache.shape == (max_position, rotary_dim)
    assert bool(torch.isfinite(cache).all()), f"non-finite cache for {sc} base {base}"


@pytest.mark.parametrize("field,value", [("beta_fast", 0.0), ("beta_fast", float("nan")), ("beta_slow", 0.0),
                                         ("beta_slow", -1.0), ("mscale", float("nan"))])
def test_yarn_rejects_degenerate_parameters_naming_them(field, value):
    kw = dict(rope_type="yarn", factor=4.0, original_max_position_embeddings=64)
    kw[field] = value
    with pytest.raises(InvalidArgumentError) as ei:
        RopeScaling(**kw)
    assert ei.value.argument == field


def test_yarn_base_one_and_huge_caches_are_clear_errors():
    yarn = RopeScaling(rope_type="yarn", factor=4.0, original_max_position_embeddings=64)
    with pytest.raises(InvalidArgumentError) as ei:
        rope_cos_sin_cache(8, 16, 1.0, yarn)
    assert ei.value.argument == "base"
    with pytest.raises(InvalidArgumentError) as ei:
        rope_cos_sin_cache(8, 10 ** 12, 10000.0)
    assert ei.value.argument == "max_position"
    assert rope_cos_sin_cache(8, 16, 1.5, yarn).isfinite().all()
