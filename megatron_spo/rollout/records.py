"""Dataset records: reading .jsonl / .json / .parquet files and finding their prompt / answer
fields. Shared by `megatron-spo values estimate`, `eval`, `sft` and `train`."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from megatron_spo.errors import UserError
from megatron_spo.rollout.prompts import to_messages

PROMPT_KEYS = ("prompt", "question", "problem")
"""Fields tried, in order, for the prompt when none is named."""
ANSWER_KEYS = ("reward_model.ground_truth", "ground_truth", "answer", "solution")
"""Fields tried, in order, for the ground truth when none is named (dots reach into dicts)."""


def load_records(path: str) -> list[dict[str, Any]]:
    """Records of a .jsonl / .json / .parquet dataset file."""
    suffix = Path(path).suffix.lower()
    if suffix == ".jsonl":
        return [record for _, record in read_jsonl_objects(path)]
    if suffix == ".json":
        with open(path, encoding="utf-8") as fh:
            try:
                records = json.load(fh)
            except json.JSONDecodeError as err:
                raise UserError(f"{path}: not valid JSON ({err.msg} at line {err.lineno})") from err
        if not isinstance(records, list) or not all(isinstance(r, dict) for r in records):
            raise UserError(f"{path}: expected a JSON list of objects")
        return records
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        return pq.read_table(path).to_pylist()
    raise UserError(f"--data: {path} has suffix {suffix!r}; expected .jsonl, .json or .parquet")


def read_jsonl_objects(path: str | os.PathLike) -> list[tuple[int, dict[str, Any]]]:
    """(line number, object) of each non-blank line of a JSON-lines file; a line that is not a JSON
    object is a UserError naming the file and line."""
    out = []
    with open(path, encoding="utf-8") as fh:
        for line_no, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise UserError(f"{path}:{line_no}: not valid JSON ({err.msg} at column {err.colno})") from None
            if not isinstance(record, dict):
                raise UserError(f"{path}:{line_no}: expected a JSON object, got {type(record).__name__}")
            out.append((line_no, record))
    return out


def field(record: dict[str, Any], dotted: str) -> Any:
    """`record[a][b]` for "a.b"; None when a part is missing."""
    value: Any = record
    for part in dotted.split("."):
        if not isinstance(value, dict) or part not in value:
            return None
        value = value[part]
    return value


def pick_field(records: list[dict[str, Any]], explicit: str | None, candidates: tuple[str, ...], what: str, path: str) -> str:
    """`explicit`, or the first of `candidates` present in record 0 (UserError naming `path`)."""
    if explicit is not None:
        return explicit
    for key in candidates:
        if field(records[0], key) is not None:
            return key
    raise UserError(
        f"{path}: record 0 has none of the {what} fields {', '.join(candidates)} "
        f"(its fields: {', '.join(records[0])}); name one with --{what}-key"
    )


def prompt_and_answer_fields(records: Sequence[dict[str, Any]], prompt_key: str | None, answer_key: str | None,
                             path: str) -> tuple[str, str]:
    """The prompt and ground-truth fields (`pick_field`), checked present in every record
    (UserError naming `path` and the first record without one)."""
    prompt_field = pick_field(list(records), prompt_key, PROMPT_KEYS, "prompt", path)
    answer_field = pick_field(list(records), answer_key, ANSWER_KEYS, "answer", path)
    for i, record in enumerate(records):
        for name in (prompt_field, answer_field):
            if field(record, name) is None:
                raise UserError(f"{path}: record {i} has no {name!r}")
    return prompt_field, answer_field


def raw_user_prompt(prompt: Any) -> str:
    """The last user message of a prompt (text or chat messages): its value-store identity."""
    messages = to_messages(prompt)
    users = [m["content"] for m in messages if m["role"] == "user"]
    return users[-1] if users else messages[-1]["content"]


def init_ranks() -> tuple[int, int]:
    """(rank, world size); initialises torch.distributed under torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1
    from megatron_spo import platform

    # the platform's init: the right backend, and each rank on its own device (LOCAL_RANK)
    ctx = platform.init_distributed(tp=1, pp=1)
    return ctx.rank, ctx.world_size
