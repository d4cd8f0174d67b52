#!/usr/bin/env bash
# Where the time goes, in one call on one GPU (~4 minutes with build/fused-cache and build/gemm-cache):
#   1. dispatch   Nsight Compute on kernel set v2's decode dispatch at one rank (perf/profile_dispatch.py:
#                 bf16 empty, bf16 routed, FP8 empty, FP8 routed; deepseek-v3 shape): duration, launch
#                 statistics, warp stall reasons, and the SASS lines where warps stall most; the same
#                 launches timed with CUDA events without the profiler
#   2. stage      perf/profile_fp8_stage.py --gemm-sweep: every launch of the bf16 and FP8 expert stages
#                 at prefill (both models) timed on its own, the FP8 GEMMs on one dense group, each GEMM
#                 alone with every prefill kernel, and the whole call with the fastest kernel per GEMM
# Logs in OUT/profile_log.txt, the Nsight report and its text pages in OUT/.
#   bash tests/gpu/run_profile.sh [--out DIR] [--stage-only | --dispatch-only]
set -u
OUT_DIR=/tmp/eep-profile-out
STAGE_ONLY=0
DISPATCH_ONLY=0
while [ $# -gt 0 ]; do
  case "$1" in
    --out) OUT_DIR=$2; shift 2 ;;
    --stage-only) STAGE_ONLY=1; shift ;;
    --dispatch-only) DISPATCH_ONLY=1; shift ;;
    *) echo "run_profile.sh: unknown option $1 (use --out DIR, --stage-only, --dispatch-only)"; exit 2 ;;
  esac
done
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 EEP_FUSED_CACHE_DIR=${EEP_FUSED_CACHE_DIR:-$PWD/build/fused-cache}
[ -d build/cutlass/include ] && export EEP_CUTLASS_DIR=$PWD/build/cutlass
export EEP_GEMM_CACHE_DIR=${EEP_GEMM_CACHE_DIR:-$PWD/build/gemm-cache}
mkdir -p "$OUT_DIR"
LOG=$OUT_DIR/profile_log.txt
: > "$LOG"
PY=${PYTHON:-python3}
START=$(date +%s); BUDGET=${EEP_GPU_BUDGET_S:-420}
source tests/gpu/steps.sh
nvidia-smi -L 2>&1 | tee -a "$LOG"
git log --oneline -1 2>/dev/null | tee -a "$LOG"

[ "$STAGE_ONLY" = 0 ] && step dispatch-events 60 $PY perf/profile_dispatch.py --launches 20
NCU=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -1)
if [ "$STAGE_ONLY" = 1 ]; then
  echo "--stage-only: no dispatch profile" | tee -a "$LOG"
elif [ -n "$NCU" ]; then
  step dispatch-ncu 150 "$NCU" --clock-control none --cache-control none -k regex:eep2_dispatch \
    --section SpeedOfLight --section LaunchStats --section Occupancy --section WarpStateStats \
    --section SchedulerStats --section SourceCounters --section MemoryWorkloadAnalysis \
    -f -o "$OUT_DIR/dispatch" $PY perf/profile_dispatch.py --launches 2
  "$NCU" --import "$OUT_DIR/dispatch.ncu-rep" --page details > "$OUT_DIR/dispatch_details.txt" 2>&1
  # every launch's SASS with its stall samples (order: per group a warm-up and two launches; groups bf16
  # empty, bf16 routed, FP8 empty, FP8 routed)
  "$NCU" --import "$OUT_DIR/dispatch.ncu-rep" --page source --print-source sass --csv 2>&1 | gzip > "$OUT_DIR/dispatch_sass.csv.gz"
  grep -E "eep2_dispatch|Duration|Elapsed Cycles|Registers|Stall|Warp Cycles Per Issued|Issued Warp" \
    "$OUT_DIR/dispatch_details.txt" | head -150 | tee -a "$LOG"
else
  echo "no ncu on this machine" | tee -a "$LOG"
fi
[ "$DISPATCH_ONLY" = 0 ] && step stage 300 $PY perf/profile_fp8_stage.py --gemm-sweep
grep -E "^===|steps sum|^  " "$LOG" | grep -v "^=== .*(" | tail -90
