"""Tensor parallelism applied from outside the model code: a sharding plan per layer kind, and sharded loading.

A model is built exactly as for one device (its files hold no parallel code); :func:`apply_tensor_parallel`
then walks its layers and replaces each by its sharded form on this rank, and :func:`load_sharded` reads only
this rank's slices of every sharded tensor (``safe_open(...).get_slice``). The plan, per layer kind (the scheme
of Megatron-LM, as in gpt-fast's ``tp.py``):

- **attention** (:class:`~anyaccel.models.llama.SelfAttention`): query heads split evenly across ranks; KV heads
  split too when ``Hkv % world == 0``, else (fewer KV heads than ranks, ``world % Hkv == 0``) each rank keeps
  the one KV head its query heads read: replicated. The fused ``qkv`` projection is **column-parallel** (this
  rank's q rows, then its k rows, then its v rows); ``o`` is **row-parallel** (this rank's input columns, a
  partial sum, one ``all_reduce``, then the bias added once). Rotary and q/k norms act per head: replicated.
- **dense MLP** (:class:`~anyaccel.models.layers.GatedMLP`): ``gate_up`` column-parallel (this rank's gate rows,
  then its up rows, so the gated activation stays local), ``down`` row-parallel with one ``all_reduce``.
- **mixture of experts** (:class:`~anyaccel.models.layers.MoE`): **TP inside every expert**, not expert
  parallelism: the router is replicated (every rank routes every token identically), each expert's ``w13`` and
  ``w2`` are split along the intermediate size like a dense MLP, the shared expert too; the routed and shared
  partial sums are added locally and reduced with ONE ``all_reduce`` per MoE layer. No ``all_to_all``: with
  the tiny and medium expert counts served here, every rank computes every routed token on its slice of every
  expert, so the load is balanced whatever the router does.
- **embedding**: **vocabulary-parallel**: this rank holds rows ``[v0, v1)``; a token outside gives zeros; one
  ``all_reduce`` (exact in every dtype: one non-zero term).
- **LM head**: vocabulary-parallel (column-parallel over V): this rank's logits ``[T, V_r]``, one
  ``all_gather`` along V, so every rank samples from the same full logits and takes the same token.
- **norms**: replicated.

Uneven sizes (a vocabulary or intermediate size not divisible by the world size) split like
``torch.tensor_split``: the first ``n % world`` ranks get one more. Heads must divide: a query-head count not
divisible by the world size, or a KV-head count that neither divides nor is divided by it, is a
:class:`~anyaccel.models.config.ConfigError` naming the counts.

Every rank runs the same program (SPMD): the same runner, the same scheduling, the same sampling (the logits
are identical on every rank after the gather), so their tokens agree without any broadcast.

Families: every decoder built on :class:`~anyaccel.models.llama.DecoderForCausalLM` (Llama, Mistral, Qwen2/3,
Gemma 1/2, Phi-3, Mixtral, Qwen2-MoE, Qwen3-MoE), and GPT-2 (the same plan on its own layer names; its
checkpoint's transposed Conv1D weights are sliced along the other dim). BERT is refused with an
:class:`~anyaccel.core.errors.UnsupportedError` (an encoder: no generation to shard yet).

Shape legend: T tokens, H hidden, V vocabulary (V_r this rank's), I intermediate (I_r), D head size.
"""
from __future__ import annotations

import dataclasses
import os
import re
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import torch

from ..core.backend import Backend
from ..core.collectives import Communicator, tensor_split_sizes
from ..core.errors import InvalidArgumentError, UnsupportedError
from ..core.gemm import GroupedGemm, GroupedGemmSpec
from .base import Model, WeightLoadError, WeightSource, _cat0
from .config import ConfigError
from .layers import AttentionLayer, GatedMLP, Linear, MoE, RotaryEmbedding

__all__ = ["HeadLayout", "head_layout", "shard_range", "RowParallelLinear", "VocabParallelHead", "ReducedMLP",
           "apply_tensor_parallel", "shard_plan", "load_sharded", "SafetensorsSlices", "TensorSlices",
           "build_tensor_parallel_model", "init_from_env", "shared_seed", "tp_world", "MirroredEngine"]

#: One sharded internal tensor: (dim, [(start, stop), ...]): this rank's local tensor is the concatenation along
#: ``dim`` of those ranges of the full internal tensor.
Shard = Tuple[int, List[Tuple[int, int]]]


def shard_range(n: int, world: int, rank: int) -> Tuple[int, int]:
    """This rank's ``[start, stop)`` of ``n`` items split like ``torch.tensor_split`` (first ``n % world`` longer)."""
    sizes = tensor_split_sizes(n, world)
    start = sum(sizes[:rank])
    return start, start + sizes[rank]


