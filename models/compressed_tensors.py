"""Hugging Face checkpoints in the compressed-tensors format: W8A8 int8 and fp8 dynamic, run on the scaled GEMM.

What is read (``config.json``'s ``quantization_config`` with ``quant_method: compressed-tensors``, formats
``int-quantized`` and ``float-quantized``, as the ``compressed-tensors`` library writes them): one config group
targeting ``Linear`` layers, weights 8-bit symmetric per-channel (``weight_scale [N, 1]``) or per-tensor, input
activations 8-bit, **dynamic**, per-token or per-tensor (symmetric, or int8 with a zero point); ``ignore`` lists
the layers kept float (the LM head). Anything else -- static activation scales, groups, 4-bit, several groups --
is refused with the reason by :func:`scaled_checkpoint_scheme`, before any weight is read.

Loading: the float tensors load as usual; each quantized linear's ``weight`` and ``weight_scale`` become a
:class:`~anyaccel.models.scaled_quant.ScaledLinear` (fused projections concatenate rows and per-channel scales; a
per-tensor scale is expanded per channel, exactly). The float model sees the dequantized weights during
``load_weights`` (its shape checks and fusion rules apply unchanged) and keeps them only when ``packed=False``:
that model is the checkpoint's own dequantized reference. An e4m3fn checkpoint on a backend that declares only
e4m3fnuz is converted exactly: values halved into fnuz, scales doubled.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple

import torch

from ..core.backend import Backend
from ..core.errors import UnsupportedError
from ..core.scaled_gemm import dequantize
from .layers import Linear
from .scaled_quant import ScaledLinear, fp8_format

__all__ = ["ScaledCheckpointScheme", "scaled_checkpoint_scheme", "load_compressed_tensors", "scaled_layers"]


@dataclass(frozen=True)
class ScaledCheckpointScheme:
    """:param scheme: ``int8`` or ``fp8_e4m3fn`` (the checkpoint's format); :param weight_granularity: ``channel``
    or ``tensor``; :param act_granularity: ``token`` or ``tensor``; :param act_symmetric: no zero point;
    :param ignore: layer names kept float."""

    scheme: str
    weight_granularity: str
    act_granularity: str
    act_symmetric: bool
    ignore: Tuple[str, ...]


def _refuse(label: str, why: str) -> UnsupportedError:
    return UnsupportedError(f"{label}: this compressed-tensors checkpoint is not supported: {why}")


def scaled_checkpoint_scheme(config: Dict[str, Any], label: str = "config.json") -> Optional[ScaledCheckpointScheme]:
    """The W8A8 scheme of a config's ``quantization_config`` (``None`` when the model is not quantized); raises
    :class:`UnsupportedError` with the reason for a compressed-tensors config this loader cannot run."""
    q = config.get("quantization_config")
    if not q:
        return None
    if q.get("quant_method") != "compressed-tensors":
        raise _refuse(label, f"quant_method {q.get('quant_method')!r} (expected 'compressed-tensors')")
    groups = q.get("config_groups") or {}
    if len(groups) != 1:
        raise _refuse(label, f"{len(groups)} config groups (one group targeting Linear layers is supported)")
    g = next(iter(groups.values()))
    fmt = g.get("format") or q.get("format")
    w, a = g.get("weights") or {}, g.get("input_activations")
    if fmt not in ("int-quantized", "float-quantized"):
        raise _refuse(label, f"format {fmt!r} (int-quantized and float-quantized W8A8 are supported; weight-only "
                             f"pack-quantized checkpoints are the weight-only GEMM's)")
    if g.get("targets") != ["Linear"]:
        raise _refuse(label, f"targets {g.get('targets')!r} (expected ['Linear'])")
    if a is None:
        raise _refuse(label, "no input_activations (a weight-only checkpoint)")
    want_type = "int" if fmt == "int-quantized" else "float"
    for role, args in (("weights", w), ("input_activations", a)):
        if args.get("num_bits") != 8 or args.get("type") != want_type:
            raise _refuse(label, f"{role}: {args.get('num_bits')}-bit {args.get('type')} (8-bit {want_type} "
                                 f"expected for {fmt})")
    if not w.get("symmetric", True):
        raise _refuse(label, "asymmetric weights (weights are symmetric in the scaled GEMM)")
    if w.get("strategy") not in ("channel", "tensor"):
        raise _refuse(label, f"weight strategy {w.get('strategy')!r} (channel or tensor supported)")
    if not a.get("dynamic", False):
        raise _refuse(label, "static activation scales (dynamic per-token or per-tensor activations supported)")
    if a.get("strategy") not in ("token", "tensor"):
        raise _refuse(label, f"activation strategy {a.get('strategy')!r} (token or tensor supported)")
    sym = bool(a.get("symmetric", True))
    if not sym and want_type != "int":
        raise _refuse(label, "asymmetric fp8 activations")
    return ScaledCheckpointScheme("int8" if want_type == "int" else "fp8_e4m3fn", w["strategy"], a["strategy"], sym,
                                  tuple(q.get("ignore") or ()))


def _linears(model: Any, classes: Tuple[type, ...] = (Linear,)) -> List[Tuple[Any, str, Any]]:
    """Every ``(owner, attribute, layer)`` of the model's layer tree holding an instance of ``classes``."""
    out, seen = [], set()

    def walk(obj: Any) -> None:
        if id(obj) in seen:
            return
        seen.add(id(obj))
        for name, v in list(vars(obj).items()):
            if isinstance(v, classes):
                out.append((obj, name, v))
            elif isinstance(v, (list, tuple)):
                for item in v:
                    if hasattr(item, "__dict__") and type(item).__module__.startswith(__package__):
                        walk(item)
            elif hasattr(v, "__dict__") and type(v).__module__.startswith(__package__) and not isinstance(v, type):
                walk(v)

    walk(model)
    return out


def scaled_layers(model: Any) -> List[ScaledLinear]:
    """The model's :class:`ScaledLinear` layers."""
    return [lay for _, _, lay in _linears(model, (ScaledLinear,))]


def load_compressed_tensors(directory: str, backend: Backend, dtype: Any = torch.bfloat16, strict: bool = False,
                            packed: bool = True, block_size: Optional[int] = None):
    """Build and load a compressed-tensors W8A8 checkpoint; its quantized linears run on the scaled GEMM
    (``packed=False``: the dequantized float model, the reference). Returns the model."""
    from . import loading
    from .base import build_from_config_dict, parse_dtype

    label = os.path.join(os.fspath(directory), "config.json")
    config = loading.read_config(directory)
    scheme = scaled_checkpoint_scheme(config, label)           # refused here, before any weight is read
    dt = parse_dtype(dtype)
    model = build_from_config_dict({k: v for k, v in config.items() if k != "quantization_config"}, backend, dt,
                                   strict, block_size, label)
    raw = dict(loading.iter_safetensors(directory))
    quantized: Dict[str, Tuple[torch.Tensor, torch.Tensor]] = {}
    for name in list(raw):
        if name.endswith(".weight_scale"):
            base = name[: -len("_scale")]
            q, s = raw.pop(base), raw.pop(name)
            raw.pop(base[: -len("weight")] + "weight_zero_point", None)
            s = s.float().reshape(-1, 1) if s.numel() > 1 else s.float().reshape(1)
            quantized[base] = (q, s)
            raw[base] = dequantize(q, s, "channel" if s.numel() > 1 else "tensor", 1).float()
    model.load_weights(raw.items())
    if scheme is None or not packed:
        return model
    target = scheme.scheme
    if target == "fp8_e4m3fn" and fp8_format(backend, dt) == "fp8_e4m3fnuz":
        target = "fp8_e4m3fnuz"
    sources: Dict[str, List[str]] = {}
    for rule in model.weight_rules():
        if rule.target.endswith(".weight") and rule.transform is None:
            opt = next((o for o in rule.options if all(model.normalize_name(n) in
                                                       {model.normalize_name(k) for k in quantized} for n in o.names)),
                       None)
            if opt is not None:
                sources[rule.target[: -len(".weight")]] = list(opt.names)
    byname = {model.normalize_name(k): v for k, v in quantized.items()}
    for owner, attr, lin in _linears(model):
        names = sources.get(lin.key)
        if not names:
            continue
        qs, ss = [], []
        for n in names:
            q, s = byname[model.normalize_name(n)]
            s = s.expand(q.shape[0], 1) if s.numel() == 1 else s
            if target == "fp8_e4m3fnuz":        # exact: fn value v is fnuz value v / 2 ... stored as (v/2, 2s)
                q, s = (q.float() / 2).to(torch.float8_e4m3fnuz), s * 2
            qs.append(q)
            ss.append(s)
        wq = torch.cat(qs).contiguous().to(model.device)
        ws = torch.cat(ss).float().contiguous().to(model.device)
        layer = ScaledLinear(lin.key, lin.in_features, lin.out_features, lin.has_bias, backend, dt, target,
                             "channel", scheme.act_granularity, scheme.act_symmetric, strict=strict)
        layer.load(wq, ws, lin.bias)
        setattr(owner, attr, layer)
        model.weights.pop(lin.key + ".weight", None)
    model.quantization = f"compressed-tensors {scheme.scheme} (w={scheme.weight_granularity}, " \
                         f"x={scheme.act_granularity}{'' if scheme.act_symmetric else ' zp'}, dynamic)"
    return model
