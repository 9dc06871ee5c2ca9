"""Quantized linear layers and the passes that put them into a built model, weights kept packed.

A :class:`QuantizedLinear` is a drop-in for :class:`~anyaccel.models.layers.Linear`: same ``key``, sizes and
call, but its op is the core's ``weight_only_gemm``, built once, and its weight a ``PreparedWeight`` (the
backend's own packed layout, made once at load). A :class:`QuantScheme` says how a layer is quantized; the
weight-only schemes are registered here, and a scaled (w8a8) scheme plugs in by registering a scheme whose
``make_layer`` builds a layer on the scaled GEMM op -- the passes below only call ``make_layer``.

Two ways in, both applied after a model is built and loaded (so the float load path stays the reference):

- :func:`pack_from_gguf`: the file's own blocks (Q4_0, Q4_1, Q8_0, Q4_K, Q6_K) become the layers' weights;
  fused projections (qkv, gate_up) concatenate rows when their sources share one format. An LM head tied to the
  embedding stays float (the embedding table is needed in float for the lookup anyway).
- :func:`quantize_model` (``--quantization int4|int8``): round to nearest from the float weights. ``int4``:
  symmetric, group 128 (or the largest of 128, 64, 32 dividing K), float16 scales; ``int8``: symmetric
  per-channel, float16 scales. The LM head stays float (the usual choice: it dominates accuracy loss).

Either way the float copy of a packed weight is dropped from ``model.weights``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

import torch

from ..core.backend import Backend
from ..core.errors import InvalidArgumentError
from ..core.weight_only import WEIGHT_FORMATS, QuantizedWeight, WeightOnlyGemm, WeightOnlyGemmSpec, quantize_rtn
from .layers import Linear
from .scaled_quant import ScaledLinear, scaled_schemes

__all__ = ["QuantizedLinear", "QuantScheme", "SCHEMES", "register_scheme", "quantize_model", "pack_from_gguf",
           "linear_layers", "concat_rows", "QUANTIZATION_CHOICES", "describe_quantization"]


class QuantizedLinear:
    """``y[..., N] = x[..., K] @ dequantize(W)[N, K].T (+ b)`` through the core weight-only GEMM."""

    def __init__(self, key: str, in_features: int, out_features: int, bias: bool, backend: Backend,
                 dtype: torch.dtype, fmt: str, group_size: Optional[int] = None, has_zeros: bool = False,
                 scale_dtype: torch.dtype = torch.float16, strict: bool = False) -> None:
        self.key = key
        self.in_features, self.out_features, self.has_bias = in_features, out_features, bias
        self.format = fmt
        self.op = WeightOnlyGemm.build(WeightOnlyGemmSpec(
            dtype=dtype, format=fmt, in_features=in_features, out_features=out_features,
            group_size=None if WEIGHT_FORMATS[fmt].gguf else group_size, has_zeros=has_zeros,
            scale_dtype=scale_dtype, has_bias=bias), backend, strict=strict)
        self.weight = None  # PreparedWeight
        self.bias: Optional[torch.Tensor] = None  # [N]

    def load(self, qw: QuantizedWeight, bias: Optional[torch.Tensor] = None) -> None:
        """Prepare the packed weight for the chosen kernel (once)."""
        self.weight = self.op.prepare(qw)
        self.bias = bias

    def bind(self, w) -> None:  # the float weights dict no longer holds this layer's weight
        pass

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x, self.weight, self.bias)


@dataclass(frozen=True)
class QuantScheme:
    """How the linear layers of a model are quantized on the fly.

    :param name: the ``--quantization`` value.
    :param make_layer: ``make_layer(linear, backend, dtype, strict) -> layer`` with the float ``linear`` loaded:
        returns the replacement layer, loaded, or ``None`` to keep ``linear`` as it is.
    :param description: one line for ``anyaccel models`` and the docs.
    """

    name: str
    make_layer: Callable[[Linear, Backend, torch.dtype, bool], Any]
    description: str = ""


def _group_for(k: int) -> Optional[int]:
    return next((g for g in (128, 64, 32) if k % g == 0), None)


def _rtn_layer(fmt: str, per_channel: bool):
    def make(linear: Linear, backend: Backend, dtype: torch.dtype, strict: bool):
        if linear.key == "lm_head":
            return None
        k = linear.in_features
        g = None if per_channel else _group_for(k)
        if fmt == "int4" and (g is None and not per_channel or k % 2):
            return None  # no group divides K: keep the float layer (reported by describe_quantization)
        layer = QuantizedLinear(linear.key, k, linear.out_features, linear.has_bias, backend, dtype, fmt, g,
                                strict=strict)
        layer.load(quantize_rtn(linear.weight, fmt, g), linear.bias)
        return layer
    return make


SCHEMES: Dict[str, QuantScheme] = {}


def register_scheme(scheme: QuantScheme) -> QuantScheme:
    """Add a ``--quantization`` scheme (a scaled w8a8 scheme registers here the same way)."""
    SCHEMES[scheme.name] = scheme
    return scheme


register_scheme(QuantScheme("int4", _rtn_layer("int4", False),
                            "int4 weights, symmetric, group 128 (or 64/32 to divide K), round to nearest"))
register_scheme(QuantScheme("int8", _rtn_layer("int8", True),
                            "int8 weights, symmetric per-channel, round to nearest"))

for _scheme in scaled_schemes(QuantScheme):  # w8a8-int8, fp8: activations quantized too (core/scaled_gemm.py)
    register_scheme(_scheme)

#: ``--quantization`` choices (``none``: float weights).
QUANTIZATION_CHOICES = ("none", *SCHEMES)


def linear_layers(model: Any) -> Iterator[Tuple[Any, str, Any]]:
    """Every ``(owner, attribute, layer)`` holding a Linear or QuantizedLinear in the model's layer tree."""
    seen = set()

    def walk(obj: Any) -> Iterator[Tuple[Any, str, Any]]:
        if id(obj) in seen:
            return
        seen.add(id(obj))
        for name, v in list(vars(obj).items()):
            if isinstance(v, (Linear, QuantizedLinear, ScaledLinear)):
                yield obj, name, v
            elif isinstance(v, (list, tuple)):
                for item in v:
                    if hasattr(item, "__dict__") and type(item).__module__.startswith(__package__):
                        yield from walk(item)
            elif hasattr(v, "__dict__") and type(v).__module__.startswith(__package__) and not isinstance(v, type):
                yield from walk(v)

    yield from walk(model)


