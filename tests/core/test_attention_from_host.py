"""AttentionMetadata.from_host: the same metadata and the same errors as build, from host lists."""
import pytest
import torch

from anyaccel.core.attention import AttentionMetadata
from anyaccel.core.errors import InvalidArgumentError

I32, I64 = torch.int32, torch.int64


def _both(starts, lens, table, P, slots):
    built = AttentionMetadata.build(torch.tensor(starts, dtype=I32), torch.tensor(lens, dtype=I32),
                                    torch.tensor(table, dtype=I32), P,
                                    slot_mapping=None if slots is None else torch.tensor(slots, dtype=I64))
    host = AttentionMetadata.from_host(starts, lens, table, P, slots)
    return built, host


@pytest.mark.parametrize("case", [
    ([0, 3, 4, 5], [3, 9, 1], [[0, 0, 0], [1, 2, 3], [4, 0, 0]], 4, [0, 1, 2, 12, 16]),   # prefill + decode mix
    ([0, 1, 2], [5, 1], [[7, 2], [3, 0]], 4, [8, 12]),                                   # pure decode
    ([0, 2], [2], [[5]], 4, [-1, 21]),                                                    # padding slot
    ([0, 2], [6], [[1, 0]], 4, None),                                                     # writes nothing
])
def test_from_host_equals_build(case):
    built, host = _both(*case)
    for name in ("num_seqs", "num_tokens", "max_query_len", "max_seq_len", "max_block_index", "max_slot",
                 "num_padding_slots", "query_starts_host", "query_lens_host", "seq_lens_host", "block_size"):
        assert getattr(host, name) == getattr(built, name), name
    for name in ("query_start_loc", "seq_lens", "block_table", "slot_mapping"):
        a, b = getattr(host, name), getattr(built, name)
        assert (a is None) == (b is None)
        if a is not None:
            assert a.dtype == b.dtype and a.is_contiguous() and torch.equal(a, b), name


@pytest.mark.parametrize("starts, lens, table, slots, argument, fragment", [
    ([1, 2], [2], [[0]], [0], "query_start_loc", "query_start_loc[0] == 0"),
    ([0, 2, 1], [2, 2], [[0], [1]], [0, 1], "query_start_loc", "non-decreasing"),
    ([0, 1], [-1], [[0]], [0], "seq_lens", "non-negative"),
    ([0, 3], [2], [[0]], [0, 1, 2], "seq_lens", "query length 3"),
    ([0, 1], [9], [[0, 1]], [0], "block_table", "at least 3 blocks"),
    ([0, 1], [5], [[0, -2]], [0], "block_table", "block_table[0, 1] = -2"),
    ([0, 1, 2], [1, 1], [[0, 1], [2]], [0, 4], "block_table", "equal length"),
    ([0, 2], [2], [[0]], [0], "slot_mapping", "[2]"),
    ([0, 2], [2], [[0]], [3, 3], "slot_mapping", "slot_mapping[0] = slot_mapping[1] = 3"),
    ([0, 1, 2], [1], [[0]], [0, 1], "query_start_loc", "2 offsets"),
    ([0, 1], [1], [[0], [1]], [0], "block_table", "1 rows"),
])
def test_from_host_errors_name_the_argument(starts, lens, table, slots, argument, fragment):
    with pytest.raises(InvalidArgumentError) as e:
        AttentionMetadata.from_host(starts, lens, table, 4, slots)
    assert e.value.argument == argument and fragment in str(e.value)


def test_from_host_checks_given_tensors():
    ok = (torch.tensor([0, 1], dtype=I32), torch.tensor([1], dtype=I32), torch.tensor([[0]], dtype=I32),
          torch.tensor([0], dtype=I64))
    meta = AttentionMetadata.from_host([0, 1], [1], [[0]], 4, [0], tensors=ok)
    assert meta.seq_lens is ok[1]
    with pytest.raises(InvalidArgumentError) as e:
        AttentionMetadata.from_host([0, 1], [1], [[0]], 4, [0], tensors=(ok[0], ok[1], torch.zeros(1, 2, dtype=I32),
                                                                         ok[3]))
    assert e.value.argument == "block_table"
    with pytest.raises(InvalidArgumentError) as e:
        AttentionMetadata.from_host([0, 1], [1], [[0]], 4, [0], tensors=(ok[0], ok[1].float(), ok[2], ok[3]))
    assert e.value.argument == "seq_lens"
    with pytest.raises(InvalidArgumentError) as e:
        AttentionMetadata.from_host([0, 1], [1], [[0]], 4, None, tensors=ok)
    assert e.value.argument == "tensors"
