"""`megatron-spo values estimate`: offline value estimation (SPO's preprocessing step).

Samples `n` responses per prompt of a dataset with a pretrained model, scores each against the
prompt's ground truth and writes one record per response to `OUTPUT_DIR/validation_data/0.jsonl`,
the layout of the authors' verl pipeline (seed 000) that `megatron-spo values merge` reads:

    {"input": <prompt as the model saw it, special tokens dropped>, "output": <response text>,
     "score": <float>, "pred": <extracted answer>, "ground_truth": ..., "data_source": ...,
     "prompt": <raw user prompt>, "prompt_index": i, "sample_index": j,
     "finish_reason": "stop" | "length", "step": 0}

Sampling defaults are the authors' (temperature 0.6, top_p 0.95, top_k 20, n 8). Response j of
prompt i is sampled with seed `seed + i * n + j`, so with the `hf` engine the file is the same
whatever the number of ranks.

Under torchrun the prompts are split over ranks (`prompts[rank::world]`) and rank 0 gathers and
writes the file; with `--engine vllm --tensor-parallel-size WORLD` every rank runs the same
sharded engine on all prompts instead. Prompts over the length limit are skipped and counted (or
truncated, `--overlong truncate`); the counts go to `OUTPUT_DIR/estimate_summary.json`.

Scoring: the configured reward function (`megatron_spo.rollout.rewards`, the authors' binary
math reward by default) in a `ScoringPool` (worker processes with a per-response time limit).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import time
from pathlib import Path
from typing import Any

from megatron_spo.errors import UserError
from megatron_spo.rollout.engine import EngineConfig, make_engine
from megatron_spo.rollout.placement import RolloutPlacement
from megatron_spo.rollout.cli_options import add_generation_options
from megatron_spo.rollout.prompts import PromptConfig, build_prompts
from megatron_spo.rollout.records import (
    ANSWER_KEYS,
    PROMPT_KEYS,
    field,
    init_ranks,
    load_records,
    pick_field,
    raw_user_prompt,
)
from megatron_spo.rollout.rewards import RewardConfig
from megatron_spo.rollout.scoring import ScoringPool
from megatron_spo.rollout.types import GenerationRequest, SamplingParams

logger = logging.getLogger(__name__)



@dataclasses.dataclass(kw_only=True)
class EstimateConfig:
    data: str
    """Dataset file: .jsonl, .json (a list of records) or .parquet."""
    output_dir: str
    """Run directory; results go to OUTPUT_DIR/validation_data/0.jsonl."""
    engine: EngineConfig
    prompt: PromptConfig = dataclasses.field(default_factory=PromptConfig)
    reward: RewardConfig = dataclasses.field(default_factory=RewardConfig)
    n: int = 8
    """Responses per prompt; the authors merge 8 scores per prompt (offline_n)."""
    temperature: float = 0.6
    """The authors' sampling temperature for Qwen3 (seed 000 eval settings)."""
    top_p: float = 0.95
    """The authors' nucleus mass."""
    top_k: int = 20
    """The authors' top-k."""
    max_tokens: int = 16384
    """Response length cap in tokens: the authors' 16k response length; the model's context
    length caps it further."""
    seed: int = 0
    """Base seed: response j of prompt i uses seed + i * n + j."""
    prompts_per_call: int = 64
    """Prompts handed to the engine per generate call (progress is logged between calls)."""
    prompt_key: str | None = None
    """Record field holding the prompt (a string or chat messages); None tries
    prompt, question, problem."""
    answer_key: str | None = None
    """Record field holding the ground truth (dots reach into dicts); None tries
    reward_model.ground_truth, ground_truth, answer, solution."""

    def __post_init__(self):
        if self.n < 1:
            raise UserError(f"--n must be >= 1, got {self.n}")
        if self.prompts_per_call < 1:
            raise UserError(f"--prompts-per-call must be >= 1, got {self.prompts_per_call}")
        if not Path(self.data).is_file():
            raise UserError(f"--data: {self.data} is not a file")


# ----------------------------------------------------------------------------- the run


