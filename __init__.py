"""anyaccel: a hardware-pluggable backend layer for LLM inference.

A neutral core (:mod:`anyaccel.core`) defines the ops, validates every call and carries a float64 reference of
each; backends are plugins (:mod:`anyaccel.plugins`); models are written once against the core
(:mod:`anyaccel.models`); the conformance suite (:mod:`anyaccel.conformance`) proves each backend runs them as
the reference does.
"""
__version__ = "0.1.0"

from .core.version import API_VERSION

__all__ = ["__version__", "API_VERSION", "LLM", "SamplingParams"]


def __getattr__(name: str):
    """``anyaccel.LLM`` and ``anyaccel.SamplingParams`` load the serving layer on first use, so ``import anyaccel``
    stays cheap (no torch model code, no tokenizers)."""
    if name in ("LLM", "SamplingParams"):
        from . import serve

        return getattr(serve, name)
    raise AttributeError(f"module 'anyaccel' has no attribute {name!r}")
