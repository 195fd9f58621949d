"""Run metrics: `metrics.jsonl`, TensorBoard and W&B behind one logger, plus summary helpers.

`MetricsLogger.log(step, {...})` appends one JSON object per call to RUN_DIR/metrics.jsonl
(flushed at once, so `tail -f` and a crash both see every finished step), and mirrors the
numbers to TensorBoard (`torch.utils.tensorboard`, needs the `observe` extra) and W&B (when
installed and enabled). A backend that is not installed is skipped with a one-line notice;
it never stops training. Only rank 0 should log: other ranks pass `enabled=False`.

On resume from step s, records with step > s (written after the checkpoint the run resumes
from) are dropped, so the file of a resumed run equals that of an uninterrupted one.

Metric names are "section/name" (e.g. `reward/mean`, `spo/rho_mean`, `actor/clip_fraction`);
the keys below are the ones `megatron-spo plot` draws, so the trainer must log them by these
names.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from megatron_spo import atomic

METRICS_FILE = "metrics.jsonl"
REWARD_KEY = "reward/mean"
"""Mean reward of the step's rollout batch (for binary rewards: training accuracy)."""
GENERATED_TOKENS_KEY = "rollout/generated_tokens"
"""Response tokens generated in this step (the plot accumulates them)."""
ACCURACY_SUFFIX = "/accuracy"
"""Every key ending in this (e.g. `eval/accuracy`, `eval/aime24/accuracy`) is an accuracy curve."""


def _plain(value: Any) -> Any:
    """A JSON-ready number: tensors / numpy scalars -> Python, non-finite floats -> None."""
    if hasattr(value, "item") and callable(value.item):
        value = value.item()
    if isinstance(value, bool) or value is None or isinstance(value, (int, str)):
        return value
    value = float(value)
    return value if math.isfinite(value) else None


class MetricsLogger:
    """Per-step metrics to metrics.jsonl, TensorBoard and W&B (each optional)."""

    def __init__(
        self,
        run_dir: str | os.PathLike,
        *,
        jsonl: bool = True,
        tensorboard: bool = True,
        wandb: bool = False,
        wandb_project: str = "megatron-spo",
        wandb_run_name: str | None = None,
        config: Mapping[str, Any] | None = None,
        resume_step: int | None = None,
        enabled: bool = True,
        notice=None,
    ):
        self.run_dir = Path(run_dir)
        self.enabled = enabled
        self._notice = notice or (lambda msg: print(f"megatron-spo: {msg}", file=sys.stderr))
        self._jsonl = None
        self._tensorboard = None
        self._wandb = None
        if not enabled:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if jsonl:
            path = self.run_dir / METRICS_FILE
            if resume_step is not None and path.exists():
                kept = [r for r in read_metrics(path) if r.get("step", 0) <= resume_step]
                atomic.write_text(path, "".join(json.dumps(r) + "\n" for r in kept))
            self._jsonl = open(path, "a")
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                self._notice("tensorboard is not installed; skipping TensorBoard (pip install 'megatron-spo[observe]')")
            else:
                # purge_step drops events after the resumed step, like the jsonl truncation above
                self._tensorboard = SummaryWriter(
                    str(self.run_dir / "tensorboard"),
                    purge_step=None if resume_step is None else resume_step + 1,
                )
        if wandb:
            try:
                import wandb as wandb_module
            except ImportError:
                self._notice("wandb is not installed; skipping W&B logging (pip install wandb)")
            else:
                self._wandb = wandb_module.init(
                    project=wandb_project,
                    name=wandb_run_name or self.run_dir.name,
                    config=dict(config or {}),
                    dir=str(self.run_dir),
                    resume="allow",
                )

    @property
    def backends(self) -> list[str]:
        """Names of the active backends (for the run's start-up message)."""
        names = []
        if self._jsonl is not None:
            names.append("jsonl")
        if self._tensorboard is not None:
            names.append("tensorboard")
        if self._wandb is not None:
            names.append("wandb")
        return names

    def log(self, step: int, metrics: Mapping[str, Any]) -> None:
        """Record `metrics` for `step` in every active backend."""
        if not self.enabled:
            return
        record = {"step": int(step), "time": round(time.time(), 3)}
        record.update({str(k): _plain(v) for k, v in metrics.items()})
        if self._jsonl is not None:
            self._jsonl.write(json.dumps(record) + "\n")
            self._jsonl.flush()
        numeric = {
            k: v
            for k, v in record.items()
            if k not in ("step", "time") and isinstance(v, (int, float)) and not isinstance(v, bool)
        }
        if self._tensorboard is not None:
            for key, value in numeric.items():
                self._tensorboard.add_scalar(key, value, global_step=step)
            self._tensorboard.flush()
        if self._wandb is not None:
            self._wandb.log(numeric, step=step)

    def close(self) -> None:
        if self._jsonl is not None:
            self._jsonl.close()
            self._jsonl = None
        if self._tensorboard is not None:
            self._tensorboard.close()
            self._tensorboard = None
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None

    def __enter__(self) -> "MetricsLogger":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def read_metrics(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Records of a metrics.jsonl file; a torn last line (a run killed mid-write) is skipped."""
    records = []
    with open(path) as handle:
        lines = handle.read().split("\n")
    for number, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if number >= len(lines) - 2:  # only the final line may be partial
                continue
            raise ValueError(f"{path}: line {number + 1} is not JSON") from None
    return records


def distribution_stats(
    prefix: str, values: Iterable[float] | np.ndarray, percentiles: Iterable[int] = (10, 50, 90)
) -> dict[str, float]:
    """`prefix/mean`, `/std`, `/min`, `/max` and `/p10`, `/p50`, `/p90` of `values`.

    For the per-step distributions the SPO tracker exposes: p_hat, rho, KL drift D, advantages.
    An empty input gives an empty dict (nothing to report), not NaNs.
    """
    array = np.asarray(list(values) if not isinstance(values, np.ndarray) else values, dtype=np.float64).reshape(-1)
    if array.size == 0:
        return {}
    out = {
        f"{prefix}/mean": float(array.mean()),
        f"{prefix}/std": float(array.std()),
        f"{prefix}/min": float(array.min()),
        f"{prefix}/max": float(array.max()),
    }
    for q in percentiles:
        out[f"{prefix}/p{q}"] = float(np.percentile(array, q))
    return out


def throughput(tokens: int, seconds: float) -> float:
    """Tokens per second (0 when no time has passed)."""
    return tokens / seconds if seconds > 0 else 0.0
