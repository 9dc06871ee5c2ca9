"""Models written once against the core: shared layers, one file per family, HF weight loading, the runner.

``build_model(dir | transformers model | config dict, backend, dtype)`` builds any registered family;
``supported_architectures()`` lists them.
"""
from .base import Model, WeightLoadError, build_model, parse_dtype
from .config import ConfigError, ModelConfig
from .registry import families, supported_architectures

__all__ = ["Model", "ModelConfig", "ConfigError", "WeightLoadError", "build_model", "parse_dtype",
           "supported_architectures", "families"]
