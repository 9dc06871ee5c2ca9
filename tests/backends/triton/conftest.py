"""Fixtures of the Triton kernel tests: the triton-interpreter backend, found through plugin discovery."""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton", reason="the triton-interpreter tier needs triton installed")

# tolerances for one output element against the float64 reference, by dtype (outputs of order one):
# the output rounding of the dtype plus a little accumulated error
TOL = {torch.float32: 2e-5, torch.float16: 4e-3, torch.bfloat16: 4e-2}


@pytest.fixture(scope="session")
def interp():
    from anyaccel.plugins import discover

    backend = discover().get("triton-interpreter")
    assert backend.available, backend.reason
    return backend


@pytest.fixture(scope="session")
def interp_tuning():
    from anyaccel.backends.triton_interpreter.plugin import tuning

    return tuning()


def _assert_close(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype, scale: float = 1.0) -> None:
    assert not torch.isnan(out).any(), "the kernel left elements unwritten (NaN poison survived)"
    tol = TOL[dtype] * scale
    torch.testing.assert_close(out.double(), ref.double(), rtol=tol, atol=tol)


@pytest.fixture(scope="session")
def close():
    """``close(out, ref, dtype, scale=1)``: no NaN left, and within the dtype's tolerance (times ``scale``)."""
    return _assert_close
