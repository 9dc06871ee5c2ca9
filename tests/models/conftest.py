"""Fixtures for the model tests: the cpu backend, offline transformers, tiny reference models."""
from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session")
def cpu_backend():
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
