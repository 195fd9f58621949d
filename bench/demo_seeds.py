"""The demo on several seeds, which stand in for other machines (issue 15: does its result hold?).

    python bench/demo_seeds.py [--seeds 1 2 3] [--out runs/demo_seeds]

Runs `megatron-spo demo --seed N` for each seed (the task's data and held-out set stay the same;
the model's init, SFT's order and RL's sampling change) and prints, per seed, held-out accuracy
before and after RL, the gain, the change at each difficulty, and the wall time, then whether
every seed gains without losing accuracy at any difficulty (the exit status) and whether every
seed gains at least 20 points.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--out", default="runs/demo_seeds")
    args = parser.parse_args()
    rows, ok, big = [], True, True
    for seed in args.seeds:
        out = Path(args.out) / f"seed_{seed}"
        started = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "megatron_spo", "demo", "--seed", str(seed), "--out", str(out)],
                              capture_output=True, text=True)
        if proc.returncode != 0:
            print(f"seed {seed}: the demo failed (exit {proc.returncode}):\n{proc.stderr[-2000:]}")
            return 1
        s = json.loads((out / "summary.json").read_text())
        gain = s["accuracy_after"] - s["accuracy_before"]
        deltas = {d: s["by_difficulty_after"][d] - s["by_difficulty_before"][d] for d in sorted(s["by_difficulty_before"])}
        passed = gain > 0 and all(v >= 0 for v in deltas.values())
        ok &= passed
        big &= gain >= 0.20
        rows.append((seed, s["accuracy_before"], s["accuracy_after"], gain, deltas, time.perf_counter() - started, passed))
        print(f"seed {seed} done", flush=True)
    print("\n| seed | before | after | gain (points) | change by difficulty 1/2/3/4 (points) | wall s | gain, no loss |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for seed, before, after, gain, deltas, wall, passed in rows:
        by = " / ".join(f"{v * 100:+.1f}" for v in deltas.values())
        print(f"| {seed} | {before:.3f} | {after:.3f} | {gain * 100:+.1f} | {by} | {wall:.0f} | {'yes' if passed else 'no'} |")
    print(f"\nevery seed gains with no loss at any difficulty: {ok}")
    print(f"every seed gains >= 20 points: {big}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
