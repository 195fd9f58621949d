"""Shared SPO-chain / SPO-tree loss math against hand-computed numbers."""

import math

import pytest
import torch

from megatron_spo.training.algorithms.segment_loss import (
    SegmentLossConfig,
    k3_kl,
    prepare_segment_batch,
    probability_mask,
    segment_policy_loss,
    whiten_masked,
)


def test_probability_mask_is_strictly_below_threshold():
    old = torch.log(torch.tensor([[0.5, 0.9, 0.95, 0.89999]]))
    assert probability_mask(old, 0.9).tolist() == [[True, False, False, True]]


def test_whiten_masked_uses_masked_tokens_and_unbiased_variance():
    values = torch.tensor([[1.0, 2.0, 3.0, 100.0]])
    mask = torch.tensor([[1, 1, 1, 0]])
    # masked mean 2, unbiased variance ((1 + 0 + 1) / 2) = 1
    out = whiten_masked(values, mask, eps=0.0)
    torch.testing.assert_close(out, torch.tensor([[-1.0, 0.0, 1.0, 98.0]]))


def test_whiten_masked_with_reduce_fn_equals_whole_batch():
    """Two data-parallel shards that all-reduce their statistics whiten like one batch."""
    torch.manual_seed(0)
    values = torch.randn(4, 6, dtype=torch.float64)
    mask = torch.rand(4, 6) > 0.3
    whole = whiten_masked(values, mask)

    shard_a, shard_b = (values[:2], mask[:2]), (values[2:], mask[2:])

    def stats(v, m):
        m = m.to(v.dtype)
        return torch.stack([m.sum(), (v * m).sum(), (v.square() * m).sum()])

    out_a = whiten_masked(*shard_a, reduce_fn=lambda s: s + stats(*shard_b))
    out_b = whiten_masked(*shard_b, reduce_fn=lambda s: s + stats(*shard_a))
    torch.testing.assert_close(torch.cat([out_a, out_b]), whole)


def test_prepare_segment_batch_masks_high_probability_and_tool_tokens_then_whitens():
    token_advantages = torch.tensor([[1.0, 5.0, 3.0, 7.0]])
    old_logprobs = torch.log(torch.tensor([[0.5, 0.95, 0.2, 0.8]]))
    response_mask = torch.tensor([[1, 1, 1, 0]])  # last token is tool output
    advantages, loss_mask = prepare_segment_batch(
        token_advantages, old_logprobs, response_mask, SegmentLossConfig(whiten_eps=0.0)
    )
    assert loss_mask.tolist() == [[True, False, True, False]]
    # masked values 1 and 3: mean 2, unbiased variance 2
    s = 1 / math.sqrt(2)
    torch.testing.assert_close(advantages, torch.tensor([[-s, 0.0, s, 0.0]]))


def test_prepare_segment_batch_leaves_micro_batch_whitening_to_the_objective():
    """whiten_scope micro_batch: the step's statistics are not used; the advantages stay raw on the
    masked tokens (`SegmentObjective` whitens each micro-batch, tests/unit/test_objectives.py)."""
    config = SegmentLossConfig(whiten_scope="micro_batch")
    advantages, loss_mask = prepare_segment_batch(
        torch.tensor([[1.0, 5.0, 3.0]]), torch.log(torch.tensor([[0.5, 0.95, 0.2]])), torch.tensor([[1, 1, 1]]),
        config, reduce_fn=lambda stats: pytest.fail("no step statistics with micro-batch whitening"))
    assert loss_mask.tolist() == [[True, False, True]]
    torch.testing.assert_close(advantages, torch.tensor([[1.0, 0.0, 3.0]]))
    with pytest.raises(ValueError, match="whiten_scope"):
        SegmentLossConfig(whiten_scope="mini_batch")


def test_prepare_segment_batch_without_prob_mask_or_whitening_passes_advantages_through():
    config = SegmentLossConfig(use_prob_mask=False, whiten_advantages=False)
    advantages, loss_mask = prepare_segment_batch(
        torch.tensor([[1.0, 5.0]]), torch.log(torch.tensor([[0.5, 0.95]])), torch.tensor([[1, 1]]), config
    )
    assert loss_mask.tolist() == [[True, True]]
    torch.testing.assert_close(advantages, torch.tensor([[1.0, 5.0]]))


def test_segment_policy_loss_hand_computed():
    old = torch.log(torch.tensor([[0.5, 0.5, 0.5]]))
    new = torch.log(torch.tensor([[0.7, 0.5, 0.3]])).requires_grad_()
    advantages = torch.tensor([[1.0, -1.0, -2.0]])
    mask = torch.tensor([[True, True, True]])
    out = segment_policy_loss(new, old, advantages, mask, SegmentLossConfig(kl_coef=1e-4), ref_logprobs=old)
    # ratios 1.4, 1.0, 0.6. token 0: max(-1.4, -1.2) = -1.2 (clipped); token 1: 1.0;
    # token 2: max(1.2, 1.6) = 1.6 (clipped). pg = (-1.2 + 1.0 + 1.6) / 3
    assert out.pg_loss.item() == pytest.approx(1.4 / 3, rel=1e-6)
    # k3 with log(ref/new): token 0: 0.5/0.7 - ln(0.5/0.7) - 1 = 0.0507574; token 2: 0.1558410
    assert out.kl_loss.item() == pytest.approx(1e-4 * (0.0507574 + 0.1558410), rel=1e-5)
    assert out.loss.item() == pytest.approx(out.pg_loss.item() + out.kl_loss.item())
    assert out.clip_fraction.item() == pytest.approx(2 / 3)
    assert out.mean_ratio.item() == pytest.approx(1.0)
    out.pg_loss.backward()
    # clipped tokens get no gradient; token 1: d/dlogp (-A ratio) / 3 = 1/3
    torch.testing.assert_close(new.grad, torch.tensor([[0.0, 1 / 3, 0.0]]))


def test_segment_policy_loss_ignores_unmasked_tokens_and_averages_per_token():
    old = torch.zeros(2, 3)
    new = torch.full((2, 3), math.log(1.1))
    advantages = torch.tensor([[1.0, 1.0, 9.0], [2.0, 0.0, 0.0]])
    mask = torch.tensor([[True, True, False], [True, False, False]])
    out = segment_policy_loss(new, old, advantages, mask, SegmentLossConfig(kl_coef=0.0))
    # ratio 1.1 inside the clip range: -(1 + 1 + 2) * 1.1 / 3 masked tokens
    assert out.pg_loss.item() == pytest.approx(-4 * 1.1 / 3, rel=1e-6)
    assert out.kl_loss.item() == 0.0
    assert out.num_masked_tokens.item() == 3


def test_k3_kl_is_zero_at_equality_and_positive_otherwise():
    lp = torch.log(torch.tensor([0.2, 0.5, 0.9]))
    assert k3_kl(lp, lp).abs().max().item() == 0.0
    assert (k3_kl(lp, lp.roll(1)) > 0).all()
    # hand: ref 0.9 vs theta 0.2: 4.5 - ln 4.5 - 1
    assert k3_kl(lp, lp.roll(1))[0].item() == pytest.approx(4.5 - math.log(4.5) - 1, rel=1e-6)


def test_kl_needs_reference_logprobs():
    x = torch.zeros(1, 2)
    with pytest.raises(ValueError, match="ref_logprobs"):
        segment_policy_loss(x, x, x, x.bool(), SegmentLossConfig(kl_coef=1e-4))
