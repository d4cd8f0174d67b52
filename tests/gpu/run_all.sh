#!/usr/bin/env bash
# Everything the fused data plane needs a GPU for, in one script: compile, differential tests
# (2 and 4 GPUs), CUDA-graph mask/rejoin, SIGKILL, benchmarks. Logs under --out (default /tmp/eep-gpu-out).
#   bash tests/gpu/run_all.sh [quick|bench|combine|decode|onegpu|late] [--out DIR]
#   quick: correctness only; bench: benchmarks only;
#   combine: the experimental prefill combine paths (spread, pull): differential tests, then timings
#   decode: the experimental decode path (FusedBuffer(decode="pull")): differential tests, graph,
#   SIGKILL, then timings beside the default kernels (docs/fused.md "Decode: where the time goes")
#   onegpu: correctness of the default and experimental kernels with 4 rank processes sharing
#   GPU 0 (for a one-GPU machine: waits progress by time-slicing between the processes; no timings);
#   `onegpu v2`: the same for kernel set v2 (diff, FP8, prefill, graph + rejoin, SIGKILL, late);
#   tests/gpu/run_kernels.sh runs these and times v1 against v2
#   late: only the three `late` scenarios (decode push, prefill push, decode pull); any GPU count
# (a full run takes more than 10 minutes: run quick, then bench)
set -u
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
if [ "${1:-}" = sglang ]; then shift; exec bash tests/gpu/run_sglang.sh "$@"; fi  # SGLang on one GPU
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 EEP_FUSED_CACHE_DIR=/tmp/eep-cache
source tests/gpu/out_option.sh /tmp/eep-gpu-out "$@"; set -- ${ARGS[@]+"${ARGS[@]}"}
LOG=$OUT_DIR/log.txt
PY=python3
START=$(date +%s); BUDGET=${EEP_GPU_BUDGET_S:-550}
STEP_STOP_ON_FAIL=diff4
source tests/gpu/steps.sh
# compile_step NAME SECONDS "KWARGS, ...": NVRTC-compile (and cache) KernelVariant(hidden, fixed, **kw)
# for hidden 2048 and 7168, elastic and fixed, each kw dict given (a Python expression list)
compile_step() {
  step "$1" "$2" $PY -c "
from eep.fused.compile import KernelVariant, cached_cubin, device_arch
arch = device_arch(0); print('arch', arch)
for h in (2048, 7168):
    for f in (False, True):
        for kw in [$3]:
            cached_cubin(KernelVariant(h, f, **kw), arch)
print('compiled', '$1')"
}
# the three late-rank scenarios (decode push, prefill push, decode pull), for the late and onegpu modes
late_steps() {
  step late4 90 $PY $L --scenario late --num-ranks 4 --out $OUT_DIR/res --hidden 2048 --slots 8 --max-tokens 64 --timeout-s 0.5
  step late4-prefill 90 $PY $L --scenario late_prefill --num-ranks 4 --out $OUT_DIR/res --hidden 2048 --slots 8 --max-tokens 256 --timeout-s 0.5
  step late4-pull 90 $PY $L --scenario late --num-ranks 4 --out $OUT_DIR/res --hidden 2048 --slots 8 --max-tokens 64 --timeout-s 0.5 --decode-variant pull
}
COMBINE_VARIANTS="dict(prefill_combine='spread'), dict(prefill_combine='pull')"
DECODE_VARIANTS="dict(decode='pull'), dict(decode='pull', use_fp8=True)"
nvidia-smi -L | tee -a "$LOG"
$PY -c "import torch, cuda.bindings, cuda.core; print(torch.__version__, cuda.bindings.__version__, cuda.core.__version__)" 2>&1 | tee -a "$LOG"
compile_step compile 60 "{}"
L=tests/gpu/launch.py
MODE=${1:-all}
if [ "$MODE" = all ] || [ "$MODE" = quick ]; then
step diff4 90 $PY $L --scenario diff --num-ranks 4 --out $OUT_DIR/res --hidden 2048 --slots 8 --max-tokens 128
step diff4-fp8 90 $PY $L --scenario diff --num-ranks 4 --out $OUT_DIR/res --hidden 7168 --slots 4 --max-tokens 64 --fp8
step diff2-fp8 90 env CUDA_VISIBLE_DEVICES=0,1 $PY $L --scenario diff --num-ranks 2 --out $OUT_DIR/res --hidden 2048 --slots 8 --max-tokens 128 --fp8
step prefill4 150 $PY $L --scenario prefill --num-ranks 4 --out $OUT_DIR/res --hidden 2048 --slots 8 --max-tokens 256
step prefill4-ds 150 $PY $L --scenario prefill --num-ranks 4 --out $OUT_DIR/res --hidden 7168 --slots 4 --max-tokens 128
step prefill2 120 env CUDA_VISIBLE_DEVICES=0,1 $PY $L --scenario prefill --num-ranks 2 --out $OUT_DIR/res --hidden 2048 --slots 8 --max-tokens 256
step diff2-fp8-h7168 60 env CUDA_VISIBLE_DEVICES=0,1 $PY $L --scenario diff --num-ranks 2 --out $OUT_DIR/res --hidden 7168 --slots 8 --max-tokens 64 --fp8
if $PY -c "import pytest" 2>/dev/null; then
  # the GPU-marked pytest tests that no step above already runs (tests/test_fused_gpu.py wraps the
  # same launch.py scenarios); the CUTLASS check skips unless build/cutlass is carried
  step pytest-gpu 150 $PY -m pytest -q -rfs --tb=short -m gpu tests/test_fused_gemm_gpu.py tests/test_weights_roundtrip.py -p no:cacheprovider
