"""Training-side math shared by SPO-chain and SPO-tree (Segment Policy Optimization).

Reference: Guo et al., "Segment Policy Optimization: Effective Segment-Level Credit Assignment
in RL for Large Language Models" (AIFrameResearch/SPO, built on VinePPO's treetune). Both
instances train with the same PPO-style objective on per-token segment advantages:

    low_t     = [pi_old(y_t | y_<t) < prob_threshold]            probability mask (p at the
                                                                   sampling temperature)
    m_t       = response_mask_t * low_t                            tokens that carry gradient
    A~_t      = (A_t - mean_m(A)) / sqrt(var_m(A) + eps)           whitened over masked tokens,
                                                                   unbiased variance
    r_t       = exp(clamp(log pi_theta - log pi_old, -c, c))
    L_pg      = sum_t m_t max(-A~_t r_t, -A~_t clip(r_t, 1-eps, 1+eps)) / sum_t m_t
    k3_t      = exp(log pi_ref - log pi_theta) - (log pi_ref - log pi_theta) - 1
    L_kl      = kl_coef * mean_over_sequences(sum_t m_t k3_t)
    L         = L_pg + L_kl

As in the authors' trainer the policy-gradient term is a token mean over the masked tokens of the
(micro-)batch and the KL term is a per-sequence sum averaged over sequences; the k3 term is clamped
below at 0 (it is >= 0 analytically) and above at `kl_clamp_max`. Deliberate difference: the
authors skip a batch whose mean ratio exceeds 10; we leave that to the trainer's own guards.

Interface (all tensors (B, T) over response tokens, right-padded, response_mask 0 on pad):

    advantages, loss_mask = prepare_segment_batch(token_advantages, old_logprobs, response_mask,
                                                  config, reduce_fn=dp_sum_or_None)
    out = segment_policy_loss(logprobs, old_logprobs, advantages, loss_mask, config,
                              ref_logprobs=ref_logprobs_or_None)
    out.loss.backward()

`reduce_fn` sums a small statistics tensor over data-parallel ranks so the whitening uses the
global batch (the authors whiten with global statistics); pass None on one rank. The trainer
(`training.objectives.SegmentObjective`) sums `segment_loss_terms` itself, so its token mean runs
over the whole mini-batch across micro-batches and ranks.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import torch


@dataclasses.dataclass(kw_only=True)
class SegmentLossConfig:
    """Loss-side hyperparameters of SPO-chain / SPO-tree (defaults: the authors' configs)."""

    prob_threshold: float = 0.9
    """A token is "low-probability" when pi_old(token) < this (probability, at the sampling
    temperature). Only such tokens get gradient; the authors' value for both instances."""
    use_prob_mask: bool = True
    """Apply the probability mask to the loss and the whitening statistics (authors: true)."""
    whiten_advantages: bool = True
    """Normalise advantages to zero mean / unit variance over the masked tokens of the batch."""
    whiten_eps: float = 1e-8
    """Added to the variance before the square root (authors' value)."""
    clip_ratio: float = 0.2
    """PPO clip range epsilon, symmetric (authors' `cliprange` 0.2)."""
    log_ratio_clamp: float = 10.0
    """|log pi_theta - log pi_old| is clamped to this before exp, in nats, so one stale token
    cannot overflow the ratio (authors' value)."""
    kl_coef: float = 1e-4
    """Coefficient of the k3 KL(pi_theta || pi_ref) loss; 0 disables it (authors: 1e-4)."""
    kl_clamp_max: float = 10000.0
    """Upper clamp of the per-token k3 estimate, in nats (authors' value; effectively off)."""

    def __post_init__(self):
        if not 0.0 < self.prob_threshold <= 1.0:
            raise ValueError(f"prob_threshold must be in (0, 1], got {self.prob_threshold}")
        if self.clip_ratio <= 0:
            raise ValueError(f"clip_ratio must be > 0, got {self.clip_ratio}")
        if self.kl_coef < 0:
            raise ValueError(f"kl_coef must be >= 0, got {self.kl_coef}")
        if self.whiten_eps < 0 or self.log_ratio_clamp <= 0:
            raise ValueError("whiten_eps must be >= 0 and log_ratio_clamp > 0")


@dataclasses.dataclass(kw_only=True)
class SegmentLossOutput:
    loss: torch.Tensor
    """Scalar to backpropagate: pg_loss + kl_loss."""
    pg_loss: torch.Tensor
    kl_loss: torch.Tensor
    clip_fraction: torch.Tensor
    """Share of masked tokens where the clipped branch was taken (detached)."""
    mean_ratio: torch.Tensor
    """Masked mean of pi_theta / pi_old (detached)."""
    num_masked_tokens: torch.Tensor


def probability_mask(old_logprobs: torch.Tensor, prob_threshold: float) -> torch.Tensor:
    """(B, T) bool: tokens whose old-policy probability is below `prob_threshold`."""
    return old_logprobs.exp() < prob_threshold


def whiten_masked(
    values: torch.Tensor,
    mask: torch.Tensor,
    *,
    eps: float = 1e-8,
    reduce_fn: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """(values - mean) / sqrt(var + eps) with mean and unbiased variance over `mask`.

    `reduce_fn`, when given, sums the 3-vector [count, sum, sum of squares] over ranks (e.g. an
    all-reduce over the data-parallel group) so every rank uses the global statistics. With
    fewer than two masked tokens the values are only centred (the variance is undefined).
    """
    mask_f = mask.to(values.dtype)
    stats = torch.stack([mask_f.sum(), (values * mask_f).sum(), (values.square() * mask_f).sum()])
    if reduce_fn is not None:
        stats = reduce_fn(stats)
    count, total, total_sq = stats[0], stats[1], stats[2]
    if count < 1:
        return values.clone()
    mean = total / count
    if count < 2:
        return values - mean
    # unbiased: sum (x - mean)^2 / (n - 1) = (sum x^2 - n mean^2) / (n - 1)
    var = (total_sq - count * mean.square()).clamp_min(0.0) / (count - 1)
    return (values - mean) * torch.rsqrt(var + eps)


def prepare_segment_batch(
    token_advantages: torch.Tensor,
    old_logprobs: torch.Tensor,
    response_mask: torch.Tensor,
    config: SegmentLossConfig,
    *,
    reduce_fn: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Turn raw segment advantages into the loss inputs.

    Args: token_advantages (B, T) raw per-token advantages (from `Sample.extra`); old_logprobs
    (B, T) log pi_old of the response tokens at the sampling temperature; response_mask (B, T)
    1 on model tokens, 0 on padding and tool output.
    Returns (advantages (B, T), loss_mask (B, T) bool).
    """
    loss_mask = response_mask.bool()
    if config.use_prob_mask:
        loss_mask = loss_mask & probability_mask(old_logprobs, config.prob_threshold)
    advantages = token_advantages.to(old_logprobs.dtype)
    if config.whiten_advantages:
        advantages = whiten_masked(advantages, loss_mask, eps=config.whiten_eps, reduce_fn=reduce_fn)
    return advantages * loss_mask, loss_mask


def k3_kl(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """Per-token k3 estimate of KL(pi_theta || pi_ref) (Schulman's control-variate form)."""
    log_ratio = ref_logprobs - logprobs
    return log_ratio.exp() - log_ratio - 1.0


@dataclasses.dataclass(kw_only=True)
class SegmentLossTerms:
    """Per-token pieces of the segment loss, zero outside the loss mask, (B, T) each."""

    pg: torch.Tensor
    """max(-A~ r, -A~ clip(r)) on masked tokens."""
    kl: torch.Tensor | None
    """Clamped k3 KL to the reference on masked tokens; None without a reference."""
    clipped: torch.Tensor
    """1.0 where the clipped branch was taken (detached)."""
    ratio: torch.Tensor
    """pi_theta / pi_old (detached)."""


def segment_loss_terms(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    loss_mask: torch.Tensor,
    config: SegmentLossConfig,
    *,
    ref_logprobs: torch.Tensor | None = None,
) -> SegmentLossTerms:
    """The per-token terms `segment_policy_loss` aggregates; the trainer sums them itself so the
    token mean runs over the whole mini-batch on every rank. All (B, T)."""
    mask_f = loss_mask.to(logprobs.dtype)
    log_ratio = ((logprobs - old_logprobs) * mask_f).clamp(-config.log_ratio_clamp, config.log_ratio_clamp)
    ratio = log_ratio.exp()
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1.0 - config.clip_ratio, 1.0 + config.clip_ratio)
    kl = None
    if ref_logprobs is not None:
        kl = (k3_kl(logprobs, ref_logprobs) * mask_f).clamp(0.0, config.kl_clamp_max)
    return SegmentLossTerms(
        pg=torch.maximum(unclipped, clipped) * mask_f,
        kl=kl,
        clipped=((clipped > unclipped).to(mask_f.dtype) * mask_f).detach(),
        ratio=ratio.detach(),
    )


def segment_policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    loss_mask: torch.Tensor,
    config: SegmentLossConfig,
    *,
    ref_logprobs: torch.Tensor | None = None,
) -> SegmentLossOutput:
    """PPO-clip loss on segment advantages (formula in the module docstring). All (B, T)."""
    if config.kl_coef > 0 and ref_logprobs is None:
        raise ValueError("kl_coef > 0 needs ref_logprobs (the frozen reference model's)")
    terms = segment_loss_terms(logprobs, old_logprobs, advantages, loss_mask, config,
                               ref_logprobs=ref_logprobs if config.kl_coef > 0 else None)
    mask_f = loss_mask.to(logprobs.dtype)
    num_masked = mask_f.sum()
    denominator = num_masked.clamp_min(1.0)
    pg_loss = terms.pg.sum() / denominator
    if terms.kl is not None:
        kl_loss = config.kl_coef * terms.kl.sum(dim=-1).mean()
    else:
        kl_loss = torch.zeros((), dtype=logprobs.dtype, device=logprobs.device)
    return SegmentLossOutput(
        loss=pg_loss + kl_loss,
        pg_loss=pg_loss,
        kl_loss=kl_loss,
        clip_fraction=terms.clipped.sum() / denominator,
        mean_ratio=(terms.ratio * mask_f).sum() / denominator,
        num_masked_tokens=num_masked.detach(),
    )
