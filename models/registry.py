"""The registry from Hugging Face architecture names (``LlamaForCausalLM``, ...) to our model classes."""
from __future__ import annotations

from typing import Dict, List, Type

from ..core.errors import UnsupportedError
from .base import Model

__all__ = ["MODEL_CLASSES", "register", "resolve", "supported_architectures", "families"]

MODEL_CLASSES: Dict[str, Type[Model]] = {}
_BY_MODEL_TYPE: Dict[str, Type[Model]] = {}


def register(cls: Type[Model]) -> Type[Model]:
    for arch in cls.architectures:
        MODEL_CLASSES[arch] = cls
    for mt in cls.model_types:
        _BY_MODEL_TYPE[mt] = cls
    return cls


def _load_builtins() -> None:
    if MODEL_CLASSES:
        return
    from .bert import BertModel
    from .gemma import Gemma2ForCausalLM, GemmaForCausalLM
    from .gpt2 import GPT2LMHeadModel
    from .llama import LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM
    from .mixtral import MixtralForCausalLM
    from .phi3 import Phi3ForCausalLM
    from .qwen2_moe import Qwen2MoeForCausalLM, Qwen3MoeForCausalLM

    for cls in (LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM, GemmaForCausalLM,
                Gemma2ForCausalLM, Phi3ForCausalLM, GPT2LMHeadModel, MixtralForCausalLM, Qwen2MoeForCausalLM,
                Qwen3MoeForCausalLM, BertModel):
        register(cls)


def supported_architectures() -> List[str]:
    _load_builtins()
    return sorted(MODEL_CLASSES)


def families() -> Dict[str, List[str]]:
    """Class name -> the architectures it serves (``anyaccel models``)."""
    _load_builtins()
    out: Dict[str, List[str]] = {}
    for arch, cls in sorted(MODEL_CLASSES.items()):
        out.setdefault(cls.__name__, []).append(arch)
    return out


def resolve(config: dict) -> tuple:
    """``(architecture, class)`` for a config dict: its first ``architectures`` entry, else its ``model_type``."""
    _load_builtins()
    archs = config.get("architectures") or []
    for arch in archs:
        if arch in MODEL_CLASSES:
            return arch, MODEL_CLASSES[arch]
    if not archs:
        mt = config.get("model_type")
        if mt in _BY_MODEL_TYPE:
            cls = _BY_MODEL_TYPE[mt]
            return cls.architectures[0], cls
    name = ", ".join(archs) if archs else f"model_type {config.get('model_type')!r}"
    raise UnsupportedError(f"architecture {name} is not supported; supported architectures: "
                           f"{', '.join(supported_architectures())}")
