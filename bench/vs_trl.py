"""megatron-spo's GRPO step against TRL's GRPOTrainer: same model, task, batch shape and threads.

    .venv/bin/python bench/vs_trl.py [--sft DIR --data-dir DIR] [--setups 1x2,2x1] [--quick]
    make bench-trl          # builds .venv-trl (torch 2.13.0 CPU + trl 1.16.0) if missing, then runs this

TRL is what a user would pick to run GRPO on one machine. It lives in its own venv (.venv-trl: it
brings its own transformers) and runs as a subprocess, `bench/_trl_runner.py`; megatron-spo runs
through the product path, `python -m megatron_spo train` (one process) or `torchrun
--nproc_per_node 2 -m megatron_spo train` (two data-parallel ranks), and its numbers are read
from RUN_DIR/metrics.jsonl.

Both train the same model from the same SFT warm start (the demo's tiny Qwen2, made here with
`megatron-spo sft` unless --sft is given, so responses have the length a trained policy gives
them rather than a random model's) on the demo task's training prompts, rendered once by
megatron-spo's prompt builder (chat template + answer-format suffix) and handed to TRL as text
with the same token ids. Every step: 16 prompts x 8 responses of at most 48 tokens at temperature
1 (no top-p / top-k), graded by the boxed-answer check (1 / 0), group-normalised advantages, no
KL / reference model, PPO clip 0.2 / 0.28 with a token mean, and one optimizer step on all 128
sequences (lr 1e-6, the default of both: throughput does not depend on it, and the response
length stays at the warm start's). TRL runs fp32 on CPU, HF `generate`, no gradient
checkpointing (its default is on), and with one optimizer step per generation it skips the
old-logprob forward pass (the ratio is 1 by construction); so does megatron-spo in that case (one
update per step on fresh samples).

A setup "PxT" is P processes with T torch threads each (P x T = the box's 2 cores); both trainers
run every setup. The first `warmup` steps are excluded; over the next `steps` steps:

- seconds/step: wall time from the end of the last warm-up step to the end of the last step,
  divided by the steps (everything included: sync, generation, grading, logprobs, update, logging);
- generated tokens/s: response tokens (EOS included) over that wall time;
- trained tokens/s: prompt + response tokens (unpadded) of the trained sequences over that wall
  time; prompt tokens are counted as 128 x the mean prompt length of the training set for both
  (TRL's own running count is printed beside it as a check);
- phases per step: megatron-spo's from metrics.jsonl (weight sync; generation + grading + old
  logprobs; the update), TRL's from timers around `_generate` and `_generate_and_score_completions`.

The ratio ours / TRL is printed per setup; the goal is >= 2x. Results: bench/RESULTS.md.

`--to-accuracy --demo-dir DIR` measures the other thing a user cares about: training seconds to
a fixed held-out accuracy, megatron-spo's SPO (the demo's setting) against TRL's GRPOTrainer at a
sweep of learning rates, from the demo's SFT warm start (`bench/_vs_trl_accuracy.py` says how).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import yaml

from megatron_spo import atomic

ROOT = Path(__file__).resolve().parent.parent
TRL_RUNNER = Path(__file__).resolve().with_name("_trl_runner.py")


@dataclasses.dataclass(kw_only=True)
class BenchSettings:
    steps: int = 20
    """Measured training steps of each run."""
    warmup: int = 3
    """Steps run first and excluded (first-call allocations, lazy imports, cache warm-up)."""
    prompts: int = 16
    """Prompts per step."""
    n: int = 8
    """Responses per prompt (GRPO group size; TRL's num_generations)."""
    max_response_tokens: int = 48
    """The demo's response limit (its worked solutions are ~20-40 tokens)."""
    lr: float = 1e-6
    """Both trainers' default lr; small, so the response length stays that of the warm start."""
    sft_steps: int = 300
    """SFT warm start steps when no --sft model is given (batch 32, lr 3e-3: the demo's recipe, shorter)."""
    setups: tuple[str, ...] = ("1x2", "2x1")
    """Processes x torch threads per process."""
    rounds: int = 2
    """Runs of each trainer per setup, alternating which goes first; the best is reported (other
    jobs on a shared box only ever slow a run down)."""


QUICK = BenchSettings(steps=2, warmup=1, sft_steps=30, rounds=1)


def _load_average() -> float:
    return os.getloadavg()[0]


def _run(argv: list[str], log: Path, env: dict[str, str]) -> tuple[float, list[float]]:
    """Run `argv` with output to `log`; (wall seconds, 1-minute load averages sampled every 2 s)."""
    started = time.perf_counter()
    loads = [_load_average()]
    with open(log, "w") as fh:
        proc = subprocess.Popen(argv, stdout=fh, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
        while proc.poll() is None:
            time.sleep(2.0)
            loads.append(_load_average())
    if proc.returncode != 0:
        tail = "".join(open(log).readlines()[-25:])
        raise SystemExit(f"`{' '.join(map(str, argv[:6]))} ...` failed (exit {proc.returncode}); log {log}:\n{tail}")
    return time.perf_counter() - started, loads


def parse_setup(setup: str) -> tuple[int, int]:
    """'2x1' -> (2 processes, 1 thread each)."""
    try:
        procs, threads = (int(x) for x in setup.lower().split("x"))
    except ValueError:
        raise SystemExit(f"setup {setup!r}: expected PROCESSESxTHREADS, e.g. 1x2") from None
    if procs < 1 or threads < 1:
        raise SystemExit(f"setup {setup!r}: processes and threads must be >= 1")
    return procs, threads


def warm_start(args, settings: BenchSettings, out: Path, env) -> tuple[Path, Path]:
    """(SFT model dir, data dir holding train.jsonl): given, or made as the demo makes them."""
    if args.sft is not None:
        return args.sft, args.data_dir
    from megatron_spo.demo.assets import build_demo_assets

    assets = build_demo_assets(out / "assets")
    sft_dir = out / "sft"
    print(f"SFT warm start, {settings.sft_steps} steps (load {_load_average():.1f})", flush=True)
    _run([sys.executable, "-m", "megatron_spo", "sft", "--model", str(assets.model_dir), "--data",
          str(assets.sft_jsonl), "--out", str(sft_dir), "--overwrite", f"max_steps={settings.sft_steps}",
          "optimizer.lr=3e-3", "global_batch_size=32", "micro_batch_size=32", "optimizer.warmup_steps=20", "optimizer.schedule=constant",
          "epochs=100"], out / "sft.log", {**env, "OMP_NUM_THREADS": "2"})
    return sft_dir, Path(assets.train_jsonl).parent


def rendered_prompts(model_dir: Path, train: Path, out: Path) -> tuple[Path, float]:
    """TRL's dataset: each training prompt as megatron-spo renders it, with its token ids; and the
    mean prompt length in tokens."""
    from megatron_spo.rollout.prompts import PromptConfig, build_prompts, load_tokenizer

    records = [json.loads(line) for line in open(train) if line.strip()]
    # the trainer's defaults (data.prompt.*): chat template + the authors' answer-format suffix
    built = build_prompts([r["prompt"] for r in records], load_tokenizer(model_dir), PromptConfig())
    rows = [{"prompt": b.text, "prompt_token_ids": b.token_ids, "answer": str(records[b.index]["answer"])}
            for b in built.prompts]
    path = out / "trl_prompts.jsonl"
    atomic.write_text(path, "".join(json.dumps(r) + "\n" for r in rows))
    return path, statistics.mean(len(r["prompt_token_ids"]) for r in rows)


def ours_config(settings: BenchSettings, sft: Path, train: Path, run_dir: Path, seed: int) -> dict:
    return {
        "model": {"hf_dir": str(sft)},
        "data": {"train_files": [str(train)]},  # no val_files: no evaluation
        "run_dir": str(run_dir),
        "seed": seed,
        "total_steps": settings.warmup + settings.steps,
        "algorithm": {"name": "grpo"},  # GRPO reads no sampling pool: the next prompts in order
        "rollout": {"n": settings.n, "max_response_tokens": settings.max_response_tokens,
                    "temperature": 1.0, "top_p": 1.0, "top_k": -1,
                    # the boxed-answer check, graded in this process like TRL's reward function
                    # (math-verify only changes non-integer answers, and this task has none)
                    "reward": {"pool": "inline", "math_verify": False}},
        # one optimizer step on all 16 x 8 sequences; micro-batching is the trainer's default
        "batch": {"train_batch_size": settings.prompts, "mini_batch_size": settings.prompts},
        "optimizer": {"lr": settings.lr, "weight_decay": 0.0},
        "checkpoint": {"every_steps": 0, "keep_last": 1},
        "logging": {"tensorboard": False, "progress_bar": False},
    }


def run_ours(settings, setup, sft, train, out, env, seed) -> dict:
    procs, threads = parse_setup(setup)
    run_dir = out / f"ours_{setup}"
    shutil.rmtree(run_dir, ignore_errors=True)  # metrics.jsonl would append to an earlier run's
    config_path = out / f"ours_{setup}.yaml"
    atomic.write_text(config_path, yaml.safe_dump(ours_config(settings, sft, train, run_dir, seed), sort_keys=False))
    launcher = ([sys.executable, "-m", "megatron_spo"] if procs == 1 else
                [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(procs),
                 "-m", "megatron_spo"])
    wall, loads = _run(launcher + ["train", "--config", str(config_path), "checkpoint.resume=overwrite", "--no-export"],
                       out / f"ours_{setup}.log", {**env, "OMP_NUM_THREADS": str(threads)})
    return {"wall": wall, "loads": loads, **read_ours(run_dir / "metrics.jsonl", settings.warmup, procs)}


def read_ours(metrics: Path, warmup: int, dp: int) -> dict:
    """Per-step numbers of the measured steps (after `warmup`) from a run's metrics.jsonl."""
    rows = [json.loads(line) for line in open(metrics) if line.strip()]
    rows = [r for r in rows if "rollout/generated_tokens" in r]
    start = next(r["time"] for r in rows if r["step"] == warmup)
    measured = [r for r in rows if r["step"] > warmup]
    generated = [r["rollout/generated_tokens"] for r in measured]
    times = [start] + [r["time"] for r in measured]
    return {
        "steps": len(measured),
        "wall_s": measured[-1]["time"] - start,
        "median_step_s": statistics.median(b - a for a, b in zip(times, times[1:])),
        "generated_per_step": statistics.mean(generated),
        "sequences_per_step": statistics.mean(r["rollout/train_sequences"] for r in measured),
        "response_length": statistics.mean(r["rollout/response_length"] for r in measured),
        "reward": statistics.mean(r["reward/mean"] for r in measured),
        "phases": {
            "weight_sync_s": statistics.mean(r["perf/weight_sync_s"] for r in measured),
            # generation + grading + the old-logprob pass (the trainer's gen_seconds, rank 0)
            "generate_s": statistics.mean(r["rollout/generated_tokens"] / r["perf/gen_tokens_per_s"] for r in measured),
            "train_step_s": statistics.mean(r["perf/step_s"] for r in measured),
        },
        "_train_tokens_per_s_rank0": statistics.median(r["perf/train_tokens_per_s"] for r in measured),
        "_dp": dp,
    }


def run_trl(settings, setup, sft, prompts_jsonl, out, env, seed, trl_python: Path) -> dict:
    procs, threads = parse_setup(setup)
    trl_out = out / f"trl_{setup}"
    shutil.rmtree(trl_out, ignore_errors=True)
    trl_out.mkdir(parents=True, exist_ok=True)
    launcher = ([str(trl_python)] if procs == 1 else
                [str(trl_python), "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(procs)])
    wall, loads = _run(launcher + [str(TRL_RUNNER), "--model", str(sft), "--data", str(prompts_jsonl),
                                   "--out", str(trl_out), "--steps", str(settings.warmup + settings.steps),
                                   "--prompts", str(settings.prompts), "--generations", str(settings.n),
                                   "--max-completion-length", str(settings.max_response_tokens),
                                   "--lr", str(settings.lr), "--seed", str(seed), "--threads", str(threads)],
                       out / f"trl_{setup}.log", {**env, "OMP_NUM_THREADS": str(threads)})
    result = json.loads((trl_out / "trl_result.json").read_text())
    w = settings.warmup
    ends = result["step_ends"]
    sequences = settings.prompts * settings.n
    gen, gen_score = result["generate_seconds"][w:], result["generate_and_score_seconds"][w:]
    tokens_seen = result["num_tokens"]
    return {
        "wall": wall, "loads": loads,
        "steps": len(ends) - w,
        "wall_s": ends[-1] - ends[w - 1],
        "median_step_s": statistics.median(b - a for a, b in zip(ends[w - 1:], ends[w:])),
        "generated_per_step": statistics.mean(result["completion_mean_length"][w:]) * sequences,
        "sequences_per_step": sequences,
        "response_length": statistics.mean(result["completion_mean_length"][w:]),
        "reward": statistics.mean(result["reward"][w:]),
        "phases": {"generate_s": statistics.mean(gen), "grade_and_prepare_s": statistics.mean(gen_score) - statistics.mean(gen)},
        "exact_trained_per_step": (tokens_seen[-1] - tokens_seen[w - 1]) / (len(tokens_seen) - w),
        "versions": {k: result[k] for k in ("trl_version", "transformers_version", "torch_version")},
    }


def summarize(run: dict, prompt_tokens: float) -> dict:
    """seconds/step and tokens/s over the measured steps (trained = generated + prompt tokens)."""
    step_s = run["wall_s"] / run["steps"]
    trained = run["generated_per_step"] + run["sequences_per_step"] * prompt_tokens
    return {"step_s": step_s, "gen_tokens_per_s": run["generated_per_step"] / step_s,
            "train_tokens_per_s": trained / step_s, "trained_per_step": trained}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sft", type=Path, help="SFT warm-start HF model dir (default: make one)")
    parser.add_argument("--data-dir", type=Path, help="dir with the demo's train.jsonl (required with --sft)")
    parser.add_argument("--out", type=Path, default=Path("/tmp/bench_vs_trl"), help="work dir")
    parser.add_argument("--setups", help="comma-separated PROCESSESxTHREADS (default 1x2,2x1)")
    parser.add_argument("--steps", type=int, help="override the measured steps")
    parser.add_argument("--rounds", type=int, help="override the rounds (runs of each trainer per setup)")
    parser.add_argument("--quick", action="store_true", help="a short SFT and 1 + 2 steps per run (smoke test)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--trl-python", type=Path, default=ROOT / ".venv-trl" / "bin" / "python",
                        help="interpreter of the venv holding trl (default .venv-trl)")
    accuracy = parser.add_argument_group("time to accuracy (--to-accuracy)")
    accuracy.add_argument("--to-accuracy", action="store_true",
                          help="compare training seconds to held-out accuracy targets instead of step throughput")
    accuracy.add_argument("--demo-dir", type=Path, help="output dir of `megatron-spo demo` (warm start, data, spo.yaml)")
    accuracy.add_argument("--ours-lrs", type=float, nargs="+", default=[1e-4], help="megatron-spo SPO lrs [1e-4]")
    accuracy.add_argument("--ours-variants", nargs="+", default=[""],
                          help='megatron-spo settings, each "key=value ..." train overrides, "" the demo\'s [""]')
    accuracy.add_argument("--trl-lrs", type=float, nargs="+", default=[1e-4, 3e-4, 1e-3], help="TRL lrs [1e-4 3e-4 1e-3]")
    accuracy.add_argument("--ours-steps", type=int, default=250, help="megatron-spo steps [250, the demo's]")
    accuracy.add_argument("--eval-every", type=int, default=25, help="steps between evaluations [25]")
    accuracy.add_argument("--eval-n", type=int, default=4, help="samples per held-out prompt [4]")
    accuracy.add_argument("--budget-factor", type=float, default=1.5,
                          help="TRL's training-time budget over megatron-spo's longest run [1.5]")
    accuracy.add_argument("--gains", type=float, nargs="+", default=[0.05, 0.10, 0.15, 0.20],
                          help="targets: the warm start's accuracy plus these [0.05 0.1 0.15 0.2]")
    accuracy.add_argument("--reuse", action="store_true", help="keep finished runs and evaluations found in --out")
    args = parser.parse_args()
    if args.to_accuracy:
        if args.demo_dir is None:
            parser.error("--to-accuracy needs --demo-dir (the output dir of `megatron-spo demo`)")
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        import _vs_trl_accuracy

        _vs_trl_accuracy.main(args, BenchSettings(), rendered_prompts)
        return
    if (args.sft is None) != (args.data_dir is None):
        parser.error("--sft and --data-dir go together")
    if not args.trl_python.exists():
        raise SystemExit(f"{args.trl_python} is missing: `make bench-trl` builds it (torch 2.13.0 CPU + trl 1.16.0)")
    settings = QUICK if args.quick else BenchSettings()
    if args.steps:
        settings = dataclasses.replace(settings, steps=args.steps)
    if args.rounds:
        settings = dataclasses.replace(settings, rounds=args.rounds)
    if args.setups:
        settings = dataclasses.replace(settings, setups=tuple(args.setups.split(",")))
    for setup in settings.setups:
        parse_setup(setup)
    started = time.perf_counter()
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "TOKENIZERS_PARALLELISM": "false"}

    sft, data_dir = warm_start(args, settings, out, env)
    prompts_jsonl, prompt_tokens = rendered_prompts(sft, data_dir / "train.jsonl", out)

    # rounds alternate which trainer goes first, so a burst of load from other jobs on the box
    # does not always land on the same one; each trainer is reported at its best round
    rounds: dict[str, dict[str, list[dict]]] = {setup: {"ours": [], "trl": []} for setup in settings.setups}
    for round_index in range(settings.rounds):
        for setup in settings.setups:
            order = ("ours", "trl") if round_index % 2 == 0 else ("trl", "ours")
            for name in order:
                print(f"round {round_index + 1}/{settings.rounds} {name} {setup}: {settings.warmup} + {settings.steps} "
                      f"steps (load {_load_average():.1f})", flush=True)
                if name == "ours":
                    r = run_ours(settings, setup, sft, data_dir / "train.jsonl", out, env, args.seed)
                else:
                    r = run_trl(settings, setup, sft, prompts_jsonl, out, env, args.seed, args.trl_python)
                r.update(summarize(r, prompt_tokens))
                rounds[setup][name].append(r)
                print(f"  {r['step_s']:.3f} s/step, {r['gen_tokens_per_s']:,.0f} generated tok/s, "
                      f"{r['train_tokens_per_s']:,.0f} trained tok/s, response {r['response_length']:.1f} tokens, "
                      f"reward {r['reward']:.3f}, mean load {statistics.mean(r['loads']):.2f} (run wall {r['wall']:.0f}s)",
                      flush=True)
    best = {setup: {name: min(runs, key=lambda r: r["step_s"]) for name, runs in pair.items()}
            for setup, pair in rounds.items()}

    summary = {"settings": dataclasses.asdict(settings), "sft": str(sft), "prompt_tokens_mean": prompt_tokens,
               "rounds": rounds, "bench_wall_seconds": time.perf_counter() - started}
    atomic.write_json(out / "summary.json", summary)

    print(f"\n{settings.prompts} prompts x {settings.n} responses per step, <= {settings.max_response_tokens} "
          f"tokens, {settings.steps} steps after {settings.warmup} warm-up, best of {settings.rounds} rounds; "
          f"mean prompt {prompt_tokens:.1f} tokens")
    print("\n| setup | trainer | s/step | median s/step | generated tok/s | trained tok/s | response tokens "
          "| s/step, every round | mean load |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for setup, pair in best.items():
        for name, r in pair.items():
            label = "megatron-spo" if name == "ours" else f"TRL {r['versions']['trl_version']}"
            every = ", ".join(f"{x['step_s']:.3f}" for x in rounds[setup][name])
            print(f"| {setup} | {label} | {r['step_s']:.3f} | {r['median_step_s']:.3f} | {r['gen_tokens_per_s']:,.0f} | "
                  f"{r['train_tokens_per_s']:,.0f} | {r['response_length']:.1f} | {every} | "
                  f"{statistics.mean(r['loads']):.2f} |")
    print()
    for setup, pair in best.items():
        ours, trl = pair["ours"], pair["trl"]
        print(f"{setup}: ours / TRL: steps/s {trl['step_s'] / ours['step_s']:.2f}x (median step: "
              f"{trl['median_step_s'] / ours['median_step_s']:.2f}x), generated tok/s "
              f"{ours['gen_tokens_per_s'] / trl['gen_tokens_per_s']:.2f}x, trained tok/s "
              f"{ours['train_tokens_per_s'] / trl['train_tokens_per_s']:.2f}x")
        p = ours["phases"]
        update = ours["trained_per_step"] / ours["_dp"] / ours["_train_tokens_per_s_rank0"]
        print(f"  ours per step: weight sync {p['weight_sync_s']:.3f}s, generate+grade+old logprobs "
              f"{p['generate_s']:.3f}s, update ~{update:.3f}s, train_step {p['train_step_s']:.3f}s, "
              f"between steps {ours['step_s'] - p['train_step_s']:.3f}s")
        p = trl["phases"]
        print(f"  TRL per step: generate {p['generate_s']:.3f}s, grade+advantages {p['grade_and_prepare_s']:.3f}s, "
              f"update and the rest {trl['step_s'] - p['generate_s'] - p['grade_and_prepare_s']:.3f}s; "
              f"trained tokens/step {trl['trained_per_step']:,.0f} (TRL's own count {trl['exact_trained_per_step']:,.0f})")
    print(f"bench wall {summary['bench_wall_seconds']:.0f}s; summary {out / 'summary.json'}")


if __name__ == "__main__":
    main()
