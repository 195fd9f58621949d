"""The Single-stream SPO value tracker as pure functions (no torch.distributed, no Megatron).

Each prompt x carries a Beta(alpha, beta) posterior over the policy's success probability
(Single-stream Policy Optimization, arXiv 2509.13232, as implemented in the authors' verl recipe):

    offline prior   N0 = 1 / (1 - clip_lower)          (= 8 for clip_lower = 0.875)
                    k successes (score > 0) of n offline samples, n subsampled to offline_n:
                    alpha = N0 (k + 0.5) / (n + 1),  beta = N0 (n - k + 0.5) / (n + 1)
                    no scores: alpha = beta = 0.5
    estimate        p_hat = alpha / (alpha + beta)
    sampling weight w = sqrt(p_hat (1 - p_hat)) + eps
    policy drift    D = sum_t m_t |old_logp_t - new_logp_t| / sum_t m_t   (0 when no stored response)
    forgetting      rho = clamp(2^(-D / d_half), clip_lower, clip_upper)   (KL mode)
                    rho = config.rho                                        (constant mode)
    update          alpha <- rho alpha + r,  beta <- rho beta + (1 - r)

Arrays are numpy float64 (alpha, beta, p_hat, rewards, rho; shape (B,)) except `kl_drift`, which
takes the trainer's torch tensors. Prioritised sampling without replacement is an exponential race
(Efraimidis & Spirakis 2006): draw E_i ~ Exp(1), keep the k smallest E_i / w_i; this is the same
distribution as drawing one prompt at a time proportionally to w and removing it, in O(n).
"""

from __future__ import annotations

import numpy as np
import torch

from megatron_spo.value.config import ValueConfig


def binarize_scores(scores: np.ndarray) -> np.ndarray:
    """Offline scores -> successes, as the authors do: a score counts as a success when > 0."""
    return np.asarray(scores, dtype=np.float64) > 0


def subsample_counts(
    successes: np.ndarray, totals: np.ndarray, offline_n: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Successes and totals after keeping at most `offline_n` of each prompt's n scores.

    Keeping a uniformly random subset of `offline_n` of n binary scores leaves a hypergeometric
    number of successes, so the subsample is drawn per prompt without materialising the scores.
    successes, totals: (P,) int; returns new (P,) int64 arrays (prompts with n <= offline_n keep theirs).
    """
    successes = np.asarray(successes, dtype=np.int64).copy()
    totals = np.asarray(totals, dtype=np.int64).copy()
    if np.any(successes < 0) or np.any(successes > totals):
        raise ValueError("successes must satisfy 0 <= successes <= totals")
    over = np.flatnonzero(totals > offline_n)
    if over.size:
        k, n = successes[over], totals[over]
        successes[over] = rng.hypergeometric(k, n - k, offline_n)
        totals[over] = offline_n
    return successes, totals


def offline_prior(
    successes: np.ndarray, totals: np.ndarray, prior_strength: float
) -> tuple[np.ndarray, np.ndarray]:
    """(alpha, beta) of the offline prior from k successes of n scores, shapes (P,) float64.

    alpha = N0 (k + 0.5) / (n + 1), beta = N0 (n - k + 0.5) / (n + 1) with N0 = prior_strength;
    prompts with n = 0 get the uninformative Beta(0.5, 0.5).
    """
    k = np.asarray(successes, dtype=np.float64)
    n = np.asarray(totals, dtype=np.float64)
    alpha = prior_strength * (k + 0.5) / (n + 1.0)
    beta = prior_strength * (n - k + 0.5) / (n + 1.0)
    no_scores = n == 0
    alpha[no_scores] = 0.5
    beta[no_scores] = 0.5
    return alpha, beta


def p_hat(alpha: np.ndarray, beta: np.ndarray) -> np.ndarray:
    """Posterior mean success probability alpha / (alpha + beta)."""
    return alpha / (alpha + beta)


def sampling_weights(p: np.ndarray, eps: float) -> np.ndarray:
    """Sampling weight sqrt(p (1 - p)) + eps: largest for prompts the policy solves half the time."""
    return np.sqrt(p * (1.0 - p)) + eps


def kl_drift(old_logprobs: torch.Tensor, new_logprobs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Policy drift D per prompt on its stored response: masked mean of |old - new| over tokens.

    old_logprobs, new_logprobs: (B, T) log-probs of the stored response's tokens, right after the
    previous visit's update and now; mask: (B, T), 1 on response tokens that count (model tokens).
    Returns (B,) float64; a row with no masked token (first visit, nothing stored) has D = 0.
    Accumulated in float64 so D does not depend on how wide the batch was padded (the reduction
    order changes with T), which keeps rho, and the tracker, identical at any DP size.
    """
    mask = mask.to(torch.float64)
    abs_diff = (old_logprobs.to(torch.float64) - new_logprobs.to(torch.float64)).abs() * mask  # (B, T)
    tokens = mask.sum(dim=-1)  # (B,)
    return abs_diff.sum(dim=-1) / tokens.clamp(min=1.0)


def rho_from_drift(drift: np.ndarray | torch.Tensor, config: ValueConfig) -> np.ndarray:
    """Forgetting factor per prompt, shape (B,) float64.

    KL mode: clamp(2^(-D / d_half), clip_lower, clip_upper), so a first visit (D = 0) gets
    clip_upper; constant mode: config.rho for every prompt.
    """
    if isinstance(drift, torch.Tensor):
        drift = drift.detach().to(torch.float64).cpu().numpy()
    drift = np.asarray(drift, dtype=np.float64)
    if config.rho_mode == "constant":
        return np.full(drift.shape, config.rho, dtype=np.float64)
    rho = np.exp2(-drift / config.d_half)
    return np.clip(rho, config.clip_lower, config.clip_upper)


def update_posterior(
    alpha: np.ndarray, beta: np.ndarray, rewards: np.ndarray, rho: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """One tracker step: alpha <- rho alpha + r, beta <- rho beta + (1 - r); shapes (B,)."""
    return rho * alpha + rewards, rho * beta + (1.0 - rewards)


def weighted_sample_without_replacement(
    weights: np.ndarray, k: int, rng: np.random.Generator
) -> np.ndarray:
    """Positions of k draws without replacement, each draw proportional to the remaining weights.

    weights: (n,) >= 0; returns (k,) int64 positions in draw order. Only positions with weight > 0
    can be drawn; asking for more than there are raises ValueError. Deterministic given the
    generator's state, so ranks holding the same weights and seed draw the same prompts.
    """
    weights = np.asarray(weights, dtype=np.float64)
    if weights.ndim != 1 or np.any(~np.isfinite(weights)) or np.any(weights < 0):
        raise ValueError("weights must be a 1-D array of finite values >= 0")
    positive = int(np.count_nonzero(weights))
    if k > positive:
        raise ValueError(f"cannot draw {k} prompts without replacement: only {positive} have weight > 0")
    if k == 0:
        return np.zeros(0, dtype=np.int64)
    with np.errstate(divide="ignore"):
        race = rng.standard_exponential(weights.shape[0]) / weights  # (n,), inf where weight 0
    chosen = np.argpartition(race, k - 1)[:k]
    return chosen[np.argsort(race[chosen], kind="stable")].astype(np.int64)
