"""Advantage estimators as pure functions: SPO (single stream, global normalisation) and GRPO.

SPO (Xu & Ding, "Single-stream Policy Optimization", arXiv 2509.13232; the authors' verl recipe):
one response per prompt, a baseline from the prompt's persistent value tracker,

    A_i = r_i - p_hat_i            p_hat read *before* this step's tracker update
    A_i <- (A_i - mean_j A_j) / (std_j A_j + eps)      over the whole batch of sequences, eps 1e-8
    A_it = A_i * m_it              broadcast over the response tokens (mask m)

`std` is the unbiased (n - 1) sample standard deviation, what `tensor.std()` gives in the
authors' code. Under data parallelism the batch is spread over ranks: the caller passes
`reduce_sum`, a callback that sums a small tensor over the DP group (an all-reduce), and the
normalisation uses the global mean and std, so every rank's advantages equal the single-process
ones.

GRPO (Shao et al., DeepSeekMath, arXiv 2402.03300; verl `compute_grpo_outcome_advantage`):
n responses per prompt form a group g,

    A_i = (r_i - mean_{j in g} r_j) / (std_{j in g} r_j + eps)       eps 1e-6, unbiased std

and a group of one response gets mean 0 and std 1 (A = r), as in verl. `norm_by_std=False`
gives the mean-centred variant (Dr. GRPO, arXiv 2503.20783).
"""

from __future__ import annotations

from typing import Callable

import torch

ReduceSum = Callable[[torch.Tensor], torch.Tensor]


def broadcast_to_tokens(sequence_values: torch.Tensor, response_mask: torch.Tensor) -> torch.Tensor:
    """(B,) per-sequence values -> (B, T) per-token values, zero outside the response."""
    return sequence_values.unsqueeze(-1).to(torch.float32) * response_mask.to(torch.float32)


def global_mean_std(
    values: torch.Tensor, reduce_sum: ReduceSum | None = None, *, unbiased: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and standard deviation of `values` (B,) over the whole (possibly sharded) batch.

    With `reduce_sum`, the three moments (count, sum, sum of squares) are summed across ranks in
    one call. Computed in float64 so the one-pass variance does not lose precision.
    A batch of one has std 0 (not NaN).
    """
    v = values.detach().to(torch.float64).reshape(-1)
    moments = torch.stack([torch.tensor(float(v.numel()), dtype=torch.float64), v.sum(), v.square().sum()])
    if reduce_sum is not None:
        moments = reduce_sum(moments)
    count, total, total_sq = moments[0], moments[1], moments[2]
    mean = total / count.clamp(min=1)
    dof = count - 1 if unbiased else count
    var = (total_sq - count * mean.square()) / dof.clamp(min=1)
    std = torch.where(count > 1, var.clamp(min=0).sqrt(), torch.zeros_like(var))
    return mean.to(torch.float32), std.to(torch.float32)


def spo_advantages(
    rewards: torch.Tensor,
    p_hat: torch.Tensor,
    response_mask: torch.Tensor,
    *,
    eps: float = 1e-8,
    normalize: bool = True,
    reduce_sum: ReduceSum | None = None,
) -> torch.Tensor:
    """SPO advantages (B, T) from rewards (B,), tracker estimates p_hat (B,) and the mask (B, T)."""
    if rewards.shape != p_hat.shape or rewards.dim() != 1:
        raise ValueError(f"rewards and p_hat must both be (B,), got {tuple(rewards.shape)} and {tuple(p_hat.shape)}")
    raw = rewards.to(torch.float32) - p_hat.to(torch.float32)  # (B,)
    if normalize:
        mean, std = global_mean_std(raw, reduce_sum)
        raw = (raw - mean) / (std + eps)
    return broadcast_to_tokens(raw, response_mask)


def grpo_advantages(
    rewards: torch.Tensor,
    group_ids: torch.Tensor,
    response_mask: torch.Tensor,
    *,
    eps: float = 1e-6,
    norm_by_std: bool = True,
) -> torch.Tensor:
    """GRPO advantages (B, T) from rewards (B,), group ids (B,) (same id = same prompt) and the mask.

    Groups must be complete on this rank (the trainer keeps a prompt's n responses together).
    """
    if rewards.shape != group_ids.shape or rewards.dim() != 1:
        raise ValueError(
            f"rewards and group_ids must both be (B,), got {tuple(rewards.shape)} and {tuple(group_ids.shape)}"
        )
    r = rewards.to(torch.float64)
    _, inverse, counts = torch.unique(group_ids, return_inverse=True, return_counts=True)
    num_groups = counts.numel()
    sums = torch.zeros(num_groups, dtype=torch.float64).index_add_(0, inverse, r)
    means = sums / counts
    squared_dev = torch.zeros(num_groups, dtype=torch.float64).index_add_(0, inverse, (r - means[inverse]).square())
    stds = (squared_dev / (counts - 1).clamp(min=1)).sqrt()
    singleton = counts == 1
    means = torch.where(singleton, torch.zeros_like(means), means)
    stds = torch.where(singleton, torch.ones_like(stds), stds)
    centred = r - means[inverse]
    advantages = centred / (stds[inverse] + eps) if norm_by_std else centred
    return broadcast_to_tokens(advantages.to(torch.float32), response_mask)


def group_ids_for(num_prompts: int, n: int) -> torch.Tensor:
    """Group ids for a batch laid out as n consecutive responses per prompt: [0]*n + [1]*n + ..."""
    return torch.arange(num_prompts).repeat_interleave(n)
