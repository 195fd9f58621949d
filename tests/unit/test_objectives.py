"""The trainer's per-algorithm objectives: sums and counts that give each algorithm's mean.

Each objective returns (loss_sum, count, metrics); the actor divides by the global count. These
tests check that sum / count is the library loss (whose formulas have their own hand-computed
tests), that splitting a mini-batch into micro-batches changes nothing, and one case by hand.
Megatron's vocab-parallel kernels need its parallel state, so each case runs in a one-rank gloo
world (`spawn`)."""

from __future__ import annotations

import math

import pytest
import torch

from megatron_spo.training.algorithms.segment_loss import SegmentLossConfig, segment_policy_loss
from megatron_spo.training.algorithms.soft_spo import SoftSPOConfig, soft_spo_loss
from megatron_spo.training.losses import aggregate, entropy_from_logits, kl_penalty, ppo_clip_loss
from megatron_spo.training.config import PolicyLossConfig
from megatron_spo.training.objectives import PPOObjective, SegmentObjective, SoftObjective, as_loss_fn


def _batch(seed=0, b=3, t=6, v=11):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(b, t, v, generator=g)
    ids = torch.randint(0, v, (b, t), generator=g)
    mask = torch.zeros(b, t)
    mask[0, 1:4] = 1
    mask[1, 2:5] = 1
    mask[2, 0:2] = 1
    lp = torch.log_softmax(logits, -1).gather(-1, torch.roll(ids, -1, 1).unsqueeze(-1)).squeeze(-1)
    mb = {
        "input_ids": ids, "targets": torch.roll(ids, -1, 1), "response_mask": mask,
        "old_logprobs": lp + 0.1 * torch.randn(b, t, generator=g),
        "ref_logprobs": lp - 0.2 * torch.rand(b, t, generator=g),
        "advantages": torch.randn(b, t, generator=g) * mask,
        "lengths": torch.full((b,), t), "rewards": -torch.rand(b, generator=g), "q0": -0.1 * torch.rand(b, generator=g),
    }
    return logits, mb, lp


def _split(mb, rows):
    return {k: v[rows] for k, v in mb.items()}


PPO = dict(clip_ratio_low=0.2, clip_ratio_high=0.28, clip_ratio_c=3.0)


def _ppo(**more):
    return as_loss_fn(PPOObjective(config=PolicyLossConfig(**PPO, **more)))


def _test_ppo_objective_is_the_ppo_loss_and_split_invariant(agg):
    logits, mb, lp = _batch()
    objective = _ppo(loss_agg=agg, kl_coef=0.05, kl_estimator="k3", entropy_coef=0.01)
    loss_sum, count, metrics = objective(logits, mb)
    w = slice(None, -1)
    # PPO clip - entropy_coef * entropy + kl_coef * KL(k3), each term aggregated by `agg` over the batch
    mask = mb["response_mask"][:, w]
    expected = (
        ppo_clip_loss(lp[:, w], mb["old_logprobs"][:, w], mb["advantages"][:, w], mask, **PPO, loss_agg=agg).loss
        - 0.01 * aggregate(entropy_from_logits(logits)[:, w], mask, agg)
        + 0.05 * aggregate(kl_penalty(lp[:, w], mb["ref_logprobs"][:, w], "k3"), mask, agg)
    )
    assert (loss_sum / count).item() == pytest.approx(expected.item(), rel=1e-5)
    assert count.item() == (8 if agg == "token-mean" else 3)
    parts = [objective(logits[r], _split(mb, r)) for r in ([0], [1, 2])]
    assert sum(p[0] for p in parts).item() == pytest.approx(loss_sum.item(), rel=1e-5)
    assert sum(p[1] for p in parts).item() == count.item()
    assert metrics["kl_ref_sum"].item() > 0


def _test_ppo_objective_without_old_logprobs_uses_its_own_forward():
    """A single update on fresh samples: pi_old is the forward's own log-probs (ratio 1), so the
    loss value is -mean(A) and the gradient that of the unclipped surrogate."""
    logits, mb, lp = _batch(3)
    objective = _ppo()
    fresh = {k: v for k, v in mb.items() if k != "old_logprobs"}
    loss_sum, count, metrics = objective(logits, fresh)
    mask = mb["response_mask"][:, :-1]
    assert loss_sum.item() == pytest.approx(-(mb["advantages"][:, :-1] * mask).sum().item(), rel=1e-5)
    with_old = objective(logits, {**mb, "old_logprobs": torch.nn.functional.pad(lp[:, :-1], (0, 1))})
    assert loss_sum.item() == pytest.approx(with_old[0].item(), rel=1e-5, abs=1e-7)
    assert metrics["clipped_sum"].item() == 0


def _test_segment_objective_matches_segment_policy_loss_with_one_micro_batch():
    logits, mb, lp = _batch(1)
    config = SegmentLossConfig(kl_coef=0.3, clip_ratio=0.2)
    # masked tokens / sequences of the whole mini-batch
    mb["mini_batch_tokens"], mb["mini_batch_sequences"] = torch.full((3,), 8.0), torch.full((3,), 3.0)
    loss_sum, count, _ = as_loss_fn(SegmentObjective(config=config))(logits, mb)
    w = slice(None, -1)
    expected = segment_policy_loss(lp[:, w], mb["old_logprobs"][:, w], mb["advantages"][:, w],
                                   mb["response_mask"][:, w].bool(), config, ref_logprobs=mb["ref_logprobs"][:, w])
    assert count.item() == 8  # mask positions before the last column
    assert (loss_sum / count).item() == pytest.approx(expected.loss.item(), rel=1e-5)


