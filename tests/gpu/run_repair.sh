#!/usr/bin/env bash
# Repair on one GPU, in one run (docs/runtime.md "Repair by plan", docs/weights.md "HostTier"):
#   bash tests/gpu/run_repair.sh [--out DIR]       (default /tmp/eep-gpu-out; logs and results there)
# 1. host_tier_pin.py: a host tier in a local-disk file stays pageable with one warning and breaks no
#    CUDA call; the stale error of a failed cudaHostRegister is consumed; a /dev/shm tier is pinned.
# 2. perf/bench_repair_plan.py (CPU only: the planning times on this host's CPU);
# 3. the failure benchmark, 4 rank processes sharing GPU 0, 2 layers, with the host tier in a
#    local-disk directory (EEP_HOST_TIER_DIR), then the same run with it in /dev/shm: both must lose
#    and change no answer; the disk one may be slower (its restores are pageable copies).
set -u
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 EEP_FUSED_CACHE_DIR=/tmp/eep-cache
DIR=/tmp/eep-gpu-out
if [ "${1:-}" = --out ]; then DIR=$2; fi
mkdir -p "$DIR"
PY=python3
WORK=/tmp/eep-repair-gpu
rc_all=0
nvidia-smi -L | tee "$DIR/gpus.txt"; df -hT /tmp /dev/shm | tee -a "$DIR/gpus.txt"

timeout -k 5 90 $PY tests/gpu/host_tier_pin.py --out "$DIR" --disk-dir /tmp > "$DIR/host_tier_pin.log" 2>&1
rc=$?; echo "=== host_tier_pin rc=$rc"; tail -25 "$DIR/host_tier_pin.log"; [ $rc -ne 0 ] && rc_all=1

bench() {  # bench NAME HOST_TIER_DIR
  mkdir -p "$2"
  EEP_HOST_TIER_DIR=$2 timeout -k 5 150 $PY perf/failure_bench.py --gpus 4 --layers 2 --engines fused \
    --steady-s 1.5 --fault-at-s 2 --after-fault-s 8 --skip restart --out "$DIR/$1" --workdir "$WORK/$1" \
    --budget-s 130 > "$DIR/$1.log" 2>&1
  local rc=$?; echo "=== failure bench ($1, host tier in $2) rc=$rc"; tail -15 "$DIR/$1.log"
  (cd "$DIR/$1" 2>/dev/null && for d in steady-* failure; do [ -d "$d" ] && tar czf "$d.tgz" "$d" && rm -rf "$d"; done; true)
  rm -rf "$WORK/$1" "$2"/eep-host-* 2>/dev/null
  return $rc
}
timeout -k 5 60 $PY perf/bench_repair_plan.py --json "$DIR/plan.json" > "$DIR/plan.log" 2>&1
echo "=== bench_repair_plan rc=$? (the planner's time on this host's CPU)"; head -3 "$DIR/plan.log"
bench disk-tier "$WORK/host-on-disk" || rc_all=1
if [ "$(df -BG --output=avail /dev/shm | tail -1 | tr -dc 0-9)" -ge 2 ]; then
  bench shm-tier /dev/shm || rc_all=1
fi
$PY - "$DIR" <<'PYEOF'
import json, sys, pathlib
out = pathlib.Path(sys.argv[1])
rows = {}
for name in ("disk-tier", "shm-tier"):
    p = out / name / "results.json"
    if p.exists():
        f = json.loads(p.read_text()).get("failure", {})
        rows[name] = {k: f.get(k) for k in ("requests_lost", "requests_refused", "inconsistent_tokens",
                                             "oracle_disagreements", "recovery_pause_s", "reintegration_pause_s",
                                             "time_to_95pct_s", "wall_s", "error")}
print(json.dumps(rows, indent=1))
(out / "repair_summary.json").write_text(json.dumps(rows, indent=1))
PYEOF
rm -rf "$WORK"
exit $rc_all
