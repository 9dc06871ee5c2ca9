"""core/attention.py: spec and capability checks, batch metadata validation, per-call validation, the float64
reference against an independent dense computation, and the core's native kernels."""
from __future__ import annotations

import math

import pytest
import torch

from anyaccel.conformance.ops.attention import make_batch
from anyaccel.core.attention import (Attention, AttentionCapability, AttentionMetadata, AttentionSpec,
                                     ReshapeAndCache, attention_reference, kv_cache_shape,
                                     reshape_and_cache_reference)
from anyaccel.core.errors import InvalidArgumentError, UnsupportedError

I32 = torch.int32


def _meta(starts, lens, table, P=4, slots=None):
    t = lambda x, dt=I32: torch.tensor(x, dtype=dt)  # noqa: E731
    return AttentionMetadata.build(t(starts), t(lens), t(table), P,
                                   slot_mapping=None if slots is None else t(slots, torch.int64))


def _raises(argument, fn, *args, **kw):
    with pytest.raises(InvalidArgumentError) as ei:
        fn(*args, **kw)
    assert ei.value.argument == argument, str(ei.value)
    assert f"'{argument}'" in str(ei.value)
    return ei.value


# -- an independent dense computation -------------------------------------------------------------------------------

def dense_attention(q_QHD, k_LHD, v_LHD, spec):
    """Straight from the contract's words, one (query, key) pair at a time for the mask, float64 throughout."""
    Q, hq, d = q_QHD.shape
    L = k_LHD.shape[0]
    g = hq // spec.num_kv_heads
    k = k_LHD.double().repeat_interleave(g, dim=1)  # [L, Hq, D]
    v = v_LHD.double().repeat_interleave(g, dim=1)
    scale = spec.scale if spec.scale is not None else 1 / math.sqrt(d)
    bias = torch.zeros(Q, L, dtype=torch.float64)
    for i in range(Q):
        qpos = L - Q + i
        for j in range(L):
            ok = True
            if spec.causal and j > qpos:
                ok = False
            if spec.sliding_window is not None and qpos - j >= spec.sliding_window:
                ok = False
            if not ok:
                bias[i, j] = -math.inf
    s = torch.einsum("qhd,khd->hqk", q_QHD.double(), k) * scale
    if spec.soft_cap is not None:
        s = spec.soft_cap * torch.tanh(s / spec.soft_cap)
    s = s + bias
    e = torch.exp(s - s.amax(-1, keepdim=True))
    p = e / e.sum(-1, keepdim=True)
    return torch.einsum("hqk,khd->qhd", p, v)


def dense_batch(inp, spec):
    meta = inp["meta"]
    outs = []
    for s in range(meta.num_seqs):
        a, n = meta.query_starts_host[s], meta.query_lens_host[s]
        outs.append(dense_attention(inp["q"][a:a + n], inp["keys"][s], inp["values"][s], spec))
    return torch.cat(outs)


FEATURES = {
    "causal": dict(),
    "gqa": dict(num_heads=8, num_kv_heads=2),
    "mqa": dict(num_heads=6, num_kv_heads=1),
    "window": dict(sliding_window=7),
    "soft_cap": dict(soft_cap=2.5),
    "bidirectional": dict(causal=False),
    "bidirectional_window": dict(causal=False, sliding_window=5),
    "custom_scale": dict(scale=0.3),
    "all": dict(num_heads=4, num_kv_heads=2, sliding_window=9, soft_cap=4.0, scale=0.2),
}
BATCH = [(12, 12), (1, 17), (5, 23), (1, 1), (9, 30)]  # prefill, decode, chunked, decode at pos 0, chunked


def _spec(layout="NHD", dtype=torch.float32, **kw):
    base = dict(num_heads=4, num_kv_heads=4, head_size=16, dtype=dtype, block_size=4, kv_layout=layout)
    base.update(kw)
    return AttentionSpec(**base)