@dataclasses.dataclass(kw_only=True)
class _Job:
    index: int
    prompt_text: str
    token_ids: list[int]
    raw_prompt: str
    ground_truth: Any
    data_source: str


def run(config: EstimateConfig) -> dict[str, Any]:
    """Run the estimate; rank 0 writes the files and returns the summary (other ranks: {})."""
    started = time.perf_counter()
    rank, world = init_ranks()
    records = load_records(config.data)
    if not records:
        raise UserError(f"--data: {config.data} holds no records")
    prompt_field = pick_field(records, config.prompt_key, PROMPT_KEYS, "prompt", config.data)
    answer_field = pick_field(records, config.answer_key, ANSWER_KEYS, "answer", config.data)
    for i, record in enumerate(records):
        if field(record, prompt_field) is None:
            raise UserError(f"{config.data}: record {i} has no {prompt_field!r}")
        if field(record, answer_field) is None:
            raise UserError(f"{config.data}: record {i} has no {answer_field!r}")

    rollout_tp = config.engine.tensor_parallel_size if config.engine.name == "vllm" else 1
    placement = RolloutPlacement.build(world, rollout_tp, key="--tensor-parallel-size")  # before the engine
    engine = make_engine(config.engine)
    placement = dataclasses.replace(placement, spmd=getattr(engine, "spmd", False))
    tokenizer = getattr(engine, "tokenizer", None)
    if tokenizer is None:
        raise UserError(f"--model: {config.engine.model} has no tokenizer; prompts need one")
    batch = build_prompts([field(r, prompt_field) for r in records], tokenizer, config.prompt)
    default_source = Path(config.data).stem
    jobs = [
        _Job(
            index=p.index,
            prompt_text=tokenizer.decode(p.token_ids, skip_special_tokens=True),
            token_ids=p.token_ids,
            raw_prompt=raw_user_prompt(field(records[p.index], prompt_field)),
            ground_truth=field(records[p.index], answer_field),
            data_source=str(records[p.index].get("data_source", default_source)),
        )
        for p in batch.prompts
    ]
    # prompts split over rollout groups (one engine per R consecutive ranks, `rollout.placement`);
    # the ranks of a group all get its samples: the group's leader alone scores them
    my_jobs = [jobs[i] for i in placement.plan([None] * len(jobs), rank).generate]
    scores_here = rank == placement.leader(placement.group_of(rank))
    pool = ScoringPool(config.reward) if scores_here else None
    reward_failures = 0

    my_records = []
    for start in range(0, len(my_jobs), config.prompts_per_call):
        chunk = my_jobs[start : start + config.prompts_per_call]
        requests = [
            GenerationRequest(
                prompt_token_ids=job.token_ids,
                params=SamplingParams(
                    n=config.n,
                    temperature=config.temperature,
                    top_p=config.top_p,
                    top_k=config.top_k,
                    max_tokens=config.max_tokens,
                    seed=config.seed + job.index * config.n,
                ),
            )
            for job in chunk
        ]
        samples = [
            (job, j, completion)
            for job, result in zip(chunk, engine.generate(requests))
            for j, completion in enumerate(result.completions)
        ]
        if not scores_here:
            continue
        scored = pool.score([c.text or "" for _, _, c in samples], [str(job.ground_truth) for job, _, _ in samples])
        reward_failures += len(scored.failure_messages)
        for (job, j, completion), score, pred in zip(samples, scored.scores, scored.predictions):
            my_records.append(
                {
                    "input": job.prompt_text,
                    "output": completion.text or "",
                    "score": score,
                    "pred": pred,
                    "ground_truth": job.ground_truth,
                    "data_source": job.data_source,
                    "prompt": job.raw_prompt,
                    "prompt_index": job.index,
                    "sample_index": j,
                    "finish_reason": completion.finish_reason,
                    "step": 0,
                }
            )
        logger.info("rank %d: %d / %d prompts done", rank, start + len(chunk), len(my_jobs))
    if pool is not None:
        pool.close()

    all_records = my_records
    if world > 1:
        import torch.distributed as dist

        gathered = [None] * world if rank == 0 else None
        dist.gather_object((my_records, reward_failures), gathered, dst=0)
        if rank == 0:
            all_records = [r for part, _ in gathered for r in part]
            reward_failures = sum(failures for _, failures in gathered)
    # only now: vLLM's shutdown also tears down torch.distributed's default group
    engine.shutdown()
    if rank != 0:
        return {}
    all_records.sort(key=lambda r: (r["prompt_index"], r["sample_index"]))
    out_dir = Path(config.output_dir)
    _write_jsonl(out_dir / "validation_data" / "0.jsonl", all_records)
    scores = [r["score"] for r in all_records]
    summary = {
        "data": str(config.data),
        "model": str(config.engine.model),
        "engine": config.engine.name,
        "ranks": world,
        "reward_function": config.reward.function,
        "reward_failures": reward_failures,
        "prompts_in_file": len(records),
        "prompts_estimated": len(jobs),
        "prompts_skipped_overlong": len(batch.skipped),
        "skipped_indices": batch.skipped,
        "prompts_truncated": batch.num_truncated,
        "responses": len(all_records),
        "responses_per_prompt": config.n,
        "mean_score": sum(scores) / len(scores) if scores else None,
        "finished_by_length": sum(r["finish_reason"] == "length" for r in all_records),
        "seconds": round(time.perf_counter() - started, 3),
    }
    _write_json(out_dir / "estimate_summary.json", summary)
    return summary


