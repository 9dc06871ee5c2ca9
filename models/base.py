"""The model interface every family implements, and weight loading by declared rules.

A model is built from our own :class:`ModelConfig` on one backend and dtype; every op is selected at build time.
Interface (the runner relies on it):

- ``config``, ``eos_token_id``, ``is_causal``, ``dtype``, ``device``;
- ``kv_cache_specs() -> list[AttentionSpec]`` (one per layer; sliding-window layers differ);
- ``forward(input_ids[T], positions[T], kv_caches, meta) -> hidden[T, H]`` (decoders; K/V are written into the
  caches at ``meta.slot_mapping`` first);
- ``compute_logits(hidden[T, H]) -> logits[T, V]`` float32;
- ``encode(input_ids[T], token_type_ids[T] | None, positions[T], meta, kv_caches=None) -> hidden[T, H]`` (encoders);
- ``load_weights(iterable of (hf_name, tensor))``.

Loading: a family declares :class:`WeightRule` s, each producing one internal tensor from one or more checkpoint
tensors (alternative spellings allowed: transformers 5 objects fuse MoE experts, checkpoints on disk do not).
A missing tensor, a wrong shape or an unexpected tensor is a :class:`WeightLoadError` naming the tensor.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import torch

from ..core.attention import AttentionMetadata, AttentionSpec
from ..core.backend import Backend
from ..core.errors import AnyaccelError
from .config import ConfigError, ModelConfig, check_config, check_memory, estimate_model_bytes

__all__ = ["Model", "WeightLoadError", "WeightSource", "WeightRule", "single", "concat", "stack_experts",
           "allocate_kv_caches"]


class WeightLoadError(AnyaccelError, ValueError):
    """A checkpoint does not fit the model: a tensor is missing, has the wrong shape, or is unexpected."""


Shape = Tuple[int, ...]


@dataclass(frozen=True)
class WeightSource:
    """One way to obtain an internal tensor: these checkpoint names, with these shapes, combined by ``combine``."""

    names: Tuple[str, ...]
    shapes: Tuple[Shape, ...]
    combine: Callable[[List[torch.Tensor]], torch.Tensor]


@dataclass(frozen=True)
class WeightRule:
    """Internal tensor ``target`` from the first of ``options`` whose tensors are all present.

    ``transform`` runs on the combined tensor in float32 (e.g. Gemma's ``1 + w``, GPT-2's Conv1D transpose)
    before the cast to the model dtype.
    """

    target: str
    options: Tuple[WeightSource, ...]
    transform: Optional[Callable[[torch.Tensor], torch.Tensor]] = None


def _first(ts: List[torch.Tensor]) -> torch.Tensor:
    return ts[0]


def _cat0(ts: List[torch.Tensor]) -> torch.Tensor:
    return torch.cat(ts, dim=0)


def single(target: str, name: str, shape: Sequence[int],
           transform: Optional[Callable[[torch.Tensor], torch.Tensor]] = None) -> WeightRule:
    return WeightRule(target, (WeightSource((name,), (tuple(shape),), _first),), transform)


def concat(names: Sequence[str], shapes: Sequence[Sequence[int]]) -> WeightSource:
    """A source concatenating ``names`` along dim 0 (q|k|v, gate|up)."""
    return WeightSource(tuple(names), tuple(tuple(s) for s in shapes), _cat0)


def stack_experts(names_per_expert: Sequence[Sequence[str]], shapes: Sequence[Sequence[int]]) -> WeightSource:
    """A source stacking per-expert tensors into [E, ...]; each expert may itself concatenate several (w1|w3)."""
    per = len(names_per_expert[0])
    flat = tuple(n for group in names_per_expert for n in group)
    flat_shapes = tuple(tuple(shapes[i % per]) for i in range(len(flat)))

    def combine(ts: List[torch.Tensor]) -> torch.Tensor:
        return torch.stack([torch.cat(ts[e * per:(e + 1) * per], dim=0) for e in range(len(names_per_expert))])

    combine.per_expert = per  # read by the tensor-parallel loader (models/parallel.py) to slice each expert
    return WeightSource(flat, flat_shapes, combine)


def allocate_kv_caches(specs: Sequence[AttentionSpec], num_blocks: int, device: torch.device
                       ) -> List[Tuple[torch.Tensor, torch.Tensor]]:
    """Zeroed ``(k_cache, v_cache)`` per layer in each spec's layout (NHD: [B, P, Hkv, D]; HND: [B, Hkv, P, D])."""
    caches = []
    for s in specs:
        dt = s.kv_cache_dtype or s.dtype
        if s.kv_layout == "HND":
            shape = (num_blocks, s.num_kv_heads, s.block_size, s.head_size)
        else:
            shape = (num_blocks, s.block_size, s.num_kv_heads, s.head_size)
        caches.append((torch.zeros(shape, dtype=dt, device=device), torch.zeros(shape, dtype=dt, device=device)))
    return caches


