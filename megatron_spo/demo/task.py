"""The embedded demo's task: chained arithmetic prompts, their answers and the data splits.

The task is chained integer arithmetic that a model of a few million parameters can learn on two
CPU cores in minutes, with a spread of difficulty so reinforcement learning has something to do:

    prompt:   "Compute 7 + 5 - 3."
    response: "7 + 5 = 12. 12 - 3 = 9. \\boxed{9}"
    answer:   "9"             difficulty: 2 (the number of operations, 1..max_ops)

Each operation adds one intermediate step; an error anywhere ends in a wrong box, so accuracy
falls with difficulty. The supervised (SFT) responses carry deliberate noise: with probability
`sft_step_noise` a step's result is off by a small amount (and the error carries to the box), so a
warm-started model imitates a slightly unreliable solver. Its greedy answers are mostly right on
easy prompts and its sampled answers (temperature 1, as RL samples) are mediocre; RL with the
binary reward can remove the imitated noise, which is the improvement the demo measures.

Records hold the question only. The rollout's prompt builder appends the answer-format
instruction (`PromptConfig.answer_format_suffix`, DESIGN.md); supervised training must show the
model the same text, so `sft_prompt()` appends the same suffix, and the tokenizer
(`megatron_spo.demo.assets`) is trained on prompts in that final form.

Held-out prompts are disjoint from training and SFT prompts: a hash of the question decides
which side of the split it is on. Records are written as jsonl and parquet (`datasets`),
atomically, with every random choice seeded: the same config gives the same files.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import random
import re
from pathlib import Path
from typing import Any

from megatron_spo import atomic
from megatron_spo.errors import UserError

_BOXED_RE = re.compile(r"\\boxed\{([^{}]*)\}")


@dataclasses.dataclass(kw_only=True)
class DemoTaskConfig:
    """The synthetic arithmetic task."""

    seed: int = 0
    """Seed of every random choice (problems, noise, splits): same seed, same files."""
    num_train: int = 4000
    """RL training prompts."""
    num_val: int = 400
    """Held-out prompts (disjoint from training) for accuracy before/after."""
    num_sft: int = 6000
    """Supervised (prompt, worked response) pairs for the warm start, drawn from the training
    distribution (their questions may repeat training prompts, as an SFT corpus would)."""
    min_ops: int = 1
    """Fewest operations in a problem (difficulty 1 = one step)."""
    max_ops: int = 4
    """Most operations; with max_operand 9 four steps are hard for a ~1M-parameter model."""
    max_operand: int = 9
    """Operands are drawn from 1..max_operand."""
    max_value: int = 19
    """Every running value stays within 0..max_value (moves that would leave it are not drawn), so
    no negative numbers appear and intermediate results have at most two digits."""
    operators: tuple[str, ...] = ("+", "-")
    """Operators available; each step picks uniformly among those that keep the value in range."""
    val_share: float = 0.1
    """Share of the problem space (by a hash of the question) reserved for held-out prompts."""
    sft_step_noise: float = 0.15
    """Probability that an SFT worked step has an off-by-one/two slip (carried to the answer).
    0.15 makes the imitated solver wrong on ~15% (1 op) to ~48% (4 ops) of problems."""

    def __post_init__(self):
        if not 1 <= self.min_ops <= self.max_ops:
            raise ValueError(f"need 1 <= min_ops <= max_ops, got {self.min_ops}, {self.max_ops}")
        if self.max_operand < 1:
            raise ValueError(f"max_operand must be >= 1, got {self.max_operand}")
        if self.max_value < 1:
            raise ValueError(f"max_value must be >= 1, got {self.max_value}")
        if not self.operators or any(op not in ("+", "-") for op in self.operators):
            raise ValueError(f"operators must be a non-empty subset of ('+', '-'), got {self.operators}")
        if not 0.0 <= self.sft_step_noise < 1.0:
            raise ValueError(f"sft_step_noise must be in [0, 1), got {self.sft_step_noise}")
        if not 0.0 < self.val_share < 1.0:
            raise ValueError(f"val_share must be in (0, 1), got {self.val_share}")
        for name in ("num_train", "num_val", "num_sft"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")


@dataclasses.dataclass(kw_only=True)
class Problem:
    question: str
    """The expression, e.g. "7 + 5 - 3"."""
    operands: list[int]
    operators: list[str]

    @property
    def difficulty(self) -> int:
        return len(self.operators)

    @property
    def answer(self) -> int:
        return _evaluate(self.operands, self.operators)[-1]


def _evaluate(operands: list[int], operators: list[str]) -> list[int]:
    """Left-to-right running values: [a0, a0 op a1, ...]."""
    values = [operands[0]]
    for op, x in zip(operators, operands[1:]):
        values.append(values[-1] + x if op == "+" else values[-1] - x)
    return values


def make_prompt(question: str) -> str:
    """The dataset's prompt for a question (the rollout appends the answer-format instruction)."""
    return f"Compute {question}."


def sft_prompt(prompt: str, answer_format_suffix: str | None = None) -> str:
    """The user message as the rollout builds it: the prompt plus the answer-format suffix.

    `answer_format_suffix` defaults to the rollout's `PromptConfig` default, so supervised
    warm-up and RL show the model identical prompts.
    """
    if answer_format_suffix is None:
        from megatron_spo.rollout.prompts import PromptConfig

        answer_format_suffix = PromptConfig().answer_format_suffix
    return prompt + answer_format_suffix


