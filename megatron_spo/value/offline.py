"""Offline values: the `{prompt: [scores...]}` file that initialises the value store, and `merge`.

The authors' pipeline (seed 000): split the training set into subsets, sample N responses per
prompt with the base model and score them (one JSONL line per response under
`<run>/validation_data/<step>.jsonl`, fields `input`, `output`, `score`, ...), then merge the
lines into `offline_values.json` mapping each prompt to its scores, at most
`max_scores_per_prompt` of them, randomly subsampled.

The key of the merged file is the *raw dataset prompt* (the user message as the dataset stores
it, stripped of surrounding whitespace), since that is what the trainer looks up. The `input`
field, however, is the chat-templated prompt, in verl's dump decoded *without* special tokens
(`system\\n...\\nuser\\n<prompt>\\nassistant\\n`). `extract_user_prompt` recovers the user message
from ChatML/Qwen, Llama-3, Gemma and Llama-2 templates, with or without their special tokens,
and from plain text; it takes the text between the first user header and the final assistant
header, so a prompt that itself contains "user\\n" survives (the authors' `split("user\\n")[-1]`
cuts it). If the rollout appended an answer-format instruction to every prompt, pass it as a
suffix to strip. A record may also carry the raw prompt directly in a `prompt` field (the
estimate step of this project writes one); it then wins over `input`.
"""

from __future__ import annotations

import dataclasses
import glob
import itertools
import json
import logging
import math
import os
import re
from collections import defaultdict
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from megatron_spo import atomic
from megatron_spo.errors import UserError

logger = logging.getLogger(__name__)

DEFAULT_PATTERN = "*/validation_data/*.jsonl"
TEMPLATES = ("auto", "chatml", "llama3", "gemma", "llama2", "chatml-decoded", "llama3-decoded", "plain")

# (name, pattern); group 1 is the user message. Templates with special tokens match the last
# user turn; decoded ones (special tokens dropped) span first user header .. final assistant header.
_THINK = r"(?:<think>\s*</think>\s*)?"
_TEMPLATE_PATTERNS: list[tuple[str, re.Pattern]] = [
    ("chatml", re.compile(r".*<\|im_start\|>user\n(.*?)<\|im_end\|>", re.S)),
    ("llama3", re.compile(r".*<\|start_header_id\|>user<\|end_header_id\|>\n\n(.*?)<\|eot_id\|>", re.S)),
    ("gemma", re.compile(r".*<start_of_turn>user\n(.*?)<end_of_turn>", re.S)),
    ("llama2", re.compile(r".*\[INST\](?:\s*<<SYS>>.*?<</SYS>>)?(.*?)\[/INST\]", re.S)),
    ("chatml-decoded", re.compile(r"(?:\A|\n)user\n(.*)\nassistant\n?" + _THINK + r"\Z", re.S)),
    ("llama3-decoded", re.compile(r"user\n\n(.*)assistant\n\n" + _THINK + r"\Z", re.S)),
]


def extract_user_prompt(text: str, template: str = "auto", strip_suffixes: Sequence[str] = ()) -> str | None:
    """The raw user prompt inside a (possibly chat-templated) model input, or None if `template`
    is given and does not match. `auto` tries the templates in a fixed order, then plain text."""
    if template not in TEMPLATES:
        raise UserError(f"unknown prompt template {template!r}; valid: {', '.join(TEMPLATES)}")
    prompt = None
    for name, pattern in _TEMPLATE_PATTERNS:
        if template in ("auto", name):
            match = pattern.match(text) if name in ("chatml", "llama3", "gemma", "llama2") else pattern.search(text)
            if match:
                prompt = match.group(1)
                break
    if prompt is None and template in ("auto", "plain"):
        prompt = text
    if prompt is None:
        return None
    prompt = prompt.strip()
    for suffix in strip_suffixes:
        suffix = suffix.strip()
        if suffix and prompt.endswith(suffix):
            prompt = prompt[: -len(suffix)].rstrip()
    return prompt


