#!/usr/bin/env bash
# maj@32 / pass@k / avg@32 on AIME 24 and 25, as the paper reports, for any HF model directory
# (the base model, or a run's export RUN_DIR/hf).
#   bash examples/qwen3_8b_dapo/eval.sh runs/qwen3_8b_dapo/spo_single_turn/hf
set -euo pipefail
cd "$(dirname "$0")/../.."
PYTHON=${PYTHON:-python}
MODEL=${1:?usage: eval.sh HF_MODEL_DIR}
GPUS=${GPUS:-8}

for set in aime24 aime25; do
    "$PYTHON" -m torch.distributed.run --standalone --nproc_per_node "$GPUS" \
        -m megatron_spo eval --model "$MODEL" --data "data/aime/$set.parquet" -n 32 --engine vllm \
        --out "$MODEL/eval_$set.json" engine.dtype=bfloat16 reward.thinking=true max_response_tokens=16384
done