else echo "=== pytest-gpu rc=SKIPPED (no pytest on this machine)" | tee -a "$LOG"; fi
step graph4 120 $PY $L --scenario graph --num-ranks 4 --out $OUT_DIR/res --hidden 2048 --slots 8 --max-tokens 64
step late4 60 $PY $L --scenario late --num-ranks 4 --out $OUT_DIR/res --hidden 2048 --slots 8 --max-tokens 64 --timeout-s 0.5
step late4-prefill 60 $PY $L --scenario late_prefill --num-ranks 4 --out $OUT_DIR/res --hidden 2048 --slots 8 --max-tokens 256 --timeout-s 0.5
step kill4 120 $PY $L --scenario kill --num-ranks 4 --out $OUT_DIR/res --hidden 2048 --slots 8 --max-tokens 64 --timeout-s 0.5
fi
if [ "$MODE" = late ]; then
  late_steps
fi
if [ "$MODE" = onegpu ] && [ "${2:-v1}" = v2 ]; then
  export CUDA_VISIBLE_DEVICES=0
  compile_step compile-v2 120 "dict(kernels='v2'), dict(kernels='v2', use_fp8=True)"
  V="--kernels v2"
  step diff4-v2 120 $PY $L --scenario diff --num-ranks 4 --out $OUT_DIR/res --hidden 2048 --slots 8 --max-tokens 128 $V
  step diff4-fp8-v2 120 $PY $L --scenario diff --num-ranks 4 --out $OUT_DIR/res --hidden 7168 --slots 4 --max-tokens 64 --fp8 $V
  step prefill4-v2 150 $PY $L --scenario prefill --num-ranks 4 --out $OUT_DIR/res --hidden 2048 --slots 8 --max-tokens 256 $V
  step graph4-v2 120 $PY $L --scenario graph --num-ranks 4 --out $OUT_DIR/res --hidden 2048 --slots 8 --max-tokens 64 $V
  step kill4-v2 120 $PY $L --scenario kill --num-ranks 4 --out $OUT_DIR/res --hidden 2048 --slots 8 --max-tokens 64 --timeout-s 0.5 $V
  step late4-v2 90 $PY $L --scenario late --num-ranks 4 --out $OUT_DIR/res --hidden 2048 --slots 8 --max-tokens 64 --timeout-s 0.5 $V
  step late4-prefill-v2 90 $PY $L --scenario late_prefill --num-ranks 4 --out $OUT_DIR/res --hidden 2048 --slots 8 --max-tokens 256 --timeout-s 0.5 $V