# ----------------------------------------------------------------------------- the offline file


def _bad_score(scores: Any) -> Any:
    """The first entry of `scores` that is not a finite number (bools count as non-numeric)."""
    if not isinstance(scores, list):
        return scores
    for score in scores:
        if isinstance(score, bool) or not isinstance(score, (int, float)) or not math.isfinite(score):
            return score
    return None


def _refuse_scores(source: str, prompt: str, scores: Any) -> UserError:
    where = f"{source}: prompt {prompt[:60]!r}"
    if not isinstance(scores, list):
        return UserError(f"{where}: scores must be a list of numbers, got {type(scores).__name__}")
    return UserError(f"{where}: score {_bad_score(scores)!r} is not a finite number")


def offline_counts(
    mapping: Mapping[str, Sequence[float]], source: str, chunk_prompts: int = 1 << 20
) -> tuple[list[str], np.ndarray, np.ndarray]:
    """(prompts, successes (P,), totals (P,)) of an offline mapping; scores binarised (s > 0).

    Vectorised over chunks of prompts (a Python loop over 10 million prompts costs a minute);
    a score that is not a finite number raises UserError naming the prompt.
    """
    prompts = list(mapping)
    all_lists = list(mapping.values())  # same order as the keys
    successes = np.empty(len(prompts), dtype=np.int64)
    totals = np.empty(len(prompts), dtype=np.int64)
    for start in range(0, len(prompts), chunk_prompts):
        chunk = prompts[start : start + chunk_prompts]
        lists = all_lists[start : start + chunk_prompts]
        if set(map(type, lists)) != {list}:
            bad = next(i for i, scores in enumerate(lists) if type(scores) is not list)
            raise _refuse_scores(source, chunk[bad], lists[bad])
        flat = list(itertools.chain.from_iterable(lists))
        lengths = np.fromiter(map(len, lists), dtype=np.int64, count=len(lists))
        if not set(map(type, flat)) <= {int, float}:  # str, bool, None, nested lists
            bad = next(i for i, scores in enumerate(lists) if _bad_score(scores) is not None)
            raise _refuse_scores(source, chunk[bad], lists[bad])
        values = np.array(flat, dtype=np.float64)
        if not np.all(np.isfinite(values)):
            bad = int(np.repeat(np.arange(len(lists)), lengths)[np.flatnonzero(~np.isfinite(values))[0]])
            raise _refuse_scores(source, chunk[bad], lists[bad])
        owner = np.repeat(np.arange(len(lists)), lengths)  # (scores,) prompt index of each score
        successes[start : start + len(chunk)] = np.bincount(owner, weights=values > 0, minlength=len(lists))
        totals[start : start + len(chunk)] = lengths
    return prompts, successes, totals


