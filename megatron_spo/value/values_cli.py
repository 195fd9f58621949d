"""`megatron-spo values <estimate|merge>`: the offline-value pipeline.

    megatron-spo values merge --input-dir runs/offline --output-file offline_values.json
    megatron-spo values estimate ...   (sampling + scoring; megatron_spo.rollout.estimate)

`merge` reads the estimate step's JSONL files (`<run>/validation_data/*.jsonl`, one line per
scored response with `input` and `score`, the layout of the authors' verl recipe), recovers the
raw user prompt from each chat-templated `input`, and writes `{prompt: [scores...]}` atomically.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from megatron_spo import atomic
from megatron_spo.errors import ArgumentParser, UserError
from megatron_spo.value.offline import (
    DEFAULT_PATTERN,
    TEMPLATES,
    merge_offline_values,
    write_offline_values,
)

_ESTIMATE_MODULE = "megatron_spo.rollout.estimate"


def _merge_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(
        prog="megatron-spo values merge",
        description=(
            "Merge scored responses into the offline values file {prompt: [scores...]} that "
            "initialises SPO's value store. Keys are raw dataset prompts, recovered from "
            "chat-templated inputs. Bad lines are skipped and counted; the statistics are printed."
        ),
    )
    parser.add_argument("--input-dir", required=True, help="directory holding the estimate runs")
    parser.add_argument("--output-file", required=True, help="JSON file to write (atomically)")
    parser.add_argument(
        "--pattern", default=DEFAULT_PATTERN, help=f"glob under --input-dir (default: {DEFAULT_PATTERN})"
    )
    parser.add_argument(
        "--max-scores-per-prompt", type=int, default=8,
        help="keep at most this many scores per prompt, a seeded random subset (default: 8)",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the subsampling (default: 0)")
    parser.add_argument(
        "--template", choices=TEMPLATES, default="auto",
        help="chat template of the `input` field; auto tries ChatML/Qwen, Llama-3, Gemma, Llama-2 "
        "(with or without special tokens), then plain text (default: auto)",
    )
    parser.add_argument(
        "--strip-suffix", action="append", default=[], metavar="TEXT",
        help="remove TEXT from the end of each prompt, e.g. an answer-format instruction the "
        "rollout appended; repeatable",
    )
    return parser


def merge_main(argv: list[str]) -> int:
    args = _merge_parser().parse_args(argv)
    atomic.check_output_location(args.output_file, "--output-file")  # before the merge, not after it
    merged, report = merge_offline_values(
        args.input_dir,
        pattern=args.pattern,
        max_scores_per_prompt=args.max_scores_per_prompt,
        seed=args.seed,
        template=args.template,
        strip_suffixes=args.strip_suffix,
    )
    write_offline_values(args.output_file, merged)
    print(report.summary(merged))
    print(f"wrote {len(merged)} prompts to {args.output_file}")
    return 0


def _usage() -> str:
    return (
        "usage: megatron-spo values <command> [args...]\n\n"
        "commands:\n"
        "  estimate  sample and score N responses per prompt with a model (offline values, step 2)\n"
        "  merge     merge scored responses into {prompt: [scores...]} (step 3)\n\n"
        "`megatron-spo values <command> --help` describes a command."
    )


def main(argv: list[str]) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0
    command, rest = argv[0], argv[1:]
    if command == "merge":
        return merge_main(rest)
    if command == "estimate":
        try:
            module = importlib.import_module(_ESTIMATE_MODULE)
        except ModuleNotFoundError as err:
            if err.name != _ESTIMATE_MODULE:
                raise
            raise UserError(f"`values estimate` needs {_ESTIMATE_MODULE}, which this install lacks") from err
        return int(module.main(rest) or 0)
    print(f"megatron-spo values: unknown command {command!r}; valid: estimate, merge", file=sys.stderr)
    return 2
