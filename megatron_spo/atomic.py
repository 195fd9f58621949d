"""Atomic outputs: a file or directory either appears complete under its final name or not at all.

Everything megatron-spo writes for later use (checkpoints, converted models, offline values,
configs, summaries) goes through here: content is written under a hidden temporary name beside
the target and renamed into place at the end, so a crash or a kill leaves nothing that a later run
would mistake for a finished output.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Any, Iterator


def write_bytes(path: str | Path, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_text(path: str | Path, text: str) -> None:
    write_bytes(path, text.encode("utf-8"))


def write_json(path: str | Path, obj: Any, *, indent: int | None = 2) -> None:
    write_text(path, json.dumps(obj, indent=indent, sort_keys=False) + "\n")


def temp_dir_for(target: str | Path) -> Path:
    """A fresh hidden sibling directory name for building `target` before the rename."""
    target = Path(target)
    return target.parent / f".{target.name}.tmp-{uuid.uuid4().hex[:8]}"


def publish_dir(tmp: Path, target: str | Path, *, overwrite: bool = False) -> None:
    """Rename a finished temporary directory to `target` (replacing it when `overwrite`)."""
    target = Path(target)
    if target.exists():
        if not overwrite:
            raise FileExistsError(f"{target} already exists")
        trash = target.parent / f".{target.name}.old-{uuid.uuid4().hex[:8]}"
        os.replace(target, trash)
        os.replace(tmp, target)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.replace(tmp, target)


@contextlib.contextmanager
def atomic_dir(target: str | Path, *, overwrite: bool = False) -> Iterator[Path]:
    """Build a directory in a temporary sibling; rename it to `target` only if the body succeeds."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_dir_for(target)
    tmp.mkdir()
    try:
        yield tmp
        publish_dir(tmp, target, overwrite=overwrite)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
