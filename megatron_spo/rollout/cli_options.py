"""Command-line options shared by the generate-and-grade tools (`values estimate`, `eval`):
engine, sampling, prompt building, dataset fields and reward. One place, so both tools name and
document them alike."""

from __future__ import annotations

import argparse

from megatron_spo.rollout.prompts import PromptConfig
from megatron_spo.rollout.rewards import RewardConfig


def add_generation_options(parser: argparse.ArgumentParser, *, n: int, n_help: str, n_aliases: tuple[str, ...] = (),
                           temperature: float, top_p: float, top_k: int, max_tokens: int, seed: int,
                           prompts_per_call: int) -> None:
    """The options of a tool that samples `--n` responses per prompt and grades them."""
    prompt, reward = PromptConfig(), RewardConfig()
    add = parser.add_argument
    add("--n", "-n", *n_aliases, dest="n", type=int, default=n,
        help=f"{n_help} (default %(default)s; under torchrun write -n, which torchrun's own options do not swallow)")
    add("--engine", choices=("hf", "vllm"), default="hf", help="rollout engine (default %(default)s)")
    add("--tensor-parallel-size", type=int, default=1,
        help="vllm: rollout TP R, dividing the world: one engine per R consecutive ranks (1 = one per rank)")
    add("--temperature", type=float, default=temperature, help="default %(default)s")
    add("--top-p", type=float, default=top_p, help="default %(default)s")
    add("--top-k", type=int, default=top_k, help="default %(default)s (-1 disables)")
    add("--max-tokens", type=int, default=max_tokens, help="response cap (default %(default)s)")
    add("--max-prompt-tokens", type=int, default=prompt.max_prompt_tokens, help="default %(default)s")
    add("--overlong", choices=("skip", "truncate", "error"), default=prompt.overlong,
        help="longer prompts are skipped (counted), truncated to their end (counted) or an error")
    add("--answer-suffix", default=prompt.answer_format_suffix,
        help="appended to each user prompt; '' disables (default: %(default)r)")
    add("--chat-template", choices=("auto", "always", "never"), default=prompt.use_chat_template,
        help="use the tokenizer's chat template (default %(default)s: when it has one)")
    add("--prompt-key", default=None, help="record field of the prompt (default: prompt|question|problem)")
    add("--answer-key", default=None,
        help="record field of the ground truth, dots reach into dicts "
             "(default: reward_model.ground_truth|ground_truth|answer|solution)")
    add("--reward-function", default=reward.function, help="reward as package.module:function (default %(default)s)")
    add("--reward-pool", choices=("process", "ray", "inline"), default=reward.pool,
        help="where responses are scored (default %(default)s)")
    add("--thinking", action="store_true",
        help="responses think first: exactly one </think> required, answer read after it")
    add("--seed", type=int, default=seed, help="default %(default)s")
    add("--dtype", default="float32", help="engine weights dtype (default %(default)s)")
    add("--max-num-seqs", type=int, default=256, help="sequences decoded at once (default %(default)s)")
    add("--prompts-per-call", type=int, default=prompts_per_call, help="default %(default)s")
