"""`bench/vs_trl.py --to-accuracy`: training seconds to a fixed held-out accuracy, megatron-spo
against TRL's GRPOTrainer, from the same warm start on the demo task.

    .venv/bin/python bench/vs_trl.py --to-accuracy --demo-dir runs/demo [--trl-lrs 1e-4 2e-4 3e-4 1e-3] \
        [--ours-lrs 1e-4 2e-4] [--ours-variants "" "algorithm.spo.rho_mode=constant"] [--reuse]

--demo-dir is the output of `megatron-spo demo` (its SFT model, offline values, held-out prompts
and `spo.yaml`). Every run starts from that SFT model, on 2 processes x 1 thread:

- megatron-spo: the demo's own RL stage (SPO, 64 prompts x 1 response a step, prioritised
  sampling seeded with the offline values, lr 1e-4; `--ours-lrs` adds others, `--ours-variants`
  settings beside the demo's, e.g. "algorithm.spo.rho_mode=constant"), through
  `torchrun -m megatron_spo train`, evaluated in-run every `--eval-every` steps;
- TRL: GRPOTrainer as in the throughput comparison (16 prompts x 8 completions a step, boxed-answer
  reward, clip 0.2 / 0.28, token mean, no KL) at each lr of `--trl-lrs` (TRL's own default, 1e-6,
  barely moves this model in the budget: the sweep is its tuning), saving the policy every
  `--eval-every` steps, and stopping once its training time reaches `--budget-factor` x the
  longest megatron-spo run's.

Evaluation, the same for all: the held-out prompts of the demo (400), 4 samples each at T = 1, no
top-p / top-k, at most 48 tokens, graded by the math grader (avg@4; standard error ~0.015).
TRL's snapshots carry the warm start's tokenizer and chat template, so the evaluation renders
the prompts exactly as both trainers saw them in training.
megatron-spo's in-run evaluation and `megatron-spo eval` on TRL's saved policies are one function
(`training.evaluation.evaluate`) with the same settings. The clock is training time only:
megatron-spo's sum of `perf/step_s` (the whole step: weight sync, generation, grading, log-probs,
the update), TRL's time from `train` begin to each step's end less the seconds spent saving.
The starting point (0 s) is the SFT model's accuracy, evaluated the same way.

For each target (the warm start's accuracy + `--gains`), each run's time is its first evaluation
at or above the target (and, as a check against one lucky evaluation, the first from which it
never drops below); the ratio is TRL's best lr over megatron-spo's best setting. The goal of
issue 17 is >= 2x. Results: bench/RESULTS.md and the plot written to --out. `--reuse` keeps the
finished runs and evaluations already in --out (to re-report, or to add a learning rate without
training the others again).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

from _curves import time_to, time_to_stay
from megatron_spo import atomic

ROOT = Path(__file__).resolve().parent.parent


def _eval(model: Path, val: Path, out: Path, n: int, env: dict, log: Path, reuse: bool = False) -> float:
    """avg@n held-out accuracy of an HF model dir with `megatron-spo eval` (the demo's settings);
    with `reuse`, an existing result file `out` is read instead."""
    if reuse and out.exists():
        return json.loads(out.read_text())["overall"]["accuracy"]
    with open(log, "w") as fh:
        proc = subprocess.run([sys.executable, "-m", "megatron_spo", "eval", "--model", str(model), "--data", str(val),
                               "--n", str(n), "--out", str(out), "temperature=1.0", "top_p=1.0", "top_k=-1",
                               "max_response_tokens=48", "reward.workers=1"],
                              stdout=fh, stderr=subprocess.STDOUT, env={**env, "OMP_NUM_THREADS": "2"}, cwd=ROOT)
    if proc.returncode:
        raise SystemExit(f"eval of {model} failed (exit {proc.returncode}); log {log}")
    return json.loads(out.read_text())["overall"]["accuracy"]


def ours_curve(metrics: Path) -> list[tuple[float, float]]:
    """[(training seconds, held-out accuracy)] of a run: the sum of `perf/step_s` up to and
    including each evaluated step (evaluations are not inside a step, so not on the clock)."""
    curve, seconds = [], 0.0
    for line in open(metrics):
        row = json.loads(line)
        seconds += row.get("perf/step_s", 0.0)
        if "eval/accuracy" in row and "perf/step_s" in row:
            curve.append((seconds, row["eval/accuracy"]))
    return curve


def _finished(metrics: Path, steps: int) -> bool:
    return metrics.exists() and any(json.loads(line).get("step") == steps for line in open(metrics) if line.strip())


def run_ours(demo: Path, lr: float, variant: str, steps: int, eval_every: int, eval_n: int, out: Path, env: dict,
             reuse: bool = False) -> dict:
    """The demo's RL stage at `lr`, with `variant` ("key=value ..." train overrides, "" for none)."""
    tag = f"ours_lr{lr:g}" + ("_" + re.sub(r"[^A-Za-z0-9.]+", "_", variant) if variant else "")
    name = f"megatron-spo SPO, lr {lr:g}" + (f", {variant}" if variant else "")
    run_dir = out / tag
    if not (reuse and _finished(run_dir / "metrics.jsonl", steps)):
        _train_ours(demo, lr, variant, steps, eval_every, eval_n, run_dir, out / tag, env, name)
    curve = ours_curve(run_dir / "metrics.jsonl")
    return {"name": name, "curve": curve, "train_seconds": curve[-1][0], "steps": steps}


def _train_ours(demo, lr, variant, steps, eval_every, eval_n, run_dir: Path, stem: Path, env, name: str) -> None:
    """`torchrun x2 train` of the demo's spo.yaml with this run's changes; config and log at `stem`.yaml/.log."""
    shutil.rmtree(run_dir, ignore_errors=True)
    config = yaml.safe_load((demo / "spo.yaml").read_text())
    config.update(run_dir=str(run_dir), total_steps=steps)
    config["optimizer"]["lr"] = lr
    config["checkpoint"] = {"every_steps": 0, "keep_last": 1}
    config["eval"].update(every_steps=eval_every, n=eval_n)
    path, log = stem.parent / f"{stem.name}.yaml", stem.parent / f"{stem.name}.log"  # tags hold dots (lr 0.0001)
    atomic.write_text(path, yaml.safe_dump(config, sort_keys=False))
    argv = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "megatron_spo",
            "train", "--config", str(path), "checkpoint.resume=overwrite", "--no-export", *variant.split()]
    with open(log, "w") as fh:
        proc = subprocess.run(argv, stdout=fh, stderr=subprocess.STDOUT, env={**env, "OMP_NUM_THREADS": "1"}, cwd=ROOT)
    if proc.returncode:
        raise SystemExit(f"{name} failed (exit {proc.returncode}); log {log}")


