"""Weight-only quantized GEMM family: ``y = x @ dequantize(w).T + b`` with ``w`` kept packed.

Shape legend: M rows (tokens, flattened over leading dims), K input features, N output features, G group size
(elements of one row of ``w`` sharing a scale), B bytes of one packed row.

**Formats** (:data:`WEIGHT_FORMATS`): the GPTQ/AWQ-style integer formats and the GGUF block formats, each with
one *canonical* packed layout, defined here, that every backend receives (:class:`QuantizedWeight`):

- ``int4``: ``data [N, K/2] uint8``, element ``2j`` of a row in the low nibble of byte ``j``, element ``2j+1`` in
  the high nibble; values ``q`` in ``0..15``. ``scales [N, K/G]`` (float16, bfloat16 or float32), ``zeros
  [N, K/G] uint8`` in ``0..15`` (``None``: the symmetric zero point 8). ``w = (q - zero) * scale``.
- ``int8``: ``data [N, K] int8``; ``scales [N, K/G]``, ``zeros [N, K/G] int8`` (``None``: 0). ``w = (q - zero) *
  scale``. ``group_size=None`` in the spec means one group per row (per-channel scales, ``K/G = 1``).
- ``q4_0``, ``q4_1``, ``q8_0``, ``q4_k``, ``q6_k``: ``data [N, B] uint8`` holds each row's ggml blocks, byte for
  byte as llama.cpp writes them (``block_q4_0``...: float16 scales little-endian first; Q4_0/Q4_1 keep elements
  0-15 of a block in the low nibbles of its 16 bytes and 16-31 in the high nibbles -- not interleaved). No
  ``scales``/``zeros`` tensors: the blocks carry them.

Dequantization is exact: :func:`dequantize` computes every weight in float64 from the packed bytes (the values
are small integers times float16 scales), and the reference multiplies those exact values in float64.

**Preparation** (the build-time half of the contract). A backend may keep its own layout of the weight (torch's
CPU int4 tiles, a GPU-friendly transposition): the kernel that ``build(spec)`` returns may carry a
``prepare(weight: QuantizedWeight) -> object`` attribute and a ``layout`` string. :meth:`WeightOnlyGemm.prepare`
validates the canonical weight (naming the argument) and calls it **once**, when the model is loaded; the result
is wrapped in a :class:`PreparedWeight` tagged with the layout. A kernel without ``prepare`` receives the
canonical :class:`QuantizedWeight` itself. Calls never repack.

Kernel contract (what a backend's ``build(spec)`` returns)::

    kernel(x_MK, packed, bias_N | None, out_MN) -> out_MN
    kernel.prepare(weight: QuantizedWeight) -> packed      # optional, called once per weight at load
    kernel.layout: str                                     # optional, names what prepare returns

``x_MK`` is 2-d (the core flattens leading dims) in ``spec.dtype``; ``out_MN`` is preallocated in
``spec.dtype`` (the conformance suite fills it with NaN first) and must be fully written. Accumulation is in
float32; the dequantized weight may be rounded once to ``spec.dtype`` before the product (what a tensor core or
torch's packed CPU kernels need), and a kernel may round a scale to ``spec.dtype`` likewise -- the error model's
one allowed rounding mid-way (conformance/tolerances.py, class ``weight_only``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, FrozenSet, List, Optional

import torch

from .dispatch import Op, OpCapability
from .errors import InvalidArgumentError
from .validation import FLOAT_DTYPES, check_tensor, dtype_name

__all__ = ["WEIGHT_FORMATS", "WeightFormat", "QuantizedWeight", "PreparedWeight", "WeightOnlyGemmSpec",
           "WeightOnlyGemmCapability", "WeightOnlyGemm", "weight_only_gemm_reference", "dequantize",
           "dequantize_gguf_blocks", "quantize_rtn", "Decomposed", "decompose", "group_count", "row_bytes",
           "GROUP_SIZES", "CANONICAL_LAYOUT"]

OP = "weight_only_gemm"
#: The layout of a weight no backend repacked (the :class:`QuantizedWeight` itself).
CANONICAL_LAYOUT = "canonical"
#: The group sizes of the integer formats (besides ``None``: one group per row).
GROUP_SIZES = (32, 64, 128)
_SCALE_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@dataclass(frozen=True)
class WeightFormat:
    """One packed weight format.

    :param name: the id used in specs (``"int4"``, ``"q4_1"``...).
    :param bits: bits per weight value before scales.
    :param block: elements per block for the GGUF formats (fixed by the format); 0 for the integer formats
        (their group size is a spec field).
    :param block_bytes: bytes of one GGUF block; 0 for the integer formats.
    :param ggml_type: the GGML type id (the GGUF file's ``tensor_type``); ``None`` for the integer formats.
    """

    name: str
    bits: int
    block: int = 0
    block_bytes: int = 0
    ggml_type: Optional[int] = None

    @property
    def gguf(self) -> bool:
        return self.block > 0


#: Every format the op knows, by id.
WEIGHT_FORMATS: Dict[str, WeightFormat] = {f.name: f for f in (
    WeightFormat("int4", 4), WeightFormat("int8", 8),
    WeightFormat("q4_0", 4, 32, 18, 2), WeightFormat("q4_1", 4, 32, 20, 3), WeightFormat("q8_0", 8, 32, 34, 8),
    WeightFormat("q4_k", 4, 256, 144, 12), WeightFormat("q6_k", 6, 256, 210, 14))}


def group_count(fmt: str, k: int, group_size: Optional[int]) -> int:
    """Scale groups per row: ``K / G`` (1 for per-channel), or blocks per row for GGUF formats."""
    f = WEIGHT_FORMATS[fmt]
    if f.gguf:
        return k // f.block
    return 1 if group_size is None else k // group_size


def row_bytes(fmt: str, k: int) -> int:
    """Columns of the canonical ``data`` tensor: bytes per row (int8: elements per row)."""
    f = WEIGHT_FORMATS[fmt]
    if f.gguf:
        return k // f.block * f.block_bytes
    return k // 2 if f.bits == 4 else k


@dataclass(frozen=True, eq=False)
class QuantizedWeight:
    """A weight in a format's canonical packed layout (see the module docstring).

    :param format: a key of :data:`WEIGHT_FORMATS`.
    :param shape: ``(N, K)``, the logical (dequantized) shape.
    :param data: the packed values (uint8, or int8 for ``int8``).
    :param scales: ``[N, K/G]`` for the integer formats; ``None`` for GGUF.
    :param zeros: ``[N, K/G]`` zero points of the integer formats, or ``None`` (symmetric).
    :param group_size: G for the integer formats (``None``: per-channel); ``None`` for GGUF.
    """

    format: str
    shape: tuple
    data: torch.Tensor
    scales: Optional[torch.Tensor] = None
    zeros: Optional[torch.Tensor] = None
    group_size: Optional[int] = None

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.data, self.scales, self.zeros) if t is not None)


class PreparedWeight:
    """A weight prepared by :meth:`WeightOnlyGemm.prepare`: the kernel's own layout and what it was made from.

    ``packed`` is what the kernel's ``prepare`` returned (the canonical :class:`QuantizedWeight` when it has
    none); ``layout`` names it; ``source`` keeps the canonical weight's format and shape for checks and reports.
    """

    __slots__ = ("packed", "layout", "format", "shape", "nbytes")

    def __init__(self, packed: object, layout: str, source: QuantizedWeight) -> None:
        self.packed = packed
        self.layout = layout
        self.format = source.format
        self.shape = tuple(source.shape)
        self.nbytes = source.nbytes

    def __repr__(self) -> str:
        return f"PreparedWeight({self.format}, N={self.shape[0]}, K={self.shape[1]}, layout={self.layout})"


# ------------------------------------------------------------------------------------------------------------------
# Exact dequantization (float64), the single home of the byte layouts
# ------------------------------------------------------------------------------------------------------------------

def _f16(b_2: torch.Tensor) -> torch.Tensor:
    """Little-endian float16 from a [..., 2] uint8 tensor, as float64."""
    u = b_2[..., 0].to(torch.int32) | (b_2[..., 1].to(torch.int32) << 8)
    return u.to(torch.int16).view(torch.float16).double() if u.numel() else u.double()


def _nibbles_split(qs: torch.Tensor) -> torch.Tensor:
    """ggml's Q4 layout: [..., 16] bytes -> [..., 32] values, low nibbles are elements 0-15, high 16-31."""
    return torch.cat([qs & 0x0F, qs >> 4], dim=-1)


