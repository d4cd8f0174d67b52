# Sourced by the GPU scripts that run the failure benchmark small, with 4 rank processes sharing GPU 0
# (tests/gpu/run_repair.sh, tests/gpu/run_fp8_engine.sh):
#   source tests/gpu/failure_bench_one_gpu.sh     (then: DIR, WORK and PY set by the caller)
#   failure_bench_run NAME HOST_TIER_DIR SECONDS [ARGS...]
# runs perf/failure_bench.py with 2 layers, the fused engine only, a SIGKILL of rank 1 at 2 s, 8 s
# after it (repair, re-replication into 16 extra slots per rank, restart and rejoin), no full restart
# and no A/A run, the host tier in HOST_TIER_DIR (EEP_HOST_TIER_DIR), ARGS added; logs to DIR/NAME.log,
# results in DIR/NAME/, the timelines packed; returns the benchmark's exit code.
# It also exports what every GPU process here needs: the multicast switches off, the NVRTC kernel
# cache (EEP_FUSED_CACHE_DIR, default build/fused-cache), the CUTLASS headers (build/cutlass) and the
# prebuilt CUTLASS libraries (build/gemm-cache) when present.
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 EEP_FUSED_CACHE_DIR=${EEP_FUSED_CACHE_DIR:-$PWD/build/fused-cache}
[ -d build/cutlass ] && export EEP_CUTLASS_DIR=$PWD/build/cutlass
[ -d build/gemm-cache ] && export EEP_GEMM_CACHE_DIR=$PWD/build/gemm-cache

failure_bench_run() {
  local name=$1 host=$2 secs=$3; shift 3
  mkdir -p "$host"
  EEP_HOST_TIER_DIR=$host timeout -k 5 "$secs" $PY perf/failure_bench.py --gpus 4 --layers 2 --engines fused \
    --steady-s 1.5 --fault-at-s 2 --after-fault-s 8 --extra-slots 16 --skip restart --no-aa --out "$DIR/$name" \
    --workdir "$WORK/$name" --budget-s $(( secs - 20 )) "$@" > "$DIR/$name.log" 2>&1
  local rc=$?; echo "=== failure bench ($name, host tier in $host) rc=$rc"; tail -12 "$DIR/$name.log"
  (cd "$DIR/$name" 2>/dev/null && for d in steady-* failure; do [ -d "$d" ] && tar czf "$d.tgz" "$d" && rm -rf "$d"; done; true)
  rm -rf "$WORK/$name" "$host"/eep-host-* 2>/dev/null
  return $rc
}
