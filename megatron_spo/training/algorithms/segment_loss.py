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

Whitening scope (`whiten_scope`). The authors whiten inside each training micro-batch: treetune's
`PPOTrainer._training_step` (`src/treetune/trainers/ppo_trainer.py`, the `masked_whiten(...,
distributed=True, unbiased_variance=True)` call) runs once per per-device batch of
`per_device_train_batch_size` sequences (8 in the Rho-1.1B configs), pooling the statistics of that
micro-batch step over the data-parallel ranks (`trainers/utils.py`, `get_global_statistics_no_move`).
Ours defaults to the whole step (`"step"`: every masked token of the step on every DP rank, one mean
and variance), because (1) the advantages then do not depend on `micro_batch_size`, the token budget
of dynamic batching or the DP layout, as the rest of the objective (`training.objectives`), and (2)
a micro-batch of 8 probability-masked sequences (SPO-tree: edges of few questions) holds few tokens,
whose mean and variance are noisy or undefined. `"micro_batch"` reproduces the authors' scope at
DP = 1 (the paper's single-GPU runs); at DP > 1 each rank whitens its own micro-batch (our
micro-batches need not line up across ranks, so there is no per-micro-batch collective). With fewer
than two masked tokens whitening only centres (the authors' variance would divide by zero), and a
micro-batch without masked tokens is left as is (the authors fall back to the response mask there,
but such a micro-batch carries no gradient either way).

EOS (`train_on_eos`): the authors re-tokenise the response *text* (vLLM's text omits the stop
token) and the EOS append in `_tokenize_trajectory` is commented out
(`src/treetune/episode_generators/episode_generator_with_reward_function.py`), so the stop token
never carries gradient. Our engines return it with the response; with `train_on_eos: false` (the
default) the sample builders give the stop token that ended a response (finish reason "stop")
response mask 0, so it carries no gradient, enters no whitening statistics and is never a cut point.

Interface (all tensors (B, T) over response tokens, right-padded, response_mask 0 on pad):

    advantages, loss_mask = prepare_segment_batch(token_advantages, old_logprobs, response_mask,
                                                  config, reduce_fn=dp_sum_or_None)
    out = segment_policy_loss(logprobs, old_logprobs, advantages, loss_mask, config,
                              ref_logprobs=ref_logprobs_or_None)
    out.loss.backward()

`reduce_fn` sums a small statistics tensor over data-parallel ranks so the step-scope whitening
uses the whole step's tokens; pass None on one rank. With `whiten_scope: micro_batch`,
`prepare_segment_batch` leaves the advantages raw and `training.objectives.SegmentObjective`
whitens each micro-batch. The trainer (`SegmentObjective`) sums `segment_loss_terms` itself, so
its token mean runs over the whole mini-batch across micro-batches and ranks.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Literal, get_args

import torch


WhitenScope = Literal["step", "micro_batch"]


@dataclasses.dataclass(kw_only=True)
class SegmentLossConfig:
    """Loss-side hyperparameters of SPO-chain / SPO-tree (defaults: the authors' configs)."""

    prob_threshold: float = 0.9
    """A token is "low-probability" when pi_old(token) < this (probability, at the sampling
    temperature). Only such tokens get gradient; the authors' value for both instances."""
    use_prob_mask: bool = True
    """Apply the probability mask to the loss and the whitening statistics (authors: true)."""
    whiten_advantages: bool = True
    """Normalise advantages to zero mean / unit variance over the masked tokens (authors: true)."""
    whiten_scope: WhitenScope = "step"
    """Which masked tokens share one mean and variance: "step" (all of the step's, over every DP
    rank; the default, see the module docstring for why) or "micro_batch" (each training
    micro-batch's, the authors' scope at DP = 1; the update then depends on `batch.micro_batch_size`
    / `max_tokens_per_micro_batch`, as theirs does on `per_device_train_batch_size`)."""
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
    train_on_eos: bool = False
    """Whether the stop token (EOS or a `stop_token_ids` id) that ended a response carries
    gradient. The authors never train on it (module docstring); true restores the plain PPO
    habit of training every generated token."""

    def __post_init__(self):
        if not 0.0 < self.prob_threshold <= 1.0:
            raise ValueError(f"prob_threshold must be in (0, 1], got {self.prob_threshold}")
        if self.clip_ratio <= 0:
            raise ValueError(f"clip_ratio must be > 0, got {self.clip_ratio}")
        if self.kl_coef < 0:
            raise ValueError(f"kl_coef must be >= 0, got {self.kl_coef}")
        if self.whiten_eps < 0 or self.log_ratio_clamp <= 0:
            raise ValueError("whiten_eps must be >= 0 and log_ratio_clamp > 0")
        if self.whiten_scope not in get_args(WhitenScope):
            raise ValueError(f"whiten_scope must be one of {get_args(WhitenScope)}, got {self.whiten_scope!r}")


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
    Returns (advantages (B, T), loss_mask (B, T) bool); the advantages are whitened over the whole
    batch (and `reduce_fn`'s ranks) with `whiten_scope: step`, raw with `micro_batch` (the
    objective whitens each micro-batch then).
    """
    loss_mask = response_mask.bool()
    if config.use_prob_mask:
        loss_mask = loss_mask & probability_mask(old_logprobs, config.prob_threshold)
    advantages = token_advantages.to(old_logprobs.dtype)
    if config.whiten_advantages and config.whiten_scope == "step":
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
