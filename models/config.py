"""Our own parsed view of a Hugging Face ``config.json``: one frozen dataclass for every family.

Nothing here needs transformers: a family parses the plain dict (as read from ``config.json`` or from
``PretrainedConfig.to_dict()``) with :func:`parse_common` plus its own fields. Both spellings of rotary settings
are accepted: transformers 5's ``rope_parameters`` and the older ``rope_theta`` + ``rope_scaling``.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Dict, Mapping, Optional, Tuple

__all__ = ["ModelConfig", "ConfigError", "parse_common", "rope_settings", "layer_windows", "activation_of"]

from ..core.errors import AnyaccelError


class ConfigError(AnyaccelError, ValueError):
    """A config.json lacks a field the family needs, or holds a value we cannot honour."""


@dataclass(frozen=True)
class ModelConfig:
    """The facts a model is built from. Sizes are resolved (``head_size`` is never missing).

    ``sliding_windows`` has one entry per layer (``None``: full attention). ``rope_scaling`` is the HF dict of
    the scaling variant (``rope_type`` plus its parameters) or ``None``. ``raw`` keeps the original dict.
    ``attention_bias`` is the q/k/v projections' bias, ``o_bias`` the output projection's. ``embed_scale``,
    ``norm_offset`` (weights stored as ``w`` applied as ``1 + w``) and ``sandwich_norms`` (norms after attention
    and after the MLP too) are the Gemma variations.
    """

    architecture: str
    model_type: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_size: int
    intermediate_size: int
    max_position: int
    norm_eps: float
    hidden_act: str = "silu"
    rope_theta: float = 10000.0
    rope_scaling: Optional[Mapping[str, Any]] = None
    partial_rotary_factor: float = 1.0
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    sliding_windows: Tuple[Optional[int], ...] = ()
    qk_norm: bool = False
    attn_soft_cap: Optional[float] = None
    final_soft_cap: Optional[float] = None
    attn_scale: Optional[float] = None
    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    shared_expert_intermediate_size: int = 0
    norm_topk_prob: bool = True
    moe_layers: Tuple[bool, ...] = ()
    type_vocab_size: int = 0
    bos_token_id: Optional[int] = None
    eos_token_ids: Tuple[int, ...] = ()
    pad_token_id: Optional[int] = None
    embed_scale: bool = False
    norm_offset: bool = False
    sandwich_norms: bool = False
    raw: Dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    @property
    def rotary_dim(self) -> int:
        return int(self.head_size * self.partial_rotary_factor)

    @property
    def eos_token_id(self) -> Optional[int]:
        return self.eos_token_ids[0] if self.eos_token_ids else None

    def replace(self, **changes: Any) -> "ModelConfig":
        return dataclasses.replace(self, **changes)


def _need(d: Mapping[str, Any], *names: str, default: Any = dataclasses.MISSING) -> Any:
    for n in names:
        if d.get(n) is not None:
            return d[n]
    if default is dataclasses.MISSING:
        arch = (d.get("architectures") or [d.get("model_type", "?")])[0]
        raise ConfigError(f"config of {arch}: missing field {' / '.join(repr(n) for n in names)}")
    return default


def rope_settings(d: Mapping[str, Any]) -> Tuple[float, Optional[Dict[str, Any]], float]:
    """``(rope_theta, scaling dict or None, partial_rotary_factor)`` from either config spelling."""
    params = d.get("rope_parameters")
    if isinstance(params, Mapping) and params and not all(isinstance(v, Mapping) for v in params.values()):
        theta = float(params.get("rope_theta", d.get("rope_theta", 10000.0)))
        partial = float(params.get("partial_rotary_factor", d.get("partial_rotary_factor", 1.0)) or 1.0)
        scaling = {k: v for k, v in params.items() if k not in ("rope_theta", "partial_rotary_factor")}
    else:
        theta = float(d.get("rope_theta", 10000.0) or 10000.0)
        partial = float(d.get("partial_rotary_factor", 1.0) or 1.0)
        scaling = dict(d.get("rope_scaling") or {})
    rtype = scaling.get("rope_type", scaling.get("type", "default"))
    if rtype in (None, "default"):
        return theta, None, partial
    scaling["rope_type"] = rtype
    scaling.pop("type", None)
    return theta, scaling, partial


def layer_windows(d: Mapping[str, Any], num_layers: int, default_all: bool) -> Tuple[Optional[int], ...]:
    """Per-layer sliding windows: from ``layer_types`` when present, else the whole model (``default_all``)."""
    window = d.get("sliding_window")
    types = d.get("layer_types")
    if types:
        if len(types) != num_layers:
            raise ConfigError(f"layer_types has {len(types)} entries for {num_layers} layers")
        if any(t == "sliding_attention" for t in types) and not window:
            raise ConfigError("layer_types names sliding_attention layers but sliding_window is not set")
        return tuple(int(window) if t == "sliding_attention" else None for t in types)
    if default_all and window:
        return (int(window),) * num_layers
    return (None,) * num_layers


_ACTS = {"silu": "silu", "swish": "silu", "gelu": "gelu", "gelu_pytorch_tanh": "gelu_tanh", "gelu_new": "gelu_tanh",
         "gelu_fast": "gelu_tanh", "gelu_python": "gelu", "relu": "relu"}


def activation_of(name: str) -> str:
    """HF activation name -> ours: ``silu``, ``gelu`` (erf), ``gelu_tanh`` or ``relu``."""
    try:
        return _ACTS[name]
    except KeyError:
        raise ConfigError(f"activation {name!r} is not supported (supported: {sorted(_ACTS)})") from None


def parse_common(d: Mapping[str, Any], architecture: str, tie_default: bool = False) -> Dict[str, Any]:
    """The fields every decoder family shares, as keyword arguments of :class:`ModelConfig`."""
    hidden = int(_need(d, "hidden_size", "n_embd"))
    heads = int(_need(d, "num_attention_heads", "n_head"))
    kv = int(_need(d, "num_key_value_heads", default=heads) or heads)
    if heads % kv:
        raise ConfigError(f"num_attention_heads {heads} is not a multiple of num_key_value_heads {kv}")
    head_size = d.get("head_dim") or hidden // heads
    layers = int(_need(d, "num_hidden_layers", "n_layer"))
    theta, scaling, partial = rope_settings(d)
    eos = d.get("eos_token_id")
    eos_ids = tuple(eos) if isinstance(eos, (list, tuple)) else (() if eos is None else (int(eos),))
    return dict(
        architecture=architecture,
        model_type=str(d.get("model_type", "")),
        vocab_size=int(_need(d, "vocab_size")),
        hidden_size=hidden,
        num_layers=layers,
        num_heads=heads,
        num_kv_heads=kv,
        head_size=int(head_size),
        intermediate_size=int(_need(d, "intermediate_size", "n_inner", default=4 * hidden) or 4 * hidden),
        max_position=int(_need(d, "max_position_embeddings", "n_positions", default=2048)),
        norm_eps=float(_need(d, "rms_norm_eps", "layer_norm_eps", "layer_norm_epsilon", default=1e-6)),
        hidden_act=activation_of(str(_need(d, "hidden_activation", "hidden_act", "activation_function",
                                           default="silu"))),
        rope_theta=theta,
        rope_scaling=scaling,
        partial_rotary_factor=partial,
        tie_word_embeddings=bool(d.get("tie_word_embeddings", tie_default)),
        attention_bias=bool(d.get("attention_bias", False)),
        o_bias=bool(d.get("attention_bias", False)),
        mlp_bias=bool(d.get("mlp_bias", False)),
        sliding_windows=(None,) * layers,
        bos_token_id=d.get("bos_token_id"),
        eos_token_ids=eos_ids,
        pad_token_id=d.get("pad_token_id"),
        raw=dict(d),
    )
