#!/usr/bin/env bash
# One node's share of a multi-node run. Start it on every node with the same MASTER_ADDR and
# MASTER_PORT and that node's NODE_RANK (0 .. NNODES-1); under SLURM, sbatch.slurm does this.
#   NNODES=4 NODE_RANK=0 MASTER_ADDR=node001 bash examples/multinode/run.sh [dotted.key=value ...]
set -euo pipefail
cd "$(dirname "$0")/../.."
PYTHON=${PYTHON:-python}
: "${NNODES:?set NNODES (number of nodes)}"
: "${NODE_RANK:?set NODE_RANK (0 .. NNODES-1)}"
: "${MASTER_ADDR:?set MASTER_ADDR (host name of node 0)}"
MASTER_PORT=${MASTER_PORT:-29500}
GPUS_PER_NODE=${GPUS_PER_NODE:-8}
CONFIG=${CONFIG:-examples/multinode/spo.yaml}

"$PYTHON" -m torch.distributed.run \
    --nnodes "$NNODES" --node_rank "$NODE_RANK" --nproc_per_node "$GPUS_PER_NODE" \
    --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT" \
    -m megatron_spo train --config "$CONFIG" "$@"
