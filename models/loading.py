"""Where weights come from: a Hugging Face format directory (``config.json`` + safetensors, sharded with
``model.safetensors.index.json`` or not) or a transformers model object. Never pickle."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Dict, Iterator, List, Tuple, Union

import torch

from .base import WeightLoadError
from .config import ConfigError

__all__ = ["read_config", "safetensors_files", "iter_safetensors", "is_hf_model", "hf_model_config",
           "iter_hf_model"]

PathLike = Union[str, os.PathLike]


def _read_json(path: Path, what: str, error: type) -> Any:
    """Parse the JSON file ``path``; any failure is ``error`` naming the file, the line and the column."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise error(f"{path}: {what} is not valid JSON: {e.msg} at line {e.lineno}, column {e.colno}") from None
    except UnicodeDecodeError as e:
        raise error(f"{path}: {what} is not UTF-8 text ({e.reason} at byte {e.start})") from None
    except (OSError, RecursionError, ValueError) as e:
        raise error(f"{path}: cannot read {what}: {type(e).__name__}: {e}") from None


def read_config(directory: PathLike) -> Dict[str, Any]:
    """The parsed ``config.json`` of an HF-format directory: a JSON object, else :class:`ConfigError`."""
    p = Path(directory) / "config.json"
    if not p.is_file():
        raise WeightLoadError(f"{directory}: no config.json (expected a Hugging Face format model directory)")
    d = _read_json(p, "config.json", ConfigError)
    if not isinstance(d, dict):
        raise ConfigError(f"{p}: expected a JSON object (field -> value), received a JSON {_json_kind(d)}")
    return d


def _json_kind(v: Any) -> str:
    return {list: "array", str: "string", bool: "boolean", int: "number", float: "number",
            type(None): "null"}.get(type(v), type(v).__name__)


def safetensors_files(directory: PathLike) -> List[Path]:
    """The safetensors shards of a directory: those named by the index when there is one, else every file.

    An index naming anything but ``.safetensors`` shards (a pickled ``.bin``), or shards outside the directory, is a
    :class:`WeightLoadError`: never pickle, never a path the directory does not hold.
    """
    d = Path(directory)
    index = d / "model.safetensors.index.json"
    if index.is_file():
        data = _read_json(index, "the shard index", WeightLoadError)
        weight_map = data.get("weight_map") if isinstance(data, dict) else None
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise WeightLoadError(f"{index}: expected an object with a 'weight_map' of tensor name -> shard file "
                                  f"name, received {_json_kind(data) if not isinstance(data, dict) else 'no such map'}")
        for name, v in weight_map.items():
            if not v.endswith(".safetensors"):
                raise WeightLoadError(f"{index}: tensor '{name}' is mapped to '{v}', which is not a .safetensors "
                                      f"shard (a .bin needs pickle, which anyaccel never runs): convert it first")
            if Path(v).name != v:
                raise WeightLoadError(f"{index}: tensor '{name}' is mapped to '{v}'; expected a file name inside "
                                      f"{d}")
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
    """``(name, tensor)`` for every tensor of every shard, read lazily one at a time.

    A shard that is truncated, garbage or otherwise unreadable is a :class:`WeightLoadError` naming the file (and
    the tensor, when one tensor fails).
    """
    from safetensors import safe_open

    for path in safetensors_files(directory):
        try:
            f = safe_open(str(path), framework="pt")
            names = list(f.keys())
        except Exception as e:  # SafetensorError, OSError, ...: the library's own types
            raise WeightLoadError(f"{path}: not a readable safetensors file ({type(e).__name__}: "
                                  f"{_first_line(e)})") from None
        with f:
            for name in names:
                try:
                    t = f.get_tensor(name)
                except Exception as e:
                    raise WeightLoadError(f"{path}: tensor '{name}' cannot be read ({type(e).__name__}: "
                                          f"{_first_line(e)})") from None
                yield name, t


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0][:300] if text else "no message"


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
