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

Under torchrun the prompts are split over rollout groups (`rollout.placement`: with
`engine.name=vllm engine.tensor_parallel_size=R` a vLLM engine per R consecutive ranks; otherwise
one engine per rank, `prompts[rank::world]`) and rank 0 gathers and writes the file. Prompts over
the length limit are skipped and counted (or truncated, `prompt.overlong=truncate`); the counts go
to `OUTPUT_DIR/estimate_summary.json`.

The config (`EstimateConfig`) is read strictly from YAML and dotted overrides, as `train` reads
its config, with short flags for the common keys (`rollout.cli_options`):

    megatron-spo values estimate --data subset_0.parquet --model Qwen3-8B -n 8 --output-dir OUT \
        --engine vllm engine.dtype=bfloat16 reward.thinking=true
    megatron-spo values estimate --config estimate.yaml [key=value ...]

Scoring: the configured reward function (`megatron_spo.rollout.rewards`, the authors' binary
math reward by default) in a `ScoringPool` (worker processes with a per-response time limit).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from pathlib import Path
from typing import Any

from megatron_spo import atomic
from megatron_spo.errors import UserError
from megatron_spo.rollout.cli_options import build_parser, load_command_config, refuse_old_flags
from megatron_spo.rollout.engine import EngineConfig, make_engine
from megatron_spo.rollout.graded_sampling import (
    GradedPrompt,
    check_sampling_settings,
    gather_on_rank0,
    sample_and_grade,
)
from megatron_spo.rollout.placement import RolloutPlacement
from megatron_spo.rollout.prompts import PromptConfig, build_prompts
from megatron_spo.rollout.records import field, init_ranks, load_records, prompt_and_answer_fields, raw_user_prompt
from megatron_spo.rollout.rewards import RewardConfig


@dataclasses.dataclass(kw_only=True)
class EstimateConfig:
    """Everything `megatron-spo values estimate` reads."""

    data: str
    """Dataset file: .jsonl, .json (a list of records) or .parquet; flag --data."""
    model: str
    """Hugging Face model directory (weights + tokenizer) that samples; flag --model."""
    output_dir: str
    """Run directory; results go to OUTPUT_DIR/validation_data/0.jsonl. Flag --output-dir."""
    engine: EngineConfig = dataclasses.field(default_factory=EngineConfig)
    """The engine that samples (`hf` or `vllm`, dtype, context, rollout TP); its model is `model`
    and its seed `seed`. Flag --engine sets engine.name."""
    prompt: PromptConfig = dataclasses.field(default_factory=PromptConfig)
    """Chat template, answer-format suffix, prompt length limit: as the RL run will build them."""
    reward: RewardConfig = dataclasses.field(default_factory=RewardConfig)
    """How responses are scored (the authors' binary math reward by default)."""
    n: int = 8
    """Responses per prompt; the authors merge 8 scores per prompt (offline_n)."""
    temperature: float = 0.6
    """The authors' sampling temperature for Qwen3 (seed 000 eval settings)."""
    top_p: float = 0.95
    """The authors' nucleus mass."""
    top_k: int = 20
    """The authors' top-k."""
    max_response_tokens: int = 16384
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
    overwrite: bool = False
    """Replace the results of an earlier estimate in `output_dir`; off, such a directory is
    refused before any sampling (`overwrite=true` on the command line)."""

    def __post_init__(self):
        check_sampling_settings(self)
        if not Path(self.data).is_file():
            raise UserError(f"data: {self.data} is not a file")
        if not (Path(self.model) / "config.json").is_file():
            raise UserError(f"model: {self.model} is not a Hugging Face model directory (no config.json)")

    def engine_config(self) -> EngineConfig:
        """The complete engine config: the `engine` section with the model and seed filled in."""
        return dataclasses.replace(self.engine, model=self.model, seed=self.seed)


# ----------------------------------------------------------------------------- the run


