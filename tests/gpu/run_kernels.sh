#!/usr/bin/env bash
# Both fused kernel sets (v1, v2) in one call (~8 minutes on one H200):
#   1. NVRTC-compile every variant of both sets (cached under EEP_FUSED_CACHE_DIR, default
#      build/fused-cache: `python tests/gpu/compile_kernels.py --cache-dir build/fused-cache` fills it
#      on any machine with the same NVRTC);
#   2. correctness of kernel set v2 with 4 rank processes sharing the GPU (differential against
#      eep.reference: diff bf16 and FP8, prefill; then late, late_prefill, graph + rejoin, SIGKILL), and
#      of v1 briefly (diff, prefill);
#   3. timings at one rank (--gpus N: at N ranks, one per GPU), v1 and v2 side by side in the same run
#      (aware, fixed, empty, A/A; decode also v2 with programmatic dependent launch, "v2-pdl"):
#      perf/bench_dispatch.py (deepseek-v3 bf16 and FP8, qwen3-30b-a3b bf16) and perf/bench_prefill.py
#      (deepseek-v3, qwen3-30b-a3b; v1's push/spread/pull/pull-copy combines, v2, NCCL, device copy).
# Every step logs to OUT/log.txt and the run goes on after a failure; tables in OUT/tables.md, JSON in
# OUT/bench/, per-rank results in OUT/res.tgz, a kernel trace of the deepseek-v3 FP8 run in OUT/prof.tgz.
#   bash tests/gpu/run_kernels.sh [--out DIR] [--bench-only | --decode] [--gpus N]
#   --bench-only: compile, a short correctness check of v2 (diff bf16, diff FP8 with 16 blocks, prefill,
#                 late, graph + rejoin with PDL; 4 ranks sharing the GPU), then the timings (plus a grid-size
#                 sweep of v2), ~5 minutes
#   --decode: for a change to the decode kernels alone: every decode scenario of v2 (diff bf16 and FP8,
#             late, graph + rejoin, SIGKILL, fixed membership, FP8 with 16 blocks; prefill's diff once)
#             and the three decode timings; no prefill timings, no v1 scenarios, ~4 minutes
#   --gpus N: use GPUs 0..N-1 (the scenarios' 4 ranks spread over them, the timings at N ranks); the
#             multi-GPU comparison of the two sets is `--gpus 4` (and `--gpus 2`) on an NVLink machine
set -u
OUT_DIR=/tmp/eep-gpu-out
MODE=all
GPUS=1
while [ $# -gt 0 ]; do
  case "$1" in
    --out) OUT_DIR=$2; shift 2 ;;
    --bench-only) MODE=bench; shift ;;
    --decode) MODE=decode; shift ;;
    --gpus) GPUS=$2; shift 2 ;;
    -h|--help) sed -n '2,/^set -u/{/^#/p;}' "$0"; exit 0 ;;
    *) echo "run_kernels.sh: unknown option $1 (use --out DIR, --bench-only, --decode, --gpus N)"; exit 2 ;;
  esac
done
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 EEP_FUSED_CACHE_DIR=${EEP_FUSED_CACHE_DIR:-$PWD/build/fused-cache}
# rank r of a scenario runs on GPU r mod GPUS (one GPU: 4 processes share it)
export CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES:-$(seq -s, 0 $((GPUS - 1)))}
mkdir -p "$OUT_DIR"
LOG=$OUT_DIR/log.txt
PY=${PYTHON:-python3}
START=$(date +%s); BUDGET=${EEP_GPU_BUDGET_S:-480}
source tests/gpu/steps.sh
L=tests/gpu/launch.py
B="perf/bench_dispatch.py --num-ranks $GPUS --out $OUT_DIR/bench"
P="perf/bench_prefill.py --num-ranks $GPUS --out $OUT_DIR/bench"
nvidia-smi -L 2>&1 | tee -a "$LOG"
$PY -c "import torch, cuda.bindings; print('torch', torch.__version__, 'cuda-bindings', cuda.bindings.__version__)" 2>&1 | tee -a "$LOG"
git log --oneline -1 2>/dev/null | tee -a "$LOG"

# 1. every variant both sets need here (NVRTC only; a cache built elsewhere with the same NVRTC is reused)
ARCH=$($PY -c "from eep.fused.compile import device_arch; print(device_arch(0))" 2>>"$LOG" || echo sm_90a)
step compile 120 $PY tests/gpu/compile_kernels.py --arch "$ARCH"

