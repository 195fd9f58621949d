#!/usr/bin/env bash
# SPO's preprocessing: the offline value prior from 8 samples per prompt with the base model
# (the authors' split -> estimate -> merge pipeline). Writes data/dapo_math/offline_values.json,
# keyed by the raw prompt (the answer-format instruction the rollout appends is stripped again).
#   bash examples/qwen3_8b_dapo/offline_values.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
PYTHON=${PYTHON:-python}
MODEL=${MODEL:-models/Qwen3-8B}
DATA=${DATA:-data/dapo_math/dapo_math_17k.parquet}
OUT=${OUT:-runs/qwen3_8b_dapo/offline}
SUBSETS=${SUBSETS:-5}
GPUS=${GPUS:-8}

"$PYTHON" -m megatron_spo data split --dataset "$DATA" --output-dir "$OUT/splits" --num-subsets "$SUBSETS"
for ((i = 0; i < SUBSETS; i++)); do
    # -n, not --n: torchrun would take --n as its own --nnodes abbreviation
    "$PYTHON" -m torch.distributed.run --standalone --nproc_per_node "$GPUS" \
        -m megatron_spo values estimate --data "$OUT/splits/subset_$i.parquet" --model "$MODEL" \
        -n 8 --engine vllm --output-dir "$OUT/subset_$i" engine.dtype=bfloat16 reward.thinking=true
done
"$PYTHON" -m megatron_spo values merge --input-dir "$OUT" --pattern 'subset_*/validation_data/0.jsonl' \
    --strip-suffix 'The answer format must be: \boxed{...}' --output-file data/dapo_math/offline_values.json
