"""Kill a training run at random moments, resume it each time, and compare with a run nobody killed.

    python bench/fault_loop.py [--kills 10] [--steps 8] [--seed 0] [--out runs/fault_loop]

One `megatron-spo train` job (the demo's tiny model and data, SPO, a checkpoint every step) runs
once undisturbed. Then the same job runs in a second directory and is killed `--kills` times, at
a uniformly random moment between 5% and 40% of the undisturbed run's wall time after each start, alternately with SIGKILL and
SIGTERM, and restarted each time (`checkpoint.resume=auto`) until it finishes. Reported: for each
kill the step it resumed from, whether any process of the killed run was still alive 10 s after
the kill, and at the end whether every metric row of the killed run (wall-clock fields aside)
equals the undisturbed run's, with no duplicate steps. Exit 1 when a check fails.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

VOLATILE = ("perf/", "time")


def write_config(out: Path, steps: int) -> Path:
    from megatron_spo.demo.assets import build_demo_assets

    assets = build_demo_assets(out / "assets")
    config = {
        "model": {"hf_dir": str(assets.model_dir)},
        "data": {"train_files": [str(assets.train_jsonl)]},
        "total_steps": steps,
        "algorithm": {"name": "spo", "spo": {"gen_batch_size": 64}},
        "rollout": {"max_response_tokens": 24},
        "batch": {"train_batch_size": 16, "mini_batch_size": 8, "micro_batch_size": 8,
                  "max_tokens_per_micro_batch": None},
        "optimizer": {"lr": 1e-4},
        "checkpoint": {"every_steps": 1, "export_hf": False},
        "eval": {"every_steps": 0},
        "logging": {"tensorboard": False, "progress_bar": False},
    }
    path = out / "train.yaml"
    path.write_text(json.dumps(config))  # JSON is YAML
    return path


def start(config: Path, run_dir: Path, log) -> subprocess.Popen:
    argv = [sys.executable, "-m", "megatron_spo", "train", "--config", str(config), f"run_dir={run_dir}",
            "--no-export"]
    return subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})


def alive_in_group(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def rows(run_dir: Path) -> list[dict]:
    out = []
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        out.append({k: v for k, v in record.items() if not k.startswith(VOLATILE)})
    return out


def progress(log_text: str) -> str:
    """Where the killed run was: the step it resumed from, or that it had not got that far."""
    marks = [line for line in log_text.splitlines() if line.startswith("resumed from")]
    return f"it had resumed from step {marks[-1].rsplit(' ', 1)[1]}" if marks else "before it resumed or first saved"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kills", type=int, default=10)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="runs/fault_loop")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    config = write_config(out, args.steps)
    rng = random.Random(args.seed)

    t0 = time.perf_counter()
    with open(out / "clean.log", "w") as log:
        if start(config, out / "clean", log).wait() != 0:
            print(f"the undisturbed run failed: {out / 'clean.log'}")
            return 1
    clean_seconds = time.perf_counter() - t0
    print(f"undisturbed run: {args.steps} steps in {clean_seconds:.0f} s", flush=True)

    failures, kills = [], 0
    while True:
        log_path = out / f"killed_{kills:02d}.log"
        with open(log_path, "w") as log:
            proc = start(config, out / "killed", log)
            if kills < args.kills:
                delay = rng.uniform(0.05, 0.4) * clean_seconds
                try:
                    proc.wait(timeout=delay)
                except subprocess.TimeoutExpired:
                    sig = signal.SIGKILL if kills % 2 == 0 else signal.SIGTERM
                    proc.send_signal(sig)
                    proc.wait()
                    time.sleep(10)
                    left = alive_in_group(proc.pid)
                    if left:
                        failures.append(f"kill {kills}: processes of the run alive 10 s after {sig.name}")
                        os.killpg(proc.pid, signal.SIGKILL)
                    print(f"kill {kills}: {sig.name} after {delay:.1f} s ({progress(log_path.read_text())}); "
                          f"survivors 10 s later: {'yes' if left else 'none'}", flush=True)
                    kills += 1
                    continue
            elif proc.wait() != 0:
                failures.append(f"the last resume failed: {log_path}")
        if proc.returncode == 0:
            break
        failures.append(f"run exited {proc.returncode} on its own: {log_path}")
        break

    clean, killed = rows(out / "clean"), rows(out / "killed")
    steps = [r["step"] for r in killed]
    if len(steps) != len(set(steps)):
        failures.append(f"duplicate metric rows for steps {sorted({s for s in steps if steps.count(s) > 1})}")
    if killed != clean:
        first = next((i for i, (a, b) in enumerate(zip(clean, killed)) if a != b), min(len(clean), len(killed)))
        failures.append(f"metrics differ from the undisturbed run from row {first} "
                        f"({len(killed)} rows vs {len(clean)})")
    print(f"{kills} kills; metrics rows identical to the undisturbed run: {killed == clean}; "
          f"duplicate steps: {len(steps) - len(set(steps))}; total {time.perf_counter() - t0:.0f} s")
    for failure in failures:
        print("FAILED:", failure)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
