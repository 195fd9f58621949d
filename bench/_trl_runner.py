"""TRL's GRPOTrainer on the demo task, timed; run by `bench/vs_trl.py` in its own venv (.venv-trl).

    .venv-trl/bin/python bench/_trl_runner.py --model DIR --data prompts.jsonl --out DIR [--steps 20 ...]
    .venv-trl/bin/python -m torch.distributed.run --standalone --nproc_per_node 2 bench/_trl_runner.py ...

Imports only torch, transformers, datasets and trl (never megatron_spo: this venv does not have
it). The prompts arrive already rendered (chat template + answer-format suffix, as megatron-spo's
prompt builder makes them), with the token ids megatron-spo gives them; a prompt that TRL would
tokenize differently is an error, so both trainers see the same prompt tokens.

One GRPO step = 16 prompts x 8 completions generated with `model.generate` (TRL's non-vLLM path),
graded by the demo task's boxed-answer check, and one optimizer step on all 128 sequences. Times
are taken with `time.perf_counter` at every optimizer step's end (wall time per step, everything
included) and around TRL's generation and generate-and-score calls (the phases). The main process
writes `trl_result.json` into --out.

For the time-to-accuracy comparison (`vs_trl.py --to-accuracy`), `--save-every K` writes the
policy as a Hugging Face dir every K steps (and at the end) into --out/snapshots/step_K, with the
training seconds so far in --out/snapshots.json; the seconds spent saving are taken off the clock.
`--max-train-seconds B` ends training at the first step whose training seconds reach B (rank 0's
clock decides, and every rank learns it through a broadcast, so all stop at the same step).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import time
from pathlib import Path

import torch
from datasets import load_dataset
from transformers import PreTrainedTokenizerFast, TrainerCallback
from trl import GRPOConfig, GRPOTrainer

_BOXED_RE = re.compile(r"\\boxed\{([^{}]*)\}")


def boxed_reward(completions: list[str], answer: list[str], **_) -> list[float]:
    """1.0 when the last \\boxed{...} of the completion equals the answer exactly, else 0.0.

    The same check as megatron_spo.demo.task.is_correct (this venv cannot import it).
    """
    rewards = []
    for text, truth in zip(completions, answer):
        found = _BOXED_RE.findall(text)
        rewards.append(float(bool(found) and found[-1].strip() == str(truth).strip()))
    return rewards


class TimedGRPOTrainer(GRPOTrainer):
    """GRPOTrainer that records how long generation and generate-and-score take per call."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.generate_seconds: list[float] = []
        self.generate_and_score_seconds: list[float] = []

    def _generate(self, prompts):
        start = time.perf_counter()
        out = super()._generate(prompts)
        self.generate_seconds.append(time.perf_counter() - start)
        return out

    def _generate_and_score_completions(self, inputs):
        start = time.perf_counter()
        out = super()._generate_and_score_completions(inputs)
        self.generate_and_score_seconds.append(time.perf_counter() - start)
        return out


class StepClock(TrainerCallback):
    """perf_counter at the start of training and at the end of every optimizer step."""

    def __init__(self):
        self.train_begin = None
        self.step_ends: list[float] = []

    def on_train_begin(self, args, state, control, **kwargs):
        self.train_begin = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self.step_ends.append(time.perf_counter())