def random_problem(rng: random.Random, cfg: DemoTaskConfig, num_ops: int | None = None) -> Problem:
    """A chain of `num_ops` operations whose running value stays within 0..max_value."""
    if num_ops is None:
        num_ops = rng.randint(cfg.min_ops, cfg.max_ops)
    running = rng.randint(1, min(cfg.max_operand, cfg.max_value))
    operands, operators = [running], []
    for _ in range(num_ops):
        # (operator, operand) pairs that keep the running value in range; never empty, since
        # either running - 1 >= 0 or running + 1 <= max_value holds for max_value >= 1
        moves = [
            (op, x)
            for op in cfg.operators
            for x in range(1, cfg.max_operand + 1)
            if 0 <= (running + x if op == "+" else running - x) <= cfg.max_value
        ]
        if not moves:
            moves = [(op, 1) for op in ("+", "-") if 0 <= (running + 1 if op == "+" else running - 1) <= cfg.max_value]
        op = rng.choice(sorted({m[0] for m in moves}))  # operator first, so '+' and '-' stay balanced
        x = rng.choice([m[1] for m in moves if m[0] == op])
        running = running + x if op == "+" else running - x
        operands.append(x)
        operators.append(op)
    question = " ".join([str(operands[0])] + [f"{op} {x}" for op, x in zip(operators, operands[1:])])
    return Problem(question=question, operands=operands, operators=operators)


def worked_response(problem: Problem, rng: random.Random | None = None, step_noise: float = 0.0) -> str:
    """A step-by-step solution ending in \\boxed{}; with `step_noise`, steps may slip by 1-2."""
    steps = []
    running = problem.operands[0]
    for op, x in zip(problem.operators, problem.operands[1:]):
        result = running + x if op == "+" else running - x
        if rng is not None and step_noise > 0 and rng.random() < step_noise:
            slip = rng.choice([-2, -1, 1, 2])
            result = result + slip if result + slip >= 0 else result - slip
        steps.append(f"{running} {op} {x} = {result}.")
        running = result
    return " ".join(steps) + f" \\boxed{{{running}}}"


def boxed_answer(text: str) -> str | None:
    """Content of the last \\boxed{...} in `text` (stripped), or None."""
    found = _BOXED_RE.findall(text)
    return found[-1].strip() if found else None


def is_correct(response: str, answer: str) -> bool:
    """The demo task's grader: the last boxed answer equals the ground truth exactly."""
    predicted = boxed_answer(response)
    return predicted is not None and predicted == str(answer).strip()


# ----------------------------------------------------------------------------- datasets


def is_held_out(question: str, cfg: DemoTaskConfig) -> bool:
    """Whether `question` belongs to the held-out part of the problem space.

    A hash of the question (not a draw order) decides, so the held-out share is the same for every
    difficulty and a training draw can never equal a held-out one.
    """
    digest = hashlib.sha256(f"{cfg.seed}:{question}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < cfg.val_share


def generate_splits(cfg: DemoTaskConfig) -> dict[str, list[dict[str, Any]]]:
    """Records for 'train', 'val' (held out) and 'sft'; deterministic in cfg.seed.

    train/val: {"prompt", "answer", "difficulty"}; sft: {"prompt", "response", "answer",
    "difficulty"}. Each record's difficulty is drawn uniformly from min_ops..max_ops, then a
    problem of that difficulty from its side of the held-out split. Questions can repeat within a
    split (the one-operation space is small), never across the held-out boundary.
    """
    rng = random.Random(cfg.seed)
    noise_rng = random.Random(cfg.seed + 1)

    def draw(held_out: bool) -> Problem:
        num_ops = rng.randint(cfg.min_ops, cfg.max_ops)
        for _ in range(10_000):
            problem = random_problem(rng, cfg, num_ops)
            if is_held_out(problem.question, cfg) == held_out:
                return problem
        raise UserError(
            f"demo task: no {'held-out' if held_out else 'training'} problem with {num_ops} operation(s) "
            f"found; raise max_operand or change val_share ({cfg.val_share})"
        )

    def rl_record(p: Problem) -> dict[str, Any]:
        return {"prompt": make_prompt(p.question), "answer": str(p.answer), "difficulty": p.difficulty}

    val = [rl_record(draw(True)) for _ in range(cfg.num_val)]
    train = [rl_record(draw(False)) for _ in range(cfg.num_train)]
    sft = []
    for _ in range(cfg.num_sft):
        p = draw(False)
        sft.append(
            {
                "prompt": make_prompt(p.question),
                "response": worked_response(p, noise_rng, cfg.sft_step_noise),
                "answer": str(p.answer),
                "difficulty": p.difficulty,
            }
        )
    return {"train": train, "val": val, "sft": sft}


def write_jsonl(records: list[dict[str, Any]], path: str | os.PathLike) -> Path:
    """One JSON object per line, written atomically."""
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    atomic.write_text(path, text)
    return Path(path)


def write_parquet(records: list[dict[str, Any]], path: str | os.PathLike) -> Path:
    """The same records as parquet through `datasets`, written atomically."""
    import datasets

    bars_were_on = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()  # a bar per small file is noise in the demo's output
    try:
        with atomic.open_for_write(path) as fh:
            datasets.Dataset.from_list(records).to_parquet(fh)
    finally:
        if bars_were_on:
            datasets.enable_progress_bars()
    return Path(path)
