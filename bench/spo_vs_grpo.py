"""SPO against GRPO on the embedded demo task, from one SFT warm start, at equal generated tokens.

    OMP_NUM_THREADS=1 .venv/bin/python bench/spo_vs_grpo.py [--sft DIR --data-dir DIR] [--quick]

Both runs go through the product path, `torchrun --nproc_per_node 2 -m megatron_spo train`, and
differ only in the algorithm and how a step's 64 sequences are formed:

- SPO  (Xu & Ding et al., "Single-stream Policy Optimization", 2025): 64 prompts x 1 response,
  advantage A_i = (r_i - p_hat(x_i)) normalised over the batch, p_hat from the per-prompt value
  tracker. No offline values: every prompt starts at the Beta(0.5, 0.5) prior, so no generated
  tokens are spent outside the budget counted here.
- GRPO (Shao et al., "DeepSeekMath", 2024): 8 prompts x 8 responses, A_ij = (r_ij - mean_j r_i.)
  / (std_j r_i. + eps), so a prompt whose 8 rewards agree contributes nothing.

Same lr, same PPO-clip loss, same mini-batches of 32 sequences (2 optimizer steps per training
step), same evaluation: held-out accuracy with one sample per prompt (`eval.n: 1`) at temperature
1, top_p 1, top_k -1 every `--eval-every` steps and before the first step. The budget axis is
`rollout/total_generated_tokens` from each run's metrics.jsonl. Both runs take the same number of
steps first; if their budgets then differ by more than `--budget-tolerance`, the shorter one is
resumed from its last checkpoint for the steps that close the gap, so both end at about the same
budget (the actual budgets are reported).

Reported:
- accuracy against generated tokens for both (table + PNG),
- tokens each needs to first reach GRPO's final accuracy (linear interpolation between
  evaluations) and their ratio SPO / GRPO ("not reached" when SPO's curve never gets there),
- the actor's training throughput (`perf/train_tokens_per_s`, one rank's update phase) against a
  plain PyTorch step (HF `Qwen2ForCausalLM` forward + backward + `torch.optim.AdamW`, clip 1.0)
  on one rank's mini-batch of sequences, unpadded, at the mean real length (prompt as the trainer
  builds it + mean response; the trainer counts real tokens), timed in this process after the
  runs, one thread.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import yaml

from megatron_spo import atomic

ALGORITHMS = ("spo", "grpo")


@dataclasses.dataclass(kw_only=True)
class BenchSettings:
    steps: int = 150
    """Training steps of each run before budget matching (the demo's 150 SPO steps, ~0.3M tokens)."""
    eval_every: int = 15
    """Steps between held-out evaluations (11 points per curve at 150 steps)."""
    eval_prompts: int = 400
    """Held-out prompts per evaluation; with n = 1 the standard error is ~0.025 near 50% accuracy."""
    sequences_per_step: int = 64
    """Sequences generated per step by both: SPO 64 prompts x 1, GRPO 8 prompts x 8."""
    grpo_n: int = 8
    """GRPO responses per prompt (the trainer's default for grpo)."""
    mini_batch_sequences: int = 32
    """Sequences per optimizer step for both (2 updates per training step)."""
    lr: float = 4e-4
    """Peak lr for both (4e-4 is where SPO learns this task without collapsing; 1e-3 collapsed)."""
    max_response_tokens: int = 48
    """The demo's response limit (worked solutions are ~30 tokens)."""
    sft_steps: int = 800
    """SFT warm start steps when no --sft model is given (the demo's recipe: batch 32, lr 3e-3)."""
    sft_lr: float = 3e-3
    budget_tolerance: float = 0.03
    """Relative budget gap above which the shorter run is extended by resuming it."""
    nproc: int = 2
    """torchrun processes (data parallel ranks) per run."""


QUICK = BenchSettings(steps=6, eval_every=3, eval_prompts=64, sft_steps=60)


def _run(argv: list[str], log: Path, env: dict[str, str]) -> float:
    started = time.perf_counter()
    with open(log, "a") as fh:
        proc = subprocess.run(argv, stdout=fh, stderr=subprocess.STDOUT, env=env)
    if proc.returncode != 0:
        tail = "".join(open(log).readlines()[-20:])
        raise SystemExit(f"`{' '.join(argv[:6])} ...` failed (exit {proc.returncode}); log {log}:\n{tail}")
    return time.perf_counter() - started


def _load_average() -> str:
    return " ".join(f"{x:.1f}" for x in os.getloadavg())


def warm_start(args, settings: BenchSettings, out: Path, env) -> tuple[Path, Path]:
    """(SFT model dir, data dir holding train.jsonl / val.jsonl): given, or made like the demo does."""
    if args.sft is not None:
        return args.sft, args.data_dir
    from megatron_spo.demo.assets import build_demo_assets

    assets = build_demo_assets(out / "assets")
    sft_dir = out / "sft"
    print(f"SFT warm start, {settings.sft_steps} steps (load {_load_average()})", flush=True)
    _run([sys.executable, "-m", "megatron_spo", "sft", "--model", str(assets.model_dir), "--data",
          str(assets.sft_jsonl), "--out", str(sft_dir), "--overwrite", f"max_steps={settings.sft_steps}",
          f"optimizer.lr={settings.sft_lr}", "global_batch_size=32", "micro_batch_size=32", "optimizer.warmup_steps=20",
          "optimizer.schedule=constant", "epochs=100"], out / "sft.log", env)
    return sft_dir, Path(assets.train_jsonl).parent


def run_config(algorithm: str, settings: BenchSettings, sft: Path, train: Path, val: Path, run_dir: Path,
               total_steps: int, seed: int) -> dict:
    n = 1 if algorithm == "spo" else settings.grpo_n
    prompts = settings.sequences_per_step // n
    return {
        "model": {"hf_dir": str(sft)},
        "data": {"train_files": [str(train)], "val_files": [str(val)]},
        "run_dir": str(run_dir),
        "seed": seed,
        "total_steps": total_steps,
        # algorithm.spo.gen_batch_size is SPO's sampling pool (the demo's 256); GRPO takes the next prompts in order
        "algorithm": {"name": algorithm, "spo": {"gen_batch_size": max(256, prompts)}},
        "rollout": {"n": n, "max_response_tokens": settings.max_response_tokens, "reward": {"pool": "inline"}},
        "batch": {"train_batch_size": prompts,
                  "mini_batch_size": settings.mini_batch_sequences // n,
                  "micro_batch_size": settings.mini_batch_sequences, "max_tokens_per_micro_batch": None},
        "optimizer": {"lr": settings.lr, "weight_decay": 0.0},
        "checkpoint": {"every_steps": settings.eval_every, "keep_last": 1},
        "eval": {"every_steps": settings.eval_every, "before_train": True, "n": 1, "temperature": 1.0,
                 "top_p": 1.0, "top_k": -1},
        "logging": {"tensorboard": False, "progress_bar": False},
    }


def train(config: dict, config_path: Path, settings: BenchSettings, env, log: Path, resume: str) -> float:
    # --standalone: torchrun picks its own free rendezvous port (no race with other jobs)
    atomic.write_text(config_path, yaml.safe_dump(config, sort_keys=False))
    return _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(settings.nproc),
                 "-m", "megatron_spo", "train", "--config", str(config_path),
                 f"checkpoint.resume={resume}", "--no-export"], log, env)


