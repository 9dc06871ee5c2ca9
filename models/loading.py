"""Where weights come from: a Hugging Face format directory (``config.json`` + safetensors, sharded with
``model.safetensors.index.json`` or not) or a transformers model object. Never pickle."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Dict, Iterator, List, Tuple, Union

import torch

from .base import WeightLoadError

__all__ = ["read_config", "safetensors_files", "iter_safetensors", "is_hf_model", "hf_model_config",
           "iter_hf_model"]

PathLike = Union[str, os.PathLike]


def read_config(directory: PathLike) -> Dict[str, Any]:
    p = Path(directory) / "config.json"
    if not p.is_file():
        raise WeightLoadError(f"{directory}: no config.json (expected a Hugging Face format model directory)")
    with open(p) as f:
        return json.load(f)


def safetensors_files(directory: PathLike) -> List[Path]:
    """The safetensors shards of a directory: those named by the index when there is one, else every file."""
    d = Path(directory)
    index = d / "model.safetensors.index.json"
    if index.is_file():
        with open(index) as f:
            weight_map = json.load(f).get("weight_map", {})
        files = sorted({d / v for v in weight_map.values()})
        missing = [str(f.name) for f in files if not f.is_file()]
        if missing:
            raise WeightLoadError(f"{d}: shard(s) named by model.safetensors.index.json are missing: "
                                  f"{', '.join(missing)}")
        return files
    files = sorted(d.glob("*.safetensors"))
    if not files:
        other = [p.name for p in d.iterdir() if p.suffix in (".bin", ".pt", ".pth")]
        hint = (f"; found {', '.join(other)}, which would need pickle: convert it to safetensors first"
                if other else "")
        raise WeightLoadError(f"{d}: no *.safetensors weights{hint}")
    return files


def iter_safetensors(directory: PathLike) -> Iterator[Tuple[str, torch.Tensor]]:
    """``(name, tensor)`` for every tensor of every shard, read lazily one at a time."""
    from safetensors import safe_open

    for path in safetensors_files(directory):
        with safe_open(str(path), framework="pt") as f:
            for name in f.keys():
                yield name, f.get_tensor(name)


def is_hf_model(obj: Any) -> bool:
    """Duck-typed: a transformers ``PreTrainedModel`` (a ``config`` with ``to_dict`` and a ``state_dict``)."""
    return hasattr(obj, "state_dict") and hasattr(getattr(obj, "config", None), "to_dict")


def hf_model_config(model: Any) -> Dict[str, Any]:
    d = model.config.to_dict()
    if not d.get("architectures"):
        d["architectures"] = [type(model).__name__]
    return d


def iter_hf_model(model: Any) -> Iterator[Tuple[str, torch.Tensor]]:
    for name, t in model.state_dict().items():
        yield name, t.detach()