def dequantize_gguf_blocks(fmt: str, blocks: torch.Tensor) -> torch.Tensor:
    """Exact float64 values of ``blocks [R, nblocks * block_bytes]`` uint8 in GGUF format ``fmt``: [R, nblocks*block].

    The byte layouts are ggml's (``block_q4_0``, ``block_q4_1``, ``block_q8_0``, ``block_q4_K``, ``block_q6_K``).
    """
    f = WEIGHT_FORMATS[fmt]
    r = blocks.shape[0]
    b = blocks.reshape(r, -1, f.block_bytes)
    if fmt == "q4_0":  # d fp16, qs[16]
        d = _f16(b[..., 0:2])
        q = _nibbles_split(b[..., 2:18]).double() - 8.0
        y = q * d[..., None]
    elif fmt == "q4_1":  # d fp16, m fp16, qs[16]
        d, m = _f16(b[..., 0:2]), _f16(b[..., 2:4])
        y = _nibbles_split(b[..., 4:20]).double() * d[..., None] + m[..., None]
    elif fmt == "q8_0":  # d fp16, qs[32] int8
        d = _f16(b[..., 0:2])
        y = b[..., 2:34].contiguous().view(torch.int8).double() * d[..., None]
    elif fmt == "q4_k":  # d fp16, dmin fp16, scales[12] (6-bit scales and mins of 8 sub-blocks), qs[128]
        d, dmin = _f16(b[..., 0:2]), _f16(b[..., 2:4])
        s = b[..., 4:16].to(torch.int32)
        lo = [(s[..., j] & 63, s[..., j + 4] & 63) for j in range(4)]
        hi = [((s[..., j + 4] & 0xF) | ((s[..., j - 4] >> 6) << 4), (s[..., j + 4] >> 4) | ((s[..., j] >> 6) << 4))
              for j in range(4, 8)]
        sc = torch.stack([p[0] for p in lo + hi], -1).double()  # [R, nb, 8]
        mn = torch.stack([p[1] for p in lo + hi], -1).double()
        qs = b[..., 16:144].reshape(r, -1, 4, 32)  # 4 chunks of 32 bytes: low nibbles sub-block 2c, high 2c+1
        q = torch.stack([qs & 0x0F, qs >> 4], dim=3).reshape(r, -1, 8, 32).double()
        y = (d[..., None, None] * sc[..., None]) * q - (dmin[..., None, None] * mn[..., None])
    elif fmt == "q6_k":  # ql[128], qh[64], scales[16] int8, d fp16
        ql = b[..., 0:128].to(torch.int32).reshape(r, -1, 2, 64)
        qh = b[..., 128:192].to(torch.int32).reshape(r, -1, 2, 32)
        sc = b[..., 192:208].contiguous().view(torch.int8).double().reshape(r, -1, 16)
        d = _f16(b[..., 208:210])
        l0, l1 = ql[..., :32], ql[..., 32:]
        q = torch.stack([(l0 & 0xF) | ((qh & 3) << 4), (l1 & 0xF) | (((qh >> 2) & 3) << 4),
                         (l0 >> 4) | (((qh >> 4) & 3) << 4), (l1 >> 4) | (((qh >> 6) & 3) << 4)], dim=3)
        q = (q - 32).double().reshape(r, -1, 16, 16)  # [R, nb, 16 sub-blocks of 16]
        y = d[..., None, None] * sc[..., None] * q
    else:
        raise InvalidArgumentError(OP, "format", f"a GGUF format of {sorted(WEIGHT_FORMATS)}", repr(fmt))
    return y.reshape(r, -1)