@dataclasses.dataclass(frozen=True)
class HeadLayout:
    """Which heads this rank owns: query heads ``[q_start, q_start + q_count)``, KV heads
    ``[kv_start, kv_start + kv_count)`` (``kv_replicated``: fewer KV heads than ranks, each rank keeps one)."""

    q_start: int
    q_count: int
    kv_start: int
    kv_count: int
    kv_replicated: bool


def head_layout(num_heads: int, num_kv_heads: int, world: int, rank: int, what: str = "model") -> HeadLayout:
    """The head split of one attention layer; a :class:`ConfigError` when the counts do not allow ``world``."""
    if num_heads % world:
        raise ConfigError(f"{what}: tensor parallel size {world} does not divide the {num_heads} attention heads; "
                          f"use a size that divides {num_heads}")
    q = num_heads // world
    if num_kv_heads % world == 0:
        kv = num_kv_heads // world
        return HeadLayout(rank * q, q, rank * kv, kv, False)
    if world % num_kv_heads == 0:
        group = num_heads // num_kv_heads  # query heads per KV head; this rank's q heads sit in one group
        return HeadLayout(rank * q, q, (rank * q) // group, 1, True)
    raise ConfigError(f"{what}: tensor parallel size {world} neither divides nor is a multiple of the "
                      f"{num_kv_heads} KV heads; use a size that divides {num_kv_heads} or that {num_kv_heads} "
                      f"divides")


# ------------------------------------------------------------------------------------------------ layers


class RowParallelLinear(Linear):
    """``y = all_reduce(x_r @ W[:, cols_r].T) + b``: this rank's input columns, a partial sum reduced over the
    ranks, the bias added once after the reduction. With ``comm=None`` the partial sum is returned unreduced
    (the caller reduces it, e.g. once per MoE layer) and a bias is refused."""

    def __init__(self, key: str, in_features: int, out_features: int, bias: bool, backend: Backend,
                 dtype: torch.dtype, strict: bool, comm: Optional[Communicator]) -> None:
        if bias and comm is None:
            raise InvalidArgumentError("RowParallelLinear", "bias", "no bias for an unreduced partial sum", bias)
        super().__init__(key, in_features, out_features, False, backend, dtype, strict)
        self.has_bias = bias  # bound by Linear.bind; added after the reduction, never inside the GEMM
        self.comm = comm

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        y = self.op(x, self.weight, None)
        if self.comm is None:
            return y
        y = self.comm.all_reduce(y)
        return y + self.bias if self.bias is not None else y


class VocabParallelHead(Linear):
    """The LM head over this rank's vocabulary rows; ``__call__`` returns the full ``[T, V]`` logits, gathered."""

    def __init__(self, key: str, hidden: int, vocab_local: int, backend: Backend, dtype: torch.dtype, strict: bool,
                 comm: Communicator) -> None:
        super().__init__(key, hidden, vocab_local, False, backend, dtype, strict)
        self.comm = comm

    def __call__(self, x_TH: torch.Tensor) -> torch.Tensor:
        return self.comm.all_gather(super().__call__(x_TH), dim=x_TH.dim() - 1)  # [T, V]


class ReducedMLP:
    """An MLP whose output is a partial sum (a TP MoE): one ``all_reduce`` after it."""

    def __init__(self, inner: Any, comm: Communicator) -> None:
        self.inner, self.comm = inner, comm

    def bind(self, w) -> None:
        self.inner.bind(w)

    def __getattr__(self, name: str) -> Any:  # key, route, num_experts...: the wrapped layer's
        return getattr(self.__dict__["inner"], name)

    def __call__(self, x_TH: torch.Tensor) -> torch.Tensor:
        return self.comm.all_reduce(self.inner(x_TH))


def _vocab_parallel_embed(model: Any, v0: int, v1: int, comm: Communicator) -> Callable[[torch.Tensor], torch.Tensor]:
    """``embed_tokens`` over this rank's rows ``[v0, v1)`` of the table: zeros elsewhere, then one all_reduce."""

    def embed_tokens(input_ids_T: torch.Tensor) -> torch.Tensor:
        mine_T = (input_ids_T >= v0) & (input_ids_T < v1)
        local_T = torch.where(mine_T, input_ids_T - v0, torch.zeros_like(input_ids_T))
        h_TH = model.embed.index_select(0, local_T) * mine_T.unsqueeze(-1).to(model.embed.dtype)
        h_TH = comm.all_reduce(h_TH)
        if model.embed_multiplier is not None:
            h_TH = h_TH * model.embed_multiplier
        return h_TH

    return embed_tokens


# ------------------------------------------------------------------------------------------------ the plan


def _decoder_classes():
    from .llama import DecoderForCausalLM, SelfAttention

    return DecoderForCausalLM, SelfAttention


def _is_gpt2(model: Model) -> bool:
    from .gpt2 import GPT2LMHeadModel

    return isinstance(model, GPT2LMHeadModel)


def _check_family(model: Model) -> None:
    decoder, _ = _decoder_classes()
    if not isinstance(model, decoder) and not _is_gpt2(model):
        raise UnsupportedError(f"tensor parallelism: {model.config.architecture} has no sharding plan (supported: "
                               f"the decoder families built on DecoderForCausalLM: Llama, Mistral, Qwen2/3, "
                               f"Gemma 1/2, Phi-3, Mixtral, Qwen2-MoE, Qwen3-MoE; and GPT-2); run it with --tp 1")


def tp_world(model: Model) -> Tuple[int, int]:
    """``(world_size, rank)`` a model was sharded for; ``(1, 0)`` for an unsharded one."""
    comm = getattr(model, "tp_comm", None)
    return (comm.world_size, comm.rank) if comm is not None else (1, 0)


def shard_plan(model: Model, world: int, rank: int) -> Dict[str, Shard]:
    """Every sharded internal tensor of ``model`` (a decoder family) on ``rank`` of ``world``: name -> shard.
    Internal tensors not named here are replicated (read whole on every rank)."""
    _check_family(model)
    if _is_gpt2(model):
        return _gpt2_plan(model, world, rank)
    c = model.config
    d, what = c.head_size, c.architecture
    heads = head_layout(c.num_heads, c.num_kv_heads, world, rank, what)
    plan: Dict[str, Shard] = {}
    v0, v1 = shard_range(c.vocab_size, world, rank)
    plan["embed"] = (0, [(v0, v1)])
    if not c.tie_word_embeddings:
        plan["lm_head.weight"] = (0, [(v0, v1)])
    q0, q1 = heads.q_start * d, (heads.q_start + heads.q_count) * d
    k0 = c.num_heads * d + heads.kv_start * d
    k1 = k0 + heads.kv_count * d
    vv = c.num_kv_heads * d
    qkv_rows = [(q0, q1), (k0, k1), (k0 + vv, k1 + vv)]
    for i, layer in enumerate(model.layers):
        p = f"layers.{i}"
        plan[p + ".attn.qkv.weight"] = (0, qkv_rows)
        plan[p + ".attn.qkv.bias"] = (0, qkv_rows)
        plan[p + ".attn.o.weight"] = (1, [(q0, q1)])
        mlp = layer.mlp.inner if isinstance(layer.mlp, ReducedMLP) else layer.mlp
        if isinstance(mlp, MoE):
            inter = c.moe_intermediate_size
            i0, i1 = shard_range(inter, world, rank)
            plan[p + ".mlp.w13"] = (1, [(i0, i1), (inter + i0, inter + i1)])
            plan[p + ".mlp.w2"] = (2, [(i0, i1)])
            si = c.shared_expert_intermediate_size if mlp.shared is not None else 0
            if si:
                s0, s1 = shard_range(si, world, rank)
                plan[p + ".mlp.shared.gate_up.weight"] = (0, [(s0, s1), (si + s0, si + s1)])
                plan[p + ".mlp.shared.down.weight"] = (1, [(s0, s1)])
        else:
            inter = c.intermediate_size
            i0, i1 = shard_range(inter, world, rank)
            rows = [(i0, i1), (inter + i0, inter + i1)]
            plan[p + ".mlp.gate_up.weight"] = (0, rows)
            plan[p + ".mlp.gate_up.bias"] = (0, rows)
            plan[p + ".mlp.down.weight"] = (1, [(i0, i1)])
    return plan


def _gpt2_plan(model: Model, world: int, rank: int) -> Dict[str, Shard]:
    """GPT-2: the same plan on its own names (``h.{i}.qkv`` / ``o`` / ``mlp.fc`` / ``mlp.proj``, ``wte``)."""
    c = model.config
    full_heads = getattr(model, "tp_full_heads", c.num_heads)  # the config's count before sharding
    heads = head_layout(full_heads, full_heads, world, rank, c.architecture)
    d, h, inter = c.head_size, c.hidden_size, c.intermediate_size
    q0, q1 = heads.q_start * d, (heads.q_start + heads.q_count) * d
    i0, i1 = shard_range(inter, world, rank)
    v0, v1 = shard_range(c.vocab_size, world, rank)
    plan: Dict[str, Shard] = {"wte": (0, [(v0, v1)])}
    for i in range(c.num_layers):
        p = f"h.{i}"
        rows = [(q0, q1), (h + q0, h + q1), (2 * h + q0, 2 * h + q1)]
        plan[p + ".qkv.weight"] = plan[p + ".qkv.bias"] = (0, rows)
        plan[p + ".o.weight"] = (1, [(q0, q1)])
        plan[p + ".mlp.fc.weight"] = plan[p + ".mlp.fc.bias"] = (0, [(i0, i1)])
        plan[p + ".mlp.proj.weight"] = (1, [(i0, i1)])
    return plan


class _VocabParallelTable:
    """A vocabulary-parallel embedding table for a model that looks tokens up with ``table.index_select(0, ids)``
    (GPT-2's ``wte``): this rank's rows, zeros for other tokens, one all_reduce."""

    def __init__(self, rows: torch.Tensor, v0: int, v1: int, comm: Communicator) -> None:
        self.rows, self.v0, self.v1, self.comm = rows, v0, v1, comm

    def index_select(self, dim: int, ids_T: torch.Tensor) -> torch.Tensor:
        mine_T = (ids_T >= self.v0) & (ids_T < self.v1)
        local_T = torch.where(mine_T, ids_T - self.v0, torch.zeros_like(ids_T))
        h_TH = self.rows.index_select(0, local_T) * mine_T.unsqueeze(-1).to(self.rows.dtype)
        return self.comm.all_reduce(h_TH)


def _apply_gpt2(model: Any, comm: Communicator) -> Model:
    from .layers import PlainMLP

    c, be, dt, st = model.config, model.backend, model.dtype, model.strict
    world, rank = comm.world_size, comm.rank
    plan = _gpt2_plan(model, world, rank)
    heads = head_layout(c.num_heads, c.num_heads, world, rank, c.architecture)
    d, h = c.head_size, c.hidden_size
    specs = [dataclasses.replace(s, num_heads=heads.q_count, num_kv_heads=heads.q_count)
             for s in model.kv_cache_specs()]
    model.kv_cache_specs = lambda specs=specs: list(specs)
    for i, b in enumerate(model.blocks):
        if not isinstance(b.mlp, PlainMLP):
            raise UnsupportedError(f"tensor parallelism: block {i} of {c.architecture} has an MLP the plan does "
                                   f"not know ({type(b.mlp).__name__})")
        b.qkv = Linear(b.qkv.key, h, 3 * heads.q_count * d, True, be, dt, st)
        b.o = RowParallelLinear(b.o.key, heads.q_count * d, h, True, be, dt, st, comm)
        b.attn = AttentionLayer(specs[i], be, st)
        width = _width(plan[f"h.{i}.mlp.fc.weight"][1])
        b.mlp.fc = Linear(b.mlp.fc.key, h, width, True, be, dt, st)
        b.mlp.proj = RowParallelLinear(b.mlp.proj.key, width, h, True, be, dt, st, comm)
    v0, v1 = plan["wte"][1][0]
    model.lm_head = VocabParallelHead("lm_head", h, v1 - v0, be, dt, st, comm)
    bind = model.bind

    def bind_sharded(w: Dict[str, torch.Tensor]) -> None:
        bind(w)
        model.wte = _VocabParallelTable(w["wte"], v0, v1, comm)

    model.bind = bind_sharded
    # GPT-2's forward reshapes by the config's head count: this rank's (the plan remembers the full one)
    model.tp_full_heads = c.num_heads
    model.config = dataclasses.replace(c, num_heads=heads.q_count)
    return model


def _width(ranges: Sequence[Tuple[int, int]]) -> int:
    return sum(b - a for a, b in ranges)


def apply_tensor_parallel(model: Model, comm: Communicator) -> Model:
    """Shard ``model`` (built for one device, weights not yet loaded) in place for ``comm``'s rank, following the
    plan of the module docstring; then load it with :func:`load_sharded`. Returns ``model``. Every op of a sharded
    layer is selected again at its local shape, here, once."""
    if not isinstance(comm, Communicator):
        raise InvalidArgumentError("apply_tensor_parallel", "comm", "an anyaccel Communicator", type(comm).__name__)
    _check_family(model)
    if model.loaded:
        raise InvalidArgumentError("apply_tensor_parallel", "model", "a model whose weights are not loaded yet "
                                   "(each rank then loads only its slices)", "a loaded model")
    world, rank = comm.world_size, comm.rank
    if getattr(model, "tp_comm", None) is not None:
        raise InvalidArgumentError("apply_tensor_parallel", "model", "an unsharded model", "already sharded")
    c, be, dt, st = model.config, model.backend, model.dtype, model.strict
    _, self_attention = _decoder_classes()
    heads = head_layout(c.num_heads, c.num_kv_heads if not _is_gpt2(model) else c.num_heads, world, rank,
                        c.architecture)
    model.tp_comm = comm
    model.tp_heads = heads
    if world == 1:
        return model
    if _is_gpt2(model):
        return _apply_gpt2(model, comm)
    plan = shard_plan(model, world, rank)
    d = c.head_size
    specs = [dataclasses.replace(s, num_heads=heads.q_count, num_kv_heads=heads.kv_count)
             for s in model.kv_cache_specs()]
    model.kv_cache_specs = lambda specs=specs: list(specs)  # what the runner sizes and allocates the KV cache by
    rotary = RotaryEmbedding(c.head_size, c.rotary_dim, heads.q_count, heads.kv_count, c.max_position, c.rope_theta,
                             c.rope_scaling, be, dt, st)
    model.rotary = rotary
    for i, layer in enumerate(model.layers):
        a = layer.attn
        if not isinstance(a, self_attention):
            raise UnsupportedError(f"tensor parallelism: layer {i} of {c.architecture} has attention "
                                   f"{type(a).__name__}, which the plan does not know")
        a.hq, a.hkv = heads.q_count, heads.kv_count
        a.sizes = [heads.q_count * d, heads.kv_count * d, heads.kv_count * d]
        a.qkv = Linear(a.qkv.key, c.hidden_size, sum(a.sizes), a.qkv.has_bias, be, dt, st)
        a.o = RowParallelLinear(a.o.key, heads.q_count * d, c.hidden_size, a.o.has_bias, be, dt, st, comm)
        a.rotary = rotary
        a.attn = AttentionLayer(specs[i], be, st)
        mlp = layer.mlp
        if isinstance(mlp, MoE):
            _shard_moe(mlp, plan, f"layers.{i}.mlp", c.hidden_size, be, dt, st)
            layer.mlp = ReducedMLP(mlp, comm)
        elif isinstance(mlp, GatedMLP):
            _shard_gated(mlp, plan, c.hidden_size, be, dt, st, comm)
        else:
            raise UnsupportedError(f"tensor parallelism: layer {i} of {c.architecture} has MLP "
                                   f"{type(mlp).__name__}, which the plan does not know")
    v0, v1 = plan["embed"][1][0]
    model.lm_head = VocabParallelHead("lm_head", c.hidden_size, v1 - v0, be, dt, st, comm)
    model.embed_tokens = _vocab_parallel_embed(model, v0, v1, comm)
    return model


def _shard_gated(mlp: GatedMLP, plan: Dict[str, Shard], hidden: int, be: Backend, dt: torch.dtype, st: bool,
                 comm: Optional[Communicator]) -> None:
    up_key, down_key = mlp.gate_up.key, mlp.down.key
    width = _width(plan[up_key + ".weight"][1])
    mlp.gate_up = Linear(up_key, hidden, width, mlp.gate_up.has_bias, be, dt, st)
    mlp.down = RowParallelLinear(down_key, width // 2, hidden, mlp.down.has_bias, be, dt, st, comm)


def _shard_moe(moe: MoE, plan: Dict[str, Shard], key: str, hidden: int, be: Backend, dt: torch.dtype,
               st: bool) -> None:
    width = _width(plan[key + ".w13"][1])  # 2 * I_r
    moe.up = GroupedGemm.build(GroupedGemmSpec(dtype=dt, num_experts=moe.num_experts, mode="segments",
                                               in_features=hidden, out_features=width), be, strict=st)
    moe.down = GroupedGemm.build(GroupedGemmSpec(dtype=dt, num_experts=moe.num_experts, mode="segments",
                                                 in_features=width // 2, out_features=hidden), be, strict=st)
    if moe.shared is not None:
        _shard_gated(moe.shared, plan, hidden, be, dt, st, None)  # reduced with the routed experts, once


# ------------------------------------------------------------------------------------------------ loading


class TensorSlices:
    """Checkpoint tensors already in memory (a transformers model object): slices are views of them."""

    def __init__(self, weights: Iterable[Tuple[str, torch.Tensor]], normalize: Callable[[str], str]) -> None:
        self._t: Dict[str, torch.Tensor] = {normalize(n): t for n, t in weights}

    def names(self) -> List[str]:
        return list(self._t)

    def shape(self, name: str) -> Tuple[int, ...]:
        return tuple(self._t[name].shape)

    def read(self, name: str, index: Optional[Tuple[slice, ...]] = None) -> torch.Tensor:
        t = self._t[name]
        return t if index is None else t[index]


class SafetensorsSlices:
    """The safetensors shards of an HF directory; :meth:`read` with an index reads only that slice from disk
    (``safe_open(...).get_slice``)."""

    def __init__(self, directory: str, normalize: Callable[[str], str]) -> None:
        from safetensors import safe_open

        from .loading import safetensors_files

        self._where: Dict[str, Tuple[str, str]] = {}
        self._files: Dict[str, Any] = {}
        for path in safetensors_files(directory):
            try:
                f = safe_open(str(path), framework="pt")
            except Exception as e:  # the library's own error types
                raise WeightLoadError(f"{path}: not a readable safetensors file ({type(e).__name__}: {e})") from None
            self._files[str(path)] = f
            for n in f.keys():
                self._where[normalize(n)] = (str(path), n)
        #: bytes read, for the report that each rank read only its share
        self.bytes_read = 0

    def names(self) -> List[str]:
        return list(self._where)

    def shape(self, name: str) -> Tuple[int, ...]:
        path, n = self._where[name]
        return tuple(self._files[path].get_slice(n).get_shape())

    def read(self, name: str, index: Optional[Tuple[slice, ...]] = None) -> torch.Tensor:
        path, n = self._where[name]
        try:
            t = self._files[path].get_tensor(n) if index is None else self._files[path].get_slice(n)[index]
        except Exception as e:
            raise WeightLoadError(f"{path}: tensor '{n}' cannot be read ({type(e).__name__}: {e})") from None
        self.bytes_read += t.numel() * t.element_size()
        return t


def _index(dim: int, a: int, b: int) -> Tuple[slice, ...]:
    return tuple([slice(None)] * dim + [slice(a, b)])


def _read_cat0(names: Sequence[str], shapes: Sequence[Tuple[int, ...]], dim: int,
               ranges: Sequence[Tuple[int, int]], reader: Any) -> torch.Tensor:
    """The ranges along ``dim`` of ``cat(names, dim=0)``, reading only what they cover."""
    if dim > 0:
        return torch.cat([torch.cat([reader.read(n, _index(dim, a, b)) for a, b in ranges], dim)
                          for n in names], 0)
    parts, offsets, off = [], [], 0
    for s in shapes:
        offsets.append(off)
        off += s[0]
    for a, b in ranges:
        for n, s, o in zip(names, shapes, offsets):
            lo, hi = max(a, o), min(b, o + s[0])
            if lo < hi:
                parts.append(reader.read(n, _index(0, lo - o, hi - o)))
    return torch.cat(parts, 0)


def _read_source(src: WeightSource, shard: Optional[Shard], reader: Any, target: str) -> torch.Tensor:
    if shard is None:
        return src.combine([reader.read(n) for n in src.names])
    dim, ranges = shard
    per = getattr(src.combine, "per_expert", None)
    if per is not None:  # stack_experts: [E, cat(group)...]; dim 0 is the expert
        if dim == 0:
            raise UnsupportedError(f"tensor parallelism: '{target}' would shard experts (expert parallelism), "
                                   f"which the plan does not do")
        groups = [src.names[i:i + per] for i in range(0, len(src.names), per)]
        return torch.stack([_read_cat0(g, src.shapes[:per], dim - 1, ranges, reader) for g in groups])
    if src.combine is _cat0:
        return _read_cat0(src.names, src.shapes, dim, ranges, reader)
    if len(src.names) == 1:  # the tensor itself (``single`` or an identity combine)
        return torch.cat([reader.read(src.names[0], _index(dim, a, b)) for a, b in ranges], dim)
    raise UnsupportedError(f"tensor parallelism: cannot shard '{target}': its checkpoint tensors combine in a way "
                           f"the loader does not know")


def _transposes(transform: Callable) -> bool:
    """Whether a load-time transform is a plain 2-D transpose (GPT-2's Conv1D weights)."""
    from .gpt2 import _t

    return transform is _t


def load_sharded(model: Model, reader: Any, allow_unexpected: bool = False) -> None:
    """Load ``model`` (sharded by :func:`apply_tensor_parallel`, or not) reading only this rank's slices.

    The same checks as :meth:`Model.load_weights`: a missing tensor, a shape that disagrees with the config, a
    non-floating tensor or (unless ``allow_unexpected``) an unused tensor is a :class:`WeightLoadError`."""
    world, rank = tp_world(model)
    plan = shard_plan(model, world, rank) if world > 1 else {}
    arch = model.config.architecture
    present = set(reader.names())
    used = set()
    out: Dict[str, torch.Tensor] = {}
    for rule in model.weight_rules():
        src = next((o for o in rule.options if all(n in present for n in o.names)), None)
        if src is None:
            missing = [n for n in rule.options[0].names if n not in present]
            raise WeightLoadError(f"{arch}: checkpoint is missing tensor '{missing[0]}'")
        for n, shape in zip(src.names, src.shapes):
            got = reader.shape(n)
            if tuple(got) != tuple(shape):
                raise WeightLoadError(f"{arch}: tensor '{n}' has shape {list(got)}, expected {list(shape)} from "
                                      f"the config")
            used.add(n)
        shard = plan.get(rule.target)
        if shard is not None and rule.transform is not None:
            if not _transposes(rule.transform) or len(src.names) != 1 or len(src.shapes[0]) != 2:
                raise UnsupportedError(f"tensor parallelism: cannot shard '{rule.target}' (it is transformed at "
                                       f"load)")
            shard = (1 - shard[0], shard[1])  # the checkpoint holds the transpose: slice the other dim
        t = _read_source(src, shard, reader, rule.target)
        if not (t.dtype.is_floating_point and t.dtype.itemsize >= 2):
            raise WeightLoadError(f"{arch}: tensor '{src.names[0]}' has dtype {str(t.dtype).removeprefix('torch.')}"
                                  f", expected a floating-point weight (float32, float16 or bfloat16)")
        if rule.transform is not None:
            t = rule.transform(t.float())
        out[rule.target] = t.detach().to(device=model.device, dtype=model.dtype).contiguous()
    leftovers = sorted(n for n in present if n not in used and not any(re.fullmatch(p, n)
                                                                         for p in model.ignore_patterns))
    if leftovers and not allow_unexpected:
        raise WeightLoadError(f"{arch}: unexpected tensor(s) in the checkpoint: {', '.join(leftovers[:8])}")
    model.weights = out
    model.bind(out)
    model.loaded = True


def build_tensor_parallel_model(source: Any, backend: Backend, dtype: Any, comm: Communicator, strict: bool = False,
                                block_size: Optional[int] = None) -> Model:
    """:func:`~anyaccel.models.base.build_model` for one rank of a tensor-parallel group: build, shard, then load
    only this rank's slices (a directory: from disk; a transformers model object: from its state dict)."""
    from . import loading
    from .base import build_from_config_dict, parse_dtype

    dt = parse_dtype(dtype)
    if isinstance(source, (str, os.PathLike)):
        d, label = loading.read_config(source), os.path.join(os.fspath(source), "config.json")
    elif loading.is_hf_model(source):
        d, label = loading.hf_model_config(source), f"config of the {type(source).__name__} object"
    elif isinstance(source, dict):
        d, label = source, "config dict"
    else:
        raise TypeError(f"build_tensor_parallel_model: expected a directory, a transformers model or a config dict; "
                        f"received {type(source).__name__}")
    model = build_from_config_dict(d, backend, dt, strict, block_size, label)
    apply_tensor_parallel(model, comm)
    if isinstance(source, (str, os.PathLike)):
        load_sharded(model, SafetensorsSlices(os.fspath(source), model.normalize_name))
    elif loading.is_hf_model(source):
        load_sharded(model, TensorSlices(loading.iter_hf_model(source), model.normalize_name))
    return model


def shared_seed(comm: Communicator, seed: Optional[int]) -> int:
    """A sampling seed every rank agrees on: ``seed`` itself, or (``None``) rank 0's random draw, broadcast."""
    if seed is not None:
        return int(seed)
    mine = torch.randint(0, 2 ** 62, (1,), dtype=torch.int64)
    return int(comm.broadcast(mine.to(comm.device), 0).item())


def init_from_env(backend: Backend, tensor_parallel_size: int, timeout: Optional[float] = None) -> Communicator:
    """The communicator of a process started by ``torchrun`` (``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``,
    ``MASTER_PORT`` in the environment), over ``backend``'s declared ``distributed_backend``. The world must be
    exactly ``tensor_parallel_size`` processes."""
    where = "tensor_parallel_size"
    if isinstance(tensor_parallel_size, bool) or not isinstance(tensor_parallel_size, int) or tensor_parallel_size < 1:
        raise InvalidArgumentError(where, "tensor_parallel_size", "an int >= 1", repr(tensor_parallel_size))
    missing = [k for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing:
        raise InvalidArgumentError(where, "environment", "the variables torchrun sets (RANK, WORLD_SIZE, "
                                   "MASTER_ADDR, MASTER_PORT)", f"missing {', '.join(missing)}",
                                   f"launch with: torchrun --nproc-per-node {tensor_parallel_size} -m anyaccel "
                                   f"generate ... --tp {tensor_parallel_size}")
    world, rank = int(os.environ["WORLD_SIZE"]), int(os.environ["RANK"])
    if world != tensor_parallel_size:
        raise InvalidArgumentError(where, "tensor_parallel_size", f"the torchrun world size ({world})",
                                   tensor_parallel_size, f"pass --tp {world}, or launch {tensor_parallel_size} "
                                   f"processes (torchrun --nproc-per-node {tensor_parallel_size})")
    # the device of this process: its index on this node (LOCAL_RANK), so every node numbers its devices from 0
    local = int(os.environ.get("LOCAL_RANK", rank))
    device = Communicator._default_device(backend.device, local)
    return Communicator.init(backend, rank, world, "env://", timeout=timeout, device=device)


# ------------------------------------------------------------------------------------------------ serving


class MirroredEngine:
    """An :class:`~anyaccel.models.runner.Engine` driven by rank 0 and mirrored on every other rank.

    A server receives requests on rank 0 only, but every rank must run the same steps (each forward has
    collectives). On rank 0, :meth:`add_request`, :meth:`abort` and :meth:`step` first broadcast the call (JSON)
    and then apply it; the other ranks sit in :meth:`follow`, applying each call in the same order, until rank 0
    calls :meth:`stop`. Unseeded sampling gets a seed on rank 0 before the broadcast, so every rank draws the
    same token. Everything else (``num_waiting``, ``has_unfinished_requests()``...) reads the local engine."""

    def __init__(self, engine: Any, comm: Communicator) -> None:
        import threading

        self.engine, self.comm = engine, comm
        self._lock = threading.Lock()  # one call at a time: the broadcast order is the order every rank applies

    def __getattr__(self, name: str) -> Any:
        return getattr(self.__dict__["engine"], name)

    # -- the wire: a length, then the JSON bytes
    def _send(self, cmd: Dict[str, Any]) -> None:
        import json

        data = torch.tensor(list(json.dumps(cmd).encode()), dtype=torch.uint8)
        self.comm.broadcast(torch.tensor([data.numel()], dtype=torch.int64, device=self.comm.device), 0)
        self.comm.broadcast(data.to(self.comm.device), 0)

    def _recv(self) -> Dict[str, Any]:
        import json

        n = int(self.comm.broadcast(torch.zeros(1, dtype=torch.int64, device=self.comm.device), 0).item())
        data = self.comm.broadcast(torch.zeros(n, dtype=torch.uint8, device=self.comm.device), 0)
        return json.loads(bytes(data.cpu().tolist()).decode())

    def _leader(self, method: str) -> None:
        if self.comm.rank != 0:
            raise InvalidArgumentError("MirroredEngine", method, "a call on rank 0 (the others follow)",
                                       f"a call on rank {self.comm.rank}")

    def add_request(self, request_id: str, prompt: Sequence[int], params: Any = None) -> None:
        from .sampling import SamplingParams

        self._leader("add_request")
        params = params if params is not None else SamplingParams()
        if params.seed is None and params.temperature:
            params = dataclasses.replace(params, seed=int(torch.randint(0, 2 ** 62, (1,)).item()))
        with self._lock:
            self._send({"op": "add", "id": request_id, "prompt": [int(t) for t in prompt],
                        "params": dataclasses.asdict(params)})
            self.engine.add_request(request_id, prompt, params)

    def abort(self, request_id: str) -> bool:
        self._leader("abort")
        with self._lock:
            self._send({"op": "abort", "id": request_id})
            return self.engine.abort(request_id)

    def step(self):
        self._leader("step")
        with self._lock:
            self._send({"op": "step"})
            return self.engine.step()

    def stop(self) -> None:
        """Release the followers (rank 0, once, when serving ends)."""
        self._leader("stop")
        with self._lock:
            self._send({"op": "stop"})

    def follow(self) -> int:
        """Apply rank 0's calls until it stops (ranks other than 0); returns the number of calls applied."""
        from ..core.errors import AnyaccelError
        from .sampling import SamplingParams

        n = 0
        while True:
            cmd = self._recv()
            op = cmd["op"]
            if op == "stop":
                return n
            n += 1
            try:
                if op == "add":
                    p = dict(cmd["params"])
                    p["stop_token_ids"], p["stop"] = tuple(p["stop_token_ids"]), tuple(p["stop"])
                    self.engine.add_request(cmd["id"], cmd["prompt"], SamplingParams(**p))
                elif op == "abort":
                    self.engine.abort(cmd["id"])
                elif op == "step":
                    self.engine.step()
            except AnyaccelError:
                pass  # rank 0 raised the same error to its caller; the engines stay equal