def run(config: EstimateConfig) -> dict[str, Any]:
    """Run the estimate; rank 0 writes the files and returns the summary (other ranks: {})."""
    started = time.perf_counter()
    check_output_dir(config)
    rank, world = init_ranks()
    records = load_records(config.data)
    if not records:
        raise UserError(f"data: {config.data} holds no records")
    prompt_field, answer_field = prompt_and_answer_fields(records, config.prompt_key, config.answer_key, config.data)

    rollout_tp = config.engine.tensor_parallel_size if config.engine.name == "vllm" else 1
    placement = RolloutPlacement.build(world, rollout_tp, key="engine.tensor_parallel_size")  # before the engine
    engine = make_engine(config.engine_config())
    placement = dataclasses.replace(placement, spmd=getattr(engine, "spmd", False))
    tokenizer = getattr(engine, "tokenizer", None)
    if tokenizer is None:
        raise UserError(f"model: {config.model} has no tokenizer; prompts need one")
    batch = build_prompts([field(r, prompt_field) for r in records], tokenizer, config.prompt)
    graded, reward_failures = sample_and_grade(
        engine, batch.prompts, config, lambda i: field(records[i], answer_field),
        placement=placement, rank=rank, seed=config.seed, reward=config.reward,
    )
    rows = [row for g in graded for row in _response_rows(g, records, prompt_field, answer_field, tokenizer, config)]
    parts = gather_on_rank0((rows, reward_failures), rank, world)
    # only now: vLLM's shutdown also tears down torch.distributed's default group
    engine.shutdown()
    if rank != 0:
        return {}
    rows = sorted((r for part, _ in parts for r in part), key=lambda r: (r["prompt_index"], r["sample_index"]))
    out_dir = Path(config.output_dir)
    _write_jsonl(out_dir / "validation_data" / "0.jsonl", rows)
    scores = [r["score"] for r in rows]
    summary = {
        "data": str(config.data),
        "model": str(config.model),
        "engine": config.engine.name,
        "ranks": world,
        "reward_function": config.reward.function,
        "reward_failures": sum(failures for _, failures in parts),
        "prompts_in_file": len(records),
        "prompts_estimated": len(batch.prompts),
        "prompts_skipped_overlong": len(batch.skipped),
        "skipped_indices": batch.skipped,
        "prompts_truncated": batch.num_truncated,
        "responses": len(rows),
        "responses_per_prompt": config.n,
        "mean_score": sum(scores) / len(scores) if scores else None,
        "finished_by_length": sum(r["finish_reason"] == "length" for r in rows),
        "seconds": round(time.perf_counter() - started, 3),
    }
    atomic.write_json(out_dir / "estimate_summary.json", summary)
    return summary


RESULT_FILES = ("validation_data/0.jsonl", "estimate_summary.json")
"""What an estimate writes under its output directory."""


def check_output_dir(config: EstimateConfig) -> None:
    """UserError, before any work, when `output_dir` cannot be written or already holds an
    estimate's results and `overwrite` is off."""
    out_dir = atomic.check_output_location(config.output_dir, "output_dir", kind="dir")
    existing = [name for name in RESULT_FILES if (out_dir / name).exists()]
    if existing and not config.overwrite:
        raise UserError(f"output_dir: {out_dir} already holds the results of an estimate ({', '.join(existing)}); "
                        "give another --output-dir, or set overwrite=true to replace them")


def _response_rows(graded: GradedPrompt, records: list[dict[str, Any]], prompt_field: str, answer_field: str,
                   tokenizer, config: EstimateConfig) -> list[dict[str, Any]]:
    """The output file's records of one prompt, one per response (layout in the module docstring)."""
    record = records[graded.prompt.index]
    return [
        {
            "input": tokenizer.decode(graded.prompt.token_ids, skip_special_tokens=True),
            "output": completion.text or "",
            "score": score,
            "pred": pred,
            "ground_truth": field(record, answer_field),
            "data_source": str(record.get("data_source", Path(config.data).stem)),
            "prompt": raw_user_prompt(field(record, prompt_field)),
            "prompt_index": graded.prompt.index,
            "sample_index": j,
            "finish_reason": completion.finish_reason,
            "step": 0,
        }
        for j, (completion, score, pred) in enumerate(zip(graded.completions, graded.scores, graded.predictions))
    ]


def _write_jsonl(path: Path, records: list[dict[str, Any]]) -> None:
    with atomic.open_for_write(path) as fh:  # streamed: a run's responses can be hundreds of MB
        for record in records:
            fh.write((json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8"))


# ----------------------------------------------------------------------------- CLI


def main(argv: list[str]) -> int:
    refuse_old_flags(argv)
    parser = build_parser(
        EstimateConfig, prog="megatron-spo values estimate",
        description="Sample N responses per prompt with a pretrained model, score them against the ground truth "
                    "and write OUTPUT_DIR/validation_data/0.jsonl (the input of `values merge`). Runs under "
                    "torchrun with the prompts split over ranks.",
        example="megatron-spo values estimate --data subset_0.parquet --model Qwen3-8B -n 8 "
                "--output-dir runs/offline/subset_0 --engine vllm engine.dtype=bfloat16",
        out_flag="--output-dir", out_help="writes validation_data/0.jsonl and estimate_summary.json here",
        n_help="responses per prompt", n_aliases=("--responses-per-prompt",),
    )
    config = load_command_config(EstimateConfig, parser.parse_intermixed_args(argv), out_key="output_dir")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    summary = run(config)
    if summary:
        print(json.dumps({k: v for k, v in summary.items() if k != "skipped_indices"}))
    return 0