class Model:
    """Base class of every family. Subclasses build their layers in ``__init__`` and declare ``weight_rules``."""

    #: HF architecture names this class serves (the registry reads it).
    architectures: Tuple[str, ...] = ()
    #: ``model_type`` values this class serves (used when a config names no architecture).
    model_types: Tuple[str, ...] = ()
    is_causal: bool = True
    #: checkpoint name prefixes removed before matching (``model.``, ``transformer.``, ``bert.``).
    strip_prefixes: Tuple[str, ...] = ()
    #: checkpoint names that are fine to find and ignore (buffers, heads we do not use).
    ignore_patterns: Tuple[str, ...] = (r".*rotary_emb\.inv_freq$",)

    def __init__(self, config: ModelConfig, backend: Backend, dtype: torch.dtype, strict: bool = False,
                 block_size: Optional[int] = None) -> None:
        if not isinstance(config, ModelConfig):
            raise ConfigError(f"{type(self).__name__}: expected a ModelConfig, received {type(config).__name__}")
        # Sizes are checked, and the memory they imply compared with the budget, before any layer allocates.
        check_config(config)
        check_memory(f"{config.architecture} (layers={config.num_layers}, hidden={config.hidden_size}, "
                     f"heads={config.num_heads}x{config.head_size}, vocab={config.vocab_size}, "
                     f"max_position={config.max_position}) in {str(dtype).removeprefix('torch.')}",
                     estimate_model_bytes(config, torch.empty((), dtype=dtype).element_size()), backend.device)
        self.config = config
        self.backend = backend
        self.dtype = dtype
        self.device = backend.device
        self.strict = strict
        self.block_size = block_size or backend.block_sizes[0]
        self.kv_layout = backend.kv_cache_layout
        self.weights: Dict[str, torch.Tensor] = {}
        self.loaded = False

    # -- config -------------------------------------------------------------------------------------------------
    @classmethod
    def parse_config(cls, d: Dict[str, Any], architecture: str) -> ModelConfig:  # pragma: no cover - abstract
        raise NotImplementedError

    @property
    def eos_token_id(self) -> Optional[int]:
        return self.config.eos_token_id

    # -- interface ----------------------------------------------------------------------------------------------
    def kv_cache_specs(self) -> List[AttentionSpec]:  # pragma: no cover - abstract
        raise NotImplementedError

    def weight_rules(self) -> List[WeightRule]:  # pragma: no cover - abstract
        raise NotImplementedError

    def bind(self, w: Dict[str, torch.Tensor]) -> None:  # pragma: no cover - abstract
        """Attach the loaded internal tensors to the layers."""
        raise NotImplementedError

    def allocate_kv_caches(self, num_blocks: int) -> List[Tuple[torch.Tensor, torch.Tensor]]:
        return allocate_kv_caches(self.kv_cache_specs(), num_blocks, self.device)

    def _check_loaded(self) -> None:
        if not self.loaded:
            raise WeightLoadError(f"{self.config.architecture}: no weights loaded; call load_weights(...) or build "
                                  f"the model from a checkpoint directory or a transformers model")

    # -- loading ------------------------------------------------------------------------------------------------
    def normalize_name(self, name: str) -> str:
        for p in self.strip_prefixes:
            if name.startswith(p):
                return name[len(p):]
        return name

    def load_weights(self, weights: Iterable[Tuple[str, torch.Tensor]], allow_unexpected: bool = False) -> None:
        """Load checkpoint tensors (HF names); converts to the model dtype and device.

        Raises :class:`WeightLoadError` naming the first missing tensor, a tensor with a wrong shape, or (unless
        ``allow_unexpected``) tensors the model does not use.
        """
        arch = self.config.architecture
        raw: Dict[str, torch.Tensor] = {}
        for name, t in weights:
            raw[self.normalize_name(name)] = t
        used = set()
        out: Dict[str, torch.Tensor] = {}
        for rule in self.weight_rules():
            chosen = next((o for o in rule.options if all(n in raw for n in o.names)), None)
            if chosen is None:
                first = rule.options[0]
                missing = [n for n in first.names if n not in raw]
                alt = ""
                if len(rule.options) > 1:
                    alt = " (nor any alternative spelling: " + "; ".join(
                        o.names[0] + (" ..." if len(o.names) > 1 else "") for o in rule.options[1:]) + ")"
                raise WeightLoadError(f"{arch}: checkpoint is missing tensor '{missing[0]}'{alt}"
                                      + (f" and {len(missing) - 1} more" if len(missing) > 1 else ""))
            parts = []
            for n, shape in zip(chosen.names, chosen.shapes):
                t = raw[n]
                if not isinstance(t, torch.Tensor):
                    raise WeightLoadError(f"{arch}: tensor '{n}' is a {type(t).__name__}, expected a torch.Tensor")
                if not (t.dtype.is_floating_point and t.dtype.itemsize >= 2):
                    raise WeightLoadError(f"{arch}: tensor '{n}' has dtype {str(t.dtype).removeprefix('torch.')}, "
                                          f"expected a floating-point weight (float32, float16 or bfloat16); "
                                          f"integer, bool and 8-bit tensors are never cast silently")
                if tuple(t.shape) != tuple(shape):
                    raise WeightLoadError(f"{arch}: tensor '{n}' has shape {list(t.shape)}, expected {list(shape)}"
                                          f" from the config")
                parts.append(t)
                used.add(n)
            t = chosen.combine(parts)
            if rule.transform is not None:
                t = rule.transform(t.float())
            out[rule.target] = t.detach().to(device=self.device, dtype=self.dtype).contiguous()
        leftovers = sorted(n for n in raw if n not in used and not any(re.fullmatch(p, n) for p in
                                                                        self.ignore_patterns))
        if leftovers and not allow_unexpected:
            raise WeightLoadError(f"{arch}: unexpected tensor(s) in the checkpoint: {', '.join(leftovers[:8])}"
                                  + (f" (+{len(leftovers) - 8} more)" if len(leftovers) > 8 else "")
                                  + "; pass allow_unexpected=True to ignore them")
        self.weights = out
        self.bind(out)
        self.loaded = True

    def num_parameters(self) -> int:
        return sum(t.numel() for t in self.weights.values())

    def __repr__(self) -> str:
        c = self.config
        return (f"{type(self).__name__}({c.architecture}, layers={c.num_layers}, hidden={c.hidden_size}, "
                f"dtype={str(self.dtype).removeprefix('torch.')}, backend={self.backend.name})")


