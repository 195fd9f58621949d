"""PPO-clip / dual-clip loss, aggregation, KL estimators and entropy against hand-computed values."""

import math

import pytest
import torch

from megatron_spo.training.losses import (
    aggregate,
    count_for,
    entropy_from_logits,
    kl_penalty,
    ppo_clip_loss,
)

CLIP = dict(clip_ratio_low=0.2, clip_ratio_high=0.28, clip_ratio_c=10.0)

# Five response tokens with ratios and advantages chosen to hit every branch (hand-computed):
#   ratio 0.5,  A=+1 -> max(-0.5, -0.8)   = -0.5   unclipped
#   ratio 1.0,  A=-1 -> max(1, 1)=1, min(1, 10)   =  1.0   unclipped
#   ratio 1.5,  A=+1 -> max(-1.5, -1.28)  = -1.28  clipped (ratio above 1 + 0.28)
#   ratio 20,   A=-1 -> max(20, 1.28)=20, min(20, 10) = 10   dual clip
#   ratio 0.5,  A=-2 -> max(1.0, 1.6)     =  1.6   clipped (ratio below 1 - 0.2)
RATIOS = [0.5, 1.0, 1.5, 20.0, 0.5]
ADVANTAGES = [1.0, -1.0, 1.0, -1.0, -2.0]
PER_TOKEN = [-0.5, 1.0, -1.28, 10.0, 1.6]


def _flat_batch(extra_masked_token=True):
    ratios, advantages, mask = list(RATIOS), list(ADVANTAGES), [1.0] * 5
    if extra_masked_token:  # garbage that must not count
        ratios.append(100.0), advantages.append(5.0), mask.append(0.0)
    logp = torch.log(torch.tensor([ratios]))
    return logp, torch.zeros_like(logp), torch.tensor([advantages]), torch.tensor([mask])


def test_ppo_clip_token_mean_matches_hand_computation():
    logp, old, adv, mask = _flat_batch()
    out = ppo_clip_loss(logp, old, adv, mask, **CLIP)
    assert out.loss.item() == pytest.approx(sum(PER_TOKEN) / 5)  # 2.164
    assert out.clip_fraction.item() == pytest.approx(2 / 5)
    assert out.clip_fraction_lower.item() == pytest.approx(1 / 5)
    expected_kl = -sum(math.log(r) for r in RATIOS) / 5
    assert out.approx_kl.item() == pytest.approx(expected_kl, rel=1e-5)


def test_ppo_clip_gradient_flows_only_through_unclipped_tokens():
    logp, old, adv, mask = _flat_batch()
    logp.requires_grad_(True)
    ppo_clip_loss(logp, old, adv, mask, **CLIP).loss.backward()
    # d(-A * ratio)/d logp = -A * ratio, divided by the 5 counted tokens; clipped tokens get 0
    expected = [-1.0 * 0.5 / 5, 1.0 * 1.0 / 5, 0.0, 0.0, 0.0, 0.0]
    assert logp.grad[0].tolist() == pytest.approx(expected, abs=1e-7)


def test_dual_clip_applies_only_to_negative_advantages():
    # ratio 20 with A = +1 is clipped by 1 + clip_ratio_high, never by clip_ratio_c
    logp = torch.log(torch.tensor([[20.0]]))
    out = ppo_clip_loss(logp, torch.zeros_like(logp), torch.tensor([[1.0]]), torch.ones(1, 1), **CLIP)
    assert out.loss.item() == pytest.approx(-1.28)
    assert out.clip_fraction_lower.item() == 0.0


def _two_sequences():
    # seq 0 holds tokens 1-3, seq 1 tokens 4-5 plus one padding position
    logp = torch.log(torch.tensor([[0.5, 1.0, 1.5], [20.0, 0.5, 1.0]]))
    adv = torch.tensor([[1.0, -1.0, 1.0], [-1.0, -2.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    return logp, torch.zeros_like(logp), adv, mask


def test_seq_mean_weighs_sequences_equally():
    logp, old, adv, mask = _two_sequences()
    seq_mean = ppo_clip_loss(logp, old, adv, mask, loss_agg="seq-mean", **CLIP).loss.item()
    token_mean = ppo_clip_loss(logp, old, adv, mask, loss_agg="token-mean", **CLIP).loss.item()
    # ((-0.5 + 1 - 1.28) / 3 + (10 + 1.6) / 2) / 2 = (-0.26 + 5.8) / 2
    assert seq_mean == pytest.approx(2.77)
    assert token_mean == pytest.approx(10.82 / 5)


@pytest.mark.parametrize("mode", ["token-mean", "seq-mean"])
def test_global_denominator_makes_micro_batch_losses_sum_to_full_batch(mode):
    logp, old, adv, mask = _two_sequences()
    full = ppo_clip_loss(logp, old, adv, mask, loss_agg=mode, **CLIP).loss
    denominator = count_for(mask[:1], mode) + count_for(mask[1:], mode)  # what an all-reduce yields
    parts = [
        ppo_clip_loss(logp[i : i + 1], old[i : i + 1], adv[i : i + 1], mask[i : i + 1],
                      loss_agg=mode, denominator=denominator, **CLIP).loss
        for i in range(2)
    ]
    assert (parts[0] + parts[1]).item() == pytest.approx(full.item())


def test_aggregate_ignores_fully_masked_sequences_and_rejects_unknown_mode():
    values = torch.tensor([[1.0, 3.0], [100.0, 100.0]])
    mask = torch.tensor([[1.0, 1.0], [0.0, 0.0]])
    assert aggregate(values, mask, "seq-mean").item() == pytest.approx(2.0)
    assert aggregate(values, mask, "token-mean").item() == pytest.approx(2.0)
    with pytest.raises(ValueError, match="seq-mean"):
        aggregate(values, mask, "sum")


def test_kl_estimators_hand_values():
    logp = torch.tensor([[-1.0, -2.0]])
    ref = torch.tensor([[-1.5, -1.0]])
    assert kl_penalty(logp, ref, "k1")[0].tolist() == pytest.approx([0.5, -1.0])
    assert kl_penalty(logp, ref, "k2")[0].tolist() == pytest.approx([0.125, 0.5])
    # exp(r) - r - 1 with r = ref - logp = [-0.5, 1]
    assert kl_penalty(logp, ref, "k3")[0].tolist() == pytest.approx(
        [math.exp(-0.5) + 0.5 - 1, math.e - 2], rel=1e-6
    )
    assert kl_penalty(logp, logp, "k3").abs().max().item() == 0.0


def test_entropy_from_logits():
    uniform = torch.zeros(2, 3, 4)
    assert torch.allclose(entropy_from_logits(uniform), torch.full((2, 3), math.log(4)))
    probs = torch.tensor([0.5, 0.25, 0.25])
    expected = 0.5 * math.log(2) + 0.5 * math.log(4)
    assert entropy_from_logits(torch.log(probs) + 7.0).item() == pytest.approx(expected, rel=1e-6)