def _replace(model: Any, make: Callable[[Linear], Any]) -> List[str]:
    done = []
    for owner, attr, layer in list(linear_layers(model)):
        if not isinstance(layer, Linear) or layer.weight is None:
            continue
        new = make(layer)
        if new is None:
            continue
        setattr(owner, attr, new)
        model.weights.pop(layer.key + ".weight", None)
        done.append(layer.key)
    model.quantized_layers = getattr(model, "quantized_layers", []) + done
    return done


def quantize_model(model: Any, scheme: str) -> List[str]:
    """Replace the model's linear layers by ``scheme``'s layers (on-the-fly, round to nearest); returns their
    keys. Raises :class:`InvalidArgumentError` naming ``quantization`` for an unknown scheme."""
    if scheme not in SCHEMES:
        raise InvalidArgumentError("quantize_model", "quantization", f"one of {sorted(SCHEMES)}", repr(scheme))
    s = SCHEMES[scheme]
    model.quantization = scheme
    return _replace(model, lambda lin: s.make_layer(lin, model.backend, model.dtype, model.strict))


def concat_rows(parts: List[QuantizedWeight]) -> Optional[QuantizedWeight]:
    """The row-wise concatenation of GGUF-format weights of one format (``None`` if the formats differ)."""
    fmts = {p.format for p in parts}
    if len(fmts) != 1 or not WEIGHT_FORMATS[parts[0].format].gguf:
        return None
    k = parts[0].shape[1]
    if any(p.shape[1] != k for p in parts):
        return None
    data = torch.cat([p.data for p in parts], dim=0) if len(parts) > 1 else parts[0].data
    return QuantizedWeight(parts[0].format, (data.shape[0], k), data.contiguous())


def pack_from_gguf(model: Any, packed: Dict[str, QuantizedWeight]) -> List[str]:
    """Swap every linear layer whose checkpoint tensors are all in ``packed`` (HF names -> GGUF blocks) for a
    :class:`QuantizedLinear` holding those blocks; returns the keys swapped."""
    packed = {model.normalize_name(k): v for k, v in packed.items()}
    sources: Dict[str, List[str]] = {}
    for rule in model.weight_rules():
        if not rule.target.endswith(".weight") or rule.transform is not None:
            continue
        opt = next((o for o in rule.options if all(n in packed for n in o.names)), None)
        if opt is not None:
            sources[rule.target[:-len(".weight")]] = list(opt.names)

    def make(linear: Linear):
        names = sources.get(linear.key)
        if not names:
            return None
        qw = concat_rows([packed[n] for n in names])
        if qw is None or tuple(qw.shape) != (linear.out_features, linear.in_features):
            return None
        qw = QuantizedWeight(qw.format, qw.shape, qw.data.to(model.device))
        layer = QuantizedLinear(linear.key, linear.in_features, linear.out_features, linear.has_bias,
                                model.backend, model.dtype, qw.format, strict=model.strict)
        layer.load(qw, linear.bias)
        return layer

    model.quantization = "gguf"
    return _replace(model, make)


def describe_quantization(model: Any) -> str:
    """One line: the scheme, how many linear layers are packed and in which formats, and the kernels chosen."""
    layers = [lay for _, _, lay in linear_layers(model)]
    q = [lay for lay in layers if isinstance(lay, (QuantizedLinear, ScaledLinear))]
    if not q:
        return "float weights (no quantization)"
    fmts: Dict[str, int] = {}
    kernels = set()
    for lay in q:
        fmts[lay.format] = fmts.get(lay.format, 0) + 1
        kernels.add(lay.op.selection.chosen if lay.op.selection else "direct")
    nbytes = sum(lay.nbytes if isinstance(lay, ScaledLinear) else lay.weight.nbytes for lay in q)
    return (f"{getattr(model, 'quantization', '?')}: {len(q)}/{len(layers)} linear layers packed "
            f"({', '.join(f'{n} {f}' for f, n in sorted(fmts.items()))}; {nbytes / 2**20:.1f} MiB), kernels "
            f"{', '.join(sorted(kernels))}")

