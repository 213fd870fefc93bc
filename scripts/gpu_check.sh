#!/usr/bin/env bash
# GPU readiness check: on a CUDA machine, runs what of the test suite can run there and the
# overhead benchmark at BERT-large size, and prints VR-LAMB's cost relative to plain LAMB.
#
#   bash scripts/gpu_check.sh                       # from anywhere; results in runs/gpu_check/
#
# Steps (each with its own time limit; the script goes on after a failed step and exits non-zero
# at the end if any failed):
#   1. environment: GPUs, torch/CUDA/deepspeed/transformers versions; stops here without CUDA.
#   2. bench: scripts/bench_overhead.py --device cuda --size large: BertForMaskedLM at BERT-large
#      size (24 layers, hidden 1024, 335M parameters), seq 128, micro-batch 32, bf16, gradient
#      accumulation 16, on GPU_CHECK_BENCH_WORLD GPUs (default 1: k = 16 samples per step);
#      VRLamb (per_step, per_micro_step) vs LAMB (vr: false) vs AdamW — at ZeRO-2 also DeepSpeed's
#      FusedLamb and torch's fused AdamW (--anchors); then ZeRO-3
#      (GPU_CHECK_ZERO3=0 skips it), then BF16_Optimizer (bf16 + ZeRO-1 + fp32 accumulation;
#      GPU_CHECK_BF16_OPTIMIZER=0 skips it), then, with >= 2 GPUs only, tensor parallelism: the
#      encoder's linear layers split over 2 GPUs (--tensor-parallel 2 --world-size 2: TP2 x DP1),
#      ZeRO-2 (GPU_CHECK_TENSOR_PARALLEL=0 skips it).
#   3. GPU tests: tests/test_cuda.py -- each VR optimizer on the GPU vs the CPU (plain PyTorch), and
#      the DeepSpeed update matrix (every ZeRO stage 0-2 x fp32/bf16/fp16 x clipping x optimizer,
#      and the special cases) against the float64 reference through the CUDA accelerator: with
#      NCCL on 2 GPUs when there are >= 2, else on 1 GPU with all 8 micro-batches accumulated there.
#   4. the rest of the suite, which is CPU/gloo by design (multi-rank tests spawn CPU processes):
#      run with the GPUs hidden (CUDA_VISIBLE_DEVICES= DS_ACCELERATOR=cpu), in parallel with
#      pytest-xdist when it is installed. GPU_CHECK_CPU_SUITE=0 skips it.
#
# Environment (defaults in brackets):
#   PYTHON                    the interpreter with a CUDA torch [python3]
#   GPU_CHECK_OUT             where logs, JSON and markdown go [runs/gpu_check]
#   GPU_CHECK_WHEELS          a folder of wheels (deepspeed and what it lacks) to install first with
#                             pip --no-index into a private --target folder: machines without
#                             internet [none: use what is installed]
#   GPU_CHECK_BENCH_WORLD     GPUs for the benchmark [1]
#   GPU_CHECK_BENCH_ARGS      extra arguments for bench_overhead.py (e.g. "--rounds 3 --micro-batch 64") []
#   GPU_CHECK_BENCH_TIMEOUT   seconds, each of the two runs [900]
#   GPU_CHECK_ZERO3           1 | 0: the ZeRO-3 benchmark too [1]
#   GPU_CHECK_BF16_OPTIMIZER  1 | 0: the BF16_Optimizer benchmark too [1]
#   GPU_CHECK_TENSOR_PARALLEL 1 | 0: the tensor-parallel benchmark too, where there are >= 2 GPUs [1]
#   GPU_CHECK_TP_PRECISIONS   its --precisions, e.g. fp32 [the size's: bf16 at large]
#   GPU_CHECK_GPU_TESTS_TIMEOUT   seconds [900]
#   GPU_CHECK_CPU_SUITE       1 | 0 [1]
#   GPU_CHECK_CPU_SUITE_TIMEOUT   seconds [1800]
#   GPU_CHECK_TOTAL_TIMEOUT   seconds for the whole script: each step gets at most what is left [none]
#   GPU_CHECK_CPU_WORKERS     pytest-xdist workers for step 4 [min(8, CPU cores / 2)]
#   GPU_CHECK_CPU_TESTS       what step 4 runs [tests]
#   GPU_CHECK_BENCH_SIZE      bench_overhead.py --size [large]
#   GPU_CHECK_DEVICE          cuda | cpu [cuda]; cpu: a dry run of this script on a machine without
#                             a GPU (the bench on CPU ranks; e.g. with GPU_CHECK_BENCH_SIZE=quick)
# The checkout's vrgd_ds is used in place (PYTHONPATH), so nothing needs to be pip-installed.
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

