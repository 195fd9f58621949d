"""Asynchronous rollout where generation time is long-tailed: the ReTool agent with slow tools.

    OMP_NUM_THREADS=1 .venv/bin/python bench/async_rollout.py --out runs/async_rollout \
        --steps 30 --eval-every 10 --eval-prompts 128 --lr 3e-4 --workloads "tool latency"
    ... --steps 12 --eval-every 6 --eval-prompts 128 --lr 3e-4 --workloads "no latency"
    ... --steps 55 --eval-every 10 --eval-prompts 128 --lr 3e-4 --workloads "tool latency" --settings "async SPO"
    (the runs in bench/RESULTS.md, ~45, ~10 and ~12 minutes on 2 CPU cores; the third runs async
    SPO as long as sync GRPO took in the first)

The workload: the demo's arithmetic prompts, answered by a tiny model warm-started (SFT) to write
`print(<expression>)` in a code block, read the interpreter's output and box it; the SFT labels
box a wrong number 30% of the time and sometimes work the steps out first (longer responses), so
RL has something to remove. The tool code runs in the real sandbox, through an interpreter that
first sleeps a log-normal time (median `--latency-median` 1 s, sigma `--latency-sigma` 1.3: p99 /
median = exp(2.326 sigma) = 20.6x, mean 2.3 s), so one slow call holds a synchronous step's whole
batch. (At a median of 0.15 s the tools cost less than generating on this box's cores, and the
workload is generation-bound either way: bench/RESULTS.md.)

Settings, all on this machine's 2 cores under torchrun x2, 32 trained trajectories a step:
- sync GRPO:   4 prompts x n = 8, each step generates its batch to the last trajectory;
- sync SPO:    32 prompts x 1;
- async SPO:   rollout.mode=async, max_staleness 1, colocated (both ranks generate and train);
- async SPO 1+1: parallel.rollout_ranks=1 (rank 1 only generates, rank 0 only trains);
- async GRPO:  rollout.mode=async with the group barrier in the buffer, max_staleness 1.
Each runs `--steps` steps from the same warm start with evaluations of the held-out prompts (with
the tool agent, `--eval-prompts` x 1 at temperature 1) every `--eval-every` steps, with and without
the injected latency. Reported: trained trajectories per second (steps x 32 / wall time from the
first step to the last, evaluations excluded), the held-out accuracy against wall time, and the
wall time to the sync GRPO run's final accuracy. Results: bench/RESULTS.md; plots beside --out.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import subprocess
import sys
import time
from pathlib import Path

from _curves import time_to

ROOT = Path(__file__).resolve().parent.parent
TRAJECTORIES = 32

SETTINGS = {
    "sync GRPO": (2, ["algorithm.name=grpo", "rollout.n=8", "batch.train_batch_size=4", "batch.mini_batch_size=4"]),
    "sync SPO": (2, []),
    "async SPO": (2, ["rollout.mode=async"]),
    "async SPO 1+1": (2, ["rollout.mode=async", "parallel.rollout_ranks=1"]),
    "async GRPO": (2, ["rollout.mode=async", "algorithm.name=grpo", "rollout.n=8", "batch.train_batch_size=4",
                       "batch.mini_batch_size=4"]),
}


# ----------------------------------------------------------------------------- the warm start


def parse_problem(prompt: str):
    """The demo's `Problem` of a prompt "Compute 7 + 5 - 3."."""
    from megatron_spo.demo.task import Problem

    parts = prompt.removeprefix("Compute ").removesuffix(".").split()
    return Problem(question=" ".join(parts), operands=[int(x) for x in parts[::2]], operators=parts[1::2])


def tool_response(problem, rng: random.Random) -> str:
    """An SFT label: (30% of the time) the demo's noisy worked steps first, then a code block
    printing the expression, the interpreter's output as the agent loop appends it, and the box
    (30% of the time off by 1-2 from what the interpreter printed)."""
    from megatron_spo.demo.task import worked_response

    value = problem.answer
    head = ""
    if rng.random() < 0.3:
        head = worked_response(problem, rng, step_noise=0.2).split("\\boxed")[0].strip() + " Let me check.\n"
    boxed = value + rng.choice([-2, -1, 1, 2]) if rng.random() < 0.3 else value
    return (f"{head}<code>\n```python\nprint({problem.question})\n```\n</code><interpreter>\n{value}\n"
            f"</interpreter>\nThe answer is \\boxed{{{boxed}}}.")