def _write_jsonl(path: Path, records: list[dict[str, Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as fh:
        for record in records:
            fh.write(json.dumps(record, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


def _write_json(path: Path, obj: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as fh:
        json.dump(obj, fh, indent=2)
    os.replace(tmp, path)


# ----------------------------------------------------------------------------- CLI


def build_parser() -> argparse.ArgumentParser:
    defaults = {f.name: f.default for f in dataclasses.fields(EstimateConfig) if f.default is not dataclasses.MISSING}
    parser = argparse.ArgumentParser(
        prog="megatron-spo values estimate",
        description=(
            "Sample N responses per prompt with a pretrained model, score them against the ground "
            "truth and write OUTPUT_DIR/validation_data/0.jsonl (the input of `values merge`). "
            "Runs under torchrun with the prompts split over ranks."
        ),
        epilog=(
            "example: megatron-spo values estimate --data subset_0.parquet --model Qwen3-8B "
            "--n 8 --output-dir runs/offline/subset_0 --engine vllm"
        ),
    )
    parser.add_argument("--data", required=True, help="dataset file (.jsonl, .json, .parquet)")
    parser.add_argument("--model", required=True, help="Hugging Face model directory")
    parser.add_argument("--output-dir", required=True, help="writes validation_data/0.jsonl and estimate_summary.json here")
    add_generation_options(parser, n=defaults["n"], n_help="responses per prompt", n_aliases=("--responses-per-prompt",),
                           temperature=defaults["temperature"], top_p=defaults["top_p"], top_k=defaults["top_k"],
                           max_tokens=defaults["max_tokens"], seed=defaults["seed"],
                           prompts_per_call=defaults["prompts_per_call"])
    return parser


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    config = EstimateConfig(
        data=args.data,
        output_dir=args.output_dir,
        engine=EngineConfig(
            model=args.model,
            name=args.engine,
            dtype=args.dtype,
            seed=args.seed,
            max_num_seqs=args.max_num_seqs,
            tensor_parallel_size=args.tensor_parallel_size,
        ),
        prompt=PromptConfig(
            answer_format_suffix=args.answer_suffix,
            use_chat_template=args.chat_template,
            max_prompt_tokens=args.max_prompt_tokens,
            overlong=args.overlong,
        ),
        reward=RewardConfig(function=args.reward_function, pool=args.reward_pool, thinking=args.thinking),
        n=args.n,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        max_tokens=args.max_tokens,
        seed=args.seed,
        prompts_per_call=args.prompts_per_call,
        prompt_key=args.prompt_key,
        answer_key=args.answer_key,
    )
    summary = run(config)
    if summary:
        print(json.dumps({k: v for k, v in summary.items() if k != "skipped_indices"}))
    return 0