class Snapshots(TrainerCallback):
    """Saves the policy every `every` steps with the training seconds so far (saving excluded), and
    stops training once those reach `budget_s` (None: no limit)."""

    def __init__(self, out: Path, model_dir: str, every: int, budget_s: float | None, is_main: bool):
        self.out, self.model_dir, self.every, self.budget_s, self.is_main = out, Path(model_dir), every, budget_s, is_main
        self.begin, self.paused = None, 0.0
        self.saved: list[dict] = []

    def training_seconds(self) -> float:
        return time.perf_counter() - self.begin - self.paused

    def on_train_begin(self, args, state, control, **kwargs):
        self.begin = time.perf_counter()

    def _save(self, state, model):
        seconds = self.training_seconds()
        started = time.perf_counter()
        if self.is_main:
            path = self.out / f"step_{state.global_step}"
            model.save_pretrained(path)
            # every other file of the warm start: its config (the architecture is the same, and the
            # evaluation reads the format megatron-spo wrote), its tokenizer and its chat template
            # (chat_template.jinja: without it the evaluation would render prompts with no template)
            for name in os.listdir(self.model_dir):
                if "safetensors" not in name and (self.model_dir / name).is_file():
                    shutil.copy(self.model_dir / name, path / name)
            self.saved.append({"step": state.global_step, "train_seconds": seconds, "dir": str(path)})
            (self.out.parent / "snapshots.json").write_text(json.dumps(self.saved))
        self.paused += time.perf_counter() - started

    def on_step_end(self, args, state, control, model=None, **kwargs):
        stop = self.budget_s is not None and self.training_seconds() >= self.budget_s
        if torch.distributed.is_initialized():  # rank 0's clock decides for every rank
            flag = torch.tensor([float(stop)])
            torch.distributed.broadcast(flag, 0)
            stop = bool(flag.item())
        if stop:
            control.should_training_stop = True
        if stop or state.global_step % self.every == 0 or state.global_step >= state.max_steps:
            self._save(state, model)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="HF model dir (weights + tokenizer)")
    parser.add_argument("--data", required=True, help="jsonl with prompt (rendered text), prompt_token_ids, answer")
    parser.add_argument("--out", required=True, type=Path, help="output dir (TRL's output_dir and trl_result.json)")
    parser.add_argument("--steps", type=int, default=23, help="optimizer steps in all, warm-up included")
    parser.add_argument("--prompts", type=int, default=16, help="prompts per step (over all processes)")
    parser.add_argument("--generations", type=int, default=8, help="completions per prompt (num_generations)")
    parser.add_argument("--max-completion-length", type=int, default=48)
    parser.add_argument("--lr", type=float, default=1e-6)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "1")))
    parser.add_argument("--save-every", type=int, default=0, help="save the policy every K steps (0: never)")
    parser.add_argument("--max-train-seconds", type=float, help="stop once training has taken this long")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    sequences = args.prompts * args.generations
    if sequences % world:
        raise SystemExit(f"{sequences} sequences per step do not split over {world} processes")

    # AutoTokenizer would swap in Qwen2Tokenizer and re-split the demo's custom vocabulary
    tokenizer = PreTrainedTokenizerFast.from_pretrained(args.model)
    dataset = load_dataset("json", data_files=args.data, split="train")
    sample = dataset.select(range(min(64, len(dataset))))
    # TRL tokenizes a plain-text prompt with `processing_class(text=prompts)`
    if tokenizer(text=list(sample["prompt"]))["input_ids"] != list(sample["prompt_token_ids"]):
        raise SystemExit("TRL's tokenization of the rendered prompts differs from megatron-spo's")
    dataset = dataset.remove_columns(["prompt_token_ids"])

    config = GRPOConfig(
        output_dir=str(args.out / "trl"),
        # batch shape: every step generates `sequences` completions and takes one optimizer step on them
        per_device_train_batch_size=sequences // world,
        gradient_accumulation_steps=1,
        num_generations=args.generations,
        steps_per_generation=1,  # on-policy: TRL then skips the old-logprob pass (ratio = 1 by construction)
        max_steps=args.steps,
        max_completion_length=args.max_completion_length,
        temperature=1.0,
        top_p=1.0,
        top_k=0,  # 0 = off in transformers' sampling, as the trainer's top_k -1
        learning_rate=args.lr,
        lr_scheduler_type="constant",
        warmup_steps=0,
        weight_decay=0.0,
        max_grad_norm=1.0,
        beta=0.0,  # no reference model, as the trainer's algorithm.grpo.loss.kl_coef 0
        epsilon=0.2,
        epsilon_high=0.28,  # the trainer's clip 0.2 / 0.28
        loss_type="dapo",  # token mean over the global batch, as the trainer's token-mean
        use_vllm=False,
        use_cpu=True,
        bf16=False,
        fp16=False,
        gradient_checkpointing=False,  # TRL's default is True; the trainer does not recompute either
        seed=args.seed,
        logging_steps=1,
        report_to="none",
        save_strategy="no",
        disable_tqdm=True,
        dataloader_num_workers=0,
    )
    clock = StepClock()
    callbacks = [clock]
    if args.save_every:
        callbacks.append(Snapshots(args.out / "snapshots", args.model, args.save_every, args.max_train_seconds,
                                   int(os.environ.get("RANK", "0")) == 0))
    trainer = TimedGRPOTrainer(
        model=args.model,
        reward_funcs=boxed_reward,
        args=config,
        train_dataset=dataset,
        processing_class=tokenizer,
        callbacks=callbacks,
    )
    trainer.train()

    if trainer.accelerator.is_main_process:
        history = [h for h in trainer.state.log_history if "reward" in h]
        result = {
            "trl_version": __import__("trl").__version__,
            "transformers_version": __import__("transformers").__version__,
            "torch_version": torch.__version__,
            "world_size": world,
            "threads": torch.get_num_threads(),
            "train_begin": clock.train_begin,
            "step_ends": clock.step_ends,
            "generate_seconds": trainer.generate_seconds,
            "generate_and_score_seconds": trainer.generate_and_score_seconds,
            # per step, over all processes: mean completion length (EOS included) and TRL's running
            # count of prompt + completion tokens (unpadded), whose differences are a step's sequence tokens
            "completion_mean_length": [h["completions/mean_length"] for h in history],
            "num_tokens": [h["num_tokens"] for h in history],
            "reward": [h["reward"] for h in history],
        }
        (args.out / "trl_result.json").write_text(json.dumps(result))


if __name__ == "__main__":
    main()