def read_run(run_dir: Path) -> dict:
    rows = [json.loads(line) for line in open(run_dir / "metrics.jsonl") if line.strip()]
    train_rows = [r for r in rows if "rollout/total_generated_tokens" in r]
    tokens_at = {r["step"]: r["rollout/total_generated_tokens"] for r in train_rows}
    tokens_at[0] = 0
    curve = [(tokens_at[r["step"]], r["eval/accuracy"], r["step"]) for r in rows if "eval/accuracy" in r]
    return {"steps": train_rows[-1]["step"], "tokens": train_rows[-1]["rollout/total_generated_tokens"],
            "curve": sorted(curve),
            "tokens_per_step": statistics.mean(r["rollout/generated_tokens"] for r in train_rows[-20:]),
            "train_tokens_per_s": statistics.median(r["perf/train_tokens_per_s"] for r in train_rows),
            "step_s": statistics.median(r["perf/step_s"] for r in train_rows),
            "reward_first": statistics.mean(r["reward/mean"] for r in train_rows[:10]),
            "reward_last": statistics.mean(r["reward/mean"] for r in train_rows[-10:]),
            "response_length": statistics.mean(r["rollout/response_length"] for r in train_rows)}


def tokens_to_reach(curve: list[tuple[int, float, int]], target: float) -> float | None:
    """First budget at which the piecewise-linear accuracy curve reaches `target`, or None."""
    for (t0, a0, _), (t1, a1, _) in zip(curve, curve[1:]):
        if a0 >= target:
            return float(t0)
        if a1 >= target:
            return t0 + (t1 - t0) * (target - a0) / (a1 - a0)
    return float(curve[-1][0]) if curve and curve[-1][1] >= target else None


