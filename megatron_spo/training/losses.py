"""Actor losses as pure functions on tensors: PPO clip (with dual clip), KL to a reference, entropy.

All inputs are per-token tensors of shape (B, T) over response positions, aligned with a
`response_mask` (1 on tokens the model generated, 0 on prompt / padding / tool output).

PPO clipped surrogate (Schulman et al. 2017) with asymmetric clipping ("clip-higher", DAPO,
arXiv 2503.14476) and dual clip (Ye et al. 2020, arXiv 1912.09729), following verl's
`compute_policy_loss` semantics, which the SPO authors trained with:

    ratio   = exp(logp - logp_old)                    (log-ratio clamped to [-20, 20])
    L_clip  = max(-A * ratio, -A * clip(ratio, 1 - clip_ratio_low, 1 + clip_ratio_high))
    L       = min(L_clip, -A * clip_ratio_c)   where A < 0     (dual clip bounds the loss
            = L_clip                           where A >= 0     when a bad action's ratio explodes)

Aggregation over tokens (verl `agg_loss`):
    token-mean: sum_{i,t} L_it m_it / sum_{i,t} m_it        (each token weighs the same; SPO default)
    seq-mean:   mean_i [ sum_t L_it m_it / sum_t m_it ]    (each sequence weighs the same)

Distributed training splits a mini-batch over micro-batches and data-parallel ranks; the mean
must still be over the whole mini-batch. Every aggregating function therefore accepts a
`denominator`: the global token count (token-mean) or sequence count (seq-mean) of the
mini-batch, all-reduced by the caller. Each micro-batch's loss is then its share of the global
mean, and the sum of the shares over micro-batches and ranks equals the single-process loss.
(With gradient *averaging* over DP, as Megatron's DDP does, the caller multiplies by the DP size.)

KL estimators between the current policy and a frozen reference (Schulman, "Approximating KL
divergence", 2020), on tokens sampled from the current policy:
    k1 = logp - logp_ref
    k2 = 0.5 (logp - logp_ref)^2
    k3 = exp(logp_ref - logp) - (logp_ref - logp) - 1      (>= 0, low variance; verl "low_var_kl",
                                                             clamped to [-k3_clamp, k3_clamp])
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import torch

LossAgg = Literal["token-mean", "seq-mean"]
KLEstimator = Literal["k1", "k2", "k3"]

# exp() of a log-ratio beyond +-20 overflows float16/bfloat16 and means a broken sample anyway.
LOG_RATIO_CLAMP = 20.0


def masked_sum(values: torch.Tensor, mask: torch.Tensor, dim=None) -> torch.Tensor:
    if dim is None:
        return (values * mask).sum()
    return (values * mask).sum(dim=dim)


def masked_mean(values: torch.Tensor, mask: torch.Tensor, dim=None) -> torch.Tensor:
    """Mean of `values` where `mask` is 1 (0 when the mask is empty, not NaN)."""
    return masked_sum(values, mask, dim) / mask.sum(dim=dim).clamp(min=1)


def aggregate(
    values: torch.Tensor,
    mask: torch.Tensor,
    mode: LossAgg = "token-mean",
    *,
    denominator: float | torch.Tensor | None = None,
) -> torch.Tensor:
    """Reduce per-token `values` (B, T) to a scalar by `mode`.

    `denominator` replaces the local count (tokens for token-mean, sequences for seq-mean) with
    the global one when the batch is split over micro-batches or ranks.
    """
    mask = mask.to(values.dtype)
    if mode == "token-mean":
        total = masked_sum(values, mask)
        count = mask.sum() if denominator is None else denominator
    elif mode == "seq-mean":
        per_sequence = masked_sum(values, mask, dim=-1) / mask.sum(dim=-1).clamp(min=1)  # (B,)
        # sequences without a single response token (fully masked) carry no weight
        has_tokens = (mask.sum(dim=-1) > 0).to(values.dtype)
        total = (per_sequence * has_tokens).sum()
        count = has_tokens.sum() if denominator is None else denominator
    else:
        raise ValueError(f"unknown loss aggregation {mode!r}; valid: token-mean, seq-mean")
    if isinstance(count, torch.Tensor):
        count = count.clamp(min=1)
    else:
        count = max(float(count), 1.0)
    return total / count


def count_for(mask: torch.Tensor, mode: LossAgg) -> torch.Tensor:
    """This batch's contribution to the global denominator of `aggregate` (sum it over ranks)."""
    if mode == "token-mean":
        return mask.sum().to(torch.float64)
    if mode == "seq-mean":
        return (mask.sum(dim=-1) > 0).sum().to(torch.float64)
    raise ValueError(f"unknown loss aggregation {mode!r}; valid: token-mean, seq-mean")