@pytest.mark.parametrize("layout", ["NHD", "HND"])
@pytest.mark.parametrize("feature", sorted(FEATURES))
def test_reference_matches_dense(layout, feature):
    spec = _spec(layout, **FEATURES[feature])
    inp = make_batch(spec, BATCH, torch.device("cpu"), seed=3)
    ref = attention_reference(inp["q"], inp["k_cache"], inp["v_cache"], inp["meta"], spec)
    assert ref.dtype == torch.float64
    torch.testing.assert_close(ref, dense_batch(inp, spec), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("layout", ["NHD", "HND"])
@pytest.mark.parametrize("feature", sorted(FEATURES))
def test_native_matches_reference(make_backend, layout, feature):
    spec = _spec(layout, **FEATURES[feature])
    op = Attention.build(spec, make_backend(layout=layout))
    assert op.selection.fallback and op.selection.chosen == "native.attention"
    inp = make_batch(spec, BATCH, torch.device("cpu"), seed=4)
    out = torch.full_like(inp["q"], float("nan"))
    op(inp["q"], inp["k_cache"], inp["v_cache"], inp["meta"], out=out)
    torch.testing.assert_close(out.double(), dense_batch(inp, spec), rtol=1e-5, atol=1e-5)


def test_native_half_dtype(make_backend):
    spec = _spec(dtype=torch.bfloat16, num_heads=4, num_kv_heads=2, soft_cap=3.0)
    op = Attention.build(spec, make_backend())
    inp = make_batch(spec, BATCH, torch.device("cpu"), seed=5)
    out = op(inp["q"], inp["k_cache"], inp["v_cache"], inp["meta"])
    assert out.dtype == torch.bfloat16 and out.shape == inp["q"].shape
    torch.testing.assert_close(out.double(), dense_batch(inp, spec), rtol=2e-2, atol=2e-2)


def test_reference_ignores_other_blocks_and_garbage():
    """Unused cache positions hold garbage; the result must not depend on them."""
    spec = _spec()
    inp = make_batch(spec, [(3, 6)], torch.device("cpu"), seed=0)
    ref1 = attention_reference(inp["q"], inp["k_cache"], inp["v_cache"], inp["meta"], spec)
    kc = inp["k_cache"].clone()
    used = set(inp["meta"].block_table[0, :2].tolist())
    for b in range(kc.shape[0]):
        if b not in used:
            kc[b] = 1e6
    kc[inp["meta"].block_table[0, 1], 2:] = -1e6  # positions 6, 7 of the second block are past seq_len
    ref2 = attention_reference(inp["q"], kc, inp["v_cache"], inp["meta"], spec)
    torch.testing.assert_close(ref1, ref2)


# -- spec and capability --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kw,argument", [
    (dict(num_heads=6, num_kv_heads=4), "spec.num_kv_heads"),
    (dict(num_heads=0), "spec.num_heads"),
    (dict(head_size=-1), "spec.head_size"),
    (dict(block_size=0), "spec.block_size"),
    (dict(sliding_window=0), "spec.sliding_window"),
    (dict(soft_cap=0.0), "spec.soft_cap"),
    (dict(soft_cap=-1.0), "spec.soft_cap"),
    (dict(scale=float("nan")), "spec.scale"),
    (dict(kv_layout="NDH"), "spec.kv_layout"),
    (dict(dtype=torch.int8), "spec.dtype"),
])
def test_spec_checked_at_build(make_backend, kw, argument):
    for op in (Attention, ReshapeAndCache):
        _raises(argument, op.build, _spec(**kw), make_backend())


def test_build_rejects_wrong_spec_type(make_backend):
    _raises("spec", Attention.build, object(), make_backend())


def test_spec_features_and_defaults():
    s = _spec(num_heads=8, num_kv_heads=2, sliding_window=4, soft_cap=1.0, scale=0.5)
    assert s.features == {"causal", "gqa", "sliding_window", "soft_cap", "custom_scale"}
    assert _spec(causal=False).features == {"bidirectional"}
    assert _spec(head_size=64).softmax_scale == pytest.approx(0.125)
    assert s.num_queries_per_kv == 4 and s.cache_dtype == torch.float32
    assert "window=4" in str(s) and "Hq=8" in str(s)


def test_kv_cache_shape():
    assert kv_cache_shape(_spec("NHD"), 7) == (7, 4, 4, 16)
    assert kv_cache_shape(_spec("HND"), 7) == (7, 4, 4, 16)
    s = _spec("HND", num_kv_heads=2, num_heads=4, block_size=8)
    assert kv_cache_shape(s, 3) == (3, 2, 8, 16)
    assert kv_cache_shape(AttentionSpec(4, 2, 16, block_size=8), 3) == (3, 8, 2, 16)