def _ratio(need: dict[str, float | None]) -> float | None:
    """SPO's tokens over GRPO's to reach the target; None when undefined (see _describe)."""
    return need["spo"] / need["grpo"] if need["spo"] is not None and need["grpo"] else None


def _describe(ratio: float | None, need: dict[str, float | None]) -> str:
    if ratio is not None:
        return f"{ratio:.2f}"
    if need["spo"] is None:
        return "not reached (SPO never gets to the target)"
    return "undefined (the warm start already meets the target)"


def accuracy_at(curve: list[tuple[int, float, int]], budget: float) -> float:
    """Accuracy interpolated linearly at `budget` (which must lie within the curve)."""
    for (t0, a0, _), (t1, a1, _) in zip(curve, curve[1:]):
        if t0 <= budget <= t1:
            return a0 + (a1 - a0) * (budget - t0) / max(t1 - t0, 1e-9)
    return curve[-1][1]


def plain_pytorch_tokens_per_s(model_dir: Path, batch: int, length: int, steps: int = 10) -> float:
    """HF forward + backward + AdamW (clip 1.0) on random tokens of shape (batch, length), 1 thread."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.0)
    ids = torch.randint(0, model.config.vocab_size, (batch, length))

    def step():
        loss = model(input_ids=ids, labels=ids).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()

    step()  # warm-up
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return batch * length / statistics.median(times)


def plot(runs: dict[str, dict], path: Path, title: str, labels: dict[str, str] | None = None) -> None:
    """Accuracy against generated tokens, one curve per run (`labels`: legend per run name)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=100)
    labels = labels or {"spo": "SPO (64 prompts x 1)", "grpo": "GRPO (8 prompts x 8)"}
    for name, run in runs.items():
        xs = [t / 1e3 for t, _, _ in run["curve"]]
        ys = [a for _, a, _ in run["curve"]]
        ax.plot(xs, ys, marker="o", markersize=4, label=labels[name])
    ax.set_xlabel("generated tokens (thousands)")
    ax.set_ylabel("held-out accuracy (1 sample, T = 1)")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    with atomic.open_for_write(path) as fh:
        fig.savefig(fh, format="png")
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sft", type=Path, help="SFT warm-start HF model dir (default: make one, 800 steps)")
    parser.add_argument("--data-dir", type=Path, help="dir with train.jsonl and val.jsonl (required with --sft)")
    parser.add_argument("--out", type=Path, default=Path("/tmp/bench_spo_vs_grpo"), help="work dir")
    parser.add_argument("--png", type=Path, default=Path(__file__).with_name("spo_vs_grpo.png"), help="plot path")
    parser.add_argument("--quick", action="store_true", help="a few steps and 64 eval prompts (smoke test)")
    parser.add_argument("--steps", type=int, help="override the steps per run")
    parser.add_argument("--seed", type=int, default=0, help="seed of both runs: data order, sampling [0]")
    args = parser.parse_args()
    if (args.sft is None) != (args.data_dir is None):
        parser.error("--sft and --data-dir go together")
    settings = QUICK if args.quick else BenchSettings()
    if args.steps:
        settings = dataclasses.replace(settings, steps=args.steps)
    started = time.perf_counter()
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", "TOKENIZERS_PARALLELISM": "false"}
    loads = [_load_average()]

    sft, data_dir = warm_start(args, settings, out, env)
    val_records = [json.loads(line) for line in open(data_dir / "val.jsonl") if line.strip()][: settings.eval_prompts]
    val = out / "val_eval.jsonl"
    atomic.write_text(val, "".join(json.dumps(r) + "\n" for r in val_records))

    runs, wall = {}, {}
    for name in ALGORITHMS:
        print(f"{name}: {settings.steps} steps (load {_load_average()})", flush=True)
        run_dir = out / name
        config = run_config(name, settings, sft, data_dir / "train.jsonl", val, run_dir, settings.steps, args.seed)
        wall[name] = train(config, out / f"{name}.yaml", settings, env, out / f"{name}.log", "overwrite")
        loads.append(_load_average())
        runs[name] = read_run(run_dir)
        print(f"  {wall[name]:.0f}s, {runs[name]['tokens']} tokens, final accuracy {runs[name]['curve'][-1][1]:.3f}",
              flush=True)

    # equal budgets: resume the shorter run for the whole eval intervals that best close the gap
    # (its curve must end on an evaluation, so the extension is a multiple of eval_every)
    short, long_ = sorted(ALGORITHMS, key=lambda a: runs[a]["tokens"])
    gap = runs[long_]["tokens"] - runs[short]["tokens"]
    intervals = round(gap / (runs[short]["tokens_per_step"] * settings.eval_every))
    if gap > settings.budget_tolerance * runs[long_]["tokens"] and intervals > 0:
        total = runs[short]["steps"] + intervals * settings.eval_every
        print(f"{short}: {gap} tokens behind, resuming to {total} steps", flush=True)
        config = run_config(short, settings, sft, data_dir / "train.jsonl", val, out / short, total, args.seed)
        wall[short] += train(config, out / f"{short}.yaml", settings, env, out / f"{short}.log", "auto")
        runs[short] = read_run(out / short)
        loads.append(_load_average())

    budget = min(runs[a]["tokens"] for a in ALGORITHMS)
    grpo_final = runs["grpo"]["curve"][-1][1]
    need = {a: tokens_to_reach(runs[a]["curve"], grpo_final) for a in ALGORITHMS}
    ratio = _ratio(need)
    # one evaluation of 400 samples is noisy (+-0.025) and the curves oscillate, so the same
    # reading against the mean of GRPO's last three evaluations as well
    grpo_last3 = statistics.mean(a for _, a, _ in runs["grpo"]["curve"][-3:])
    need3 = {a: tokens_to_reach(runs[a]["curve"], grpo_last3) for a in ALGORITHMS}
    ratio3 = _ratio(need3)

    # throughput: one rank's update phase vs a plain PyTorch step on the same batch shape
    per_rank_batch = settings.mini_batch_sequences // settings.nproc
    # the trainer counts real tokens (prompt + response lengths, no padding), so the baseline runs
    # unpadded rows of the mean real length: the least work that holds those tokens
    from megatron_spo.rollout.prompts import PromptConfig, load_tokenizer
    from megatron_spo.training.trainer import load_prompts

    prompts, _ = load_prompts([str(val)], "prompt", "answer", load_tokenizer(sft), PromptConfig())
    prompt_tokens = statistics.mean(len(p.token_ids) for p in prompts)
    length = round(prompt_tokens + statistics.mean(runs[a]["response_length"] for a in ALGORITHMS))
    baseline = plain_pytorch_tokens_per_s(sft, per_rank_batch, length)
    loads.append(_load_average())

    summary = {
        "settings": dataclasses.asdict(settings),
        "sft": str(sft),
        "budget": budget,
        "runs": runs,
        "wall_seconds": wall,
        "grpo_final_accuracy": grpo_final,
        "tokens_to_grpo_final": need,
        "ratio_spo_over_grpo": ratio,
        "grpo_last3_mean_accuracy": grpo_last3,
        "tokens_to_grpo_last3_mean": need3,
        "ratio_spo_over_grpo_last3_mean": ratio3,
        "seed": args.seed,
        "accuracy_at_common_budget": {a: accuracy_at(runs[a]["curve"], budget) for a in ALGORITHMS},
        "baseline_train_tokens_per_s": baseline,
        "baseline_shape": [per_rank_batch, length],
        "load_averages": loads,
        "bench_wall_seconds": time.perf_counter() - started,
    }
    atomic.write_json(out / "summary.json", summary)
    plot(runs, args.png, f"demo task, same SFT start, lr {settings.lr:g}, 64 sequences/step, seed {args.seed}")

    print(f"\nbudgets: SPO {runs['spo']['tokens']:,} tokens in {runs['spo']['steps']} steps, "
          f"GRPO {runs['grpo']['tokens']:,} in {runs['grpo']['steps']} steps")
    print("\n| generated tokens | SPO step | SPO accuracy | GRPO step | GRPO accuracy |\n| --- | --- | --- | --- | --- |")
    for s, g in zip(runs["spo"]["curve"], runs["grpo"]["curve"]):
        print(f"| {s[0]:,} / {g[0]:,} | {s[2]} | {s[1]:.3f} | {g[2]} | {g[1]:.3f} |")
    for s in runs["spo"]["curve"][len(runs["grpo"]["curve"]):]:
        print(f"| {s[0]:,} / - | {s[2]} | {s[1]:.3f} | - | - |")
    for g in runs["grpo"]["curve"][len(runs["spo"]["curve"]):]:
        print(f"| - / {g[0]:,} | - | - | {g[2]} | {g[1]:.3f} |")
    fmt = lambda x: "not reached" if x is None else f"{x:,.0f}"
    print(f"\nGRPO final accuracy {grpo_final:.3f}; tokens to reach it: SPO {fmt(need['spo'])}, GRPO {fmt(need['grpo'])}; "
          f"ratio SPO/GRPO {_describe(ratio, need)}")
    print(f"GRPO last-3 mean accuracy {grpo_last3:.3f}; tokens to reach it: SPO {fmt(need3['spo'])}, "
          f"GRPO {fmt(need3['grpo'])}; ratio SPO/GRPO {_describe(ratio3, need3)}")
    acc = summary["accuracy_at_common_budget"]
    print(f"accuracy at the common budget {budget:,}: SPO {acc['spo']:.3f}, GRPO {acc['grpo']:.3f}")
    for a in ALGORITHMS:
        r = runs[a]
        print(f"{a}: train {r['train_tokens_per_s']:,.0f} tok/s (one rank, median) = "
              f"{r['train_tokens_per_s'] / baseline:.2f}x plain PyTorch ({baseline:,.0f} tok/s, batch {per_rank_batch} x "
              f"{length}); step {r['step_s']:.2f}s; reward {r['reward_first']:.3f} -> {r['reward_last']:.3f}; "
              f"wall {wall[a]:.0f}s")
    print(f"load averages along the run: {loads}; bench wall {summary['bench_wall_seconds']:.0f}s")


if __name__ == "__main__":
    main()
