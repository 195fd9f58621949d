"""`megatron-spo sft`: supervised warm start of an HF model on prompt/response pairs.

    megatron-spo sft --model HF_DIR --data sft.jsonl --out OUT_HF_DIR [key=value ...]
    megatron-spo sft --config sft.yaml [key=value ...]
    torchrun --nproc-per-node 4 -m megatron_spo sft --config sft.yaml tp=2

The flags set the config keys `model`, `data_files` and `out`; everything else is a config key
(see the list below), given in the YAML file or as a dotted override (`prompt.use_chat_template=never`).
Runs as one process or under torchrun at any TP x PP; the rest of the world size is data parallel.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from megatron_spo.errors import ArgumentParser, UserError


def _parser() -> argparse.ArgumentParser:
    from megatron_spo.config import describe
    from megatron_spo.training.sft import SFTConfig

    parser = ArgumentParser(
        prog="megatron-spo sft",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="config keys:\n  " + "\n  ".join(describe(SFTConfig)),
    )
    parser.add_argument("--config", type=Path, help="YAML file with SFTConfig keys")
    parser.add_argument("--model", help="starting HF model directory or megatron-spo checkpoint (key: model)")
    parser.add_argument("--data", action="append", metavar="FILE",
                        help=".jsonl/.json/.parquet file; repeat for several (key: data_files)")
    parser.add_argument("--out", help="output HF directory (key: out)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output (key: overwrite)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. optimizer.lr=1e-5 max_steps=200")
    return parser


def load_sft_config(args: argparse.Namespace):
    """The SFTConfig of the YAML file, then the flags, then the dotted overrides (last wins)."""
    from megatron_spo.config import apply_overrides, from_dict, load_yaml
    from megatron_spo.training.sft import SFTConfig

    data = load_yaml(args.config) if args.config is not None else {}
    # flags are set as values (not re-parsed as YAML), so a path spelled like `yes` stays a path
    for key, value in (("model", args.model), ("data_files", args.data), ("out", args.out)):
        if value is not None:
            data[key] = value
    if args.overwrite:
        data["overwrite"] = True
    data = apply_overrides(SFTConfig, data, args.overrides)
    where = f"config {str(args.config)!r}" if args.config is not None else "sft options"
    return from_dict(SFTConfig, data, where=where)


def main(argv: list[str]) -> int:
    args = _parser().parse_intermixed_args(argv)  # overrides may sit before, between or after the flags
    if args.config is None and None in (args.model, args.data, args.out):
        raise UserError("give --config FILE.yaml, or all of --model, --data and --out")
    config = load_sft_config(args)
    import torch

    from megatron_spo import atomic, platform
    from megatron_spo.models.checkpoint import hf_side_dir_of
    from megatron_spo.training.sft import build_dataset, check_inputs, load_tokenizer, run_sft

    # Everything a user can get wrong is checked before process groups or outputs exist.
    check_inputs(config)
    atomic.check_output_location(config.out, "out", kind="dir")
    if config.metrics_file:
        atomic.check_output_location(config.metrics_file, "metrics_file")
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size % (config.tp * config.pp) or config.global_batch_size % (world_size // (config.tp * config.pp)):
        raise UserError(
            f"world size {world_size} must be a multiple of tp x pp = {config.tp * config.pp}, and "
            f"global_batch_size={config.global_batch_size} a multiple of the data-parallel size"
        )
    dataset = build_dataset(config, load_tokenizer(hf_side_dir_of(config.model)))

    owns_process_group = not torch.distributed.is_initialized()
    parallel = platform.init_distributed(config.tp, config.pp)
    try:
        run_sft(config, parallel, dataset)
    finally:
        if owns_process_group:
            platform.destroy_distributed()
    return 0
