"""Sample n responses per prompt and grade them: the pass `megatron-spo values estimate` and
evaluation (`training.evaluation.evaluate`) share.

Under torchrun the prompts are split over rollout groups (`rollout.placement`: with an SPMD engine,
vLLM, every rank of a group sends its engine the group's prompts; otherwise the group's leader
alone generates) and the group's leader grades them with the configured reward. Response j of
prompt i is sampled with seed `seed + i * n + j`, so with the `hf` engine the results do not
depend on the number of ranks. `gather_on_rank0` then brings every rank's rows to rank 0.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Sequence
from typing import Any, Protocol

from megatron_spo.errors import UserError
from megatron_spo.rollout.placement import RolloutPlacement
from megatron_spo.rollout.prompts import BuiltPrompt
from megatron_spo.rollout.rewards import RewardConfig
from megatron_spo.rollout.types import Completion, GenerationRequest, RolloutEngine, SamplingParams

logger = logging.getLogger(__name__)


class SamplingSettings(Protocol):
    """The sampling fields `EstimateConfig` and `EvalConfig` share."""

    n: int
    temperature: float
    top_p: float
    top_k: int
    max_response_tokens: int
    prompts_per_call: int


def check_sampling_settings(settings: SamplingSettings, prefix: str = "") -> None:
    """UserError unless n, max_response_tokens and prompts_per_call are all >= 1 or None (a value
    filled in later: train's `eval.max_response_tokens`), temperature >= 0, top_p in (0, 1] and
    top_k >= -1 (-1 and 0 turn it off); `prefix` starts the message ("eval ")."""
    for name in ("n", "max_response_tokens", "prompts_per_call"):
        value = getattr(settings, name)
        if value is not None and value < 1:
            raise UserError(f"{prefix}{name} must be >= 1, got {value}")
    if not settings.temperature >= 0:  # NaN too
        raise UserError(f"{prefix}temperature must be >= 0, got {settings.temperature}")
    if not 0 < settings.top_p <= 1:
        raise UserError(f"{prefix}top_p must be in (0, 1], got {settings.top_p}")
    if settings.top_k < -1:
        raise UserError(f"{prefix}top_k must be -1 or 0 (off) or >= 1, got {settings.top_k}")


def prompt_sampling(settings: SamplingSettings, prompt_index: int, seed: int = 0) -> SamplingParams:
    """The n samples of prompt `prompt_index`: response j gets seed `seed + prompt_index * n + j`."""
    return SamplingParams(
        n=settings.n,
        temperature=settings.temperature,
        top_p=settings.top_p,
        top_k=settings.top_k,
        max_tokens=settings.max_response_tokens,
        seed=seed + prompt_index * settings.n,
    )


@dataclasses.dataclass(kw_only=True)
class GradedPrompt:
    """One prompt's n completions and their grades."""

    prompt: BuiltPrompt
    """The prompt as sent; `prompt.index` is its position in the dataset."""
    completions: list[Completion]
    scores: list[float]
    """Reward of each completion."""
    predictions: list[Any]
    """The answer the reward extracted from each completion."""


def sample_and_grade(
    engine: RolloutEngine,
    prompts: Sequence[BuiltPrompt],
    settings: SamplingSettings,
    ground_truth: Callable[[int], Any],
    *,
    placement: RolloutPlacement,
    rank: int,
    seed: int = 0,
    reward: RewardConfig | None = None,
    pool=None,
    label: str = "rank",
) -> tuple[list[GradedPrompt], int]:
    """Generate this rank's share of `prompts` (`placement`), `settings.prompts_per_call` prompts
    per engine call, and grade each completion of prompt i against `str(ground_truth(i))` on the
    group's leader. Returns (the graded prompts, empty off the leaders; the reward failures).

    Pass a `pool` (a `ScoringPool`) to reuse the caller's scoring workers (it stays open);
    otherwise the leader makes one from `reward` and closes it. `label` starts the progress lines.
    """
    from megatron_spo.rollout.scoring import ScoringPool

    mine = [prompts[i] for i in placement.plan([None] * len(prompts), rank).generate]
    grades_here = rank == placement.leader(placement.group_of(rank))  # a group's ranks all hold its samples
    own_pool = pool is None and grades_here
    if own_pool:
        pool = ScoringPool(reward or RewardConfig())
    graded: list[GradedPrompt] = []
    reward_failures = 0
    try:
        for start in range(0, len(mine), settings.prompts_per_call):
            chunk = mine[start : start + settings.prompts_per_call]
            results = engine.generate([GenerationRequest(prompt_token_ids=p.token_ids,
                                                         params=prompt_sampling(settings, p.index, seed))
                                       for p in chunk])
            if not grades_here:
                continue
            texts = [c.text or "" for r in results for c in r.completions]
            truths = [str(ground_truth(p.index)) for p, r in zip(chunk, results) for _ in r.completions]
            scored = pool.score(texts, truths)
            reward_failures += len(scored.failure_messages)
            offset = 0
            for p, r in zip(chunk, results):
                m = len(r.completions)
                if m != settings.n:
                    raise RuntimeError(f"engine returned {m} completions for prompt {p.index}, asked for {settings.n}")
                graded.append(GradedPrompt(prompt=p, completions=r.completions,
                                           scores=scored.scores[offset : offset + m],
                                           predictions=scored.predictions[offset : offset + m]))
                offset += m
            logger.info("%s %d: %d / %d prompts", label, rank, start + len(chunk), len(mine))
    finally:
        if own_pool:
            pool.close()
    return graded, reward_failures


def gather_on_rank0(obj: Any, rank: int, world: int, group=None) -> list[Any] | None:
    """Every rank's `obj` in rank order on rank 0 of `group` (None elsewhere; `group` None: the
    default group); no collective at world 1."""
    if world == 1:
        return [obj]
    import torch.distributed as dist

    gathered = [None] * world if rank == 0 else None
    dist.gather_object(obj, gathered, group=group, group_dst=0)
    return gathered
