#!/usr/bin/env bash
# Block-scaled FP8 experts through the runtime on one GPU, in one run (about 5 minutes on 1 x NVIDIA H200;
# docs/runtime.md "FP8 experts", docs/failure_bench.md "FP8 experts"):
#   bash tests/gpu/run_fp8_engine.sh [--out DIR]       (default /tmp/eep-fp8-engine-out)
# 1. build    `eep build-gemm --with-fp8`: the bf16 and FP8 CUTLASS libraries, found in build/gemm-cache
#             when built there beforehand (the ranks must not build them: minutes each);
# 2. engine   tests/gpu/fp8_engine.py: GpuEngine with one rank and FP8 experts (FP8 slots restored
#             bit-exact from the host tier and counted in FP8 bytes, the CUTLASS FP8 stage on the
#             engine's slots against the FP8 reference, the captured step against the eager one and
#             the FP8 oracle, slots restored in place under the captured graph);
# 3. fp8      perf/failure_bench.py --fp8, 4 rank processes sharing GPU 0, 2 layers, the fused engine
#             (FP8 dispatch, one scale per row) and the CUTLASS FP8 stage, SIGKILL of rank 1, repair,
#             re-replication and rejoin: 0 lost, 0 refused, 0 changed, the FP8 oracle agreeing;
# 4. bf16     the same run with bf16 experts and the bf16 CUTLASS stage;
# 5. summary  perf/repair_summary.py over both runs (exit 1 on any loss, refusal, change or disagreement).
# Each step logs under DIR; the last lines printed are the summary (also DIR/repair_summary.json).
set -u
source tests/gpu/failure_bench_one_gpu.sh
source tests/gpu/out_option.sh /tmp/eep-fp8-engine-out "$@"
DIR=$OUT_DIR
PY=python3
WORK=/tmp/eep-fp8-engine
LOG=$DIR/steps.log
: > "$LOG"
START=$(date +%s); BUDGET=${EEP_GPU_BUDGET_S:-330}
source tests/gpu/steps.sh
rc_all=0
nvidia-smi -L | tee "$DIR/gpus.txt"; df -hT /tmp /dev/shm | tee -a "$DIR/gpus.txt"

step build 60 $PY -m eep.cli build-gemm --with-fp8 --cache-dir "${EEP_GEMM_CACHE_DIR:-$PWD/build/gemm-cache}" \
  || { echo "no CUTLASS libraries: the runs below would build them in every rank"; exit 1; }
export EEP_GEMM_CACHE_DIR=${EEP_GEMM_CACHE_DIR:-$PWD/build/gemm-cache}
step engine 70 $PY tests/gpu/fp8_engine.py --workdir "$WORK/engine" || rc_all=1
grep -E "^CHECK|^SUMMARY" "$LOG" | tail -8
rm -rf "$WORK/engine"

# the host tier in RAM when /dev/shm has room for it (~0.6 GB here), else on local disk
HOST=/dev/shm; [ "$(df -BG --output=avail /dev/shm | tail -1 | tr -dc 0-9)" -ge 2 ] || HOST=$WORK/host
left=$(( BUDGET - ($(date +%s) - START) - 15 ))
each=$(( left / 2 )); [ $each -gt 125 ] && each=125
failure_bench_run fp8 "$HOST" "$each" --fp8 --expert-backend cutlass || rc_all=1
failure_bench_run bf16 "$HOST" "$each" --expert-backend cutlass || rc_all=1
$PY perf/repair_summary.py "$DIR" fp8 bf16 || rc_all=1
rm -rf "$WORK"
echo "total $(( $(date +%s) - START )) s"
exit $rc_all