def test_capability_names_each_unmet_requirement():
    cap = AttentionCapability(dtypes=frozenset({torch.float16}), head_sizes=frozenset({64, 128}), max_head_size=96,
                              kv_cache_dtypes=frozenset({torch.float16}), block_sizes=frozenset({16}),
                              kv_layouts=frozenset({"HND"}), features=frozenset({"causal"}),
                              max_num_queries_per_kv=2)
    spec = _spec("NHD", num_heads=8, num_kv_heads=2, head_size=112, block_size=32, sliding_window=3, soft_cap=1.0)
    reasons = cap.not_supported_reasons(spec)
    text = "\n".join(reasons)
    for word in ("dtype float32", "head_size 112 not in", "exceeds the maximum 96", "kv_cache_dtype float32",
                 "block_size 32", "kv_layout NHD", "sliding_window", "soft_cap", "gqa", "4 query heads per kv head"):
        assert word in text, (word, reasons)
    assert AttentionCapability().not_supported_reasons(_spec()) == []
    # by default the cache must have the query dtype
    mixed = _spec(dtype=torch.bfloat16, kv_cache_dtype=torch.float32)
    assert any("kv_cache_dtype" in r for r in AttentionCapability().not_supported_reasons(mixed))


def test_unsupported_strict_build_raises(make_backend):
    from anyaccel.core.dispatch import KernelImpl

    k = KernelImpl(op="attention", backend="test", name="t.attn", build=lambda s: None,
                   capability=AttentionCapability(features=frozenset({"causal"})))
    with pytest.raises(UnsupportedError) as ei:
        Attention.build(_spec(soft_cap=2.0), make_backend([k]), strict=True)
    assert "soft_cap" in str(ei.value)


# -- metadata --------------------------------------------------------------------------------------------------------

def test_metadata_host_facts():
    m = _meta([0, 3, 4, 9], [3, 10, 5], [[5, 0, 0], [1, 2, 7], [3, 4, 0]], P=4, slots=[20, 21, 22, 30, 12, 13, 14,
                                                                                       15, -1])
    assert (m.num_seqs, m.num_tokens, m.max_query_len, m.max_seq_len) == (3, 9, 5, 10)
    assert m.query_lens_host == (3, 1, 5) and m.seq_lens_host == (3, 10, 5) and m.query_starts_host == (0, 3, 4, 9)
    # only the blocks sequences use count: row 0 uses 1 block, row 1 uses 3, row 2 uses 2
    assert m.max_block_index == 7 and m.max_slot == 30 and m.num_padding_slots == 1
    assert not m.is_pure_decode and m.device == torch.device("cpu")


def test_metadata_unused_block_entries_may_be_negative():
    m = _meta([0, 1], [4], [[2, -1, -1]], P=4)
    assert m.max_block_index == 2


@pytest.mark.parametrize("args,argument,fragment", [
    (([0, 2], [2], [[0]], 0), "block_size", "positive"),
    (([0, 2], [[2]], [[0]], 4), "seq_lens", "1-d"),
    (([0, 2, 3], [2], [[0]], 4), "query_start_loc", "shape"),
    (([0, 2], [2, 3], [[0], [1]], 4), "query_start_loc", "shape"),
    (([0, 2, 3], [2, 3], [[0]], 4), "block_table", "2 rows"),
    (([0, 2, 3], [2, 3], [0, 1], 4), "block_table", "2-d"),
    (([1, 2], [2], [[0]], 4), "query_start_loc", "== 0"),
    (([0, 3, 2], [3, 3], [[0], [1]], 4), "query_start_loc", "non-decreasing"),
    (([0, 3], [2], [[0]], 4), "seq_lens", "query length"),
    (([0, 0], [-1], [[0]], 4), "seq_lens", "non-negative"),
    (([0, 1], [9], [[0, 1]], 4), "block_table", "does not fit"),
    (([0, 1, 2], [5, 1], [[3, -2], [0, 0]], 4), "block_table", "non-negative"),
])
def test_metadata_rejects(args, argument, fragment):
    starts, lens, table, P = args
    err = _raises(argument, _meta, starts, lens, table, P)
    assert fragment in str(err)


def test_metadata_rejects_dtype_device_and_slot_length():
    t = torch.tensor
    _raises("seq_lens", AttentionMetadata.build, t([0, 2]), t([2.0]), t([[0]]), 4)
    _raises("query_start_loc", AttentionMetadata.build, t([0, 2], dtype=torch.float32), t([2]), t([[0]]), 4)
    _raises("block_table", AttentionMetadata.build, t([0, 2]), t([2]), t([[0]], device="meta"), 4)
    _raises("slot_mapping", AttentionMetadata.build, t([0, 2]), t([2]), t([[0]]), 4, slot_mapping=t([0, 1, 2]))
    _raises("slot_mapping", AttentionMetadata.build, t([0, 2]), t([2]), t([[0]]), 4,
            slot_mapping=t([0.0, 1.0]))


