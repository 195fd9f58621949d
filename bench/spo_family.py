"""The five algorithms of the SPO family on the embedded demo task, from one SFT warm start, at one
generated-token budget, and SPO-tree with the authors' edge replay beside plain SPO-tree.

    OMP_NUM_THREADS=1 .venv/bin/python bench/spo_family.py [--sft DIR --data-dir DIR] [--quick]
        [--algorithms spo,grpo,spo_chain,spo_tree,spo_tree_replay,soft_spo] [--budget TOKENS]
        [--set ALGO:key=value ...] [--reuse]

Every run goes through the product path, `torchrun --nproc_per_node 2 -m megatron_spo train`, from
the same SFT model, and stops once `rollout/total_generated_tokens` reaches the budget
(`max_generated_tokens`; responses, SPO-chain continuations and SPO-tree nodes all count). The
settings common to all are `bench/spo_vs_grpo.py`'s (lr 4e-4, no weight decay, responses up to 48
tokens, mini-batches of 32 sequences where an algorithm has a fixed number of sequences); what
each algorithm changes, and why, is in RECIPES below:

- spo        Single-stream SPO: 64 prompts x 1, A = r - p_hat (value tracker, no offline values).
- grpo       GRPO: 8 prompts x 8, group-normalised rewards.
- spo_chain  Segment Policy Optimization, chain: 64 responses, K continuations from every cut
             point; segment advantages on the low-probability tokens only.
- spo_tree   Segment Policy Optimization, tree: a tree of segments per prompt; every edge with a
             non-zero advantage is a training sequence.
- spo_tree_replay  the same trees, trained the authors' way: at most 2 edges per question a step,
             the rest replayed in later steps with their old log-probs (`replay_edges_per_question`;
             compare with spo_tree: `--algorithms spo_tree,spo_tree_replay`).
- soft_spo   Soft Policy Optimization: 64 prompts x 1, (Q_T - r)^2 with Q_T = Q0 + beta * sum of
             log pi / pi_ref; Q0 from reference samples drawn once per prompt, whose tokens are
             reported apart (`rollout/reference_tokens`), not in the budget.

Held-out accuracy is evaluated as in `spo_vs_grpo.py` (one sample per prompt, T = 1, top_p 1,
top_k -1, 400 prompts) before the first step, every K steps and after the last; K is chosen per
algorithm from its expected tokens per step so every curve has about `eval_points` points.
Reported: accuracy against generated tokens (per evaluation, and interpolated on a common grid),
final and best accuracy, tokens and sequences per step, wall seconds, the load average, and a PNG
of all curves. `--set ALGO:dotted.key=value` overrides one trainer key of one algorithm (probes);
`--reuse` reads a run already finished in `--out` with the identical config instead of training it
again (so runs made separately, e.g. concurrently, can be reported together).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import math
import os
import shutil
import statistics
import sys
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))

from spo_vs_grpo import (  # noqa: E402  (bench scripts import each other from bench/)
    BenchSettings,
    _load_average,
    accuracy_at,
    plot,
    read_run,
    run_config,
    train,
    warm_start,
)

from megatron_spo import atomic  # noqa: E402

ALGORITHMS = ("spo", "grpo", "spo_chain", "spo_tree", "spo_tree_replay", "soft_spo")


@dataclasses.dataclass(kw_only=True)
class Recipe:
    """How one algorithm runs in this bench: trainer keys over spo_vs_grpo's base config."""

    label: str
    """Legend of the curve."""
    base: str
    """spo_vs_grpo.run_config's algorithm whose config is the starting point ("spo" or "grpo")."""
    tokens_per_step: float
    """Expected generated tokens per step (from the first steps of probe runs), to place
    ~eval_points evaluations."""
    overrides: dict
    """Nested trainer keys replacing the base config's."""


