"""`megatron-spo eval`: accuracy, pass@k and maj@k of a Hugging Face model, the way papers report.

    megatron-spo eval --model HF_DIR --data aime24.parquet [-n 32] [--out result.json] [key=value ...]
    megatron-spo eval --config eval.yaml [key=value ...]
    torchrun --nproc-per-node 8 -m megatron_spo eval --config eval.yaml engine.name=vllm

Samples n responses per prompt of a dataset (default 32 at the authors' evaluation settings:
temperature 0.6, top-p 0.95, top-k 20), grades them with the configured reward and reports the
metrics overall and per `data_source` / `difficulty` (`megatron_spo.training.evaluation`, which the
trainer's periodic evaluation uses too). This module only reads the config, loads the model into a
fresh engine, calls `evaluate`, prints a table and writes the result JSON atomically.

The config is `EvalCommandConfig`: the evaluation's keys (`evaluation.EvalConfig`) plus the model,
the dataset, the output file, the seed and the engine / prompt / reward sections, read strictly
from YAML and dotted overrides as `train` reads its config (`rollout.cli_options`). Under torchrun
the prompts are split over rollout groups (`engine.tensor_parallel_size`) and rank 0 writes.
Dataset reading and field lookup are `megatron_spo.rollout.records`', so `values estimate` and
`eval` accept the same files.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path

from megatron_spo import atomic
from megatron_spo.config import to_dict
from megatron_spo.errors import UserError
from megatron_spo.rollout.cli_options import build_parser, load_command_config, refuse_old_flags
from megatron_spo.rollout.engine import EngineConfig
from megatron_spo.rollout.prompts import PromptConfig
from megatron_spo.rollout.rewards import RewardConfig
from megatron_spo.training.evaluation import EvalConfig, evaluate, format_table


@dataclasses.dataclass(kw_only=True)
class EvalCommandConfig(EvalConfig):
    """Everything `megatron-spo eval` reads: the evaluation (`EvalConfig`) and what it runs on."""

    model: str
    """Hugging Face model directory (weights + tokenizer) to evaluate; flag --model."""
    data: str
    """Dataset file: .jsonl, .json (a list of records) or .parquet; flag --data."""
    out: str | None = None
    """Write the result JSON here (atomically); None = print the table only. Flag --out."""
    seed: int = 0
    """Base seed: response j of prompt i is sampled with seed + i * n + j (also the engine's seed)."""
    engine: EngineConfig = dataclasses.field(default_factory=EngineConfig)
    """The engine that samples (`hf` or `vllm`, dtype, context, rollout TP); its model is `model`.
    Flag --engine sets engine.name."""
    prompt: PromptConfig = dataclasses.field(default_factory=PromptConfig)
    """Chat template, answer-format suffix, prompt length limit: keep them as in training, so the
    model is evaluated on the prompts it learned from."""
    reward: RewardConfig = dataclasses.field(default_factory=RewardConfig)
    """How responses are graded (the binary math reward by default; `reward.thinking=true` for
    models that think first)."""

    def __post_init__(self):
        super().__post_init__()
        if not (Path(self.model) / "config.json").is_file():
            raise UserError(f"model: {self.model} is not a Hugging Face model directory (no config.json)")
        if not Path(self.data).is_file():
            raise UserError(f"data: {self.data} is not a file")

    def engine_config(self) -> EngineConfig:
        """The complete engine config: the `engine` section with the model and seed filled in."""
        return dataclasses.replace(self.engine, model=self.model, seed=self.seed)


def main(argv: list[str]) -> int:
    from megatron_spo.rollout.engine import make_engine
    from megatron_spo.rollout.placement import RolloutPlacement
    from megatron_spo.rollout.records import init_ranks, load_records, prompt_and_answer_fields

    refuse_old_flags(argv)
    parser = build_parser(
        EvalCommandConfig, prog="megatron-spo eval", description=__doc__.split("\n\n")[0], out_flag="--out",
        out_help="write the result JSON here (atomically)", n_help="samples per prompt",
        example="megatron-spo eval --model runs/spo/hf --data aime24.parquet -n 32 --engine vllm "
                "engine.dtype=bfloat16 reward.thinking=true --out runs/spo/eval_aime24.json",
    )
    config = load_command_config(EvalCommandConfig, parser.parse_intermixed_args(argv), out_key="out")
    if config.out:  # before the evaluation, not after it
        atomic.check_output_location(config.out, "out")
    # progress lines from megatron-spo only: Megatron's import-time INFO chatter is noise here
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger("megatron_spo").setLevel(logging.INFO)
    started = time.perf_counter()
    records = load_records(config.data)  # before the engine: a bad file fails in a second
    if not records:
        raise UserError(f"data: {config.data} holds no records")
    prompt_and_answer_fields(records, config.prompt_key, config.answer_key, config.data)  # and a bad record
    rank, world = init_ranks()
    rollout_tp = config.engine.tensor_parallel_size if config.engine.name == "vllm" else 1
    RolloutPlacement.build(world, rollout_tp, key="engine.tensor_parallel_size")  # a bad size before the engine
    engine = make_engine(config.engine_config())
    try:
        tokenizer = getattr(engine, "tokenizer", None)
        if tokenizer is None:
            raise UserError(f"model: {config.model} has no tokenizer; prompts need one")
        result = evaluate(engine, tokenizer, records, config, prompt=config.prompt, seed=config.seed,
                          reward=config.reward, rank=rank, world_size=world, rollout_tp=rollout_tp,
                          default_source=config.data)
    finally:
        engine.shutdown()  # after the gather: vLLM's shutdown also tears down the default group
    if rank != 0:
        return 0
    result = {
        "model": str(config.model), "data": str(config.data), "engine": config.engine.name, "ranks": world,
        "sampling": {"n": config.n, "temperature": config.temperature, "top_p": config.top_p,
                     "top_k": config.top_k, "max_response_tokens": config.max_response_tokens, "seed": config.seed},
        "reward_function": config.reward.function,
        "config": to_dict(config),
        **result,
        "seconds": round(time.perf_counter() - started, 3),
    }
    print(format_table(result))
    if result["prompts_skipped_overlong"]:
        print(f"note: {result['prompts_skipped_overlong']} prompts longer than prompt.max_prompt_tokens="
              f"{config.prompt.max_prompt_tokens} were skipped and are not in the metrics")
    if config.out:
        atomic.write_json(config.out, result)
        print(f"wrote {config.out}")
    return 0
