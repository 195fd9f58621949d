"""Dynamic batching by token budget packs rows without losing or duplicating any."""

import torch

from megatron_spo.training.microbatch import microbatches, microbatches_by_tokens


def test_pack_longest_first_within_budget_and_cut_to_longest_row():
    lengths = torch.tensor([3, 9, 4, 8, 2])
    ids = torch.arange(5 * 10).reshape(5, 10)
    mbs = microbatches_by_tokens({"input_ids": ids, "lengths": lengths}, lengths, max_tokens=18)
    # longest first: [9, 8] -> 2 x 9 = 18 fits; then [4, 3, 2] -> 3 x 4 = 12 fits
    assert [mb["lengths"].tolist() for mb in mbs] == [[9, 8], [3, 4, 2]]
    assert [tuple(mb["input_ids"].shape) for mb in mbs] == [(2, 9), (3, 4)]
    assert torch.equal(mbs[1]["input_ids"][0], ids[0, :4])  # rows keep their order within a group
    seen = sorted(int(r[0]) // 10 for mb in mbs for r in mb["input_ids"])
    assert seen == [0, 1, 2, 3, 4]


def test_row_longer_than_budget_gets_its_own_microbatch():
    lengths = torch.tensor([50, 5, 5])
    mbs = microbatches_by_tokens({"x": torch.zeros(3, 50)}, lengths, max_tokens=20)
    assert [tuple(mb["x"].shape) for mb in mbs] == [(1, 50), (2, 5)]


def test_fixed_size_microbatches():
    mbs = microbatches({"x": torch.arange(5)}, 2)
    assert [mb["x"].tolist() for mb in mbs] == [[0, 1], [2, 3], [4]]
