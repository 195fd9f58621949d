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
    """Records of a .jsonl / .json / .parquet dataset file; a file that is not UTF-8 text, not
    JSON or not parquet is a UserError naming it."""
    suffix = Path(path).suffix.lower()
    if suffix == ".jsonl":
        return [record for _, record in read_jsonl_objects(path)]
    if suffix == ".json":
        try:
            with open(path, encoding="utf-8") as fh:
                records = json.load(fh)
        except UnicodeDecodeError as err:
            raise UserError(f"{path}: not UTF-8 text (byte {err.start}: {err.reason})") from None
        except json.JSONDecodeError as err:
            raise UserError(f"{path}: not valid JSON ({err.msg} at line {err.lineno})") from None
        if not isinstance(records, list) or not all(isinstance(r, dict) for r in records):
            raise UserError(f"{path}: expected a JSON list of objects")
        return records
    if suffix == ".parquet":
        import pyarrow
        import pyarrow.parquet as pq

        try:
            return pq.read_table(path).to_pylist()
        except (pyarrow.ArrowException, OSError) as err:
            raise UserError(f"{path}: not a readable parquet file ({err})".replace("\n", " ")) from None
    raise UserError(f"--data: {path} has suffix {suffix!r}; expected .jsonl, .json or .parquet")


def read_jsonl_objects(path: str | os.PathLike) -> list[tuple[int, dict[str, Any]]]:
    """(line number, object) of each non-blank line of a JSON-lines file; a line that is not UTF-8
    or not a JSON object is a UserError naming the file and line."""
    out = []
    with open(path, "rb") as fh:
        for line_no, raw in enumerate(fh, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                raise UserError(f"{path}:{line_no}: not UTF-8 text (byte {err.start} of the line: "
                                f"{err.reason})") from None
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


_MISSING = object()


def _walk(record: dict[str, Any], dotted: str) -> Any:
    value: Any = record
    for part in dotted.split("."):
        if not isinstance(value, dict) or part not in value:
            return _MISSING
        value = value[part]
    return value


def field(record: dict[str, Any], dotted: str) -> Any:
    """`record[a][b]` for "a.b"; None when a part is missing."""
    value = _walk(record, dotted)
    return None if value is _MISSING else value


def pick_field(records: list[dict[str, Any]], explicit: str | None, candidates: tuple[str, ...], what: str, path: str) -> str:
    """`explicit`, or the first of `candidates` present in record 0 (UserError naming `path`)."""
    if explicit is not None:
        return explicit
    for key in candidates:
        if field(records[0], key) is not None:
            return key
    null = [key for key in candidates if has_field(records[0], key)]
    if null:
        raise UserError(f"{path}: record 0 has {null[0]!r} but it is null; give it a value, or name another "
                        f"field with --{what}-key")
    raise UserError(
        f"{path}: record 0 has none of the {what} fields {', '.join(candidates)} "
        f"(its fields: {', '.join(records[0])}); name one with --{what}-key"
    )


def has_field(record: dict[str, Any], dotted: str) -> bool:
    """Whether `record` holds key `dotted` (dots reach into dicts), whatever its value (null too)."""
    return _walk(record, dotted) is not _MISSING


def _is_empty(value: Any) -> bool:
    """A blank string, an empty list of messages, or chat messages whose contents are all blank."""
    if isinstance(value, str):
        return not value.strip()
    if isinstance(value, (list, tuple)):
        return not value or all(isinstance(m, dict) and not str(m.get("content") or "").strip() for m in value)
    return False


def check_prompt_and_answer(record: dict[str, Any], prompt_field: str, answer_field: str, path: str,
                            index: int) -> None:
    """UserError naming `path` and record `index` when its prompt or answer is missing, null or
    empty (a blank string, no messages): such a record would train or score on nothing."""
    for name in (prompt_field, answer_field):
        value = field(record, name)
        if value is None:
            if has_field(record, name):
                raise UserError(f"{path}: record {index} has {name!r} but it is null")
            raise UserError(f"{path}: record {index} has no {name!r} key (its keys: {', '.join(map(str, record))})")
        if _is_empty(value):
            raise UserError(f"{path}: record {index} has an empty {name!r} ({value!r})")


def prompt_and_answer_fields(records: Sequence[dict[str, Any]], prompt_key: str | None, answer_key: str | None,
                             path: str) -> tuple[str, str]:
    """The prompt and ground-truth fields (`pick_field`), checked present, not null and not empty
    in every record (`check_prompt_and_answer`: UserError naming `path` and the first bad record)."""
    prompt_field = pick_field(list(records), prompt_key, PROMPT_KEYS, "prompt", path)
    answer_field = pick_field(list(records), answer_key, ANSWER_KEYS, "answer", path)
    for i, record in enumerate(records):
        check_prompt_and_answer(record, prompt_field, answer_field, path, i)
    return prompt_field, answer_field


def load_prompt_records(files: Sequence[str], prompt_key: str, answer_key: str) -> tuple[list[dict[str, Any]], int]:
    """(records, repeats dropped) of training files `files`, each record checked
    (`check_prompt_and_answer`).

    A prompt is one entry of the value store (keyed by its last user message), so a repeated one
    would silently shrink batches. A record that repeats an earlier prompt with the same answer
    is dropped (the first is kept; the caller reports the count); one that repeats it with a
    different answer is refused with one line naming the file(s) and both record indices."""
    records: list[dict[str, Any]] = []
    first_seen: dict[str, tuple[str, int, str]] = {}
    dropped = 0
    for path in files:
        for i, record in enumerate(load_records(path)):
            check_prompt_and_answer(record, prompt_key, answer_key, path, i)
            raw = raw_user_prompt(field(record, prompt_key)).strip()  # the value store's identity of it
            answer = str(field(record, answer_key)).strip()
            if raw in first_seen:
                first_path, first_index, first_answer = first_seen[raw]
                if answer == first_answer:
                    dropped += 1
                    continue
                where = f"record {first_index}" if first_path == path else f"record {first_index} of {first_path}"
                raise UserError(f"{path}: record {i} repeats the prompt of {where} ({_short(raw)}) with another "
                                f"answer ({_short(answer, 20)}, not {_short(first_answer, 20)}); each prompt needs "
                                "one answer")
            first_seen[raw] = (path, i, answer)
            records.append(record)
    return records, dropped


def _short(text: str, limit: int = 60) -> str:
    text = " ".join(text.split())
    return repr(text if len(text) <= limit else text[: limit - 3] + "...")


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
