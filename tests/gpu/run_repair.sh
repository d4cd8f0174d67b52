#!/usr/bin/env bash
# Repair on one GPU, in one run (docs/runtime.md "Repair by plan" and "Re-replication", docs/weights.md "HostTier"):
#   bash tests/gpu/run_repair.sh [--out DIR]       (default /tmp/eep-gpu-out; logs and results there)
# 1. host_tier_pin.py: a host tier in a local-disk file stays pageable with one warning and breaks no
#    CUDA call; the stale error of a failed cudaHostRegister is consumed; a /dev/shm tier is pinned.
# 2. peer_slots.py: a rank's slots in VMM memory copied device to device by another process on a
#    copy stream (exact, one event pair per layer batch, in the background while the compute stream
#    works), the copy rate beside the planner's peer link, and the tier after the exporter's SIGKILL.
# 3. perf/bench_repair_plan.py (CPU only: the planning times on this host's CPU);
# 4. the failure benchmark, 4 rank processes sharing GPU 0, 2 layers, 16 extra slots per rank (room
#    for re-replication), with the host tier in a local-disk directory (EEP_HOST_TIER_DIR), then the
#    same run with it in /dev/shm: both must lose and change no answer; the disk one may be slower
#    (its restores are pageable copies). Predicted vs observed per repair phase and replica counts
#    before the fault, after repair, after re-replication and after the rejoin are in each summary.
# The last lines printed are a compact summary of both runs (also in DIR/repair_summary.json).
set -u
export EEP_FUSED_CACHE_DIR=${EEP_FUSED_CACHE_DIR:-/tmp/eep-cache}
source tests/gpu/failure_bench_one_gpu.sh
source tests/gpu/out_option.sh /tmp/eep-gpu-out "$@"
DIR=$OUT_DIR
PY=python3
WORK=/tmp/eep-repair-gpu
rc_all=0
nvidia-smi -L | tee "$DIR/gpus.txt"; df -hT /tmp /dev/shm | tee -a "$DIR/gpus.txt"

timeout -k 5 90 $PY tests/gpu/host_tier_pin.py --out "$DIR" --disk-dir /tmp > "$DIR/host_tier_pin.log" 2>&1
rc=$?; echo "=== host_tier_pin rc=$rc"; tail -8 "$DIR/host_tier_pin.log"; [ $rc -ne 0 ] && rc_all=1

timeout -k 5 120 $PY tests/gpu/peer_slots.py --out "$DIR" > "$DIR/peer_slots.log" 2>&1
rc=$?; echo "=== peer_slots rc=$rc"; tail -8 "$DIR/peer_slots.log"; [ $rc -ne 0 ] && rc_all=1

timeout -k 5 60 $PY perf/bench_repair_plan.py --json "$DIR/plan.json" > "$DIR/plan.log" 2>&1
echo "=== bench_repair_plan rc=$? (the planner's time on this host's CPU)"; head -3 "$DIR/plan.log"
RUNS=(disk-tier)
failure_bench_run disk-tier "$WORK/host-on-disk" 150 || rc_all=1
if [ "$(df -BG --output=avail /dev/shm | tail -1 | tr -dc 0-9)" -ge 2 ]; then
  RUNS+=(shm-tier)
  failure_bench_run shm-tier /dev/shm 150 || rc_all=1
fi
$PY perf/repair_summary.py "$DIR" "${RUNS[@]}" || rc_all=1
rm -rf "$WORK"
exit $rc_all
