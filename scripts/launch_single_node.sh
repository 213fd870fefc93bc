#!/usr/bin/env bash
# BERT pretraining with VR-LAMB on one node: both phases of one of the paper's recipes.
#
#   DATA=/data/corpus OUT=outputs/bert_large scripts/launch_single_node.sh
#   NUM_GPUS=4 RECIPE=128k64k DTYPE=fp16 DATA=... OUT=... scripts/launch_single_node.sh --seed 1
#
# Environment (defaults in brackets):
#   DATA      a directory with train/ and eval/ .txt files, or any .txt files (required)
#   OUT       output directory: checkpoints, metrics.csv, metrics.png, final_model/ [outputs/bert_<MODEL>_<RECIPE>]
#   NUM_GPUS  GPUs on this node [8]
#   MODEL     tiny | base | large [large]
#   RECIPE    64k32k | 96k32k | 128k64k: configs/bert_large_vrlamb_<RECIPE>_phase{1,2}_* [64k32k]
#   DTYPE     bf16 | fp16 [bf16]
#   CACHE_DIR tokenizer and tokenized-data cache [~/.cache/vrgd_ds]
# Extra arguments go to pretrain_bert.py. The configs are written for 64 GPUs; --adapt-accumulation
# keeps their batch size by raising gradient_accumulation_steps for NUM_GPUS. Re-running the same
# command after a preemption continues from the last checkpoint (--resume).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

: "${DATA:?set DATA to a directory of .txt files (e.g. DATA=data/shakespeare after scripts/prepare_corpus.py)}"
NUM_GPUS="${NUM_GPUS:-8}"
MODEL="${MODEL:-large}"
RECIPE="${RECIPE:-64k32k}"
DTYPE="${DTYPE:-bf16}"
OUT="${OUT:-outputs/bert_${MODEL}_${RECIPE}}"
CACHE_DIR="${CACHE_DIR:-$HOME/.cache/vrgd_ds}"

phase1=(configs/bert_large_vrlamb_"${RECIPE}"_phase1_seq*_"${DTYPE}"_*gpu.json)
phase2=(configs/bert_large_vrlamb_"${RECIPE}"_phase2_seq*_"${DTYPE}"_*gpu.json)
if [ ! -f "${phase1[0]}" ] || [ ! -f "${phase2[0]}" ]; then
  echo "no configs for RECIPE=$RECIPE DTYPE=$DTYPE in configs/ (recipes: 64k32k 96k32k 128k64k; dtypes: bf16 fp16)" >&2
  exit 2
fi

exec deepspeed --num_gpus "$NUM_GPUS" pretrain_bert.py \
  --model "$MODEL" --data "$DATA" --output-dir "$OUT" --cache-dir "$CACHE_DIR" \
  --phase1-config "${phase1[0]}" --phase2-config "${phase2[0]}" \
  --adapt-accumulation --resume "$@"
