#!/usr/bin/env bash
# Qwen3-8B on DAPO-Math-17k, one 8-GPU node: SPO (default) or the GRPO baseline.
#   bash examples/qwen3_8b_dapo/run.sh                      # SPO, single-turn
#   AGENT=tool bash examples/qwen3_8b_dapo/run.sh           # SPO with the code-interpreter agent loop
#   ALGO=grpo bash examples/qwen3_8b_dapo/run.sh            # the GRPO baseline (96 x 8)
#   bash examples/qwen3_8b_dapo/run.sh total_steps=200      # any dotted.key=value override
# Run offline_values.sh first for SPO.
set -euo pipefail
cd "$(dirname "$0")/../.."
PYTHON=${PYTHON:-python}
ALGO=${ALGO:-spo}
AGENT=${AGENT:-single_turn}
GPUS=${GPUS:-8}

case "$ALGO" in
    spo | grpo) ;;
    *) echo "ALGO must be spo or grpo, got '$ALGO'" >&2; exit 2 ;;
esac
case "$AGENT" in
    single_turn | tool) ;;
    *) echo "AGENT must be single_turn or tool, got '$AGENT'" >&2; exit 2 ;;
esac

"$PYTHON" -m torch.distributed.run --standalone --nproc_per_node "$GPUS" \
    -m megatron_spo train --config "examples/qwen3_8b_dapo/$ALGO.yaml" \
    rollout.agent="$AGENT" run_dir="runs/qwen3_8b_dapo/${ALGO}_${AGENT}" "$@"