PY="${PYTHON:-python3}"
OUT_DIR="${GPU_CHECK_OUT:-runs/gpu_check}"
mkdir -p "$OUT_DIR"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false

START=$SECONDS
# limit STEP_DEFAULT: the step's own limit, capped by what GPU_CHECK_TOTAL_TIMEOUT leaves (>= 1).
limit() {
    local own=$1
    if [ -n "${GPU_CHECK_TOTAL_TIMEOUT:-}" ]; then
        local left=$(( GPU_CHECK_TOTAL_TIMEOUT - (SECONDS - START) ))
        [ "$left" -lt "$own" ] && own=$left
        [ "$own" -lt 1 ] && own=1
    fi
    echo "$own"
}

declare -A STATUS
ORDER=()
record() { STATUS[$1]=$2; ORDER+=("$1"); echo "== $1: $2"; }

if [ -n "${GPU_CHECK_WHEELS:-}" ]; then
    SITE="${GPU_CHECK_SITE:-/tmp/gpu_check_site}"
    echo "== installing $(ls "$GPU_CHECK_WHEELS"/*.whl | wc -l) wheels from $GPU_CHECK_WHEELS into $SITE"
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
        "$GPU_CHECK_WHEELS"/*.whl || { echo "wheel install failed" >&2; exit 2; }
    export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"

# ---- 1. environment ---------------------------------------------------------------------------
echo "== 1. environment"
nvidia-smi -L 2>/dev/null || echo "(no nvidia-smi)"
"$PY" - <<'EOF' 2>&1 | tee "$OUT_DIR/environment.txt"
import importlib, platform, sys
import torch
print(f"python {platform.python_version()}, torch {torch.__version__}, CUDA {torch.version.cuda}, "
      f"{torch.cuda.device_count()} GPU(s): {[torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]}")
for name in ("deepspeed", "transformers", "pydantic", "datasets", "accelerate", "pytest", "xdist"):
    try:
        print(f"{name} {getattr(importlib.import_module(name), '__version__', '?')}")
    except Exception as exc:  # noqa: BLE001
        print(f"{name}: not importable ({type(exc).__name__}: {exc})")
import vrgd_ds
print(f"vrgd_ds from {vrgd_ds.__file__}")
sys.exit(0 if torch.cuda.is_available() or __import__("os").environ.get("GPU_CHECK_DEVICE") == "cpu" else 3)
EOF
env_status=${PIPESTATUS[0]}
if [ "$env_status" -ne 0 ]; then
    echo "no CUDA device (or vrgd_ds/deepspeed not importable): nothing to check here" >&2
    exit 3
fi
GPUS=$("$PY" -c 'import torch; print(torch.cuda.device_count())')
CORES=$(nproc 2>/dev/null || echo 2)

# ---- 2. BERT-large overhead, ZeRO-2, ZeRO-3, BF16_Optimizer, tensor parallelism ----------------
DEVICE="${GPU_CHECK_DEVICE:-cuda}"
SIZE="${GPU_CHECK_BENCH_SIZE:-large}"
# bench NAME STAGE [ARGS...]: one bench_overhead.py run; its JSON/markdown/log under $OUT_DIR/NAME.*
bench() {
    local name=$1 stage=$2 t s
    shift 2
    echo "== 2. bench_overhead.py --device $DEVICE --size $SIZE --zero-stage $stage $* ${GPU_CHECK_BENCH_ARGS:-} (large: bf16, gas 16)"
    t=$(limit "${GPU_CHECK_BENCH_TIMEOUT:-900}")
    # shellcheck disable=SC2086
    timeout "$t" "$PY" scripts/bench_overhead.py --device "$DEVICE" --size "$SIZE" --zero-stage "$stage" \
        --world-size "${GPU_CHECK_BENCH_WORLD:-1}" --timeout "$t" \
        --json "$OUT_DIR/$name.json" --report "$OUT_DIR/$name.md" "$@" ${GPU_CHECK_BENCH_ARGS:-} \
        >"$OUT_DIR/$name.log" 2>&1
    s=$?
    grep -E '^\[ *[0-9]+ s\]' "$OUT_DIR/$name.log" | tail -n 40
    if [ "$s" -ne 0 ]; then
        tail -n 30 "$OUT_DIR/$name.log"
        record "$name" "FAILED (exit $s; $OUT_DIR/$name.log)"
        return
    fi
    "$PY" - "$OUT_DIR/$name.json" <<'EOF' | tee "$OUT_DIR/${name}_ratios.txt"
import json, sys
data = json.load(open(sys.argv[1]))
rows, c = data["summary"]["rows"], data["config"]
print(f"BertForMaskedLM hidden {c['hidden']} x {c['layers']} layers, ZeRO-{c.get('stage', 2)}, "
      f"TP{c.get('tensor_parallel', 1)}, {c['precisions']} "
      f"gas {c['accumulations']} micro-batch {c['micro_batch']} x {c['world']} rank(s); {data['meta']['machine']}")
print(f"{'variant':24s} {'full step s':>11s} {'opt step s':>10s} {'full/LAMB':>9s} {'opt/LAMB':>8s} "
      f"{'peak GiB':>8s} {'held GiB':>8s} {'VR buf GiB':>10s}")
for r in rows:
    name = r["variant"] + (" *" if r["auto"] else "")
    print(f"{name:24s} {r['total']:11.3f} {r['opt']:10.3f} {r['total_ratio']:9.3f} {r['opt_ratio']:8.3f} "
          f"{r['peak'] / 2**30:8.2f} {r['held'] / 2**30:8.2f} {r['vr_buffer_total'] / 2**30:10.2f}")
EOF
    record "$name" ok
}
# ZeRO-2 with the anchors: VR-LAMB's full step against DeepSpeed's FusedLamb and torch's fused AdamW
# too (targets: <= 1.03x LAMB, <= 1.05x FusedLamb at BERT-large bf16 gas 16).
bench bench_large 2 $([ "$DEVICE" = cuda ] && echo --anchors)
if [ "${GPU_CHECK_ZERO3:-1}" = 1 ]; then
    bench bench_large_zero3 3
else
    record bench_large_zero3 "skipped (GPU_CHECK_ZERO3=0)"
fi
if [ "${GPU_CHECK_BF16_OPTIMIZER:-1}" = 1 ]; then
    bench bench_large_bf16_optimizer 2 --bf16-optimizer  # bf16 + ZeRO-1 + fp32 accumulation
else
    record bench_large_bf16_optimizer "skipped (GPU_CHECK_BF16_OPTIMIZER=0)"
fi
if [ "${GPU_CHECK_TENSOR_PARALLEL:-1}" != 1 ]; then
    record bench_large_tp2 "skipped (GPU_CHECK_TENSOR_PARALLEL=0)"
elif [ "$DEVICE" != cuda ] || [ "$GPUS" -lt 2 ]; then
    record bench_large_tp2 "skipped (needs NCCL and >= 2 GPUs; $GPUS here)"
else  # TP2 x DP1: one tensor-parallel pair of GPUs
    bench bench_large_tp2 2 --tensor-parallel 2 --world-size 2 \
        ${GPU_CHECK_TP_PRECISIONS:+--precisions "$GPU_CHECK_TP_PRECISIONS"}
fi

# ---- 3. GPU tests -----------------------------------------------------------------------------
echo "== 3. tests/test_cuda.py on $([ "$GPUS" -ge 2 ] && echo "2 GPUs (NCCL)" || echo "1 GPU")"
timeout "$(limit "${GPU_CHECK_GPU_TESTS_TIMEOUT:-900}")" "$PY" -m pytest -q -p no:cacheprovider -o timeout=0 \
    tests/test_cuda.py --junitxml "$OUT_DIR/gpu_tests.xml" >"$OUT_DIR/gpu_tests.log" 2>&1
s=$?
grep -E '(passed|failed|error|skipped)' "$OUT_DIR/gpu_tests.log" | tail -n 1
grep -E '^(FAILED|ERROR)' "$OUT_DIR/gpu_tests.log" | head -n 40
if [ "$s" -eq 0 ]; then record gpu_tests ok; else tail -n 40 "$OUT_DIR/gpu_tests.log"; record gpu_tests "FAILED (exit $s; $OUT_DIR/gpu_tests.log)"; fi

# ---- 4. the CPU/gloo suite, GPUs hidden -------------------------------------------------------
if [ "${GPU_CHECK_CPU_SUITE:-1}" = 1 ]; then
    workers=()
    if "$PY" -c 'import xdist' 2>/dev/null; then
        n="${GPU_CHECK_CPU_WORKERS:-$(( CORES / 2 < 8 ? (CORES / 2 > 0 ? CORES / 2 : 1) : 8 ))}"
        workers=(-n "$n")
    fi
    echo "== 4. the CPU/gloo suite with the GPUs hidden (CUDA_VISIBLE_DEVICES= DS_ACCELERATOR=cpu) ${workers[*]}"
    t=$(limit "${GPU_CHECK_CPU_SUITE_TIMEOUT:-1800}")
    # -v: one line per finished test, so a run cut off by its time limit still shows what passed.
    # shellcheck disable=SC2086
    CUDA_VISIBLE_DEVICES= DS_ACCELERATOR=cpu timeout "$t" \
        "$PY" -m pytest -v -p no:cacheprovider "${workers[@]}" ${GPU_CHECK_CPU_TESTS:-tests} --ignore tests/test_cuda.py \
        --junitxml "$OUT_DIR/cpu_suite.xml" >"$OUT_DIR/cpu_suite.log" 2>&1
    s=$?
    grep -E '(passed|failed|error)' "$OUT_DIR/cpu_suite.log" | tail -n 1
    echo "   per test: $(grep -cE ' PASSED' "$OUT_DIR/cpu_suite.log") passed, $(grep -cE ' FAILED' "$OUT_DIR/cpu_suite.log") failed, $(grep -cE ' SKIPPED' "$OUT_DIR/cpu_suite.log") skipped, $(grep -cE ' ERROR' "$OUT_DIR/cpu_suite.log") errors"
    grep -E '^(FAILED|ERROR)' "$OUT_DIR/cpu_suite.log" | head -n 40
    if [ "$s" -eq 0 ]; then record cpu_suite ok
    elif [ "$s" -eq 124 ]; then record cpu_suite "TIMED OUT after $t s ($OUT_DIR/cpu_suite.log)"
    else record cpu_suite "FAILED (exit $s; $OUT_DIR/cpu_suite.log)"; fi
else
    record cpu_suite "skipped (GPU_CHECK_CPU_SUITE=0)"
fi

echo "== summary (details in $OUT_DIR)"
failed=0
for step in "${ORDER[@]}"; do
    echo "  $step: ${STATUS[$step]}"
    case "${STATUS[$step]}" in ok|skipped*) ;; *) failed=1 ;; esac
done
cat "$OUT_DIR"/bench_large*_ratios.txt 2>/dev/null
exit "$failed"
