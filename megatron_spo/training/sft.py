"""Supervised fine-tuning (the warm start before RL) on the Megatron actor.

Each record holds a prompt and a response. The prompt becomes token ids exactly as the rollout
builds them (`megatron_spo.rollout.prompts.build_prompts`: answer-format suffix, chat template,
length policy), so the model is trained on the very prompt tokens RL will later show it; the
response is tokenised on its own and closed with the EOS token, as a generated response is. The
loss is the mean next-token negative log-likelihood over the response tokens (EOS included) of
the global batch:

    L = - sum_{i in batch} sum_{t in response_i} log p(x_{i,t} | x_{i,<t}) / (number of response tokens)

Data parallelism: every rank holds the whole (small, tokenised) dataset and computes the same
seeded order (a fresh permutation per epoch; the epochs form one stream, so a global batch may
straddle an epoch boundary); step s takes the next `global_batch_size` examples of that stream
and DP rank r keeps its contiguous 1/dp share. Micro-batches are right-padded (padding carries no
loss; causal attention keeps it from touching real tokens). The actor sums token losses over
micro-batches and DP ranks and divides once by the global token count, so a step is the same
computation at any DP size.

Outputs, all inside the output directory `out`, which appears complete or not at all: the trained
model as a Hugging Face directory (exported through the weight bridge), one JSON line of metrics
per step from rank 0 (`sft_metrics.jsonl`, or `metrics_file` when set) and the effective config
(`sft_config.yaml`). Until the last step they are built in a hidden sibling (`.<out>.tmp-*`, its
path printed at the start) that is renamed to `out` at the end, so two runs that share a parent
directory never write each other's files.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import sys
import time
from pathlib import Path
from typing import Any, ClassVar, Literal, Sequence

import numpy as np
import torch

from megatron_spo import atomic
from megatron_spo.errors import UserError
from megatron_spo.rollout.prompts import load_tokenizer  # noqa: F401  (re-exported for the CLI)
from megatron_spo.rollout.prompts import PromptConfig, build_prompts
from megatron_spo.training.config import OptimizerConfig

DATA_SUFFIXES = (".jsonl", ".json", ".parquet")
_OPTIMIZER_KEYS = ("lr", "min_lr_ratio", "warmup_steps", "schedule", "weight_decay", "betas", "eps", "grad_clip")


@dataclasses.dataclass(kw_only=True)
class SFTOptimizerConfig(OptimizerConfig):
    """The RL optimizer section (`training.config.OptimizerConfig`) with supervised fine-tuning's
    defaults where they differ: a larger rate, a cosine decay, no weight decay."""

    lr: float = 1e-5
    """Peak learning rate; 1e-5 is a common full-parameter SFT rate for 1-10B models (tiny
    random-init models want ~1e-3)."""
    weight_decay: float = 0.0
    """Decoupled (AdamW) weight decay; 0 keeps the warm start close to the base model."""
    schedule: Literal["constant", "cosine", "linear"] = "cosine"
    """Decay after warm-up down to min_lr_ratio * lr at the last step; cosine is the usual SFT choice."""


@dataclasses.dataclass(kw_only=True)
class SFTConfig:
    """Everything `megatron-spo sft` reads."""

    MOVED: ClassVar[dict[str, str]] = {key: f"optimizer.{key}" for key in _OPTIMIZER_KEYS}
    """Old key -> new key: a config that still uses an old key is refused naming the new one."""

    model: str
    """Starting model: a Hugging Face directory (config, safetensors, tokenizer) or a megatron-spo
    checkpoint directory."""
    data_files: list[str]
    """Supervised pairs: .jsonl / .json / .parquet files, one record per example."""
    out: str
    """Output Hugging Face directory (must not exist unless `overwrite`)."""
    prompt_key: str = "prompt"
    """Record field holding the prompt (a string or a list of chat messages), as for RL."""
    response_key: str = "response"
    """Record field holding the target response (a string; EOS is appended)."""
    prompt: PromptConfig = dataclasses.field(default_factory=PromptConfig)
    """How prompts become token ids; keep it equal to the RL run's `data.prompt` so both see
    identical prompt tokens."""
    max_length: int = 4096
    """Longest prompt + response + EOS in tokens; longer examples follow `overlong`."""
    overlong: Literal["skip", "truncate", "error"] = "skip"
    """Longer examples are skipped (counted), truncated at max_length (counted; the response's
    tail and EOS are lost) or refused with the record's index."""
    epochs: float = 1.0
    """Passes over the data when `max_steps` is not set (steps = ceil(epochs * N / global batch))."""
    max_steps: int | None = None
    """Optimizer steps; overrides `epochs` when set (the demo trains a fixed number of steps)."""
    global_batch_size: int = 32
    """Examples per optimizer step over all data-parallel ranks; must be a multiple of DP."""
    micro_batch_size: int = 8
    """Examples per forward/backward on one rank; bounds activation memory only (the step's
    result does not depend on it)."""
    optimizer: SFTOptimizerConfig = dataclasses.field(default_factory=SFTOptimizerConfig)
    """Adam and the lr schedule (the RL run's section, with SFT's defaults: lr 1e-5, cosine
    decay over the run's steps, no weight decay)."""
    seed: int = 0
    """Seed of the data order and of model building."""
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    """Parameter/compute dtype of the actor and of the written weights."""
    tp: int = 1
    """Tensor-parallel size."""
    pp: int = 1
    """Pipeline-parallel size; the rest of the world size is data parallel."""
    log_every: int = 1
    """Print a metrics line on rank 0 every this many steps (every step is written to the file)."""
    metrics_file: str | None = None
    """Per-step metrics (JSON lines); None = `out/sft_metrics.jsonl` (written in the hidden
    staging directory until the run ends, then renamed with it)."""
    overwrite: bool = False
    """Replace an existing `out`."""

    def __post_init__(self):
        if not self.data_files:
            raise UserError("data_files must name at least one dataset file")
        positive = ("max_length", "global_batch_size", "micro_batch_size", "tp", "pp", "log_every")
        for name in positive:
            if getattr(self, name) < 1:
                raise UserError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_steps is not None and self.max_steps < 1:
            raise UserError(f"max_steps must be >= 1 (or null to use epochs), got {self.max_steps}")
        if self.max_steps is None and not self.epochs > 0:
            raise UserError(f"epochs must be > 0, got {self.epochs}")
        if Path(self.out).resolve() == Path(self.model).resolve():
            raise UserError(f"out ({self.out}) must differ from model: the starting weights would be replaced")

    @property
    def metrics_path(self) -> Path:
        """Where the metrics are once the run has finished."""
        return Path(self.metrics_file) if self.metrics_file else Path(self.out) / "sft_metrics.jsonl"