def _test_segment_objective_whitens_each_micro_batch_when_asked():
    """whiten_scope micro_batch (the authors'): each micro-batch's masked advantages get their own
    mean and unbiased variance; the token mean of the PPO term still runs over the mini-batch."""
    from megatron_spo.training.algorithms.segment_loss import whiten_masked

    logits, mb, lp = _batch(2)
    mb["advantages"] = mb["advantages"] + 3.0 * mb["response_mask"]  # an offset whitening removes
    config = SegmentLossConfig(kl_coef=0.0, whiten_scope="micro_batch")
    objective = as_loss_fn(SegmentObjective(config=config))
    parts = [[0, 1], [2]]
    sums = [objective(logits[rows], _split(mb, rows))[:2] for rows in parts]
    w = slice(None, -1)
    mask = mb["response_mask"][:, w]
    whitened = torch.cat([whiten_masked(mb["advantages"][rows, w], mask[rows].bool()) for rows in parts]) * mask
    expected = segment_policy_loss(lp[:, w], mb["old_logprobs"][:, w], whitened, mask.bool(), config)
    got = sum(s for s, _ in sums) / sum(c for _, c in sums)
    assert got.item() == pytest.approx(expected.loss.item(), rel=1e-5)
    whole = whiten_masked(mb["advantages"][:, w], mask.bool()) * mask
    step_scope = segment_policy_loss(lp[:, w], mb["old_logprobs"][:, w], whole, mask.bool(), config)
    assert abs(got.item() - step_scope.loss.item()) > 1e-3  # the scope matters on this batch


def _test_segment_kl_term_by_hand():
    """One sequence, two masked tokens, advantages 0: loss = kl_coef * sum_t k3_t (per-sequence sum,
    averaged over the single sequence), with k3 = e^d - d - 1, d = log pi_ref - log pi."""
    v = 2
    logits = torch.zeros(1, 3, v)  # uniform: log pi = log 1/2 for every token
    mb = {
        "targets": torch.zeros(1, 3, dtype=torch.long), "response_mask": torch.tensor([[1.0, 1.0, 0.0]]),
        "old_logprobs": torch.full((1, 3), math.log(0.5)), "advantages": torch.zeros(1, 3),
        "ref_logprobs": torch.tensor([[math.log(0.25), math.log(0.75), 0.0]]), "lengths": torch.tensor([3]),
        "input_ids": torch.zeros(1, 3, dtype=torch.long),
        "mini_batch_tokens": torch.tensor([2.0]), "mini_batch_sequences": torch.tensor([1.0]),
    }
    objective = as_loss_fn(SegmentObjective(config=SegmentLossConfig(kl_coef=0.5, prob_threshold=1.0)))
    loss_sum, count, _ = objective(logits, mb)
    k3 = lambda d: math.exp(d) - d - 1  # noqa: E731
    by_hand = 0.5 * (k3(math.log(0.5)) + k3(math.log(1.5)))
    assert (loss_sum / count).item() == pytest.approx(by_hand, rel=1e-6)


def _test_soft_objective_is_the_mean_soft_loss_and_ignores_blank_rows():
    logits, mb, lp = _batch(2)
    config = SoftSPOConfig(beta=0.1, loss_type="cross_entropy")
    loss_sum, count, _ = as_loss_fn(SoftObjective(config=config))(logits, mb)
    w = slice(None, -1)
    expected = soft_spo_loss(lp[:, w], mb["ref_logprobs"][:, w], mb["response_mask"][:, w], mb["rewards"], mb["q0"], config)
    assert count.item() == 3
    assert (loss_sum / count).item() == pytest.approx(expected.loss.item(), rel=1e-5)
    blank = {k: torch.zeros_like(v[:1]) for k, v in mb.items()}  # what an empty rank trains on
    blank_sum, blank_count, _ = as_loss_fn(SoftObjective(config=config))(logits[:1], blank)
    assert blank_sum.item() == 0 and blank_count.item() == 0


CASES = [
    ("_test_ppo_objective_is_the_ppo_loss_and_split_invariant", ("token-mean",)),
    ("_test_ppo_objective_is_the_ppo_loss_and_split_invariant", ("seq-mean",)),
    ("_test_ppo_objective_without_old_logprobs_uses_its_own_forward", ()),
    ("_test_segment_objective_matches_segment_policy_loss_with_one_micro_batch", ()),
    ("_test_segment_objective_whitens_each_micro_batch_when_asked", ()),
    ("_test_segment_kl_term_by_hand", ()),
    ("_test_soft_objective_is_the_mean_soft_loss_and_ignores_blank_rows", ()),
]


def _run_cases(rank, world_size):
    import traceback

    from megatron_spo import platform

    platform.init_distributed(1, 1)
    outcomes = {}
    for case, args in CASES:
        try:
            globals()[case](*args)
            outcomes[(case, args)] = None
        except Exception:  # noqa: BLE001 - reported by the test of that case
            outcomes[(case, args)] = traceback.format_exc()
    return outcomes


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory):
    """All cases in one one-rank world (starting Megatron once, not once per case)."""
    from helpers import distributed_run

    return distributed_run(1, _run_cases, workdir=tmp_path_factory.mktemp("objectives"), timeout_s=300)[0]


@pytest.mark.parametrize("case,args", CASES, ids=[f"{c[6:]}{'-' + a[0] if a else ''}" for c, a in CASES])
def test_objective(outcomes, case, args):
    assert outcomes[(case, args)] is None, outcomes[(case, args)]
