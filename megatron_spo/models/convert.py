"""`megatron-spo convert`: move models between Hugging Face directories and Megatron checkpoints.

    megatron-spo convert hf-to-mcore --hf-dir DIR --out CKPT [--tp N] [--pp N]
    megatron-spo convert mcore-to-hf --ckpt CKPT --out DIR [--tp N] [--pp N]

Both run as one process or under `torchrun` at any TP x PP (the world size must be a multiple of
TP x PP). A Megatron checkpoint loads at any TP/PP whatever it was written at. Outputs are built
under a temporary name and renamed at the end; on any error nothing with the output's name is left.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from megatron_spo import atomic
from megatron_spo.errors import ArgumentParser, UserError


def _parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(prog="megatron-spo convert", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="direction", required=True)
    common = ArgumentParser(add_help=False)
    common.add_argument("--out", required=True, type=Path, help="output directory (must not exist)")
    common.add_argument("--tp", type=int, default=1, help="tensor parallel size [1]")
    common.add_argument("--pp", type=int, default=1, help="pipeline parallel size [1]")
    common.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                        help="dtype of the written weights [the source's]")
    common.add_argument("--overwrite", action="store_true", help="replace an existing output")
    to_mcore = sub.add_parser("hf-to-mcore", parents=[common], help="HF directory -> Megatron distributed checkpoint")
    to_mcore.add_argument("--hf-dir", required=True, type=Path, help="HF model directory (safetensors)")
    to_hf = sub.add_parser("mcore-to-hf", parents=[common], help="Megatron checkpoint -> HF directory")
    to_hf.add_argument("--ckpt", required=True, type=Path, help="megatron-spo checkpoint directory")
    to_hf.add_argument("--max-shard-size", default="2GB",
                       help="largest safetensors file, e.g. 500MB or 2GB [2GB]")
    return parser


def parse_size(text: str) -> int:
    units = {"KB": 1024, "MB": 1024**2, "GB": 1024**3, "B": 1}
    upper = text.strip().upper()
    for unit, scale in units.items():
        if upper.endswith(unit):
            try:
                return int(float(upper[: -len(unit)]) * scale)
            except ValueError:
                break
    raise UserError(f"--max-shard-size {text!r} is not a size like 500MB or 2GB")


def _source_dtype(hf_side_dir: Path):
    import json

    from megatron_spo.models.checkpoint import DTYPES

    config = json.loads((hf_side_dir / "config.json").read_text())
    return DTYPES.get(config.get("dtype") or config.get("torch_dtype") or "float32", None)


def main(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    import torch

    from megatron_spo import platform
    from megatron_spo.models import checkpoint as ckpt
    from megatron_spo.models.hf_config import load_model_spec

    source = args.hf_dir if args.direction == "hf-to-mcore" else args.ckpt
    for flag, size in (("--tp", args.tp), ("--pp", args.pp)):
        if size < 1:
            raise UserError(f"{flag} must be >= 1, got {size}")
    if args.out.exists() and not args.overwrite:
        raise UserError(f"output {args.out} already exists (pass --overwrite to replace it)")
    atomic.check_output_location(args.out, "--out", kind="dir")
    # validate everything cheap before any process group or output exists
    if args.direction == "mcore-to-hf":
        ckpt.read_checkpoint_meta(source)
    side_dir = ckpt.hf_side_dir_of(source)
    spec = load_model_spec(side_dir)
    spec.check_parallel(args.tp, args.pp)
    max_shard = parse_size(args.max_shard_size) if args.direction == "mcore-to-hf" else 0
    dtype = ckpt.parse_dtype(args.dtype) if args.dtype else (_source_dtype(side_dir) or torch.float32)

    start = time.perf_counter()
    owns_process_group = not torch.distributed.is_initialized()
    parallel = platform.init_distributed(args.tp, args.pp)
    try:
        spec, chunks, bridge = ckpt.load_pretrained(source, parallel, dtype=dtype)
        if args.direction == "hf-to-mcore":
            ckpt.save_mcore_checkpoint(
                chunks, parallel, args.out, hf_side_dir=side_dir, architecture=spec.architecture,
                dtype=dtype, overwrite=args.overwrite,
            )
        else:
            ckpt.save_hf_checkpoint(
                bridge.export_hf(chunks, dtype=dtype), args.out, hf_side_dir=side_dir, dtype=dtype,
                write=parallel.rank == 0, max_shard_bytes=max_shard, overwrite=args.overwrite,
            )
        if parallel.world_size > 1:
            torch.distributed.barrier()
    finally:
        if owns_process_group:
            platform.destroy_distributed()
    if parallel.rank == 0:
        print(
            f"converted {spec.architecture} {source} -> {args.out} ({args.direction}, TP={args.tp}, "
            f"PP={args.pp}, {ckpt.dtype_name(dtype)}) in {time.perf_counter() - start:.1f}s",
            file=sys.stderr,
        )
    return 0