elif [ "$MODE" = onegpu ]; then
  export CUDA_VISIBLE_DEVICES=0
  compile_step compile-variants 120 "$COMBINE_VARIANTS, $DECODE_VARIANTS"
  D="--decode-variant pull"
  step diff4 120 $PY $L --scenario diff --num-ranks 4 --out $OUT_DIR/res --hidden 2048 --slots 8 --max-tokens 128
  late_steps
  step diff4-pull 120 $PY $L --scenario diff --num-ranks 4 --out $OUT_DIR/res --hidden 2048 --slots 8 --max-tokens 128 $D
  step prefill4-pull 150 $PY $L --scenario prefill --num-ranks 4 --out $OUT_DIR/res --hidden 2048 --slots 8 --max-tokens 256 --combine-variant pull
  step prefill4-spread 150 $PY $L --scenario prefill --num-ranks 4 --out $OUT_DIR/res --hidden 2048 --slots 8 --max-tokens 256 --combine-variant spread
  step diff4-pull-fp8 120 $PY $L --scenario diff --num-ranks 4 --out $OUT_DIR/res --hidden 7168 --slots 4 --max-tokens 64 --fp8 $D
  step prefill4 150 $PY $L --scenario prefill --num-ranks 4 --out $OUT_DIR/res --hidden 2048 --slots 8 --max-tokens 256
  step graph4-pull 120 $PY $L --scenario graph --num-ranks 4 --out $OUT_DIR/res --hidden 2048 --slots 8 --max-tokens 64 $D
  step kill4-pull 120 $PY $L --scenario kill --num-ranks 4 --out $OUT_DIR/res --hidden 2048 --slots 8 --max-tokens 64 --timeout-s 0.5 $D
  step diff4-fp8 120 $PY $L --scenario diff --num-ranks 4 --out $OUT_DIR/res --hidden 7168 --slots 4 --max-tokens 64 --fp8
fi
if [ "$MODE" = all ] || [ "$MODE" = bench ]; then
  B=perf/bench_dispatch.py
  step bench-ds-4 120 $PY $B --num-ranks 4 --model deepseek-v3 --out $OUT_DIR/bench --profile $OUT_DIR/prof --rounds 11
  step bench-qw-4 90 $PY $B --num-ranks 4 --model qwen3-30b-a3b --out $OUT_DIR/bench --rounds 11
  step bench-ds-4-fp8 90 $PY $B --num-ranks 4 --model deepseek-v3 --out $OUT_DIR/bench --rounds 11 --fp8
  step bench-qw-4-fp8 90 $PY $B --num-ranks 4 --model qwen3-30b-a3b --out $OUT_DIR/bench --rounds 11 --fp8
  step bench-ds-4-symm 120 $PY $B --num-ranks 4 --model deepseek-v3 --out $OUT_DIR/bench --rounds 7 --with-symm-mem
  P=perf/bench_prefill.py
  step bench-prefill-ds-4 120 $PY $P --num-ranks 4 --model deepseek-v3 --out $OUT_DIR/bench
  step bench-prefill-qw-4 90 $PY $P --num-ranks 4 --model qwen3-30b-a3b --out $OUT_DIR/bench
  step bench-prefill-ds-4-symm 120 $PY $P --num-ranks 4 --model deepseek-v3 --out $OUT_DIR/bench --with-symm-mem
  step bench-ds-2 90 env CUDA_VISIBLE_DEVICES=0,1 $PY $B --num-ranks 2 --model deepseek-v3 --out $OUT_DIR/bench
  step bench-qw-2 90 env CUDA_VISIBLE_DEVICES=0,1 $PY $B --num-ranks 2 --model qwen3-30b-a3b --out $OUT_DIR/bench
fi
if [ "$MODE" = combine ]; then  # docs/fused.md "Prefill combine: where the time goes"
  compile_step compile-combine 90 "$COMBINE_VARIANTS"
  step prefill4-pull 150 $PY $L --scenario prefill --num-ranks 4 --out $OUT_DIR/res --hidden 2048 --slots 8 --max-tokens 256 --combine-variant pull
  step prefill4-ds-pull 150 $PY $L --scenario prefill --num-ranks 4 --out $OUT_DIR/res --hidden 7168 --slots 4 --max-tokens 128 --combine-variant pull
  step prefill4-spread 150 $PY $L --scenario prefill --num-ranks 4 --out $OUT_DIR/res --hidden 2048 --slots 8 --max-tokens 256 --combine-variant spread
  step prefill4-pull-fixed 150 $PY $L --scenario prefill --num-ranks 4 --out $OUT_DIR/res --hidden 2048 --slots 8 --max-tokens 256 --combine-variant pull --fixed
  step prefill2-pull 120 env CUDA_VISIBLE_DEVICES=0,1 $PY $L --scenario prefill --num-ranks 2 --out $OUT_DIR/res --hidden 2048 --slots 8 --max-tokens 256 --combine-variant pull
  P=perf/bench_prefill.py
  step bench-prefill-ds-4-combine 150 $PY $P --num-ranks 4 --model deepseek-v3 --out $OUT_DIR/bench --combine-variant spread,pull,pull-copy
  step bench-prefill-qw-4-combine 120 $PY $P --num-ranks 4 --model qwen3-30b-a3b --out $OUT_DIR/bench --combine-variant spread,pull,pull-copy
