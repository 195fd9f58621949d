"""`megatron-spo data split`: cut a training set into subsets for offline value estimation.

    megatron-spo data split --dataset train.parquet --output-dir splits --num-subsets 5

Reads a local parquet / JSON / JSONL file or a directory written by `datasets.save_to_disk`, and
writes `subset_{i}.parquet` (contiguous, near-equal shards; row order kept) atomically, so the
estimate step can run one subset per job, as in the authors' recipe (step 1 of seed 000).
"""

from __future__ import annotations

from pathlib import Path

from megatron_spo import atomic
from megatron_spo.errors import ArgumentParser, UserError


def load_local_dataset(path: str, split: str = "train"):
    """A `datasets.Dataset` from a local parquet/json/jsonl file or a `save_to_disk` directory."""
    import datasets

    source = Path(path)
    if not source.exists():
        raise UserError(f"dataset {path} does not exist (only local files and directories are read)")
    if source.is_file() and source.suffix.lower() in (".json", ".jsonl"):
        _check_json_text(source)
    if source.is_file() and source.suffix.lower() == ".parquet":
        _check_parquet(source)
    try:
        if source.is_dir():
            loaded = datasets.load_from_disk(str(source), keep_in_memory=True)
            if isinstance(loaded, datasets.DatasetDict):
                if split not in loaded:
                    raise UserError(f"dataset {path}: no split {split!r}; splits: {', '.join(loaded)}")
                loaded = loaded[split]
            return loaded
        suffix = source.suffix.lower()
        if suffix == ".parquet":
            return datasets.Dataset.from_parquet(str(source), keep_in_memory=True)
        if suffix in (".json", ".jsonl"):
            return datasets.Dataset.from_json(str(source), keep_in_memory=True)
    except UserError:
        raise
    except Exception as err:  # noqa: BLE001 - datasets/pyarrow raise many types for bad files
        raise UserError(f"dataset {path}: cannot read it ({type(err).__name__}: {err})") from err
    raise UserError(f"dataset {path}: unsupported file type {source.suffix!r} (parquet, json, jsonl, or a saved directory)")


def _check_json_text(source: Path) -> None:
    """A JSON / JSON-lines file must be UTF-8 and hold something (the reader's own errors for
    either are a traceback or a bare `StopIteration`)."""
    with open(source, "rb") as fh:
        for line_no, raw in enumerate(fh, 1):
            try:
                raw.decode("utf-8")
            except UnicodeDecodeError as err:
                raise UserError(f"dataset {source}:{line_no}: not UTF-8 text ({err.reason})") from None
    if not source.read_bytes().strip():
        raise UserError(f"dataset {source} is empty (no rows)")


def _check_parquet(source: Path) -> None:
    """A parquet file's footer must be readable (`datasets` would log its own error line first)."""
    import pyarrow
    import pyarrow.parquet as pq

    try:
        pq.read_metadata(source)
    except (pyarrow.ArrowException, OSError) as err:
        raise UserError(f"dataset {source}: not a readable parquet file ({err})".replace("\n", " ")) from None


def split_dataset(dataset_path: str, output_dir: str, num_subsets: int, split: str = "train", *,
                  overwrite: bool = False) -> list[Path]:
    """Write `subset_{i}.parquet` for i < num_subsets; returns their paths.

    An output directory that already holds subsets (of this dataset or another) is refused, or
    with `overwrite` cleared of every `subset_*.parquet` first: the directory never mixes subsets
    of two splits."""
    out = atomic.check_output_location(output_dir, "--output-dir", kind="dir")
    old = sorted(out.glob("subset_*.parquet")) if out.is_dir() else []
    if old and not overwrite:
        raise UserError(f"--output-dir {out} already holds {len(old)} subset_*.parquet files; give an empty "
                        "directory, or pass --overwrite to replace them")
    dataset = load_local_dataset(dataset_path, split)
    if len(dataset) == 0:
        raise UserError(f"dataset {dataset_path} has no rows")
    if not 1 <= num_subsets <= len(dataset):
        raise UserError(f"--num-subsets must be between 1 and the {len(dataset)} rows, got {num_subsets}")
    for path in old:
        path.unlink()
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for index in range(num_subsets):
        shard = dataset.shard(num_shards=num_subsets, index=index, contiguous=True)
        path = out / f"subset_{index}.parquet"
        with atomic.open_for_write(path) as fh:
            shard.to_parquet(fh)
        paths.append(path)
    return paths


def main(argv: list[str]) -> int:
    parser = ArgumentParser(prog="megatron-spo data", description="dataset tools")
    commands = parser.add_subparsers(dest="command", required=True)
    split = commands.add_parser(
        "split",
        help="split a dataset into subset_{i}.parquet files",
        description="Split a local dataset into contiguous, near-equal subsets written as "
        "subset_{i}.parquet (the input of `megatron-spo values estimate`).",
    )
    split.add_argument("--dataset", required=True, help="parquet/json/jsonl file or a save_to_disk directory")
    split.add_argument("--output-dir", required=True, help="directory for subset_{i}.parquet")
    split.add_argument("--num-subsets", type=int, default=5, help="number of subsets (default: 5)")
    split.add_argument("--split", default="train", help="split of a saved DatasetDict (default: train)")
    split.add_argument("--overwrite", action="store_true",
                       help="remove the subset_*.parquet files already in --output-dir, then write")
    args = parser.parse_args(argv)
    paths = split_dataset(args.dataset, args.output_dir, args.num_subsets, args.split, overwrite=args.overwrite)
    print(f"wrote {len(paths)} subsets to {args.output_dir}")
    return 0
