"""Every GPU launch the cuda and rocm tunings make compiles, without a GPU, to a device binary (cubin for sm90 /
sm80, hsaco for gfx942): the same launchers run with ``compile_only``, so the constexpr combinations checked
are the ones a real call produces. Slow (ptxas / the AMD backend run for each variant)."""
from __future__ import annotations

import math
import warnings

import pytest
import torch

from anyaccel.backends.triton.aot import compile_only
from anyaccel.backends.triton.attention import build_reshape_and_cache, launch_attention
from anyaccel.backends.triton.fused import build_gated_activation, build_layer_norm, build_rms_norm, build_rotary
from anyaccel.backends.triton.gemm import build_grouped_gemm, launch_gemm

triton_compiler = pytest.importorskip("triton.backends.compiler")


def _tunings():
    from anyaccel.backends.cuda.tuning import tuning_for as cuda
    from anyaccel.backends.rocm.tuning import tuning_for as rocm

    GPUTarget = triton_compiler.GPUTarget
    return {
        "cuda-sm90": (GPUTarget("cuda", 90, 32), cuda((9, 0))),
        "rocm-gfx942": (GPUTarget("hip", "gfx942", 64), rocm("gfx942")),
    }


@pytest.mark.slow
@pytest.mark.parametrize("name", ["cuda-sm90", "rocm-gfx942"])
def test_shared_kernels_compile_for_gpu_targets(name):
    from types import SimpleNamespace

    target, tun = _tunings()[name]
    dt = torch.bfloat16
    warnings.simplefilter("ignore")
    with compile_only(target) as log:
        q = torch.empty(40, 32, 128, dtype=dt)
        kc = torch.empty(10, 16, 8, 128, dtype=dt)
        qsl = torch.tensor([0, 20, 40], dtype=torch.int32)
        sl = torch.tensor([30, 40], dtype=torch.int32)
        bt = torch.zeros(2, 4, dtype=torch.int32)
        for max_q, splits, window, cap in [(20, 1, None, None), (1, 4, 128, 30.0)]:
            launch_attention(q, kc, kc, qsl, sl, bt, torch.empty_like(q), num_kv_heads=8, block_size=16,
                             layout="NHD", causal=True, scale=1 / math.sqrt(128), sliding_window=window,
                             soft_cap=cap, max_query_len=max_q, max_seq_len=40, tuning=tun, interpret=False,
                             num_splits=splits)
        k = torch.empty(40, 8, 128, dtype=dt)
        build_reshape_and_cache(SimpleNamespace(block_size=16, kv_layout="NHD"), tun, False)(
            k, k, kc, kc, torch.zeros(40, dtype=torch.int64))
        launch_gemm(torch.empty(16, 512, dtype=dt), torch.empty(512, 512, dtype=dt), torch.empty(512, dtype=dt),
                    torch.empty(16, 512, dtype=dt), tuning=tun, interpret=False)
        build_grouped_gemm(SimpleNamespace(mode="ids"), tun, False)(
            torch.empty(16, 512, dtype=dt), torch.empty(8, 256, 512, dtype=dt), torch.zeros(16, dtype=torch.int32),
            torch.empty(16, 256, dtype=dt))
        x = torch.empty(8, 4096, dtype=dt)
        build_rms_norm(SimpleNamespace(eps=1e-6, hidden_size=4096), tun, False)(x, x[0], x, x.clone(), x.clone())
        build_layer_norm(SimpleNamespace(eps=1e-5, hidden_size=4096), tun, False)(x, x[0], x[0], x.clone())
        build_rotary(SimpleNamespace(head_size=128, rotary_dim=64, style="neox"), tun, False)(
            torch.zeros(40, dtype=torch.int64), q, k, torch.empty(64, 64), q, k)
        build_gated_activation(SimpleNamespace(approximate="tanh"), tun, False, "gelu")(x, torch.empty(8, 2048, dtype=dt))
    kernels = {name for name, _, _ in log}
    assert kernels == {"unified_attention_kernel", "attention_merge_kernel", "reshape_and_cache_kernel",
                       "gemm_kernel", "grouped_gemm_kernel", "rms_norm_kernel", "layer_norm_kernel", "rotary_kernel", "gated_activation_kernel"}
