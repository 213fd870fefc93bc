#!/usr/bin/env bash
# BERT pretraining with VR-LAMB on several nodes, with the DeepSpeed launcher and a hostfile.
#
#   HOSTFILE=hostfile DATA=/shared/corpus OUT=/shared/runs/bert_large scripts/launch_multi_node.sh
#
# Run it on the first node. The hostfile lists one node per line with its GPU count:
#     worker-1 slots=8
#     worker-2 slots=8
# The DeepSpeed launcher starts the ranks on every node over passwordless ssh (pdsh), so every
# node needs the same repository path and Python environment. DATA, OUT and CACHE_DIR must be on
# a filesystem all nodes share: global rank 0 tokenizes into CACHE_DIR and every rank reads it,
# and every rank writes its ZeRO partition of each checkpoint into OUT.
#
# Environment (defaults in brackets):
#   HOSTFILE  the hostfile [hostfile]
#   NUM_NODES how many of its nodes to use [all]
#   DATA, OUT, MODEL, RECIPE, DTYPE, CACHE_DIR: as in scripts/launch_single_node.sh
#   MASTER_PORT rendezvous port on the first node [29500]
# Without ssh between nodes, start one torchrun per node instead (same arguments to pretrain_bert.py):
#   torchrun --nnodes N --node_rank R --nproc_per_node 8 --master_addr FIRST_NODE --master_port 29500 \
#       pretrain_bert.py ...
# Extra arguments go to pretrain_bert.py. Re-running the command continues from the last checkpoint.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

HOSTFILE="${HOSTFILE:-hostfile}"
: "${DATA:?set DATA to a directory of .txt files on a shared filesystem}"
: "${OUT:?set OUT to an output directory on a shared filesystem}"
MODEL="${MODEL:-large}"
RECIPE="${RECIPE:-64k32k}"
DTYPE="${DTYPE:-bf16}"
CACHE_DIR="${CACHE_DIR:-$(dirname "$OUT")/.cache}"
MASTER_PORT="${MASTER_PORT:-29500}"
[ -f "$HOSTFILE" ] || { echo "no hostfile $HOSTFILE (lines like 'worker-1 slots=8'); set HOSTFILE" >&2; exit 2; }

phase1=(configs/bert_large_vrlamb_"${RECIPE}"_phase1_seq*_"${DTYPE}"_*gpu.json)
phase2=(configs/bert_large_vrlamb_"${RECIPE}"_phase2_seq*_"${DTYPE}"_*gpu.json)
if [ ! -f "${phase1[0]}" ] || [ ! -f "${phase2[0]}" ]; then
  echo "no configs for RECIPE=$RECIPE DTYPE=$DTYPE in configs/ (recipes: 64k32k 96k32k 128k64k; dtypes: bf16 fp16)" >&2
  exit 2
fi

nodes=()
[ -n "${NUM_NODES:-}" ] && nodes=(--num_nodes "$NUM_NODES")

exec deepspeed --hostfile "$HOSTFILE" "${nodes[@]+"${nodes[@]}"}" --master_port "$MASTER_PORT" pretrain_bert.py \
  --model "$MODEL" --data "$DATA" --output-dir "$OUT" --cache-dir "$CACHE_DIR" \
  --phase1-config "${phase1[0]}" --phase2-config "${phase2[0]}" \
  --adapt-accumulation --resume "$@"
