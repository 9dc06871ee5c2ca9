"""The cpu attention and KV-write kernels through the core ops, every dtype and both layouts, against the float64
reference (the conformance suite's fixed cases plus kernel-specific paths)."""
from __future__ import annotations

import pytest
import torch

from anyaccel.backends.cpu.attention import KERNELS
from anyaccel.conformance.ops.attention import fixed_cases, make_batch, make_case, reference_with_allowance
from anyaccel.conformance.tolerances import compare, tolerance
from anyaccel.core.attention import Attention, AttentionSpec, ReshapeAndCache, attention_reference
from anyaccel.plugins import discover

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@pytest.fixture(scope="module")
def cpu():
    return discover().get("cpu")


def test_cpu_registers_both_ops(cpu):
    names = {k.name for k in cpu.kernels}
    assert {"cpu.attention.sdpa_paged", "cpu.reshape_and_cache.index_copy"} <= names
    spec = AttentionSpec(8, 2, 64, torch.bfloat16, block_size=cpu.block_sizes[0], kv_layout=cpu.kv_cache_layout,
                         sliding_window=8, soft_cap=3.0, scale=0.1)
    op = Attention.build(spec, cpu, strict=True)
    assert op.selection.chosen == "cpu.attention.sdpa_paged" and not op.selection.fallback
    assert ReshapeAndCache.build(spec, cpu, strict=True).selection.chosen == "cpu.reshape_and_cache.index_copy"


def _run(backend, case, seed=0):
    inp = case.make(torch.device("cpu"), seed)
    op = case.op.build(case.spec, backend, strict=True)
    outs = case.call(op, inp)
    atol, rtol = tolerance(case.tolerance_class, case.dtype, case.reduction)
    c = compare(outs, case.reference(inp), atol, rtol)
    assert c.passed, f"{case.name}: {c.reason}"
    return c


@pytest.mark.parametrize("layout", ["NHD", "HND"])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[1])
def test_fixed_cases(make_backend, layout, dtype):
    be = make_backend(KERNELS, layout=layout, block_sizes=(16, 64))
    for case in fixed_cases(be, dtype):
        _run(be, case)


@pytest.mark.parametrize("layout", ["NHD", "HND"])
@pytest.mark.parametrize("P", [1, 5, 64])
def test_block_sizes(make_backend, layout, P):
    be = make_backend(KERNELS, layout=layout, block_sizes=(P,))
    spec = AttentionSpec(4, 2, 32, torch.float32, block_size=P, kv_layout=layout, sliding_window=40)
    _run(be, make_case(spec, [(1, 70), (30, 100), (17, 17), (1, 1)]))


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[1])
@pytest.mark.parametrize("kw", [dict(), dict(soft_cap=4.0), dict(causal=False), dict(sliding_window=9)],
                         ids=["causal", "soft_cap", "bidirectional", "window"])
def test_odd_head_sizes_and_gqa(make_backend, dtype, kw):
    be = make_backend(KERNELS, block_sizes=(16,))
    for d, hq, hkv in ((96, 8, 2), (72, 3, 1), (80, 4, 4)):
        spec = AttentionSpec(hq, hkv, d, dtype, block_size=16, **kw)
        _run(be, make_case(spec, [(1, 50), (20, 45), (12, 12)]))


def test_cache_dtype_differs_from_query_dtype(make_backend):
    be = make_backend(KERNELS, block_sizes=(16,))
    spec = AttentionSpec(4, 2, 32, torch.bfloat16, block_size=16, kv_cache_dtype=torch.float32)
    _run(be, make_case(spec, [(1, 40), (9, 30)]))


