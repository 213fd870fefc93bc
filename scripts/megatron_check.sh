#!/usr/bin/env bash
# Megatron-DeepSpeed's pretrain_gpt.py with VR-LAMB (vrgd_ds) on CPU ranks: a tiny GPT (2 layers,
# hidden 64, seq 64), a few iterations per configuration (TP x DP, ZeRO 1/2/3, fp32/bf16, vr
# true/false), loss and vrgd_ds's noise/GSNR statistics per iteration as JSON lines.
#
#   MEGATRON_DEEPSPEED_DIR=/path/to/Megatron-DeepSpeed scripts/megatron_check.sh [NAME ...]
#
# MEGATRON_DEEPSPEED_DIR  a checkout of github.com/microsoft/Megatron-DeepSpeed (checked at f4157bea);
#                         it is copied to OUT/megatron and patched there, never modified
# OUT                     output folder [<repo>/outputs/megatron_check]: OUT/<NAME>/metrics.jsonl,
#                         ds_config.json, log.txt, run.json; OUT/summary.md
# ITERS                   iterations per run [20]
# MASTER_PORT             torchrun rendezvous port [29517]
# NAME ...                configurations to run [all]: `python scripts/megatron_check.py names`
#
# Needs pybind11, six and nltk besides vrgd_ds (pip install -e '.[megatron]'): Megatron compiles
# its dataset helpers with pybind11 on rank 0, imports six, and its tools/preprocess_data.py
# imports nltk. Ranks run under torchrun with OMP_NUM_THREADS=1, LOCAL_SIZE = ranks, DeepSpeed's
# CPU shm op kept out (vrgd_ds.cpu_comm.avoid_shm_allreduce) and a private TORCH_EXTENSIONS_DIR.
# All 12 configurations: about 3 minutes on 2 idle cores.
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
: "${MEGATRON_DEEPSPEED_DIR:?set MEGATRON_DEEPSPEED_DIR to a Megatron-DeepSpeed checkout}"
OUT="${OUT:-$REPO/outputs/megatron_check}"
OUT="$(mkdir -p "$OUT" && cd "$OUT" && pwd)"
ITERS=${ITERS:-20}
MASTER_PORT=${MASTER_PORT:-29517}
PY=${PYTHON:-python}
# Megatron's dataset Makefile runs `python3 -m pybind11`: let python3 be this Python.
PATH="$(dirname "$("$PY" -c 'import sys; print(sys.executable)')"):$PATH"
export TORCH_EXTENSIONS_DIR="$OUT/torch_extensions" DS_ACCELERATOR=cpu

"$PY" -c "import pybind11, six, nltk" 2>/dev/null || {
    echo "megatron_check: pybind11, six and nltk are needed (pip install -e '.[megatron]')" >&2; exit 2; }

# 1. A patched copy of the checkout (its .git left out). A patch already in the checkout is kept.
SRC="$OUT/megatron"
rm -rf "$SRC" && mkdir -p "$SRC" && git -C "$SRC" init -q  # its own repository, for git apply
tar -C "$MEGATRON_DEEPSPEED_DIR" --exclude=.git --exclude='*.so' --exclude=__pycache__ -cf - . | tar -C "$SRC" -xf -
for patch in "$REPO"/scripts/megatron_patches/*.patch; do
    if git -C "$SRC" apply --reverse --check "$patch" 2>/dev/null; then
        echo "patch $(basename "$patch"): already applied"
    else
        git -C "$SRC" apply "$patch"
        echo "patch $(basename "$patch"): applied"
    fi
done

# 2. A tiny indexed corpus, tokenized by Megatron's own tools/preprocess_data.py.
DATA="$OUT/data"
if [[ ! -f "$DATA/corpus_text_document.idx" ]]; then
    "$PY" "$REPO/scripts/megatron_check.py" prepare --out "$DATA"
    (cd "$SRC" && "$PY" tools/preprocess_data.py --input "$DATA/corpus.jsonl" --output-prefix "$DATA/corpus" \
        --tokenizer-type GPT2BPETokenizer --vocab-file "$DATA/vocab.json" --merge-file "$DATA/merges.txt" \
        --append-eod --workers 1 --log-interval 100000)
fi

# 3. The runs.
if [[ $# -eq 0 ]]; then
    read -r -a NAMES <<< "$("$PY" "$REPO/scripts/megatron_check.py" names)"
else
    NAMES=("$@")
fi
failed=0
for name in "${NAMES[@]}"; do
    "$PY" "$REPO/scripts/megatron_check.py" run "$name" --megatron "$SRC" --data "$DATA" --out "$OUT" \
        --iters "$ITERS" --port "$MASTER_PORT" || { failed=$((failed + 1)); tail -n 30 "$OUT/$name/log.txt" >&2; }
done
"$PY" "$REPO/scripts/megatron_check.py" summary "$OUT" | tee "$OUT/summary.md"
echo "megatron_check: ${#NAMES[@]} runs, $failed failed; results in $OUT"
[[ $failed -eq 0 ]]
