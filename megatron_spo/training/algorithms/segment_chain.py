"""SPO-chain: Segment Policy Optimization with probability-guided cut points (short CoT).

Reference: Guo et al., "Segment Policy Optimization" (AIFrameResearch/SPO,
`math_episode_generator_with_mc_advantages.py`). For a sampled response y_1..y_T with reward R
and old-policy probabilities p_t = pi_old(y_t | x, y_<t) at the sampling temperature:

    L          = [t : p_t < prob_threshold]                 low-probability positions (0-based)
    b_0..b_J-1 = L[0], L[interval], L[2 interval], ...     cut points: every `interval`-th
                                                             low-probability token, from the first
    B_j        = x + y_1..y_{b_j}                           boundary prefix (token ids; the
                                                             low-probability token starts the
                                                             next segment)
    V(B_j)     = mean of R over K continuations sampled from B_j     (identical B_j sampled once)
    A_t        = V(B_{j+1}) - V(B_j)  for b_j <= t < b_{j+1},
                 R - V(B_{J-1})       for t >= b_{J-1},
                 0                    for t < b_0 (all those tokens are high-probability).

R of a response cut by length (finish reason "length"), and of every continuation cut by length,
is `truncated_reward` [0, the authors'] rather than its grade. Tokens with response mask 0 (tool
output, and the stop token ending a response unless `loss.train_on_eos`) are never cut points.
A response without a low-probability token gets A = 0 everywhere. These raw advantages go to
`segment_loss.prepare_segment_batch` (probability mask + whitening) and `segment_policy_loss`.

Trainer interface:

    samples = build_chain_samples(samples, engine, score_fn, config, old_logprobs=...)
    # each returned Sample carries extra["token_advantages"] (one float per response token),
    # extra["cut_points"] and extra["boundary_values"].

`samples` are scored responses (`Sample.reward` set) of the current policy; `old_logprobs`
are their teacher-forced log-probabilities under the actor at the sampling temperature (the
authors' choice); when omitted the engine's sampling logprobs (`Sample.response_logprobs`) are
used. `score_fn(i, response_token_ids, finish_reason)` scores a full response (the sampled prefix
plus a continuation) to the prompt of `samples[i]`. The engine must serve the old policy.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Protocol, Sequence

from megatron_spo.rollout.types import (
    FinishReason,
    GenerationRequest,
    RolloutEngine,
    Sample,
    SamplingParams,
)
from megatron_spo.training.algorithms import TOKEN_ADVANTAGES_KEY
from megatron_spo.training.algorithms.segment_loss import SegmentLossConfig


class ScoreFn(Protocol):
    def __call__(
        self, index: int, response_token_ids: Sequence[int], finish_reason: FinishReason
    ) -> float:
        """Reward of a complete response to the prompt numbered `index` in the caller's batch."""


ScoreItem = tuple[int, Sequence[int], FinishReason]


def score_all(score_fn: ScoreFn, items: Sequence[ScoreItem], *, truncated_reward: float | None = None) -> list[float]:
    """Score many (index, response_token_ids, finish_reason) items at once.

    A scorer with a `score_batch(items) -> list[float]` method gets them in one call (the trainer's
    scorer grades a whole engine call's completions in its worker pool); a plain function is
    called once per item. With `truncated_reward` set, an item cut by length (finish reason
    "length") scores it without being graded (the authors' `unfinished_response_penalty`).
    """
    graded = [item for item in items if truncated_reward is None or item[2] != "length"]
    batch = getattr(score_fn, "score_batch", None)
    if batch is not None:
        scores = [float(s) for s in batch(graded)] if graded else []
        if len(scores) != len(graded):
            raise RuntimeError(f"score_batch returned {len(scores)} scores for {len(graded)} items")
    else:
        scores = [float(score_fn(*item)) for item in graded]
    it = iter(scores)
    return [next(it) if truncated_reward is None or item[2] != "length" else float(truncated_reward) for item in items]


