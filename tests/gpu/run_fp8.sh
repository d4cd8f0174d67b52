#!/usr/bin/env bash
# FP8 expert stage on one GPU, in one go (under 8 minutes on one H200):
#   1. build    the CUTLASS FP8 and bf16 stage libraries (found in build/gemm-cache when it was built
#               beforehand with the same headers and nvcc; otherwise nvcc builds them here, minutes)
#   2. fp8      tests/gpu/fp8_check.py: the FP8 stage against the FP8 reference (fresh random inputs,
#               every kernel x grouping x empty / hot / at-capacity / all-empty counts, 1x128 and
#               per-row scales, poisoned outputs, bad counts, CUDA-graph replay, MoELayer through
#               fail/join and captured), and the FP8-vs-bf16 accuracy figure
#   3. bf16     tests/gpu/gemm_check.py: the bf16 stage, which shares the FP8 stage's scan and launch code
#   4. bench    perf/bench_fp8_experts.py: FP8 vs bf16 CUTLASS vs torch._scaled_grouped_mm, both models,
#               decode and prefill, eager and CUDA graph, with the run's copy and matmul ceilings
# Each step logs to OUT/fp8_log.txt and the next runs whatever happened; a PASS/FAIL table ends the run.
#
#   bash tests/gpu/run_fp8.sh [--out DIR] [--skip-bf16] [--bench-args "..."]     (default DIR /tmp/eep-fp8-out)
set -u
OUT_DIR=/tmp/eep-fp8-out
SKIP_BF16=0
BENCH_ARGS=""
while [ $# -gt 0 ]; do
  case "$1" in
    --out) OUT_DIR=$2; shift 2 ;;
    --skip-bf16) SKIP_BF16=1; shift ;;
    --bench-args) BENCH_ARGS=$2; shift 2 ;;
    *) echo "unknown option $1 (expected --out DIR, --skip-bf16, --bench-args ARGS)"; exit 2 ;;
  esac
done
mkdir -p "$OUT_DIR"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
[ -d build/cutlass/include ] && export EEP_CUTLASS_DIR=$PWD/build/cutlass
export EEP_GEMM_CACHE_DIR=${EEP_GEMM_CACHE_DIR:-$PWD/build/gemm-cache}
LOG=$OUT_DIR/fp8_log.txt
: > "$LOG"
PY=python3
START=$(date +%s); BUDGET=${EEP_GPU_BUDGET_S:-460}
STEP_MIN_LEFT=15
source tests/gpu/steps.sh
declare -A RC
nvidia-smi -L 2>&1 | tee -a "$LOG"
$PY -c "import torch, transformers; print('torch', torch.__version__, torch.cuda.get_device_name(), 'transformers', transformers.__version__)" 2>&1 | tee -a "$LOG"

step build 300 $PY -c "
import time; t = time.time()
from eep.fused.gemm.build import build_library, DEFAULT_CONFIGS, FP8_CONFIGS
print('fp8 library', build_library(FP8_CONFIGS), f'{time.time() - t:.1f} s', flush=True)
print('bf16 library', build_library(DEFAULT_CONFIGS), f'{time.time() - t:.1f} s', flush=True)"
RC[build]=$?
step fp8 170 $PY tests/gpu/fp8_check.py
RC[fp8]=$?
if [ "$SKIP_BF16" = 0 ]; then
  step bf16 110 $PY tests/gpu/gemm_check.py
  RC[bf16]=$?
fi
step bench 260 $PY perf/bench_fp8_experts.py --out "$OUT_DIR/fp8_bench.jsonl" $BENCH_ARGS
RC[bench]=$?

{
  echo "=== RESULT (log: $LOG, benchmark rows: $OUT_DIR/fp8_bench.jsonl)"
  printf "%-8s %-6s %s\n" step result detail
  for name in build fp8 bf16 bench; do
    [ -z "${RC[$name]+x}" ] && continue
    rc=${RC[$name]}
    if grep -q "^=== $name rc=SKIPPED" "$LOG"; then verdict=SKIP; elif [ "$rc" = 0 ]; then verdict=PASS; else verdict=FAIL; fi
    section=$(awk -v s="=== $name (" 'index($0, s) == 1 {on = 1; next} /^=== / {on = 0} on' "$LOG")
    case $name in
      fp8|bf16) detail=$(grep -E "^SUMMARY" <<<"$section" | tail -1) ;;
      bench) detail="$(grep -c "ERROR" <<<"$section") stage errors" ;;
      *) detail="" ;;
    esac
    # a step that died before its summary: its last line (the exception) says why
    [ "$verdict" = FAIL ] && [ -z "$detail" -o "$name" = bench ] && detail="$detail | $(tail -1 <<<"$section")"
    printf "%-8s %-6s %s\n" "$name" "$verdict" "${detail:-rc=$rc}"
  done
  echo "--- failed checks"
  grep -E "^CHECK .* FAIL" "$LOG" | head -40
  echo "--- accuracy"
  grep -E "^ACCURACY" "$LOG"
  echo "--- benchmark (us, TFLOP/s, weight GB/s; speedups)"
  grep -E "^GPU .*copy|^  ceiling" "$LOG"
  awk '/^SUMMARY$/ {on = 1; next} on' "$LOG" | head -30
  echo "total $(( $(date +%s) - START )) s"
} | tee "$OUT_DIR/fp8_result.txt"
