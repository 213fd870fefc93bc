#!/usr/bin/env bash
# VR-LAMB under ZeRO-2 with the DeepSpeed launcher. On CPU: 2 ranks over gloo.
# On a GPU node: the same command; set NUM_GPUS to the GPU count (and train_batch_size in the config).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
# MASTER_PORT: the launcher's rendezvous port [29500]; set another to run two at once.
NUM_GPUS=${NUM_GPUS:-2}
MASTER_PORT=${MASTER_PORT:-29500}
exec deepspeed --num_gpus "$NUM_GPUS" --master_port "$MASTER_PORT" scripts/train_small_deepspeed.py \
    --deepspeed_config configs/small_vrlamb_zero2.json "$@"
