"""Rewards: the reward config, the default math reward, and loading user reward functions.

A reward function has the signature

    fn(response: str, ground_truth: str, config: RewardConfig) -> RewardResult | float

and is named in the config as `reward.function: "package.module:function"`. The default,
`megatron_spo.rollout.rewards:math_reward`, is the authors' binary math reward (see
`math_grader` for the formula). Batches are scored by `megatron_spo.rollout.scoring.ScoringPool`,
which runs the function in worker processes (or Ray actors) with a per-item time limit.
"""

from __future__ import annotations

import dataclasses
import importlib
from typing import Callable, Literal

from megatron_spo.errors import UserError
from megatron_spo.rollout.rewards.math_grader import GradeResult, grade_math, last_boxed, normalize_answer

__all__ = [
    "RewardConfig",
    "RewardResult",
    "GradeResult",
    "math_reward",
    "load_reward_function",
    "with_answer_format",
    "grade_math",
    "last_boxed",
    "normalize_answer",
]

RewardResult = GradeResult  # what reward functions return (a bare float is accepted too)


@dataclasses.dataclass(kw_only=True)
class RewardConfig:
    function: str = "megatron_spo.rollout.rewards:math_reward"
    """Reward function as "package.module:function" (signature in the module docstring)."""
    strict_box: bool = True
    """Only a `\\boxed{}` / `\\fbox{}` answer counts (the authors' strict box verification; every
    response DAPO's strict scorer accepts is accepted, except its false positives listed in
    `math_grader`). Off: a last "Answer: ..." line is accepted when there is no box."""
    thinking: bool = False
    """The model thinks before answering: the response must contain exactly one `</think>`
    (else reward 0) and the answer is read after it. On for Qwen3 thinking runs."""
    answer_format_suffix: str = "The answer format must be: \\boxed{...}"
    """Appended to every prompt (DESIGN.md; the authors' dataset adds exactly this sentence)."""
    answer_tail_chars: int = 100
    """The answer is searched in the last this-many characters (of the text after `</think>`
    with `thinking` on). 100 is DAPO's strict path (verl `math_dapo.is_correct_strict_box` reads
    the last 100 of the 300 characters `compute_score` keeps), so a box that starts earlier
    counts for neither; it also bounds grading cost on 16k-token responses. DAPO's non-strict
    path reads an "Answer:" line in the last 300: set 300 with `strict_box: false` to match it.
    0 searches the whole response."""
    math_verify: bool = True
    """Try `math-verify` symbolic equivalence after the exact and numeric paths fail."""
    math_verify_timeout_s: int = 5
    """math-verify's own per-parse/per-compare limit (whole seconds: it uses signal.alarm)."""
    pool: Literal["process", "ray", "inline"] = "process"
    """Where batches are scored: worker processes (the default: each response has `timeout_s`,
    and a reward that crashes or hangs costs its worker, never the run), Ray actors (multi-node;
    needs the `ray` extra), or `inline`, a debugging mode that calls the reward in the caller's
    thread: it ignores `timeout_s` (a reward that sleeps hangs the run; only math-verify's own
    limit applies) and a reward that aborts the process kills the trainer."""
    workers: int = 2
    """Worker processes / Ray actors scoring in parallel."""
    timeout_s: float = 10.0
    """Per-response limit (s); a grader that takes longer is killed and scores 0. Twice the
    math-verify limit, so math-verify's own limit fires first in the normal case."""
    worker_startup_timeout_s: float = 120.0
    """How long a new worker may take to import the reward function (s); not counted in
    `timeout_s`. Generous because spawn re-imports SymPy on loaded machines."""
    ray_address: str | None = None
    """Ray cluster to join ("auto" or "ray://host:port"); None starts a local Ray instance."""
    start_method: Literal["spawn", "forkserver", "fork"] = "spawn"
    """multiprocessing start method for the process pool; "spawn" is safe next to torch threads."""

    def __post_init__(self):
        if ":" not in self.function:
            raise UserError(f"reward.function must look like 'package.module:function', got {self.function!r}")
        if self.pool not in ("process", "ray", "inline"):
            raise UserError(f"reward.pool must be process|ray|inline, got {self.pool!r}")
        if self.workers < 1:
            raise UserError(f"reward.workers must be >= 1, got {self.workers}")
        if self.timeout_s <= 0:
            raise UserError(f"reward.timeout_s must be > 0, got {self.timeout_s}")
        if self.answer_tail_chars < 0:
            raise UserError(f"reward.answer_tail_chars must be >= 0 (0: the whole response), got "
                            f"{self.answer_tail_chars}")
        if self.math_verify_timeout_s < 1:
            raise UserError(f"reward.math_verify_timeout_s must be a whole number >= 1, got "
                            f"{self.math_verify_timeout_s}")
        if self.start_method not in ("spawn", "forkserver", "fork"):
            raise UserError(f"reward.start_method must be spawn|forkserver|fork, got {self.start_method!r}")


def math_reward(response: str, ground_truth: str, config: RewardConfig) -> RewardResult:
    """The default reward: binary math correctness of the last boxed answer."""
    return grade_math(
        response,
        ground_truth,
        strict_box=config.strict_box,
        thinking=config.thinking,
        use_math_verify=config.math_verify,
        math_verify_timeout_s=config.math_verify_timeout_s,
        answer_tail_chars=config.answer_tail_chars,
    )


def with_answer_format(prompt: str, config: RewardConfig) -> str:
    """The prompt with the answer-format sentence appended (once)."""
    suffix = config.answer_format_suffix
    if not suffix or prompt.rstrip().endswith(suffix):
        return prompt
    return f"{prompt.rstrip()}\n\n{suffix}"


def load_reward_function(path: str) -> Callable[[str, str, RewardConfig], RewardResult | float]:
    """Import "package.module:function"; a UserError names what is wrong with the path."""
    module_name, _, attr = path.partition(":")
    if not module_name or not attr:
        raise UserError(f"reward.function must look like 'package.module:function', got {path!r}")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise UserError(f"reward.function {path!r}: cannot import module {module_name!r} ({e})") from e
    function = getattr(module, attr, None)
    if not callable(function):
        raise UserError(f"reward.function {path!r}: module {module_name!r} has no callable {attr!r}")
    return function
