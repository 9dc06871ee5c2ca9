"""Fixtures shared by the project's tests."""
from __future__ import annotations

import os

import pytest

# tests build tiny models from configs and never reach a model hub
os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture
def make_backend():
    """``make_backend(kernels=(), layout="NHD", block_sizes=(16,), name="test")``: a Backend built without plugin
    discovery (an empty kernel list makes every op fall back to the core's native implementation)."""
    from anyaccel.core.backend import Backend, BackendDef

    def make(kernels=(), layout="NHD", block_sizes=(16,), name="test"):
        return Backend.local(BackendDef(name=name, vendor="test", device_type="cpu", kv_cache_layout=layout,
                                        block_sizes=tuple(block_sizes)), list(kernels))

    return make


@pytest.fixture(scope="session")
def cpu_backend():
    """The cpu backend as discovered through the entry points."""
    from anyaccel.plugins.manager import get_registry

    return get_registry().get("cpu")


@pytest.fixture(scope="session")
def reference_models():
    """Built-in tiny transformers models, built once per session (name -> model)."""
    from anyaccel.conformance.models import TINY_CONFIGS, make_reference

    cache = {}

    def get(name):
        if name not in cache:
            cache[name] = make_reference(TINY_CONFIGS[name], seed=0)
        return cache[name]

    return get