def build_warm_start(out: Path, sft_steps: int, seed: int) -> Path:
    """Data, tokenizer and tiny model (the demo's builders), then `megatron-spo sft` on tool
    traces; returns the SFT model directory (kept: a second run reuses it)."""
    from megatron_spo.demo.assets import TinyModelConfig, build_tiny_model, train_tokenizer
    from megatron_spo.demo.task import DemoTaskConfig, generate_splits, sft_prompt, write_jsonl

    sft_dir = out / "sft"
    if (sft_dir / "config.json").is_file():
        return sft_dir
    splits = generate_splits(DemoTaskConfig(seed=seed))
    rng = random.Random(seed)
    sft = [{"prompt": r["prompt"], "response": tool_response(parse_problem(r["prompt"]), rng)} for r in splits["sft"]]
    data = out / "data"
    write_jsonl(sft, data / "sft.jsonl")
    write_jsonl(splits["train"], data / "train.jsonl")
    write_jsonl(splits["val"], data / "val.jsonl")
    corpus = [f"user\n{sft_prompt(r['prompt'])}\nassistant\n{r['response']}\n" for r in sft]
    corpus += [f"user\n{sft_prompt(r['prompt'])}\nassistant\n" for r in splits["train"]]
    model_dir = out / "model"
    tokenizer = train_tokenizer(corpus, model_dir)
    # whole tokens, so a turn that stops at </code> ends on a token boundary (BPE would merge "><")
    tokenizer.add_tokens(["<code>", "</code>", "<interpreter>", "</interpreter>"])
    tokenizer.save_pretrained(model_dir)
    build_tiny_model(model_dir, tokenizer, TinyModelConfig(seed=seed))
    _run([sys.executable, "-m", "megatron_spo", "sft", "--model", str(model_dir), "--data", str(data / "sft.jsonl"),
          "--out", str(sft_dir), "--overwrite", f"max_steps={sft_steps}", "optimizer.lr=3e-3",
          "optimizer.warmup_steps=20", "optimizer.schedule=constant", "global_batch_size=32",
          "micro_batch_size=32", "epochs=100", f"seed={seed}"], out / "sft.log")
    return sft_dir


# ----------------------------------------------------------------------------- the slow interpreter


def slow_interpreter(out: Path, median: float, sigma: float) -> Path:
    """`<out>/slow_python/bin/python`: sleeps a log-normal time, then execs the real interpreter
    (the sandbox runs the tool code with it; its directory is visible inside the sandbox)."""
    path = out / "slow_python" / "bin" / "python"
    path.parent.mkdir(parents=True, exist_ok=True)
    real = os.path.realpath(sys.executable)
    path.write_text(f"#!{real} -I\n"
                    "import math, os, random, sys, time\n"
                    f"time.sleep({median!r} * math.exp({sigma!r} * random.gauss(0.0, 1.0)))\n"
                    f"os.execv({real!r}, [{real!r}] + sys.argv[1:])\n")
    path.chmod(0o755)
    return path