def load_offline_values(path: str | os.PathLike) -> dict[str, list[float]]:
    """Read an offline values file `{prompt: [scores...]}` (scores are checked by `offline_counts`)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"offline values file {path} does not exist")
    try:
        with open(path, encoding="utf-8") as fh:
            mapping = json.load(fh)
    except json.JSONDecodeError as err:
        raise UserError(f"{path}: line {err.lineno} column {err.colno}: invalid JSON ({err.msg})") from err
    except UnicodeDecodeError as err:
        raise UserError(f"{path}: not UTF-8 text ({err})") from err
    if not isinstance(mapping, dict):
        raise UserError(f"{path}: expected a JSON object {{prompt: [scores...]}}, got {type(mapping).__name__}")
    if not mapping:
        raise UserError(f"{path}: no prompts (an empty offline values file)")
    return mapping


def write_offline_values(path: str | os.PathLike, mapping: Mapping[str, Sequence[float]]) -> None:
    """Write `{prompt: [scores...]}` atomically (`megatron_spo.atomic`)."""
    atomic.write_text(path, json.dumps(mapping, ensure_ascii=False, indent=1))


# ----------------------------------------------------------------------------- merge


@dataclasses.dataclass(kw_only=True)
class MergeReport:
    """What `merge_offline_values` read, kept and skipped (printed by the CLI)."""

    files: int = 0
    records: int = 0
    """Lines that contributed a score."""
    skipped: dict[str, int] = dataclasses.field(default_factory=lambda: defaultdict(int))
    """Skipped lines by reason."""
    examples: dict[str, str] = dataclasses.field(default_factory=dict)
    """First `file:line` per skip reason (and per duplicate prompt)."""
    cross_subset_duplicates: int = 0
    """Prompts found in more than one file; their scores are pooled."""
    prompts: int = 0
    subsampled: int = 0
    """Prompts that had more than max_scores_per_prompt scores."""

    def skip(self, reason: str, where: str) -> None:
        self.skipped[reason] += 1
        self.examples.setdefault(reason, where)

    def summary(self, mapping: Mapping[str, Sequence[float]]) -> str:
        counts = np.array([len(s) for s in mapping.values()]) if mapping else np.zeros(1)
        rates = np.array([np.mean(np.asarray(s) > 0) for s in mapping.values() if s]) if mapping else np.zeros(1)
        lines = [
            f"files: {self.files}",
            f"records used: {self.records}",
            f"prompts: {self.prompts}",
            f"scores per prompt: min {counts.min():.0f}, mean {counts.mean():.2f}, max {counts.max():.0f}"
            f" ({self.subsampled} prompts subsampled)",
            f"success rate (score > 0) per prompt: mean {rates.mean():.3f}; "
            f"all fail {int(np.sum(rates == 0))}, all pass {int(np.sum(rates == 1))}",
        ]
        for reason, count in sorted(self.skipped.items()):
            lines.append(f"skipped {count} lines: {reason} (first at {self.examples[reason]})")
        if self.cross_subset_duplicates:
            lines.append(
                f"{self.cross_subset_duplicates} prompts appear in more than one file, scores pooled "
                f"(first: {self.examples['duplicate']})"
            )
        return "\n".join(lines)


def find_subset_files(input_dir: str | os.PathLike, pattern: str = DEFAULT_PATTERN) -> list[Path]:
    input_dir = Path(input_dir)
    if not input_dir.is_dir():
        raise UserError(f"input directory {input_dir} does not exist")
    files = sorted(Path(p) for p in glob.glob(str(input_dir / pattern)) if Path(p).is_file())
    if not files:
        raise UserError(f"no files match {pattern!r} under {input_dir}")
    return files


def _score_of(record: dict) -> tuple[float | None, str | None]:
    if "score" not in record:
        return None, "record without 'score'"
    score = record["score"]
    if isinstance(score, bool) or not isinstance(score, (int, float)):
        return None, "non-numeric score"
    if not math.isfinite(score):
        return None, "NaN or infinite score"
    return float(score), None


def merge_offline_values(
    input_dir: str | os.PathLike,
    *,
    pattern: str = DEFAULT_PATTERN,
    max_scores_per_prompt: int = 8,
    seed: int = 0,
    template: str = "auto",
    strip_suffixes: Sequence[str] = (),
) -> tuple[dict[str, list[float]], MergeReport]:
    """Merge estimate-step JSONL files into `{prompt: [scores...]}`.

    Bad lines (invalid JSON, no `input`/`score`, a non-numeric or NaN score, no prompt found) are
    skipped and counted with the first file:line of each kind; a prompt seen in several files is
    counted and its scores pooled. Prompts with more than `max_scores_per_prompt` scores keep a
    random subset (numpy Generator seeded with `seed`, prompts in sorted order). Raises UserError
    when nothing usable was read.
    """
    if max_scores_per_prompt < 1:
        raise UserError(f"--max-scores-per-prompt must be >= 1, got {max_scores_per_prompt}")
    if template not in TEMPLATES:
        raise UserError(f"unknown prompt template {template!r}; valid: {', '.join(TEMPLATES)}")
    files = find_subset_files(input_dir, pattern)
    report = MergeReport(files=len(files))
    scores_by_prompt: dict[str, list[float]] = {}
    first_file: dict[str, Path] = {}
    duplicated: set[str] = set()
    for path in files:
        with open(path, encoding="utf-8", errors="replace") as fh:
            for line_no, line in enumerate(fh, start=1):
                where = f"{path}:{line_no}"
                parsed = _prompt_and_score(line, where, template, strip_suffixes, report)
                if parsed is None:
                    continue
                prompt, score = parsed
                if prompt in first_file and first_file[prompt] != path and prompt not in duplicated:
                    duplicated.add(prompt)
                    report.examples.setdefault("duplicate", f"{first_file[prompt]} and {where}")
                first_file.setdefault(prompt, path)
                scores_by_prompt.setdefault(prompt, []).append(score)
                report.records += 1
    report.cross_subset_duplicates = len(duplicated)
    total_skipped = sum(report.skipped.values())
    if total_skipped:
        logger.warning(
            "merge: skipped %d of %d lines (%s)", total_skipped, total_skipped + report.records,
            "; ".join(f"{n} {reason}, first at {report.examples[reason]}" for reason, n in report.skipped.items()),
        )
    if duplicated:
        logger.warning(
            "merge: %d prompts appear in more than one file (first: %s); their scores are pooled",
            len(duplicated), report.examples["duplicate"],
        )
    if not scores_by_prompt:
        raise UserError(
            f"no usable records in {len(files)} files under {input_dir} ({total_skipped} lines skipped: "
            + ", ".join(f"{n} {reason} e.g. {report.examples[reason]}" for reason, n in report.skipped.items())
            + ")"
        )
    merged = _subsample(scores_by_prompt, max_scores_per_prompt, seed, report)
    report.prompts = len(merged)
    return merged, report


def _prompt_and_score(
    line: str, where: str, template: str, strip_suffixes: Sequence[str], report: MergeReport
) -> tuple[str, float] | None:
    """(user prompt, score) of one estimate-step line; None for a blank line or a bad one, which is
    counted in `report` under its reason."""
    if not line.strip():
        return None
    try:
        record = json.loads(line)
    except json.JSONDecodeError:
        report.skip("malformed JSON", where)
        return None
    if not isinstance(record, dict):
        report.skip("not a JSON object", where)
        return None
    score, problem = _score_of(record)
    if problem:
        report.skip(problem, where)
        return None
    raw = record.get("prompt")
    if isinstance(raw, str):
        prompt = extract_user_prompt(raw, "plain", strip_suffixes)
    elif isinstance(record.get("input"), str):
        prompt = extract_user_prompt(record["input"], template, strip_suffixes)
    else:
        report.skip("record without 'input' text", where)
        return None
    if not prompt:
        report.skip(f"no user prompt found (template {template})", where)
        return None
    return prompt, score


def _subsample(
    scores_by_prompt: dict[str, list[float]], max_scores_per_prompt: int, seed: int, report: MergeReport
) -> dict[str, list[float]]:
    """Each prompt's scores, at most `max_scores_per_prompt` of them: a random subset (numpy
    Generator seeded with `seed`, prompts in sorted order) where there are more."""
    rng = np.random.default_rng(seed)
    merged: dict[str, list[float]] = {}
    for prompt in sorted(scores_by_prompt):
        scores = scores_by_prompt[prompt]
        if len(scores) > max_scores_per_prompt:
            keep = np.sort(rng.choice(len(scores), size=max_scores_per_prompt, replace=False))
            scores = [scores[i] for i in keep]
            report.subsampled += 1
        merged[prompt] = scores
    return merged