RECIPES = {
    "spo": Recipe(label="SPO (64 x 1)", base="spo", tokens_per_step=1_950, overrides={}),
    "grpo": Recipe(label="GRPO (8 x 8)", base="grpo", tokens_per_step=1_850, overrides={}),
    # The warm start's responses (~29 tokens) hold ~1.3 tokens with p < 0.9 at T = 0.6 and ~2.6 at
    # T = 1 (probe over 96 training prompts): the authors' int5 would cut most responses at most
    # once, so every low-probability token is a cut point (int1). T = 1, top_p 1 as the other
    # algorithms and the evaluation sample. K = 4 (the authors' value for their larger model)
    # rather than 9 keeps the step's continuations to a few times the responses' tokens. 12.5k
    # tokens per step is the warm start's; it falls to ~5k as the policy grows confident.
    "spo_chain": Recipe(label="SPO-chain (64 x 1, int1, K=4)", base="spo", tokens_per_step=12_500, overrides={
        "algorithm": {"name": "spo_chain", "spo_chain": {
            "cut_interval": 1, "num_continuations": 4, "temperature": 1.0, "top_p": 1.0,
            "max_response_tokens": 48}},
    }),
    # Two levels: the first segment is 12 tokens (~ 0.4 of a response), the second level finishes
    # the response (up to 48 tokens in all). 4 x 4 = 16 leaves per prompt, 20 edges; 16 prompts
    # per step, 2 mini-batches of 8 prompts' edges.
    "spo_tree": Recipe(label="SPO-tree (16 prompts, 4-4, M=12)", base="spo", tokens_per_step=5_300, overrides={
        "algorithm": {"name": "spo_tree", "spo_tree": {
            "branching_factors": [4, 4], "segment_tokens": 12, "temperature": 1.0, "top_p": 1.0,
            "max_response_tokens": 48}},
        "batch": {"train_batch_size": 16, "mini_batch_size": 8},
    }),
    # The authors' edge replay on the same trees: they train at most 32 of a question's edges per
    # iteration (of up to 258 in a 6-6-6 tree; the rest wait up to 8 iterations). Here a question
    # has ~7 edges with A != 0 of its 20 (RESULTS.md: 106 of 320 per step), so 2 per step spreads
    # them over ~3-4 steps.
    "spo_tree_replay": Recipe(label="SPO-tree + edge replay (2 per question)", base="spo", tokens_per_step=5_300,
                              overrides={
        "algorithm": {"name": "spo_tree", "spo_tree": {
            "branching_factors": [4, 4], "segment_tokens": 12, "temperature": 1.0, "top_p": 1.0,
            "max_response_tokens": 48, "replay_edges_per_question": 2}},
        "batch": {"train_batch_size": 16, "mini_batch_size": 8},
    }),
    # Binary rewards shifted to {-1, 0} (the method assumes r <= 0). beta 0.1: with the authors'
    # 0.01, r / beta = -100 leaves the clamp [-20, 0] of the Q0 estimate, and an incorrect
    # response would have to drop by ~100 nats to reach its target. Q0 from 16 reference samples
    # per prompt (the authors' 256 would be ~16x this run's whole budget on 4000 prompts). lr 1e-4:
    # the loss has no PPO clip, and at 4e-4 a 22-step probe fell from 0.49 to 0.39 held-out.
    "soft_spo": Recipe(label="Soft SPO (64 x 1, beta 0.1, lr 1e-4)", base="spo", tokens_per_step=1_850, overrides={
        "algorithm": {"name": "soft_spo", "soft_spo": {
            "beta": 0.1, "reward_offset": -1.0, "q0_num_samples": 16, "max_response_tokens": 48,
            "loss_type": "squared"}},
        "optimizer": {"lr": 1e-4},
    }),
}


@dataclasses.dataclass(kw_only=True)
class FamilySettings:
    budget: int = 300_000
    """Generated tokens per run (spo_vs_grpo's 150 SPO steps: ~0.3M)."""
    eval_points: int = 9
    """Evaluations after the first step each curve should have (plus the one before it)."""
    eval_prompts: int = 400
    """Held-out prompts per evaluation; with n = 1 the standard error is ~0.025 near 50% accuracy."""
    max_steps: int = 100_000
    """total_steps of every run: large, so the token budget is what stops it."""


QUICK = FamilySettings(budget=0, eval_points=2, eval_prompts=64)
"""--quick: three steps' worth of each algorithm's expected tokens, 64 evaluation prompts."""


def _merge(base: dict, overrides: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def family_config(recipe: Recipe, settings: FamilySettings, budget: int, bench: BenchSettings,
                  sft: Path, train_file: Path, val: Path, run_dir: Path, seed: int,
                  extra: list[str]) -> tuple[dict, int]:
    """(trainer config, evaluation interval K) of one algorithm's run."""
    eval_every = max(1, round(budget / (recipe.tokens_per_step * settings.eval_points)))
    config = run_config(recipe.base, bench, sft, train_file, val, run_dir, settings.max_steps, seed)
    config = _merge(config, recipe.overrides)
    config["max_generated_tokens"] = budget
    config["checkpoint"] = {"every_steps": 0, "keep_last": 1}  # no resume needed: one save at the end
    config["eval"]["every_steps"] = eval_every
    for item in extra:  # --set ALGO:dotted.key=value
        key, _, value = item.partition("=")
        node = config
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = yaml.safe_load(value)
        if key == "eval.every_steps":
            eval_every = int(node[leaf])
    return config, eval_every


def _metrics_rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in open(run_dir / "metrics.jsonl") if line.strip()]