# ----------------------------------------------------------------------------- data


@dataclasses.dataclass(kw_only=True)
class SFTExample:
    """One tokenised example: prompt tokens, then response tokens ending in EOS."""

    input_ids: list[int]
    prompt_length: int
    """Leading tokens that carry no loss."""


@dataclasses.dataclass(kw_only=True)
class SFTDataset:
    examples: list[SFTExample]
    num_records: int
    skipped: int
    """Examples dropped for length (prompt over prompt.max_prompt_tokens or total over max_length)."""
    truncated: int


def load_records(path: str) -> list[dict[str, Any]]:
    """Records of one dataset file (.jsonl / .json / .parquet), with errors naming the file."""
    from megatron_spo.rollout.records import load_records as read

    _check_data_file(path)
    return read(path)


def _check_data_file(path: str) -> None:
    if Path(path).suffix.lower() not in DATA_SUFFIXES:
        raise UserError(f"data_files: {path!r} is not a {' / '.join(DATA_SUFFIXES)} file")
    if not Path(path).is_file():
        raise UserError(f"data_files: dataset file {path!r} does not exist")


def encode_example(
    prompt_ids: Sequence[int], response_ids: Sequence[int], eos_id: int, *, max_length: int, overlong: str,
    where: str = "example",
) -> tuple[SFTExample | None, bool]:
    """(example or None when skipped, truncated?) for prompt + response + EOS."""
    ids = list(prompt_ids) + list(response_ids) + [eos_id]
    if len(ids) <= max_length:
        return SFTExample(input_ids=ids, prompt_length=len(prompt_ids)), False
    if overlong == "error":
        raise UserError(f"{where} has {len(ids)} tokens, more than max_length={max_length} (set overlong to skip or truncate)")
    if overlong == "skip" or len(prompt_ids) >= max_length:
        return None, False  # nothing of the response would survive truncation
    return SFTExample(input_ids=ids[:max_length], prompt_length=len(prompt_ids)), True