one() {  # one scenario with 4 rank processes sharing the GPU: NAME SECONDS SCENARIO ARGS...
  local name=$1 secs=$2 scenario=$3; shift 3
  step "$name" "$secs" $PY $L --scenario "$scenario" --num-ranks 4 --out $OUT_DIR/res "$@"
}
V2="--kernels v2"
fp8_b16() {  # 16 blocks: several tokens per block (the default grid gives each block at most one decode token)
  step v2-diff-fp8-b16 80 env EEP_FUSED_BLOCKS=16 $PY $L --scenario diff --num-ranks 4 --out $OUT_DIR/res --hidden 7168 \
    --slots 4 --max-tokens 64 --fp8 $V2
}
one v2-diff 100 diff --hidden 2048 --slots 8 --max-tokens 128 $V2
if [ "$MODE" != bench ]; then
  one v2-diff-fp8 100 diff --hidden 7168 --slots 4 --max-tokens 64 --fp8 $V2
else  # the timed kernels, briefly: several tokens per block, prefill, a late rank (every wait's deadline path)
  fp8_b16
fi
one v2-prefill 100 prefill --hidden 2048 --slots 8 --max-tokens 256 $V2
[ "$MODE" = bench ] && one v2-late 80 late --hidden 2048 --slots 8 --max-tokens 64 --timeout-s 0.5 $V2
# v2 launched with programmatic dependent launch (FusedBuffer(pdl=True)): captured into a CUDA graph,
# replayed, masked, rejoined
step v2-graph-pdl 100 env EEP_FUSED_PDL=1 $PY $L --scenario graph --num-ranks 4 --out $OUT_DIR/res --hidden 2048 \
  --slots 8 --max-tokens 64 $V2

# 3. timings: v1 and v2 in the same rounds
step bench-ds-bf16 90 $PY $B --model deepseek-v3 --kernels v1,v2,v2-pdl
step bench-ds-fp8 90 $PY $B --model deepseek-v3 --fp8 --kernels v1,v2,v2-pdl --profile $OUT_DIR/prof
step bench-qw-bf16 90 $PY $B --model qwen3-30b-a3b --kernels v1,v2,v2-pdl
if [ "$MODE" != decode ]; then
  step bench-prefill-ds 120 $PY $P --model deepseek-v3 --combine-variant spread,pull,pull-copy
  step bench-prefill-qw 90 $PY $P --model qwen3-30b-a3b --combine-variant spread,pull,pull-copy
fi

if [ "$MODE" != bench ]; then
  one v2-late 80 late --hidden 2048 --slots 8 --max-tokens 64 --timeout-s 0.5 $V2
  [ "$MODE" = all ] && one v2-late-prefill 80 late_prefill --hidden 2048 --slots 8 --max-tokens 256 --timeout-s 0.5 $V2
  one v2-graph 100 graph --hidden 2048 --slots 8 --max-tokens 64 $V2
  one v2-kill 100 kill --hidden 2048 --slots 8 --max-tokens 64 --timeout-s 0.5 $V2
  [ "$MODE" = all ] && one v2-prefill-ds 100 prefill --hidden 7168 --slots 4 --max-tokens 128 $V2
  one v2-diff-fixed 80 diff --hidden 2048 --slots 8 --max-tokens 128 --fixed $V2
  fp8_b16
fi
if [ "$MODE" = all ]; then
  one v1-diff 80 diff --hidden 2048 --slots 8 --max-tokens 128
  one v1-prefill 80 prefill --hidden 2048 --slots 8 --max-tokens 256
fi
if [ "$MODE" = bench ]; then  # v2's grid size (EEP_FUSED_BLOCKS; default one block per SM)
  for blocks in 66; do  # 264 by hand (EEP_FUSED_BLOCKS=264): left out to keep this run near 5 minutes
    step bench-ds-fp8-v2-b$blocks 60 env EEP_FUSED_BLOCKS=$blocks $PY $B --model deepseek-v3 --fp8 --kernels v2 --rounds 5
    step bench-qw-bf16-v2-b$blocks 60 env EEP_FUSED_BLOCKS=$blocks $PY $B --model qwen3-30b-a3b --kernels v2 --rounds 5
    step bench-prefill-ds-v2-b$blocks 60 env EEP_FUSED_BLOCKS=$blocks $PY $P --model deepseek-v3 --kernels v2 --rounds 3
  done
  step bench-ds-bf16-v2-b32 60 env EEP_FUSED_BLOCKS=32 $PY $B --model deepseek-v3 --kernels v2 --rounds 5
fi

[ -d $OUT_DIR/prof ] && tar czf $OUT_DIR/prof.tgz -C $OUT_DIR prof && rm -rf $OUT_DIR/prof
[ -d $OUT_DIR/res ] && tar czf $OUT_DIR/res.tgz -C $OUT_DIR res && rm -rf $OUT_DIR/res
grep -E "^(\| |[a-z0-9-]+, .*us|prefill .*us|v2_over_v1|NOT TIMED)" "$LOG" > $OUT_DIR/tables.md
echo "=== SUMMARY ($(( $(date +%s) - START )) s)"
grep -E "^(=== .* rc=|SCENARIO|compiled)" "$LOG"
cat $OUT_DIR/tables.md
