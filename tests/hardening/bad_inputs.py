"""Bad-input attacks on every public op, for ``test_ops_bad_inputs.py``; run as a script, the subprocess worker
that runs them on the triton-interpreter backend (so a segfault in a kernel fails a test instead of killing the
run).

Each attack builds a valid call of one op from hypothesis draws (tiny shapes), applies one named *mutation* (a
strided index tensor, an out-of-range value, NaN/Inf, a wrong dtype, shape or device) and checks the one rule of
the suite: the call either raises a project error (:class:`AnyaccelError`) naming an argument the mutation
allows, or returns a result equal to the float64 reference (NaN where the reference has NaN). A raw library
exception, a crash or a wrong value fails. Each mutation declares whether rejection is *required* (the input is
wrong: accepting it is a failure) and which argument names a rejection may carry.

Shape legend as in the core: T tokens, S sequences, Hq/Hkv heads, D head size, P block size, B cache blocks,
M/K/N GEMM rows/inputs/outputs, E experts, H hidden size.

Worker usage: ``python bad_inputs.py BACKEND EXAMPLES`` prints one JSON object (``tally`` and ``failures``) on
its last stdout line and exits 1 when any attack failed; before each case it writes the case's name to stderr.
"""
from __future__ import annotations

import json
import math
import sys
import traceback
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from anyaccel.core.attention import (Attention, AttentionMetadata, AttentionSpec, ReshapeAndCache,
                                     attention_reference, kv_cache_shape, reshape_and_cache_reference)
from anyaccel.core.errors import AnyaccelError, InvalidArgumentError
from anyaccel.core.fused import (GatedActivationSpec, GeluAndMul, LayerNorm, LayerNormSpec, RMSNorm, RMSNormSpec,
                                 Rotary, RotarySpec, SiluAndMul, gelu_and_mul_reference, layer_norm_reference,
                                 rms_norm_reference, rope_cos_sin_cache, rotary_reference, silu_and_mul_reference)
from anyaccel.core.gemm import Gemm, GemmSpec, GroupedGemm, GroupedGemmSpec, gemm_reference, grouped_gemm_reference

__all__ = ["Mutation", "ATTACKS", "run_attack", "mutations", "tally_lines"]

TOL = 1e-4          # float32 only: outputs of order one against the float64 reference
GARBAGE_INDEX = 1 << 20   # what a misread stride would pick up in a strided index view


@dataclass(frozen=True)
class Mutation:
    """One kind of bad input. ``must_reject``: accepting it is a failure. ``names``: the argument names a
    rejection may carry (empty with ``must_reject=False``: the call must succeed and be correct)."""

    name: str
    must_reject: bool = False
    names: Tuple[str, ...] = ()


class Failure(AssertionError):
    pass


# -- shared helpers ------------------------------------------------------------------------------------------------

def strided(t: torch.Tensor, fill: float = GARBAGE_INDEX) -> torch.Tensor:
    """The same values as a non-contiguous view (every last-dim step 2, the gaps filled with ``fill``)."""
    wide = torch.stack([t, torch.full_like(t, fill)], dim=-1)
    return wide[..., 0]


def col_major(t: torch.Tensor) -> torch.Tensor:
    """The same 2-d values, stored column-major (stride(-1) != 1 when there are >1 rows)."""
    return t.t().contiguous().t()


def really_strided(mut: Mutation, *tensors: torch.Tensor) -> Mutation:
    """``mut``, or the same mutation as a *valid* call when every tensor it made strided is in fact contiguous
    (a size-0 or size-1 dim makes any stride contiguous: then it must be accepted and correct)."""
    if all(t.is_contiguous() for t in tensors):
        return Mutation(mut.name)
    return mut


def _finite(data, shape, scale: float = 1.0) -> torch.Tensor:
    seed = data.draw(st.integers(0, 2 ** 31 - 1), label="seed")
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g) * scale