def build_dataset(config: SFTConfig, tokenizer) -> SFTDataset:
    """Read every file, build prompts as RL does, append response + EOS; refuse bad records."""
    from megatron_spo.rollout.records import check_prompt_and_answer

    if tokenizer.eos_token_id is None:
        raise UserError(f"the tokenizer of {config.model} has no eos token; SFT needs one to end responses")
    prompts, responses, origins = [], [], []
    for path in config.data_files:
        for index, record in enumerate(load_records(path)):
            for key in (config.prompt_key, config.response_key):
                if key not in record:
                    raise UserError(f"{path}: record {index} has no key {key!r} (keys: {', '.join(map(str, record))})")
            check_prompt_and_answer(record, config.prompt_key, config.response_key, path, index)  # null, empty
            if not isinstance(record[config.response_key], str):
                raise UserError(f"{path}: record {index}: {config.response_key!r} must be a string, "
                                f"got {type(record[config.response_key]).__name__}")
            prompts.append(record[config.prompt_key])
            responses.append(record[config.response_key])
            origins.append(f"{path}: record {index}")
    if not prompts:
        raise UserError(f"data_files {', '.join(config.data_files)}: no records (the dataset is empty)")
    built = build_prompts(prompts, tokenizer, config.prompt)
    examples, truncated = [], built.num_truncated
    skipped = len(built.skipped)
    # one batched call: the fast tokenizer encodes the list in Rust, far quicker than a loop
    kept_responses = [responses[prompt.index] for prompt in built.prompts]
    response_ids = tokenizer(kept_responses, add_special_tokens=False)["input_ids"] if kept_responses else []
    for prompt, ids in zip(built.prompts, response_ids):
        example, was_truncated = encode_example(
            prompt.token_ids, ids, tokenizer.eos_token_id, max_length=config.max_length,
            overlong=config.overlong, where=origins[prompt.index],
        )
        skipped += example is None
        truncated += was_truncated
        if example is not None:
            examples.append(example)
    if not examples:
        raise UserError(f"data_files {', '.join(config.data_files)}: all {len(prompts)} examples are longer than "
                        f"max_length={config.max_length} or prompt.max_prompt_tokens={config.prompt.max_prompt_tokens}")
    return SFTDataset(examples=examples, num_records=len(prompts), skipped=skipped, truncated=truncated)


def step_indices(num_examples: int, global_batch_size: int, step: int, seed: int) -> list[int]:
    """Example indices of optimizer step `step` (0-based): the next `global_batch_size` positions
    of the stream of per-epoch permutations (epoch e shuffled by a generator seeded (seed, e))."""
    start = step * global_batch_size
    indices = []
    for position in range(start, start + global_batch_size):
        epoch, offset = divmod(position, num_examples)
        indices.append(int(_permutation(num_examples, seed, epoch)[offset]))
    return indices


_PERMUTATIONS: dict[tuple[int, int, int], np.ndarray] = {}


def _permutation(num_examples: int, seed: int, epoch: int) -> np.ndarray:
    key = (num_examples, seed, epoch)
    if key not in _PERMUTATIONS:
        if len(_PERMUTATIONS) > 4:  # only the current and next epoch are ever in use
            _PERMUTATIONS.clear()
        _PERMUTATIONS[key] = np.random.default_rng([seed, epoch]).permutation(num_examples)
    return _PERMUTATIONS[key]


def dp_shard(indices: Sequence[int], dp_rank: int, dp: int) -> list[int]:
    """This data-parallel rank's contiguous share of a global batch."""
    if len(indices) % dp:
        raise UserError(f"global_batch_size={len(indices)} is not a multiple of the data-parallel size {dp}")
    share = len(indices) // dp
    return list(indices[dp_rank * share : (dp_rank + 1) * share])


def collate(examples: Sequence[SFTExample], pad_id: int, *, pad_to: int | None = None) -> dict[str, torch.Tensor]:
    """Right-padded micro-batch: input_ids, targets (next token) and loss_mask, each (b, s).

    loss_mask[i, t] is 1 where targets[i, t] is a response token (EOS included), i.e. for
    t in [prompt_length - 1, len - 2]; 0 on the prompt, the last position and padding.
    """
    width = pad_to or max(len(e.input_ids) for e in examples)
    input_ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    loss_mask = torch.zeros((len(examples), width), dtype=torch.float32)
    for row, example in enumerate(examples):
        n = len(example.input_ids)
        input_ids[row, :n] = torch.tensor(example.input_ids, dtype=torch.long)
        loss_mask[row, max(example.prompt_length - 1, 0) : n - 1] = 1.0
    targets = torch.roll(input_ids, -1, dims=1)  # (b, s): the last column is masked out above
    return {"input_ids": input_ids, "targets": targets, "loss_mask": loss_mask}