def test_metadata_shared_by_layers(make_backend):
    """The kernel memoizes per-batch plans in meta.scratch: a second layer (other heads, other layout) on the same
    metadata must not reuse the first one's plan wrongly."""
    be_n = make_backend(KERNELS, layout="NHD")
    be_h = make_backend(KERNELS, layout="HND")
    a = AttentionSpec(4, 2, 16, torch.float32, block_size=16)
    b = AttentionSpec(6, 3, 16, torch.float32, block_size=16, kv_layout="HND", sliding_window=5)
    inp_a = make_batch(a, [(4, 20), (1, 9)], torch.device("cpu"), seed=1)
    inp_b = make_batch(b, [(4, 20), (1, 9)], torch.device("cpu"), seed=1)
    meta = inp_a["meta"]  # both batches have the same layout of sequences over blocks
    assert torch.equal(meta.block_table, inp_b["meta"].block_table)
    op_a, op_b = Attention.build(a, be_n, strict=True), Attention.build(b, be_h, strict=True)
    for _ in range(2):
        out_a = op_a(inp_a["q"], inp_a["k_cache"], inp_a["v_cache"], meta)
        out_b = op_b(inp_b["q"], inp_b["k_cache"], inp_b["v_cache"], meta)
        torch.testing.assert_close(out_a.double(), attention_reference(inp_a["q"], inp_a["k_cache"],
                                                                       inp_a["v_cache"], meta, a), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(out_b.double(), attention_reference(inp_b["q"], inp_b["k_cache"],
                                                                       inp_b["v_cache"], meta, b), rtol=1e-5, atol=1e-5)
    assert len(meta.scratch) == 2


def test_empty_sequences_in_batch(make_backend):
    """A sequence with no new tokens this step contributes nothing and breaks nothing."""
    be = make_backend(KERNELS)
    spec = AttentionSpec(4, 4, 16, torch.float32, block_size=16)
    case = make_case(spec, [(3, 10), (0, 7), (1, 5)])
    _run(be, case)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def test_long_prefill_matches_sdpa(make_backend, dtype):
    """A 1024-token prefill equals torch SDPA on the dense tensors (the benchmark's baseline)."""
    be = make_backend(KERNELS, block_sizes=(64,))
    spec = AttentionSpec(4, 4, 64, dtype, block_size=64)
    inp = make_batch(spec, [(1024, 1024)], torch.device("cpu"), seed=0)
    out = Attention.build(spec, be, strict=True)(inp["q"], inp["k_cache"], inp["v_cache"], inp["meta"])
    q = inp["q"].transpose(0, 1).unsqueeze(0)
    k = inp["keys"][0].transpose(0, 1).unsqueeze(0)
    v = inp["values"][0].transpose(0, 1).unsqueeze(0)
    want = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)[0].transpose(0, 1)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(out, want, rtol=tol, atol=tol)


@pytest.mark.parametrize("layout", ["NHD", "HND"])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[1])
@pytest.mark.parametrize("P,window", [(16, None), (5, 300), (64, 257)])
def test_long_decode_is_chunked_and_exact(make_backend, monkeypatch, layout, dtype, P, window):
    """Decode over a long context runs block-column chunk by chunk for all sequences at once (one softmax over every
    chunk's scores); a window starting mid-block, sequences of different lengths (some inactive in later chunks) and
    a block size that does not divide the chunk must not shift a single position."""
    import anyaccel.backends.cpu.attention as cpu_attention

    monkeypatch.setattr(cpu_attention, "_CHUNK_TOKENS", 128)
    be = make_backend(KERNELS, layout=layout, block_sizes=(P,))
    spec = AttentionSpec(8, 2, 32, dtype, block_size=P, kv_layout=layout, sliding_window=window)
    case = make_case(spec, [(1, 700), (1, 301), (1, 129), (3, 40)])
    c = _run(be, case)
    assert c.max_abs_err < c.tolerance
    inp = case.make(torch.device("cpu"), 0)
    Attention.build(spec, be, strict=True)(inp["q"], inp["k_cache"], inp["v_cache"], inp["meta"])
    plans = next(iter(inp["meta"].scratch.values()))
    assert plans[0].chunks is not None and len(plans[0].chunks) > 1
    assert cpu_attention._SDPA_LSE is not None


def _decode_paths(spec, meta):
    from anyaccel.backends.cpu.attention import _plans

    plans = _plans(meta, spec)
    return plans.tiles is not None, plans.decode is not None


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[1])
@pytest.mark.parametrize("kw", [dict(), dict(soft_cap=5.0), dict(sliding_window=37)], ids=["plain", "softcap", "window"])
@pytest.mark.parametrize("layout_extra", [("HND", 2, True), ("HND", 60, False), ("NHD", 2, False)],
                         ids=["HND-dense-tiles", "HND-sparse-gather", "NHD-gather"])
def test_decode_in_cache_order_and_by_gather_agree_with_reference(make_backend, dtype, kw, layout_extra):
    layout, extra, tiles = layout_extra
    be = make_backend(KERNELS, layout=layout, block_sizes=(8,))
    spec = AttentionSpec(8, 2, 24, dtype, block_size=8, kv_layout=layout, **kw)
    seqs = [(1, 70), (1, 9), (3, 20), (1, 1), (1, 33)]  # decode sequences around one chunked prefill
    b = make_batch(spec, seqs, torch.device("cpu"), seed=3, extra_blocks=extra)
    assert _decode_paths(spec, b["meta"]) == (tiles, not tiles)
    op = Attention.build(spec, be, strict=True)
    out = torch.full_like(b["q"], float("nan"))
    op(b["q"], b["k_cache"], b["v_cache"], b["meta"], out=out)
    ref = reference_with_allowance(b, spec)  # the float64 oracle with the error model's allowance
    atol, rtol = tolerance("attention", dtype, 70)
    c = compare((out,), (ref,), atol, rtol)
    assert c.passed, c.reason