@dataclasses.dataclass(kw_only=True)
class PolicyLossOutput:
    loss: torch.Tensor
    """Scalar PPO-clip loss (aggregated)."""
    clip_fraction: torch.Tensor
    """Share of response tokens whose ratio was clipped (the clipped branch was taken)."""
    clip_fraction_lower: torch.Tensor
    """Share of response tokens where the dual clip bounded the loss (A < 0, ratio > clip_ratio_c)."""
    approx_kl: torch.Tensor
    """Masked mean of logp_old - logp: how far this update has moved from the sampling policy."""


def ppo_clip_loss(
    log_probs: torch.Tensor,
    old_log_probs: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    *,
    clip_ratio_low: float,
    clip_ratio_high: float,
    clip_ratio_c: float,
    loss_agg: LossAgg = "token-mean",
    denominator: float | torch.Tensor | None = None,
    token_weights: torch.Tensor | None = None,
) -> PolicyLossOutput:
    """PPO clipped surrogate with dual clip; all tensors (B, T); see the module docstring.

    `token_weights` (detached, (B, T)) multiplies each token's surrogate: the importance weight
    pi_old / pi_behaviour of tokens sampled by an older policy (async rollout). The metrics are local masked means (diagnostics, not part of the gradient).
    """
    if clip_ratio_c <= 1.0:
        raise ValueError(f"clip_ratio_c must be > 1 (dual clip lower-bounds the ratio at it), got {clip_ratio_c}")
    mask = response_mask.to(log_probs.dtype)
    log_ratio = (log_probs - old_log_probs).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)  # (B, T)
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1.0 - clip_ratio_low, 1.0 + clip_ratio_high)
    clip_loss = torch.maximum(unclipped, clipped)  # pessimistic bound
    dual_bound = -advantages * clip_ratio_c
    negative = advantages < 0
    per_token = torch.where(negative, torch.minimum(clip_loss, dual_bound), clip_loss)
    if token_weights is not None:
        per_token = per_token * token_weights

    with torch.no_grad():
        clip_fraction = masked_mean((clipped > unclipped).to(mask.dtype), mask)
        clip_fraction_lower = masked_mean(((clip_loss > dual_bound) & negative).to(mask.dtype), mask)
        approx_kl = masked_mean(-log_ratio, mask)
    return PolicyLossOutput(
        loss=aggregate(per_token, mask, loss_agg, denominator=denominator),
        clip_fraction=clip_fraction,
        clip_fraction_lower=clip_fraction_lower,
        approx_kl=approx_kl,
    )


def kl_penalty(
    log_probs: torch.Tensor,
    ref_log_probs: torch.Tensor,
    estimator: KLEstimator = "k3",
    *,
    k3_clamp: float = 10.0,
) -> torch.Tensor:
    """Per-token KL(pi || pi_ref) estimate, shape (B, T); see the module docstring."""
    diff = log_probs - ref_log_probs
    if estimator == "k1":
        return diff
    if estimator == "k2":
        return 0.5 * diff.square()
    if estimator == "k3":
        ref_minus = (-diff).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
        return (torch.exp(ref_minus) - ref_minus - 1.0).clamp(-k3_clamp, k3_clamp)
    raise ValueError(f"unknown KL estimator {estimator!r}; valid: k1, k2, k3")


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of softmax(logits) over the last dim: (..., V) -> (...), in nats.

    H = logsumexp(z) - sum_v softmax(z)_v z_v, computed without materialising log-softmax twice.
    (Under tensor parallelism the vocabulary is sharded; the caller reduces across TP instead.)
    """
    logits = logits.float()
    probs = torch.softmax(logits, dim=-1)
    return torch.logsumexp(logits, dim=-1) - (probs * logits).sum(dim=-1)
