"""Loading GGUF checkpoints (llama.cpp's file format) through the ``gguf`` package.

A GGUF file carries its own metadata (architecture, sizes, rope base, tokenizer) and its tensors under
llama.cpp's names, possibly quantized (Q4_0, Q4_1, Q8_0, K-quants...). :func:`read_gguf` turns it into what
the rest of ``models`` already understands: a Hugging Face style config dict and ``(hf_name, tensor)`` pairs,
dequantized to float32 by :func:`gguf.quants.dequantize`.

llama.cpp's converter reorders the rows of the query and key projections of Llama-architecture models: within
each head, HF keeps the two rotary halves as two contiguous blocks (``[x0..x_{d/2-1}, y0..y_{d/2-1}]``), the
GGUF file interleaves them (``[x0, y0, x1, y1, ...]``) because llama.cpp's rotary is GPT-J style. We undo it so
the weights work with the HF (NeoX-style rotary) layout of our Llama family.

Shape legend: N output features (rows), K input features.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from typing import Any, Dict, Iterator, List, Optional, Tuple

import torch

from ..core.errors import AnyaccelError, UnsupportedError
from .base import WeightLoadError
from .config import ConfigError

__all__ = ["GGUFCheckpoint", "read_gguf", "gguf_name_to_hf", "unpermute_rotary_rows", "permute_rotary_rows",
           "SUPPORTED_GGUF_ARCHITECTURES"]

#: GGUF ``general.architecture`` -> the HF architecture our registry serves it with.
SUPPORTED_GGUF_ARCHITECTURES = {"llama": "LlamaForCausalLM"}

_LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
#: GGUF tensors that carry nothing the HF model has as a parameter (derived at load time instead).
_SKIPPED = {"rope_freqs.weight"}
_BLOCK = re.compile(r"^blk\.(\d+)\.(.+)$")


def gguf_name_to_hf(name: str) -> Optional[str]:
    """``blk.3.attn_q.weight`` -> ``model.layers.3.self_attn.q_proj.weight``; ``None`` for a skipped tensor.

    Raises :class:`UnsupportedError` for a name it does not know (so a new tensor kind is never dropped silently).
    """
    if name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[name]
    if name in _SKIPPED:
        return None
    m = _BLOCK.match(name)
    if m and m.group(2) in _LAYER_NAMES:
        return f"model.layers.{m.group(1)}.{_LAYER_NAMES[m.group(2)]}"
    raise UnsupportedError(f"GGUF tensor '{name}' has no Hugging Face Llama counterpart",
                           [f"known per-layer tensors: {', '.join(sorted(_LAYER_NAMES))}",
                            f"known global tensors: {', '.join(sorted(_GLOBAL_NAMES))}"])


def unpermute_rotary_rows(w_NK: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Undo llama.cpp's row order of a q/k projection (weight ``[N, K]`` or bias ``[N]``): interleaved -> halves."""
    n = w_NK.shape[0]
    half = n // num_heads // 2
    rest = tuple(w_NK.shape[1:])
    return w_NK.reshape(num_heads, half, 2, *rest).transpose(1, 2).reshape(n, *rest).contiguous()


def permute_rotary_rows(w_NK: torch.Tensor, num_heads: int) -> torch.Tensor:
    """llama.cpp's converter order (halves -> interleaved); the inverse of :func:`unpermute_rotary_rows`."""
    n = w_NK.shape[0]
    half = n // num_heads // 2
    rest = tuple(w_NK.shape[1:])
    return w_NK.reshape(num_heads, 2, half, *rest).transpose(1, 2).reshape(n, *rest).contiguous()


def _value(reader: Any, key: str, default: Any = None) -> Any:
    f = reader.fields.get(key)
    if f is None:
        return default
    return f.contents()