def make_microbatches(examples: Sequence[SFTExample], micro_batch_size: int, pad_id: int, *,
                      same_width: bool) -> list[dict[str, torch.Tensor]]:
    """Micro-batches of at most `micro_batch_size` examples, each padded to its own longest
    example, or all to the longest of the step when `same_width` (pipeline stages exchange
    activations of one fixed shape)."""
    pad_to = max(len(e.input_ids) for e in examples) if same_width else None
    return [
        collate(examples[start : start + micro_batch_size], pad_id, pad_to=pad_to)
        for start in range(0, len(examples), micro_batch_size)
    ]


def total_steps(config: SFTConfig, num_examples: int) -> int:
    if config.max_steps is not None:
        return config.max_steps
    return max(1, math.ceil(config.epochs * num_examples / config.global_batch_size))


# ----------------------------------------------------------------------------- training


def check_inputs(config: SFTConfig) -> None:
    """Cheap checks before any process group, model or output exists."""
    from megatron_spo.models.checkpoint import hf_side_dir_of, read_checkpoint_meta, is_mcore_checkpoint

    model = Path(config.model)
    if not model.is_dir():
        raise UserError(f"model: {config.model!r} is not a directory")
    if is_mcore_checkpoint(model):
        read_checkpoint_meta(model)
    elif not (hf_side_dir_of(model) / "config.json").is_file():
        raise UserError(f"model: {config.model!r} is not a Hugging Face model directory (no config.json)")
    for path in config.data_files:
        _check_data_file(path)
    if Path(config.out).exists() and not config.overwrite:
        raise UserError(f"out: {config.out} already exists (set overwrite=true to replace it)")


def _check_layout(config: SFTConfig, parallel) -> None:
    """The process groups match the config's tp/pp and split the global batch evenly."""
    if (parallel.tp, parallel.pp) != (config.tp, config.pp):
        raise UserError(f"tp/pp of the config ({config.tp}, {config.pp}) differ from the process groups "
                        f"({parallel.tp}, {parallel.pp})")
    if config.global_batch_size % parallel.dp:
        raise UserError(f"global_batch_size={config.global_batch_size} is not a multiple of the data-parallel "
                        f"size {parallel.dp} (world size {parallel.world_size} / tp {config.tp} / pp {config.pp})")


def _train_one_step(actor, dataset: SFTDataset, config: SFTConfig, parallel, step: int, pad_id: int) -> dict[str, Any]:
    """One optimizer step on this rank's share of global batch `step`; returns its metrics record."""
    from megatron_spo.training.actor import lm_loss

    step_start = time.perf_counter()
    global_batch = step_indices(len(dataset.examples), config.global_batch_size, step, config.seed)
    local = [dataset.examples[i] for i in dp_shard(global_batch, parallel.dp_rank, parallel.dp)]
    microbatches = make_microbatches(local, config.micro_batch_size, pad_id, same_width=parallel.pp > 1)
    lr = actor.optimizer.param_groups[0]["lr"]  # train_step reports the next step's rate
    result = actor.train_step(microbatches, lm_loss)
    seconds = time.perf_counter() - step_start
    # every rank knows the whole global batch, so the token count needs no communication
    tokens = sum(len(dataset.examples[i].input_ids) for i in global_batch)
    return {
        "step": step + 1,
        "loss": result["nll_sum"] / max(result["count"], 1.0),
        "response_tokens": int(result["count"]),
        "tokens": tokens,
        "tokens_per_s": tokens / seconds,
        "step_seconds": seconds,
        "grad_norm": result["grad_norm"],
        "lr": lr,
        "skipped": result["skipped"],
    }


