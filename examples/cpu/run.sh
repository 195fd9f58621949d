#!/usr/bin/env bash
# SPO on one CPU machine with 2 ranks, from nothing: tiny model + synthetic data -> SFT warm start
# -> SPO (torchrun, DP=2) -> held-out evaluation before and after.
#   bash examples/cpu/run.sh [extra dotted.key=value overrides for train]
set -euo pipefail
cd "$(dirname "$0")/../.."
PYTHON=${PYTHON:-.venv/bin/python}
ASSETS=runs/cpu_example/assets
NPROC=${NPROC:-2}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}   # one thread per rank on a 2-core box

if [ ! -f "$ASSETS/model/config.json" ]; then
    "$PYTHON" -c "from megatron_spo.demo.assets import build_demo_assets; build_demo_assets('$ASSETS')"
fi
if [ ! -f "$ASSETS/sft/config.json" ]; then
    # the demo's warm start: a tiny random model needs a large lr and a few hundred steps
    "$PYTHON" -m megatron_spo sft --model "$ASSETS/model" --data "$ASSETS/data/sft.jsonl" --out "$ASSETS/sft" \
        max_steps=400 optimizer.lr=3e-3
fi

"$PYTHON" -m torch.distributed.run --standalone --nproc_per_node "$NPROC" \
    -m megatron_spo train --config examples/cpu/spo.yaml "$@"

for model in "$ASSETS/sft" runs/cpu_example/spo/hf; do
    "$PYTHON" -m megatron_spo eval --model "$model" --data "$ASSETS/data/val.jsonl" -n 4 --out "$model/eval_val.json" \
        max_response_tokens=48 prompt.max_prompt_tokens=128
done
