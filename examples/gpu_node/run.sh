#!/usr/bin/env bash
# SPO on one GPU node (8 GPUs by default):
#   bash examples/gpu_node/run.sh [dotted.key=value ...]
#   GPUS=4 bash examples/gpu_node/run.sh parallel.tp=1 batch.train_batch_size=128
set -euo pipefail
cd "$(dirname "$0")/../.."
PYTHON=${PYTHON:-python}
GPUS=${GPUS:-8}
CONFIG=${CONFIG:-examples/gpu_node/spo.yaml}

"$PYTHON" -m torch.distributed.run --standalone --nproc_per_node "$GPUS" \
    -m megatron_spo train --config "$CONFIG" "$@"