def run_trl(sft: Path, prompts: Path, val: Path, lr: float, budget_s: float, settings, eval_every: int, eval_n: int,
            out: Path, env: dict, trl_python: Path, seed: int, reuse: bool = False) -> dict:
    trl_out = out / f"trl_lr{lr:g}"
    if not (reuse and (trl_out / "trl_result.json").exists()):
        _train_trl(sft, prompts, lr, budget_s, settings, eval_every, trl_out, out, env, trl_python, seed)
    snapshots, curve = json.loads((trl_out / "snapshots.json").read_text()), []
    for snap in snapshots:
        acc = _eval(Path(snap["dir"]), val, trl_out / f"eval_step{snap['step']}.json", eval_n, env,
                    trl_out / f"eval_step{snap['step']}.log", reuse)
        curve.append((snap["train_seconds"], acc))
        print(f"    TRL lr {lr:g} step {snap['step']}: {snap['train_seconds']:.0f}s accuracy {acc:.3f}", flush=True)
    return {"name": f"TRL GRPOTrainer, lr {lr:g}", "curve": curve, "train_seconds": curve[-1][0],
            "steps": snapshots[-1]["step"]}


def _train_trl(sft, prompts, lr, budget_s, settings, eval_every, trl_out, out, env, trl_python, seed) -> None:
    shutil.rmtree(trl_out, ignore_errors=True)
    trl_out.mkdir(parents=True)
    argv = [str(trl_python), "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
            str(ROOT / "bench" / "_trl_runner.py"), "--model", str(sft), "--data", str(prompts), "--out", str(trl_out),
            "--steps", "100000", "--prompts", str(settings.prompts), "--generations", str(settings.n),
            "--max-completion-length", str(settings.max_response_tokens), "--lr", str(lr), "--seed", str(seed),
            "--threads", "1", "--save-every", str(eval_every), "--max-train-seconds", str(budget_s)]
    with open(out / f"trl_lr{lr:g}.log", "w") as fh:
        proc = subprocess.run(argv, stdout=fh, stderr=subprocess.STDOUT, env={**env, "OMP_NUM_THREADS": "1"}, cwd=ROOT)
    if proc.returncode:
        raise SystemExit(f"TRL at lr {lr:g} failed (exit {proc.returncode}); log {out / f'trl_lr{lr:g}.log'}")


def _seconds(t: float | None) -> str:
    return "not reached" if t is None else f"{t:.0f}s"


