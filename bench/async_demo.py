"""Asynchronous against synchronous SPO on the embedded demo task: time to the sync run's accuracy.

    OMP_NUM_THREADS=1 .venv/bin/python bench/async_demo.py --demo-dirs runs/demo_seeds/seed_1 ... \
        [--staleness 1] [--steps N]

Each `--demo-dirs` entry is the output of `megatron-spo demo --seed N` (its SFT model, offline
values and `spo.yaml`). From that warm start the RL stage runs, through the product path
(`torchrun -m megatron_spo train`), as:

- sync x2:   the demo's own setting (2 data-parallel ranks, one core each; generation, then training);
- async x1:  rollout.mode=async on 1 rank: the engine's driver thread generates on one core while
             the trainer trains on the other (max_staleness `--staleness`, partial rollouts off);
- async x2:  rollout.mode=async on 2 ranks (each rank's driver shares its core with its trainer);
- async 1+1: rollout.mode=async with parallel.rollout_ranks=1: rank 1 only generates, rank 0 only
             trains (disaggregated: generation and the update on different cores).

All three see the same held-out evaluation (400 prompts, 1 sample at temperature 1) every
`--eval-every` steps, and the same number of steps. Reported per seed: the sync run's final
held-out accuracy, each run's wall time (first step to last), and the wall time each async run
needs to first reach the sync run's final accuracy (its evaluation rows; "not reached" otherwise).
Wall time counts the evaluations too, the same in every run. Everything runs on this machine, one
run at a time.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from _curves import time_to


def _train(demo: Path, out: Path, nproc: int, overrides: list[str]) -> list[dict]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", "TOKENIZERS_PARALLELISM": "false"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
           "-m", "megatron_spo", "train", "--config", str(demo / "spo.yaml"), f"run_dir={out}",
           "checkpoint.resume=overwrite", "checkpoint.every_steps=0", "logging.progress_bar=false", *overrides]
    with open(out.parent / f"{out.name}.log", "w") as log:
        proc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    if proc.returncode:
        raise SystemExit(f"{out.name}: train failed (exit {proc.returncode}), see {out.parent / (out.name + '.log')}")
    return [json.loads(line) for line in open(out / "metrics.jsonl")]


def _curve(rows: list[dict]) -> tuple[list[tuple[float, float]], float]:
    """[(seconds since the first step started, held-out accuracy)] and the run's wall seconds."""
    steps = [r for r in rows if "perf/step_s" in r]
    start = steps[0]["time"] - steps[0]["perf/step_s"]
    curve = [(r["time"] - start, r["eval/accuracy"]) for r in rows if "eval/accuracy" in r]
    return curve, steps[-1]["time"] - start


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--demo-dirs", type=Path, nargs="+", required=True)
    parser.add_argument("--out", type=Path, default=Path("runs/async_demo"))
    parser.add_argument("--staleness", type=int, default=1)
    parser.add_argument("--steps", type=int, default=None, help="RL steps [the demo's total_steps]")
    parser.add_argument("--eval-every", type=int, default=25)
    parser.add_argument("--max-inflight", type=int, default=32)
    parser.add_argument("--runs", nargs="+", default=["sync x2", "async x1", "async x2"],
                        choices=["sync x2", "async x1", "async x2", "async 1+1"],
                        help="which runs (sync x2 always runs)")
    args = parser.parse_args()
    common = [f"eval.every_steps={args.eval_every}"] + ([f"total_steps={args.steps}"] if args.steps else [])
    streamed = ["rollout.mode=async", f"rollout.max_staleness={args.staleness}",
                f"rollout.max_inflight={args.max_inflight}"]
    print("| seed dir | run | final acc. | wall s | s to sync's final acc. | vs sync x2 |")
    print("| --- | --- | --- | --- | --- | --- |")
    for demo in args.demo_dirs:
        out = args.out / demo.name
        out.mkdir(parents=True, exist_ok=True)
        runs = {"sync x2": _train(demo, out / "sync2", 2, common)}
        for name in [r for r in args.runs if r != "sync x2"]:
            if name == "async 1+1":  # rank 1 only generates, rank 0 only trains
                runs[name] = _train(demo, out / "async1p1", 2, common + streamed + ["parallel.rollout_ranks=1"])
                continue
            nproc = int(name[-1])
            runs[name] = _train(demo, out / f"async{nproc}", nproc, common + streamed)
        sync_curve, sync_wall = _curve(runs["sync x2"])
        target = sync_curve[-1][1]
        for name, rows in runs.items():
            curve, wall = _curve(rows)
            reach = time_to(curve, target)
            ratio = f"{sync_wall / reach:.2f}x" if reach else "-"
            print(f"| {demo.name} | {name} | {curve[-1][1]:.3f} | {wall:.0f} | "
                  f"{'not reached' if reach is None else f'{reach:.0f}'} | {ratio} |", flush=True)
            (out / f"{name.replace(' ', '_')}_curve.json").write_text(json.dumps({"curve": curve, "wall": wall}))
    return 0


if __name__ == "__main__":
    started = time.perf_counter()
    code = main()
    print(f"\nbench wall time {time.perf_counter() - started:.0f} s")
    sys.exit(code)
