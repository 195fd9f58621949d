"""`megatron-spo plot RUN_DIR [RUN_DIR ...]`: PNG learning curves from runs' metrics.jsonl.

Draws reward and accuracy against training step and against generated tokens (the cumulative
sum of `rollout/generated_tokens`; the fair x-axis when comparing SPO's one response per prompt
with GRPO's eight). Several run directories give one line per run on the same axes, labelled by
the directory name. Extra metrics can be added with `--keys`.

Writes OUT/curves.png (default OUT: the first RUN_DIR/plots) and prints its path. Needs
matplotlib (`pip install 'megatron-spo[observe]'`).
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

from megatron_spo import atomic
from megatron_spo.errors import ArgumentParser, UserError
from megatron_spo.training.metrics import (
    ACCURACY_SUFFIX,
    GENERATED_TOKENS_KEY,
    METRICS_FILE,
    REWARD_KEY,
    read_metrics,
)


def load_run(run_dir: str | os.PathLike) -> list[dict[str, Any]]:
    path = Path(run_dir) / METRICS_FILE
    if not path.is_file():
        raise UserError(f"{run_dir}: no {METRICS_FILE} (is this a run directory?)")
    try:
        records = read_metrics(path)
    except UnicodeDecodeError as err:
        raise UserError(f"{path}: not UTF-8 text (byte {err.start}: {err.reason}); is it a metrics file?") from None
    except ValueError as err:  # read_metrics names the file and line
        raise UserError(str(err)) from None
    if not records:
        raise UserError(f"{path} holds no records yet")
    for number, record in enumerate(records, 1):
        if not isinstance(record, dict) or not isinstance(record.get("step"), int):
            raise UserError(f"{path}: record {number} is not a metrics record (a JSON object with an integer "
                            f"'step'): {str(record)[:80]}")
    return records


def curves(records: list[dict[str, Any]], key: str) -> tuple[list[int], list[float], list[float]]:
    """(steps, cumulative generated tokens at each step, values) for every record holding `key`.

    Tokens generated in a step count toward that step's point: the value logged at step s was
    obtained after s steps' worth of generation.
    """
    tokens_by_step: dict[int, float] = {}
    for r in records:
        generated = r.get(GENERATED_TOKENS_KEY)
        if isinstance(generated, (int, float)):
            tokens_by_step[r["step"]] = tokens_by_step.get(r["step"], 0.0) + generated
    cumulative: dict[int, float] = {}
    running = 0.0
    for step in sorted({r["step"] for r in records}):
        running += tokens_by_step.get(step, 0.0)
        cumulative[step] = running
    steps, tokens, values = [], [], []
    for r in sorted(records, key=lambda r: r["step"]):
        value = r.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            steps.append(r["step"])
            tokens.append(cumulative[r["step"]])
            values.append(float(value))
    return steps, tokens, values


def accuracy_keys(records: list[dict[str, Any]]) -> list[str]:
    return sorted({k for r in records for k in r if k.endswith(ACCURACY_SUFFIX)})


def plot_runs(run_dirs: list[str], out_dir: str | os.PathLike, extra_keys: list[str] = ()) -> Path:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise UserError("plot needs matplotlib: pip install 'megatron-spo[observe]'") from None

    runs = {Path(d).resolve().name or str(d): load_run(d) for d in run_dirs}
    if len(runs) < len(run_dirs):  # two runs with the same directory name: use the paths
        runs = {str(d): load_run(d) for d in run_dirs}
    rows = [REWARD_KEY] + sorted({k for records in runs.values() for k in accuracy_keys(records)}) + list(extra_keys)
    fig, axes = plt.subplots(len(rows), 2, figsize=(11, 3.2 * len(rows)), squeeze=False)
    anything = False
    for row, key in enumerate(rows):
        for name, records in runs.items():
            steps, tokens, values = curves(records, key)
            if not values:
                continue
            anything = True
            marker = "o" if len(values) <= 30 else None
            axes[row][0].plot(steps, values, marker=marker, markersize=3, label=name)
            if any(tokens):
                axes[row][1].plot(tokens, values, marker=marker, markersize=3, label=name)
        axes[row][0].set_xlabel("training step")
        axes[row][1].set_xlabel("generated tokens")
        key_logged = bool(axes[row][0].lines)
        for ax in axes[row]:
            ax.set_ylabel(key)
            ax.grid(alpha=0.3)
            if ax.lines:
                ax.legend(fontsize=8)
            else:
                missing = key if not key_logged else GENERATED_TOKENS_KEY
                ax.text(0.5, 0.5, f"no {missing} logged", ha="center", va="center",
                        transform=ax.transAxes, color="gray")
    if not anything:
        raise UserError(f"none of {', '.join(rows)} appears in the metrics of {', '.join(run_dirs)}")
    fig.suptitle(" vs ".join(runs) if len(runs) > 1 else next(iter(runs)))
    fig.tight_layout()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "curves.png"
    with atomic.open_for_write(path) as fh:
        fig.savefig(fh, dpi=110, format="png")
    plt.close(fig)
    return path


def main(argv: list[str]) -> int:
    parser = ArgumentParser(
        prog="megatron-spo plot",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="run directories holding metrics.jsonl")
    parser.add_argument("--out", default=None, help="output directory (default: the first RUN_DIR/plots)")
    parser.add_argument(
        "--keys", default="", help="comma-separated extra metrics to draw, e.g. spo/rho/mean,actor/entropy"
    )
    args = parser.parse_args(argv)
    out = args.out or str(Path(args.run_dirs[0]) / "plots")
    atomic.check_output_location(out, "--out", kind="dir")
    extra = [k for k in args.keys.split(",") if k]
    print(plot_runs(args.run_dirs, out, extra))
    return 0