# -- per-call validation -----------------------------------------------------------------------------------------

@pytest.fixture
def call_inputs():
    spec = _spec(num_heads=4, num_kv_heads=2)
    inp = make_batch(spec, [(3, 6), (1, 9)], torch.device("cpu"), seed=1)
    return spec, inp


def test_attention_call_validation(make_backend, call_inputs):
    spec, inp = call_inputs
    op = Attention.build(spec, make_backend())
    q, kc, vc, meta = inp["q"], inp["k_cache"], inp["v_cache"], inp["meta"]
    op(q, kc, vc, meta)  # the good call passes
    _raises("q", op, q[0], kc, vc, meta)                                # wrong rank
    _raises("q", op, q[:, :2], kc, vc, meta)                            # wrong number of heads
    _raises("q", op, torch.zeros(4, 4, 8), kc, vc, meta)                # wrong head size
    _raises("q", op, q.double(), kc, vc, meta)                          # dtype
    _raises("q", op, q[:3], kc, vc, meta)                               # T != meta.num_tokens
    _raises("q", op, "not a tensor", kc, vc, meta)
    _raises("k_cache", op, q, kc.transpose(1, 2).contiguous(), vc, meta)  # HND shape under an NHD spec
    _raises("k_cache", op, q, kc[..., :8], vc, meta)
    _raises("k_cache", op, q, kc.half(), vc, meta)
    _raises("v_cache", op, q, kc, vc[:-1], meta)
    _raises("v_cache", op, q, kc, vc.half(), meta)
    _raises("k_cache", op, q, kc.transpose(0, 1).contiguous().transpose(0, 1), vc, meta)  # not contiguous
    _raises("k_cache", op, q, kc.to("meta"), vc.to("meta"), meta)          # device mismatch
    _raises("meta", op, q.to("meta"), kc.to("meta"), vc.to("meta"), meta)  # meta's tensors on another device
    _raises("meta", op, q, kc, vc, {"num_tokens": 4})
    m8 = AttentionMetadata.build(meta.query_start_loc, meta.seq_lens, meta.block_table, 8)
    _raises("meta", op, q, kc, vc, m8)                                  # block size mismatch
    err = _raises("block_table", op, q, kc[:3].clone(), vc[:3].clone(), meta)
    assert "points past the cache" in str(err)
    _raises("out", op, q, kc, vc, meta, out=torch.empty(4, 4, 8))
    _raises("out", op, q, kc, vc, meta, out=torch.empty_like(q).half())
    _raises("out", op, q, kc, vc, meta, out=torch.empty(4, 16, 4).transpose(1, 2))


def test_hnd_spec_checks_hnd_shapes(make_backend):
    spec = _spec("HND", num_heads=4, num_kv_heads=2)
    inp = make_batch(spec, [(2, 5)], torch.device("cpu"), seed=2)
    op = Attention.build(spec, make_backend(layout="HND"))
    op(inp["q"], inp["k_cache"], inp["v_cache"], inp["meta"])
    err = _raises("k_cache", op, inp["q"], inp["k_cache"].transpose(1, 2).contiguous(), inp["v_cache"], inp["meta"])
    assert "HND" in str(err)


def _write_inputs(spec, T=5, B=3, slots=None):
    slots = list(range(T)) if slots is None else slots
    meta = _meta([0, T], [T], [[0, 1]], P=spec.block_size, slots=slots)
    key = torch.randn(T, spec.num_kv_heads, spec.head_size)
    kc = torch.zeros(kv_cache_shape(spec, B))
    return key, key * 2, kc, kc.clone(), meta