def plot(runs: list[dict], start: float, targets: list[float], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(14, 4.5))
    best = max(a for run in runs for _, a in run["curve"])
    for ax, zoom in zip(axes, (False, True)):
        for run in runs:
            ax.plot([0.0] + [t for t, _ in run["curve"]], [start] + [a for _, a in run["curve"]], marker="o",
                    markersize=3, label=run["name"])
        for target in targets:
            ax.axhline(target, color="grey", linewidth=0.5, linestyle=":")
        if zoom:  # the runs that learn; a diverging one leaves through the bottom
            ax.set_ylim(start - 0.02, best + 0.02)
        ax.set_xlabel("training seconds (2 processes x 1 thread; evaluation excluded)")
        ax.set_ylabel("held-out accuracy (avg@4, T = 1)")
        ax.set_title("demo task, same SFT warm start" + (" (zoomed)" if zoom else ""))
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(args, settings, rendered_prompts) -> None:
    """`rendered_prompts(model_dir, train_jsonl, out) -> (jsonl path, mean prompt tokens)` is
    vs_trl.py's: TRL gets the training prompts as megatron-spo renders them."""
    demo = args.demo_dir
    sft, data = demo / "sft", demo / "assets" / "data"
    val = data / "val_eval.jsonl"
    for needed in (sft / "config.json", val, data / "train.jsonl", demo / "spo.yaml"):
        if not needed.exists():
            raise SystemExit(f"--demo-dir {demo}: {needed} is missing (give the output dir of `megatron-spo demo`)")
    if not args.trl_python.exists():
        raise SystemExit(f"{args.trl_python} is missing: `make bench-trl` builds it (torch 2.13.0 CPU + trl 1.16.0)")
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "TOKENIZERS_PARALLELISM": "false"}
    prompts, _ = rendered_prompts(sft, data / "train.jsonl", out)

    start = _eval(sft, val, out / "eval_sft.json", args.eval_n, env, out / "eval_sft.log", args.reuse)
    print(f"warm start {sft}: held-out accuracy {start:.3f}", flush=True)
    runs = []
    for variant in args.ours_variants:
        for lr in args.ours_lrs:
            print(f"megatron-spo SPO lr {lr:g} {variant}: {args.ours_steps} steps (load {os.getloadavg()[0]:.1f})",
                  flush=True)
            runs.append(run_ours(demo, lr, variant, args.ours_steps, args.eval_every, args.eval_n, out, env, args.reuse))
            print(f"  {runs[-1]['train_seconds']:.0f}s, " + ", ".join(f"{t:.0f}s {a:.3f}" for t, a in runs[-1]["curve"]),
                  flush=True)
    budget = args.budget_factor * max(r["train_seconds"] for r in runs)
    for lr in args.trl_lrs:
        print(f"TRL lr {lr:g}: up to {budget:.0f} training seconds (load {os.getloadavg()[0]:.1f})", flush=True)
        runs.append(run_trl(sft, prompts, val, lr, budget, settings, args.eval_every, args.eval_n, out, env,
                            args.trl_python, args.seed, args.reuse))

    targets = [round(start + g, 4) for g in args.gains]
    ours = [r for r in runs if r["name"].startswith("megatron-spo")]
    trl = [r for r in runs if r["name"].startswith("TRL")]
    print(f"\nwarm start {start:.3f}; evaluation every {args.eval_every} steps (avg@{args.eval_n}, 400 prompts)")
    print("\n| run | steps | training s | final acc. | best acc. | " + " | ".join(f"s to {t:.3f}" for t in targets) + " |")
    print("| --- | --- | --- | --- | --- | " + " | ".join("---" for _ in targets) + " |")
    for r in runs:
        times = [time_to(r["curve"], t) for t in targets]
        print(f"| {r['name']} | {r['steps']} | {r['train_seconds']:.0f} | {r['curve'][-1][1]:.3f} | "
              f"{max(a for _, a in r['curve']):.3f} | " + " | ".join("-" if t is None else f"{t:.0f}" for t in times) + " |")
    for label, measure in (("first evaluation at or above the target", time_to),
                           ("first evaluation from which all later ones are at or above it", time_to_stay)):
        print(f"\nseconds to each target, best megatron-spo setting / best TRL lr ({label}):")
        for target in targets:
            best_ours = min((t for t in (measure(r["curve"], target) for r in ours) if t is not None), default=None)
            best_trl = min((t for t in (measure(r["curve"], target) for r in trl) if t is not None), default=None)
            if best_ours is None or best_trl is None:
                print(f"  {target:.3f}: megatron-spo {_seconds(best_ours)}, TRL {_seconds(best_trl)}")
            else:
                print(f"  {target:.3f}: megatron-spo {best_ours:.0f}s, TRL {best_trl:.0f}s: TRL / ours "
                      f"{best_trl / best_ours:.2f}x")
    summary = {"warm_start": str(sft), "start_accuracy": start, "targets": targets, "budget_s": budget,
               "runs": runs, "eval_every": args.eval_every, "eval_n": args.eval_n}
    atomic.write_json(out / "accuracy_summary.json", summary)
    try:
        plot(runs, start, targets, out / "vs_trl_accuracy.png")
        print(f"plot {out / 'vs_trl_accuracy.png'}")
    except ImportError:
        print("no matplotlib: no plot")
