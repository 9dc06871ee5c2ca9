"""Planted bugs are caught by the model conformance checks, and the clean model passes the same checks.

A bound loose enough to pass a broken model is a defect: each bug here must turn a record to "fail".
"""
from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from anyaccel.conformance.models import TINY_CONFIGS, make_reference, run_model_checks  # noqa: E402
from anyaccel.models import build_model  # noqa: E402
from anyaccel.models.loading import iter_hf_model  # noqa: E402


@pytest.fixture(scope="module")
def backend(cpu_backend):
    return cpu_backend


@pytest.fixture(scope="module")
def refs(reference_models):
    return reference_models


def _status(recs, check):
    return {r.name.split()[-1]: r for r in recs}[check]


def _rebuilt(hf, backend, dtype, **config_changes):
    """Our model with a wrong config value (the planted bug), loaded with the right weights."""
    good = build_model(hf, backend, dtype)
    model = type(good)(good.config.replace(**config_changes), backend, dtype)
    model.load_weights(iter_hf_model(hf))
    return model


@pytest.mark.parametrize("dtype", [torch.float32, pytest.param(torch.bfloat16, marks=pytest.mark.slow)])
def test_clean_models_pass(backend, refs, dtype):
    for name in ("llama", "mixtral"):
        recs = run_model_checks(backend, name, dtype, hf=refs(name))
        assert [r.status for r in recs] == ["pass"] * 4, [(r.name, r.reason) for r in recs]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rotary_query_off_by_one_position_is_caught(backend, refs, dtype):
    """Queries rotated one position ahead of their keys. (Shifting q and k alike is invisible: rotary
    attention sees only relative positions.)"""
    def tamper(model):
        op = model.rotary.op

        def bad(pos, q, k, cache):
            q_out, _ = op(pos + 1, q, k, cache)
            _, k_out = op(pos, q, k, cache)
            return q_out, k_out
        model.rotary.op = bad

    recs = run_model_checks(backend, "llama", dtype, hf=refs("llama"), tamper=tamper, checks=("logits",))
    assert _status(recs, "logits").status == "fail"


def test_decode_position_off_by_one_is_caught(backend, refs):
    """Decode steps given position seq_len instead of seq_len - 1 (prefill right): greedy and paged catch it."""
    def tamper(model):
        forward = model.forward
        model.forward = lambda ids, pos, kv, meta: forward(ids, pos + 1 if ids.shape[0] == 1 else pos, kv, meta)

    recs = run_model_checks(backend, "llama", torch.float32, hf=refs("llama"), tamper=tamper,
                            checks=("greedy", "paged"))
    assert _status(recs, "paged").status == "fail"
    assert _status(recs, "greedy").status == "fail"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_wrong_norm_epsilon_is_caught(backend, refs, dtype):
    """eps 1e-3 where the config says 1e-6: caught in every dtype (the old bfloat16 bound, 0.08 x scale against
    an unrounded reference with unit-variance embeddings, passed it)."""
    hf = refs("qwen3")
    model = _rebuilt(hf, backend, dtype, norm_eps=1e-3)
    rec = _status(run_model_checks(backend, "qwen3", dtype, hf=hf, model=model, checks=("logits",)), "logits")
    assert rec.status == "fail" and rec.max_abs_err > 2 * rec.tolerance


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("delta", [-1, 1])
def test_sliding_window_off_by_one_is_caught(backend, refs, delta, dtype):
    hf = refs("mistral")
    model = _rebuilt(hf, backend, dtype, sliding_windows=(8 + delta, 8 + delta))
    rec = _status(run_model_checks(backend, "mistral", dtype, hf=hf, model=model, checks=("logits",)), "logits")
    assert rec.status == "fail"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_swapped_experts_are_caught(backend, refs, dtype):
    def tamper(model):
        for layer in model.layers:
            moe = layer.mlp
            moe.w13 = moe.w13[[1, 0, 2, 3]].contiguous()
            moe.w2 = moe.w2[[1, 0, 2, 3]].contiguous()

    recs = run_model_checks(backend, "mixtral", dtype, hf=refs("mixtral"), tamper=tamper, checks=("logits",))
    assert _status(recs, "logits").status == "fail"


def test_paged_bug_is_caught_by_recompute(backend, refs):
    """Decode steps write their K/V one slot too far (a stale slot mapping): prefill is right, so only the
    comparison of paged decode with a full recompute (and greedy) can see it."""
    def tamper(model):
        for layer in model.layers:
            attn = layer.attn.attn
            write = attn.write

            def bad(k, v, kc, vc, meta, _w=write):
                if k.shape[0] == 1:
                    meta = type(meta).build(meta.query_start_loc, meta.seq_lens, meta.block_table,
                                            model.block_size, meta.slot_mapping + 1)
                return _w(k, v, kc, vc, meta)
            attn.write = bad

    recs = run_model_checks(backend, "llama", torch.float32, hf=refs("llama"), tamper=tamper,
                            checks=("greedy", "paged"))
    assert _status(recs, "paged").status == "fail"


def test_one_bound_per_model_and_dtype():
    from anyaccel.conformance.models import FLOAT32_FLOOR, MARGIN, MEASURED_ERROR, MODEL_TOLERANCE

    dtypes = (torch.float32, torch.float16, torch.bfloat16)
    assert set(MODEL_TOLERANCE) == {(n, d) for n in TINY_CONFIGS for d in dtypes}
    for n in TINY_CONFIGS:
        f32, f16, bf16 = (MODEL_TOLERANCE[(n, d)] for d in dtypes)
        assert 0 < f32 < f16 < bf16, (n, f32, f16, bf16)
        # every bound is MARGIN x what the correct backends measured (rounded up to two digits): never below
        # it, and not looser (except float32's floor)
        for bound, measured, dt in zip((f32, f16, bf16), MEASURED_ERROR[n], dtypes):
            assert MARGIN * measured * 0.999 <= bound <= MARGIN * measured * 1.1 or (
                dt == torch.float32 and bound == FLOAT32_FLOOR), (n, dt, bound, measured)


def test_model_without_a_bound_gets_the_loosest_of_its_dtype():
    from anyaccel.conformance.models import MODEL_TOLERANCE, model_tolerance
    from anyaccel.core.errors import InvalidArgumentError

    loosest = max(v for (_, d), v in MODEL_TOLERANCE.items() if d == torch.bfloat16)
    assert model_tolerance("my_own_model", torch.bfloat16) == loosest
    assert model_tolerance("llama", torch.bfloat16) == MODEL_TOLERANCE[("llama", torch.bfloat16)]
    with pytest.raises(InvalidArgumentError, match="dtype"):
        model_tolerance("llama", torch.float64)
