"""models.step_inputs: one step's tensors from host lists equal what the engine built before (build + uploads)."""
import pytest
import torch

from anyaccel.core.attention import AttentionMetadata
from anyaccel.models.step_inputs import upload_step


@pytest.mark.parametrize("packed", [False, True], ids=["direct", "one-packed-transfer"])
def test_upload_step_matches_build(packed):
    ids, pos = [5, 6, 7, 9], [0, 1, 2, 8]
    starts, lens, table, slots = [0, 3, 4], [3, 9], [[2, 0, 0], [0, 1, 3]], [8, 9, 10, 12]
    ids_T, pos_T, meta = upload_step(torch.device("cpu"), ids, pos, starts, lens, table, slots, 4, packed=packed)
    ref = AttentionMetadata.build(torch.tensor(starts, dtype=torch.int32), torch.tensor(lens, dtype=torch.int32),
                                  torch.tensor(table, dtype=torch.int32), 4,
                                  slot_mapping=torch.tensor(slots, dtype=torch.int64))
    assert ids_T.tolist() == ids and pos_T.tolist() == pos and ids_T.dtype == torch.int64
    for name in ("query_start_loc", "seq_lens", "block_table", "slot_mapping"):
        a, b = getattr(meta, name), getattr(ref, name)
        assert a.dtype == b.dtype and torch.equal(a, b), name
    for name in ("num_tokens", "max_block_index", "max_slot", "query_lens_host", "seq_lens_host"):
        assert getattr(meta, name) == getattr(ref, name), name
