"""Evaluation of a policy the way papers report it: accuracy, pass@k and maj@k.

For every prompt of a dataset the engine samples n responses; each is graded by the configured
reward (the binary math reward by default) and the per-prompt grades give

    accuracy (avg@n) = mean over prompts and samples of correct
    pass@k           = mean over prompts of 1 - C(n - c, k) / C(n, k)      (Chen et al. 2021)
    maj@k            = share of prompts whose majority answer among the first k samples is
                       correct (answers compared after `normalize_answer`; SPO reports maj@32)

(formulas and tie rules in `megatron_spo.training.eval_metrics`), overall and per value of the
`group_by` record fields (`data_source`, `difficulty`) when records carry them. A response is
correct when its score reaches `correct_min_score` (1.0: full marks of the binary reward).

`evaluate` is the one implementation: the trainer's periodic evaluation calls it (through
`evaluate_policy`, with the run's settings) with the engine it already holds (weights synced),
`megatron-spo eval` (`eval_cli`) with an engine it loads. Its sampling and grading pass is
`rollout.graded_sampling`, shared with `megatron-spo values estimate`. Under
torchrun the prompts are split over rollout groups (`rollout.placement`: a vLLM engine per
`tensor_parallel_size` consecutive ranks, whose ranks all see the group's prompts and whose first
rank scores them; otherwise one engine per rank, `prompts[rank::world]`) and rank 0 gathers the
grades; response j of prompt i is sampled with seed `seed + i * n + j`, so with the `hf` engine the
numbers do not depend on the number of ranks.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from megatron_spo.errors import UserError
from megatron_spo.rollout.graded_sampling import (
    check_sampling_settings,
    gather_on_rank0,
    prompt_sampling,
    sample_and_grade,
)
from megatron_spo.rollout.placement import RolloutPlacement
from megatron_spo.rollout.prompts import PromptConfig, build_prompts
from megatron_spo.rollout.records import field, prompt_and_answer_fields
from megatron_spo.rollout.rewards import RewardConfig, normalize_answer
from megatron_spo.rollout.types import RolloutEngine, SamplingParams
from megatron_spo.training.eval_metrics import default_ks, summarize

if TYPE_CHECKING:
    from megatron_spo.platform import ParallelContext
    from megatron_spo.training.config import TrainConfig


@dataclasses.dataclass(kw_only=True)
class EvalConfig:
    """How a policy is evaluated: sampling, the metrics, and which record fields to read. How a
    prompt becomes tokens (`PromptConfig`) is not here: it must match training (`data.prompt`), so
    the caller passes it."""

    n: int = 32
    """Samples per prompt; accuracy is avg@n and pass@k / maj@k use them (32: the SPO paper
    reports maj@32)."""
    temperature: float = 0.6
    """Sampling temperature (the authors' evaluation setting for Qwen3)."""
    top_p: float = 0.95
    """Nucleus mass (the authors')."""
    top_k: int = 20
    """Top-k (the authors'); -1 disables it."""
    max_response_tokens: int = 16384
    """New tokens per response at most (the authors' 16k); the engine's context caps it further."""
    ks: list[int] | None = None
    """k values of pass@k and maj@k; None = 1, 2, 4, ... up to n, plus n."""
    correct_min_score: float = 1.0
    """A response counts as correct when its score is at least this (1.0: full marks of the
    binary math reward, which scores 1 or 0)."""
    group_by: tuple[str, ...] = ("data_source", "difficulty")
    """Record fields whose values get their own metrics when present."""
    prompts_per_call: int = 64
    """Prompts per engine.generate call (progress is logged between calls)."""
    prompt_key: str | None = None
    """Record field of the prompt (string or chat messages), dots reach into dicts; None tries
    prompt, question, problem. Evaluation sets often name it differently from the training data."""
    answer_key: str | None = None
    """Record field of the ground truth, dots reach into dicts; None tries
    reward_model.ground_truth, ground_truth, answer, solution."""

    def __post_init__(self):
        check_sampling_settings(self, prefix="eval ")
        if self.ks is not None and any(not 1 <= k <= self.n for k in self.ks):
            raise UserError(f"eval ks {self.ks}: every k must be within 1..n={self.n}")
        if not 0 < self.top_p <= 1 or self.temperature < 0:
            raise UserError(f"eval needs temperature >= 0 and top_p in (0, 1], got {self.temperature}, {self.top_p}")

    def sampling(self, prompt_index: int, seed: int = 0) -> SamplingParams:
        """The n samples of prompt `prompt_index`: response j gets seed `seed + prompt_index * n + j`."""
        return prompt_sampling(self, prompt_index, seed)


def evaluate(
    engine: RolloutEngine,
    tokenizer,
    records: Sequence[dict[str, Any]],
    config: EvalConfig,
    *,
    prompt: PromptConfig | None = None,
    seed: int = 0,
    reward: RewardConfig | None = None,
    pool=None,
    rank: int = 0,
    world_size: int = 1,
    group=None,
    rollout_tp: int = 1,
    default_source: str = "data",
) -> dict[str, Any]:
    """Generate `config.n` responses per record, grade them and return the metrics (rank 0; {}
    elsewhere).

    `records` are the whole dataset on every rank; `prompt` builds their token ids (None: the
    `PromptConfig` defaults; the trainer passes `data.prompt`). Response j of prompt i is sampled
    with seed `seed + i * n + j`. The prompts are split over rollout groups of `rollout_tp`
    consecutive ranks (`rollout.placement`; 1 = every rank its own engine), every rank of a group
    sends its engine the same prompts and the group's leader scores them. `group` is the process
    group of all `world_size` ranks (None: the default group). Pass a `pool` (a `ScoringPool`) to
    reuse the caller's scoring workers (it stays open); otherwise one is made from `reward` and
    closed here. `default_source` names the records in messages.

    Returns {"num_prompts", "samples_per_prompt", "prompts_skipped_overlong", "prompts_truncated",
    "reward_failures", "overall": {"accuracy", "pass@k"..., "maj@k"...},
    "by_<field>": {value: {"num_prompts", metrics...}},
    "prompts": [{"index", "scores", "predictions", "ground_truth", <group fields>}]}.
    """
    prompt = prompt if prompt is not None else PromptConfig()
    if not records:
        raise UserError("eval: no records to evaluate")
    prompt_field, answer_field = prompt_and_answer_fields(records, config.prompt_key, config.answer_key,
                                                          default_source)
    batch = build_prompts([field(r, prompt_field) for r in records], tokenizer, prompt)
    placement = RolloutPlacement.build(world_size, rollout_tp, spmd=getattr(engine, "spmd", False),
                                       key="tensor_parallel_size")
    graded, reward_failures = sample_and_grade(
        engine, batch.prompts, config, lambda i: field(records[i], answer_field), placement=placement, rank=rank,
        seed=seed, reward=reward, pool=pool, label="eval rank",
    )
    rows = [{"index": g.prompt.index, "scores": g.scores, "predictions": g.predictions} for g in graded]
    parts = gather_on_rank0((rows, reward_failures), rank, world_size, group)
    if rank != 0:
        return {}
    rows = sorted((row for part, _ in parts for row in part), key=lambda row: row["index"])
    if not rows:
        raise UserError(f"{default_source}: every prompt is longer than prompt.max_prompt_tokens="
                        f"{prompt.max_prompt_tokens}; nothing to evaluate")
    for row in rows:
        record = records[row["index"]]
        row["ground_truth"] = field(record, answer_field)
        row.update({name: record[name] for name in config.group_by if record.get(name) is not None})
    return {
        "num_prompts": len(rows),
        "samples_per_prompt": config.n,
        "prompts_skipped_overlong": len(batch.skipped),
        "prompts_truncated": batch.num_truncated,
        "reward_failures": sum(failures for _, failures in parts),
        "overall": _metrics(rows, config),
        **_metrics_by_group(rows, config),
        "prompts": rows,
    }


def _metrics(rows: list[dict[str, Any]], config: EvalConfig) -> dict[str, float]:
    """accuracy, pass@k and maj@k over graded prompt rows."""
    correct = [[s >= config.correct_min_score for s in row["scores"]] for row in rows]
    ks = config.ks if config.ks is not None else default_ks(config.n)
    summary = summarize([row["predictions"] for row in rows], correct, ks, key=_vote_key)
    return {"accuracy": summary.accuracy, **{f"pass@{k}": v for k, v in summary.pass_at.items()},
            **{f"maj@{k}": v for k, v in summary.maj_at.items()}}


def _metrics_by_group(rows: list[dict[str, Any]], config: EvalConfig) -> dict[str, dict[str, dict[str, float]]]:
    """{"by_<field>": {value: {"num_prompts", metrics...}}} for each `group_by` field some row has."""
    out = {}
    for name in config.group_by:
        values = sorted({str(row[name]) for row in rows if name in row}, key=_natural_order)
        if values:
            out[f"by_{name}"] = {
                v: {"num_prompts": len(group), **_metrics(group, config)}
                for v in values
                for group in [[row for row in rows if name in row and str(row[name]) == v]]
            }
    return out


def evaluate_policy(engine: RolloutEngine, tokenizer, records: Sequence[dict[str, Any]], config: TrainConfig, *,
                    pool=None, parallel: ParallelContext) -> dict[str, float]:
    """The trainer's periodic evaluation: `evaluate` with the run's settings (`config.eval_config()`,
    prompts built as `data.prompt`, seeds from `seed`, generation split over the rollout groups of
    `rollout.engine.tensor_parallel_size` ranks). The engine must hold the current weights.
    Returns {"eval/accuracy", "eval/pass@k", "eval/maj@k", ...}, the same on every rank."""
    result = evaluate(engine, tokenizer, records, config.eval_config(), prompt=config.data.prompt, seed=config.seed,
                      reward=config.rollout.reward, pool=pool, rank=parallel.rank, world_size=parallel.world_size,
                      group=parallel.host_group, rollout_tp=config.rollout.engine.tensor_parallel_size)
    metrics = [{f"eval/{k}": float(v) for k, v in result.get("overall", {}).items()}]
    if parallel.world_size > 1:  # rank 0 gathered the grades; every rank reports the same metrics
        import torch.distributed as dist

        dist.broadcast_object_list(metrics, src=0, group=parallel.host_group)
    return metrics[0]


def _natural_order(value: str) -> tuple[int, float, str]:
    """Numbers first, by value (difficulty 2 before 10), then the rest alphabetically."""
    try:
        return (0, float(value), value)
    except ValueError:
        return (1, 0.0, value)


def _vote_key(answer: Any) -> str:
    # "\frac{1}{2}" and "\dfrac{1}{2}", " 5" and "5" are the same vote
    return normalize_answer(str(answer))


def format_table(result: dict[str, Any]) -> str:
    """The metrics as a small fixed-width table: one row overall, one per group value."""
    columns = list(result["overall"])
    rows = [("overall", result["num_prompts"], result["overall"])]
    for key, groups in result.items():
        if key.startswith("by_"):
            rows += [(f"{key[3:]}={value}", g["num_prompts"], g) for value, g in groups.items()]
    width = max(12, *(len(name) for name, _, _ in rows))
    lines = [f"{'':<{width}} {'prompts':>7} " + " ".join(f"{c:>9}" for c in columns)]
    for name, count, metrics in rows:
        lines.append(f"{name:<{width}} {count:>7} " + " ".join(f"{metrics[c]:>9.4f}" for c in columns))
    return "\n".join(lines)