def call(tally: Dict[str, int], op: str, mut: Mutation, fn: Callable[[], Any],
         check: Optional[Callable[[Any], None]] = None) -> None:
    """Run one case under the suite's rule and count its outcome under ``op / mutation / outcome``."""
    try:
        result = fn()
    except AnyaccelError as e:
        arg = getattr(e, "argument", None)
        if not mut.names:
            raise Failure(f"{op} / {mut.name}: a valid call was rejected: {e}") from None
        if arg not in mut.names:
            raise Failure(f"{op} / {mut.name}: the error names {arg!r}, expected one of {mut.names}: {e}") from None
        outcome = f"rejected ({type(e).__name__} naming '{arg}')"
    except Exception as e:  # a raw library exception is a failure of the boundary
        raise Failure(f"{op} / {mut.name}: raw {type(e).__name__}: {str(e)[:300]}") from None
    else:
        if mut.must_reject:
            raise Failure(f"{op} / {mut.name}: the bad input was accepted (no error)")
        if check is not None:
            check(result)
        outcome = "correct (equals the float64 reference)"
    key = f"{op} | {mut.name} | {outcome}"
    tally[key] = tally.get(key, 0) + 1


def close(out: torch.Tensor, ref: torch.Tensor, what: str) -> None:
    if out.shape != ref.shape:
        raise Failure(f"{what}: shape {list(out.shape)} != reference {list(ref.shape)}")
    o, r = out.double(), ref.double()
    if not torch.equal(torch.isnan(o), torch.isnan(r)):
        raise Failure(f"{what}: NaN pattern differs from the reference ({int(torch.isnan(o).sum())} NaN vs "
                      f"{int(torch.isnan(r).sum())})")
    try:
        torch.testing.assert_close(o, r, rtol=TOL, atol=TOL, equal_nan=True)
    except AssertionError as e:
        raise Failure(f"{what}: silently wrong: {str(e)[:400]}") from None


_OPS: Dict[Tuple[str, str, Any], Any] = {}


def built(backend, cls, spec):
    key = (backend.name, cls.name, spec)
    op = _OPS.get(key)
    if op is None:
        op = _OPS[key] = cls.build(spec, backend)
    return op


# -- attention: AttentionMetadata.build, reshape_and_cache, attention -------------------------------------------

ATTENTION_MUTATIONS = [
    Mutation("valid"),
    Mutation("strided query_start_loc"),
    Mutation("strided seq_lens"),
    Mutation("strided block_table"),
    Mutation("column-major block_table"),
    Mutation("strided slot_mapping"),
    Mutation("int64 index tensors"),
    Mutation("strided q (heads of a wider tensor)"),
    Mutation("token-major q transposed storage"),
    Mutation("strided key/value (views of a fused kv)"),
    Mutation("NaN q row"),
    Mutation("NaN key written"),
    Mutation("NaN/Inf in unused cache slots"),
    Mutation("duplicate slot", True, ("slot_mapping",)),
    Mutation("slot past the cache", True, ("slot_mapping",)),
    Mutation("block id past the cache", True, ("block_table",)),
    Mutation("negative block id", True, ("block_table",)),
    Mutation("decreasing query_start_loc", True, ("query_start_loc",)),
    Mutation("seq_len < q_len", True, ("seq_lens",)),
    Mutation("seq_len 2**40", True, ("seq_lens", "block_table")),
    Mutation("float32 seq_lens", True, ("seq_lens",)),
    Mutation("int16 block_table", True, ("block_table",)),
    Mutation("query_start_loc one short", True, ("query_start_loc",)),
    Mutation("q float16 for a float32 spec", True, ("q",)),
    Mutation("q wrong head count", True, ("q",)),
    Mutation("k_cache on the meta device", True, ("k_cache",)),
    Mutation("strided k_cache", True, ("k_cache",)),
    Mutation("strided out", True, ("out",)),
    Mutation("meta not an AttentionMetadata", True, ("meta",)),
]


