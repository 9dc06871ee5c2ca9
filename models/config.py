"""Our own parsed view of a Hugging Face ``config.json``: one frozen dataclass for every family.

Nothing here needs transformers: a family parses the plain dict (as read from ``config.json`` or from
``PretrainedConfig.to_dict()``) with :func:`parse_common` plus its own fields. Both spellings of rotary settings
are accepted: transformers 5's ``rope_parameters`` and the older ``rope_theta`` + ``rope_scaling``.
"""
from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field
from typing import Any, Dict, Mapping, Optional, Tuple

__all__ = ["ModelConfig", "ConfigError", "parse_common", "rope_settings", "layer_windows", "activation_of",
           "check_config", "estimate_parameters", "estimate_model_bytes", "MAX_MODEL_BYTES", "memory_budget_bytes",
           "check_memory"]

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
        arch = (d.get("architectures") or [d.get("model_type", "?")])
        arch = arch[0] if isinstance(arch, (list, tuple)) and arch else arch
        raise ConfigError(f"config of {arch}: missing field {' / '.join(repr(n) for n in names)}")
    return default


def _found(d: Mapping[str, Any], names: Tuple[str, ...]) -> str:
    return next((n for n in names if d.get(n) is not None), names[0])


def _int(d: Mapping[str, Any], *names: str, default: Any = dataclasses.MISSING, minimum: int = 1) -> int:
    """An integer field (``1024`` or an integral ``1024.0``/``1e3``) ``>= minimum``, else ConfigError naming it."""
    v = _need(d, *names, default=default)
    key = _found(d, names)
    if isinstance(v, float) and math.isfinite(v) and v.is_integer():
        v = int(v)
    if isinstance(v, bool) or not isinstance(v, int):
        raise ConfigError(f"field '{key}': expected an integer >= {minimum}, received {type(v).__name__} {v!r:.60}")
    if v < minimum:
        raise ConfigError(f"field '{key}': expected an integer >= {minimum}, received {v}")
    return v