@dataclasses.dataclass(kw_only=True)
class SegmentChainConfig:
    """SPO-chain hyperparameters; defaults are the authors' Rho-1.1B / GSM8K configs."""

    cut_interval: int = 5
    """Every `cut_interval`-th low-probability token is a cut point ("int5" in the paper);
    smaller means more segments and more continuations per response."""
    num_continuations: int = 9
    """K, Monte Carlo continuations per boundary prefix (9 for small models, 4 for Qwen-1.5B)."""
    temperature: float = 0.6
    """Sampling temperature of the continuations; p_t for the cut points is taken at it too."""
    top_p: float = 0.9
    """Nucleus mass of the continuations (authors' value)."""
    top_k: int = -1
    """-1 disables top-k (authors do not use it)."""
    max_response_tokens: int = 1024
    """Budget of a whole response in tokens; a continuation from a prefix of b response tokens
    may add max_response_tokens - b (authors: 1024)."""
    stop_token_ids: list[int] = dataclasses.field(default_factory=list)
    """Extra token ids ending a continuation (the engine's EOS always does)."""
    truncated_reward: float | None = 0.0
    """Reward of a sampled response or a continuation cut by length (finish reason "length"),
    without grading it; None grades the text like any other. The authors score both 0
    (`math_episode_generator_with_mc_advantages.py`: `_compute_mc_value`, `_rollout_eval_callback`
    and the trajectory's `is_unfinished_response` give `unfinished_response_penalty`, 0.0 in every
    SPO config). None suits a scorer that already scores truncation (the 3-digit test task)."""
    loss: SegmentLossConfig = dataclasses.field(default_factory=SegmentLossConfig)
    """Probability mask, whitening, EOS and PPO-clip / KL settings (prob_threshold 0.9 lives here)."""

    def __post_init__(self):
        if self.cut_interval < 1:
            raise ValueError(f"cut_interval must be >= 1, got {self.cut_interval}")
        if self.num_continuations < 1:
            raise ValueError(f"num_continuations must be >= 1, got {self.num_continuations}")
        if self.max_response_tokens < 1:
            raise ValueError(f"max_response_tokens must be >= 1, got {self.max_response_tokens}")


def chain_cut_points(
    old_logprobs: Sequence[float],
    *,
    interval: int,
    prob_threshold: float,
    response_mask: Sequence[int] | None = None,
) -> list[int]:
    """Cut points b_j (0-based positions of the low-probability tokens that start segments).

    Tokens with response_mask 0 (tool output) are never cut points: their probability is not
    the policy's.
    """
    low_positions = [
        t
        for t, logprob in enumerate(old_logprobs)
        if math.exp(logprob) < prob_threshold and (response_mask is None or response_mask[t])
    ]
    return low_positions[::interval]


def chain_token_advantages(
    num_tokens: int, cut_points: Sequence[int], boundary_values: Sequence[float], reward: float
) -> list[float]:
    """Per-token advantages from boundary values (formula in the module docstring)."""
    if len(cut_points) != len(boundary_values):
        raise ValueError(f"{len(cut_points)} cut points but {len(boundary_values)} boundary values")
    advantages = [0.0] * num_tokens
    next_values = list(boundary_values[1:]) + [reward]
    ends = list(cut_points[1:]) + [num_tokens]
    for start, end, value, next_value in zip(cut_points, ends, boundary_values, next_values):
        if not 0 <= start < end <= num_tokens:
            raise ValueError(f"cut points must increase within 0..{num_tokens - 1}: {list(cut_points)}")
        advantages[start:end] = [next_value - value] * (end - start)
    return advantages


@dataclasses.dataclass(kw_only=True)
class BoundaryEstimate:
    """Monte Carlo value of one unique boundary prefix."""

    value: float
    rewards: list[float]


