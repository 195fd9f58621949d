"""The GPU dry run of the examples: seconds per rank role and the per-GPU memory plan, beside the
settings verl publishes for the same model class on the same hardware (what it colocates, what it
offloads). Run from the repository root:

    .venv/bin/python bench/dry_run.py [--quick]

Each dry run is `megatron-spo train --config C --dry-run ... dry_run.report_file=F`; the ratio
printed per role is its simulated step against the build of its model shard in the same process
(the baseline), so the cost of executing the step on the meta device reads independently of the
machine. Results go in bench/RESULTS.md by hand.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
GIB = 2**30

RUNS = {
    "qwen3_8b_dapo SPO (1 x 8, TP 2, DP 4)": ("examples/qwen3_8b_dapo/spo.yaml", ["dry_run.nodes=1", "dry_run.gpus_per_node=8"]),
    "multinode SPO, Qwen3-32B (2 x 8, TP 4, PP 2, DP 2)": ("examples/multinode/spo.yaml", ["dry_run.nodes=2"]),
}

# verl's published Megatron + vLLM settings for dense 7B/8B models on one 8-GPU node (facts from
# volcengine/verl: examples/grpo_trainer/run_qwen2-7b_seq_balance_math_megatron.sh and
# run_qwen3_vl-8b-megatron.sh, verl/trainer/config/_generated_ppo_megatron_trainer.yaml,
# verl/workers/megatron_workers.py rollout_mode; no Qwen3-8B Megatron script is published, and
# verl's SPO recipe runs on FSDP)
VERL = [
    ("placement", "actor and vLLM colocated on every GPU (hybrid_engine: true)", "colocated, every rank (same)"),
    ("actor parallelism", "TP 2 x PP 2 (7B); sequence_parallel true by default",
     "TP 2 x PP 1, sequence parallel on (parallel.sequence_parallel, default on at TP > 1)"),
    ("offload during rollout", "param / grad / optimizer offload=True in the 7B seq-balance and VL-8B scripts",
     "params, grads, optimizer state (+ the reference, the bridge's gather buffers): rollout.offload_actor"),
    ("engine memory", "gpu_memory_utilization 0.6 (7B), 0.7 (VL-8B); vLLM sleep level 2 + wake_up(weights) then "
     "wake_up(kv_cache) around the sync", "0.5; sleep level 2, wake_up(weights) then wake_up(kv_cache) (same order)"),
    ("activation recompute", "full / uniform / 1 layer where long sequences are trained (VL-8B, LoRA)",
     "full / uniform / 1 layer (parallel.recompute: full)"),
    ("token budget per GPU", "ppo_max_token_len_per_gpu 12000 (7B), 4096 (VL-8B); prompt 1024 + response 1024-2048",
     "18,432 (prompt 2,048 + response 16,384)"),
]


def dry_run(config: str, overrides: list[str], report: Path) -> tuple[dict, float]:
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "megatron_spo", "train", "--config", config, "--dry-run", *overrides,
         f"dry_run.report_file={report}"], cwd=REPO, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"{config}: dry run failed\n{proc.stderr[-3000:]}")
    return json.loads(report.read_text()), time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="only the Qwen3-8B recipe")
    args = parser.parse_args()
    runs = dict(list(RUNS.items())[:1]) if args.quick else RUNS
    with tempfile.TemporaryDirectory() as tmp:
        for name, (config, overrides) in runs.items():
            report, wall = dry_run(config, overrides, Path(tmp) / "report.json")
            print(f"\n## {name}: {wall:.0f} s wall")
            print("| rank | role | build s | step s | step / build | params | grads | optimizer | activations "
                  "| loss buffers | phase weight sync | phase rollout | phase training |")
            print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
            for role in report["roles"]:
                plan = report["plan"][str(role["rank"])]
                items, phases = plan["items"], plan["phases"]
                pick = lambda prefix: next(v for k, v in items.items() if k.startswith(prefix)) / GIB  # noqa: E731
                s = role["seconds"]
                print(f"| {role['rank']} | {role['role']} | {s['build']:.1f} | {s['step']:.1f} | "
                      f"{s['step'] / max(s['build'], 1e-9):.2f}x | {pick('parameters'):.1f} | {pick('gradients'):.1f} | "
                      f"{pick('optimizer'):.1f} | {pick('activations'):.1f} | {pick('loss buffers'):.1f} | "
                      f"{phases['weight sync'] / GIB:.1f} | {phases['rollout'] / GIB:.1f} | {phases['training'] / GIB:.1f} |")
            print(f"verdict: {report['over_budget'] or 'fits'}")
    print("\n## beside verl's published Megatron + vLLM settings (7B/8B class, one 8-GPU node)")
    print("| | verl | megatron-spo qwen3_8b_dapo |")
    print("|---|---|---|")
    for what, verl, ours in VERL:
        print(f"| {what} | {verl} | {ours} |")


if __name__ == "__main__":
    main()
