"""The metrics every step reports, whatever the algorithm (summed over data-parallel ranks).

    reward/mean, train/accuracy       over complete episodes (tree: every leaf), task reward
    reward/grader_failures            responses the grader failed on (error, timeout, non-finite)
    rollout/*                         generated tokens (step, run), sequences, response length,
                                      |log pi_engine - log pi_actor| when the old pass ran
    advantage/mean, advantage/abs_max per-sequence mean advantages
    perf/*                            seconds and throughput of the step's phases
    actor/*                           the update (`training.update`); the algorithm adds its own
"""

from __future__ import annotations

import torch

from megatron_spo.training.batch import TrainBatch, per_token


def rollout_metrics(rollout, reduce_sum) -> dict[str, float]:
    episodes = torch.tensor(rollout.episode_rewards, dtype=torch.float64)
    totals = reduce_sum(torch.tensor([episodes.sum().item(), float(episodes.numel()), float((episodes > 0).sum()),
                                      rollout.grader_failures, float(len(rollout)),
                                      float(sum(map(len, rollout.responses)))], dtype=torch.float64))
    return {
        "reward/mean": totals[0].item() / max(totals[1].item(), 1),
        "train/accuracy": totals[2].item() / max(totals[1].item(), 1),
        "reward/grader_failures": totals[3].item(),
        "rollout/train_sequences": totals[4].item(),
        "rollout/response_length": totals[5].item() / max(totals[4].item(), 1),
    }


def logprob_mismatch(rollout, batch: TrainBatch, old: torch.Tensor, reduce_sum) -> float:
    """|log pi_engine - log pi_actor| per response token: ~0 when the engine runs the same weights
    at temperature 1 (a sync bug or a precision gap shows here first). NaN engine log-probs
    (external sequences) are left out."""
    engine_lp = per_token(rollout.contexts, rollout.logprobs, old)
    finite = batch.target_mask * torch.isfinite(engine_lp)
    sums = reduce_sum(torch.stack([((engine_lp.nan_to_num() - old).abs() * finite).sum(), finite.sum()]))
    return sums[0].item() / max(sums[1].item(), 1.0)


def advantage_metrics(advantages: torch.Tensor | None, batch: TrainBatch, reduce_sum, reduce_max) -> dict[str, float]:
    """Mean over sequences (all ranks) of each sequence's mean advantage, and the global |max|."""
    if advantages is None:
        return {"advantage/mean": 0.0, "advantage/abs_max": 0.0}
    mask = batch.target_mask
    has = mask.sum(1) > 0
    per_sequence = ((advantages * mask).sum(1) / mask.sum(1).clamp(min=1))[has]
    stats = reduce_sum(torch.stack([per_sequence.sum(), torch.tensor(float(per_sequence.numel()))]))
    abs_max = reduce_max(per_sequence.abs().max() if per_sequence.numel() else torch.zeros(()))
    return {"advantage/mean": stats[0].item() / max(stats[1].item(), 1.0), "advantage/abs_max": abs_max.item()}
