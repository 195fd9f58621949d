"""The command line of the generate-and-grade tools (`values estimate`, `eval`).

Both read the same strict YAML + dotted overrides as `train` (`megatron_spo.config.load_config`):

    megatron-spo eval --config eval.yaml [key=value ...]
    megatron-spo eval --model HF_DIR --data aime24.parquet -n 32 --engine vllm reward.thinking=true

A few short flags cover the common cases and only set config keys: `--model` (model), `--data`
(data), the output flag (`--out` / `--output-dir`), `-n` (n) and `--engine` (engine.name). The file
comes first, then the flags, then the dotted overrides (last wins). Flags of earlier versions that
became config keys are refused with one line naming the key.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any, TypeVar

from megatron_spo.errors import ArgumentParser, UserError

T = TypeVar("T")

# flags of earlier versions -> the config key that replaced them
OLD_FLAGS = {
    "--max-tokens": "max_response_tokens",
    "--temperature": "temperature",
    "--top-p": "top_p",
    "--top-k": "top_k",
    "--seed": "seed",
    "--ks": "ks",
    "--correct-min-score": "correct_min_score",
    "--prompts-per-call": "prompts_per_call",
    "--prompt-key": "prompt_key",
    "--answer-key": "answer_key",
    "--max-prompt-tokens": "prompt.max_prompt_tokens",
    "--overlong": "prompt.overlong",
    "--answer-suffix": "prompt.answer_format_suffix",
    "--chat-template": "prompt.use_chat_template",
    "--reward-function": "reward.function",
    "--reward-pool": "reward.pool",
    "--thinking": "reward.thinking",
    "--dtype": "engine.dtype",
    "--max-num-seqs": "engine.max_num_seqs",
    "--max-model-len": "engine.max_model_len",
    "--tensor-parallel-size": "engine.tensor_parallel_size",
}


def build_parser(cls: type, *, prog: str, description: str, example: str, out_flag: str, out_help: str,
                 n_help: str, n_aliases: tuple[str, ...] = ()) -> argparse.ArgumentParser:
    """The tool's parser: --config, the short flags and the dotted overrides; `--help` lists every key."""
    from megatron_spo.config import describe

    parser = ArgumentParser(
        prog=prog, description=description, formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=f"example: {example}\n\nconfig keys (YAML or key=value):\n  " + "\n  ".join(describe(cls)),
    )
    add = parser.add_argument
    add("--config", type=Path, help="YAML file with the config keys below")
    add("--model", help="Hugging Face model directory (key: model)")
    add("--data", help="dataset file: .jsonl, .json or .parquet (key: data)")
    add(out_flag, dest="out", help=f"{out_help} (key: {out_flag.lstrip('-').replace('-', '_')})")
    add("-n", "--n", *n_aliases, dest="n", type=str, default=None,
        help=f"{n_help} (key: n; under torchrun write -n, which torchrun's own options do not swallow)")
    add("--engine", default=None, help="rollout engine, hf or vllm (key: engine.name)")
    add("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. temperature=1.0 engine.dtype=bfloat16")
    return parser


def refuse_old_flags(argv: list[str]) -> None:
    """One line naming the config key of a flag that earlier versions had."""
    for arg in argv:
        flag = arg.split("=", 1)[0]
        if flag in OLD_FLAGS:
            key = OLD_FLAGS[flag]
            value = "true" if flag == "--thinking" else "VALUE"
            raise UserError(f"{flag} is now the config key {key}: write {key}={value} (or set it in --config FILE)")


def load_command_config(cls: type[T], args: argparse.Namespace, *, out_key: str) -> T:
    """`cls` from --config, then the short flags, then the dotted overrides (last wins)."""
    from megatron_spo.config import load_config

    if args.config is not None and not Path(args.config).is_file():
        raise UserError(f"config file {args.config} does not exist")
    # path flags are set as given (not parsed as YAML), so a path spelled like `yes` stays a path
    values: dict[str, Any] = {key: value for key, value in (("model", args.model), ("data", args.data),
                                                            (out_key, args.out)) if value is not None}
    flags = [f"{key}={value}" for key, value in (("n", args.n), ("engine.name", args.engine)) if value is not None]
    return load_config(cls, args.config, [*flags, *args.overrides], values=values)
