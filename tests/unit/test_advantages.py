"""SPO and GRPO advantages against hand-computed values, including the sharded (DP) path."""

import math

import pytest
import torch

from megatron_spo.training.advantages import (
    global_mean_std,
    group_ids_for,
    grpo_advantages,
    spo_advantages,
)

# r - p_hat = [0.5, -0.5, 0.75, -0.75]: mean 0, unbiased var (0.25+0.25+0.5625+0.5625)/3
REWARDS = torch.tensor([1.0, 0.0, 1.0, 0.0])
P_HAT = torch.tensor([0.5, 0.5, 0.25, 0.75])
STD = math.sqrt(1.625 / 3)
MASK = torch.tensor([[1, 1, 0], [1, 0, 0], [1, 1, 1], [0, 0, 0]], dtype=torch.float32)


def test_spo_advantage_is_normalised_and_broadcast_over_the_response():
    adv = spo_advantages(REWARDS, P_HAT, MASK)
    per_seq = [0.5 / STD, -0.5 / STD, 0.75 / STD, -0.75 / STD]
    expected = [[a * m for m in row] for a, row in zip(per_seq, MASK.tolist())]
    assert adv.shape == (4, 3)
    for got, want in zip(adv.tolist(), expected):
        assert got == pytest.approx(want, rel=1e-6)


def test_spo_advantage_without_normalisation_is_r_minus_p_hat():
    adv = spo_advantages(REWARDS, P_HAT, torch.ones(4, 2), normalize=False)
    assert adv[:, 0].tolist() == pytest.approx([0.5, -0.5, 0.75, -0.75])


def test_spo_constant_batch_gives_zero_not_nan():
    adv = spo_advantages(torch.ones(3), torch.full((3,), 0.5), torch.ones(3, 2))
    assert torch.equal(adv, torch.zeros(3, 2))
    single = spo_advantages(torch.ones(1), torch.full((1,), 0.25), torch.ones(1, 2))
    assert torch.isfinite(single).all()


def _moments(x):
    x = x.to(torch.float64)
    return torch.stack([torch.tensor(float(x.numel()), dtype=torch.float64), x.sum(), x.square().sum()])


def test_spo_sharded_batch_with_reduce_sum_equals_single_process():
    full = spo_advantages(REWARDS, P_HAT, MASK)
    raw = REWARDS - P_HAT
    shards = [slice(0, 1), slice(1, 4)]  # unequal shards, as DP ranks may hold
    parts = []
    for i, s in enumerate(shards):
        other = shards[1 - i]
        # an all-reduce over two ranks: this rank's moments plus the other rank's
        reduce_sum = lambda m, other=other: m + _moments(raw[other])  # noqa: E731
        parts.append(spo_advantages(REWARDS[s], P_HAT[s], MASK[s], reduce_sum=reduce_sum))
    assert torch.allclose(torch.cat(parts), full, atol=1e-6)


def test_global_mean_std_population_option():
    mean, std = global_mean_std(torch.tensor([1.0, 3.0]), unbiased=False)
    assert (mean.item(), std.item()) == pytest.approx((2.0, 1.0))
    _, std_unbiased = global_mean_std(torch.tensor([1.0, 3.0]))
    assert std_unbiased.item() == pytest.approx(math.sqrt(2.0))


def test_grpo_advantage_per_group():
    rewards = torch.tensor([1.0, 0.0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.0, 1.0])
    groups = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1, 2])
    adv = grpo_advantages(rewards, groups, torch.ones(9, 1))[:, 0]
    # group 0: mean 0.75, unbiased std 0.5; group 1: all equal -> 0; group 2: single -> mean 0, std 1
    eps = 1e-6
    expected = [0.25 / (0.5 + eps), -0.75 / (0.5 + eps), 0.25 / (0.5 + eps), 0.25 / (0.5 + eps),
                0, 0, 0, 0, 1 / (1 + eps)]
    assert adv.tolist() == pytest.approx(expected, rel=1e-6)


def test_grpo_groups_need_not_be_contiguous_and_mean_centred_variant():
    rewards = torch.tensor([1.0, 5.0, 0.0, 7.0])
    groups = torch.tensor([3, 9, 3, 9])
    adv = grpo_advantages(rewards, groups, torch.ones(4, 2), norm_by_std=False)
    assert adv[:, 0].tolist() == pytest.approx([0.5, -1.0, -0.5, 1.0])
    assert torch.equal(adv[:, 0], adv[:, 1])


def test_group_ids_for_consecutive_layout():
    assert group_ids_for(3, 2).tolist() == [0, 0, 1, 1, 2, 2]


def test_shape_errors():
    with pytest.raises(ValueError):
        spo_advantages(torch.ones(3), torch.ones(2), torch.ones(3, 1))
    with pytest.raises(ValueError):
        grpo_advantages(torch.ones(3), torch.zeros(2, dtype=torch.long), torch.ones(3, 1))