fi
if [ "$MODE" = decode ]; then  # docs/fused.md "Decode: where the time goes"
  STEP_STOP_ON_FAIL=diff4-pull
  compile_step compile-decode 90 "$DECODE_VARIANTS"
  D="--decode-variant pull"
  step diff4-pull 90 $PY $L --scenario diff --num-ranks 4 --out $OUT_DIR/res --hidden 2048 --slots 8 --max-tokens 128 $D
  step diff4-pull-h7168 90 $PY $L --scenario diff --num-ranks 4 --out $OUT_DIR/res --hidden 7168 --slots 4 --max-tokens 64 $D
  step diff4-pull-fp8 90 $PY $L --scenario diff --num-ranks 4 --out $OUT_DIR/res --hidden 7168 --slots 4 --max-tokens 64 --fp8 $D
  step diff4-pull-fixed 90 $PY $L --scenario diff --num-ranks 4 --out $OUT_DIR/res --hidden 2048 --slots 8 --max-tokens 128 --fixed $D
  step diff2-pull-fp8 90 env CUDA_VISIBLE_DEVICES=0,1 $PY $L --scenario diff --num-ranks 2 --out $OUT_DIR/res --hidden 2048 --slots 8 --max-tokens 128 --fp8 $D
  step graph4-pull 120 $PY $L --scenario graph --num-ranks 4 --out $OUT_DIR/res --hidden 2048 --slots 8 --max-tokens 64 $D
  step kill4-pull 120 $PY $L --scenario kill --num-ranks 4 --out $OUT_DIR/res --hidden 2048 --slots 8 --max-tokens 64 --timeout-s 0.5 $D
  step late4-pull 60 $PY $L --scenario late --num-ranks 4 --out $OUT_DIR/res --hidden 2048 --slots 8 --max-tokens 64 --timeout-s 0.5 $D
  B=perf/bench_dispatch.py
  step bench-ds-4-pull 150 $PY $B --num-ranks 4 --model deepseek-v3 --out $OUT_DIR/bench --rounds 11 $D --profile $OUT_DIR/prof
  step bench-ds-4-pull-fp8 120 $PY $B --num-ranks 4 --model deepseek-v3 --out $OUT_DIR/bench --rounds 11 --fp8 $D
  step bench-qw-4-pull 120 $PY $B --num-ranks 4 --model qwen3-30b-a3b --out $OUT_DIR/bench --rounds 11 $D
  step bench-ds-2-pull 90 env CUDA_VISIBLE_DEVICES=0,1 $PY $B --num-ranks 2 --model deepseek-v3 --out $OUT_DIR/bench $D
  # the one-copy-per-destination-rank protocol with expert-side partial sums (prefill mode) at decode size
  step bench-prefill-ds-4-t128 120 $PY perf/bench_prefill.py --num-ranks 4 --model deepseek-v3 --tokens 128 --iters 50 --rounds 11 --out $OUT_DIR/bench
  step bench-prefill-ds-4-t128-pull 120 $PY perf/bench_prefill.py --num-ranks 4 --model deepseek-v3 --tokens 128 --iters 50 --rounds 11 --combine-variant push,pull --out $OUT_DIR/bench
  [ -d $OUT_DIR/prof ] && tar czf $OUT_DIR/prof.tgz -C $OUT_DIR prof && rm -rf $OUT_DIR/prof
fi
if [ "$MODE" = all ] || [ "$MODE" = quick ]; then
step diff2 90 env CUDA_VISIBLE_DEVICES=0,1 $PY $L --scenario diff --num-ranks 2 --out $OUT_DIR/res --hidden 2048 --slots 8 --max-tokens 128
step diff4-fixed 90 $PY $L --scenario diff --num-ranks 4 --out $OUT_DIR/res --hidden 2048 --slots 8 --max-tokens 128 --fixed
step diff4-h7168 90 $PY $L --scenario diff --num-ranks 4 --out $OUT_DIR/res --hidden 7168 --slots 4 --max-tokens 64
fi
if [ "$MODE" = all ] || [ "$MODE" = bench ]; then
  [ -d $OUT_DIR/prof ] && tar czf $OUT_DIR/prof.tgz -C $OUT_DIR prof && rm -rf $OUT_DIR/prof
fi
tar czf $OUT_DIR/res.tgz -C $OUT_DIR res 2>/dev/null && rm -rf $OUT_DIR/res
echo "=== SUMMARY" 
grep -E "^(=== .* rc=|SCENARIO|RESULT|arch|compiled)" "$LOG"
