"""Atomic outputs: a file or directory either appears complete under its final name or not at all.

Everything megatron-spo writes for later use (checkpoints, converted models, offline values,
configs, summaries) goes through here: content is written under a hidden temporary name beside
the target and renamed into place at the end, so a crash or a kill leaves nothing that a later run
would mistake for a finished output. Files and directories get the permissions the umask gives
any new file (0644 / 0755 under the usual 022), not a private temporary's.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Any, BinaryIO, Iterator

from megatron_spo.errors import UserError


@contextlib.contextmanager
def open_for_write(path: str | Path) -> Iterator[BinaryIO]:
    """A binary file whose content appears at `path`, complete, when the block exits normally.

    The handle writes a hidden sibling that is fsynced and renamed over `path` at the end; an
    exception in the block (or a kill) leaves any earlier file at `path` as it was and no temporary
    behind (a kill may leave the hidden `.name.tmp-*` file, never a partial `path`). For writers
    that stream, e.g. `np.savez(fh, ...)`, `Dataset.to_parquet(fh)` or `fig.savefig(fh)`.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    # O_EXCL: the temporary is ours alone. Mode 0o666 lets the umask decide, as open() does, so the
    # output gets the permissions any other file would (tempfile.mkstemp's 0o600 would make every
    # output readable by its writer only).
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "wb") as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def write_bytes(path: str | Path, data: bytes) -> None:
    with open_for_write(path) as fh:
        fh.write(data)


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


def check_output_location(path: str | Path, what: str, *, kind: str = "file") -> Path:
    """UserError unless an output of `kind` ("file" or "dir") can be written at `path`: the path
    is not taken by the other kind, no parent is a file, and the nearest existing ancestor is a
    writable directory. For the checks a command makes before any work, so a bad output location
    costs a second, not a finished run. `what` names the flag or key in the message."""
    path = Path(path)
    if kind == "file" and path.is_dir():
        raise UserError(f"{what}: {path} is a directory; give the path of a file to write")
    if kind == "dir" and path.exists() and not path.is_dir():
        raise UserError(f"{what}: {path} is a file; give the path of a directory to write")
    ancestor = path if kind == "dir" and path.is_dir() else path.parent
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise UserError(f"{what}: cannot write {path}: {ancestor} is a file, not a directory")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise UserError(f"{what}: cannot write {path}: {ancestor} is not writable (read-only or permission denied)")
    return path
