"""Fixtures shared by the project's tests."""
from __future__ import annotations

import pytest


@pytest.fixture
def make_backend():
    """``make_backend(kernels=(), layout="NHD", block_sizes=(16,), name="test")``: a Backend built without plugin
    discovery (an empty kernel list makes every op fall back to the core's native implementation)."""
    from anyaccel.core.backend import Backend, BackendDef

    def make(kernels=(), layout="NHD", block_sizes=(16,), name="test"):
        return Backend.local(BackendDef(name=name, vendor="test", device_type="cpu", kv_cache_layout=layout,
                                        block_sizes=tuple(block_sizes)), list(kernels))

    return make
