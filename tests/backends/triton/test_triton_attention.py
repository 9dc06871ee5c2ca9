"""The shared unified paged-attention kernel and the KV-cache write, run by the interpreter.

The launcher is called directly (one-pass and split-KV paths forced) against a float64 paged-attention oracle
written here in plain torch; ``test_triton_attention_op.py`` goes through the core op.
"""
from __future__ import annotations

import math

import pytest
import torch

from anyaccel.backends.triton.attention import build_reshape_and_cache, launch_attention

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _oracle(q, k_cache, v_cache, qsl, seq_lens, block_table, P, layout, causal, scale, window, cap):
    """float64 paged attention: gather each sequence's keys through its block table, mask, softmax."""
    T, Hq, D = q.shape
    k_all = k_cache if layout == "NHD" else k_cache.transpose(1, 2)     # -> [B, P, Hkv, D]
    v_all = v_cache if layout == "NHD" else v_cache.transpose(1, 2)
    g = Hq // k_all.shape[2]
    out = torch.zeros(T, Hq, D, dtype=torch.float64)
    for s in range(len(seq_lens)):
        a, b, L = int(qsl[s]), int(qsl[s + 1]), int(seq_lens[s])
        pos = torch.arange(L)
        blocks = block_table[s].long()[pos // P]
        k = k_all[blocks, pos % P].double().repeat_interleave(g, 1)           # [L, Hq, D]
        v = v_all[blocks, pos % P].double().repeat_interleave(g, 1)
        sc = torch.einsum("thd,lhd->htl", q[a:b].double(), k) * scale
        if cap:
            sc = cap * torch.tanh(sc / cap)
        qp = (L - (b - a) + torch.arange(b - a))[:, None]
        keep = torch.ones(b - a, L, dtype=torch.bool)
        if causal:
            keep &= pos[None] <= qp
        if window:
            keep &= (qp - pos[None]) < window
        out[a:b] = torch.einsum("htl,lhd->thd", sc.masked_fill(~keep, float("-inf")).softmax(-1), v)
    return out


def _batch(qlens, ctxs, hq, hkv, D, P, dtype, layout="NHD", seed=0):
    g = torch.Generator().manual_seed(seed)
    nb = sum(math.ceil(c / P) for c in ctxs) + 2
    shape = (nb, P, hkv, D) if layout == "NHD" else (nb, hkv, P, D)
    k_cache = torch.randn(*shape, generator=g).to(dtype)
    v_cache = torch.randn(*shape, generator=g).to(dtype)
    perm = torch.randperm(nb, generator=g)
    block_table = torch.full((len(ctxs), max(math.ceil(c / P) for c in ctxs) + 1), -1, dtype=torch.int32)
    i = 0
    for s, c in enumerate(ctxs):
        n = math.ceil(c / P)
        block_table[s, :n] = perm[i:i + n]
        i += n
    qsl = torch.tensor([0, *torch.tensor(qlens).cumsum(0).tolist()], dtype=torch.int32)
    q = torch.randn(int(qsl[-1]), hq, D, generator=g).to(dtype)
    return q, k_cache, v_cache, qsl, torch.tensor(ctxs, dtype=torch.int32), block_table


CASES = {
    # name: (q lens, contexts, Hq, Hkv, D, causal, window, soft cap, splits, layout)
    "mixed prefill+chunk+decode GQA": ([5, 1, 17], [20, 40, 17], 4, 2, 64, True, None, None, 1, "NHD"),
    "decode split-KV": ([1, 1, 1], [70, 33, 130], 8, 2, 128, True, None, None, 3, "NHD"),
    "bidirectional odd D": ([9, 30], [9, 30], 4, 4, 80, False, None, None, 1, "NHD"),
    "window+softcap": ([12, 3], [40, 50], 6, 2, 64, True, 16, 30.0, 1, "NHD"),
    "window+softcap split": ([12, 3], [40, 50], 6, 2, 64, True, 16, 30.0, 4, "NHD"),
    "MQA HND": ([3, 1], [35, 18], 4, 1, 32, True, None, None, 1, "HND"),
}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", list(CASES))
def test_unified_attention(interp_tuning, close, dtype, case):
    qlens, ctxs, hq, hkv, D, causal, window, cap, splits, layout = CASES[case]
    P = 16
    q, kc, vc, qsl, sl, bt = _batch(qlens, ctxs, hq, hkv, D, P, dtype, layout)
    out = torch.full_like(q, float("nan"))
    scale = 1 / math.sqrt(D)
    launch_attention(q, kc, vc, qsl, sl, bt, out, num_kv_heads=hkv, block_size=P, layout=layout, causal=causal,
                     scale=scale, sliding_window=window, soft_cap=cap, max_query_len=max(qlens),
                     max_seq_len=max(ctxs), tuning=interp_tuning, interpret=True, num_splits=splits)
    close(out, _oracle(q, kc, vc, qsl, sl, bt, P, layout, causal, scale, window, cap), dtype)


def test_split_kv_is_chosen_for_long_context_decode(interp_tuning, close):
    """The automatic choice: a long-context decode with few programs takes the split path, and agrees."""
    from anyaccel.backends.triton import attention as A

    calls = []
    real = A.compile_kernel

    def spy(fn, interpret):
        calls.append(fn.__name__)
        return real(fn, interpret)

    q, kc, vc, qsl, sl, bt = _batch([1, 1], [600, 520], 4, 2, 64, 16, torch.float32)
    out = torch.full_like(q, float("nan"))
    A.compile_kernel = spy
    try:
        launch_attention(q, kc, vc, qsl, sl, bt, out, num_kv_heads=2, block_size=16, layout="NHD", causal=True,
                         scale=0.125, sliding_window=None, soft_cap=None, max_query_len=1, max_seq_len=600,
                         tuning=interp_tuning, interpret=True)
    finally:
        A.compile_kernel = real
    assert "attention_merge_kernel" in calls
    close(out, _oracle(q, kc, vc, qsl, sl, bt, 16, "NHD", True, 0.125, None, None), torch.float32)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", ["NHD", "HND"])
def test_reshape_and_cache(interp_tuning, dtype, layout):
    from types import SimpleNamespace

    T, hkv, D, P, nb = 21, 2, 48, 16, 4
    g = torch.Generator().manual_seed(1)
    key = torch.randn(T, hkv, D, generator=g).to(dtype)
    value = torch.randn(T, hkv, D, generator=g).to(dtype)
    shape = (nb, P, hkv, D) if layout == "NHD" else (nb, hkv, P, D)
    k_cache = torch.full(shape, float("nan"), dtype=dtype)
    v_cache = torch.full(shape, float("nan"), dtype=dtype)
    slots = torch.randperm(nb * P, generator=g)[:T].to(torch.int64)
    slots[3] = -1                                                  # padding: skipped
    spec = SimpleNamespace(block_size=P, kv_layout=layout)
    build_reshape_and_cache(spec, interp_tuning, True)(key, value, k_cache, v_cache, slots)
    kn = k_cache if layout == "NHD" else k_cache.transpose(1, 2)
    vn = v_cache if layout == "NHD" else v_cache.transpose(1, 2)
    for t in range(T):
        s = int(slots[t])
        if s < 0:
            continue
        assert torch.equal(kn[s // P, s % P], key[t]) and torch.equal(vn[s // P, s % P], value[t])
    written = int((slots >= 0).sum()) * hkv * D
    assert int((~torch.isnan(k_cache.float())).sum()) == written  # nothing else touched