@dataclass
class GGUFCheckpoint:
    """An opened GGUF file: its HF-style config, tokenizer metadata, and lazily dequantized tensors."""

    path: str
    config: Dict[str, Any]
    metadata: Dict[str, Any] = field(default_factory=dict)
    _reader: Any = None

    @property
    def chat_template(self) -> Optional[str]:
        return self.metadata.get("tokenizer.chat_template")

    @property
    def tensor_names(self) -> List[str]:
        return [t.name for t in self._reader.tensors]

    def quant_types(self) -> Dict[str, int]:
        """How many tensors of each GGML type the file holds (``{"Q4_1": 210, "F32": 61, ...}``)."""
        counts: Dict[str, int] = {}
        for t in self._reader.tensors:
            counts[t.tensor_type.name] = counts.get(t.tensor_type.name, 0) + 1
        return counts

    def weights(self) -> Iterator[Tuple[str, torch.Tensor]]:
        """Yield ``(hf_name, float32 tensor)`` in file order: dequantized, renamed, q/k rows un-permuted."""
        from gguf.quants import dequantize

        heads = self.config["num_attention_heads"]
        kv_heads = self.config["num_key_value_heads"]
        for t in self._reader.tensors:
            hf = gguf_name_to_hf(t.name)
            if hf is None:
                continue
            try:
                w = torch.from_numpy(dequantize(t.data, t.tensor_type).copy()).float()
            except Exception as e:  # numpy / gguf errors on a damaged or unknown block layout
                raise WeightLoadError(f"{self.path}: tensor '{t.name}' ({getattr(t.tensor_type, 'name', '?')}) "
                                      f"cannot be dequantized: {type(e).__name__}: {e}") from None
            if ".self_attn.q_proj." in hf:
                w = unpermute_rotary_rows(w, heads)
            elif ".self_attn.k_proj." in hf:
                w = unpermute_rotary_rows(w, kv_heads)
            yield hf, w

    def packed_weights(self) -> Dict[str, Any]:
        """``{hf_name: QuantizedWeight}`` for every 2-d tensor stored in a weight format the core runs packed
        (Q4_0, Q4_1, Q8_0, Q4_K, Q6_K): the file's blocks as they are, q/k rows un-permuted like :meth:`weights`."""
        from ..core.weight_only import WEIGHT_FORMATS, QuantizedWeight

        by_type = {f.ggml_type: name for name, f in WEIGHT_FORMATS.items() if f.gguf}
        heads = self.config["num_attention_heads"]
        kv_heads = self.config["num_key_value_heads"]
        out: Dict[str, Any] = {}
        for t in self._reader.tensors:
            hf = gguf_name_to_hf(t.name)
            fmt = by_type.get(int(t.tensor_type))
            if hf is None or fmt is None or len(t.shape) != 2:
                continue
            k, n = int(t.shape[0]), int(t.shape[1])
            data = torch.from_numpy(t.data.copy()).reshape(n, -1)
            if ".self_attn.q_proj." in hf:
                data = unpermute_rotary_rows(data, heads)
            elif ".self_attn.k_proj." in hf:
                data = unpermute_rotary_rows(data, kv_heads)
            out[hf] = QuantizedWeight(fmt, (n, k), data.contiguous())
        return out

    def tokenizer(self):
        """The Hugging Face tokenizer transformers builds from the file's metadata (needs ``transformers``)."""
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(os.path.dirname(os.path.abspath(self.path)),
                                            gguf_file=os.path.basename(self.path))
        if getattr(tok, "chat_template", None) is None and self.chat_template:
            tok.chat_template = self.chat_template
        return tok


def _require_gguf():
    try:
        import gguf  # noqa: F401
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise UnsupportedError("reading GGUF files needs the 'gguf' package (pip install gguf)") from e
    return gguf


def read_gguf(path: str) -> GGUFCheckpoint:
    """Open ``path`` and derive the HF config (``LlamaForCausalLM`` names) from its metadata."""
    gguf = _require_gguf()
    if not os.path.isfile(path):
        raise WeightLoadError(f"GGUF file not found: {path}")
    try:
        reader = gguf.GGUFReader(path)
        arch = _value(reader, "general.architecture")
    except Exception as e:  # the reader raises ValueError, IndexError, struct/numpy errors on a damaged file
        text = str(e).strip().splitlines()[0][:300] if str(e).strip() else "no message"
        raise WeightLoadError(f"{path}: not a readable GGUF file (truncated or not GGUF): {type(e).__name__}: "
                              f"{text}") from None
    try:
        return _checkpoint(path, reader, arch)
    except (ConfigError, WeightLoadError, UnsupportedError):
        raise
    except Exception as e:  # a metadata value of the wrong type or shape
        raise ConfigError(f"{path}: GGUF metadata cannot be read as a model config: {type(e).__name__}: {e}") \
            from None