def _float(d: Mapping[str, Any], *names: str, default: Any = dataclasses.MISSING, positive: bool = True) -> float:
    """A finite number field (``> 0`` when ``positive``), else ConfigError naming it."""
    v = _need(d, *names, default=default)
    key = _found(d, names)
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or (positive and v <= 0):
        raise ConfigError(f"field '{key}': expected a finite number{' > 0' if positive else ''}, received "
                          f"{type(v).__name__} {v!r:.60}")
    return float(v)


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
    hidden = _int(d, "hidden_size", "n_embd")
    heads = _int(d, "num_attention_heads", "n_head")
    kv = _int(d, "num_key_value_heads", default=heads)
    if heads % kv:
        raise ConfigError(f"field 'num_attention_heads': {heads} is not a multiple of num_key_value_heads {kv}")
    head_size = _int(d, "head_dim", default=hidden // heads)
    layers = _int(d, "num_hidden_layers", "n_layer")
    _int(d, "vocab_size")
    _int(d, "intermediate_size", "n_inner", default=4 * hidden)
    _int(d, "max_position_embeddings", "n_positions", default=2048)
    _float(d, "rms_norm_eps", "layer_norm_eps", "layer_norm_epsilon", default=1e-6)
    try:
        theta, scaling, partial = rope_settings(d)
    except (TypeError, ValueError, AttributeError) as e:
        raise ConfigError(f"field 'rope_parameters' / 'rope_scaling' / 'rope_theta': cannot be read ({e})") from None
    if not (math.isfinite(theta) and theta > 0) or not (math.isfinite(partial) and 0 < partial <= 1):
        raise ConfigError(f"field 'rope_theta' / 'partial_rotary_factor': expected rope_theta > 0 and a factor in "
                          f"(0, 1], received {theta} and {partial}")
    # Before anything per layer is built (the tuples below, the families' layer lists): the sizes' memory at the
    # narrowest dtype a model can be built in; Model.__init__ checks again with the real dtype.
    probe = ModelConfig(architecture=architecture, model_type="", vocab_size=_int(d, "vocab_size"),
                        hidden_size=hidden, num_layers=layers, num_heads=heads, num_kv_heads=kv, head_size=head_size,
                        intermediate_size=_int(d, "intermediate_size", "n_inner", default=4 * hidden),
                        max_position=_int(d, "max_position_embeddings", "n_positions", default=2048), norm_eps=1.0)
    check_memory(f"{architecture} (layers={layers}, hidden={hidden}, heads={heads}x{head_size}, "
                 f"max_position={probe.max_position})", estimate_model_bytes(probe, 2))
    eos = d.get("eos_token_id")
    eos_list = list(eos) if isinstance(eos, (list, tuple)) else ([] if eos is None else [eos])
    if not all(isinstance(t, int) and not isinstance(t, bool) for t in eos_list):
        raise ConfigError(f"field 'eos_token_id': expected a token id or a list of them, received {eos!r:.60}")
    eos_ids = tuple(eos_list)
    for key in ("bos_token_id", "pad_token_id"):
        v = d.get(key)
        if v is not None and (isinstance(v, bool) or not isinstance(v, int)):
            raise ConfigError(f"field '{key}': expected a token id (int) or null, received {v!r:.60}")
    return dict(
        architecture=architecture,
        model_type=str(d.get("model_type", "")),
        vocab_size=_int(d, "vocab_size"),
        hidden_size=hidden,
        num_layers=layers,
        num_heads=heads,
        num_kv_heads=kv,
        head_size=head_size,
        intermediate_size=_int(d, "intermediate_size", "n_inner", default=4 * hidden),
        max_position=_int(d, "max_position_embeddings", "n_positions", default=2048),
        norm_eps=_float(d, "rms_norm_eps", "layer_norm_eps", "layer_norm_epsilon", default=1e-6),
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


# ------------------------------------------------------------------------------------------------ sizes

#: The largest model (weights plus position tables) anyaccel builds, whatever the memory reports: 1 TiB. A
#: config beyond it is a typo or an attack, not a model (the largest open models are a few hundred GB in 16 bit).
MAX_MODEL_BYTES = 1 << 40

#: What one layer costs besides its weights (its built ops, specs and selection records), counted as parameters
#: so that a config with millions of tiny layers is refused like one with huge ones: 64 Ki parameters.
_LAYER_OVERHEAD_PARAMS = 1 << 16

_POSITIVE_FIELDS = ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads", "head_size",
                    "intermediate_size", "max_position")


def check_config(c: ModelConfig) -> None:
    """Raise :class:`ConfigError` naming the field of ``c`` that no model could be built with.

    Runs before anything is allocated (``Model.__init__``), on configs from every source: parsed files, dicts,
    transformers objects and :class:`ModelConfig` built by hand.
    """
    for f in _POSITIVE_FIELDS:
        v = getattr(c, f)
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ConfigError(f"{c.architecture}: field '{f}': expected an integer >= 1, received {v!r:.60}")
    if c.num_heads % c.num_kv_heads:
        raise ConfigError(f"{c.architecture}: num_heads {c.num_heads} is not a multiple of num_kv_heads "
                          f"{c.num_kv_heads}")
    for f in ("num_experts", "num_experts_per_tok", "moe_intermediate_size", "shared_expert_intermediate_size",
              "type_vocab_size"):
        v = getattr(c, f)
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise ConfigError(f"{c.architecture}: field '{f}': expected an integer >= 0, received {v!r:.60}")
    if c.num_experts and not 1 <= c.num_experts_per_tok <= c.num_experts:
        raise ConfigError(f"{c.architecture}: field 'num_experts_per_tok': expected 1..{c.num_experts}, received "
                          f"{c.num_experts_per_tok}")
    if not (isinstance(c.norm_eps, (int, float)) and math.isfinite(c.norm_eps) and c.norm_eps > 0):
        raise ConfigError(f"{c.architecture}: field 'norm_eps': expected a finite number > 0, received "
                          f"{c.norm_eps!r}")
    for w in c.sliding_windows:
        if w is not None and (isinstance(w, bool) or not isinstance(w, int) or w < 1):
            raise ConfigError(f"{c.architecture}: field 'sliding_window': expected an integer >= 1, received {w!r}")


def estimate_parameters(c: ModelConfig) -> int:
    """An upper estimate of the parameter count of a model built from ``c`` (exact Python ints, no overflow).

    Embeddings and head, per layer attention (q, k, v, o), the MLP (gated: three matrices; MoE: every expert, the
    router and a shared expert), norms, and a position table (learned or rotary) of ``max_position`` rows.
    """
    h, layers = c.hidden_size, c.num_layers
    q, kv = c.num_heads * c.head_size, c.num_kv_heads * c.head_size
    attn = h * (q + 2 * kv) + q * h + 2 * (q + kv)
    if c.num_experts:
        inter = c.moe_intermediate_size or c.intermediate_size
        mlp = c.num_experts * (3 * h * inter + h) + 3 * h * c.shared_expert_intermediate_size + h
    else:
        mlp = 3 * h * c.intermediate_size + 2 * c.intermediate_size
    per_layer = attn + mlp + 6 * h + _LAYER_OVERHEAD_PARAMS
    embed = c.vocab_size * h * (1 if c.tie_word_embeddings else 2)
    positions = c.max_position * max(h, c.head_size) + c.type_vocab_size * h
    return embed + layers * per_layer + positions + 2 * h


def estimate_model_bytes(c: ModelConfig, dtype_bytes: int) -> int:
    """Bytes a built and loaded model holds: parameters x ``dtype_bytes`` (the position tables counted in
    float32, as the rotary cache is kept). The KV cache is sized later, by the runner, and checked there."""
    return estimate_parameters(c) * dtype_bytes + c.max_position * max(c.hidden_size, c.head_size) * 4


def _meminfo_available() -> Optional[int]:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def memory_budget_bytes(device: Any = None) -> int:
    """The memory a model and its KV cache may take on ``device``, in bytes.

    ``ANYACCEL_MEMORY_BUDGET_BYTES`` when set; else the device module's free memory where it reports one
    (``torch.<device type>.mem_get_info``), else the host's available RAM (``MemAvailable``); never more than
    :data:`MAX_MODEL_BYTES`.
    """
    raw = os.environ.get("ANYACCEL_MEMORY_BUDGET_BYTES", "").strip()
    if raw:
        try:
            v = int(float(raw))
        except ValueError:
            raise ConfigError(f"ANYACCEL_MEMORY_BUDGET_BYTES: expected a number of bytes, received {raw!r}") from None
        if v < 1:
            raise ConfigError(f"ANYACCEL_MEMORY_BUDGET_BYTES: expected a number of bytes >= 1, received {raw!r}")
        return min(v, MAX_MODEL_BYTES)
    found: Optional[int] = None
    dev_type = getattr(device, "type", None) or (str(device).split(":")[0] if device is not None else "cpu")
    if dev_type != "cpu":
        import torch

        mod = getattr(torch, dev_type, None)
        info = getattr(mod, "mem_get_info", None)
        if callable(info):
            try:
                found = int(info(device)[0])
            except Exception:  # an unavailable device: fall back to the host's memory
                found = None
    if found is None:
        found = _meminfo_available()
    return min(found, MAX_MODEL_BYTES) if found else MAX_MODEL_BYTES


def check_memory(what: str, need_bytes: int, device: Any = None, hint: str = "") -> None:
    """Raise :class:`ConfigError` when ``need_bytes`` exceeds :func:`memory_budget_bytes` (before allocating)."""
    budget = memory_budget_bytes(device)
    if need_bytes > budget:
        raise ConfigError(f"{what} needs about {_fmt_bytes(need_bytes)}, more than the memory budget of "
                          f"{_fmt_bytes(budget)} (available memory, capped at {_fmt_bytes(MAX_MODEL_BYTES)}; "
                          f"ANYACCEL_MEMORY_BUDGET_BYTES overrides){'; ' + hint if hint else ''}")


def _fmt_bytes(n: int) -> str:
    for unit, size in (("TiB", 1 << 40), ("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= size:
            return f"{n / size:.3g} {unit}" if n < size * 10**6 else f"{n:.3e} bytes"
    return f"{n} bytes"
