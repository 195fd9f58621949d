"""`megatron-spo eval`: accuracy, pass@k and maj@k of a Hugging Face model, the way papers report.

For every prompt of a dataset the model samples n responses (default 32 at the authors'
evaluation settings: temperature 0.6, top-p 0.95, top-k 20); each is graded by the configured
reward (the binary math reward by default) and the per-prompt grades give

    accuracy (avg@n) = mean over prompts and samples of correct
    pass@k           = mean over prompts of 1 - C(n - c, k) / C(n, k)      (Chen et al. 2021)
    maj@k            = share of prompts whose majority answer among the first k samples is
                       correct (answers compared after `normalize_answer`; SPO reports maj@32)

(formulas and tie rules in `megatron_spo.training.eval_metrics`), overall and per value of the
`data_source` and `difficulty` fields when records carry them. A response is correct when its
score reaches `correct_min_score` (1.0: full marks of the binary reward).

Two entry points share one implementation:
- `evaluate(engine, tokenizer, records, settings, ...)`: the trainer's periodic evaluation with
  an engine it already holds (weights synced), records already loaded;
- `main(argv)`: the CLI, which loads a model into a fresh engine, reads the dataset, prints a
  table and writes the result JSON atomically.

Under torchrun the prompts are split over rollout groups (`rollout.placement`: with
`--tensor-parallel-size R` a vLLM engine per R consecutive ranks, whose ranks all see the group's
prompts and whose first rank scores them; otherwise one engine per rank, `prompts[rank::world]`)
and rank 0 gathers the grades; response j of prompt i is sampled with seed `seed + i * n + j`, so
with the `hf` engine the numbers do not depend on the number of ranks.
Dataset reading and field lookup are `megatron_spo.rollout.estimate`'s, so `values estimate` and
`eval` accept the same files.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from megatron_spo import atomic
from megatron_spo.errors import UserError
from megatron_spo.rollout.records import ANSWER_KEYS, PROMPT_KEYS, field, init_ranks, load_records, pick_field
from megatron_spo.rollout.cli_options import add_generation_options
from megatron_spo.rollout.placement import RolloutPlacement
from megatron_spo.rollout.prompts import PromptConfig, build_prompts
from megatron_spo.rollout.rewards import RewardConfig, normalize_answer
from megatron_spo.rollout.scoring import ScoringPool
from megatron_spo.rollout.types import GenerationRequest, RolloutEngine, SamplingParams
from megatron_spo.training.eval_metrics import EvalSummary, default_ks, summarize

logger = logging.getLogger(__name__)


@dataclasses.dataclass(kw_only=True)
class EvalSettings:
    n: int = 32
    """Samples per prompt; accuracy is avg@n and pass@k / maj@k use them (32: the SPO paper
    reports maj@32)."""
    temperature: float = 0.6
    """Sampling temperature (the authors' evaluation setting for Qwen3)."""
    top_p: float = 0.95
    """Nucleus mass (the authors')."""
    top_k: int = 20
    """Top-k (the authors'); -1 disables it."""
    max_tokens: int = 16384
    """New tokens per response at most (the authors' 16k); the engine's context caps it further."""
    seed: int = 0
    """Base seed: response j of prompt i is sampled with seed + i * n + j."""
    ks: list[int] | None = None
    """k values of pass@k and maj@k; None = 1, 2, 4, ... up to n, plus n."""
    correct_min_score: float = 1.0
    """A response counts as correct when its score is at least this (1.0: full marks of the
    binary math reward, which scores 1 or 0)."""
    prompt_key: str | None = None
    """Record field of the prompt (string or chat messages); None tries prompt, question, problem."""
    answer_key: str | None = None
    """Record field of the ground truth, dots reach into dicts; None tries
    reward_model.ground_truth, ground_truth, answer, solution."""
    group_by: tuple[str, ...] = ("data_source", "difficulty")
    """Record fields whose values get their own metrics when present."""
    prompts_per_call: int = 64
    """Prompts per engine.generate call (progress is logged between calls)."""
    prompt: PromptConfig = dataclasses.field(default_factory=PromptConfig)
    """Chat template, answer-format suffix, prompt length limit: as in training, so the model is
    evaluated on the prompts it learns from."""

    def __post_init__(self):
        if self.n < 1:
            raise UserError(f"eval n must be >= 1, got {self.n}")
        if self.max_tokens < 1:
            raise UserError(f"eval max_tokens must be >= 1, got {self.max_tokens}")
        if self.prompts_per_call < 1:
            raise UserError(f"eval prompts_per_call must be >= 1, got {self.prompts_per_call}")
        if self.ks is not None and any(not 1 <= k <= self.n for k in self.ks):
            raise UserError(f"eval ks {self.ks}: every k must be within 1..n={self.n}")

    def sampling(self, prompt_index: int) -> SamplingParams:
        return SamplingParams(
            n=self.n,
            temperature=self.temperature,
            top_p=self.top_p,
            top_k=self.top_k,
            max_tokens=self.max_tokens,
            seed=self.seed + prompt_index * self.n,
        )


# ----------------------------------------------------------------------------- evaluate()


def _gather_on_rank0(obj: Any, rank: int, world: int, group) -> list[Any] | None:
    """Every rank's `obj` in rank order on rank 0 of `group` (None elsewhere); no-op at world 1."""
    if world == 1:
        return [obj]
    import torch.distributed as dist

    gathered = [None] * world if rank == 0 else None
    dist.gather_object(obj, gathered, group=group, group_dst=0)
    return gathered


def _metrics_table(summary: EvalSummary) -> dict[str, float]:
    return {"accuracy": summary.accuracy, **{f"pass@{k}": v for k, v in summary.pass_at.items()},
            **{f"maj@{k}": v for k, v in summary.maj_at.items()}}


def evaluate(
    engine: RolloutEngine,
    tokenizer,
    records: Sequence[dict[str, Any]],
    settings: EvalSettings,
    *,
    reward: RewardConfig | None = None,
    pool: ScoringPool | None = None,
    rank: int = 0,
    world_size: int = 1,
    group=None,
    rollout_tp: int = 1,
    default_source: str = "data",
) -> dict[str, Any]:
    """Generate n responses per record, grade them and return the metrics (rank 0; {} elsewhere).

    `records` are the whole dataset on every rank. The prompts are split over rollout groups of
    `rollout_tp` consecutive ranks (`rollout.placement`; 1 = every rank its own engine), every
    rank of a group sends its engine the same prompts and the group's leader scores them. `group`
    is the process group of all `world_size` ranks (None: the default group). Pass a `pool` to
    reuse the caller's scoring workers (it stays open); otherwise one is made from `reward` and
    closed here.

    Returns {"num_prompts", "samples_per_prompt", "prompts_skipped_overlong", "overall":
    {"accuracy", "pass@k"..., "maj@k"...}, "by_<field>": {value: {"num_prompts", metrics...}},
    "prompts": [{"index", "ground_truth", "scores", "predictions", <group fields>}],
    "reward_failures"}.
    """
    if not records:
        raise UserError("eval: no records to evaluate")
    prompt_field = pick_field(list(records), settings.prompt_key, PROMPT_KEYS, "prompt", default_source)
    answer_field = pick_field(list(records), settings.answer_key, ANSWER_KEYS, "answer", default_source)
    for i, record in enumerate(records):
        if field(record, prompt_field) is None:
            raise UserError(f"{default_source}: record {i} has no {prompt_field!r}")
        if field(record, answer_field) is None:
            raise UserError(f"{default_source}: record {i} has no {answer_field!r}")

    batch = build_prompts([field(r, prompt_field) for r in records], tokenizer, settings.prompt)
    placement = RolloutPlacement.build(world_size, rollout_tp, spmd=getattr(engine, "spmd", False),
                                       key="tensor_parallel_size")
    mine = [batch.prompts[i] for i in placement.plan([None] * len(batch.prompts), rank).generate]
    scores_here = rank == placement.leader(placement.group_of(rank))  # a group's ranks all hold its samples
    own_pool = pool is None and scores_here
    if own_pool:
        pool = ScoringPool(reward or RewardConfig())

    graded: list[dict[str, Any]] = []  # this rank's prompts: index, scores, predictions
    reward_failures = 0
    for start in range(0, len(mine), settings.prompts_per_call):
        chunk = mine[start : start + settings.prompts_per_call]
        results = engine.generate(
            [GenerationRequest(prompt_token_ids=p.token_ids, params=settings.sampling(p.index)) for p in chunk]
        )
        if not scores_here:
            continue
        texts = [c.text or "" for r in results for c in r.completions]
        truths = [str(field(records[p.index], answer_field)) for p, r in zip(chunk, results) for _ in r.completions]
        scored = pool.score(texts, truths)
        reward_failures += len(scored.failure_messages)
        offset = 0
        for p, r in zip(chunk, results):
            m = len(r.completions)
            if m != settings.n:
                raise RuntimeError(f"engine returned {m} completions for prompt {p.index}, asked for {settings.n}")
            graded.append({"index": p.index, "scores": scored.scores[offset : offset + m],
                           "predictions": scored.predictions[offset : offset + m]})
            offset += m
        logger.info("eval rank %d: %d / %d prompts", rank, start + len(chunk), len(mine))
    if own_pool:
        pool.close()

    parts = _gather_on_rank0((graded, reward_failures), rank, world_size, group)
    if rank != 0:
        return {}
    graded = [g for part, _ in parts for g in part]
    reward_failures = sum(failures for _, failures in parts)
    graded.sort(key=lambda g: g["index"])
    if not graded:
        raise UserError(f"{default_source}: every prompt is longer than prompt.max_prompt_tokens="
                        f"{settings.prompt.max_prompt_tokens}; nothing to evaluate")

    for g in graded:
        record = records[g["index"]]
        g["ground_truth"] = field(record, answer_field)
        for group in settings.group_by:
            if record.get(group) is not None:
                g[group] = record[group]

    def summary_of(rows: list[dict[str, Any]]) -> dict[str, float]:
        correct = [[s >= settings.correct_min_score for s in g["scores"]] for g in rows]
        ks = settings.ks if settings.ks is not None else default_ks(settings.n)
        return _metrics_table(summarize([g["predictions"] for g in rows], correct, ks, key=_vote_key))

    out: dict[str, Any] = {
        "num_prompts": len(graded),
        "samples_per_prompt": settings.n,
        "prompts_skipped_overlong": len(batch.skipped),
        "prompts_truncated": batch.num_truncated,
        "reward_failures": reward_failures,
        "overall": summary_of(graded),
    }
    for group in settings.group_by:
        values = sorted({str(g[group]) for g in graded if group in g}, key=_natural_order)
        if values:
            out[f"by_{group}"] = {
                v: {"num_prompts": len(rows), **summary_of(rows)}
                for v in values
                for rows in [[g for g in graded if group in g and str(g[group]) == v]]
            }
    out["prompts"] = graded
    return out


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


# ----------------------------------------------------------------------------- CLI


def _comma_separated_ints(text: str) -> list[int]:
    try:
        return [int(k) for k in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers like 1,8,32, got {text!r}") from None


def build_parser() -> argparse.ArgumentParser:
    defaults = EvalSettings()
    parser = argparse.ArgumentParser(
        prog="megatron-spo eval",
        description=(
            "Sample N responses per prompt from a Hugging Face model, grade them and report "
            "accuracy (avg@N), pass@k and maj@k overall and per data_source / difficulty. "
            "Runs under torchrun with the prompts split over ranks; rank 0 prints and writes."
        ),
        epilog=(
            "example: megatron-spo eval --model runs/spo/hf --data aime24.parquet --n 32 "
            "--engine vllm --out runs/spo/eval_aime24.json"
        ),
    )
    parser.add_argument("--model", required=True, help="Hugging Face model directory (weights + tokenizer)")
    parser.add_argument("--data", required=True, help="dataset file (.jsonl, .json, .parquet)")
    add_generation_options(parser, n=defaults.n, n_help="samples per prompt", temperature=defaults.temperature,
                           top_p=defaults.top_p, top_k=defaults.top_k, max_tokens=defaults.max_tokens,
                           seed=defaults.seed, prompts_per_call=defaults.prompts_per_call)
    parser.add_argument("--ks", type=_comma_separated_ints, default=None,
                        help="comma-separated k of pass@k / maj@k (default 1,2,4,...,N)")
    parser.add_argument("--out", default=None, help="write the result JSON here (atomically)")
    parser.add_argument("--correct-min-score", type=float, default=defaults.correct_min_score,
                        help="a response is correct when its score is at least this (default %(default)s)")
    parser.add_argument("--max-model-len", type=int, default=None,
                        help="prompt + response tokens (default: the model's)")
    return parser


def main(argv: list[str]) -> int:
    from megatron_spo.rollout.engine import EngineConfig, make_engine

    args = build_parser().parse_args(argv)
    # progress lines from megatron-spo only: Megatron's import-time INFO chatter is noise here
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger("megatron_spo").setLevel(logging.INFO)
    started = time.perf_counter()
    if not Path(args.data).is_file():
        raise UserError(f"--data: {args.data} is not a file")
    settings = EvalSettings(
        n=args.n, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
        max_tokens=args.max_tokens, seed=args.seed, ks=args.ks, correct_min_score=args.correct_min_score,
        prompt_key=args.prompt_key, answer_key=args.answer_key, prompts_per_call=args.prompts_per_call,
        prompt=PromptConfig(answer_format_suffix=args.answer_suffix, use_chat_template=args.chat_template,
                            max_prompt_tokens=args.max_prompt_tokens, overlong=args.overlong),
    )
    reward = RewardConfig(function=args.reward_function, pool=args.reward_pool, thinking=args.thinking)
    engine_config = EngineConfig(
        model=args.model, name=args.engine, dtype=args.dtype, seed=args.seed, max_num_seqs=args.max_num_seqs,
        max_model_len=args.max_model_len, tensor_parallel_size=args.tensor_parallel_size,
    )
    records = load_records(args.data)  # before the engine: a bad file fails in a second
    if not records:
        raise UserError(f"--data: {args.data} holds no records")
    rank, world = init_ranks()
    rollout_tp = args.tensor_parallel_size if args.engine == "vllm" else 1
    RolloutPlacement.build(world, rollout_tp, key="--tensor-parallel-size")  # refuse a bad size before the engine
    engine = make_engine(engine_config)
    try:
        tokenizer = getattr(engine, "tokenizer", None)
        if tokenizer is None:
            raise UserError(f"--model: {args.model} has no tokenizer; prompts need one")
        result = evaluate(engine, tokenizer, records, settings, reward=reward, rank=rank, world_size=world,
                          rollout_tp=rollout_tp, default_source=args.data)
    finally:
        engine.shutdown()  # after the gather: vLLM's shutdown also tears down the default group
    if rank != 0:
        return 0
    result = {
        "model": str(args.model), "data": str(args.data), "engine": args.engine, "ranks": world,
        "sampling": {"n": settings.n, "temperature": settings.temperature, "top_p": settings.top_p,
                     "top_k": settings.top_k, "max_tokens": settings.max_tokens, "seed": settings.seed},
        "reward_function": reward.function,
        **result,
        "seconds": round(time.perf_counter() - started, 3),
    }
    print(format_table(result))
    if result["prompts_skipped_overlong"]:
        print(f"note: {result['prompts_skipped_overlong']} prompts longer than --max-prompt-tokens="
              f"{args.max_prompt_tokens} were skipped and are not in the metrics")
    if args.out:
        atomic.write_json(args.out, result)
        print(f"wrote {args.out}")
    return 0