_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "f32": torch.float32, "float": torch.float32,
           "float16": torch.float16, "fp16": torch.float16, "f16": torch.float16, "half": torch.float16,
           "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


def parse_dtype(dtype: Any) -> torch.dtype:
    """``torch.bfloat16`` or its spellings (``"bfloat16"``, ``"bf16"``, ``"torch.bfloat16"``)."""
    if isinstance(dtype, torch.dtype):
        return dtype
    key = str(dtype).removeprefix("torch.").lower()
    if key not in _DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; use one of float32, float16, bfloat16 (or fp32, fp16, bf16)")
    return _DTYPES[key]


def build_model(source: Any, backend: Backend, dtype: Any = torch.float32, strict: bool = False,
                block_size: Optional[int] = None, *, deterministic: Optional[bool] = None) -> Model:
    """Build a model on ``backend`` in ``dtype``; every op's kernel is selected here, once.

    :param source: a Hugging Face format directory (config + safetensors weights, loaded), a transformers model
        object (its config and state dict, loaded), a config dict as in ``config.json`` (weights NOT loaded: call
        ``load_weights``), or a :class:`ModelConfig`.
    :param strict: forbid falling back to the core's native implementation of any op.
    :param block_size: KV-cache block size; default: the backend's preferred one.
    :param deterministic: select only batch-invariant kernels (``None``: ``ANYACCEL_DETERMINISTIC``).
    """
    import os

    from ..core.dispatch import deterministic_mode

    from . import loading, registry

    dt = parse_dtype(dtype)
    weights = None
    if isinstance(source, ModelConfig):
        cls = registry.resolve({"architectures": [source.architecture]})[1]
        with deterministic_mode(deterministic):
            return cls(source, backend, dt, strict, block_size)
    if isinstance(source, (str, os.PathLike)):
        label = os.path.join(os.fspath(source), "config.json")
        d = loading.read_config(source)
        if (d.get("quantization_config") or {}).get("quant_method") == "compressed-tensors":
            from .compressed_tensors import load_compressed_tensors  # W8A8 weights stay 8-bit (scaled GEMM)

            return load_compressed_tensors(source, backend, dt, strict, block_size=block_size)
        weights = loading.iter_safetensors(source)
    elif loading.is_hf_model(source):
        label = f"config of the {type(source).__name__} object"
        d = loading.hf_model_config(source)
        weights = loading.iter_hf_model(source)
    elif isinstance(source, dict):
        label = "config dict"
        d = source
    else:
        raise TypeError(f"build_model: expected a directory, a transformers model, a config dict or a ModelConfig; "
                        f"received {type(source).__name__}")
    with deterministic_mode(deterministic):
        model = build_from_config_dict(d, backend, dt, strict, block_size, label)
    if weights is not None:
        where = f"{os.fspath(source)}: " if isinstance(source, (str, os.PathLike)) else ""
        try:
            model.load_weights(weights)
        except WeightLoadError as e:
            if where and os.fspath(source) in str(e):
                raise
            raise WeightLoadError(f"{where}{e}") from None
    return model