def _attention_case(backend, data, mut: Mutation, tally: Dict[str, int]) -> None:
    P = 16
    layouts = ["NHD", "HND"] if backend.name == "cpu" else [backend.kv_cache_layout]
    layout = data.draw(st.sampled_from(layouts), label="layout")
    hq, hkv = data.draw(st.sampled_from([(2, 1), (2, 2), (4, 2)]), label="heads")
    D = 16
    spec = AttentionSpec(num_heads=hq, num_kv_heads=hkv, head_size=D, block_size=P, kv_layout=layout)
    S = data.draw(st.integers(1, 3), label="S")
    first = 2 if mut.name == "duplicate slot" else 1   # the first sequence has new tokens (two to duplicate)
    q_lens = [data.draw(st.integers(0 if s else first, 5), label="q_len") for s in range(S)]
    seq_lens = [q + data.draw(st.integers(0, 2 * P), label="ctx") for q in q_lens]
    nb = max(1, max(-(-L // P) for L in seq_lens))
    B = S * nb + 1
    perm = data.draw(st.permutations(range(B)), label="blocks")
    bt = torch.tensor(perm[:S * nb], dtype=torch.int32).view(S, nb)
    starts = [0]
    for n in q_lens:
        starts.append(starts[-1] + n)
    T = starts[-1]
    slots = [int(bt[s, p // P]) * P + p % P for s in range(S) for p in range(seq_lens[s] - q_lens[s], seq_lens[s])]
    qsl = torch.tensor(starts, dtype=torch.int32)
    sl = torch.tensor(seq_lens, dtype=torch.int32)
    sm = torch.tensor(slots, dtype=torch.int64)
    clean = (qsl.clone(), sl.clone(), bt.clone(), sm.clone())
    shape = kv_cache_shape(spec, B)
    kc, vc = _finite(data, shape), _finite(data, shape)
    q = _finite(data, (T, hq, D))
    key, value = _finite(data, (T, hkv, D)), _finite(data, (T, hkv, D))
    m = mut.name
    out = None
    meta_arg: Any = None
    if m == "strided query_start_loc":
        qsl = strided(qsl)
    elif m == "strided seq_lens":
        sl = strided(sl)
    elif m == "strided block_table":
        bt = strided(bt)
    elif m == "column-major block_table":
        bt = col_major(torch.cat([bt, bt], 0))[:S] if S > 1 else col_major(torch.cat([bt, bt], 0))[:1]
    elif m == "strided slot_mapping":
        sm = strided(sm)
    elif m == "int64 index tensors":
        qsl, sl, bt = qsl.long(), sl.long(), bt.long()
    elif m == "strided q (heads of a wider tensor)":
        q = torch.cat([q, torch.full((T, 1, D), float("nan"))], 1)[:, :hq]
    elif m == "token-major q transposed storage":
        q = q.transpose(0, 1).contiguous().transpose(0, 1)
    elif m == "strided key/value (views of a fused kv)":
        kv = torch.cat([key, value], 1)
        key, value = kv[:, :hkv], kv[:, hkv:]
    elif m == "NaN q row":
        if T:
            q[data.draw(st.integers(0, T - 1), label="row"), data.draw(st.integers(0, hq - 1))] = float("nan")
    elif m == "NaN key written":
        if T:
            key[data.draw(st.integers(0, T - 1), label="row")] = float("nan")
    elif m == "NaN/Inf in unused cache slots":
        used = torch.zeros(B, P, dtype=torch.bool)
        for s in range(S):
            for p in range(seq_lens[s]):
                used[int(bt[s, p // P]), p % P] = True
        for c, v in ((kc, float("nan")), (vc, float("inf"))):
            (c if layout == "NHD" else c.transpose(1, 2))[~used] = v
    elif m == "duplicate slot":
        sm = sm.clone()
        i, j = data.draw(st.sampled_from([(a, b) for a in range(T) for b in range(T) if a < b]), label="pair")
        sm[j] = sm[i]
    elif m == "slot past the cache":
        sm = sm.clone()
        sm[data.draw(st.integers(0, T - 1), label="row")] = B * P + data.draw(st.integers(0, 10 ** 6))
    elif m == "block id past the cache":   # sequence 0 has at least one token, so at least one block
        bt = bt.clone()
        bt[0, data.draw(st.integers(0, -(-seq_lens[0] // P) - 1))] = B + data.draw(st.integers(0, 10 ** 6))
    elif m == "negative block id":
        bt = bt.clone()
        bt[0, 0] = -data.draw(st.integers(1, 10 ** 6))
    elif m == "decreasing query_start_loc":
        qsl = qsl.clone()
        if S > 1:
            qsl[1] = qsl[2] + 1
        else:
            qsl[0] = 1   # query_start_loc[0] must be 0
    elif m == "seq_len < q_len":
        s = data.draw(st.integers(0, S - 1), label="seq")
        if q_lens[s]:
            sl = sl.clone()
            sl[s] = q_lens[s] - 1
        else:
            sl = sl.clone()
            sl[s] = -1
    elif m == "seq_len 2**40":
        sl = sl.clone().long()
        sl[data.draw(st.integers(0, S - 1), label="seq")] = 2 ** 40
    elif m == "float32 seq_lens":
        sl = sl.float()
    elif m == "int16 block_table":
        bt = bt.to(torch.int16)
    elif m == "query_start_loc one short":
        qsl = qsl[:-1]
    elif m == "q float16 for a float32 spec":
        q = q.half()
    elif m == "q wrong head count":
        q = torch.cat([q, q[:, :1]], 1)
    elif m == "k_cache on the meta device":
        kc = torch.empty(shape, device="meta")
    elif m == "strided k_cache":
        kc = strided(kc, float("nan"))
        mut = really_strided(mut, kc)
    elif m == "strided out":
        out = strided(torch.empty(T, hq, D), float("nan"))
        mut = really_strided(mut, out)
    elif m == "meta not an AttentionMetadata":
        meta_arg = {"seq_lens": sl}

    write = built(backend, ReshapeAndCache, spec)
    attn = built(backend, Attention, spec)
    state: Dict[str, Any] = {}

    def run():
        meta = meta_arg if meta_arg is not None else AttentionMetadata.build(qsl, sl, bt, P, slot_mapping=sm)
        state["k0"], state["v0"] = kc.clone(), vc.clone()
        if isinstance(meta, AttentionMetadata):
            write(key, value, kc, vc, meta)
        return attn(q, kc, vc, meta, out)

    def check(result):
        ref_meta = AttentionMetadata.build(*clean[:3], P, slot_mapping=clean[3])
        rk, rv = reshape_and_cache_reference(key, value, state["k0"], state["v0"], clean[3], layout)
        close(kc, rk, f"reshape_and_cache / {m}: k_cache")
        close(vc, rv, f"reshape_and_cache / {m}: v_cache")
        close(result, attention_reference(q, rk, rv, ref_meta, spec), f"attention / {m}")

    call(tally, "attention (+ metadata, reshape_and_cache)", mut, run, check)


# -- gemm and grouped gemm -----------------------------------------------------------------------------------------

GEMM_MUTATIONS = [
    Mutation("valid"),
    Mutation("column-major x"),
    Mutation("column-major weight"),
    Mutation("row-strided x (a slice of a wider tensor)"),
    Mutation("3-d x"),
    Mutation("NaN/Inf in x"),
    Mutation("strided bias", True, ("bias",)),
    Mutation("bias of the wrong length", True, ("bias",)),
    Mutation("int32 bias", True, ("bias",)),
    Mutation("x float16 for a float32 spec", True, ("x",)),
    Mutation("weight with the wrong K", True, ("x", "weight")),
    Mutation("weight on the meta device", True, ("x", "weight")),
    Mutation("strided out", True, ("out",)),
    Mutation("bias given to a bias-free spec", True, ("bias",)),
]


def _gemm_case(backend, data, mut: Mutation, tally: Dict[str, int]) -> None:
    M, K, N = (data.draw(st.integers(lo, hi), label=n) for n, lo, hi in (("M", 0, 6), ("K", 1, 40), ("N", 1, 20)))
    m = mut.name
    has_bias = m != "bias given to a bias-free spec"
    spec = GemmSpec(dtype=torch.float32, has_bias=has_bias)
    x, w = _finite(data, (M, K)), _finite(data, (N, K))
    bias = _finite(data, (N,))
    out = None
    if m == "column-major x":
        x = col_major(x)
    elif m == "column-major weight":
        w = col_major(w)
    elif m == "row-strided x (a slice of a wider tensor)":
        x = torch.cat([x, torch.full((M, 3), float("nan"))], 1)[:, :K]
    elif m == "3-d x":
        x = x.view(1, M, K) if M else x.view(0, 1, K)
    elif m == "NaN/Inf in x":
        if M:
            x[data.draw(st.integers(0, M - 1)), data.draw(st.integers(0, K - 1))] = data.draw(
                st.sampled_from([float("nan"), float("inf"), -float("inf")]), label="value")
    elif m == "strided bias":
        bias = strided(bias, float("nan"))
        mut = really_strided(mut, bias)
    elif m == "bias of the wrong length":
        bias = torch.cat([bias, bias[:1]])
    elif m == "int32 bias":
        bias = bias.int()
    elif m == "x float16 for a float32 spec":
        x = x.half()
    elif m == "weight with the wrong K":
        w = torch.cat([w, w[:, :1]], 1)
    elif m == "weight on the meta device":
        w = torch.empty(w.shape, device="meta")
    elif m == "strided out":
        out = strided(torch.empty(M, N), float("nan"))
        mut = really_strided(mut, out)
    op = built(backend, Gemm, spec)

    def check(y):
        close(y, gemm_reference(x, w, bias if has_bias else None), f"gemm / {m}")

    call(tally, "gemm", mut, lambda: op(x, w, bias, out), check)


GROUPED_MUTATIONS = [
    Mutation("valid"),
    Mutation("strided ids"),
    Mutation("strided segment sizes"),
    Mutation("column-major x"),
    Mutation("expert id past E", True, ("groups",)),
    Mutation("negative expert id", True, ("groups",)),
    Mutation("segment sizes not summing to M", True, ("groups",)),
    Mutation("negative segment size", True, ("groups",)),
    Mutation("float32 ids", True, ("groups",)),
    Mutation("ids of the wrong length", True, ("groups",)),
]


def _grouped_case(backend, data, mut: Mutation, tally: Dict[str, int]) -> None:
    m = mut.name
    if "segment" in m:
        mode = "segments"
    elif "ids" in m or "expert id" in m:
        mode = "ids"
    else:
        mode = data.draw(st.sampled_from(["ids", "segments"]), label="mode")
    E = data.draw(st.integers(1, 4), label="E")
    M, K, N = data.draw(st.integers(1, 8), label="M"), data.draw(st.integers(1, 24)), data.draw(st.integers(1, 12))
    spec = GroupedGemmSpec(dtype=torch.float32, num_experts=E, mode=mode)
    x, w = _finite(data, (M, K)), _finite(data, (E, N, K))
    ids = torch.tensor(sorted(data.draw(st.lists(st.integers(0, E - 1), min_size=M, max_size=M), label="ids")))
    groups = ids if mode == "ids" else torch.bincount(ids, minlength=E)
    if m == "strided ids" or m == "strided segment sizes":
        groups = strided(groups)
    elif m == "column-major x":
        x = col_major(x)
    elif m == "expert id past E":
        groups = groups.clone()
        groups[data.draw(st.integers(0, M - 1))] = E + data.draw(st.integers(0, 10 ** 6))
    elif m == "negative expert id":
        groups = groups.clone()
        groups[data.draw(st.integers(0, M - 1))] = -data.draw(st.integers(1, 10 ** 6))
    elif m == "segment sizes not summing to M":
        groups = groups.clone()
        groups[data.draw(st.integers(0, E - 1))] += data.draw(st.sampled_from([1, -1, 10 ** 6]))
    elif m == "negative segment size":
        groups = groups.clone()
        groups[0] -= M + 1
        if E > 1:
            groups[1] += M + 1
    elif m == "float32 ids":
        groups = groups.float()
    elif m == "ids of the wrong length":
        groups = torch.cat([groups, groups[:1]])
    op = built(backend, GroupedGemm, spec)

    def check(y):
        close(y, grouped_gemm_reference(x, w, groups.contiguous(), mode), f"grouped_gemm / {m}")

    call(tally, "grouped_gemm", mut, lambda: op(x, w, groups), check)


# -- norms -----------------------------------------------------------------------------------------------------------

NORM_MUTATIONS = [
    Mutation("valid"),
    Mutation("row-strided x"),
    Mutation("column-major x"),
    Mutation("3-d x"),
    Mutation("strided residual"),
    Mutation("NaN/Inf in x"),
    Mutation("strided weight", True, ("weight",)),
    Mutation("strided bias", True, ("bias",)),
    Mutation("weight float16 for a float32 spec", True, ("weight",)),
    Mutation("weight of the wrong length", True, ("weight",)),
    Mutation("x of the wrong width", True, ("x",)),
    Mutation("strided out", True, ("out",)),
]


def _norm_case(backend, data, mut: Mutation, tally: Dict[str, int]) -> None:
    m = mut.name
    kind = data.draw(st.sampled_from(["rms_norm", "rms_norm+residual", "layer_norm"]), label="kind")
    if m == "strided residual":
        kind = "rms_norm+residual"
    if m == "strided bias":
        kind = "layer_norm"
    Nr, H = data.draw(st.integers(0, 6), label="rows"), data.draw(st.integers(1, 48), label="H")
    x, wt, b, res = _finite(data, (Nr, H)), _finite(data, (H,)), _finite(data, (H,)), _finite(data, (Nr, H))
    out = None
    if m == "row-strided x":
        x = torch.cat([x, torch.full((Nr, 2), float("nan"))], 1)[:, :H]
    elif m == "column-major x":
        x = col_major(x)
    elif m == "3-d x":
        x = x.view(1, Nr, H)
        res = res.view(1, Nr, H)
    elif m == "strided residual":
        res = strided(res, float("nan"))
    elif m == "NaN/Inf in x":
        if Nr:
            x[data.draw(st.integers(0, Nr - 1)), data.draw(st.integers(0, H - 1))] = data.draw(
                st.sampled_from([float("nan"), float("inf")]), label="value")
    elif m == "strided weight":
        wt = strided(wt, float("nan"))
        mut = really_strided(mut, wt)
    elif m == "strided bias":
        b = strided(b, float("nan"))
        mut = really_strided(mut, b)
    elif m == "weight float16 for a float32 spec":
        wt = wt.half()
    elif m == "weight of the wrong length":
        wt = torch.cat([wt, wt[:1]])
    elif m == "x of the wrong width":
        x = torch.cat([x, x[:, :1]], 1)
    elif m == "strided out":
        out = strided(torch.empty(x.shape), float("nan"))
        mut = really_strided(mut, out)
    if kind == "layer_norm":
        op = built(backend, LayerNorm, LayerNormSpec(hidden_size=H, dtype=torch.float32, eps=1e-5))
        run = lambda: op(x, wt, b, out)  # noqa: E731
        ref = lambda: layer_norm_reference(x, wt, b, 1e-5)  # noqa: E731
    elif kind == "rms_norm":
        op = built(backend, RMSNorm, RMSNormSpec(hidden_size=H, dtype=torch.float32, eps=1e-6))
        run = lambda: op(x, wt, out=out)  # noqa: E731
        ref = lambda: rms_norm_reference(x, wt, 1e-6)  # noqa: E731
    else:
        op = built(backend, RMSNorm, RMSNormSpec(hidden_size=H, dtype=torch.float32, eps=1e-6, fused_residual=True))
        x0, r0 = x.clone(), res.clone()
        run = lambda: op(x, wt, res, out=out)  # noqa: E731
        ref = lambda: rms_norm_reference(x0, wt, 1e-6, r0)  # noqa: E731

    def check(y):
        r = ref()
        if isinstance(r, tuple):
            close(y[0], r[0], f"{kind} / {m}: out")
            close(y[1], r[1], f"{kind} / {m}: residual_out")
        else:
            close(y, r, f"{kind} / {m}")

    call(tally, "rms_norm / layer_norm", mut, run, check)


# -- rotary ----------------------------------------------------------------------------------------------------------

ROTARY_MUTATIONS = [
    Mutation("valid"),
    Mutation("strided positions"),
    Mutation("int32 positions"),
    Mutation("q and k views of a fused qkv"),
    Mutation("NaN in q"),
    Mutation("position == max_position", True, ("positions",)),
    Mutation("negative position", True, ("positions",)),
    Mutation("position 10**6", True, ("positions",)),
    Mutation("positions rewritten in place after a first call", True, ("positions",)),
    Mutation("column-major cos_sin_cache", True, ("cos_sin_cache",)),
    Mutation("float32 positions", True, ("positions",)),
    Mutation("positions of the wrong length", True, ("positions",)),
    Mutation("float64 cos_sin_cache", True, ("cos_sin_cache",)),
]


def _rotary_case(backend, data, mut: Mutation, tally: Dict[str, int]) -> None:
    m = mut.name
    D = data.draw(st.sampled_from([8, 16]), label="D")
    R = data.draw(st.sampled_from([r for r in (4, 8, 16) if r <= D]), label="R")
    hq, hkv = data.draw(st.sampled_from([(2, 1), (2, 2)]), label="heads")
    Pmax = data.draw(st.integers(1, 40), label="max_position")
    style = data.draw(st.sampled_from(["neox", "gptj"]), label="style")
    T = data.draw(st.integers(1, 6), label="T")
    spec = RotarySpec(head_size=D, rotary_dim=R, num_heads=hq, num_kv_heads=hkv, dtype=torch.float32, style=style,
                      max_position=Pmax)
    cache = rope_cos_sin_cache(R, Pmax, 10000.0)
    pos = torch.tensor(data.draw(st.lists(st.integers(0, Pmax - 1), min_size=T, max_size=T), label="positions"))
    q, k = _finite(data, (T, hq, D)), _finite(data, (T, hkv, D))
    op = built(backend, Rotary, spec)
    if m == "strided positions":
        pos = strided(pos)
    elif m == "int32 positions":
        pos = pos.int()
    elif m == "q and k views of a fused qkv":
        qkv = torch.cat([q, k, k], 1)
        q, k = qkv[:, :hq], qkv[:, hq:hq + hkv]
    elif m == "NaN in q":
        q[data.draw(st.integers(0, T - 1)), 0, data.draw(st.integers(0, D - 1))] = float("nan")
    elif m == "position == max_position":
        pos[data.draw(st.integers(0, T - 1))] = Pmax
    elif m == "negative position":
        pos[data.draw(st.integers(0, T - 1))] = -data.draw(st.integers(1, 10 ** 6))
    elif m == "position 10**6":
        pos[data.draw(st.integers(0, T - 1))] = 10 ** 6
    elif m == "positions rewritten in place after a first call":
        op(pos, q, k, cache)          # a valid first call: its range is memoized on this tensor
        pos[data.draw(st.integers(0, T - 1))] = Pmax + data.draw(st.integers(0, 10 ** 6))
    elif m == "column-major cos_sin_cache":
        cache = col_major(cache) if Pmax > 1 else strided(cache, float("nan"))
        mut = really_strided(mut, cache)
    elif m == "float32 positions":
        pos = pos.float()
    elif m == "positions of the wrong length":
        pos = torch.cat([pos, pos[:1]])
    elif m == "float64 cos_sin_cache":
        cache = cache.double()
    q0, k0 = q.clone(), k.clone()

    def check(result):
        rq, rk = rotary_reference(pos.contiguous(), q0, k0, cache, style)
        close(result[0], rq, f"rotary / {m}: q")
        close(result[1], rk, f"rotary / {m}: k")

    call(tally, "rotary_embedding", mut, lambda: op(pos, q, k, cache), check)


# -- gated activations -----------------------------------------------------------------------------------------------

ACTIVATION_MUTATIONS = [
    Mutation("valid"),
    Mutation("row-strided x"),
    Mutation("column-major x"),
    Mutation("3-d x"),
    Mutation("NaN/Inf in x"),
    Mutation("odd width", True, ("x",)),
    Mutation("x float16 for a float32 spec", True, ("x",)),
    Mutation("strided out", True, ("out",)),
    Mutation("out of the wrong width", True, ("out",)),
]


def _activation_case(backend, data, mut: Mutation, tally: Dict[str, int]) -> None:
    m = mut.name
    kind = data.draw(st.sampled_from(["silu", "gelu", "gelu_tanh"]), label="kind")
    Nr, d = data.draw(st.integers(0, 6), label="rows"), data.draw(st.integers(1, 24), label="d")
    x = _finite(data, (Nr, 2 * d), 3.0)
    out = None
    if m == "row-strided x":
        x = torch.cat([x, torch.full((Nr, 2), float("nan"))], 1)[:, :2 * d]
    elif m == "column-major x":
        x = col_major(x)
    elif m == "3-d x":
        x = x.view(Nr, 1, 2 * d)
    elif m == "NaN/Inf in x":
        if Nr:
            x[data.draw(st.integers(0, Nr - 1)), data.draw(st.integers(0, 2 * d - 1))] = data.draw(
                st.sampled_from([float("nan"), float("inf"), -float("inf")]), label="value")
    elif m == "odd width":
        x = x[:, :2 * d - 1]
    elif m == "x float16 for a float32 spec":
        x = x.half()
    elif m == "strided out":
        out = strided(torch.empty(Nr, d), float("nan"))
        mut = really_strided(mut, out)
    elif m == "out of the wrong width":
        out = torch.empty(Nr, d + 1)
    if kind == "silu":
        op = built(backend, SiluAndMul, GatedActivationSpec(dtype=torch.float32))
        ref = silu_and_mul_reference
    else:
        approx = "tanh" if kind == "gelu_tanh" else "none"
        op = built(backend, GeluAndMul, GatedActivationSpec(dtype=torch.float32, approximate=approx))
        ref = lambda t: gelu_and_mul_reference(t, approx)  # noqa: E731

    def check(y):
        close(y, ref(x), f"{kind}_and_mul / {m}")

    call(tally, "silu_and_mul / gelu_and_mul", mut, lambda: op(x, out), check)


#: attack name -> (case function, its mutations)
ATTACKS: Dict[str, Tuple[Callable, List[Mutation]]] = {
    "attention": (_attention_case, ATTENTION_MUTATIONS),
    "gemm": (_gemm_case, GEMM_MUTATIONS),
    "grouped_gemm": (_grouped_case, GROUPED_MUTATIONS),
    "norm": (_norm_case, NORM_MUTATIONS),
    "rotary": (_rotary_case, ROTARY_MUTATIONS),
    "activation": (_activation_case, ACTIVATION_MUTATIONS),
}


def mutations() -> List[Tuple[str, Mutation]]:
    """Every (attack, mutation) pair, in a stable order."""
    return [(a, mut) for a, (_, muts) in ATTACKS.items() for mut in muts]


def run_attack(backend, attack: str, mut: Mutation, examples: int, tally: Dict[str, int],
               progress: Optional[Callable[[str], None]] = None) -> None:
    """Try ``examples`` hypothesis-drawn cases of one mutation; a broken rule raises (hypothesis shrinks it)."""
    case = ATTACKS[attack][0]

    @settings(max_examples=examples, deadline=None, derandomize=True, database=None, print_blob=False,
              suppress_health_check=list(HealthCheck))
    @given(st.data())
    def prop(data):
        if progress is not None:
            progress(f"{attack} / {mut.name}")
        case(backend, data, mut, tally)

    prop()


def tally_lines(tally: Dict[str, int]) -> List[str]:
    return [f"{n:5d}  {k}" for k, n in sorted(tally.items())]


def _worker(backend_name: str, examples: int) -> int:
    from anyaccel.plugins import discover

    backend = discover().get(backend_name)
    if not backend.available:
        print(json.dumps({"unavailable": backend.reason}))
        return 3
    tally: Dict[str, int] = {}
    failures: List[str] = []

    def progress(what: str) -> None:
        sys.stderr.write(f"case: {what}\n")
        sys.stderr.flush()

    for attack, mut in mutations():
        try:
            run_attack(backend, attack, mut, examples, tally, progress)
        except BaseException as e:  # noqa: BLE001 - every failure is reported, then the next attack runs
            if isinstance(e, KeyboardInterrupt):
                raise
            failures.append(f"{attack} / {mut.name}: {type(e).__name__}: {str(e)[:600]}")
    print(json.dumps({"tally": tally, "failures": failures}))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(_worker(sys.argv[1], int(sys.argv[2])))
