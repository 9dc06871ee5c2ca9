"""The suite must be able to fail: throwaway backends wrap the real cpu kernels with one planted bug each, and the
runner must flag exactly the cases the bug affects."""
from __future__ import annotations

import importlib.util
from typing import Callable, List

import pytest
import torch

from anyaccel.backends.cpu.gemm import KERNELS as CPU_GEMM
from anyaccel.conformance import runner
from anyaccel.core import Backend, BackendDef, GemmCapability, KernelImpl

F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16


def _has(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ImportError:
        return False


def _buggy(name: str, kernels: List[KernelImpl], **defkw) -> Backend:
    return Backend.local(BackendDef(name=name, vendor="tests", device_type="cpu", **defkw), kernels=kernels)


def _wrap(real: KernelImpl, backend: str, wrap: Callable, capability=None) -> KernelImpl:
    """The real kernel with ``wrap(real_kernel, spec) -> kernel`` applied, under a new backend name."""
    return KernelImpl(op=real.op, backend=backend, name=f"{backend}.{real.op}",
                      build=lambda spec: wrap(real.build(spec), spec),
                      capability=capability or real.capability, priority=1, provider="tests")


def _by_status(rep):
    out = {}
    for c in rep.cases:
        out.setdefault(c.status, []).append(c)
    return out


def test_gemm_missing_bias_fails_exactly_the_bias_cases():
    def drop_bias(k, spec):
        return lambda x, w, b, out: k(x, w, None, out)
    b = _buggy("nobias", [_wrap(CPU_GEMM[0], "nobias", drop_bias)])
    rep = runner.run([b], families=["gemm"], dtypes=(F32, BF16), examples=4)
    for c in rep.cases:
        if " bias" in c.name:
            assert c.status == "fail", c
            assert c.max_abs_err > c.tolerance or "outside" in c.reason
        else:
            assert c.status == "pass", c
    assert any(c.status == "fail" for c in rep.cases) and rep.exit_code == 1


def test_kernel_claiming_a_dtype_it_computes_wrongly_is_caught():
    """Claims fp16 but computes it through bf16 (3 fewer mantissa bits): small-K cases must fail."""
    def via_bf16(k, spec):
        def kernel(x, w, b, out):
            if x.dtype == F16:
                y = x.to(BF16).float() @ w.to(BF16).float().t()
                if b is not None:
                    y += b.to(BF16).float()
                return out.copy_(y)
            return k(x, w, b, out)
        return kernel
    b = _buggy("sloppy", [_wrap(CPU_GEMM[0], "sloppy", via_bf16)])
    rep = runner.run([b], families=["gemm"], dtypes=(F16, F32), examples=0)
    f16 = {c.name: c for c in rep.cases if c.dtype == "float16"}
    assert f16["decode M=1 x=[1, 64] N=32 bias"].status == "fail"
    assert f16["square-ish x=[64, 256] N=128"].status == "fail"
    assert all(c.status == "pass" for c in rep.cases if c.dtype == "float32")


def test_kernel_declared_unsupported_is_never_called():
    """A kernel that declares bf16 unsupported cannot be reached for bf16: the case runs on the fallback."""
    built = []

    def spy(k, spec):
        built.append(spec.dtype)
        return k
    cap = GemmCapability(dtypes=frozenset({F32}), out_dtypes=frozenset({F32}))
    b = _buggy("picky", [_wrap(CPU_GEMM[0], "picky", spy, capability=cap)])
    rep = runner.run([b], families=["gemm"], dtypes=(BF16,), examples=2)
    assert BF16 not in built
    assert rep.cases and all(c.fallback and c.status == "pass" for c in rep.cases)


# ------------------------------------------------------------------------------------------------ attention
# A small paged-attention kernel written to the contract (docs/op-contracts.md), with a switch per planted bug.
# Without a bug it must pass the suite (test_attention_harness_without_bug_passes), which is what makes each
# bug's failure meaningful.


needs_attention = pytest.mark.skipif(
    not (_has("anyaccel.core.attention") and _has("anyaccel.conformance.ops.attention")),
    reason="the attention family is not in this tree yet")


def _paged_attention(spec, layout: str, mask_shift: int = 0, scale_mul: float = 1.0, block_shift: int = 0):
    import math

    def kernel(q_THD, k_cache, v_cache, meta, out_THD):
        starts = meta.query_start_loc.tolist()
        lens = meta.seq_lens.tolist()
        p = spec.block_size
        scale = (spec.scale if spec.scale is not None else spec.head_size ** -0.5) * scale_mul
        group = spec.num_heads // spec.num_kv_heads
        n_blocks = k_cache.shape[0]
        for s, ctx in enumerate(lens):
            q = q_THD[starts[s]:starts[s + 1]].double()                     # [q_len, Hq, D]
            q_len = q.shape[0]
            if q_len == 0:
                continue
            nb = math.ceil(ctx / p)
            blocks = (meta.block_table[s, :nb].long() + block_shift) % n_blocks
            kb, vb = k_cache[blocks].double(), v_cache[blocks].double()
            if layout == "HND":                                             # [nb, Hkv, P, D] -> [nb, P, Hkv, D]
                kb, vb = kb.transpose(1, 2), vb.transpose(1, 2)
            k = kb.reshape(nb * p, *kb.shape[2:])[:ctx].repeat_interleave(group, dim=1)   # [ctx, Hq, D]
            v = vb.reshape(nb * p, *vb.shape[2:])[:ctx].repeat_interleave(group, dim=1)
            scores = torch.einsum("qhd,khd->hqk", q, k) * scale             # [Hq, q_len, ctx]
            if spec.soft_cap:
                scores = spec.soft_cap * torch.tanh(scores / spec.soft_cap)
            qpos = torch.arange(ctx - q_len, ctx).view(-1, 1)
            kpos = torch.arange(ctx).view(1, -1)
            keep = torch.ones(q_len, ctx, dtype=torch.bool)
            if spec.causal:
                keep &= kpos <= qpos + mask_shift
            if spec.sliding_window:
                keep &= (qpos - kpos) < spec.sliding_window
            scores = scores.masked_fill(~keep, float("-inf"))
            prob = torch.softmax(scores, dim=-1)
            out_THD[starts[s]:starts[s + 1]] = torch.einsum("hqk,khd->qhd", prob, v).to(out_THD.dtype)
        return out_THD
    return kernel


def _attention_backend(name: str, **bug) -> Backend:
    from anyaccel.plugins import get_registry

    cpu = get_registry().get("cpu")
    real = [k for k in cpu.kernels_for("attention")]
    layout = cpu.kv_cache_layout
    from anyaccel.core.dispatch import OpCapability
    cap = real[0].capability if real else OpCapability()
    k = KernelImpl(op="attention", backend=name, name=f"{name}.attention", priority=1, provider="tests",
                   capability=cap, build=lambda spec: _paged_attention(spec, layout, **bug))
    return _buggy(name, [k], kv_cache_layout=layout, block_sizes=cpu.block_sizes)


def _attention_cases(b: Backend):
    rep = runner.run([b], families=["attention"], dtypes=(F32,), examples=2)
    return [c for c in rep.cases if c.op == "attention"]


@needs_attention
def test_attention_harness_without_bug_passes():
    cases = _attention_cases(_attention_backend("clean"))
    assert cases and all(c.status == "pass" for c in cases), [(c.name, c.status, c.reason) for c in cases
                                                                if c.status != "pass"]


@needs_attention
def test_attention_causal_mask_off_by_one_fails():
    cases = _attention_cases(_attention_backend("offbyone", mask_shift=1))
    assert any(c.status == "fail" for c in cases), [(c.name, c.status) for c in cases]
    assert all(c.status in ("pass", "fail") for c in cases)


@needs_attention
def test_attention_wrong_softmax_scale_fails():
    cases = _attention_cases(_attention_backend("badscale", scale_mul=0.5))
    fails = [c for c in cases if c.status == "fail"]
    assert len(fails) >= len(cases) // 2, [(c.name, c.status) for c in cases]


@needs_attention
def test_attention_block_table_shifted_by_one_fails():
    cases = _attention_cases(_attention_backend("shifted", block_shift=1))
    fails = [c for c in cases if c.status == "fail"]
    assert len(fails) >= len(cases) // 2, [(c.name, c.status) for c in cases]


# ------------------------------------------------------------------------------------------------ fused


@pytest.mark.skipif(not (_has("anyaccel.core.fused") and _has("anyaccel.conformance.ops.fused")
                         and _has("anyaccel.backends.cpu.fused")), reason="the fused family is not in this tree yet")
def test_rms_norm_dropped_residual_fails():
    from anyaccel.backends.cpu import fused as cpu_fused

    rms = [k for k in cpu_fused.KERNELS if k.op == "rms_norm"]
    assert rms, "the cpu backend registers an rms_norm kernel"

    def wrap(k, spec):
        def kernel(x, weight, residual, out, residual_out):
            if residual is not None:
                residual = torch.zeros_like(residual)
            return k(x, weight, residual, out, residual_out)
        return kernel

    b = _buggy("noresid", [_wrap(r, "noresid", wrap) for r in rms])
    rep = runner.run([b], families=["fused"], dtypes=(F32,), examples=0)
    norm = [c for c in rep.cases if c.op == "rms_norm"]
    assert any(c.status == "fail" for c in norm), [(c.name, c.status) for c in norm]
    # cases without a residual are unaffected by the bug
    assert all(c.status == "pass" for c in norm if "resid" not in c.name.lower())