def estimate_boundary_values(
    prefixes: Sequence[tuple[int, Sequence[int], Sequence[int]]],
    engine: RolloutEngine,
    score_fn: ScoreFn,
    config: SegmentChainConfig,
    *,
    seed: int | None = None,
    sample_seeds: Sequence[int] | None = None,
) -> dict[tuple[int, ...], BoundaryEstimate]:
    """V(prefix) = mean reward of K continuations, for every distinct prefix, in one engine call.

    `prefixes` holds (index, prompt_token_ids, response_prefix_token_ids); identical
    prompt + prefix token sequences are sampled once and share the estimate (the first index
    that asked scores them). Returns {tuple(prompt + prefix): estimate}.

    Seeds: with `sample_seeds` (one per index) the j-th distinct prefix of index i samples with
    seed `sample_seeds[i] + 7919 j`, so the result does not depend on which other samples share
    the call (the trainer splits a batch over data-parallel ranks); else `seed + request number`.
    """
    unique: dict[tuple[int, ...], tuple[int, list[int]]] = {}
    seeds: dict[tuple[int, ...], int | None] = {}
    per_index: dict[int, int] = {}
    for index, prompt, prefix in prefixes:
        key = tuple(prompt) + tuple(prefix)
        if key not in unique:
            unique[key] = (index, list(prefix))
            if sample_seeds is not None:
                seeds[key] = sample_seeds[index] + 7919 * per_index.get(index, 0)
                per_index[index] = per_index.get(index, 0) + 1
            else:
                seeds[key] = None if seed is None else seed + len(seeds)
    keys = list(unique)
    requests = [
        GenerationRequest(
            prompt_token_ids=list(key),
            params=SamplingParams(
                n=config.num_continuations,
                temperature=config.temperature,
                top_p=config.top_p,
                top_k=config.top_k,
                max_tokens=max(1, config.max_response_tokens - len(unique[key][1])),
                stop_token_ids=list(config.stop_token_ids),
                seed=seeds[key],
            ),
            request_id=f"spo-chain-{request_number}",
        )
        for request_number, key in enumerate(keys)
    ]
    results = engine.generate(requests) if requests else []
    items = []
    for key, result in zip(keys, results):
        index, prefix = unique[key]
        if not result.completions:
            raise RuntimeError(f"engine returned no completions for request {result.request.request_id}")
        items += [(index, prefix + c.token_ids, c.finish_reason) for c in result.completions]
    scores = iter(score_all(score_fn, items, truncated_reward=config.truncated_reward))
    estimates = {}
    for key, result in zip(keys, results):
        rewards = [next(scores) for _ in result.completions]
        estimates[key] = BoundaryEstimate(value=sum(rewards) / len(rewards), rewards=rewards)
    return estimates


def build_chain_samples(
    samples: Sequence[Sample],
    engine: RolloutEngine,
    score_fn: ScoreFn,
    config: SegmentChainConfig,
    *,
    old_logprobs: Sequence[Sequence[float]] | None = None,
    seed: int | None = None,
    sample_seeds: Sequence[int] | None = None,
) -> list[Sample]:
    """Attach SPO-chain advantages to scored responses (see the module docstring).

    Returns new `Sample`s (inputs untouched) with extra[TOKEN_ADVANTAGES_KEY] (raw per-token
    advantages), extra["cut_points"] and extra["boundary_values"]; a sample cut by length gets
    reward `config.truncated_reward` (when set) in place of its grade.
    """
    if old_logprobs is not None and len(old_logprobs) != len(samples):
        raise ValueError(f"{len(old_logprobs)} old_logprobs rows for {len(samples)} samples")
    cut_points_per_sample = []
    for i, sample in enumerate(samples):
        logprobs = sample.response_logprobs if old_logprobs is None else old_logprobs[i]
        if len(logprobs) != len(sample.response_token_ids):
            raise ValueError(f"sample {i}: {len(logprobs)} old logprobs for "
                             f"{len(sample.response_token_ids)} response tokens")
        cut_points_per_sample.append(
            chain_cut_points(
                logprobs,
                interval=config.cut_interval,
                prob_threshold=config.loss.prob_threshold,
                response_mask=sample.response_mask,
            )
        )

    prefixes = [
        (i, sample.prompt_token_ids, sample.response_token_ids[:cut])
        for i, (sample, cuts) in enumerate(zip(samples, cut_points_per_sample))
        for cut in cuts
    ]
    estimates = estimate_boundary_values(prefixes, engine, score_fn, config, seed=seed, sample_seeds=sample_seeds)

    built = []
    for sample, cuts in zip(samples, cut_points_per_sample):
        values = [
            estimates[tuple(sample.prompt_token_ids) + tuple(sample.response_token_ids[:cut])].value
            for cut in cuts
        ]
        reward = sample.reward
        if config.truncated_reward is not None and sample.finish_reason == "length":
            reward = config.truncated_reward
        advantages = chain_token_advantages(len(sample.response_token_ids), cuts, values, reward)
        extra = dict(sample.extra)
        extra.update({TOKEN_ADVANTAGES_KEY: advantages, "cut_points": list(cuts), "boundary_values": values})
        built.append(dataclasses.replace(sample, reward=reward, extra=extra))
    return built