@dataclass(frozen=True, eq=False)
class Decomposed:
    """A weight as ``w[n, k] = codes[n, k] * scale[n, k // chunk] + offset[n, k // chunk]`` (exact in float64).

    :param codes: ``[N, K]`` int16: 0..15 for the 4-bit formats, -128..127 for ``int8``/``q8_0``, -32..31 for
        ``q6_k``.
    :param scale: ``[N, K / chunk]`` float64.
    :param offset: ``[N, K / chunk]`` float64 (``-zero * scale``, Q4_0's ``-8 d``, Q4_1's ``m``, Q4_K's
        ``-dmin * min``; zeros for the symmetric 8-bit formats).
    :param chunk: elements sharing one scale and offset (the group size, the GGUF block or sub-block).
    """

    codes: torch.Tensor
    scale: torch.Tensor
    offset: torch.Tensor
    chunk: int


def decompose(weight: QuantizedWeight) -> Decomposed:
    """Split a canonical weight into integer codes and one (scale, offset) pair per chunk, exactly.

    Every format is an affine map of small integer codes per chunk; kernels that repack a weight at load
    (``prepare``) start from this, so the byte layouts are read in this module only.
    """
    fmt = weight.format
    n, k = weight.shape
    if fmt in ("int4", "int8"):
        g = k if weight.group_size is None else weight.group_size
        if fmt == "int4":
            d = weight.data
            codes = torch.stack([d & 0x0F, d >> 4], dim=-1).reshape(n, k).to(torch.int16)
            zero_default = 8.0
        else:
            codes = weight.data.to(torch.int16)
            zero_default = 0.0
        sc = weight.scales.double()
        z = torch.full_like(sc, zero_default) if weight.zeros is None else weight.zeros.double()
        return Decomposed(codes, sc, -z * sc, g)
    f = WEIGHT_FORMATS[fmt]
    b = weight.data.reshape(n, -1, f.block_bytes)
    if fmt in ("q4_0", "q4_1"):
        d = _f16(b[..., 0:2])
        off = -8.0 * d if fmt == "q4_0" else _f16(b[..., 2:4])
        qs = b[..., 2:18] if fmt == "q4_0" else b[..., 4:20]
        return Decomposed(_nibbles_split(qs).reshape(n, k).to(torch.int16), d, off, 32)
    if fmt == "q8_0":
        d = _f16(b[..., 0:2])
        codes = b[..., 2:34].contiguous().view(torch.int8).reshape(n, k).to(torch.int16)
        return Decomposed(codes, d, torch.zeros_like(d), 32)
    if fmt == "q4_k":
        d, dmin = _f16(b[..., 0:2]), _f16(b[..., 2:4])
        s = b[..., 4:16].to(torch.int32)
        sc = [s[..., j] & 63 for j in range(4)] + [(s[..., j + 4] & 0xF) | ((s[..., j - 4] >> 6) << 4)
                                                    for j in range(4, 8)]
        mn = [s[..., j + 4] & 63 for j in range(4)] + [(s[..., j + 4] >> 4) | ((s[..., j] >> 6) << 4)
                                                       for j in range(4, 8)]
        qs = b[..., 16:144].reshape(n, -1, 4, 32)
        codes = torch.stack([qs & 0x0F, qs >> 4], dim=3).reshape(n, k).to(torch.int16)
        scale = (d[..., None] * torch.stack(sc, -1).double()).reshape(n, -1)
        offset = (-dmin[..., None] * torch.stack(mn, -1).double()).reshape(n, -1)
        return Decomposed(codes, scale, offset, 32)
    # q6_k
    ql = b[..., 0:128].to(torch.int16).reshape(n, -1, 2, 64)
    qh = b[..., 128:192].to(torch.int16).reshape(n, -1, 2, 32)
    scs = b[..., 192:208].contiguous().view(torch.int8).double()
    d = _f16(b[..., 208:210])
    l0, l1 = ql[..., :32], ql[..., 32:]
    q = torch.stack([(l0 & 0xF) | ((qh & 3) << 4), (l1 & 0xF) | (((qh >> 2) & 3) << 4),
                     (l0 >> 4) | (((qh >> 4) & 3) << 4), (l1 >> 4) | (((qh >> 6) & 3) << 4)], dim=3)
    codes = (q - 32).reshape(n, k)
    scale = (d[..., None] * scs).reshape(n, -1)
    return Decomposed(codes, scale, torch.zeros_like(scale), 16)


