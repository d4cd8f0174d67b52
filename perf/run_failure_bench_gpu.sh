#!/usr/bin/env bash
# The failure benchmark on a GPU machine, in one script (docs/failure_bench.md).
#   bash perf/run_failure_bench_gpu.sh [NUM_GPUS=4] [LAYERS=auto] [--out DIR]   (default DIR /tmp/eep-failure-bench-out)
# LAYERS=auto: 48 unless the smoke's shard set-up (write + prepare + host tier, per layer) says 48
# layers of set-up alone would take over 200 s; then the largest multiple of 8 that fits.
# 1. smoke: the same script at 2 layers, the eep engine only (catches a broken GPU path in ~1 min);
# 2. the full run with what is left of the budget (skipped when the smoke failed).
# Everything lands under --out: smoke/ and full/ (results.json, summary.txt, timeline.png, logs).
# EEP_BENCH_SMOKE=0 skips the smoke (LAYERS must then be a number); EEP_BENCH_ARGS adds arguments
# to the full run (e.g. "--engines fused --skip restart": the failure run and its golden only;
# "--variants absorb,grouped_mm": more runs, docs/failure_bench.md). `--expert-backend cutlass` uses the
# CUTLASS library built ahead in build/gemm-cache (`eep build-gemm --cache-dir build/gemm-cache`, with
# the headers in build/cutlass when nvidia-cutlass is absent); when it is not there (a build inside
# four rank processes would take most of the time budget) the run falls back to grouped_mm.
set -u
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 EEP_FUSED_CACHE_DIR=/tmp/eep-cache
source tests/gpu/out_option.sh /tmp/eep-failure-bench-out "$@"; set -- ${ARGS[@]+"${ARGS[@]}"}
N=${1:-4}; LAYERS=${2:-auto}
PY=python3
START=$(date +%s); BUDGET=${EEP_GPU_BUDGET_S:-570}
WORK=${EEP_BENCH_WORKDIR:-/tmp/eep-failure-bench}   # local disk of the GPU machine
# the host tier wants ~58 GB of RAM-backed files; a container's small /dev/shm gets a disk directory
SHM_FREE_GB=$(df -BG --output=avail /dev/shm 2>/dev/null | tail -1 | tr -dc 0-9)
if [ "${SHM_FREE_GB:-0}" -lt 70 ] && [ -z "${EEP_HOST_TIER_DIR:-}" ]; then
  mkdir -p "$WORK/host"; export EEP_HOST_TIER_DIR=$WORK/host
  echo "/dev/shm has ${SHM_FREE_GB:-?} GB free: host tier in $EEP_HOST_TIER_DIR (page cache)"
fi
[ -d build/cutlass ] && export EEP_CUTLASS_DIR=$PWD/build/cutlass
[ -d build/gemm-cache ] && export EEP_GEMM_CACHE_DIR=$PWD/build/gemm-cache
BENCH_ARGS=${EEP_BENCH_ARGS:-}
if [[ " $BENCH_ARGS " == *" --expert-backend cutlass "* ]]; then
  if ! $PY -c "from eep.fused.gemm.build import library_path; import sys; p = library_path(); print('CUTLASS library', p); sys.exit(0 if p.exists() else 1)"; then
    echo "no pre-built CUTLASS library for this nvcc/CUTLASS: --expert-backend grouped_mm instead"
    BENCH_ARGS=${BENCH_ARGS/--expert-backend cutlass/--expert-backend grouped_mm}
  fi
fi
nvidia-smi -L | tee "$OUT_DIR/gpus.txt"
df -h /tmp /dev/shm | tee -a "$OUT_DIR/gpus.txt"
$PY -c "import torch; print(torch.__version__, torch.cuda.device_count())" 2>&1 | tee -a "$OUT_DIR/gpus.txt"

# each run's timelines as one archive
pack() { (cd "$1" && for d in steady-* failure restart variant-*; do [ -d "$d" ] && tar czf "$d.tgz" "$d" && rm -rf "$d"; done; true); }

if [ "${EEP_BENCH_SMOKE:-1}" = 1 ]; then
timeout -k 5 150 $PY perf/failure_bench.py --gpus "$N" --layers 2 --engines fused --steady-s 1.5 --fault-at-s 2 \
  --after-fault-s 8 --skip restart --out "$OUT_DIR/smoke" --workdir "$WORK/smoke" --budget-s 130 > "$OUT_DIR/smoke.log" 2>&1
rc=$?; echo "=== smoke rc=$rc"; tail -20 "$OUT_DIR/smoke.log"
rm -rf "$WORK/smoke"; pack "$OUT_DIR/smoke"
# rc 1: the eep path (fused steady state or the failure run) broke: the full run would too.
# 2 (a baseline broke) or 124 (smoke ran out of time): the full run is still worth its budget.
if [ $rc -eq 1 ] && [ "${EEP_GPU_KEEP_GOING:-0}" = 0 ]; then echo "smoke failed: full run skipped"; exit $rc; fi
fi

if [ "$LAYERS" = auto ]; then
  LAYERS=$($PY -c "
import json
s = json.load(open('$OUT_DIR/smoke/results.json'))['shards']
per_layer = (s['write_checkpoint_s'] + s['prepare_s'] + s['host_tier_fill_s']) / 2
print(48 if per_layer * 48 <= 200 else max(8, int(200 / per_layer) // 8 * 8))" 2>/dev/null || echo 24)
fi
echo "=== layers for the full run: $LAYERS"
left=$(( BUDGET - ($(date +%s) - START) ))
echo "=== full run: $left s left"
timeout -k 5 "$left" $PY perf/failure_bench.py --gpus "$N" --layers "$LAYERS" --out "$OUT_DIR/full" \
  --workdir "$WORK/full" --budget-s $(( left - 90 )) $BENCH_ARGS > "$OUT_DIR/full.log" 2>&1
rc=$?; echo "=== full rc=$rc"; tail -30 "$OUT_DIR/full.log"
pack "$OUT_DIR/full"
rm -rf "$WORK"
rm -f /dev/shm/eep-host-* 2>/dev/null   # host tiers this script's runs built
exit $rc