def test_decode_with_shared_blocks_takes_the_gather_path(make_backend):
    be = make_backend(KERNELS, layout="HND", block_sizes=(8,))
    spec = AttentionSpec(4, 2, 16, torch.float32, block_size=8, kv_layout="HND")
    b = make_batch(spec, [(1, 16), (1, 16)], torch.device("cpu"), seed=1, extra_blocks=0)
    from anyaccel.core.attention import AttentionMetadata

    table = b["meta"].block_table.clone()
    table[1, 0] = table[0, 0]  # the second sequence shares its first block with the first (a shared prefix)
    meta = AttentionMetadata.build(b["meta"].query_start_loc, b["meta"].seq_lens, table, 8)
    assert _decode_paths(spec, meta) == (False, True)
    out = Attention.build(spec, be, strict=True)(b["q"], b["k_cache"], b["v_cache"], meta)
    ref = attention_reference(b["q"], b["k_cache"], b["v_cache"], meta, spec)
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)


# -- NaN, unused slots and strided q (issue 9, item 6) ---------------------------------------------------------------

def _nan_batch(layout, q_lens, seq_lens, seed=0):
    from anyaccel.core.attention import AttentionMetadata, kv_cache_shape

    spec = AttentionSpec(num_heads=4, num_kv_heads=2, head_size=16, block_size=16, kv_layout=layout)
    g = torch.Generator().manual_seed(seed)
    S, nb = len(seq_lens), 3
    table = torch.randperm(S * nb + 1, generator=g)[:S * nb].view(S, nb).int()
    starts = torch.tensor([0] + torch.tensor(q_lens).cumsum(0).tolist(), dtype=torch.int32)
    meta = AttentionMetadata.build(starts, torch.tensor(seq_lens, dtype=torch.int32), table, 16)
    shape = kv_cache_shape(spec, S * nb + 1)
    kc, vc = torch.randn(shape, generator=g), torch.randn(shape, generator=g)
    q = torch.randn(sum(q_lens), 4, 16, generator=g)
    return spec, meta, q, kc, vc


_BATCHES = [([4], [4]), ([5, 1], [20, 33]), ([1, 1], [20, 33])]  # causal prefill, chunked + decode, decode


@pytest.mark.parametrize("layout", ["NHD", "HND"])
@pytest.mark.parametrize("q_lens,seq_lens", _BATCHES)
def test_nan_query_row_propagates_like_the_reference(cpu, layout, q_lens, seq_lens):
    spec, meta, q, kc, vc = _nan_batch(layout, q_lens, seq_lens)
    q[0, 1, 3] = float("nan")
    out = Attention.build(spec, cpu)(q, kc, vc, meta)
    ref = attention_reference(q, kc, vc, meta, spec)
    assert torch.equal(torch.isnan(out), torch.isnan(ref)) and bool(torch.isnan(out[0, 1]).all())
    torch.testing.assert_close(out.double(), ref, rtol=1e-4, atol=1e-4, equal_nan=True)


@pytest.mark.parametrize("layout", ["NHD", "HND"])
def test_nan_key_poisons_only_the_queries_that_see_it(cpu, layout):
    spec, meta, q, kc, vc = _nan_batch(layout, [2], [2])
    blk = int(meta.block_table[0, 0])
    (kc[blk, 1] if layout == "NHD" else kc[blk, :, 1]).fill_(float("nan"))  # position 1: query 0 does not see it
    out = Attention.build(spec, cpu)(q, kc, vc, meta)
    ref = attention_reference(q, kc, vc, meta, spec)
    assert not bool(torch.isnan(out[0]).any()) and bool(torch.isnan(out[1]).all())
    torch.testing.assert_close(out.double(), ref, rtol=1e-4, atol=1e-4, equal_nan=True)


@pytest.mark.parametrize("layout", ["NHD", "HND"])
@pytest.mark.parametrize("q_lens,seq_lens", _BATCHES)
def test_nan_and_inf_in_unused_cache_slots_do_not_leak(cpu, layout, q_lens, seq_lens):
    spec, meta, q, kc, vc = _nan_batch(layout, q_lens, seq_lens)
    used = torch.zeros(kc.shape[0], 16, dtype=torch.bool)
    for s, L in enumerate(seq_lens):
        for p in range(L):
            used[int(meta.block_table[s, p // 16]), p % 16] = True
    for c, v in ((kc, float("nan")), (vc, float("inf"))):
        (c if layout == "NHD" else c.transpose(1, 2))[~used] = v
    out = Attention.build(spec, cpu)(q, kc, vc, meta)
    assert bool(torch.isfinite(out).all())
    torch.testing.assert_close(out.double(), attention_reference(q, kc, vc, meta, spec), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("layout", ["NHD", "HND"])
@pytest.mark.parametrize("q_lens,seq_lens", _BATCHES)
def test_token_major_transposed_q_is_accepted(cpu, layout, q_lens, seq_lens):
    spec, meta, q, kc, vc = _nan_batch(layout, q_lens, seq_lens)
    qt = q.transpose(0, 1).contiguous().transpose(0, 1)
    assert not qt.is_contiguous()
    out = Attention.build(spec, cpu)(qt, kc, vc, meta)
    torch.testing.assert_close(out.double(), attention_reference(q, kc, vc, meta, spec), rtol=1e-4, atol=1e-4)