def dequantize(weight: QuantizedWeight) -> torch.Tensor:
    """The exact float64 ``[N, K]`` values of a canonical weight."""
    fmt = weight.format
    n, k = weight.shape
    if WEIGHT_FORMATS[fmt].gguf:
        return dequantize_gguf_blocks(fmt, weight.data).reshape(n, k)
    if fmt == "int4":
        d = weight.data
        q = torch.stack([d & 0x0F, d >> 4], dim=-1).reshape(n, k).double()
        zero_default = 8.0
    else:
        q = weight.data.double()
        zero_default = 0.0
    g = k if weight.group_size is None else weight.group_size
    s = weight.scales.double().repeat_interleave(g, dim=1)
    z = zero_default if weight.zeros is None else weight.zeros.double().repeat_interleave(g, dim=1)
    return (q - z) * s


def quantize_rtn(w_NK: torch.Tensor, fmt: str, group_size: Optional[int] = 128, zeros: bool = False,
                 scale_dtype: torch.dtype = torch.float16) -> QuantizedWeight:
    """Round-to-nearest quantization of a float weight to an integer format (on-the-fly ``--quantization``).

    Symmetric (``zeros=False``): ``scale = max|w| / 7`` (int4) or ``/ 127`` (int8) per group, ``q = round(w /
    scale)`` (plus 8 for int4). Asymmetric: ``scale = (max - min) / 15`` (or ``/ 255``), ``zero = round(-min /
    scale)`` (int8 zero points shifted to the signed range). Scales are rounded to ``scale_dtype`` *before* the
    values are quantized, so the stored scales are the ones the codes were computed with.
    """
    if fmt not in ("int4", "int8"):
        raise InvalidArgumentError("quantize_rtn", "fmt", "'int4' or 'int8'", repr(fmt))
    n, k = w_NK.shape
    g = k if group_size is None else group_size
    if k % g:
        raise InvalidArgumentError("quantize_rtn", "group_size", f"a divisor of K = {k}", repr(group_size))
    w = w_NK.detach().float().reshape(n, k // g, g)
    tiny = torch.finfo(torch.float16).tiny
    if not zeros:
        top = 7.0 if fmt == "int4" else 127.0
        s = (w.abs().amax(-1) / top).clamp_min(tiny).to(scale_dtype)
        q = torch.round(w / s.float()[..., None]).clamp(-top - (1 if fmt == "int4" else 0), top)
        z_t = None
        if fmt == "int4":
            q = q + 8
    else:
        levels = 15.0 if fmt == "int4" else 255.0
        lo, hi = w.amin(-1).clamp_max(0), w.amax(-1).clamp_min(0)
        s = ((hi - lo) / levels).clamp_min(tiny).to(scale_dtype)
        # a scale rounded down would push the top of the range past the last level: round it up instead
        low = s.float() * levels < hi - lo
        s = torch.where(low, torch.nextafter(s, torch.full_like(s, float("inf"))), s)
        z = torch.round(-lo / s.float()).clamp(0, levels)
        q = torch.round(w / s.float()[..., None] + z[..., None]).clamp(0, levels)
        if fmt == "int8":
            q, z = q - 128, z - 128
        z_t = z.to(torch.uint8 if fmt == "int4" else torch.int8)
    q = q.reshape(n, k)
    if fmt == "int4":
        qi = q.to(torch.uint8).reshape(n, k // 2, 2)
        data = qi[..., 0] | (qi[..., 1] << 4)
    else:
        data = q.to(torch.int8)
    return QuantizedWeight(fmt, (n, k), data.contiguous(), s.contiguous(), z_t, group_size)


# ------------------------------------------------------------------------------------------------------------------
# Spec, capability, op
# ------------------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class WeightOnlyGemmSpec:
    """A weight-only quantized GEMM as a layer is built.

    :param dtype: dtype of ``x``, ``bias`` and the result (the activations).
    :param format: the packed weight format, a key of ``WEIGHT_FORMATS`` (``int4``, ``int8``, ``q4_0``, ``q4_1``,
        ``q8_0``, ``q4_k``, ``q6_k``).
    :param in_features: K (required: preparation needs it); a multiple of the group size (int4: even; GGUF: of
        the format's block, 32 or 256).
    :param out_features: N (required).
    :param group_size: G, elements sharing a scale, for ``int4``/``int8`` (32, 64 or 128); ``None`` means one
        group per row (per-channel). Must be ``None`` for the GGUF formats (their blocks fix it).
    :param has_zeros: whether ``int4``/``int8`` weights carry zero points (asymmetric, AWQ-style); ``False``:
        symmetric (zero point 8 for int4, 0 for int8). Must be ``False`` for GGUF formats.
    :param scale_dtype: dtype of the ``scales`` tensor of ``int4``/``int8`` weights (float16, bfloat16 or
        float32); ignored by GGUF formats (float16 inside the blocks).
    :param has_bias: whether calls pass a bias ``[N]`` in ``dtype``.
    """

    dtype: torch.dtype = torch.bfloat16
    format: str = "int4"
    in_features: int = 4096
    out_features: int = 4096
    group_size: Optional[int] = 128
    has_zeros: bool = False
    scale_dtype: torch.dtype = torch.float16
    has_bias: bool = False

    def __str__(self) -> str:
        extra = "" if WEIGHT_FORMATS.get(self.format, WEIGHT_FORMATS["int4"]).gguf else (
            f", group={self.group_size}, zeros={self.has_zeros}, scales={dtype_name(self.scale_dtype)}")
        return (f"weight_only_gemm(dtype={dtype_name(self.dtype)}, format={self.format}{extra}, "
                f"K={self.in_features}, N={self.out_features}, bias={self.has_bias})")


@dataclass(frozen=True)
class WeightOnlyGemmCapability(OpCapability):
    """What a weight-only GEMM kernel runs.

    :param formats: the weight formats it reads; ``None`` means every format of ``WEIGHT_FORMATS``.
    :param group_sizes: the integer formats' group sizes it accepts (``None`` inside the set: per-channel);
        ``None`` means any.
    :param zeros: whether it handles zero points.
    :param scale_dtypes: the scale dtypes of integer formats it accepts; ``None`` means any.
    :param min_k_multiple: K must be a multiple of this (a kernel's tile), 1 for none.
    :param min_n_multiple: N must be a multiple of this (a kernel's tile), 1 for none.
    """

    formats: Optional[FrozenSet[str]] = None
    group_sizes: Optional[FrozenSet[Optional[int]]] = None
    zeros: bool = True
    scale_dtypes: Optional[FrozenSet[torch.dtype]] = None
    min_k_multiple: int = 1
    min_n_multiple: int = 1

    def not_supported_reasons(self, spec: WeightOnlyGemmSpec) -> List[str]:
        reasons = super().not_supported_reasons(spec)
        if self.formats is not None and spec.format not in self.formats:
            reasons.append(f"weight format {spec.format} not in supported formats {sorted(self.formats)}")
        gguf = WEIGHT_FORMATS[spec.format].gguf if spec.format in WEIGHT_FORMATS else False
        if not gguf:
            if self.group_sizes is not None and spec.group_size not in self.group_sizes:
                names = sorted("per-channel" if g is None else str(g) for g in self.group_sizes)
                reasons.append(f"group size {spec.group_size or 'per-channel'} not in supported groups {names}")
            if spec.has_zeros and not self.zeros:
                reasons.append("zero points (asymmetric weights) not supported")
            if self.scale_dtypes is not None and spec.scale_dtype not in self.scale_dtypes:
                reasons.append(f"scale dtype {dtype_name(spec.scale_dtype)} not supported")
        if self.min_k_multiple > 1 and isinstance(spec.in_features, int) and spec.in_features % self.min_k_multiple:
            reasons.append(f"K = {spec.in_features} is not a multiple of {self.min_k_multiple}")
        if self.min_n_multiple > 1 and isinstance(spec.out_features, int) and spec.out_features % self.min_n_multiple:
            reasons.append(f"N = {spec.out_features} is not a multiple of {self.min_n_multiple}")
        return reasons


def weight_only_gemm_reference(x: torch.Tensor, weight: QuantizedWeight,
                               bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The float64 oracle: ``x @ dequantize(weight).T + bias`` with the exactly dequantized weight, in float64."""
    y = x.double().reshape(-1, x.shape[-1]) @ dequantize(weight).T
    if bias is not None:
        y = y + bias.double()
    return y.reshape(*x.shape[:-1], weight.shape[0])


def _native(spec: WeightOnlyGemmSpec) -> Callable:
    """Dequantize to float32 on every call, multiply in float32: correct everywhere, slow, keeps memory packed."""

    def weight_only_gemm_native(x_MK, qw, bias_N, out_MN):
        w_NK = dequantize(qw).float()
        y = x_MK.float() @ w_NK.T
        if bias_N is not None:
            y += bias_N.float()
        return out_MN.copy_(y)

    return weight_only_gemm_native


def _positive(name: str, v: object) -> None:
    if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
        raise InvalidArgumentError(OP, name, "a positive int", repr(v))


class WeightOnlyGemm(Op):
    """``y[..., N] = x[..., K] @ dequantize(weight)[N, K].T (+ bias[N])`` with ``weight`` packed.

    Build the op once per layer, then :meth:`prepare` each canonical :class:`QuantizedWeight` once (at load);
    calls take the :class:`PreparedWeight`. ``x`` may be any strided view with a unit last stride (a non-unit
    one is copied), ``bias`` and ``out`` must be contiguous.
    """

    name = OP
    spec_type = WeightOnlyGemmSpec
    __slots__ = ("_dt", "_k", "_n", "_layout")

    @classmethod
    def check_spec(cls, spec: WeightOnlyGemmSpec) -> None:
        if spec.dtype not in FLOAT_DTYPES:
            raise InvalidArgumentError(OP, "spec.dtype", "one of float32, float16, bfloat16", dtype_name(spec.dtype),
                                       "Activations are floats; the weight format is spec.format")
        if not isinstance(spec.format, str) or spec.format not in WEIGHT_FORMATS:
            raise InvalidArgumentError(OP, "spec.format", f"one of {sorted(WEIGHT_FORMATS)}", repr(spec.format))
        _positive("spec.in_features", spec.in_features)
        _positive("spec.out_features", spec.out_features)
        if not isinstance(spec.has_bias, bool):
            raise InvalidArgumentError(OP, "spec.has_bias", "a bool", repr(spec.has_bias))
        if not isinstance(spec.has_zeros, bool):
            raise InvalidArgumentError(OP, "spec.has_zeros", "a bool", repr(spec.has_zeros))
        f = WEIGHT_FORMATS[spec.format]
        k = spec.in_features
        if f.gguf:
            if spec.group_size is not None:
                raise InvalidArgumentError(OP, "spec.group_size", f"None (the {spec.format} blocks fix the group: "
                                           f"{f.block} elements)", repr(spec.group_size))
            if spec.has_zeros:
                raise InvalidArgumentError(OP, "spec.has_zeros", f"False ({spec.format} blocks carry their offsets)",
                                           repr(spec.has_zeros))
            if k % f.block:
                raise InvalidArgumentError(OP, "spec.in_features", f"a multiple of {f.block} (the {spec.format} "
                                           "block)", repr(k))
            return
        if spec.scale_dtype not in _SCALE_DTYPES:
            raise InvalidArgumentError(OP, "spec.scale_dtype", "one of float16, bfloat16, float32",
                                       repr(spec.scale_dtype))
        g = spec.group_size
        if g is not None:
            if isinstance(g, bool) or not isinstance(g, int) or g not in GROUP_SIZES:
                raise InvalidArgumentError(OP, "spec.group_size", f"None (per-channel) or one of {GROUP_SIZES}",
                                           repr(g))
            if k % g:
                raise InvalidArgumentError(OP, "spec.in_features", f"a multiple of the group size {g}", repr(k),
                                           "The group size must divide K")
        if f.bits == 4 and k % 2:
            raise InvalidArgumentError(OP, "spec.in_features", "an even K (two int4 values per byte)", repr(k))

    @classmethod
    def native(cls, spec: WeightOnlyGemmSpec) -> Callable:
        return _native(spec)

    reference = staticmethod(weight_only_gemm_reference)

    def __init__(self, spec: WeightOnlyGemmSpec, kernel: Callable, selection=None) -> None:
        super().__init__(spec, kernel, selection)
        self._dt = spec.dtype
        self._k = spec.in_features
        self._n = spec.out_features
        self._layout = getattr(kernel, "layout", CANONICAL_LAYOUT) if hasattr(kernel, "prepare") else CANONICAL_LAYOUT

    # -- preparation (once per weight, at load) ---------------------------------------------------------------------
    def check_weight(self, weight: object) -> None:
        """Raise :class:`InvalidArgumentError`, naming the field, unless ``weight`` is a canonical weight of the
        spec's format, shape, group size, zero points and scale dtype."""
        spec, n, k = self.spec, self._n, self._k
        if not isinstance(weight, QuantizedWeight):
            raise InvalidArgumentError(OP, "weight", "a QuantizedWeight (canonical packed layout)",
                                       type(weight).__name__, "Build one with quantize_rtn or from a GGUF tensor")
        if weight.format != spec.format:
            raise InvalidArgumentError(OP, "weight.format", f"{spec.format!r} (spec.format)", repr(weight.format))
        if tuple(weight.shape) != (n, k):
            raise InvalidArgumentError(OP, "weight.shape", f"(N, K) = ({n}, {k})", repr(tuple(weight.shape)))
        f = WEIGHT_FORMATS[spec.format]
        data_dtype = torch.int8 if spec.format == "int8" else torch.uint8
        check_tensor(OP, "weight.data", weight.data, shape=(n, row_bytes(spec.format, k)),
                     dims="N, bytes per row" if f.gguf else ("N, K/2" if f.bits == 4 else "N, K"),
                     dtypes=(data_dtype,))
        if not weight.data.is_contiguous():
            raise InvalidArgumentError(OP, "weight.data", "a contiguous tensor", "a strided view")
        dev = weight.data.device
        if f.gguf:
            for name in ("scales", "zeros", "group_size"):
                if getattr(weight, name) is not None:
                    raise InvalidArgumentError(OP, f"weight.{name}", f"None ({spec.format} blocks carry scales)",
                                               "a value")
            return
        if weight.group_size != spec.group_size:
            raise InvalidArgumentError(OP, "weight.group_size", f"{spec.group_size} (spec.group_size)",
                                       repr(weight.group_size))
        groups = group_count(spec.format, k, spec.group_size)
        check_tensor(OP, "weight.scales", weight.scales, shape=(n, groups), dims="N, K/G",
                     dtypes=(spec.scale_dtype,), device=dev)
        if spec.has_zeros:
            check_tensor(OP, "weight.zeros", weight.zeros, shape=(n, groups), dims="N, K/G", dtypes=(data_dtype,),
                         device=dev)
            if spec.format == "int4" and weight.zeros.numel() and int(weight.zeros.max()) > 15:
                raise InvalidArgumentError(OP, "weight.zeros", "int4 zero points in 0..15",
                                           f"a maximum of {int(weight.zeros.max())}")
        elif weight.zeros is not None:
            raise InvalidArgumentError(OP, "weight.zeros", "None (spec.has_zeros is False)", "a tensor")

    def prepare(self, weight: QuantizedWeight) -> PreparedWeight:
        """Validate a canonical weight and hand it to the kernel's ``prepare`` (once, at load)."""
        self.check_weight(weight)
        prep = getattr(self.kernel, "prepare", None)
        packed = prep(weight) if prep is not None else weight
        return PreparedWeight(packed, self._layout, weight)

    # -- the call -----------------------------------------------------------------------------------------------------
    def __call__(self, x: torch.Tensor, weight: PreparedWeight, bias: Optional[torch.Tensor] = None,
                 out: Optional[torch.Tensor] = None) -> torch.Tensor:
        dt, k, n = self._dt, self._k, self._n
        try:
            xs = x.shape
            dev = x.device
            ok = x.dtype == dt and xs[-1] == k and weight.layout == self._layout and weight.shape[0] == n \
                and weight.shape[1] == k
        except (AttributeError, IndexError):
            ok = False
        if not ok:
            self._fail(x, weight)
        if bias is not None:
            try:
                ok = self.spec.has_bias and bias.dtype == dt and bias.shape == (n,) and bias.device == dev \
                    and bias.is_contiguous()
            except AttributeError:
                ok = False
            if not ok:
                if not self.spec.has_bias:
                    raise InvalidArgumentError(OP, "bias", "None (spec.has_bias is False)", "a tensor")
                check_tensor(OP, "bias", bias, shape=(n,), dims="N", dtypes=(dt,), device=dev)
                raise InvalidArgumentError(OP, "bias", "a contiguous tensor [N]", "a strided view")
        elif self.spec.has_bias:
            raise InvalidArgumentError(OP, "bias", "a tensor [N] (spec.has_bias is True)", "None")
        x2 = x.reshape(-1, k) if len(xs) != 2 else x
        if x2.stride(-1) != 1:
            x2 = x2.contiguous()
        if out is None:
            out = torch.empty((*xs[:-1], n), dtype=dt, device=dev)
        else:
            try:
                ok = out.dtype == dt and out.shape == (*xs[:-1], n) and out.device == dev and out.is_contiguous()
            except AttributeError:
                ok = False
            if not ok:
                check_tensor(OP, "out", out, shape=(*xs[:-1], n), dtypes=(dt,), device=dev)
                raise InvalidArgumentError(OP, "out", "a contiguous tensor", "a strided view")
        if x2.shape[0]:
            self.kernel(x2, weight.packed, bias, out.view(-1, n))
        return out

    def _fail(self, x: object, weight: object) -> None:
        if not isinstance(weight, PreparedWeight):
            raise InvalidArgumentError(OP, "weight", "a PreparedWeight (from op.prepare at load)",
                                       type(weight).__name__, "Call op.prepare(quantized_weight) once when loading")
        if weight.layout != self._layout:
            raise InvalidArgumentError(OP, "weight", f"a weight prepared for layout {self._layout!r}",
                                       f"layout {weight.layout!r}", "Prepare the weight with this op")
        if tuple(weight.shape) != (self._n, self._k):
            raise InvalidArgumentError(OP, "weight", f"(N, K) = ({self._n}, {self._k})", repr(weight.shape))
        check_tensor(OP, "x", x, dtypes=(self._dt,))
        raise InvalidArgumentError(OP, "x", f"last dim K = {self._k}", f"shape {list(x.shape)}")