def _train(actor, dataset: SFTDataset, config: SFTConfig, parallel, steps: int, pad_id: int,
           staging: Path | None) -> tuple[list[dict[str, Any]], float]:
    """The training steps; rank 0 (`staging` set: the output being built) writes the config and a
    metrics line per step there (or to `metrics_file`). Returns (metrics history, seconds)."""
    from megatron_spo.config import save_config

    metrics_file = None
    if staging is not None:
        save_config(config, staging / "sft_config.yaml")
        metrics_path = Path(config.metrics_file) if config.metrics_file else staging / "sft_metrics.jsonl"
        metrics_path.parent.mkdir(parents=True, exist_ok=True)
        metrics_file = open(metrics_path, "w")
        print(f"sft: {len(dataset.examples)} examples ({dataset.skipped} skipped, {dataset.truncated} truncated "
              f"of {dataset.num_records}), {steps} steps of {config.global_batch_size}, "
              f"TP={parallel.tp} PP={parallel.pp} DP={parallel.dp}; metrics in {metrics_path}"
              + ("" if config.metrics_file else f" until the end, then {config.metrics_path}"), flush=True)
    history: list[dict[str, Any]] = []
    start = time.perf_counter()
    try:
        for step in range(steps):
            record = _train_one_step(actor, dataset, config, parallel, step, pad_id)
            history.append(record)
            if metrics_file is not None:
                metrics_file.write(json.dumps(record) + "\n")
                metrics_file.flush()
                if (step + 1) % config.log_every == 0 or step + 1 == steps:
                    print(f"sft step {step + 1}/{steps}  loss {record['loss']:.4f}  grad_norm {record['grad_norm']:.3f}  "
                          f"lr {record['lr']:.2e}  {record['tokens_per_s']:,.0f} tok/s", flush=True)
    finally:
        if metrics_file is not None:
            metrics_file.close()
    return history, time.perf_counter() - start


def run_sft(config: SFTConfig, parallel, dataset: SFTDataset | None = None) -> dict[str, Any]:
    """Train `config.model` on the supervised pairs and write the result to `config.out`.

    `parallel` is the `ParallelContext` of `platform.init_distributed(config.tp, config.pp)`;
    every rank calls this. `dataset` is `build_dataset(config, tokenizer)` when the caller has
    already built it (the CLI does, to report bad data before starting process groups). Returns
    (on every rank) a summary: steps, examples, loss history, timing and where the outputs are.
    """
    from megatron_spo import platform
    from megatron_spo.models.checkpoint import hf_side_dir_of, load_pretrained, parse_dtype, write_hf_files
    from megatron_spo.training.actor import Actor

    _check_layout(config, parallel)
    check_inputs(config)
    is_main = parallel.rank == 0
    side_dir = hf_side_dir_of(config.model)
    tokenizer = load_tokenizer(side_dir)
    if dataset is None:
        dataset = build_dataset(config, tokenizer)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    steps = total_steps(config, len(dataset.examples))
    dtype = parse_dtype(config.dtype)

    platform.seed_everything(config.seed, tp_rank=parallel.tp_rank, pp_rank=parallel.pp_rank)
    spec, chunks, bridge = load_pretrained(config.model, parallel, dtype=dtype, seed=config.seed)
    actor = Actor(spec, chunks, bridge, parallel, config.optimizer, total_steps=steps)

    with contextlib.ExitStack() as stack:
        # rank 0 builds the whole output (model, metrics, config) in a hidden sibling of `out`,
        # renamed to `out` when the model is written; a failure leaves no `out` behind
        staging = stack.enter_context(atomic.atomic_dir(config.out, overwrite=config.overwrite)) if is_main else None
        history, train_seconds = _train(actor, dataset, config, parallel, steps, pad_id, staging)
        export = actor.export_hf(dtype=dtype)
        if is_main:
            write_hf_files(export, staging, hf_side_dir=side_dir, dtype=dtype)
        else:
            for _ in export:  # the export is collective: every rank drains it
                pass
    if parallel.world_size > 1:
        torch.distributed.barrier()  # the output exists for every rank once this returns
    if is_main:
        print(f"sft: wrote {config.out} after {steps} steps in {train_seconds:.1f}s "
              f"(loss {history[0]['loss']:.4f} -> {history[-1]['loss']:.4f})", file=sys.stderr, flush=True)
    return {
        "out": str(config.out),
        "metrics_file": str(config.metrics_path),
        "steps": steps,
        "examples": len(dataset.examples),
        "skipped": dataset.skipped,
        "truncated": dataset.truncated,
        "history": history,
        "first_loss": history[0]["loss"],
        "final_loss": history[-1]["loss"],
        "train_seconds": train_seconds,
        "seconds_per_step": train_seconds / steps,
        "tokens_per_s": sum(r["tokens"] for r in history) / train_seconds,
    }