def health(run_dir: Path) -> dict:
    """Divergence signs and algorithm-specific signals from a run's metrics.jsonl."""
    rows = [r for r in _metrics_rows(run_dir) if "rollout/total_generated_tokens" in r]
    nonfinite = sum(1 for r in rows for v in r.values() if isinstance(v, float) and not math.isfinite(v))
    out = {
        "nonfinite_values": nonfinite,
        "grad_norm_max": max(r.get("actor/grad_norm", 0.0) for r in rows),
        "sequences_per_step": statistics.mean(r["rollout/train_sequences"] for r in rows),
        "reference_tokens": rows[-1].get("rollout/reference_tokens", 0.0),
        "empty_mini_batches": sum(r.get("actor/empty_mini_batches", 0.0) for r in rows),
    }
    for key in ("actor/approx_kl", "actor/clip_fraction", "actor/kl_ref", "soft/q_terminal", "soft/log_ratio_sum",
                "replay/replayed_edges", "replay/buffered_edges", "replay/dropped_edges"):
        values = [r[key] for r in rows if key in r]
        if values:
            out[key] = {"first10": statistics.mean(values[:10]), "last10": statistics.mean(values[-10:])}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sft", type=Path, help="SFT warm-start HF model dir (default: make one, 800 steps)")
    parser.add_argument("--data-dir", type=Path, help="dir with train.jsonl and val.jsonl (required with --sft)")
    parser.add_argument("--out", type=Path, default=Path("/tmp/bench_spo_family"), help="work dir")
    parser.add_argument("--png", type=Path, default=Path(__file__).with_name("spo_family.png"), help="plot path")
    parser.add_argument("--quick", action="store_true", help="~3 steps per algorithm, 64 eval prompts (smoke test)")
    parser.add_argument("--algorithms", default=",".join(ALGORITHMS), help="comma-separated subset [all six]")
    parser.add_argument("--budget", type=int, help="generated tokens per run [300000]")
    parser.add_argument("--set", action="append", default=[], metavar="ALGO:KEY=VALUE",
                        help="override one trainer key of one algorithm, e.g. soft_spo:optimizer.lr=1e-4")
    parser.add_argument("--reuse", action="store_true",
                        help="read a run already finished in --out with the same config instead of training it again")
    parser.add_argument("--seed", type=int, default=0, help="seed of every run: data order, sampling [0]")
    args = parser.parse_args()
    if (args.sft is None) != (args.data_dir is None):
        parser.error("--sft and --data-dir go together")
    algorithms = [a.strip() for a in args.algorithms.split(",") if a.strip()]
    unknown = sorted(set(algorithms) - set(ALGORITHMS))
    if unknown or not algorithms:
        parser.error(f"--algorithms: unknown {unknown}; choose from {', '.join(ALGORITHMS)}")
    overrides: dict[str, list[str]] = {a: [] for a in algorithms}
    for item in args.set:
        name, _, assignment = item.partition(":")
        if name not in ALGORITHMS or "=" not in assignment:
            parser.error(f"--set {item!r}: expected ALGO:dotted.key=value with ALGO one of {', '.join(ALGORITHMS)}")
        if name in overrides:
            overrides[name].append(assignment)
    settings = QUICK if args.quick else FamilySettings()
    if args.budget:
        settings = dataclasses.replace(settings, budget=args.budget)
    bench = BenchSettings(sft_steps=60) if args.quick else BenchSettings()

    started = time.perf_counter()
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", "TOKENIZERS_PARALLELISM": "false"}
    loads = [_load_average()]
    sft, data_dir = warm_start(args, bench, out, env)
    val_records = [json.loads(line) for line in open(data_dir / "val.jsonl") if line.strip()][: settings.eval_prompts]
    val = out / "val_eval.jsonl"
    atomic.write_text(val, "".join(json.dumps(r) + "\n" for r in val_records))

    runs, wall, checks, intervals, configs = {}, {}, {}, {}, {}
    for name in algorithms:
        recipe = RECIPES[name]
        budget = settings.budget or round(3 * recipe.tokens_per_step)
        run_dir = out / name
        config, intervals[name] = family_config(recipe, settings, budget, bench, sft, data_dir / "train.jsonl",
                                                val, run_dir, args.seed, overrides[name])
        configs[name] = config
        record = run_dir / "bench_run.json"
        if args.reuse and record.is_file() and json.loads(record.read_text())["config"] == config:
            done = json.loads(record.read_text())
            wall[name] = done["wall_seconds"]
            loads.extend(done["load_averages"])
            print(f"{name}: reusing the finished run in {run_dir}", flush=True)
        else:
            if run_dir.exists():  # a fresh run: the trainer would resume an old checkpoint
                shutil.rmtree(run_dir)
            print(f"{name}: budget {budget:,} tokens, eval every {intervals[name]} steps (load {_load_average()})",
                  flush=True)
            before = _load_average()
            wall[name] = train(config, out / f"{name}.yaml", bench, env, out / f"{name}.log", "never")
            loads.append(_load_average())
            atomic.write_json(record, {"config": config, "wall_seconds": wall[name],
                                       "load_averages": [before, loads[-1]]})
        runs[name] = read_run(run_dir)
        checks[name] = health(run_dir)
        curve = runs[name]["curve"]
        print(f"  {wall[name]:.0f}s, {runs[name]['steps']} steps, {runs[name]['tokens']:,} tokens, accuracy "
              f"{curve[0][1]:.3f} -> {curve[-1][1]:.3f} (best {max(a for _, a, _ in curve):.3f}), "
              f"non-finite metrics {checks[name]['nonfinite_values']}", flush=True)

    common = min(runs[a]["tokens"] for a in algorithms)
    grid = [round(common * k / 6) for k in range(7)]
    summary = {
        "settings": dataclasses.asdict(settings),
        "bench_settings": dataclasses.asdict(bench),
        "recipes": {a: dataclasses.asdict(RECIPES[a]) for a in algorithms},
        "configs": configs,
        "sft": str(sft),
        "seed": args.seed,
        "eval_every": intervals,
        "runs": runs,
        "health": checks,
        "wall_seconds": wall,
        "accuracy_on_grid": {a: {t: accuracy_at(runs[a]["curve"], t) for t in grid} for a in algorithms},
        "load_averages": loads,
        "bench_wall_seconds": time.perf_counter() - started,
    }
    atomic.write_json(out / "summary.json", summary)
    plot(runs, args.png, f"demo task, same SFT start, {settings.budget or 'quick'} generated tokens per run, "
         f"seed {args.seed}", labels={a: RECIPES[a].label for a in algorithms})

    short = {"spo": "SPO", "grpo": "GRPO", "spo_chain": "SPO-chain", "spo_tree": "SPO-tree",
             "spo_tree_replay": "SPO-tree replay", "soft_spo": "Soft SPO"}
    print("\nAccuracy at each evaluation (tokens in thousands):\n")
    print("| eval | " + " | ".join(short[a] for a in algorithms) + " |")
    print("| --- |" + " --- |" * len(algorithms))
    for i in range(max(len(runs[a]["curve"]) for a in algorithms)):
        cells = []
        for a in algorithms:
            curve = runs[a]["curve"]
            cells.append(f"{curve[i][1]:.3f} @ {curve[i][0] / 1e3:.0f}k (s{curve[i][2]})" if i < len(curve) else "-")
        print(f"| {i} | " + " | ".join(cells) + " |")
    print(f"\nAccuracy interpolated at common budgets (up to the smallest run's {common:,} tokens):\n")
    print("| tokens | " + " | ".join(short[a] for a in algorithms) + " |")
    print("| --- |" + " --- |" * len(algorithms))
    for t in grid:
        print(f"| {t / 1e3:.0f}k | " + " | ".join(f"{accuracy_at(runs[a]['curve'], t):.3f}" for a in algorithms) + " |")
    print("\n| algorithm | steps (K) | tokens | tokens/step | sequences/step | final acc. | best acc. (at) | "
          "reward first 10 -> last 10 steps | wall s | s/step |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for a in algorithms:
        r, h = runs[a], checks[a]
        best = max(r["curve"], key=lambda p: p[1])
        print(f"| {short[a]} | {r['steps']} ({intervals[a]}) | {r['tokens']:,} | {r['tokens'] / r['steps']:,.0f} | "
              f"{h['sequences_per_step']:.0f} | {r['curve'][-1][1]:.3f} | {best[1]:.3f} ({best[0] / 1e3:.0f}k) | "
              f"{r['reward_first']:.3f} -> {r['reward_last']:.3f} | {wall[a]:.0f} | {r['step_s']:.2f} |")
    for a in algorithms:
        h = checks[a]
        extra = {k: v for k, v in h.items() if isinstance(v, dict)}
        print(f"{a}: non-finite metric values {h['nonfinite_values']}, max grad norm {h['grad_norm_max']:.2f}, "
              f"reference tokens {h['reference_tokens']:,.0f}, empty mini-batches {h['empty_mini_batches']:.0f}; "
              + "; ".join(f"{k} {v['first10']:.4g} -> {v['last10']:.4g}" for k, v in extra.items()))
    print(f"load averages along the runs: {loads}; runs' wall seconds {sum(wall.values()):.0f} in all, "
          f"this invocation {summary['bench_wall_seconds']:.0f}s")


if __name__ == "__main__":
    main()
