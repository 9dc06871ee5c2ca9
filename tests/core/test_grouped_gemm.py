"""The grouped GEMM op: validation names the argument; native and cpu kernels match the float64 reference."""
from __future__ import annotations

import pytest
import torch

from anyaccel.core.errors import InvalidArgumentError
from anyaccel.core.gemm import GroupedGemm, GroupedGemmSpec, grouped_gemm_reference


@pytest.fixture(scope="module")
def cpu():
    from anyaccel.plugins.manager import get_registry

    return get_registry().get("cpu")


@pytest.fixture(scope="module")
def no_kernels():
    from anyaccel.core.backend import Backend, BackendDef

    return Backend.local(BackendDef(name="bare", vendor="test", device_type="cpu"), [])


def _inputs(m, k, n, e, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, e, (m,), generator=g)
    return torch.randn(m, k, generator=g), torch.randn(e, n, k, generator=g), ids


@pytest.mark.parametrize("which", ["cpu", "no_kernels"])
@pytest.mark.parametrize("mode", ["ids", "segments"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_matches_reference(request, which, mode, dtype):
    backend = request.getfixturevalue(which)
    x, w, ids = _inputs(37, 24, 20, 5)
    if mode == "segments":
        ids, order = torch.sort(ids)
        x = x[order]
        groups = torch.bincount(ids, minlength=5)
    else:
        groups = ids
    op = GroupedGemm.build(GroupedGemmSpec(dtype=dtype, num_experts=5, mode=mode, in_features=24, out_features=20),
                           backend)
    assert op.selection.fallback == (which == "no_kernels")
    out = torch.full((37, 20), float("nan"), dtype=dtype)
    y = op(x.to(dtype), w.to(dtype), groups, out=out)
    assert y is out
    ref = grouped_gemm_reference(x.to(dtype), w.to(dtype), groups, mode)
    tol = 1e-5 if dtype == torch.float32 else 0.1
    assert float((y.double() - ref).abs().max()) < tol
    # row m used expert e(m): recompute one row by hand
    e0 = int(ids[3])
    torch.testing.assert_close(y[3].double(), x[3].to(dtype).double() @ w[e0].to(dtype).double().T,
                               rtol=0, atol=tol)


def test_validation_names_arguments(cpu):
    op = GroupedGemm.build(GroupedGemmSpec(num_experts=4, mode="ids"), cpu)
    x, w, ids = _inputs(6, 8, 10, 4)
    with pytest.raises(InvalidArgumentError, match="'groups': expected expert ids in \\[0, 4\\)"):
        op(x, w, ids + 4)
    with pytest.raises(InvalidArgumentError, match="'weight'"):
        op(x, w[:3], ids)
    with pytest.raises(InvalidArgumentError, match="'x'"):
        op(x[:, :7], w, ids)
    with pytest.raises(InvalidArgumentError, match="'groups'"):
        op(x, w, ids.float())
    seg = GroupedGemm.build(GroupedGemmSpec(num_experts=4, mode="segments"), cpu)
    with pytest.raises(InvalidArgumentError, match="summing to M = 6"):
        seg(x, w, torch.tensor([1, 1, 1, 1]))
    with pytest.raises(InvalidArgumentError, match="spec.mode"):
        GroupedGemm.build(GroupedGemmSpec(num_experts=4, mode="sorted"), cpu)
    with pytest.raises(InvalidArgumentError, match="spec.num_experts"):
        GroupedGemm.build(GroupedGemmSpec(num_experts=0), cpu)


def test_empty_batch_and_empty_experts(cpu):
    op = GroupedGemm.build(GroupedGemmSpec(num_experts=3, mode="segments"), cpu)
    w = torch.randn(3, 4, 5)
    assert op(torch.randn(0, 5), w, torch.tensor([0, 0, 0])).shape == (0, 4)
    x = torch.randn(4, 5)
    y = op(x, w, torch.tensor([0, 4, 0]))
    torch.testing.assert_close(y, x @ w[1].T)


@pytest.mark.parametrize("mode", ["ids", "segments"])
def test_strided_groups_reach_the_kernel_contiguous(mode):
    from anyaccel.core import Backend, BackendDef, KernelImpl

    seen = []

    def build(spec):
        def kernel(x, w, groups, out):
            seen.append(groups.is_contiguous())
            return out.copy_(grouped_gemm_reference(x, w, groups, mode))
        return kernel

    backend = Backend.local(BackendDef("spy", "tests", "cpu"), [KernelImpl("grouped_gemm", "spy", "spy.gg", build)])
    op = GroupedGemm.build(GroupedGemmSpec(num_experts=3, mode=mode), backend)
    x, w = torch.randn(4, 5), torch.randn(3, 2, 5)
    dense = torch.tensor([0, 0, 2, 1]) if mode == "ids" else torch.tensor([2, 1, 1])
    groups = torch.stack([dense, torch.full_like(dense, 99)], 1)[:, 0]  # stride 2, junk in the gaps
    assert not groups.is_contiguous()
    y = op(x, w, groups)
    assert seen == [True]
    torch.testing.assert_close(y.double(), grouped_gemm_reference(x, w, dense, mode))


def test_spec_rejects_bool_sizes(cpu):
    with pytest.raises(InvalidArgumentError, match="spec.num_experts"):
        GroupedGemm.build(GroupedGemmSpec(num_experts=True), cpu)
    with pytest.raises(InvalidArgumentError, match="spec.out_features"):
        GroupedGemm.build(GroupedGemmSpec(num_experts=2, out_features=True), cpu)