def _checkpoint(path: str, reader: Any, arch: Any) -> GGUFCheckpoint:
    if arch not in SUPPORTED_GGUF_ARCHITECTURES:
        raise UnsupportedError(f"GGUF architecture '{arch}' in {path} is not supported",
                               [f"supported: {', '.join(sorted(SUPPORTED_GGUF_ARCHITECTURES))}"])

    def key(suffix: str, default: Any = None) -> Any:
        return _value(reader, f"{arch}.{suffix}", default)

    def int_key(suffix: str, default: Any = None) -> int:
        v = key(suffix, default)
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            got = "missing" if v is None else f"{type(v).__name__} {v!r:.40}"
            raise ConfigError(f"{path}: GGUF metadata key '{arch}.{suffix}': expected an integer >= 1, received "
                              f"{got}")
        return v

    hidden = int_key("embedding_length")
    heads = int_key("attention.head_count")
    kv_heads = int_key("attention.head_count_kv", heads)
    head_dim = int_key("attention.key_length", max(hidden // heads, 1))
    names = {t.name for t in reader.tensors}
    vocab = key("vocab_size")
    if vocab is None:
        tokens = reader.fields.get("tokenizer.ggml.tokens")
        vocab = len(tokens.data) if tokens is not None else next(
            int(t.shape[-1]) for t in reader.tensors if t.name == "token_embd.weight")
    config: Dict[str, Any] = {
        "architectures": [SUPPORTED_GGUF_ARCHITECTURES[arch]],
        "model_type": arch,
        "vocab_size": int(vocab),
        "hidden_size": hidden,
        "intermediate_size": int_key("feed_forward_length"),
        "num_hidden_layers": int_key("block_count"),
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": head_dim,
        "rms_norm_eps": float(key("attention.layer_norm_rms_epsilon", 1e-6)),
        "rope_theta": float(key("rope.freq_base", 10000.0)),
        "max_position_embeddings": int_key("context_length", 2048),
        "hidden_act": "silu",
        "tie_word_embeddings": "output.weight" not in names,
        "attention_bias": "blk.0.attn_q.bias" in names,
        "mlp_bias": False,
    }
    for hf_key, meta_key in (("bos_token_id", "tokenizer.ggml.bos_token_id"),
                             ("eos_token_id", "tokenizer.ggml.eos_token_id"),
                             ("pad_token_id", "tokenizer.ggml.padding_token_id")):
        v = _value(reader, meta_key)
        if v is not None:
            config[hf_key] = int(v)
    scaling_type = key("rope.scaling.type")
    if scaling_type not in (None, "none"):
        scaling = {"rope_type": scaling_type, "factor": float(key("rope.scaling.factor", 1.0))}
        orig = key("rope.scaling.original_context_length")
        if orig is not None:
            scaling["original_max_position_embeddings"] = int(orig)
        config["rope_scaling"] = scaling
    if "rope_freqs.weight" in names:
        raise UnsupportedError(f"{path} carries per-frequency rope factors (rope_freqs.weight, Llama 3.1 style); "
                               "loading them from GGUF is not implemented — use the HF checkpoint")
    metadata = {}
    for k in ("general.name", "general.file_type", "tokenizer.chat_template", "tokenizer.ggml.model",
              "tokenizer.ggml.add_bos_token"):
        v = _value(reader, k)
        if v is not None:
            metadata[k] = v
    return GGUFCheckpoint(path=path, config=config, metadata=metadata, _reader=reader)


def build_gguf_model(path: str, backend: Any, dtype: Any = torch.float32, strict: bool = False,
                     block_size: Optional[int] = None, dequantize: bool = True):
    """Build a model from a GGUF file on ``backend``: ``(model, checkpoint)`` with the weights loaded.

    The checkpoint gives the tokenizer (:meth:`GGUFCheckpoint.tokenizer`) and the chat template. With
    ``dequantize=False`` the linear layers keep the file's packed blocks (``models/quant.py``,
    :func:`~anyaccel.models.quant.pack_from_gguf`); the default dequantizes every tensor to ``dtype``.
    """
    from .base import build_from_config_dict, parse_dtype

    ckpt = read_gguf(path)
    model = build_from_config_dict(dict(ckpt.config), backend, parse_dtype(dtype), strict, block_size,
                                   f"{path} (config from its GGUF metadata)")
    try:
        model.load_weights(ckpt.weights())
    except WeightLoadError as e:
        raise (e if str(path) in str(e) else WeightLoadError(f"{path}: {e}")) from None
    except UnsupportedError as e:  # a tensor name without an HF counterpart
        raise WeightLoadError(f"{path}: {e}") from None
    if not dequantize:
        from .quant import pack_from_gguf

        pack_from_gguf(model, ckpt.packed_weights())
    return model, ckpt


__all__ += ["build_gguf_model"]