def test_reshape_and_cache_validation(make_backend):
    spec = _spec(num_heads=4, num_kv_heads=2)
    op = ReshapeAndCache.build(spec, make_backend())
    key, value, kc, vc, meta = _write_inputs(spec)
    op(key, value, kc, vc, meta)
    _raises("key", op, key[0], value, kc, vc, meta)
    _raises("key", op, key[:, :1], value, kc, vc, meta)
    _raises("key", op, key.half(), value, kc, vc, meta)
    _raises("value", op, key, value[:4], kc, vc, meta)
    _raises("value", op, key, value.half(), kc, vc, meta)
    _raises("k_cache", op, key, value, kc[..., :4], vc, meta)
    _raises("v_cache", op, key, value, kc, vc[:2], meta)
    no_slots = _meta([0, 5], [5], [[0, 1]], P=4)
    _raises("slot_mapping", op, key, value, kc, vc, no_slots)
    _, _, _, _, m4 = _write_inputs(spec, T=4)
    _raises("key", op, key, value, kc, vc, m4)                      # T != len(slot_mapping)
    _, _, _, _, far = _write_inputs(spec, slots=[0, 1, 2, 3, 12])  # 3 blocks of 4 -> slots < 12
    err = _raises("slot_mapping", op, key, value, kc, vc, far)
    assert "< 12" in str(err)
    _raises("value", op, key.to("meta"), value, kc, vc, meta)          # device mismatch, named relative to key
    _raises("k_cache", op, key.to("meta"), value.to("meta"), kc, vc, meta)


@pytest.mark.parametrize("layout", ["NHD", "HND"])
def test_reshape_and_cache_native_and_reference(make_backend, layout):
    spec = _spec(layout, num_heads=4, num_kv_heads=2, block_size=4)
    key, value, kc, vc, meta = _write_inputs(spec, T=6, B=4, slots=[13, -1, 2, 7, -5, 0])
    rk, rv = reshape_and_cache_reference(key, value, kc, vc, meta.slot_mapping, layout)
    op = ReshapeAndCache.build(spec, make_backend(layout=layout))
    op(key, value, kc, vc, meta)
    torch.testing.assert_close(kc.double(), rk, rtol=0, atol=0)
    torch.testing.assert_close(vc.double(), rv, rtol=0, atol=0)
    # the reference itself: token 0 went to block 3, offset 1; padding tokens 1 and 4 were skipped
    pick = (lambda c, b, o: c[b, o]) if layout == "NHD" else (lambda c, b, o: c[b, :, o])
    assert torch.equal(pick(rk, 3, 1), key[0].double()) and torch.equal(pick(rv, 0, 0), value[5].double())
    assert int((rk != 0).any(-1).sum()) == 4 * spec.num_kv_heads


# -- memory safety of the index tensors ------------------------------------------------------------------------------

def _strided(t):
    """The same values as a stride-2 view with junk in the gaps (what a dense read of it would misread)."""
    return torch.stack([t, torch.full_like(t, 1 << 20)], -1)[..., 0]


def test_metadata_copies_strided_index_tensors_once():
    t = lambda x, dt=I32: torch.tensor(x, dtype=dt)  # noqa: E731
    starts, lens, table, slots = t([0, 3, 4]), t([3, 6]), t([[5, 0], [1, 2]]), t([20, 21, 22, 9], torch.int64)
    m = AttentionMetadata.build(_strided(starts), _strided(lens), _strided(table), 4, slot_mapping=_strided(slots))
    for name, want in (("query_start_loc", starts), ("seq_lens", lens), ("block_table", table),
                       ("slot_mapping", slots)):
        got = getattr(m, name)
        assert got.is_contiguous(), name
        assert torch.equal(got, want), name
    assert m.max_block_index == 5 and m.max_slot == 22
    # contiguous inputs are kept as they are (no copy on the common path)
    m2 = AttentionMetadata.build(starts, lens, table, 4, slot_mapping=slots)
    assert m2.seq_lens is lens and m2.block_table is table and m2.slot_mapping is slots


@pytest.mark.parametrize("n", [4, 200])  # both the small (host ints) and the large (sorted) path
def test_metadata_rejects_duplicate_slots_naming_both_tokens(n):
    slots = list(range(100, 100 + n))
    slots[n - 1] = slots[1]
    err = _raises("slot_mapping", _meta, [0, n], [n], [list(range((n + 3) // 4 + 30))], 4, slots)
    assert f"slot_mapping[1] = slot_mapping[{n - 1}] = 101" in str(err)


def test_metadata_padding_slots_may_repeat():
    m = _meta([0, 4], [4], [[0, 1]], 4, [-1, 5, -1, -1])
    assert m.num_padding_slots == 3 and m.max_slot == 5


def test_kv_cache_dtype_and_causal_are_checked_at_build(make_backend):
    _raises("spec.kv_cache_dtype", Attention.build, _spec(kv_cache_dtype=torch.int8), make_backend())
    _raises("spec.causal", Attention.build, _spec(causal="no"), make_backend())
