"""core.gemm: validation before any kernel runs, the float64 reference, the native fallback."""
from __future__ import annotations

import pytest
import torch

from anyaccel.core import Backend, BackendDef, Gemm, GemmSpec, InvalidArgumentError, KernelImpl

CALLS = []


def _spy_backend():
    def build(spec):
        def kernel(x, w, b, out):
            CALLS.append(1)
            return out.zero_()
        return kernel

    return Backend.local(BackendDef("spy", "tests", "cpu"), [KernelImpl("gemm", "spy", "spy.gemm", build)])


@pytest.fixture
def op():
    CALLS.clear()
    return Gemm.build(GemmSpec(torch.float32, has_bias=True, in_features=8, out_features=4), _spy_backend())


W = torch.randn(4, 8)
B = torch.randn(4)


@pytest.mark.parametrize("args,argument,fragment", [
    ((torch.randn(3, 7), W, B), "x", "last dim K = 8"),
    ((torch.randn(3, 8).int(), W, B), "x", "dtype"),
    ((torch.randn(3, 8).double(), W, B), "x", "dtype"),
    ((torch.randn(3, 8), torch.randn(4, 8, 1), B), "weight", "2-d"),
    ((torch.randn(3, 8), torch.randn(5, 8), torch.randn(5)), "weight", "N = 4 rows"),
    ((torch.randn(3, 8), W, torch.randn(5)), "bias", "shape [4]"),
    ((torch.randn(3, 8), W, None), "bias", "a tensor [N]"),
    ((torch.randn(3, 8), W.half(), B), "weight", "dtype"),
    (("not a tensor", W, B), "x", "torch.Tensor"),
    ((torch.randn(3, 8, device="meta"), W, B), "x", "a tensor on cpu"),
])
def test_bad_input_is_rejected_before_the_kernel(op, args, argument, fragment):
    with pytest.raises(InvalidArgumentError) as e:
        op(*args)
    assert e.value.argument == argument
    assert f"argument '{argument}'" in str(e.value) and fragment in str(e.value)
    assert "received" in str(e.value)
    assert CALLS == []


def test_bad_out_is_rejected(op):
    for out in (torch.empty(3, 5), torch.empty(3, 4, dtype=torch.float16), torch.empty(4, 3).t()):
        with pytest.raises(InvalidArgumentError, match="'out'"):
            op(torch.randn(3, 8), W, B, out=out)
    assert CALLS == []


def test_bad_spec_is_rejected_at_build():
    with pytest.raises(InvalidArgumentError, match="spec.dtype"):
        Gemm.build(GemmSpec(torch.int8), _spy_backend())
    with pytest.raises(InvalidArgumentError, match="spec.in_features"):
        Gemm.build(GemmSpec(torch.float32, in_features=0), _spy_backend())
    with pytest.raises(InvalidArgumentError, match="GemmSpec"):
        Gemm.build("gemm", _spy_backend())


def test_reference_is_float64_and_exact_on_integers():
    x = torch.arange(6.0).reshape(2, 3)
    w = torch.arange(12.0).reshape(4, 3)
    y = Gemm.reference(x, w, torch.ones(4))
    assert y.dtype == torch.float64
    assert y.tolist() == [[6.0, 15.0, 24.0, 33.0], [15.0, 51.0, 87.0, 123.0]]


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float16, 2e-2), (torch.bfloat16, 1e-1)])
@pytest.mark.parametrize("bias", [False, True])
def test_native_fallback_matches_reference_with_leading_dims(dtype, tol, bias):
    be = Backend.local(BackendDef("empty", "tests", "cpu"), [])
    op = Gemm.build(GemmSpec(dtype, has_bias=bias), be)
    assert op.selection.fallback
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 16, generator=g).to(dtype)
    w = torch.randn(5, 16, generator=g).to(dtype)
    b = torch.randn(5, generator=g).to(dtype) if bias else None
    y = op(x, w, b)
    assert y.shape == (2, 3, 5) and y.dtype == dtype
    torch.testing.assert_close(y.double(), Gemm.reference(x, w, b), rtol=tol, atol=tol)


def test_out_dtype_differs_from_input():
    be = Backend.local(BackendDef("empty", "tests", "cpu"), [])
    op = Gemm.build(GemmSpec(torch.bfloat16, out_dtype=torch.float32), be)
    x, w = torch.randn(4, 8).bfloat16(), torch.randn(3, 8).bfloat16()
    y = op(x, w)
    assert y.dtype == torch.float32
    torch.testing.assert_close(y.double(), Gemm.reference(x, w), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kw,argument", [
    (dict(out_dtype="float16"), "spec.out_dtype"),
    (dict(out_dtype=torch.int8), "spec.out_dtype"),
    (dict(out_dtype=torch.float64), "spec.out_dtype"),
    (dict(out_features=True), "spec.out_features"),
    (dict(in_features=False), "spec.in_features"),
    (dict(in_features=2.0), "spec.in_features"),
    (dict(has_bias=1), "spec.has_bias"),
    (dict(has_bias="yes"), "spec.has_bias"),
])
def test_spec_fields_are_checked_at_build_not_at_the_first_call(kw, argument):
    with pytest.raises(InvalidArgumentError) as e:
        Gemm.build(GemmSpec(torch.float32, **kw), _spy_backend())
    assert e.value.argument == argument and "received" in str(e.value)


def test_strided_bias_is_rejected_naming_it(op):
    strided = torch.randn(8)[::2]  # [4], stride 2: a kernel reading it densely would take the wrong values
    with pytest.raises(InvalidArgumentError) as e:
        op(torch.randn(3, 8), W, strided)
    assert e.value.argument == "bias" and "contiguous" in str(e.value)
    assert CALLS == []
    op(torch.randn(3, 8), W, strided.contiguous())
    assert CALLS == [1]
