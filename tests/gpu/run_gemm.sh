#!/usr/bin/env bash
# Expert-stage GPU work in one script: build (or reuse a build in build/gemm-cache), differential
# checks, benchmark. Logs and JSON under --out (default /tmp/eep-gemm-out).
#   bash tests/gpu/run_gemm.sh [quick|bench|swiglu] [--out DIR]
#   EEP_GEMM_BENCH_ARGS adds arguments to perf/bench_expert_gemm.py (e.g. "--fused-swiglu --configs X").
#   swiglu: only the opt-in SwiGLU-epilogue GEMM1 (build DEFAULT_CONFIGS + SWIGLU_CONFIGS, its checks,
#   and perf/bench_swiglu_epilogue.py fused vs unfused) -- nothing else.
# build/cutlass (CUTLASS headers, when the nvidia-cutlass package is absent) and build/gemm-cache (the
# library, `eep build-gemm --cache-dir build/gemm-cache`, which needs nvcc but no GPU) are used when present.
set -u
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
[ -d build/cutlass ] && export EEP_CUTLASS_DIR=$PWD/build/cutlass
export EEP_GEMM_CACHE_DIR=$PWD/build/gemm-cache
source tests/gpu/out_option.sh /tmp/eep-gemm-out "$@"; set -- ${ARGS[@]+"${ARGS[@]}"}
LOG=$OUT_DIR/gemm_log.txt
PY=python3
START=$(date +%s); BUDGET=${EEP_GPU_BUDGET_S:-420}
STEP_MIN_LEFT=15
source tests/gpu/steps.sh
nvidia-smi -L | tee -a "$LOG"
$PY -c "import torch, transformers; print(torch.__version__, torch.cuda.get_device_name(), transformers.__version__)" 2>&1 | tee -a "$LOG"
if [ "${1:-}" = swiglu ]; then
  step build_swiglu 300 $PY -c "
import time; t = time.time()
from eep.fused.gemm.build import build_library, DEFAULT_CONFIGS, SWIGLU_CONFIGS
print(build_library(DEFAULT_CONFIGS + SWIGLU_CONFIGS), f'{time.time() - t:.1f} s')"
  step check_swiglu 150 $PY tests/gpu/gemm_check.py --swiglu
  step bench_swiglu 200 $PY perf/bench_swiglu_epilogue.py --out $OUT_DIR/swiglu_bench.jsonl
  echo "=== SUMMARY"
  grep -E "^(=== .* rc=|CHECK .*FAIL|SUMMARY|GPU|  *(qwen3|deepseek|shape))" "$LOG" | tail -60
  grep -c "^CHECK .* ok" "$LOG" | sed 's/^/checks ok: /'
  exit 0
fi
step build 240 $PY -c "
import time; t = time.time()
from eep.fused.gemm.build import build_library
print(build_library(), f'{time.time() - t:.1f} s')"
[ "${1:-}" != bench ] && step check 150 $PY tests/gpu/gemm_check.py
if [ "${1:-}" != quick ]; then
  step bench 300 $PY perf/bench_expert_gemm.py --out $OUT_DIR/gemm_bench.jsonl --reps 20 ${EEP_GEMM_BENCH_ARGS:-}
fi
echo "=== SUMMARY"
grep -E "^(=== .* rc=|CHECK .*(FAIL|ok)|SUMMARY|GPU|qwen3|deepseek|  \()" "$LOG" | grep -v "^CHECK .* ok" | grep -v -E " (gemm[12]|gather|swiglu) +cutlass" | tail -80
grep -c "^CHECK .* ok" "$LOG" | sed 's/^/checks ok: /'