def build_from_config_dict(d: Any, backend: Backend, dtype: torch.dtype, strict: bool, block_size: Optional[int],
                           label: str) -> Model:
    """Resolve, parse and build a model (no weights) from a config dict; every failure of the config's content is
    a :class:`ConfigError` that starts with ``label`` (the file it came from)."""
    from . import registry
    from ..core.errors import InvalidArgumentError, UnsupportedError

    if not isinstance(d, dict):
        raise ConfigError(f"{label}: expected a JSON object (field -> value), received {type(d).__name__}")
    archs = d.get("architectures")
    if archs is not None and (not isinstance(archs, list) or not all(isinstance(a, str) for a in archs)):
        raise ConfigError(f"{label}: field 'architectures': expected a list of names, received {archs!r:.80}")
    try:
        arch, cls = registry.resolve(d)
        config = cls.parse_config(d, arch)
        return cls(config, backend, dtype, strict, block_size)
    except ConfigError as e:
        raise ConfigError(f"{label}: {e}") from None
    except InvalidArgumentError as e:  # a value the core's op specs reject (a head size, a window, ...)
        raise ConfigError(f"{label}: {e}") from None
    except UnsupportedError:
        raise
    except (KeyError, TypeError, ValueError, AttributeError, ZeroDivisionError, OverflowError) as e:
        what = f"missing field {e}" if isinstance(e, KeyError) else f"{type(e).__name__}: {e}"
        raise ConfigError(f"{label}: a field has a value the model cannot be built from ({what})") from None


__all__ += ["build_model", "build_from_config_dict", "parse_dtype"]
