"""cuda, rocm and triton-interpreter register the same shared kernels, each with its own tuning; cuda and rocm
declare their vendor BLAS as the GEMM alternative outside the Triton GEMM's shape range."""
from __future__ import annotations

import pytest
import torch

from anyaccel.core.gemm import Gemm, GemmSpec
from anyaccel.core.dispatch import select


@pytest.fixture(scope="module")
def registry():
    from anyaccel.plugins import discover

    return discover()


def _ops(backend):
    return {k.op for k in backend.kernels if ".triton." in k.name or k.backend == "triton-interpreter"}


def test_gpu_backends_use_the_shared_kernels(registry):
    cuda, rocm, interp = registry.get("cuda"), registry.get("rocm"), registry.get("triton-interpreter")
    shared = _ops(interp)
    assert {"gemm", "grouped_gemm", "rms_norm", "layer_norm", "rotary_embedding", "silu_and_mul",
            "gelu_and_mul"} <= shared
    assert _ops(cuda) == shared and _ops(rocm) == shared
    # descriptions name each backend's own tuning
    tuning_names = {b.name: {k.description.rsplit("tuning ", 1)[1] for k in b.kernels if "tuning " in k.description}
                    for b in (cuda, rocm, interp)}
    assert tuning_names["triton-interpreter"] == {"interpreter)"}
    assert all(n.startswith("nvidia-sm") for n in tuning_names["cuda"])
    assert all(n.startswith("amd-gfx") for n in tuning_names["rocm"])


def test_vendor_tunings_differ_where_the_hardware_does():
    from anyaccel.backends.cuda.tuning import tuning_for as cuda
    from anyaccel.backends.rocm.tuning import tuning_for as rocm

    mi300 = rocm("gfx942:sramecc+:xnack-")
    assert dict(mi300.launch_options) == {"waves_per_eu": 2, "matrix_instr_nonkdim": 16}
    assert dict(cuda((9, 0)).launch_options) == {}
    assert torch.bfloat16 not in cuda((7, 5)).limits.dtypes          # no bf16 tensor cores before Ampere
    assert not cuda((9, 0)).dot_upcast and not mi300.dot_upcast


@pytest.mark.parametrize("name,blas", [("cuda", "cuda.gemm.cublas"), ("rocm", "rocm.gemm.hipblas")])
def test_blas_alternative_by_declared_range(registry, name, blas):
    backend = registry.get(name)
    _, big = select(Gemm, GemmSpec(torch.bfloat16, in_features=4096, out_features=4096), backend, strict=True)
    assert big.chosen == f"{name}.triton.gemm"
    _, small = select(Gemm, GemmSpec(torch.bfloat16, in_features=64, out_features=4096), backend, strict=True)
    assert small.chosen == blas
    rejected = {c.name: c.reasons for c in small.candidates if not c.chosen}
    assert any("below this kernel's declared range" in r for r in rejected[f"{name}.triton.gemm"])