def latency_quantiles(median: float, sigma: float, draws: int = 200_000) -> dict[str, float]:
    rng = random.Random(0)
    xs = sorted(median * math.exp(sigma * rng.gauss(0.0, 1.0)) for _ in range(draws))
    return {"p50": xs[draws // 2], "p99": xs[int(draws * 0.99)], "mean": sum(xs) / draws}


# ----------------------------------------------------------------------------- the runs


def _run(cmd: list[str], log: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", "TOKENIZERS_PARALLELISM": "false"}
    with open(log, "w") as fh:
        proc = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
    if proc.returncode:
        tail = "".join(open(log).readlines()[-12:])
        raise SystemExit(f"failed (exit {proc.returncode}), log {log}:\n{tail}")


def train_config(out: Path, sft_dir: Path, args, interpreter: Path | None) -> Path:
    import yaml

    sandbox = {"timeout_s": 60.0, "max_processes": 512}  # up to 64 tool calls a rank sleep at once
    if interpreter is not None:
        sandbox.update(python=str(interpreter), extra_readonly_paths=[sys.base_prefix])
    config = {
        "model": {"hf_dir": str(sft_dir)},
        "data": {"train_files": [str(out / "data" / "train.jsonl")], "val_files": [str(out / "data" / "val_eval.jsonl")]},
        "seed": args.seed,
        "total_steps": args.steps,
        "algorithm": {"name": "spo", "spo": {"gen_batch_size": 128}},
        "rollout": {"max_response_tokens": 96, "agent": "tool", "max_assistant_turns": 2, "max_concurrent_tools": 64,
                    "max_inflight": 64, "max_staleness": 1, "sandbox": sandbox, "reward": {"workers": 1}},
        "batch": {"train_batch_size": TRAJECTORIES, "mini_batch_size": TRAJECTORIES, "micro_batch_size": 16},
        "optimizer": {"lr": args.lr, "weight_decay": 0.0},
        "checkpoint": {"every_steps": 0, "export_hf": False},
        "eval": {"every_steps": args.eval_every, "n": 1, "temperature": 1.0, "top_p": 1.0, "top_k": -1},
        "logging": {"tensorboard": False, "progress_bar": False},
    }
    path = out / ("train_latency.yaml" if interpreter is not None else "train_fast.yaml")
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def run_setting(config: Path, run_dir: Path, nproc: int, overrides: list[str]) -> list[dict]:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
           "-m", "megatron_spo", "train", "--config", str(config), f"run_dir={run_dir}", "checkpoint.resume=overwrite",
           *overrides]
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    _run(cmd, run_dir.parent / f"{run_dir.name}.log")
    return [json.loads(line) for line in open(run_dir / "metrics.jsonl")]


def summarize(rows: list[dict]) -> dict:
    """Trained trajectories per second of step time (evaluations excluded) and the held-out
    accuracy against wall time since the first step started (evaluations included)."""
    steps = [r for r in rows if "perf/step_s" in r]
    start = steps[0]["time"] - steps[0]["perf/step_s"]
    curve = [(r["time"] - start, r["eval/accuracy"]) for r in rows if "eval/accuracy" in r]
    step_seconds = sum(r["perf/step_s"] for r in steps)
    trained = sum(r.get("rollout/train_sequences", 0.0) for r in steps)
    return {"steps": len(steps), "trained": trained, "train_seconds": step_seconds,
            "trajectories_per_s": trained / step_seconds, "curve": curve,
            "final_accuracy": curve[-1][1] if curve else float("nan"),
            "mean_step_s": step_seconds / len(steps), "wait_s": sum(r.get("async/wait_s", 0.0) for r in steps)}


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(6 * len(results), 4), squeeze=False)
    for ax, (workload, runs) in zip(axes[0], results.items()):
        for name, s in runs.items():
            ax.plot([t for t, _ in s["curve"]], [a for _, a in s["curve"]], marker="o", label=name)
        ax.set_title(workload)
        ax.set_xlabel("wall seconds since the first step (evaluations included)")
        ax.set_ylabel("held-out accuracy (tool agent, avg@1)")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("runs/async_rollout"))
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--eval-every", type=int, default=10)
    parser.add_argument("--eval-prompts", type=int, default=200)
    parser.add_argument("--sft-steps", type=int, default=600)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--latency-median", type=float, default=1.0)
    parser.add_argument("--latency-sigma", type=float, default=1.3)
    parser.add_argument("--settings", nargs="*", default=list(SETTINGS), choices=list(SETTINGS))
    parser.add_argument("--workloads", nargs="*", default=["tool latency", "no latency"],
                        choices=["tool latency", "no latency"])
    args = parser.parse_args()
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    sft_dir = build_warm_start(out, args.sft_steps, args.seed)
    from megatron_spo.demo.task import write_jsonl

    val = [json.loads(line) for line in open(out / "data" / "val.jsonl")][: args.eval_prompts]
    write_jsonl(val, out / "data" / "val_eval.jsonl")
    print(f"warm start ready in {time.perf_counter() - t0:.0f} s: {sft_dir}", flush=True)
    q = latency_quantiles(args.latency_median, args.latency_sigma)
    print(f"injected tool latency: log-normal, p50 {q['p50']:.3f} s, p99 {q['p99']:.2f} s "
          f"({q['p99'] / q['p50']:.1f}x), mean {q['mean']:.3f} s", flush=True)
    results: dict[str, dict] = {}
    for workload in args.workloads:
        interpreter = slow_interpreter(out, args.latency_median, args.latency_sigma) if workload == "tool latency" else None
        config = train_config(out, sft_dir, args, interpreter)
        runs = results.setdefault(workload, {})
        for name in args.settings:
            nproc, overrides = SETTINGS[name]
            run_dir = out / "runs" / f"{workload.replace(' ', '_')}__{name.replace(' ', '_').replace('+', 'p')}"
            started = time.perf_counter()
            runs[name] = summarize(run_setting(config, run_dir, nproc, overrides))
            runs[name]["wall_s"] = time.perf_counter() - started
            print(f"{workload:12s} {name:14s} {runs[name]['trajectories_per_s']:6.2f} traj/s, "
                  f"final accuracy {runs[name]['final_accuracy']:.3f}, {runs[name]['wall_s']:.0f} s", flush=True)
            (out / "results.json").write_text(json.dumps(results, indent=1))
    report(results, q)
    try:
        plot(results, out / "async_rollout.png")
        print(f"plot: {out / 'async_rollout.png'}")
    except ImportError:
        print("no matplotlib: no plot")
    return 0


def report(results: dict, q: dict) -> None:
    print("\n| workload | setting | trained traj/s | vs sync GRPO | final held-out acc | s to sync GRPO's final |")
    print("| --- | --- | --- | --- | --- | --- |")
    for workload, runs in results.items():
        base = runs.get("sync GRPO")
        for name, s in runs.items():
            ratio = s["trajectories_per_s"] / base["trajectories_per_s"] if base else float("nan")
            reach = time_to(s["curve"], base["final_accuracy"]) if base else None
            print(f"| {workload} | {name} | {s['trajectories_per_s']:.2f} | {ratio:.2f}x | {s['final_accuracy']:.3f} | "
                  f"{'not reached' if reach is None else f'{reach:.0f}'} |")


if __name__ == "__main__":
    sys.exit(main())
